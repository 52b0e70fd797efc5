"""Keep-alive connections to backends, pooled per backend.

``http.client.HTTPConnection`` opens and owns each socket (address lookup,
connect timeout, TCP_NODELAY).  We do not use its request/response machinery:
its response parser goes through the ``email`` package (slow on the hot
path) and is lenient where a proxy must be strict (duplicate Content-Length,
obs-fold, chunk sizes such as ``0x1_0``), so messages are framed by
``http11``/``message_reader`` instead.  ``urllib.request`` is not an option
at all: it opens a new connection per request and follows redirects.

``https://`` backends: the pool of such a backend has a ``BackendTLS``
(``--backend-ca``/``--backend-insecure``, one client context shared by
every pool of the cluster and by the health checks); each connection is
wrapped right after the TCP connect, with SNI and name checking for the
URL's host (``tls.client_context``).  TLS sockets get Python-level timeouts
(``tls.set_timeouts``: kernel ``SO_RCVTIMEO`` makes SSL reads retry forever),
and the staleness checks also look at bytes OpenSSL already decrypted
(``SSLSocket.pending()``), which no poll of the descriptor can see.
"""

from __future__ import annotations

import http.client
import logging
import select
import selectors
import socket
import ssl
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING

import tls
from loops import LoopGuard
from socket_io import SocketReader, SocketWriter

if TYPE_CHECKING:
    from settings import PoolSettings

log = logging.getLogger("cclb")


class BackendTLSError(OSError):
    """The client context for https:// backends cannot be built (the CA file went bad).

    An OSError, so that the proxy treats it like any failed connect (a
    passive failure, then 502/503), never as a crash.
    """


class BackendTLS:
    """How cclb speaks TLS to ``https://`` backends: settings and one shared client context.

    The context (``tls.client_context``) is built on first use, so a
    configuration without https backends never loads the system trust
    store; ``lock`` guards ``_context``.  A reload makes a new ``BackendTLS``
    (the CA file is read again); connections opened before keep theirs.
    """

    def __init__(self, ca_file: str | None = None, insecure: bool = False) -> None:
        self.ca_file = ca_file
        self.insecure = insecure
        self.lock = threading.Lock()
        self._context: ssl.SSLContext | None = None

    @classmethod
    def of(cls, pool: PoolSettings, previous: BackendTLS | None = None) -> BackendTLS:
        """The TLS settings of ``pool``; logs a WARNING when verification is (newly) off.

        Called when a cluster is built from the settings (at start) and on a
        reload (``previous``: the settings in force, so that an unchanged
        ``--backend-insecure`` is not warned about again).
        """
        made = cls(pool.backend_ca, pool.backend_insecure)
        if made.insecure and not (previous is not None and previous.insecure):
            log.warning("--backend-insecure: the certificates of https:// backends are NOT "
                        "verified (anyone on the network path can impersonate them)")
        return made

    def context(self) -> ssl.SSLContext:
        """The client context (built once); BackendTLSError if the CA file cannot be used."""
        with self.lock:
            if self._context is None:
                try:
                    self._context = tls.client_context(self.ca_file, self.insecure)
                except tls.TLSConfigError as error:
                    raise BackendTLSError(str(error)) from None
            return self._context


def describe_error(error: BaseException) -> str:
    """A short, human-readable cause for a failed connection or exchange with a backend.

    TLS failures say so: ``certificate verify failed: Hostname mismatch...``
    (``tls.describe_tls_error``).
    """
    if isinstance(error, ssl.SSLError):  # also SSLCertVerificationError
        return tls.describe_tls_error(error)
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve host ({error.strerror})"
    if isinstance(error, http.client.HTTPException):
        return f"invalid answer ({type(error).__name__})"
    return str(error) or type(error).__name__


class HeadDeadlineReader(SocketReader):
    """A ``SocketReader`` whose reads can be held to a deadline: the response head's.

    The socket's kernel receive timeout bounds each ``recv``, not a whole
    head: a backend sending one byte just within it would never time out.
    While ``deadline`` (a ``time.monotonic()`` value; 0.0 = none) is set,
    every further ``recv`` waits at most until the deadline, and one that
    would start after it raises ``TimeoutError``.  Cheap when the head
    arrives in one segment (the usual case): the first ``recv`` starts right
    after the deadline was set, so the kernel timeout needs no change and no
    extra system call is made; only a head in several segments shrinks the
    timeout (one ``setsockopt`` per further read) and ``end_deadline``
    restores it (one more).  Owned by the connection's thread, like its base.
    """

    __slots__ = ("deadline", "read_timeout", "kernel_timeout")

    # A read starting less than this before the kernel timeout would have
    # expired anyway overshoots the deadline by at most this much: not worth
    # a system call.
    SLACK = 0.005

    def __init__(self, sock: socket.socket, read_timeout: float) -> None:
        super().__init__(sock)
        self.deadline = 0.0
        self.read_timeout = read_timeout  # the per-read timeout (set_timeouts)
        self.kernel_timeout = read_timeout  # SO_RCVTIMEO (or, over TLS, settimeout) as it is now

    def fill(self) -> bool:
        deadline = self.deadline
        if deadline:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            if remaining < self.kernel_timeout - self.SLACK:
                self._set_receive_timeout(remaining)
        return SocketReader.fill(self)

    def end_deadline(self) -> None:
        """Back to the per-read timeout (the body has no whole-body deadline)."""
        self.deadline = 0.0
        if self.kernel_timeout != self.read_timeout:
            self._set_receive_timeout(self.read_timeout)

    def _set_receive_timeout(self, seconds: float) -> None:
        # A zero timeval means "no timeout" to the kernel: never set less than 1 ms.
        seconds = max(seconds, 0.001)
        if isinstance(self.sock, ssl.SSLSocket):
            # Never SO_RCVTIMEO on a TLS socket (see tls.set_timeouts); this
            # bounds sends too, which only matters after the head was sent.
            self.sock.settimeout(seconds)
            self.kernel_timeout = seconds
            return
        whole = int(seconds)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             struct.pack("ll", whole, int((seconds - whole) * 1_000_000)))
        self.kernel_timeout = seconds


class UpstreamConnection(http.client.HTTPConnection):
    """One connection to a backend, with a persistent buffered reader.

    ``owner`` is the token of the client connection it serves or last
    served (``ConnectionPool.acquire``); ``generation`` the pool's
    generation when it was opened.  Both are written only by the thread
    that holds the connection (or under the pool's lock while it is idle).
    """

    reader: HeadDeadlineReader
    writer: SocketWriter
    idle_since: float = 0.0
    generation: int = 0  # the pool's generation when this connection was opened
    owner: int = 0  # the client connection it serves or last served (0: none yet)
    watched: bool = False  # armed in the idle watcher (guarded by its pool's lock)

    def __init__(self, host: str, port: int, connect_timeout: float, read_timeout: float,
                 tls_context: ssl.SSLContext | None = None) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self.read_timeout = read_timeout
        self.tls_context = tls_context  # None: plain HTTP; else an https:// backend

    def connect(self) -> None:
        """Connect (and, for https, complete the TLS handshake); OSError if either fails.

        The handshake runs under the connect timeout (the socket's timeout
        until ``set_timeouts``).  A certificate that fails verification
        raises ``ssl.SSLCertVerificationError`` (an OSError).
        """
        super().connect()  # sets TCP_NODELAY too; timeout = connect timeout
        assert self.sock is not None
        if self.tls_context is not None:
            # server_hostname: SNI (for a name; never for an IP literal) and the
            # name the certificate must be valid for (DNS or IP subjectAltName).
            self.sock = self.tls_context.wrap_socket(self.sock, server_hostname=self.host)
        tls.set_timeouts(self.sock, self.read_timeout)
        self.reader = HeadDeadlineReader(self.sock, self.read_timeout)
        self.writer = SocketWriter(self.sock)
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)

    def close(self) -> None:
        reader = getattr(self, "reader", None)
        if reader is not None:
            reader.close()
        super().close()

    def send_all(self, data: bytes) -> None:
        self.writer.write(data)

    def looks_stale(self) -> bool:
        """True if the backend closed (or sent unexpected bytes) while idle.

        An idle keep-alive connection must have nothing to read; anything
        readable is either EOF or garbage, so the connection is not reused.
        """
        sock = self.sock
        if sock is None:
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # bytes OpenSSL decrypted already: the descriptor may look quiet
        try:
            return bool(self.poller.poll(0))
        except (OSError, ValueError):
            return True

    def has_leftover_bytes(self) -> bool:
        """True if bytes beyond the last response were already received.

        They sit in the reader's buffer, where ``looks_stale`` cannot see
        them (e.g. a body sent after a HEAD or 304 answer).  Reused, the
        connection would hand them to the next request as its response.
        Over TLS, decrypted bytes may also wait inside OpenSSL (``pending``).
        """
        if self.reader.buffered > 0:
            return True
        sock = self.sock
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


# epoll interest sets of a watched connection (Linux).  Armed while idle:
# readable (bytes or EOF) or hung up, reported once (ONESHOT), so an event
# the watcher declines can never make it spin.  Disarmed while in use: no
# events (an error or hang-up is reported at most once, then it is disarmed).
_ARMED = getattr(select, "EPOLLIN", 0) | getattr(select, "EPOLLRDHUP", 0) | getattr(select, "EPOLLONESHOT", 0)
_DISARMED = getattr(select, "EPOLLONESHOT", 0)


class IdleWatcher:
    """One daemon thread watching every idle pooled connection of every pool.

    An idle keep-alive connection must have nothing to read: bytes arriving
    while no request is outstanding answer no request (a backend sending an
    unsolicited or extra response), and EOF means the backend closed it.
    Either way it must never carry another request, or the next client gets
    someone else's answer (RFC 9112 9.3: a response belongs to the request
    it follows on the connection).  The acquire-time ``looks_stale`` poll
    catches what arrived before a connection is handed out; the watcher
    closes such a connection as soon as the kernel reports it readable (as
    nginx's upstream keepalive module does), so it stops being a candidate
    for reuse and the backend's side is freed at once.

    Cost on the request path: none while connections are busy.  Arming
    (registering) a connection on every release and disarming it on every
    acquire cost two system calls per request, measured at ~15 % more CPU
    per request under load (each call hands the GIL over).  So the watcher
    arms, every ``arm_period`` (50 ms), the idle connections not armed yet,
    and only a connection that was armed is disarmed when it is handed out:
    under load, connections go back to work within milliseconds and are
    never armed; an idle one is watched from at most 50 ms after its
    release (a readable one is reported as soon as it is armed), and until
    then the acquire-time poll covers it.  With epoll a connection is added
    to the set once and re-armed with ``MOD``; the kernel drops it when it
    is closed.  Elsewhere a ``selectors`` selector is used (register to arm,
    unregister to disarm).

    Locks: ``lock`` guards ``pools`` (every pool using this watcher, weakly),
    ``entries`` (descriptor -> (pool, connection) last
    watched under that number; with epoll an entry may outlive its closed
    connection until the number is reused, which is harmless: the kernel
    dropped the closed socket from the set, so no event names it), ``armed``,
    the selector or epoll object's registrations and the thread's start.  ``watch``/``unwatch`` are called with the owning
    pool's lock held, so "in the pool's idle list" and "armed here" change
    together (lock order: pool lock, then ``lock``; ``UpstreamConnection.watched``
    is guarded by the pool's lock): a connection is never handed out while armed.  The wait itself runs without ``lock``; each
    event is re-checked under the pool's lock
    (``ConnectionPool.discard_if_stale``), so an event for a connection
    handed out meanwhile, or for a descriptor number already reused by
    another socket, closes nothing.
    """

    def __init__(self, use_epoll: bool = hasattr(select, "epoll")) -> None:
        self.use_epoll = use_epoll  # False: the portable selectors path (tests use both)
        self.lock = threading.Lock()
        self.epoll: select.epoll | None = None  # Linux
        self.selector: selectors.BaseSelector | None = None  # elsewhere
        self.pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()
        self.entries: dict[int, tuple[ConnectionPool, UpstreamConnection]] = {}
        self.armed: set[int] = set()  # descriptors armed now (idle connections)
        self.wake_reader: socket.socket | None = None
        self.wake_writer: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self.stopped = threading.Event()
        self.guard = LoopGuard("upstream idle watcher")
        self.discarded = 0  # connections closed because they became readable

    def add_pool(self, pool: ConnectionPool) -> None:
        """Arm ``pool``'s idle connections from now on (held weakly)."""
        with self.lock:
            self.pools.add(pool)

    def watch(self, pool: ConnectionPool, conn: UpstreamConnection) -> bool:
        """Arm idle ``conn`` of ``pool``; False if it cannot be (closed, or not started).

        The caller holds ``pool.lock`` and sets ``conn.watched``.
        """
        sock = conn.sock
        fd = sock.fileno() if sock is not None else -1
        if fd < 0:
            return False  # closed
        with self.lock:
            if self.epoll is None and self.selector is None:
                return False
            try:
                if self.epoll is not None:
                    entry = self.entries.get(fd)
                    if entry is not None and entry[1] is conn:
                        self.epoll.modify(fd, _ARMED)  # re-arm: the usual case
                    else:
                        # First pooling of this connection; an entry under the
                        # same number belonged to a socket since closed (the
                        # kernel dropped it from the set then).
                        try:
                            self.epoll.register(fd, _ARMED)
                        except FileExistsError:
                            self.epoll.modify(fd, _ARMED)
                        self.entries[fd] = (pool, conn)
                else:
                    assert self.selector is not None
                    if fd in self.armed:  # a stale registration of a socket closed while idle
                        self.selector.unregister(fd)
                    self.selector.register(fd, selectors.EVENT_READ)
                    self.entries[fd] = (pool, conn)
            except (OSError, ValueError, KeyError):
                return False
            self.armed.add(fd)
        return True

    def unwatch(self, conn: UpstreamConnection) -> None:
        """Disarm ``conn`` (it is being handed out or closed); caller holds its pool's lock."""
        sock = conn.sock
        fd = sock.fileno() if sock is not None else -1
        with self.lock:
            if fd not in self.armed:
                return
            self.armed.discard(fd)
            try:
                if self.epoll is not None:
                    self.epoll.modify(fd, _DISARMED)
                elif self.selector is not None:
                    self.selector.unregister(fd)
                    del self.entries[fd]
            except (OSError, ValueError, KeyError):
                pass

    def watched(self) -> int:
        """How many connections are watched now (for tests and diagnostics)."""
        with self.lock:
            return len(self.armed)

    def start(self) -> None:
        """Start the thread now (the server does, so that no request pays for it)."""
        with self.lock:
            if self.epoll is None and self.selector is None and not self.stopped.is_set():
                self._start()

    def _start(self) -> None:
        # caller holds self.lock
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        if self.use_epoll:
            self.epoll = select.epoll()
            self.epoll.register(self.wake_reader.fileno(), select.EPOLLIN)
        else:
            self.selector = selectors.DefaultSelector()
            self.selector.register(self.wake_reader.fileno(), selectors.EVENT_READ)
        self.thread = threading.Thread(target=self.run, name="upstream-idle-watcher", daemon=True)
        self.thread.start()

    # Seconds between two rounds arming the idle connections not armed yet.
    arm_period = 0.05
    # Seconds between two sweeps for connections idle longer than their pool's idle_timeout.
    sweep_period = 1.0

    def run(self) -> None:
        wake = self.wake_reader.fileno() if self.wake_reader is not None else -1
        next_sweep = time.monotonic() + self.sweep_period
        while not self.stopped.is_set():
            with self.guard:
                self.arm_idle()
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.sweep_period
                with self.guard:
                    self.sweep()
            with self.guard:
                if self.epoll is not None:
                    ready = [fd for fd, _ in self.epoll.poll(self.arm_period)]
                else:
                    assert self.selector is not None
                    ready = [key.fd for key, _ in self.selector.select(self.arm_period)]
                for fd in ready:
                    if fd == wake:
                        self._drain_wake()
                        continue
                    with self.lock:
                        entry = self.entries.get(fd)
                    if entry is not None:
                        # One connection's fault must not spare the others of
                        # this round.  Its event is spent (ONESHOT) and it is
                        # not re-armed, so a fault that repeats cannot spin;
                        # the acquire-time poll still keeps it from reuse.
                        with self.guard:
                            self.check(*entry)

    def arm_idle(self) -> None:
        """Arm every pool's idle connections that are not armed yet (one round)."""
        with self.lock:
            pools = list(self.pools)
        for pool in pools:
            pool.arm_idle()

    def sweep(self) -> None:
        """Close idle connections past their pool's ``idle_timeout``.

        Otherwise a connection nobody takes (e.g. with ``--upstream-reuse
        safe`` and only ``Connection: close`` clients, whose every request
        is a first one) would hold a backend connection, and often a backend
        thread, until the backend closes it.
        """
        with self.lock:
            pools = list(self.pools)
        now = time.monotonic()
        for pool in pools:
            pool.expire_idle(now)

    def check(self, pool: ConnectionPool, conn: UpstreamConnection) -> None:
        """``conn`` was reported readable: close it if it is idle and stale, else re-arm it if idle."""
        if pool.discard_if_stale(conn):
            with self.lock:
                self.discarded += 1

    def _drain_wake(self) -> None:
        try:
            assert self.wake_reader is not None
            while self.wake_reader.recv(64):
                pass
        except (BlockingIOError, OSError):
            pass

    def stop(self) -> None:
        """End the thread and close what it used (tests; the shared watcher lives as long as the process)."""
        with self.lock:
            self.stopped.set()
            thread, writer = self.thread, self.wake_writer
        if writer is not None:
            try:
                writer.send(b"x")
            except OSError:
                pass
        if thread is not None:
            thread.join(timeout=5)
        with self.lock:
            if self.epoll is not None:
                self.epoll.close()
            if self.selector is not None:
                self.selector.close()
            for sock in (self.wake_reader, self.wake_writer):
                if sock is not None:
                    sock.close()
            self.entries.clear()
            self.armed.clear()
            self.epoll = None
            self.selector = None


# The watcher of every pool that is not given its own (tests give their own).
SHARED_IDLE_WATCHER = IdleWatcher()


class ConnectionPool:
    """Idle keep-alive connections to one backend, most recently used first.

    ``lock`` guards ``idle``, ``generation`` and ``retired``, and each idle
    connection's ``watched`` flag and arming in ``watcher`` (see
    ``IdleWatcher``).  Connections are handed out exclusively: a connection
    is either in ``idle`` (armed in the watcher once idle for a moment) or
    owned by exactly one request (never armed).  ``close_all``
    (the backend went down) starts a new generation: a connection opened
    before it and released after it by a request that was still in flight
    is closed, not pooled.  ``retire`` (the backend was removed) does the
    same for good.
    """

    def __init__(self, host: str, port: int, connect_timeout: float,
                 read_timeout: float, max_idle: int = 64, idle_timeout: float = 30.0,
                 watcher: IdleWatcher | None = None, tls: BackendTLS | None = None) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        # None: plain HTTP; else an https:// backend (replaced on reload, like
        # the timeouts: read once per new connection, so no lock is needed).
        self.tls = tls
        self.watcher = watcher or SHARED_IDLE_WATCHER
        self.lock = threading.Lock()
        self.idle: list[UpstreamConnection] = []
        self.generation = 0
        self.retired = False
        self.watcher.add_pool(self)

    def acquire(self, owner: int = 0, own_only: bool = False) -> tuple[UpstreamConnection, bool]:
        """A connection for a request of client connection ``owner``, and whether it was reused.

        ``own_only`` (``--upstream-reuse safe`` for a client connection's
        first request, HAProxy's ``http-reuse safe``): only an idle
        connection that ``owner`` itself used before may be reused, never
        one another client connection used, so a backend that answers a
        request twice cannot hand its extra answer to a newcomer.  Otherwise
        the most recently used idle connection.

        A pooled connection is polled first (one system call, the last line
        of defence behind the ``IdleWatcher``): anything readable on an idle
        connection (EOF, or bytes nobody asked for) makes it unusable.  A new
        connection is connected here; OSError (refused, timeout) is the
        caller's to handle.
        """
        now = time.monotonic()
        while True:
            with self.lock:
                idle = self.idle
                conn = None
                if idle:
                    if not own_only:
                        conn = idle.pop()
                    else:
                        for index in range(len(idle) - 1, -1, -1):
                            if idle[index].owner == owner:
                                conn = idle.pop(index)
                                break
                    if conn is not None and conn.watched:
                        self.watcher.unwatch(conn)  # only if it was idle long enough to be armed
                        conn.watched = False
            if conn is None:
                break
            if now - conn.idle_since < self.idle_timeout and not conn.looks_stale():
                conn.owner = owner
                return conn, True
            conn.close()
        backend_tls = self.tls
        context = backend_tls.context() if backend_tls is not None else None  # BackendTLSError: an OSError
        conn = UpstreamConnection(self.host, self.port, self.connect_timeout, self.read_timeout, context)
        conn.owner = owner
        with self.lock:
            conn.generation = self.generation
        try:
            conn.connect()
        except BaseException:
            conn.close()
            raise
        return conn, False

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection whose last response was read completely.

        The idle watcher arms it if it stays idle (``IdleWatcher.arm_period``).
        """
        conn.idle_since = time.monotonic()
        with self.lock:
            if (len(self.idle) < self.max_idle and not self.retired
                    and conn.generation == self.generation):
                self.idle.append(conn)
                return
        conn.close()

    def arm_idle(self) -> None:
        """Have the idle watcher watch the idle connections it does not watch yet."""
        with self.lock:
            for conn in self.idle:
                if not conn.watched:
                    conn.watched = self.watcher.watch(self, conn)

    def _unwatch(self, conn: UpstreamConnection) -> None:
        # caller holds self.lock
        if conn.watched:
            self.watcher.unwatch(conn)
            conn.watched = False

    def expire_idle(self, now: float) -> int:
        """Close the idle connections unused for ``idle_timeout`` seconds; how many."""
        with self.lock:
            expired = [conn for conn in self.idle if now - conn.idle_since >= self.idle_timeout]
            if not expired:
                return 0
            self.idle = [conn for conn in self.idle if now - conn.idle_since < self.idle_timeout]
            for conn in expired:
                self._unwatch(conn)
        for conn in expired:
            conn.close()
        return len(expired)

    def discard_if_stale(self, conn: UpstreamConnection) -> bool:
        """Close ``conn`` if it is still idle here and has something to read; whether it did.

        Called by the ``IdleWatcher`` when ``conn`` became readable.  The
        check is made under ``lock``: a connection handed out meanwhile is
        not idle any more and is left alone.
        """
        with self.lock:
            if conn not in self.idle:
                return False
            if not conn.looks_stale():
                # A spurious report (the armed event fires once): the next
                # round arms it again.
                self._unwatch(conn)
                return False
            self.idle.remove(conn)
            self._unwatch(conn)
        conn.close()
        return True

    def close_all(self) -> None:
        """Close the idle connections, and those in use when they come back."""
        with self.lock:
            idle, self.idle = self.idle, []
            self.generation += 1
            for conn in idle:
                self._unwatch(conn)
        for conn in idle:
            conn.close()

    def retire(self) -> None:
        """The backend is gone: close everything now and never pool again."""
        with self.lock:
            self.retired = True
        self.close_all()

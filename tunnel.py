"""A bounded, two-way byte relay for upgraded connections (WebSocket and friends).

After a backend answers ``101 Switching Protocols`` (RFC 9110 15.2.2, 7.8)
the connection stops being HTTP: ``relay`` copies bytes both ways until both
sides have finished, one fails, nothing moves for ``idle_timeout`` seconds, or
``Tunnel.stop()`` is called.

Design choices (and why):

- **One thread, one selector.**  The proxy already spends one thread per
  client connection; the handler thread runs the tunnel itself, so a tunnel
  costs no extra thread.  (Two blocking threads per tunnel would double the
  thread count for long-lived WebSockets and make half-close and idle
  timeouts need cross-thread coordination.)
- **Bounded memory.**  Each direction has one buffer of at most
  ``BUFFER_LIMIT`` bytes (64 KiB).  A side is read only while the buffer
  towards the other side has room, so a slow reader pushes back on a fast
  writer through TCP flow control instead of filling our memory.
- **Half-close.**  When one side sends EOF, everything already read is
  delivered, then the other side's write half is shut (``shutdown(SHUT_WR)``;
  for TLS a ``close_notify``, RFC 8446 6.1), and the opposite direction keeps
  flowing until it ends too.
- **TLS sockets** (``ssl.SSLSocket``) in non-blocking mode: ``pending()``
  decrypted bytes are read without waiting for the selector (the kernel
  socket may be empty while OpenSSL holds a whole record),
  ``SSLWantReadError``/``SSLWantWriteError`` are waited on in the direction
  OpenSSL asks for, and a write that must be retried is retried with the same
  length (OpenSSL's rule for ``SSL_write``).

The caller owns both sockets: ``relay`` switches them to non-blocking mode and
never closes them; close them when it returns.
"""

from __future__ import annotations

import enum
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

BUFFER_LIMIT = 64 * 1024  # bytes in flight per direction, at most
DEFAULT_IDLE_TIMEOUT = 3600.0  # --tunnel-idle-timeout


class TunnelEnd(enum.Enum):
    """Why a tunnel ended."""

    CLOSED = "closed"  # both sides sent EOF and everything was delivered
    IDLE_TIMEOUT = "idle timeout"  # no byte moved for idle_timeout seconds
    CLIENT_ERROR = "client error"  # reading from or writing to the client failed (reset, TLS error)
    BACKEND_ERROR = "backend error"  # the same on the backend side
    STOPPED = "stopped"  # Tunnel.stop() (the balancer is shutting down)


class ByteCounter(Protocol):
    """What ``relay`` reports to as bytes move (metrics); called from the tunnel's thread."""

    def add_tunnel_bytes(self, client_to_backend: int, backend_to_client: int) -> None: ...


@dataclass
class TunnelCounters:
    """A ``ByteCounter`` summing every tunnel's bytes; ``lock`` guards both totals.

    One instance can be shared by all tunnels of a process (metrics read it
    with ``snapshot()``).
    """

    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    client_to_backend: int = 0
    backend_to_client: int = 0

    def add_tunnel_bytes(self, client_to_backend: int, backend_to_client: int) -> None:
        with self.lock:
            self.client_to_backend += client_to_backend
            self.backend_to_client += backend_to_client

    def snapshot(self) -> tuple[int, int]:
        """(client→backend, backend→client) bytes so far, read consistently."""
        with self.lock:
            return self.client_to_backend, self.backend_to_client


@dataclass(frozen=True)
class TunnelResult:
    """What a tunnel did: bytes delivered each way, why it ended, how long it lasted."""

    client_to_backend: int
    backend_to_client: int
    end: TunnelEnd
    error: str | None  # the failure, for the log (None for CLOSED, IDLE_TIMEOUT, STOPPED)
    duration: float  # seconds


@dataclass
class _Direction:
    """One way of the tunnel: bytes read from ``src`` waiting to be written to ``dst``.

    The bytes wait in ``buf[start:end]``, a buffer allocated once (no
    allocation or copy per chunk: ``recv_into`` writes into it, ``send`` reads
    a view of it).  Owned by the tunnel's thread: no lock.
    """

    name: str  # "client_to_backend" or "backend_to_client"
    src: socket.socket
    dst: socket.socket
    src_end: TunnelEnd  # the end reported if reading src fails
    dst_end: TunnelEnd  # ...if writing dst fails
    buf: bytearray
    start: int = 0
    end: int = 0
    eof: bool = False  # src sent EOF
    shut: bool = False  # dst's write half is shut (EOF passed on)
    delivered: int = 0  # bytes written to dst
    read_wants_write: bool = False  # TLS: src's read needs src writable first
    write_wants_read: bool = False  # TLS: dst's write needs dst readable first
    retry_len: int = 0  # TLS: a write to repeat with exactly this length

    @property
    def pending(self) -> int:
        """Bytes read from src and not yet written to dst."""
        return self.end - self.start

    @property
    def can_read(self) -> bool:
        return not self.eof and self.pending < BUFFER_LIMIT

    @property
    def done(self) -> bool:
        return self.eof and not self.pending and self.shut

    def compact(self) -> None:
        """Move the pending bytes to the front, so the free space is in one piece."""
        if self.start:
            pending = self.pending
            self.buf[:pending] = self.buf[self.start:self.end]
            self.start, self.end = 0, pending

    def append(self, data: bytes) -> None:
        """Add bytes beyond the limit (a TLS drain): the buffer grows for them, once."""
        self.compact()
        del self.buf[self.end:]
        self.buf += data
        self.end = len(self.buf)


def _new_direction(name: str, src: socket.socket, dst: socket.socket, src_end: TunnelEnd, dst_end: TunnelEnd,
                   early: bytes) -> _Direction:
    buf = bytearray(max(BUFFER_LIMIT, len(early)))
    buf[:len(early)] = early
    return _Direction(name, src, dst, src_end, dst_end, buf, end=len(early))


class _Failed(Exception):
    """One side failed; ends the tunnel with ``end``."""

    def __init__(self, end: TunnelEnd, error: BaseException | str) -> None:
        super().__init__(str(error))
        self.end = end


class Tunnel:
    """One relay between a client and a backend socket; ``run()`` once, ``stop()`` from anywhere.

    ``to_backend`` / ``to_client``: bytes already read from one side that
    belong to the other (what a client sent after its request head, what the
    backend sent after its ``101`` head); they are delivered first.
    ``lock`` guards ``stopped`` and the wake-up socket between ``stop()``
    and the end of ``run()``.
    """

    def __init__(self, client: socket.socket, backend: socket.socket, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 counters: ByteCounter | None = None, to_backend: bytes = b"", to_client: bytes = b"") -> None:
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        self.client, self.backend = client, backend
        self.idle_timeout = idle_timeout
        self.counters = counters
        self.up = _new_direction("client_to_backend", client, backend, TunnelEnd.CLIENT_ERROR,
                                 TunnelEnd.BACKEND_ERROR, to_backend)
        self.down = _new_direction("backend_to_client", backend, client, TunnelEnd.BACKEND_ERROR,
                                   TunnelEnd.CLIENT_ERROR, to_client)
        # Readiness as last seen (set by the selector, cleared by a short read or write
        # or EWOULDBLOCK): a socket is only tried when it may make progress, which saves
        # a failing system call per chunk.
        self._readable = {client: True, backend: True}
        self._writable = {client: True, backend: True}
        self.lock = threading.Lock()
        self.stopped = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def stop(self) -> None:
        """Ask ``run()`` to end soon (thread-safe, idempotent); it returns ``STOPPED``."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass  # run() already ended and closed the pair

    def run(self) -> TunnelResult:
        """Relay until the tunnel ends; never raises for socket or TLS failures."""
        started = time.monotonic()
        end, error = TunnelEnd.CLOSED, None
        selector = selectors.DefaultSelector()
        try:
            for sock in (self.client, self.backend):
                sock.setblocking(False)
            selector.register(self._wake_r, selectors.EVENT_READ)
            end = self._loop(selector)
        except _Failed as failure:
            end, error = failure.end, str(failure)
        finally:
            selector.close()
            with self.lock:
                self.stopped = True
                self._wake_r.close()
                self._wake_w.close()
        return TunnelResult(self.up.delivered, self.down.delivered, end, error, time.monotonic() - started)

    # --- the loop ---------------------------------------------------------------

    def _loop(self, selector: selectors.BaseSelector) -> TunnelEnd:
        registered: dict[socket.socket, int] = {}
        last_activity = time.monotonic()
        directions = (self.up, self.down)
        while True:
            moved = False
            for direction in directions:
                moved |= self._pump(direction)
            if moved:
                last_activity = time.monotonic()
            if all(direction.done for direction in directions):
                return TunnelEnd.CLOSED
            with self.lock:
                if self.stopped:
                    return TunnelEnd.STOPPED
            if moved or any(self._tls_pending(direction) for direction in directions):
                continue  # go round again before waiting: more may be possible at once
            remaining = self.idle_timeout - (time.monotonic() - last_activity)
            if remaining <= 0:
                return TunnelEnd.IDLE_TIMEOUT
            self._update_interest(selector, registered)
            self._mark_ready(selector.select(remaining))
            try:
                self._wake_r.recv(16)
            except (BlockingIOError, InterruptedError):
                pass

    def _interest(self, sock: socket.socket) -> int:
        """Selector events ``sock`` must wait for, given both directions' state."""
        events = 0
        for direction in (self.up, self.down):
            if direction.src is sock and direction.can_read:
                events |= selectors.EVENT_WRITE if direction.read_wants_write else selectors.EVENT_READ
            if direction.dst is sock and direction.pending and not direction.shut:
                events |= selectors.EVENT_READ if direction.write_wants_read else selectors.EVENT_WRITE
        return events

    def _update_interest(self, selector: selectors.BaseSelector, registered: dict[socket.socket, int]) -> None:
        for sock in (self.client, self.backend):
            events, old = self._interest(sock), registered.get(sock, 0)
            if events == old:
                continue
            if not old:
                selector.register(sock, events)
            elif not events:
                selector.unregister(sock)
            else:
                selector.modify(sock, events)
            registered[sock] = events

    def _mark_ready(self, ready: list[tuple[selectors.SelectorKey, int]]) -> None:
        """Record what the selector reported.  Any event on a socket makes both of its
        operations worth a try: a TLS read may wait for writability and vice versa."""
        for key, _ in ready:
            sock = key.fileobj
            if sock in self._readable:
                self._readable[sock] = self._writable[sock] = True  # type: ignore[index]

    @staticmethod
    def _tls_pending(direction: _Direction) -> bool:
        """Decrypted bytes wait inside OpenSSL: the selector would not see them."""
        src = direction.src
        return isinstance(src, ssl.SSLSocket) and direction.can_read and src.pending() > 0

    def _pump(self, direction: _Direction) -> bool:
        """Read what can be read, write what can be written, pass EOF on; True if a byte moved."""
        moved = False
        if direction.can_read and (self._readable[direction.src] or self._tls_pending(direction)):
            moved |= self._read(direction)
        if direction.pending and self._writable[direction.dst]:
            moved |= self._write(direction)
        if direction.eof and not direction.pending and not direction.shut:
            self._shut_write(direction)
            moved = True
        return moved

    def _read(self, direction: _Direction) -> bool:
        direction.read_wants_write = False
        src = direction.src
        try:
            direction.compact()
            wanted = BUFFER_LIMIT - direction.end  # > 0: can_read means pending < BUFFER_LIMIT
            with memoryview(direction.buf) as view, view[direction.end:BUFFER_LIMIT] as room:
                count = src.recv_into(room)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            self._readable[src] = False
            return False
        except ssl.SSLWantWriteError:
            self._readable[src] = False
            direction.read_wants_write = True
            return False
        except ssl.SSLZeroReturnError:
            # close_notify after we sent ours: CPython returns 0 for it only while
            # our side has not shut down, and raises this once it has.
            count = 0
        except (OSError, ssl.SSLError) as error:
            raise _Failed(direction.src_end, f"reading: {error}") from None
        if not count:
            direction.eof = True
            return True
        direction.end += count
        if count < wanted and not isinstance(src, ssl.SSLSocket):
            self._readable[src] = False  # the kernel buffer is (very likely) empty now
        return True

    def _write(self, direction: _Direction) -> bool:
        direction.write_wants_read = False
        dst = direction.dst
        length = direction.retry_len or min(direction.pending, BUFFER_LIMIT)
        try:
            with memoryview(direction.buf) as view, view[direction.start:direction.start + length] as data:
                sent = dst.send(data)
        except (BlockingIOError, InterruptedError):
            self._writable[dst] = False
            return False
        except ssl.SSLWantWriteError:
            self._writable[dst] = False
            direction.retry_len = length
            return False
        except ssl.SSLWantReadError:
            self._writable[dst] = False
            direction.retry_len, direction.write_wants_read = length, True
            return False
        except (OSError, ssl.SSLError) as error:
            raise _Failed(direction.dst_end, f"writing: {error}") from None
        direction.retry_len = 0
        direction.start += sent
        direction.delivered += sent
        if direction.start == direction.end:
            direction.start = direction.end = 0
        if sent < length:
            self._writable[dst] = False  # the kernel send buffer is full
        if self.counters is not None and sent:
            if direction is self.up:
                self.counters.add_tunnel_bytes(sent, 0)
            else:
                self.counters.add_tunnel_bytes(0, sent)
        return sent > 0

    def _shut_write(self, direction: _Direction) -> None:
        """Pass EOF on: shut ``dst``'s write half (TLS: send close_notify first)."""
        direction.shut = True
        dst = direction.dst
        if isinstance(dst, ssl.SSLSocket):
            self._tls_close_notify(dst)
            return
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is already gone: the other direction will notice

    def _tls_close_notify(self, dst: ssl.SSLSocket) -> None:
        """Send TLS close_notify on ``dst`` while still reading from it (RFC 8446 6.1).

        The stdlib's only way to send close_notify is ``unwrap()``, whose second
        ``SSL_shutdown`` call would read, and fail on, application data already
        waiting in the kernel (OpenSSL: APPLICATION_DATA_AFTER_CLOSE_NOTIFY).  So
        first read everything ``dst`` already sent into its direction's buffer
        (allowed to exceed the limit for this once), then unwrap; data that
        arrives in the microseconds between the two is the one unavoidable
        window, and ends the tunnel as a TLS error on that side.
        ``SSLSocket.shutdown()`` is not an option: it discards the TLS layer,
        so the bytes the peer still sends could not be decrypted.
        """
        reverse = self.down if dst is self.backend else self.up
        if not reverse.eof:
            while True:
                try:
                    data = dst.recv(BUFFER_LIMIT)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                except ssl.SSLZeroReturnError:
                    data = b""
                except (OSError, ssl.SSLError) as error:
                    raise _Failed(reverse.src_end, f"reading: {error}") from None
                if not data:
                    reverse.eof = True
                    break
                reverse.append(data)
        try:
            dst.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # close_notify is sent; the peer's own close_notify arrives later as EOF
        except (OSError, ssl.SSLError, ValueError) as error:
            if not reverse.eof:
                raise _Failed(reverse.src_end, f"closing TLS: {error}") from None


def relay(client_sock: socket.socket, backend_sock: socket.socket, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
          counters: ByteCounter | None = None, to_backend: bytes = b"", to_client: bytes = b"") -> TunnelResult:
    """Copy bytes both ways until the tunnel ends (see ``Tunnel``); the caller closes both sockets."""
    return Tunnel(client_sock, backend_sock, idle_timeout, counters, to_backend, to_client).run()

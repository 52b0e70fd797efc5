"""Keep-alive connections to backends, pooled per backend.

``http.client.HTTPConnection`` opens and owns each socket (address lookup,
connect timeout, TCP_NODELAY).  We do not use its request/response machinery:
its response parser goes through the ``email`` package (slow on the hot
path) and is lenient where a proxy must be strict (duplicate Content-Length,
obs-fold, chunk sizes such as ``0x1_0``), so messages are framed by
``http11``/``message_reader`` instead.  ``urllib.request`` is not an option
at all: it opens a new connection per request and follows redirects.
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
import time

from socket_io import SocketReader, SocketWriter, set_timeouts


def describe_error(error: BaseException) -> str:
    """A short, human-readable cause for a failed connection or exchange with a backend."""
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


class UpstreamConnection(http.client.HTTPConnection):
    """One connection to a backend, with a persistent buffered reader."""

    reader: SocketReader
    writer: SocketWriter
    idle_since: float = 0.0
    generation: int = 0  # the pool's generation when this connection was opened

    def __init__(self, host: str, port: int, connect_timeout: float, read_timeout: float) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self.read_timeout = read_timeout

    def connect(self) -> None:
        super().connect()  # sets TCP_NODELAY too; timeout = connect timeout
        assert self.sock is not None
        set_timeouts(self.sock, self.read_timeout)
        self.reader = SocketReader(self.sock)
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
        if self.sock is None:
            return True
        try:
            return bool(self.poller.poll(0))
        except (OSError, ValueError):
            return True

    def has_leftover_bytes(self) -> bool:
        """True if bytes beyond the last response were already received.

        They sit in the reader's buffer, where ``looks_stale`` cannot see
        them (e.g. a body sent after a HEAD or 304 answer).  Reused, the
        connection would hand them to the next request as its response.
        """
        return self.reader.buffered > 0


class ConnectionPool:
    """Idle keep-alive connections to one backend, most recently used first.

    ``lock`` guards ``idle``, ``generation`` and ``retired``.  Connections are
    handed out exclusively: a connection is either in ``idle`` or owned by
    exactly one request.  ``close_all`` (the backend went down) starts a new
    generation: a connection opened before it and released after it by a
    request that was still in flight is closed, not pooled.  ``retire`` (the
    backend was removed) does the same for good.
    """

    def __init__(self, host: str, port: int, connect_timeout: float,
                 read_timeout: float, max_idle: int = 64, idle_timeout: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.lock = threading.Lock()
        self.idle: list[UpstreamConnection] = []
        self.generation = 0
        self.retired = False

    def acquire(self) -> tuple[UpstreamConnection, bool]:
        """A connection and whether it was reused from the pool.

        A pooled connection is polled first (one system call): anything
        readable on an idle connection (EOF, or bytes nobody asked for) makes
        it unusable.  A new connection is connected here; OSError (refused,
        timeout) is the caller's to handle.
        """
        now = time.monotonic()
        while True:
            with self.lock:
                conn = self.idle.pop() if self.idle else None
            if conn is None:
                break
            if now - conn.idle_since < self.idle_timeout and not conn.looks_stale():
                return conn, True
            conn.close()
        conn = UpstreamConnection(self.host, self.port, self.connect_timeout, self.read_timeout)
        with self.lock:
            conn.generation = self.generation
        try:
            conn.connect()
        except BaseException:
            conn.close()
            raise
        return conn, False

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection whose last response was read completely."""
        conn.idle_since = time.monotonic()
        with self.lock:
            if (len(self.idle) < self.max_idle and not self.retired
                    and conn.generation == self.generation):
                self.idle.append(conn)
                return
        conn.close()

    def close_all(self) -> None:
        """Close the idle connections, and those in use when they come back."""
        with self.lock:
            idle, self.idle = self.idle, []
            self.generation += 1
        for conn in idle:
            conn.close()

    def retire(self) -> None:
        """The backend is gone: close everything now and never pool again."""
        with self.lock:
            self.retired = True
        self.close_all()


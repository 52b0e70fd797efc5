"""Socket reading and writing with few system calls and a visible buffer.

Why not ``socket.makefile("rb")``?  Two costs and one blind spot:

- A socket with a Python-level timeout does a ``poll()`` before every
  ``recv()``, and each system call releases and re-takes the GIL, which is
  what limits a threaded proxy under load.  Here sockets stay in blocking
  mode and timeouts are kernel timeouts (``SO_RCVTIMEO``/``SO_SNDTIMEO``):
  one ``recv()`` per read, one ``send()`` per write.
- ``BufferedReader`` cannot tell how many bytes it holds without possibly
  blocking; the proxy needs that to know whether a backend sent bytes beyond
  its response (``buffered``).

``SocketReader`` offers the ``readline``/``read``/``read1`` trio that
``message_reader`` uses, plus ``read_head`` (a whole header section in one
search), ``peek`` and ``buffered``; ``SocketWriter`` is the matching ``write``.
"""

from __future__ import annotations

import socket
import struct

RECV_SIZE = 65536


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Kernel receive and send timeouts; blocking mode for the Python socket."""
    sock.settimeout(None)
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class SocketReader:
    """A read buffer over a blocking socket with kernel timeouts.

    Owned by one thread at a time (the connection's), so it needs no lock.
    A kernel timeout surfaces as ``TimeoutError``; end of stream as short
    reads, exactly like a file.
    """

    __slots__ = ("sock", "buffer")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not consumed yet."""
        return len(self.buffer)

    def fill(self) -> bool:
        """One ``recv()`` into the buffer; False at end of stream."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise TimeoutError("timed out") from None
        if not data:
            return False
        self.buffer += data
        return True

    def peek(self, n: int = 1) -> bytes:
        """The buffered bytes, waiting for at least one if there are none."""
        if not self.buffer:
            self.fill()
        return bytes(self.buffer)

    def readline(self, limit: int = -1) -> bytes:
        """Up to and including the next LF, at most ``limit`` bytes (file semantics)."""
        buffer = self.buffer
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end >= 0 and (limit < 0 or end < limit):
                return self._take(end + 1)
            if 0 <= limit <= len(buffer):
                return self._take(limit)
            start = len(buffer)
            if not self.fill():
                return self._take(len(buffer))

    def read_head(self, max_bytes: int) -> bytes:
        """Header lines up to and including the empty line that ends them.

        One search instead of a ``readline`` per line.  Returns more than
        ``max_bytes`` bytes, unterminated, if the head is too large; and what
        there was, unterminated, if the stream ended first.
        """
        buffer = self.buffer
        start = 0
        while True:
            if buffer[:2] == b"\r\n":
                return self._take(2)  # no fields at all
            end = buffer.find(b"\r\n\r\n", start)
            if end >= 0:
                return self._take(end + 4)
            if len(buffer) > max_bytes:
                return self._take(max_bytes + 1)
            start = max(0, len(buffer) - 3)
            if not self.fill():
                return self._take(len(buffer))

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer if the stream ends first."""
        while len(self.buffer) < n:
            if not self.fill():
                break
        return self._take(min(n, len(self.buffer)))

    def read1(self, n: int) -> bytes:
        """At most ``n`` bytes with at most one ``recv()``; b"" at end of stream."""
        if not self.buffer:
            if n >= RECV_SIZE:
                try:
                    return self.sock.recv(n)  # large read: skip the copy
                except BlockingIOError:
                    raise TimeoutError("timed out") from None
            if not self.fill():
                return b""
        return self._take(min(n, len(self.buffer)))

    def _take(self, n: int) -> bytes:
        buffer = self.buffer
        if n == len(buffer):
            data = bytes(buffer)
            buffer.clear()
            return data
        data = bytes(buffer[:n])
        del buffer[:n]
        return data

    def close(self) -> None:
        self.buffer.clear()


class SocketWriter:
    """``write`` = ``sendall`` on a blocking socket with a kernel send timeout.

    Nothing is buffered, so there is nothing to flush or close: the socket's
    owner closes the socket.
    """

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> int:
        """Send all of ``data``; TimeoutError if the peer stops reading, OSError if it is gone."""
        try:
            self.sock.sendall(data)
        except BlockingIOError:  # SO_SNDTIMEO expired: the peer stopped reading
            raise TimeoutError("timed out") from None
        return len(data)

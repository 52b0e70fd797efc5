"""tunnel.py over real loopback sockets: echo, half-close both ways, idle timeout, stop, 200 MiB, TLS."""

from __future__ import annotations

import os
import resource
import socket
import ssl
import threading
import time
import unittest
import zlib
from pathlib import Path

import tls
import tunnel
import websocket
from tests.support import DemoServer, read_head, wait_for
from tunnel import Tunnel, TunnelCounters, TunnelEnd, TunnelResult

CERTS = Path(__file__).resolve().parent / "certs"


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection: (outer peer, relay's end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname(), timeout=10)
        inner, _ = listener.accept()
    return outer, inner


class RelayCase(unittest.TestCase):
    """A client peer and a backend peer, with ``Tunnel`` running between them in a thread."""

    def start(self, idle_timeout: float = 10.0, client_wrap=None, **kwargs) -> None:
        self.client_peer, client_inner = tcp_pair()
        self.backend_peer, backend_inner = tcp_pair()
        for sock in (self.client_peer, self.backend_peer, client_inner, backend_inner):
            self.addCleanup(sock.close)
        if client_wrap is not None:  # TLS between the client peer and the relay
            client_inner, self.client_peer = client_wrap(client_inner, self.client_peer)
            self.addCleanup(client_inner.close)
            self.addCleanup(self.client_peer.close)
        self.counters = TunnelCounters()
        self.tunnel = Tunnel(client_inner, backend_inner, idle_timeout, self.counters, **kwargs)
        self.result: TunnelResult | None = None
        self.finished = threading.Event()

        def run() -> None:
            self.result = self.tunnel.run()
            self.finished.set()

        self.thread = threading.Thread(target=run, name="tunnel")
        self.thread.start()
        self.addCleanup(self.thread.join, 10)
        self.addCleanup(self.tunnel.stop)

    def wait_result(self, timeout: float = 10.0) -> TunnelResult:
        self.assertTrue(self.finished.wait(timeout), "the tunnel did not end")
        assert self.result is not None
        return self.result


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


class PlainRelayTest(RelayCase):
    def test_echo_both_ways_then_close(self) -> None:
        self.start(to_backend=b"early-", to_client=b"101-rest-")
        self.client_peer.sendall(b"hello")
        self.assertEqual(recv_exactly(self.backend_peer, 11), b"early-hello")
        self.backend_peer.sendall(b"world")
        self.assertEqual(recv_exactly(self.client_peer, 14), b"101-rest-world")
        self.client_peer.shutdown(socket.SHUT_WR)
        self.assertEqual(self.backend_peer.recv(10), b"")  # EOF passed on
        self.backend_peer.shutdown(socket.SHUT_WR)
        self.assertEqual(self.client_peer.recv(10), b"")
        result = self.wait_result()
        self.assertEqual((result.client_to_backend, result.backend_to_client, result.end, result.error),
                         (11, 14, TunnelEnd.CLOSED, None))
        self.assertEqual(self.counters.snapshot(), (11, 14))

    def test_client_half_close_backend_keeps_sending(self) -> None:
        self.start()
        self.client_peer.sendall(b"request")
        self.client_peer.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_exactly(self.backend_peer, 8), b"request")  # then EOF
        for i in range(5):
            self.backend_peer.sendall(b"part %d;" % i)
        self.assertEqual(recv_exactly(self.client_peer, 35), b"".join(b"part %d;" % i for i in range(5)))
        self.assertFalse(self.finished.is_set())  # the backend's side is still open
        self.backend_peer.close()
        self.assertEqual(self.client_peer.recv(1), b"")
        self.assertEqual(self.wait_result().end, TunnelEnd.CLOSED)

    def test_backend_half_close_client_keeps_sending(self) -> None:
        self.start()
        self.backend_peer.sendall(b"bye")
        self.backend_peer.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_exactly(self.client_peer, 4), b"bye")
        self.client_peer.sendall(b"still talking")
        self.assertEqual(recv_exactly(self.backend_peer, 13), b"still talking")
        self.client_peer.shutdown(socket.SHUT_WR)
        self.assertEqual(self.backend_peer.recv(1), b"")
        result = self.wait_result()
        self.assertEqual((result.end, result.client_to_backend, result.backend_to_client), (TunnelEnd.CLOSED, 13, 3))

    def test_idle_timeout(self) -> None:
        self.start(idle_timeout=0.3)
        self.client_peer.sendall(b"x")
        self.assertEqual(recv_exactly(self.backend_peer, 1), b"x")
        result = self.wait_result()
        self.assertEqual(result.end, TunnelEnd.IDLE_TIMEOUT)
        self.assertGreaterEqual(result.duration, 0.3)
        self.assertLess(result.duration, 3)

    def test_stop(self) -> None:
        self.start()
        self.client_peer.sendall(b"x")
        self.assertEqual(recv_exactly(self.backend_peer, 1), b"x")
        self.tunnel.stop()
        self.tunnel.stop()  # idempotent
        self.assertEqual(self.wait_result().end, TunnelEnd.STOPPED)

    def test_reset_is_an_error_of_that_side(self) -> None:
        self.start()
        self.backend_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        self.backend_peer.close()  # RST
        result = self.wait_result()
        self.assertEqual(result.end, TunnelEnd.BACKEND_ERROR)
        self.assertIn("reading", result.error or "")

    def test_backpressure_stops_reading_a_side(self) -> None:
        self.start()
        self.client_peer.setblocking(False)
        block, sent = b"x" * 65536, 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the kernel buffers and the relay's are full
            try:
                sent += self.client_peer.send(block)
            except BlockingIOError:
                # The relay may still be draining into the backend's socket: wait for it to stall.
                before = self.tunnel.up.delivered
                if self.finished.wait(0.05) or self.tunnel.up.delivered == before:
                    try:
                        sent += self.client_peer.send(block)
                    except BlockingIOError:
                        break
        self.assertLess(sent, 64 * 1024 * 1024, "the relay never pushed back")
        self.assertLessEqual(self.tunnel.up.pending, tunnel.BUFFER_LIMIT)
        self.client_peer.setblocking(True)
        self.client_peer.shutdown(socket.SHUT_WR)
        got = 0
        while chunk := self.backend_peer.recv(1 << 20):  # the backend reads: everything arrives
            got += len(chunk)
        self.assertEqual(got, sent)
        self.backend_peer.shutdown(socket.SHUT_WR)
        self.assertEqual(self.wait_result().client_to_backend, sent)

    def test_bad_timeout(self) -> None:
        a, b = socket.socketpair()
        with a, b, self.assertRaises(ValueError):
            tunnel.relay(a, b, idle_timeout=0)


def _peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) so the next reading is this test's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class BulkRelayTest(RelayCase):
    SIZE = 200 * 1024 * 1024

    def test_200_mib_with_bounded_memory(self) -> None:
        precise = _peak_rss_reset()
        before = _status_kib("VmRSS") if precise else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.start()
        block = os.urandom(1024 * 1024)
        sent_crc = 0
        for _ in range(self.SIZE // len(block)):
            sent_crc = zlib.crc32(block, sent_crc)
        received = {"bytes": 0, "crc": 0}

        def consume() -> None:
            self.backend_peer.settimeout(20)
            while chunk := self.backend_peer.recv(256 * 1024):
                received["bytes"] += len(chunk)
                received["crc"] = zlib.crc32(chunk, received["crc"])

        consumer = threading.Thread(target=consume)
        consumer.start()
        started = time.monotonic()
        view = memoryview(block)
        for _ in range(self.SIZE // len(block)):
            self.client_peer.sendall(view)
        self.client_peer.shutdown(socket.SHUT_WR)
        consumer.join(30)
        elapsed = time.monotonic() - started
        self.backend_peer.shutdown(socket.SHUT_WR)
        result = self.wait_result()
        after = _status_kib("VmHWM") if precise else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.assertEqual((received["bytes"], received["crc"]), (self.SIZE, sent_crc))
        self.assertEqual((result.end, result.client_to_backend), (TunnelEnd.CLOSED, self.SIZE))
        # The relay holds at most 64 KiB per direction; allow 24 MiB for the test's own
        # 256 KiB reads, its threads' malloc arenas, interpreter noise and allocator slack: far below the 200 MiB moved.
        growth_mib = (after - before) / 1024
        self.assertLess(growth_mib, 24, f"peak RSS grew by {growth_mib:.1f} MiB")
        print(f"\n  200 MiB through the tunnel in {elapsed:.2f} s ({self.SIZE / elapsed / 2**20:.0f} MiB/s), "
              f"peak RSS growth {growth_mib:.1f} MiB", end=" ")


def tls_wrapper(test: unittest.TestCase):
    """TLS between the client peer (verifying the test CA) and the relay's end (localhost cert)."""
    server_context = tls.server_context(tls.load_certificates([tls.CertSpec(str(CERTS / "localhost.pem"))]))
    client_context = tls.client_context(str(CERTS / "ca.pem"))

    def wrap(inner: socket.socket, outer: socket.socket) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
        box: dict[str, ssl.SSLSocket] = {}
        server = threading.Thread(target=lambda: box.setdefault("inner", server_context.wrap_socket(inner, server_side=True)))
        server.start()
        outer_tls = client_context.wrap_socket(outer, server_hostname="localhost")
        server.join(10)
        return box["inner"], outer_tls
    return wrap


class WebSocketThroughTunnelTest(unittest.TestCase):
    """What the proxy will do: bytes of a /ws session relayed to server.py unchanged."""

    def test_ws_echo_through_relay(self) -> None:
        server = DemoServer(name="ws-tunnel")
        self.addCleanup(server.stop)
        backend = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        client_peer, client_inner = tcp_pair()
        for sock in (backend, client_peer, client_inner):
            self.addCleanup(sock.close)
        relay_result: list[TunnelResult] = []
        worker = threading.Thread(target=lambda: relay_result.append(tunnel.relay(client_inner, backend, 10)))
        worker.start()
        self.addCleanup(worker.join, 10)
        key = websocket.new_key()
        client_peer.sendall((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        reader = client_peer.makefile("rb")
        self.addCleanup(reader.close)
        self.assertEqual(read_head(reader).header("Sec-WebSocket-Accept"), websocket.accept_key(key))
        client_peer.sendall(websocket.encode_frame(websocket.Opcode.TEXT, b"through the tunnel", mask=True))
        self.assertEqual(websocket.read_frame(reader.read).payload, b"through the tunnel")
        client_peer.sendall(websocket.encode_frame(websocket.Opcode.CLOSE, websocket.encode_close(1000), mask=True))
        self.assertEqual(websocket.read_frame(reader.read).opcode, websocket.Opcode.CLOSE)
        self.assertEqual(reader.read(1), b"")  # server.py closed, the relay passed EOF on
        client_peer.shutdown(socket.SHUT_WR)
        worker.join(10)
        self.assertEqual(relay_result[0].end, TunnelEnd.CLOSED)


class TlsRelayTest(RelayCase):
    def test_tls_client_side_bulk_and_half_close(self) -> None:
        self.start(client_wrap=tls_wrapper(self))
        size = 8 * 1024 * 1024
        payload = os.urandom(size)
        after = bytearray()

        def backend() -> None:
            # Echo `size` bytes, say goodbye and half-close, then read what still comes.
            self.backend_peer.settimeout(20)
            echoed = 0
            while echoed < size:
                chunk = self.backend_peer.recv(min(256 * 1024, size - echoed))
                self.backend_peer.sendall(chunk)
                echoed += len(chunk)
            self.backend_peer.sendall(b"goodbye")
            self.backend_peer.shutdown(socket.SHUT_WR)
            while chunk := self.backend_peer.recv(65536):
                after.extend(chunk)

        echoed = bytearray()
        thread = threading.Thread(target=backend)
        thread.start()
        threads = [thread]
        # One thread per SSL object (OpenSSL's SSL is not safe for concurrent use): the
        # client sends 64 KiB at a time and keeps at most 128 KiB unanswered, so TLS
        # records flow both ways at once (pending(), want-read/want-write in the relay).
        with memoryview(payload) as view:
            for offset in range(0, size, 65536):
                self.client_peer.sendall(view[offset:offset + 65536])
                while len(echoed) < offset - 128 * 1024:
                    chunk = self.client_peer.recv(256 * 1024)
                    self.assertTrue(chunk, "the tunnel closed early")
                    echoed.extend(chunk)
        while chunk := self.client_peer.recv(256 * 1024):  # until close_notify
            echoed.extend(chunk)
        self.assertEqual(bytes(echoed), payload + b"goodbye")  # then close_notify: b""
        self.client_peer.sendall(b"after your EOF")  # TLS half-close: the client may still send
        wait_for(lambda: len(after) >= 14, 10, message="the backend to get the bytes sent after EOF")
        self.assertEqual(bytes(after), b"after your EOF")
        self.client_peer.unwrap()  # the client's close_notify: EOF towards the backend
        threads[0].join(10)
        self.assertFalse(threads[0].is_alive(), "the backend never saw EOF")
        result = self.wait_result()
        self.assertEqual((result.end, result.client_to_backend, result.backend_to_client),
                         (TunnelEnd.CLOSED, size + 14, size + 7))


if __name__ == "__main__":
    unittest.main()

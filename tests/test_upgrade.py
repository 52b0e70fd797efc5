"""Upgrade tunnels end to end (RFC 9110 7.8, RFC 6455): real processes, real sockets.

A ``server.py`` child (its ``/ws`` echo route) or a scripted ``RawBackend``
behind a real ``cclb.py``; the client is a raw-socket WebSocket client built
on ``websocket.py``.  Nothing waits with a fixed sleep: reads have
deadlines, and conditions are polled with ``wait_for``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import sys
import unittest
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tls  # noqa: E402
import websocket  # noqa: E402
from websocket import CloseCode, Opcode  # noqa: E402
from tests.support import (BASE_ARGS, Balancer, DemoServer, RawBackend, Response, Script,  # noqa: E402
                           connect, read_head, read_response, read_until_close,
                           request_head_fields, wait_for, wait_admin_port)

CERTS = ROOT / "tests" / "certs"


class WebSocketClient:
    """A minimal RFC 6455 client over a connected (plain or TLS) socket.

    ``handshake`` sends the opening request and reads the response head;
    ``send`` masks every frame (RFC 6455 5.3: a client MUST); ``recv``
    reads one frame (server frames MUST NOT be masked).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")

    def handshake(self, path: str = "/ws", *extra: str, key: str | None = None) -> Response:
        self.key = key or websocket.new_key()
        lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Connection: Upgrade", "Upgrade: websocket",
                 f"Sec-WebSocket-Key: {self.key}", f"Sec-WebSocket-Version: {websocket.VERSION}", *extra, "", ""]
        self.sock.sendall("\r\n".join(lines).encode("latin-1"))
        return read_head(self.reader)

    def send(self, opcode: Opcode, payload: bytes = b"") -> None:
        self.sock.sendall(websocket.encode_frame(opcode, payload, mask=True))

    def recv(self) -> websocket.Frame:
        return websocket.read_frame(self.reader.read, require_mask=False, max_payload=1 << 30)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def header(response: Response, name: str) -> str:
    value = response.header(name)
    assert value is not None, f"no {name} in {response.raw_head!r}"
    return value


class WebSocketEchoTests(unittest.TestCase):
    """``server.py``'s ``/ws`` behind cclb: the handshake, frames both ways, the close."""

    demo: DemoServer
    balancer: Balancer
    admin_port: int

    @classmethod
    def setUpClass(cls) -> None:
        cls.demo = DemoServer()
        cls.addClassCleanup(cls.demo.stop)
        cls.balancer = Balancer([cls.demo.port], "--health-interval", "0", "--admin-port", "0")
        cls.addClassCleanup(cls.balancer.stop)
        cls.admin_port = wait_admin_port(cls.balancer)

    def tearDown(self) -> None:
        log = self.balancer.log_text()
        self.assertNotIn("Traceback", log, log[-3000:])

    def open(self) -> WebSocketClient:
        client = WebSocketClient(connect(self.balancer.port))
        self.addCleanup(client.close)
        response = client.handshake()
        self.assertEqual(response.status, 101, response.raw_head)
        self.assertEqual(header(response, "Upgrade").lower(), "websocket")
        self.assertEqual(header(response, "Connection").lower(), "upgrade")
        self.assertEqual(header(response, "Sec-WebSocket-Accept"), websocket.accept_key(client.key))
        self.assertIsNotNone(response.header("X-Request-ID"))
        return client

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10) as answer:
            return answer.read().decode()

    def metric(self, sample: str) -> float:
        text = self.metrics_text()
        match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
        self.assertIsNotNone(match, f"{sample} missing from /metrics")
        return float(match[1])  # type: ignore[index]

    def test_text_binary_ping_and_close_are_relayed_both_ways(self) -> None:
        client = self.open()
        up_before = self.metric('cclb_tunnel_bytes_total{direction="client_to_backend"}')
        client.send(Opcode.TEXT, "héllo".encode())
        self.assertEqual(client.recv(), websocket.Frame(Opcode.TEXT, "héllo".encode()))
        client.send(Opcode.BINARY, bytes(range(256)))
        self.assertEqual(client.recv(), websocket.Frame(Opcode.BINARY, bytes(range(256))))
        client.send(Opcode.PING, b"are you there")
        self.assertEqual(client.recv(), websocket.Frame(Opcode.PONG, b"are you there"))
        # While open the tunnel shows in /metrics.
        self.assertGreaterEqual(self.metric("cclb_tunnels_open"), 1)
        self.assertGreater(self.metric('cclb_tunnel_bytes_total{direction="client_to_backend"}'), up_before)
        client.send(Opcode.CLOSE, websocket.encode_close(CloseCode.NORMAL))
        frame = client.recv()
        self.assertEqual(frame.opcode, Opcode.CLOSE)
        self.assertEqual(websocket.parse_close(frame.payload)[0], CloseCode.NORMAL)
        # RFC 6455 7.1.1: the server closes TCP first; cclb passes that EOF on.
        self.assertEqual(read_until_close(client.sock, 10), b"")
        # The tunnel passes half-closes on: it ends once our side has closed too.
        client.sock.shutdown(socket.SHUT_WR)
        wait_for(lambda: self.metric("cclb_tunnels_open") == 0, message="the tunnel to close")
        # One access-log line for the tunnel: status 101, when it ended.
        wait_for(lambda: re.search(r'"GET /ws" 101 \d+ http://127\.0\.0\.1:\d+ ', self.balancer.log_text()),
                 message="the tunnel's access-log line")

    def test_a_tunnel_is_a_101_in_the_counters_but_not_in_the_latency_histogram(self) -> None:
        """Its long life must not skew request latency; /status counts it and its bytes."""
        url = f"http://127.0.0.1:{self.demo.port}"
        durations = f'cclb_request_duration_seconds_count{{backend="{url}"}}'
        upgrades = f'cclb_requests_total{{backend="{url}",code="101"}}'

        def upgrades_counted() -> float:
            text = self.metrics_text()
            return float(m[1]) if (m := re.search(rf"^{re.escape(upgrades)} (\S+)$", text, re.M)) else 0.0
        # Earlier tests' requests to this shared balancer are accounted once none is in flight.
        wait_for(lambda: self.metric(f'cclb_in_flight{{backend="{url}"}}') == 0,
                 message="earlier requests to end")
        before = (self.metric(durations), upgrades_counted())
        client = self.open()
        client.send(Opcode.TEXT, b"x" * 1000)
        self.assertEqual(client.recv().payload, b"x" * 1000)
        client.send(Opcode.CLOSE, websocket.encode_close(CloseCode.NORMAL))
        self.assertEqual(client.recv().opcode, Opcode.CLOSE)
        self.assertEqual(read_until_close(client.sock, 10), b"")
        client.sock.shutdown(socket.SHUT_WR)
        # In flight drops in the same step that counts the 101 (other tests' tunnels end too).
        wait_for(lambda: self.metric(f'cclb_in_flight{{backend="{url}"}}') == 0, message="the tunnel to end")
        self.assertGreaterEqual(upgrades_counted(), before[1] + 1)
        self.assertEqual(self.metric(durations), before[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/status", timeout=10) as answer:
            tunnels = json.load(answer)["frontend"]["tunnels"]
        self.assertEqual(tunnels["open"], 0)
        self.assertGreater(tunnels["bytes_to_backend"], 1000)
        self.assertGreater(tunnels["bytes_to_client"], 1000)

    def test_a_large_binary_message(self) -> None:
        client = self.open()
        payload = os.urandom(1 << 20)
        client.send(Opcode.BINARY, payload)
        frame = client.recv()
        self.assertEqual((frame.opcode, len(frame.payload)), (Opcode.BINARY, len(payload)))
        self.assertEqual(frame.payload, payload)
        client.send(Opcode.CLOSE, websocket.encode_close(CloseCode.GOING_AWAY))
        self.assertEqual(client.recv().opcode, Opcode.CLOSE)

    def test_bytes_sent_right_after_the_handshake_are_delivered(self) -> None:
        """A frame sent in the same segment as the request head is already in cclb's buffer."""
        sock = connect(self.balancer.port)
        client = WebSocketClient(sock)
        self.addCleanup(client.close)
        key = websocket.new_key()
        sock.sendall(("GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
                     + websocket.encode_frame(Opcode.TEXT, b"early", mask=True))
        self.assertEqual(read_head(client.reader).status, 101)
        self.assertEqual(client.recv(), websocket.Frame(Opcode.TEXT, b"early"))

    def test_a_refused_handshake_is_relayed_and_the_connection_goes_on_as_http(self) -> None:
        with connect(self.balancer.port) as sock, sock.makefile("rb") as reader:
            # No Sec-WebSocket-Key/-Version: the demo backend refuses (426 or 400).
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\n\r\n")
            refused = read_response(reader)
            self.assertIn(refused.status, (400, 426), refused.raw_head)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            following = read_response(reader)
            self.assertEqual(following.status, 200, following.raw_head)
            self.assertEqual(json.loads(following.body), {"status": "ok"})


class UpgradeWithScriptedBackendTests(unittest.TestCase):
    """What reaches the backend, and a backend's odd answers, with a scripted backend."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.script = Script({"/switch": cls.switch_uninvited, "/halfclose": cls.echo_until_eof})
        cls.backend = RawBackend(cls.script)
        cls.addClassCleanup(cls.backend.stop)
        cls.balancer = Balancer([cls.backend.port], *BASE_ARGS)
        cls.addClassCleanup(cls.balancer.stop)

    def tearDown(self) -> None:
        log = self.balancer.log_text()
        self.assertNotIn("Traceback", log, log[-3000:])

    @staticmethod
    def switch_uninvited(conn: socket.socket, seen) -> bool:
        """A 101 whatever the request asked for (only an upgrade request may get one through)."""
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        if b"upgrade: websocket" not in seen.head.lower():
            return False
        # Upgraded: echo, then close.
        conn.settimeout(10)
        while data := conn.recv(65536):
            conn.sendall(data)
        return False

    @staticmethod
    def echo_until_eof(conn: socket.socket, seen) -> bool:
        """101 with a greeting in the same segment, echo until the client's EOF, a last message, close."""
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw-echo\r\nConnection: Upgrade\r\n\r\n"
                     b"welcome")
        conn.settimeout(10)
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.sendall(b"the last word")
        return False

    def test_h2c_is_not_forwarded(self) -> None:
        with connect(self.balancer.port) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"GET /h2c HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                         b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
            response = read_response(reader)
        self.assertEqual(response.status, 200, response.raw_head)
        seen = self.script.seen("/h2c")
        assert seen is not None
        names = [name for name, _ in request_head_fields(seen.head)[2]]
        for name in (b"upgrade", b"connection", b"http2-settings"):
            self.assertNotIn(name, names)

    def test_upgrade_and_connection_upgrade_are_forwarded(self) -> None:
        with connect(self.balancer.port) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"GET /plain HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, X-Hop\r\n"
                         b"X-Hop: 1\r\nUpgrade: websocket\r\n\r\n")
            response = read_response(reader)  # the echo route: no switch, a normal 200
            self.assertEqual(response.status, 200, response.raw_head)
            sock.sendall(b"GET /after HTTP/1.1\r\nHost: localhost\r\n\r\n")
            self.assertEqual(read_response(reader).status, 200)
        seen = self.script.seen("/plain")
        assert seen is not None
        fields = request_head_fields(seen.head)[2]
        self.assertIn((b"upgrade", b"websocket"), fields)
        self.assertIn((b"connection", b"upgrade"), fields)
        self.assertNotIn(b"x-hop", [name for name, _ in fields])

    def test_a_101_to_a_request_that_did_not_ask_is_a_502(self) -> None:
        with connect(self.balancer.port) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"GET /switch HTTP/1.1\r\nHost: localhost\r\n\r\n")
            self.assertEqual(read_response(reader).status, 502)

    def test_half_close_from_the_client_still_delivers_the_backends_last_bytes(self) -> None:
        with connect(self.balancer.port) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"GET /halfclose HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\n"
                         b"Upgrade: raw-echo\r\n\r\nfirst")
            response = read_head(reader)
            self.assertEqual(response.status, 101, response.raw_head)
            self.assertEqual(header(response, "Upgrade"), "raw-echo")
            # Sent with the 101 head: cclb had it buffered when the tunnel started.
            self.assertEqual(reader.read(7), b"welcome")
            self.assertEqual(reader.read(5), b"first")
            sock.sendall(b"second")
            self.assertEqual(reader.read(6), b"second")
            sock.shutdown(socket.SHUT_WR)  # our EOF; the backend answers it with a last message
            self.assertEqual(reader.read(), b"the last word")  # ... then EOF


class TunnelLimitsTests(unittest.TestCase):
    """--tunnel-idle-timeout, and SIGTERM with a tunnel open."""

    def setUp(self) -> None:
        self.demo = DemoServer()
        self.addCleanup(self.demo.stop)

    def open(self, balancer: Balancer) -> WebSocketClient:
        client = WebSocketClient(connect(balancer.port))
        self.addCleanup(client.close)
        self.assertEqual(client.handshake().status, 101)
        client.send(Opcode.TEXT, b"x")
        self.assertEqual(client.recv().payload, b"x")
        return client

    def test_idle_timeout_closes_a_silent_tunnel(self) -> None:
        balancer = Balancer([self.demo.port], "--health-interval", "0", "--tunnel-idle-timeout", "0.5")
        self.addCleanup(balancer.stop)
        client = self.open(balancer)
        self.assertEqual(read_until_close(client.sock, 10), b"")  # closed by cclb, well within 10s
        self.assertNotIn("Traceback", balancer.log_text())

    def test_a_tunnel_counts_toward_max_connections(self) -> None:
        balancer = Balancer([self.demo.port], "--health-interval", "0", "--max-connections", "1")
        self.addCleanup(balancer.stop)
        client = self.open(balancer)
        # The tunnel is busy, never reclaimed like an idle keep-alive connection: a second
        # client is turned away.
        with connect(balancer.port) as sock, sock.makefile("rb") as reader:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            self.assertEqual(read_response(reader).status, 503)
        client.send(Opcode.TEXT, b"still here")
        self.assertEqual(client.recv().payload, b"still here")

    def test_sigterm_closes_tunnels_after_the_drain_period(self) -> None:
        balancer = Balancer([self.demo.port], "--health-interval", "0", "--drain-timeout", "3")
        self.addCleanup(balancer.kill)
        client = self.open(balancer)
        balancer.signal(signal.SIGTERM)
        wait_for(lambda: "cclb stopping" in balancer.log_text(), message="the drain to begin")
        # During the drain period the tunnel still works...
        client.send(Opcode.TEXT, b"draining")
        self.assertEqual(client.recv().payload, b"draining")
        # ...then cclb closes it (and exits cleanly).
        self.assertEqual(read_until_close(client.sock, 15), b"")
        self.assertEqual(balancer.proc.wait(10), 0)
        self.assertNotIn("Traceback", balancer.log_text())


class SecureWebSocketTests(unittest.TestCase):
    """wss://: the client side of the tunnel is TLS (``--tls-cert``)."""

    def test_echo_over_tls(self) -> None:
        demo = DemoServer()
        self.addCleanup(demo.stop)
        balancer = Balancer([demo.port], "--health-interval", "0", "--tls-cert", str(CERTS / "localhost.pem"))
        self.addCleanup(balancer.stop)
        context = tls.client_context(str(CERTS / "ca.pem"))
        raw = socket.create_connection(("127.0.0.1", balancer.port), timeout=10)
        client = WebSocketClient(context.wrap_socket(raw, server_hostname="localhost"))
        self.addCleanup(client.close)
        response = client.handshake()
        self.assertEqual(response.status, 101, response.raw_head)
        for size in (5, 70_000, 1 << 20):
            payload = os.urandom(size)
            client.send(Opcode.BINARY, payload)
            self.assertEqual(client.recv().payload, payload)
        client.send(Opcode.PING, b"tls")
        self.assertEqual(client.recv(), websocket.Frame(Opcode.PONG, b"tls"))
        client.send(Opcode.CLOSE, websocket.encode_close(CloseCode.NORMAL))
        self.assertEqual(client.recv().opcode, Opcode.CLOSE)
        try:
            rest = client.reader.read()
        except (ssl.SSLError, ConnectionResetError):
            rest = b""  # an abrupt end after the close frame is fine for this test
        self.assertEqual(rest, b"")
        self.assertNotIn("Traceback", balancer.log_text())


if __name__ == "__main__":
    unittest.main()

"""The active health checker: probes, the overrun cut-off, and a loop that never dies.

In-process: real ``ServerCluster`` objects and real backends on ephemeral
ports (``RawBackend``); races are forced with injected objects and events.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import unittest

from backend_urls import parse_backend
from cluster import ServerCluster
from health_checkers import HealthChecker, HealthSettings, Probe, probe
from tests.support import RawBackend, wait_for
from tests.test_tls import A, CA, LOCALHOST, TLSBackend
from tests.test_upstream import TlsPeer
from upstream import BackendTLS


def cluster_for(*ports: int) -> ServerCluster:
    return ServerCluster([parse_backend(f"127.0.0.1:{port}") for port in ports])


def closed_port() -> int:
    """A port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProbeTests(unittest.TestCase):

    def backend(self, respond=None) -> RawBackend:
        backend = RawBackend(respond)
        self.addCleanup(backend.stop)
        return backend

    def test_passing_failing_and_refused_checks(self) -> None:
        """2xx/3xx pass (with latency), other statuses fail, a refused connect says so."""
        def teapot(head: bytes, conn: socket.socket, reader) -> bool:
            conn.sendall(b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 0\r\n\r\n")
            return False
        good, bad = self.backend(), self.backend(teapot)
        cluster = cluster_for(good.port, bad.port, closed_port())
        first, second, third = cluster.snapshot()
        settings = HealthSettings(path="/health", timeout=3)
        ok, detail, latency = probe(first, settings)
        self.assertEqual((ok, detail), (True, "HTTP 200"))
        self.assertIsNotNone(latency)
        self.assertEqual(probe(second, settings)[:2], (False, "HTTP 418"))
        self.assertEqual(probe(third, settings), (False, "connection refused", None))
        self.assertIn(b"GET /health HTTP/1.1\r\n", good.received())
        self.assertIn(b"User-Agent: cclb-health-check\r\n", good.received())

    def test_silent_backend_is_reported_as_a_timeout(self) -> None:
        def silent(head: bytes, conn: socket.socket, reader) -> bool:
            reader.readline()  # blocks until the probe gives up and closes
            return False
        backend = self.backend(silent)
        ok, detail, latency = probe(cluster_for(backend.port).snapshot()[0],
                                    HealthSettings(timeout=0.2))
        self.assertEqual((ok, detail, latency), (False, "no answer within 0.2s", None))


class FlippingConnection:
    """Stands in for ``http.client.HTTPConnection`` at the moment of the cut-off race.

    Its ``sock`` is a live socket the first time it is read and None after:
    exactly what a probe thread closing the connection between two reads of
    ``conn.sock`` looks like.  The old cut-off code read it twice
    (``if conn.sock is not None: conn.sock.shutdown(...)``) and raised
    AttributeError out of ``check_all``.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock
        self.reads = 0

    @property
    def sock(self) -> socket.socket | None:
        self.reads += 1
        current, self._sock = self._sock, None
        return current


class CutOffTests(unittest.TestCase):

    def test_cut_off_reads_the_socket_once_so_a_concurrent_close_cannot_break_it(self) -> None:
        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        check = Probe(cluster_for(closed_port()).snapshot()[0], HealthSettings())
        check.conn = FlippingConnection(left)  # type: ignore[assignment]
        check.cut_off()  # must not raise
        self.assertEqual(check.conn.reads, 1)
        self.assertEqual(right.recv(1), b"", "the live socket was shut down")
        self.assertTrue(check.cut)

    def test_cut_off_after_the_probe_closed_its_socket_is_harmless(self) -> None:
        check = Probe(cluster_for(closed_port()).snapshot()[0], HealthSettings())
        left, right = socket.socketpair()
        self.addCleanup(right.close)
        check.conn.sock = left
        left.close()  # the probe thread closed it; the cutter still holds the object
        check.cut_off()

    def test_a_check_cut_off_before_it_connects_gives_up_with_a_timeout(self) -> None:
        backend = RawBackend()
        self.addCleanup(backend.stop)
        check = Probe(cluster_for(backend.port).snapshot()[0], HealthSettings(timeout=5))
        check.cut_off()
        self.assertEqual(check.run(), (False, "no answer within 5s", None))
        self.assertEqual(backend.heads, [], "no request after the cut-off")

    def test_an_overrunning_check_is_cut_off_and_reported_as_a_timeout(self) -> None:
        """A backend that dribbles its head (each byte within the read timeout) is cut
        off at timeout + margin, and the check says "no answer", not "invalid answer"."""
        stop = threading.Event()
        self.addCleanup(stop.set)

        def dribble(head: bytes, conn: socket.socket, reader) -> bool:
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.is_set():
                try:
                    conn.sendall(b"X")  # never a complete field line
                except OSError:
                    return False
                stop.wait(0.05)  # the dribbling pace is the behaviour under test
            return False
        backend = RawBackend(dribble)
        self.addCleanup(backend.stop)
        cluster = cluster_for(backend.port)
        checker = HealthChecker(cluster, HealthSettings(timeout=0.3))
        checker.cut_off_margin = 0.1
        with self.assertLogs("cclb", logging.WARNING) as logs:
            checker.check_all()  # returns at the deadline, having cut the probe off
            wait_for(lambda: cluster.stats().backends[0].last_check, 5,
                     message="the cut-off check to report")
        (row,) = cluster.stats().backends
        self.assertEqual(row.state, "down")
        self.assertEqual(row.last_check, "no answer within 0.3s")
        self.assertIn("no answer within 0.3s", "\n".join(logs.output))
        wait_for(lambda: not any(t.name.startswith("health-") for t in threading.enumerate()),
                 5, message="the cut-off probe thread to end")


class DeadlineTests(unittest.TestCase):

    def test_health_timeout_bounds_the_whole_check(self) -> None:
        """A backend dribbling its head (each byte within the read timeout) is cut off at
        --health-timeout itself, not a second later (the old margin)."""
        stop = threading.Event()

        def dribble(head: bytes, conn: socket.socket, reader) -> bool:
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.is_set():
                try:
                    conn.sendall(b"X")  # never a complete field line
                except OSError:
                    return False
                stop.wait(0.05)  # the dribbling pace is the behaviour under test
            return False
        backend = RawBackend(dribble)
        self.addCleanup(backend.stop)
        self.addCleanup(stop.set)
        cluster = cluster_for(backend.port)
        checker = HealthChecker(cluster, HealthSettings(timeout=0.5))
        started = time.monotonic()
        with self.assertLogs("cclb", logging.WARNING):
            checker.check_all()
            elapsed = time.monotonic() - started
            wait_for(lambda: cluster.stats().backends[0].last_check, 5,
                     message="the cut-off check to report")
        self.assertGreaterEqual(elapsed, 0.45)
        self.assertLess(elapsed, 1.2, "cut off well after --health-timeout (old margin: 1 s)")
        self.assertEqual(cluster.stats().backends[0].last_check, "no answer within 0.5s")
        wait_for(lambda: not any(t.name.startswith("health-") for t in threading.enumerate()),
                 5, message="the cut-off probe thread to end")


class CheckerLoopTests(unittest.TestCase):

    def test_the_loop_survives_an_exception_in_a_round_and_logs_it_once(self) -> None:
        backend = RawBackend()
        self.addCleanup(backend.stop)
        cluster = cluster_for(backend.port)
        rounds: list[int] = []
        two_rounds = threading.Event()

        def on_round() -> None:
            rounds.append(1)
            if len(rounds) >= 3:
                two_rounds.set()
            if len(rounds) <= 2:
                raise RuntimeError("injected fault in the round's callback")
        checker = HealthChecker(cluster, HealthSettings(interval=0.01, timeout=2), on_round)
        original = checker.check_all
        calls: list[int] = []

        def failing_once() -> None:
            calls.append(1)
            if len(calls) == 1:
                raise AttributeError("injected: 'NoneType' object has no attribute 'shutdown'")
            original()
        checker.check_all = failing_once  # type: ignore[method-assign]
        with self.assertLogs("cclb", logging.ERROR) as logs:
            checker.start()
            self.addCleanup(checker.join, 5)
            self.addCleanup(checker.stop)
            self.assertTrue(two_rounds.wait(10), "the checker stopped after the fault")
        checker.stop()
        self.assertGreaterEqual(cluster.stats().backends[0].health_checks.get("pass", 0), 1)
        text = "\n".join(logs.output)
        self.assertEqual(text.count("AttributeError: injected"), 1, text)
        self.assertIn("Traceback", text)
        # The same callback fault twice in a row is logged once, with its traceback.
        self.assertEqual(text.count("RuntimeError: injected fault in the round's callback"), 1, text)


class HTTPSProbeTests(unittest.TestCase):
    """https:// backends are checked over TLS with the pool's context (issue 9)."""

    def tls_backend(self, cert=LOCALHOST) -> TLSBackend:
        backend = TLSBackend(cert)
        self.addCleanup(backend.stop)
        return backend

    def only_backend(self, url: str, backend_tls: BackendTLS):
        cluster = ServerCluster([parse_backend(url)], backend_tls=backend_tls)
        self.addCleanup(lambda: [b.pool.retire() for b in cluster.snapshot()])
        return cluster.snapshot()[0]

    def test_a_verified_check_passes_over_tls(self) -> None:
        server = self.tls_backend()
        backend = self.only_backend(f"https://localhost:{server.port}", BackendTLS(CA))
        ok, detail, latency = probe(backend, HealthSettings(path="/health", timeout=5))
        self.assertEqual((ok, detail), (True, "HTTP 200"), detail)
        self.assertIsNotNone(latency)
        self.assertEqual(len(server.connections_for("/health")), 1)

    def test_a_certificate_that_fails_verification_fails_the_check_and_says_so(self) -> None:
        server = self.tls_backend()
        backend = self.only_backend(f"https://localhost:{server.port}", BackendTLS())  # system store
        ok, detail, latency = probe(backend, HealthSettings(timeout=5))
        self.assertFalse(ok)
        self.assertTrue(detail.startswith("certificate verify failed: "), detail)
        mismatched = self.tls_backend(A)
        backend = self.only_backend(f"https://127.0.0.1:{mismatched.port}", BackendTLS(CA))
        ok, detail, _ = probe(backend, HealthSettings(timeout=5))
        self.assertFalse(ok)
        self.assertIn("certificate verify failed: IP address mismatch", detail)
        backend = self.only_backend(f"https://localhost:{server.port}", BackendTLS("/nonexistent/ca.pem"))
        ok, detail, _ = probe(backend, HealthSettings(timeout=5))
        self.assertEqual((ok, "/nonexistent/ca.pem" in detail), (False, True), detail)
        self.assertEqual(server.connections_for("/"), set())

    def test_a_tls_check_stuck_after_the_handshake_is_cut_off(self) -> None:
        peer = TlsPeer()  # completes handshakes, then never answers
        self.addCleanup(peer.stop)
        backend = self.only_backend(f"https://localhost:{peer.port}", BackendTLS(CA))
        check = Probe(backend, HealthSettings(timeout=30))
        results: list[tuple[bool, str, float | None]] = []
        thread = threading.Thread(target=lambda: results.append(check.run()))
        thread.start()
        self.addCleanup(thread.join, 5)
        peer.next_accepted()  # the handshake is done: the probe waits for its answer
        check.cut_off()
        thread.join(5)
        self.assertEqual(results, [(False, "no answer within 30s", None)])


if __name__ == "__main__":
    unittest.main()

"""Unit tests for ``admin``: an in-process AdminServer on 127.0.0.1, port 0.

A real ``ServerCluster`` (built from the settings) sits behind it; requests
go over real sockets through ``http.client`` and the tests check what the
client receives, then the cluster's state.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import re
import select
import socket
import struct
import sys
import threading
import time
import unittest
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import admin  # noqa: E402
import metrics  # noqa: E402
import settings  # noqa: E402
from backend_urls import parse_backend  # noqa: E402
from cluster import ServerCluster  # noqa: E402
from tests.support import wait_for  # noqa: E402

_null_handler = logging.NullHandler()


def setUpModule() -> None:
    logging.getLogger("cclb").addHandler(_null_handler)  # admin changes log at WARNING


def tearDownModule() -> None:
    logging.getLogger("cclb").removeHandler(_null_handler)


URL1, URL2, URL3 = "http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"
BASE_ARGS = ["--admin-port", "0", "-b", "127.0.0.1:9001", "-b", "127.0.0.1:9002"]


class Reply:
    """What the client received."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()

    def json(self) -> Any:
        self.content_type_is("application/json")
        return json.loads(self.body)

    def content_type_is(self, expected: str) -> None:
        assert self.headers["Content-Type"] == expected, self.headers["Content-Type"]


class AdminTestCase(unittest.TestCase):
    extra_args: list[str] = []
    server_limits: dict[str, float] = {}  # AdminServer class attributes to shrink, per instance

    def setUp(self) -> None:
        self.config = settings.load(BASE_ARGS + self.extra_args)
        self.cluster = ServerCluster.from_settings(self.config.pools["default"])
        self.addCleanup(self.cluster.close)
        self.changes = 0
        self.server = admin.AdminServer(("127.0.0.1", 0), self.cluster, lambda: self.config,
                                        on_change=self._changed)
        for name, value in self.server_limits.items():
            setattr(self.server, name, value)
        # Count connections whose handling is over (socketserver calls
        # shutdown_request last, after any error was handled and logged).
        self.ended_lock = threading.Lock()
        self.ended = 0
        shutdown_request = self.server.shutdown_request

        def counting_shutdown_request(request: Any) -> None:
            shutdown_request(request)
            with self.ended_lock:
                self.ended += 1

        self.server.shutdown_request = counting_shutdown_request  # type: ignore[method-assign]
        # The sampler takes its baseline, then waits: tests drive ``sample`` themselves.
        self.server.history.interval = 3600.0
        self.port = self.server.server_address[1]
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="admin-test", daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)

    def _changed(self) -> None:
        self.changes += 1

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        """One request on a fresh connection."""
        headers = dict(headers or {})
        if isinstance(body, dict):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            return Reply(connection.getresponse())
        finally:
            connection.close()

    def backend(self, url: str):
        return next(b for b in self.cluster.snapshot() if b.url == url)

    def ended_count(self) -> int:
        with self.ended_lock:
            return self.ended

    def raw_connection(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        self.addCleanup(sock.close)
        return sock

    def assert_unchanged(self) -> None:
        """No write acted: the two backends, both up, and no change published."""
        self.assertEqual([(b.url, b.state) for b in self.cluster.snapshot()],
                         [(URL1, "up"), (URL2, "up")])
        self.assertEqual(self.changes, 0)


def read_until_close(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the server sends until it closes: (bytes, closed?); False on a timeout."""
    chunks = []
    try:
        while data := sock.recv(65536):
            chunks.append(data)
    except ConnectionResetError:
        pass
    except (socket.timeout, TimeoutError):
        return b"".join(chunks), False
    return b"".join(chunks), True


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a client that crashes does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class ReadTests(AdminTestCase):
    def test_status_json_shape(self) -> None:
        """/status: policy, backends with their fields, unrouted, settings (no secrets), time."""
        attempt = self.cluster.acquire("c")
        attempt.done(204, 0.01)
        self.cluster.count_unrouted(503)
        reply = self.request("GET", "/status")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers["Cache-Control"], "no-store")
        self.assertEqual(int(reply.headers["Content-Length"]), len(reply.body))
        document = reply.json()
        self.assertEqual(set(document), {"policy", "backends", "unrouted", "settings", "time",
                                         "history"})
        self.assertEqual(document["policy"], "round-robin")
        self.assertEqual(document["unrouted"], {"503": 1})
        self.assertIsInstance(document["time"], float)
        backends = document["backends"]
        self.assertEqual([b["url"] for b in backends], [URL1, URL2])
        self.assertEqual([b["id"] for b in backends], [1, 2])
        self.assertEqual(set(backends[0]), {
            "id", "url", "weight", "effective_weight", "state", "since", "seconds_in_state",
            "last_check", "last_check_latency_ms", "in_flight", "responses", "requests",
            "failures", "retries"})
        served = next(b for b in backends if b["url"] == attempt.backend.url)
        self.assertEqual(served["responses"], {"2xx": 1})
        self.assertEqual(served["requests"], 1)
        self.assertEqual(served["state"], "up")
        self.assertEqual(served["in_flight"], 0)
        self.assertIsNone(served["last_check_latency_ms"])
        self.assertRegex(served["since"], r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
        self.assertNotIn("admin_token", document["settings"])
        self.assertNotIn("backends", document["settings"])
        self.assertNotIn("demo", document["settings"])
        self.assertEqual(document["settings"]["health_status"], "200-399")
        self.assertEqual(document["settings"]["algorithm"], "round-robin")

    def test_metrics_text(self) -> None:
        """/metrics: Prometheus text content type and the cluster's samples."""
        self.cluster.acquire("c").done(200, 0.01)
        reply = self.request("GET", "/metrics")
        self.assertEqual(reply.status, 200)
        reply.content_type_is("text/plain; version=0.0.4; charset=utf-8")
        text = reply.body.decode()
        self.assertIn("# TYPE cclb_requests_total counter\n", text)
        self.assertIn(f'cclb_backend_up{{backend="{URL1}"}} 1\n', text)
        self.assertIn(f'cclb_backend_up{{backend="{URL2}"}} 1\n', text)
        self.assertRegex(text, r'cclb_requests_total\{backend="http://127\.0\.0\.1:900[12]",'
                               r'code="200"\} 1\n')

    def test_reads_keep_the_connection_alive(self) -> None:
        """Several GETs, a 404 among them, are answered on one HTTP/1.1 connection."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        self.addCleanup(connection.close)
        statuses = []
        sockets = set()
        for path in ("/status", "/nope", "/metrics", "/status"):
            connection.request("GET", path)
            sockets.add(connection.sock)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
            self.assertIsNone(response.getheader("Connection"))
            self.assertIsNotNone(connection.sock, "the server did not close the connection")
        self.assertEqual(statuses, [200, 404, 200, 200])
        self.assertEqual(len(sockets), 1, "the same connection was used throughout")

    def test_dashboard(self) -> None:
        """/ answers the HTML dashboard: SVG charts of the history, frontend row, admin buttons.

        The page draws inline SVG from /status "history" (every series it
        reads exists), shows the optional "frontend" numbers only when present,
        and its buttons POST same-origin JSON, asking for the token on a 401.
        """
        reply = self.request("GET", "/")
        self.assertEqual(reply.status, 200)
        reply.content_type_is("text/html; charset=utf-8")
        page = reply.body.decode()
        self.assertIn("<html", page.lower())
        self.assertNotRegex(page, r"<script[^>]+src|<link|@import|url\(")  # self-contained
        self.assertNotIn("http://", page)
        self.assertNotIn("https://", page)
        # Charts: inline SVG paths drawn from the history the server keeps.
        self.assertIn('createElementNS(SVG_NS, name)', page)
        self.assertIn('svg("path"', page)
        self.assertIn("viewBox:", page)
        series = set(re.findall(r'\["(\w+)", "[^"]+", \d+\]', page))
        self.assertEqual(series, {"rps", "p50_ms", "p99_ms", "error_rate"})
        self.assertLessEqual(series, SERIES_KEYS)
        self.assertIn("status.history", page)
        self.assertIn("history.backends[b.url]", page)  # per-backend rate from the first paint
        # Frontend row: unrouted today, the proxy's optional numbers behind "hidden".
        self.assertIn("status.unrouted", page)
        self.assertIn("status.frontend", page)
        self.assertRegex(page, r'id="frontend-open" hidden')
        self.assertRegex(page, r'id="frontend-rejected" hidden')
        self.assertIn("frontend.open_connections", page)
        self.assertIn("frontend.rejected", page)
        # Buttons: drain / maint / ready POSTing JSON same-origin; token on 401.
        self.assertIn('const ACTIONS = ["drain", "maint", "ready"];', page)
        self.assertIn('"backends/" + id + "/" + action', page)
        self.assertIn('method: "POST"', page)
        self.assertIn('"Content-Type": "application/json"', page)
        self.assertIn('mode: "same-origin"', page)
        self.assertIn('"Bearer " + token', page)
        self.assertIn("response.status === 401", page)
        self.assertIn("window.prompt(", page)
        self.assertNotIn("localStorage", page)  # the token stays in memory
        self.assertNotIn("sessionStorage", page)
        # Responsive: a viewport and a narrow-screen layout.
        self.assertIn('name="viewport"', page)
        self.assertRegex(page, r"@media \(max-width:\d+px\)")

    def test_dashboard_buttons_requests_are_accepted(self) -> None:
        """What a button sends (same origin, JSON, "{}") is accepted; without the token: 401."""
        headers = {"Origin": f"http://127.0.0.1:{self.port}", "Sec-Fetch-Site": "same-origin",
                   "Content-Type": "application/json"}
        reply = self.request("POST", "/backends/1/drain", "{}", headers)
        self.assertEqual((reply.status, reply.json()["state"]), (200, "drain"))
        self.config = settings.load(BASE_ARGS + ["--admin-token", "s3cret"])
        self.assertEqual(self.request("POST", "/backends/1/ready", "{}", headers).status, 401)
        reply = self.request("POST", "/backends/1/ready", "{}",
                             dict(headers, Authorization="Bearer s3cret"))
        self.assertEqual((reply.status, reply.json()["state"]), (200, "up"))

    def test_head_on_every_get_route(self) -> None:
        """HEAD /, /status, /metrics (and a 404): the GET's status and headers, no body.

        Content-Length is the GET body's length; the connection stays usable
        (a body sent after a HEAD head would be read as the next response).
        """
        self.cluster.acquire("c").done(200, 0.01)
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        self.addCleanup(connection.close)
        for path, status in (("/", 200), ("/status", 200), ("/metrics", 200), ("/nope", 404)):
            with self.subTest(path=path):
                connection.request("GET", path)
                got = connection.getresponse()
                get_body = got.read()
                connection.request("HEAD", path)
                head = connection.getresponse()
                self.assertEqual(head.read(), b"")
                self.assertEqual((got.status, head.status), (status, status))
                self.assertEqual(head.getheader("Content-Type"), got.getheader("Content-Type"))
                self.assertEqual(head.getheader("Cache-Control"), "no-store")
                length = int(head.getheader("Content-Length"))
                self.assertGreater(length, 0)
                if path != "/status":  # /status carries the time: its length may move by a byte
                    self.assertEqual(length, len(get_body))
                else:
                    self.assertLess(abs(length - len(get_body)), 8)
        # Raw bytes: nothing follows the HEAD answer's empty line.
        sock = self.raw_connection()
        sock.sendall(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data, closed = read_until_close(sock)
        self.assertTrue(closed)
        head, _, rest = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(rest, b"")

    def test_not_found(self) -> None:
        """Unknown paths, unknown ids and wrong action shapes answer 404 with a JSON error."""
        cases = [("GET", "/nope"), ("GET", "/status/extra"), ("POST", "/nope"),
                 ("POST", "/backends/99/drain"), ("POST", "/backends/1/explode"),
                 ("POST", "/backends/1"), ("DELETE", "/backends/99"),
                 ("DELETE", "/backends/1/drain"), ("DELETE", "/backends")]
        for method, path in cases:
            with self.subTest(method=method, path=path):
                reply = self.request(method, path)
                self.assertEqual(reply.status, 404)
                self.assertIn("error", reply.json())
        self.assertEqual(len(self.cluster.snapshot()), 2)
        self.assertEqual(self.changes, 0)


SERIES_KEYS = {"requests", "errors", "rps", "error_rate", "p50_ms", "p99_ms"}


def record(cluster: ServerCluster, url: str, status: int, duration: float, times: int = 1) -> None:
    """``times`` responses of ``url`` with ``status`` after ``duration`` seconds, as the proxy records them."""
    for _ in range(times):
        others = tuple(b for b in cluster.snapshot() if b.url != url)
        attempt = cluster.acquire("client", exclude=others)
        assert attempt is not None and attempt.backend.url == url
        attempt.done(status, duration)


class HistoryTests(unittest.TestCase):
    """``metrics.TrafficHistory`` driven directly: recorded traffic, chosen times, no sleeps."""

    def setUp(self) -> None:
        self.config = settings.load(BASE_ARGS)
        self.cluster = ServerCluster.from_settings(self.config.pools["default"])
        self.addCleanup(self.cluster.close)
        self.history = metrics.TrafficHistory(self.cluster.stats)

    def test_first_sample_is_the_baseline(self) -> None:
        """Traffic before the first sample is not shown as a burst in the first interval."""
        record(self.cluster, URL1, 200, 0.01, times=50)
        self.assertIsNone(self.history.sample(1000.0))
        document = self.history.to_json()
        self.assertEqual((document["time"], document["total"]["requests"]), ([], []))
        record(self.cluster, URL1, 200, 0.01, times=2)
        self.history.sample(1005.0)
        self.assertEqual(self.history.to_json()["total"]["requests"], [2])

    def test_intervals_hold_deltas_rates_error_rates_and_percentiles(self) -> None:
        """Per interval: requests, 5xx (unrouted 503s in the total), rps, p50/p99 from buckets."""
        self.history.sample(1000.0)
        record(self.cluster, URL1, 200, 0.002, times=3)  # bucket (1 ms, 2.5 ms]
        record(self.cluster, URL1, 502, 0.3)  # bucket (250 ms, 500 ms]
        record(self.cluster, URL2, 404, 0.02)  # bucket (10 ms, 25 ms]
        self.cluster.count_unrouted(503)
        self.cluster.count_unrouted(503)
        sample = self.history.sample(1005.0)
        self.assertIsNotNone(sample)
        self.history.sample(1010.0)  # an interval without traffic
        document = self.history.to_json()
        self.assertEqual(document["interval"], metrics.HISTORY_INTERVAL)
        self.assertEqual(document["size"], metrics.HISTORY_SIZE)
        self.assertEqual(document["time"], [1005.0, 1010.0])
        self.assertEqual(document["seconds"], [5.0, 5.0])
        total = document["total"]
        self.assertEqual(set(total), SERIES_KEYS)
        self.assertEqual(total["requests"], [7, 0])
        self.assertEqual(total["errors"], [3, 0])
        self.assertEqual(total["rps"], [1.4, 0.0])
        self.assertEqual(total["error_rate"], [round(3 / 7, 4), None])
        self.assertEqual(total["p50_ms"][1], None)
        self.assertEqual(list(document["backends"]), [URL1, URL2])
        one = document["backends"][URL1]
        self.assertEqual((one["requests"], one["errors"], one["error_rate"]),
                         ([4, 0], [1, 0], [0.25, None]))
        # rank 2 of 4 in (1 ms, 2.5 ms] holding 3: 1 + 1.5 * 2/3 = 2 ms;
        # rank 3.96 in (250 ms, 500 ms] holding 1: 250 + 250 * 0.96 = 490 ms.
        self.assertEqual(one["p50_ms"], [2.0, None])
        self.assertEqual(one["p99_ms"], [490.0, None])
        two = document["backends"][URL2]
        self.assertEqual((two["requests"], two["errors"], two["p50_ms"]), ([1, 0], [0, 0], [17.5, None]))
        json.dumps(document, allow_nan=False)  # plain JSON

    def test_ring_buffer_keeps_the_last_size_samples(self) -> None:
        """Only the last ``size`` intervals are kept, oldest first."""
        history = metrics.TrafficHistory(self.cluster.stats, size=3)
        for step in range(6):
            record(self.cluster, URL2, 200, 0.001, times=step)
            history.sample(1000.0 + 5 * step)
        document = history.to_json()
        self.assertEqual(document["time"], [1015.0, 1020.0, 1025.0])
        self.assertEqual(document["total"]["requests"], [3, 4, 5])

    def test_backends_that_come_go_or_restart_their_counters(self) -> None:
        """A backend added later is null before it existed; one removed and added again
        (new counters) counts from zero, never a negative delta; clock going back: no sample."""
        self.history.sample(1000.0)
        record(self.cluster, URL1, 200, 0.01, times=5)
        self.history.sample(1005.0)
        backend = next(b for b in self.cluster.snapshot() if b.url == URL1)
        self.cluster.remove(backend)
        self.history.sample(1010.0)
        self.cluster.add(parse_backend(URL3))
        self.cluster.add(parse_backend(URL1))
        record(self.cluster, URL1, 200, 0.01, times=2)
        record(self.cluster, URL3, 500, 0.01)
        self.history.sample(1015.0)
        self.assertIsNone(self.history.sample(1012.0))  # the clock went back: a new baseline
        document = self.history.to_json()
        self.assertEqual(document["time"], [1005.0, 1010.0, 1015.0])
        self.assertEqual(document["backends"][URL1]["requests"], [5, None, 2])
        self.assertEqual(document["backends"][URL3]["requests"], [None, None, 1])
        self.assertEqual(document["backends"][URL2]["requests"], [0, 0, 0])
        self.assertEqual(document["total"]["requests"], [5, 0, 3])
        self.assertEqual(document["total"]["errors"], [0, 0, 1])
        for series in document["backends"].values():
            self.assertTrue(all(n is None or n >= 0 for n in series["requests"]))

    def test_quantile_estimates(self) -> None:
        """Interpolated inside the bucket; +Inf answers the last finite bound; empty is None."""
        empty = [0] * (len(metrics.BUCKETS) + 1)
        self.assertIsNone(metrics.quantile(empty, 0.5))
        first = list(empty)
        first[0] = 4
        self.assertAlmostEqual(metrics.quantile(first, 0.5), 0.0005)
        slow = list(empty)
        slow[-1] = 1
        self.assertEqual(metrics.quantile(slow, 0.99), metrics.BUCKETS[-1])

    def test_sampler_thread_survives_a_failing_round_and_stops(self) -> None:
        """A round that raises is logged (LoopGuard) and the next rounds still sample; stop joins."""
        calls = [0]

        def flaky_stats():
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("injected sampler failure")
            return self.cluster.stats()

        history = metrics.TrafficHistory(flaky_stats, interval=0.01)
        self.addCleanup(history.stop)
        with self.assertLogs("cclb", logging.ERROR) as captured:
            history.start()
            wait_for(lambda: len(history.to_json()["time"]) >= 2, 10, message="two samples")
        history.stop()
        self.assertFalse(history.thread.is_alive())
        self.assertEqual(history.guard.failures, 1)
        self.assertIn("injected sampler failure", "\n".join(captured.output))


class StatusHistoryTests(AdminTestCase):
    def test_status_history_shape(self) -> None:
        """/status "history": interval, size, time and seconds columns, total and per-URL series."""
        # The server's sampler takes its baseline (now) once: after it, times
        # before now only start a new baseline.
        wait_for(lambda: self.server.history.previous is not None, 5, message="the baseline")
        self.server.history.sample(2000.0)
        record(self.cluster, URL1, 200, 0.004, times=4)
        record(self.cluster, URL2, 503, 0.2)
        self.server.history.sample(2005.0)
        history = self.request("GET", "/status").json()["history"]
        self.assertEqual(set(history), {"interval", "size", "time", "seconds", "total", "backends"})
        self.assertEqual(history["time"][-1], 2005.0)
        self.assertEqual(set(history["backends"]), {URL1, URL2})
        for series in [history["total"], *history["backends"].values()]:
            self.assertEqual(set(series), SERIES_KEYS)
            for column in series.values():
                self.assertEqual(len(column), len(history["time"]))
        self.assertEqual(history["total"]["rps"][-1], 1.0)
        self.assertEqual(history["total"]["error_rate"][-1], 0.2)
        self.assertEqual(history["backends"][URL2]["p50_ms"][-1], 175.0)

    def test_the_server_runs_the_sampler_while_it_serves(self) -> None:
        """serve_forever starts the sampler (its baseline), shutdown stops its thread."""
        wait_for(lambda: self.server.history.previous is not None, 5, message="the baseline")
        thread = self.server.history.thread
        self.assertTrue(thread is not None and thread.is_alive())
        self.server.shutdown()
        thread.join(5)
        self.assertFalse(thread.is_alive())

    def test_frontend_only_when_the_proxy_reports_it(self) -> None:
        """No "frontend" key by default; the proxy's numbers when AdminServer.frontend is set."""
        self.assertNotIn("frontend", self.request("GET", "/status").json())
        self.server.frontend = lambda: {"open_connections": 3, "rejected": {"busy": 2}}
        self.assertEqual(self.request("GET", "/status").json()["frontend"],
                         {"open_connections": 3, "rejected": {"busy": 2}})

        def failing() -> dict[str, Any]:
            raise RuntimeError("injected frontend failure")

        self.server.frontend = failing
        with self.assertLogs("cclb", logging.ERROR):
            reply = self.request("GET", "/status")
        self.assertEqual(reply.status, 200)
        self.assertNotIn("frontend", reply.json())
        self.assertEqual(self.server.guard.failures, 1)


class WriteTests(AdminTestCase):
    def test_add_backend(self) -> None:
        """POST /backends adds a backend: 201 with its description; it takes traffic."""
        reply = self.request("POST", "/backends", {"url": URL3, "weight": 2})
        self.assertEqual(reply.status, 201)
        self.assertEqual(reply.headers["Connection"], "close")
        document = reply.json()
        self.assertEqual((document["id"], document["url"], document["weight"]), (3, URL3, 2))
        self.assertEqual(document["state"], "up")
        self.assertEqual([b.url for b in self.cluster.snapshot()], [URL1, URL2, URL3])
        self.assertEqual(self.backend(URL3).weight, 2)
        self.assertEqual(self.changes, 1)
        status = self.request("GET", "/status").json()
        self.assertEqual([b["url"] for b in status["backends"]], [URL1, URL2, URL3])

    def test_add_backend_bad_requests(self) -> None:
        """Bad JSON, no body, wrong shapes or a bad URL: 400 with an error, nothing added."""
        cases: dict[str, bytes | None] = {
            "bad JSON": b"{not json",
            "no body": None,
            "not an object": b"[1, 2]",
            "no url": b'{"weight": 1}',
            "url not a string": b'{"url": 9001}',
            "weight a string": b'{"url": "http://127.0.0.1:9003", "weight": "2"}',
            "weight a bool": b'{"url": "http://127.0.0.1:9003", "weight": true}',
            "weight out of range": b'{"url": "http://127.0.0.1:9003", "weight": 0}',
            "not http(s)": b'{"url": "ftp://127.0.0.1:9003"}',
            "a path": b'{"url": "http://127.0.0.1:9003/x"}',
            "no port": b'{"url": "http://127.0.0.1"}',
            "deep nesting": b"[" * 30000 + b"]" * 30000,  # RecursionError in json
        }
        for name, body in cases.items():
            with self.subTest(name):
                headers = {"Content-Type": "application/json"}
                reply = self.request("POST", "/backends", body, headers)
                self.assertEqual(reply.status, 400, reply.body)
                self.assertTrue(reply.json()["error"])
        self.assertEqual(len(self.cluster.snapshot()), 2)
        self.assertEqual(self.changes, 0)

    def test_add_duplicate_is_409(self) -> None:
        """Adding a URL that is already a backend: 409, nothing changes."""
        reply = self.request("POST", "/backends", {"url": "127.0.0.1:9001"})
        self.assertEqual(reply.status, 409)
        self.assertIn(URL1, reply.json()["error"])
        self.assertEqual(len(self.cluster.snapshot()), 2)
        self.assertEqual(self.changes, 0)

    def test_drain_maint_ready(self) -> None:
        """POST /backends/<id>/drain|maint|ready sets the admin state and answers it."""
        one = self.backend(URL1)
        for action, state, available in (("drain", "drain", False), ("maint", "maint", False),
                                         ("ready", "up", True)):
            with self.subTest(action):
                reply = self.request("POST", f"/backends/{one.id}/{action}")
                self.assertEqual(reply.status, 200)
                self.assertEqual(reply.json()["state"], state)
                self.assertEqual(one.state, state)
                self.assertEqual(one.available, available)
        self.assertEqual(self.changes, 3)

    def test_drained_backend_gets_no_new_requests(self) -> None:
        """After drain, acquire never picks that backend."""
        self.request("POST", f"/backends/{self.backend(URL1).id}/drain")
        for _ in range(4):
            attempt = self.cluster.acquire("c")
            self.assertEqual(attempt.backend.url, URL2)
            attempt.done(200, 0.01)

    def test_delete(self) -> None:
        """DELETE /backends/<id> removes it (its pool retired); a second DELETE is 404."""
        two = self.backend(URL2)
        reply = self.request("DELETE", f"/backends/{two.id}")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json(), {"removed": URL2})
        self.assertEqual([b.url for b in self.cluster.snapshot()], [URL1])
        self.assertTrue(two.pool.retired)
        self.assertEqual(self.request("DELETE", f"/backends/{two.id}").status, 404)
        self.assertEqual(self.changes, 1)


class TokenTests(AdminTestCase):
    extra_args = ["--admin-token", "s3cret"]

    def test_writes_need_the_bearer_token(self) -> None:
        """Without the right token: 401 with WWW-Authenticate, and nothing changes."""
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic czNjcmV0"}, {"Authorization": "Bearer s3cret2"}):
            with self.subTest(headers=headers):
                reply = self.request("POST", "/backends", {"url": URL3}, headers)
                self.assertEqual(reply.status, 401)
                self.assertEqual(reply.headers["WWW-Authenticate"], 'Bearer realm="cclb admin"')
                self.assertIn("error", reply.json())
                reply = self.request("DELETE", "/backends/1", None, headers)
                self.assertEqual(reply.status, 401)
                reply = self.request("POST", "/backends/1/maint", None, headers)
                self.assertEqual(reply.status, 401)
        self.assertEqual([b.url for b in self.cluster.snapshot()], [URL1, URL2])
        self.assertEqual(self.backend(URL1).state, "up")
        self.assertEqual(self.changes, 0)

    def test_right_token_is_accepted(self) -> None:
        """With Authorization: Bearer <token> the write goes through."""
        reply = self.request("POST", "/backends", {"url": URL3},
                             {"Authorization": "Bearer s3cret"})
        self.assertEqual(reply.status, 201)
        self.assertEqual(len(self.cluster.snapshot()), 3)

    def test_reads_need_no_token(self) -> None:
        """GET /status and /metrics stay open; the token is never shown."""
        reply = self.request("GET", "/status")
        self.assertEqual(reply.status, 200)
        self.assertNotIn(b"s3cret", reply.body)
        self.assertEqual(self.request("GET", "/metrics").status, 200)


class RegressionTests(AdminTestCase):
    def test_status_is_built_without_the_cluster_lock(self) -> None:
        """While /status renders its document, another thread can acquire a backend at once."""
        original = admin.status_document
        probe_done = threading.Event()
        results: list[bool] = []
        probes: list[threading.Thread] = []

        def probe() -> None:
            attempt = self.cluster.acquire("probe")
            if attempt is not None:
                attempt.done(200, 0.001)
            probe_done.set()

        def checking_status_document(stats: Any, config: Any) -> dict[str, Any]:
            thread = threading.Thread(target=probe, daemon=True)
            probes.append(thread)
            thread.start()
            results.append(probe_done.wait(timeout=2))
            return original(stats, config)

        with mock.patch.object(admin, "status_document", side_effect=checking_status_document):
            reply = self.request("GET", "/status")
        for thread in probes:
            thread.join(timeout=5)
        self.assertEqual(reply.status, 200)
        self.assertEqual(results, [True], "acquire was blocked while /status was rendered")
        self.assertEqual(sum(b.responses.get(200, 0) for b in self.cluster.snapshot()), 1)

    def test_route_error_answers_500_and_the_server_carries_on(self) -> None:
        """A route raising RuntimeError: 500 JSON, one ERROR with traceback, next /status works."""
        original = admin.status_document
        calls = [0]

        def failing_once(stats: Any, config: Any) -> dict[str, Any]:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("injected route failure")
            return original(stats, config)

        with mock.patch.object(admin, "status_document", side_effect=failing_once):
            with self.assertLogs("cclb", logging.ERROR) as captured:
                reply = self.request("GET", "/status")
            self.assertEqual(reply.status, 500)
            self.assertEqual(reply.headers["Connection"], "close")
            self.assertEqual(reply.json(), {"error": "internal error (see the cclb log)"})
            again = self.request("GET", "/status")
        errors = [r for r in captured.records if r.levelno >= logging.ERROR]
        self.assertEqual(len(errors), 1, captured.output)
        self.assertIsNotNone(errors[0].exc_info)
        self.assertIs(errors[0].exc_info[0], RuntimeError)
        self.assertIn("Traceback", captured.output[0])
        self.assertIn("injected route failure", captured.output[0])
        self.assertEqual(again.status, 200)
        self.assertEqual(len(again.json()["backends"]), 2)
        self.assertEqual(self.server.guard.failures, 1)



class ListenerHardeningTests(AdminTestCase):
    """The admin listener's limits (shrunk here): request deadline, idle timeout, connection cap."""

    server_limits = {"header_timeout": 0.5, "idle_timeout": 3.0, "max_connections": 3}

    def test_slowloris_head_is_closed_at_the_deadline(self) -> None:
        """A head trickled byte by byte gets 408 and a close at the deadline, before the idle timeout."""
        sock = self.raw_connection()
        sock.sendall(b"POST /backends/1/maint HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        answer, closed = b"", False
        while time.monotonic() - started < 2.5:  # well under the idle timeout (3 s)
            # The trickle's pace: one byte every 50 ms, each well within the idle timeout.
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                answer, closed = read_until_close(sock)
                break
            try:
                sock.send(b"a")
            except OSError:
                closed = True
                break
        elapsed = time.monotonic() - started
        self.assertTrue(closed, f"still open after {elapsed:.1f}s of trickling")
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        self.assertIn(b"Connection: close", answer)
        self.assertGreaterEqual(elapsed, 0.4)
        self.assert_unchanged()
        self.assertEqual(self.request("GET", "/status").status, 200)

    def test_slow_body_is_cut_at_the_deadline_and_never_acts(self) -> None:
        """The deadline covers the body too: a body trickled past it is 408 and nothing is added."""
        body = json.dumps({"url": URL3}).encode()
        sock = self.raw_connection()
        sock.sendall(b"POST /backends HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        answer = b""
        for byte in body:
            readable, _, _ = select.select([sock], [], [], 0.1)  # the trickle's pace
            if readable:
                answer, _ = read_until_close(sock)
                break
            sock.send(bytes([byte]))
        else:
            answer, _ = read_until_close(sock)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        self.assert_unchanged()

    def test_idle_keep_alive_connection_is_closed(self) -> None:
        """A keep-alive connection left idle is closed after idle_timeout."""
        self.server.idle_timeout = 0.3
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        self.addCleanup(connection.close)
        connection.request("GET", "/status")
        response = connection.getresponse()
        response.read()
        self.assertEqual(response.status, 200)
        self.assertIsNone(response.getheader("Connection"))
        started = time.monotonic()
        try:
            self.assertEqual(connection.sock.recv(1), b"", "unexpected bytes")
        except (socket.timeout, TimeoutError):
            self.fail("the idle keep-alive connection was not closed")
        except ConnectionResetError:
            pass
        self.assertLess(time.monotonic() - started, 3)

    def test_connection_cap_gives_503_and_the_server_keeps_serving(self) -> None:
        """Past max_connections a new connection gets a 503 and a close; once one closes, room again."""
        held = []
        for _ in range(3):
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            self.addCleanup(connection.close)
            connection.request("GET", "/status")
            response = connection.getresponse()
            response.read()
            self.assertEqual(response.status, 200)
            held.append(connection)
        extra = self.raw_connection()
        answer, closed = read_until_close(extra)
        self.assertTrue(closed)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        self.assertIn(b"\r\nRetry-After: 1\r\n", answer)
        self.assertIn(b"\r\nConnection: close\r\n", answer)
        self.assertIn(b"too many admin connections", answer)
        held[0].close()

        def served() -> bool:
            try:
                return self.request("GET", "/status").status == 200
            except OSError:  # rejected while sending: the 503 came with a reset
                return False

        wait_for(served, 5, message="a free admin connection slot")
        # The held connections were never disturbed.
        held[1].request("GET", "/metrics")
        response = held[1].getresponse()
        response.read()
        self.assertEqual(response.status, 200)

    def test_server_close_closes_idle_connections(self) -> None:
        """Stopping the admin server closes idle keep-alive connections: no handler outlives it."""
        self.server.idle_timeout = 60.0
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        self.addCleanup(connection.close)
        connection.request("GET", "/status")
        connection.getresponse().read()
        ended = self.ended_count()
        self.server.shutdown()
        self.server.server_close()
        try:
            self.assertEqual(connection.sock.recv(1), b"")
        except (socket.timeout, TimeoutError):
            self.fail("the idle connection outlived server_close")
        except ConnectionResetError:
            pass
        wait_for(lambda: self.ended_count() > ended, 5, message="the handler to end")


class CompleteRequestTests(AdminTestCase):
    """Only complete requests act; clients that go away are not errors."""

    def test_unterminated_head_never_acts(self) -> None:
        """A head (or body) the client ends early changes nothing, whatever it asked for."""
        body = json.dumps({"url": URL3}).encode()
        cases = {
            "head without its empty line": b"POST /backends/1/maint HTTP/1.1\r\nHost: x\r\n",
            "request line only": b"POST /backends/1/maint HTTP/1.1\r\n",
            "request line without CRLF": b"POST /backends/1/maint HTTP/1.1",
            "delete without its empty line": b"DELETE /backends/2 HTTP/1.1\r\nHost: x\r\n",
            "body cut short": b"POST /backends HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                              b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body) + 10, body),
        }
        for name, data in cases.items():
            with self.subTest(name):
                ended = self.ended_count()
                sock = self.raw_connection()
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                answer, closed = read_until_close(sock)
                self.assertTrue(closed)
                wait_for(lambda: self.ended_count() > ended, 5, message="the connection to end")
                self.assertNotRegex(answer, rb"^HTTP/1\.[01] 2", answer)
                self.assert_unchanged()

    def test_oversized_or_unsupported_requests_are_refused_before_acting(self) -> None:
        """Too large a head or body, Transfer-Encoding, a bad Content-Length: refused, closed."""
        fields = b"".join(b"X-%d: v\r\n" % i for i in range(100))
        cases = {
            "100 fields": (b"POST /backends/1/maint HTTP/1.1\r\n" + fields + b"\r\n", 431),
            "head over 64 KiB": (b"POST /backends/1/maint HTTP/1.1\r\nX: " + b"v" * 70000
                                 + b"\r\n\r\n", 431),
            "body over 64 KiB": (b"POST /backends HTTP/1.1\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 70000\r\n\r\n", 413),
            "chunked body": (b"POST /backends/1/maint HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                             b"\r\n0\r\n\r\n", 501),
            "two Content-Lengths": (b"POST /backends/1/maint HTTP/1.1\r\nContent-Length: 1\r\n"
                                    b"Content-Length: 2\r\n\r\nab", 400),
            "signed Content-Length": (b"POST /backends/1/maint HTTP/1.1\r\nContent-Length: +1\r\n"
                                      b"\r\na", 400),
        }
        for name, (data, status) in cases.items():
            with self.subTest(name):
                sock = self.raw_connection()
                sock.sendall(data)
                answer, closed = read_until_close(sock)
                self.assertTrue(answer.startswith(b"HTTP/1.1 %d " % status), answer[:200])
                self.assertIn(b"\r\nConnection: close\r\n", answer)
                self.assertTrue(closed)
        with self.subTest("99 fields are fine"):
            data = (b"POST /backends/1/drain HTTP/1.1\r\n"
                    + b"".join(b"X-%d: v\r\n" % i for i in range(99)) + b"\r\n")
            sock = self.raw_connection()
            sock.sendall(data)
            answer, _ = read_until_close(sock)
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
            self.assertEqual(self.backend(URL1).state, "drain")

    def test_client_going_away_is_not_an_error(self) -> None:
        """Resets and closes mid-request: no ERROR, no traceback, nothing on stderr."""
        body = json.dumps({"url": URL3}).encode()
        partial_post = (b"POST /backends HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                        b"\r\nContent-Length: 100\r\n\r\n" + body[:10])
        cases = [
            ("reset mid-body", partial_post, reset),
            ("close mid-body", partial_post, socket.socket.close),
            ("reset mid-head", b"POST /backends HTTP/1.1\r\nHost: x\r\n", reset),
            ("reset before reading the answer", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", reset),
            ("reset after a keep-alive request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", reset),
        ]
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), self.assertNoLogs("cclb", logging.ERROR):
            for name, data, end in cases:
                with self.subTest(name):
                    ended = self.ended_count()
                    sock = self.raw_connection()
                    sock.sendall(data)
                    end(sock)
                    wait_for(lambda: self.ended_count() > ended, 5,
                             message=f"the connection to end ({name})")
        self.assertEqual(stderr.getvalue(), "")
        self.assertEqual(self.server.guard.failures, 0)
        self.assert_unchanged()
        self.assertEqual(self.request("GET", "/status").status, 200)


class CrossSiteTests(AdminTestCase):
    """Cross-site request forgery: writes from another origin, or not JSON, change nothing."""

    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"  # http.client sends Host: 127.0.0.1:<port>

    def test_text_plain_or_form_bodies_are_415(self) -> None:
        """A page can POST text/plain or a form without asking: 415, nothing changes."""
        body = json.dumps({"url": URL3})
        for content_type in ("text/plain", "text/plain;charset=UTF-8",
                             "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                             "application/jsonx"):
            with self.subTest(content_type):
                reply = self.request("POST", "/backends", body, {"Content-Type": content_type})
                self.assertEqual(reply.status, 415, reply.body)
                reply = self.request("POST", "/backends/1/maint", "",
                                     {"Content-Type": content_type})
                self.assertEqual(reply.status, 415, reply.body)
        with self.subTest("a JSON body without Content-Type"):
            self.assertEqual(self.request("POST", "/backends", body).status, 415)
        self.assert_unchanged()

    def test_foreign_origin_is_403(self) -> None:
        """Origin other than http://<Host>: 403 for every write, even as JSON; nothing changes."""
        for origin in ("http://evil.example", "null", "http://127.0.0.1:1",
                       f"https://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.port}.evil.example"):
            for method, path, body in (("POST", "/backends", {"url": URL3}),
                                       ("POST", "/backends/1/maint", None),
                                       ("DELETE", "/backends/2", None)):
                with self.subTest(origin=origin, method=method, path=path):
                    reply = self.request(method, path, body, {"Origin": origin})
                    self.assertEqual(reply.status, 403, reply.body)
                    self.assertIn("cross-origin", reply.json()["error"])
        self.assert_unchanged()

    def test_refusals_are_logged_once_a_minute(self) -> None:
        """A page hammering the API: one WARNING, the rest at DEBUG (the log is no amplifier)."""
        with self.assertLogs("cclb", logging.DEBUG) as captured:
            for _ in range(5):
                reply = self.request("POST", "/backends/1/maint", None,
                                     {"Origin": "http://evil.example"})
                self.assertEqual(reply.status, 403)
        refusals = [r for r in captured.records if "cross-origin write refused" in r.getMessage()]
        self.assertEqual([r.levelno for r in refusals], [logging.WARNING] + [logging.DEBUG] * 4)
        self.assertIn("http://evil.example", refusals[0].getMessage())

    def test_sec_fetch_site_other_than_same_origin_is_403(self) -> None:
        """Sec-Fetch-Site: cross-site (or same-site, another port of this host): 403."""
        for site in ("cross-site", "same-site", "Cross-Site"):
            with self.subTest(site):
                reply = self.request("POST", "/backends", {"url": URL3}, {"Sec-Fetch-Site": site})
                self.assertEqual(reply.status, 403, reply.body)
                reply = self.request("POST", "/backends/1/drain", None,
                                     {"Sec-Fetch-Site": site, "Origin": self.origin()})
                self.assertEqual(reply.status, 403, reply.body)
        self.assert_unchanged()

    def test_same_origin_json_is_accepted(self) -> None:
        """The dashboard's own origin with JSON (what a same-origin fetch sends): the write goes through."""
        headers = {"Origin": self.origin(), "Sec-Fetch-Site": "same-origin"}
        reply = self.request("POST", "/backends", {"url": URL3}, headers)
        self.assertEqual(reply.status, 201, reply.body)
        reply = self.request("POST", "/backends/1/maint", None, headers)
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(self.backend(URL1).state, "maint")
        self.assertEqual(self.request("POST", "/backends/1/ready", None,
                                      {"Sec-Fetch-Site": "none"}).status, 200)
        self.assertEqual(self.changes, 3)

    def test_reads_are_open_to_any_origin(self) -> None:
        """GETs are not writes: a foreign Origin still gets /status (a page cannot read it, no CORS)."""
        reply = self.request("GET", "/status", None, {"Origin": "http://evil.example",
                                                      "Sec-Fetch-Site": "cross-site"})
        self.assertEqual(reply.status, 200)
        self.assertIsNone(reply.headers["Access-Control-Allow-Origin"])


class IPv6Tests(unittest.TestCase):
    def test_admin_on_ipv6_loopback(self) -> None:
        """--admin-host ::1 (loopback, allowed without a token) binds and serves."""
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError as error:
            self.skipTest(f"no IPv6 loopback here: {error}")
        config = settings.load(BASE_ARGS)
        cluster = ServerCluster.from_settings(config.pools["default"])
        self.addCleanup(cluster.close)
        server = admin.AdminServer(("::1", 0), cluster, lambda: config)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        connection = http.client.HTTPConnection("::1", server.server_address[1], timeout=5)
        self.addCleanup(connection.close)
        connection.request("GET", "/status")
        self.assertEqual(connection.getresponse().status, 200)


class OriginRulesTest(unittest.TestCase):
    """``cross_origin_problem``, ``own_origin`` and ``is_json_type`` as pure functions."""

    def test_cross_origin_problem(self) -> None:
        cases = [
            # origin, Sec-Fetch-Site, Host, refused?
            (None, None, "127.0.0.1:9000", False),  # curl
            (None, None, None, False),
            ("http://127.0.0.1:9000", None, "127.0.0.1:9000", False),
            ("HTTP://LOCALHOST:9000", "same-origin", "localhost:9000", False),
            ("http://admin.example", None, "admin.example:80", False),
            ("http://[::1]:9000", None, "[::1]:9000", False),
            (None, "none", "127.0.0.1:9000", False),
            ("http://evil.example", None, "127.0.0.1:9000", True),
            ("null", None, "127.0.0.1:9000", True),
            ("http://127.0.0.1:9000", None, None, True),
            ("https://127.0.0.1:9000", None, "127.0.0.1:9000", True),
            ("http://127.0.0.1:9001", None, "127.0.0.1:9000", True),
            (None, "cross-site", "127.0.0.1:9000", True),
            (None, "same-site", "127.0.0.1:9000", True),
            ("http://127.0.0.1:9000", "cross-site", "127.0.0.1:9000", True),
        ]
        for origin, site, host, refused in cases:
            with self.subTest(origin=origin, site=site, host=host):
                problem = admin.cross_origin_problem(origin, site, host)
                self.assertEqual(problem is not None, refused, problem)

    def test_is_json_type(self) -> None:
        for value, expected in (("application/json", True), ("Application/JSON; charset=utf-8", True),
                                (" application/json ", True), (None, False), ("", False),
                                ("text/plain", False), ("application/json-patch+json", False)):
            with self.subTest(value):
                self.assertEqual(admin.is_json_type(value), expected)


if __name__ == "__main__":
    unittest.main()

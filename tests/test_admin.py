"""Unit tests for ``admin``: an in-process AdminServer on 127.0.0.1, port 0.

A real ``ServerCluster`` (built from the settings) sits behind it; requests
go over real sockets through ``http.client`` and the tests check what the
client receives, then the cluster's state.
"""

from __future__ import annotations

import http.client
import json
import logging
import sys
import threading
import unittest
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import admin  # noqa: E402
import settings  # noqa: E402
from cluster import ServerCluster  # noqa: E402

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

    def setUp(self) -> None:
        self.config = settings.load(BASE_ARGS + self.extra_args)
        self.cluster = ServerCluster.from_settings(self.config.pools["default"])
        self.addCleanup(self.cluster.close)
        self.changes = 0
        self.server = admin.AdminServer(("127.0.0.1", 0), self.cluster, lambda: self.config,
                                        on_change=self._changed)
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
        self.assertEqual(set(document), {"policy", "backends", "unrouted", "settings", "time"})
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
        """/ answers the HTML dashboard."""
        reply = self.request("GET", "/")
        self.assertEqual(reply.status, 200)
        reply.content_type_is("text/html; charset=utf-8")
        self.assertIn(b"<html", reply.body.lower())

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
            "https": b'{"url": "https://127.0.0.1:9003"}',
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


if __name__ == "__main__":
    unittest.main()

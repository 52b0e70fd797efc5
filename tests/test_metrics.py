"""Unit tests for ``metrics``: Histogram, TrafficCounters and the Prometheus text.

``render`` is checked the way a Prometheus scraper reads it: line by line,
every family announced by ``# HELP`` and ``# TYPE`` before its samples,
every sample ``name{labels} value`` with escaped label values.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import unittest
from unittest import mock
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import metrics  # noqa: E402
from backend_urls import parse_backend  # noqa: E402
from cluster import Attempt, ServerCluster  # noqa: E402
from metrics import BUCKETS, Histogram, TrafficCounters  # noqa: E402

_null_handler = logging.NullHandler()


def setUpModule() -> None:
    logging.getLogger("cclb").addHandler(_null_handler)  # state changes log at WARNING


def tearDownModule() -> None:
    logging.getLogger("cclb").removeHandler(_null_handler)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_labels(text: str) -> dict[str, str]:
    """Label pairs of the text exposition format, unescaped; AssertionError if malformed."""
    labels: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _LABEL.match(text, position)
        assert match is not None, f"malformed labels at {text[position:]!r}"
        raw = match.group(2)
        labels[match.group(1)] = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)),
                                        raw)
        position = match.end()
    return labels


def family_of(name: str, types: dict[str, str]) -> str:
    """The family a sample belongs to (a histogram's _bucket/_sum/_count samples)."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and types.get(base) == "histogram":
            return base
    return name


def parse_exposition(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(types by family, samples) from Prometheus text, checking the grammar on the way."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    helps: set[str] = set()
    types: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    finished: set[str] = set()  # families whose samples are over (no interleaving)
    current: str | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in helps, f"second HELP for {name}"
            assert help_text, f"empty HELP for {name}"
            helps.add(name)
            if current is not None:
                finished.add(current)
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name in helps and name == current, f"TYPE {name} without its HELP first"
            assert name not in types, f"second TYPE for {name}"
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), kind
            types[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match is not None, f"not a sample line: {line!r}"
            name, label_text, value = match.groups()
            family = family_of(name, types)
            assert family in types, f"sample {name} before its # TYPE"
            assert family == current and family not in finished, f"{name} outside its family"
            samples.append((name, parse_labels(label_text or ""), float(value)))
    return types, samples


class ParserSelfTests(unittest.TestCase):
    def test_the_checker_rejects_what_prometheus_rejects(self) -> None:
        """The exposition checker used below is strict: each malformed text is refused."""
        head = "# HELP m_total Help.\n# TYPE m_total counter\n"
        parse_exposition(head + 'm_total{a="x\\"y"} 1\n')  # escaped quote: fine
        bad = {
            "sample before TYPE": 'm_total{a="x"} 1\n' + head,
            "unescaped quote": head + 'm_total{a="x"y"} 1\n',
            "raw newline in a label": head + 'm_total{a="x\ny"} 1\n',
            "no value": head + 'm_total{a="x"}\n',
            "no final newline": head + "m_total 1",
            "TYPE without HELP": "# TYPE m_total counter\nm_total 1\n",
            "interleaved families": head + "m_total 1\n# HELP n Help.\n# TYPE n gauge\nn 1\nm_total 2\n",
        }
        for name, text in bad.items():
            with self.subTest(name), self.assertRaises((AssertionError, ValueError)):
                parse_exposition(text)


class HistogramTests(unittest.TestCase):
    def test_bucket_placement_at_and_around_bounds(self) -> None:
        """A value goes to the first bucket whose bound is >= the value (Prometheus "le")."""
        cases = [(0.0, 0), (0.0005, 0), (0.001, 0), (0.0010001, 1), (0.0025, 1), (0.003, 2),
                 (0.1, 6), (0.10001, 7), (1.0, 9), (10.0, 12), (10.000001, 13), (1e9, 13)]
        for value, index in cases:
            with self.subTest(value=value):
                histogram = Histogram()
                histogram.observe(value)
                expected = [0] * (len(BUCKETS) + 1)
                expected[index] = 1
                self.assertEqual(histogram.counts, expected)
                self.assertEqual(histogram.count, 1)
                self.assertEqual(histogram.total, value)

    def test_every_bound_lands_in_its_own_bucket(self) -> None:
        """Observing each bound exactly once fills each finite bucket once, +Inf none."""
        histogram = Histogram()
        for bound in BUCKETS:
            histogram.observe(bound)
        self.assertEqual(histogram.counts, [1] * len(BUCKETS) + [0])
        self.assertAlmostEqual(histogram.total, sum(BUCKETS))
        self.assertEqual(histogram.count, len(BUCKETS))

    def test_copy_is_independent(self) -> None:
        """copy() shares no list with the original."""
        histogram = Histogram()
        histogram.observe(0.2)
        clone = histogram.copy()
        clone.observe(0.2)
        self.assertEqual(histogram.count, 1)
        self.assertEqual(sum(histogram.counts), 1)
        self.assertEqual(clone.count, 2)


def sample_counters(status: int = 200, n: int = 1, in_flight: int = 0) -> TrafficCounters:
    counters = TrafficCounters()
    for _ in range(n):
        counters.responses[status] = counters.responses.get(status, 0) + 1
        counters.latency.observe(0.02)
    counters.in_flight = in_flight
    return counters


class TrafficCountersTests(unittest.TestCase):
    def test_add_with_in_flight(self) -> None:
        """add() sums responses by code, failures, retries, in-flight and the histogram."""
        total = sample_counters(200, 2, in_flight=1)
        total.failures, total.retries = 1, 0
        other = sample_counters(503, 1, in_flight=3)
        other.responses[200] = 4
        other.failures, other.retries = 2, 1
        total.add(other)
        self.assertEqual(total.responses, {200: 6, 503: 1})
        self.assertEqual(total.in_flight, 4)
        self.assertEqual((total.failures, total.retries), (3, 1))
        self.assertEqual(total.latency.count, 3)
        self.assertEqual(sum(total.latency.counts), 3)
        self.assertAlmostEqual(total.latency.total, 0.06)
        self.assertEqual(other.responses, {503: 1, 200: 4}, "the added counters are unchanged")

    def test_add_without_in_flight(self) -> None:
        """add(in_flight=False) (a dead worker's counters) keeps in-flight as it was."""
        total = sample_counters(200, 1, in_flight=2)
        total.add(sample_counters(200, 1, in_flight=5), in_flight=False)
        self.assertEqual(total.in_flight, 2)
        self.assertEqual(total.responses, {200: 2})
        self.assertEqual(total.latency.count, 2)

    def test_add_does_not_share_the_histogram(self) -> None:
        """After add(), observing on the sum does not change the added counters."""
        total, other = TrafficCounters(), sample_counters(200, 1)
        total.add(other)
        total.latency.observe(1.0)
        self.assertEqual(other.latency.count, 1)

    def test_json_round_trip(self) -> None:
        """from_json(to_json(c)) equals c, with int status codes back."""
        counters = sample_counters(200, 3, in_flight=2)
        counters.responses[404] = 1
        counters.failures, counters.retries = 5, 4
        document = counters.to_json()
        self.assertEqual(set(document["responses"]), {"200", "404"})
        again = TrafficCounters.from_json(document)
        self.assertEqual(again, counters)
        self.assertEqual(set(again.responses), {200, 404})

    def test_from_json_rejects_malformed_documents(self) -> None:
        """Missing keys, a wrong bucket count or wrong types: ValueError, nothing else."""
        good = sample_counters(200, 1).to_json()

        def variant(**changes: object) -> dict:
            document = dict(good)
            for key, value in changes.items():
                if value is KeyError:
                    del document[key]
                else:
                    document[key] = value
            return document

        bad: dict[str, object] = {
            "None": None,
            "a list": [],
            "a string": "counters",
            "no responses": variant(responses=KeyError),
            "no latency": variant(latency=KeyError),
            "no in_flight": variant(in_flight=KeyError),
            "no latency_count": variant(latency_count=KeyError),
            "too few buckets": variant(latency=[0] * len(BUCKETS)),
            "too many buckets": variant(latency=[0] * (len(BUCKETS) + 2)),
            "latency not a list": variant(latency=7),
            "bucket not a number": variant(latency=["x"] * (len(BUCKETS) + 1)),
            "responses a list": variant(responses=[200]),
            "status not a number": variant(responses={"ok": 1}),
            "count not a number": variant(responses={"200": None}),
            "in_flight a dict": variant(in_flight={}),
            "failures a string": variant(failures="many"),
            "latency_sum a list": variant(latency_sum=[]),
        }
        for name, document in bad.items():
            with self.subTest(name):
                with self.assertRaises(ValueError):
                    TrafficCounters.from_json(document)


class LabelEscapingTests(unittest.TestCase):
    def test_labels_escape_backslash_quote_and_newline(self) -> None:
        """\\ -> \\\\, " -> \\", newline -> \\n; the parser gets the original back."""
        value = 'a\\b"c\nd'
        text = metrics._labels(backend=value, code="200")
        self.assertEqual(text, '{backend="a\\\\b\\"c\\nd",code="200"}')
        self.assertNotIn("\n", text)
        self.assertEqual(parse_labels(text[1:-1]), {"backend": value, "code": "200"})

    def test_backend_url_needs_no_escaping(self) -> None:
        """A backend URL is label-safe as is."""
        url = parse_backend("[::1]:8080").url
        self.assertEqual(metrics._labels(backend=url), '{backend="http://[::1]:8080"}')


class RenderTests(unittest.TestCase):
    def setUp(self) -> None:
        specs = [parse_backend("127.0.0.1:9001"), parse_backend("http://127.0.0.1:9002,weight=3")]
        self.cluster = ServerCluster(specs, max_fails=1)
        self.addCleanup(self.cluster.close)
        self.one, self.two = self.cluster.snapshot()

    def attempt_on(self, backend_url: str) -> Attempt:
        """Acquire attempts until the policy picks ``backend_url`` (releasing the others)."""
        for _ in range(10):
            attempt = self.cluster.acquire("client")
            assert attempt is not None
            if attempt.backend.url == backend_url:
                return attempt
            with attempt:  # released without counting a response
                pass
        raise AssertionError(f"never picked {backend_url}")

    def record_traffic(self) -> None:
        for duration in (0.0005, 0.003, 0.003, 0.2, 20.0):
            self.attempt_on(self.one.url).done(200, duration)
        self.attempt_on(self.one.url).done(502, 0.04)
        self.attempt_on(self.two.url).done(404, 0.001)
        self.attempt_on(self.two.url).failed("connection refused", retried=True)
        self.held = self.attempt_on(self.one.url)  # still in flight while rendering
        self.addCleanup(self.held.__exit__, None, None, None)
        self.cluster.report_check(self.one, True, "200 OK", 0.002)
        self.cluster.report_check(self.one, True, "200 OK", 0.002)
        self.cluster.count_unrouted(503)
        self.cluster.count_unrouted(503)
        self.cluster.count_unrouted(400)

    def test_render_is_valid_prometheus_text(self) -> None:
        """Every line parses; every family has HELP and TYPE first; the values are the traffic's."""
        self.record_traffic()
        types, samples = parse_exposition(metrics.render(self.cluster.stats()))
        self.assertEqual(without_process(types), {
            "cclb_requests_total": "counter", "cclb_backend_up": "gauge",
            "cclb_in_flight": "gauge", "cclb_backend_failures_total": "counter",
            "cclb_retries_total": "counter", "cclb_health_checks_total": "counter",
            "cclb_request_duration_seconds": "histogram", **FRONTEND_FAMILIES})

        def value(name: str, **labels: str) -> float:
            found = [v for n, lab, v in samples if n == name and lab == labels]
            self.assertEqual(len(found), 1, f"{name}{labels}: {found}")
            return found[0]

        one, two = self.one.url, self.two.url
        self.assertEqual(value("cclb_requests_total", backend=one, code="200"), 5)
        self.assertEqual(value("cclb_requests_total", backend=one, code="502"), 1)
        self.assertEqual(value("cclb_requests_total", backend=two, code="404"), 1)
        self.assertEqual(value("cclb_requests_total", backend="none", code="503"), 2)
        self.assertEqual(value("cclb_requests_total", backend="none", code="400"), 1)
        self.assertEqual(value("cclb_in_flight", backend=one), 1)
        self.assertEqual(value("cclb_in_flight", backend=two), 0)
        self.assertEqual(value("cclb_backend_failures_total", backend=two), 1)
        self.assertEqual(value("cclb_backend_failures_total", backend=one), 0)
        self.assertEqual(value("cclb_retries_total", backend=two), 1)
        self.assertEqual(value("cclb_health_checks_total", backend=one, result="pass"), 2)
        self.assertEqual(value("cclb_backend_up", backend=one), 1)
        # max_fails=1 and another backend available: the failure took two out.
        self.assertEqual(value("cclb_backend_up", backend=two), 0)
        self.assertEqual(value("cclb_request_duration_seconds_count", backend=one), 6)
        self.assertAlmostEqual(value("cclb_request_duration_seconds_sum", backend=one),
                               0.0005 + 0.003 * 2 + 0.2 + 20.0 + 0.04, places=5)
        self.assertEqual(value("cclb_request_duration_seconds_bucket", backend=one, le="0.001"), 1)
        self.assertEqual(value("cclb_request_duration_seconds_bucket", backend=one, le="0.005"), 3)
        self.assertEqual(value("cclb_request_duration_seconds_bucket", backend=one, le="10.0"), 5)

    def test_histogram_buckets_are_cumulative_and_end_in_inf(self) -> None:
        """Per backend: le ascending, counts non-decreasing, +Inf last and equal to _count."""
        self.record_traffic()
        _, samples = parse_exposition(metrics.render(self.cluster.stats()))
        for backend in (self.one.url, self.two.url):
            with self.subTest(backend=backend):
                buckets = [(labels["le"], v) for n, labels, v in samples
                           if n == "cclb_request_duration_seconds_bucket"
                           and labels["backend"] == backend]
                self.assertEqual(len(buckets), len(BUCKETS) + 1)
                self.assertEqual(buckets[-1][0], "+Inf")
                bounds = [float(le) for le, _ in buckets]
                self.assertEqual(bounds, sorted(bounds))
                self.assertTrue(math.isinf(bounds[-1]))
                counts = [v for _, v in buckets]
                self.assertEqual(counts, sorted(counts), "buckets are cumulative")
                count = [v for n, labels, v in samples
                         if n == "cclb_request_duration_seconds_count"
                         and labels["backend"] == backend]
                self.assertEqual(count, [buckets[-1][1]])

    def test_empty_cluster_renders_families_without_samples(self) -> None:
        """No backends, no traffic: still valid text, every family announced."""
        empty = ServerCluster([])
        types, samples = parse_exposition(metrics.render(empty.stats()))
        self.assertEqual(len(without_process(types)), 7 + len(FRONTEND_FAMILIES))
        # The client side's gauges and byte counters are always there (zero).
        self.assertEqual([s for s in samples if process_family(s[0]) not in PROCESS_FAMILIES
                          and s[2] != 0.0], [])

    def test_unrouted_only(self) -> None:
        """Answers given without any backend appear with backend="none"."""
        empty = ServerCluster([])
        empty.count_unrouted(503)
        _, samples = parse_exposition(metrics.render(empty.stats()))
        self.assertEqual([s for s in samples if process_family(s[0]) not in PROCESS_FAMILIES
                          and not s[0].startswith(FRONTEND_PREFIXES)],
                         [("cclb_requests_total", {"backend": "none", "code": "503"}, 1.0)])

    def test_frontend_families(self) -> None:
        """Responses by source, rejections by reason, client bytes, connections and threads."""
        empty = ServerCluster([])
        empty.frontend.count("cclb", 503, 80, 150)
        empty.frontend.count("cclb", 400, 20, 120, metrics.reject_reason(400))
        empty.frontend.count("cclb", 503, 0, 130, metrics.MAX_CONNECTIONS)
        empty.frontend.count("backend", 200, 90, 300)
        empty.frontend.gauges = lambda: (5, 2, 3)
        _, samples = parse_exposition(metrics.render(empty.stats()))
        found = {(name, tuple(sorted(labels.items()))): value for name, labels, value in samples
                 if name.startswith(FRONTEND_PREFIXES)}
        self.assertEqual(found, {
            ("cclb_responses_total", (("code", "503"), ("source", "cclb"))): 2,
            ("cclb_responses_total", (("code", "400"), ("source", "cclb"))): 1,
            ("cclb_responses_total", (("code", "200"), ("source", "backend"))): 1,
            ("cclb_rejected_total", (("reason", "bad_request"),)): 1,
            ("cclb_rejected_total", (("reason", "max_connections"),)): 1,
            ("cclb_open_connections", ()): 5,
            ("cclb_threads", (("state", "busy"),)): 2,
            ("cclb_threads", (("state", "idle"),)): 3,
            ("cclb_client_bytes_total", (("direction", "received"),)): 190,
            ("cclb_client_bytes_total", (("direction", "sent"),)): 700})
        self.assertEqual(empty.stats().frontend.dashboard()["rejected"],
                         {"bad_request": 1, "max_connections": 1})

    def test_process_metrics(self) -> None:
        """The process's own families: build info, start time, CPU, memory, fds, reloads."""
        process = metrics.ProcessMetrics("9.9.9")
        with mock.patch.object(metrics, "PROCESS", process):
            process.record_reload(True)
            process.record_reload(False)
            process.record_reload(True)
            process.count_access_log_loss(3)
            types, samples = parse_exposition(metrics.render(ServerCluster([]).stats()))
        self.assertEqual({name: kind for name, kind in types.items() if name in PROCESS_FAMILIES},
                         PROCESS_FAMILIES)
        values = {(name, tuple(sorted(labels.items()))): value for name, labels, value in samples}
        build = [labels for name, labels, _ in samples if name == "cclb_build_info"]
        self.assertEqual(build[0]["version"], "9.9.9")
        self.assertEqual(values[("cclb_config_reloads_total", (("result", "success"),))], 2)
        self.assertEqual(values[("cclb_config_reloads_total", (("result", "failure"),))], 1)
        self.assertEqual(values[("cclb_access_log_lines_lost_total", ())], 3)
        self.assertGreater(values[("process_open_fds", ())], 2)
        self.assertGreater(values[("process_resident_memory_bytes", ())], 1 << 20)
        self.assertGreaterEqual(values[("process_max_fds", ())], values[("process_open_fds", ())])
        self.assertAlmostEqual(values[("process_start_time_seconds", ())], process.started, places=2)


PROCESS_FAMILIES = {
    "cclb_build_info": "gauge", "process_start_time_seconds": "gauge",
    "process_cpu_seconds_total": "counter", "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge", "process_max_fds": "gauge",
    "cclb_config_reloads_total": "counter", "cclb_config_last_reload_timestamp_seconds": "gauge",
    "cclb_access_log_lines_lost_total": "counter", "cclb_tls_handshake_failures_total": "counter",
    # Per process too (metrics.TUNNELS), rendered after ProcessMetrics' families.
    "cclb_tunnels_open": "gauge", "cclb_tunnel_bytes_total": "counter",
    # The connection engine's (metrics.ENGINE), per process, rendered last.
    "cclb_handler_threads": "gauge", "cclb_handler_thread_limit": "gauge", "cclb_handler_queue_length": "gauge",
    "cclb_handler_queue_wait_seconds": "histogram", "cclb_parked_connections": "gauge"}


# The client side's families (metrics.FrontendCounters).
FRONTEND_FAMILIES = {
    "cclb_responses_total": "counter", "cclb_rejected_total": "counter",
    "cclb_open_connections": "gauge", "cclb_threads": "gauge", "cclb_client_bytes_total": "counter"}
FRONTEND_PREFIXES = tuple(FRONTEND_FAMILIES)


def process_family(sample_name: str) -> str:
    """The process family a sample belongs to (a histogram's _bucket, _sum and _count samples)."""
    for suffix in ("_bucket", "_sum", "_count"):
        if sample_name.endswith(suffix) and sample_name[:-len(suffix)] in PROCESS_FAMILIES:
            return sample_name[:-len(suffix)]
    return sample_name


def without_process(types: dict[str, str]) -> dict[str, str]:
    return {name: kind for name, kind in types.items() if name not in PROCESS_FAMILIES}


if __name__ == "__main__":
    unittest.main()

"""Unit tests for balancing policies and the ServerCluster bookkeeping.

Real ``cluster.Backend`` objects are built by ``ServerCluster`` from
``parse_backend`` specs; nothing touches the network (a backend's pool only
connects when a request is forwarded).  Time is faked where it matters.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import unittest
from collections import Counter
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import balancing  # noqa: E402
import cluster  # noqa: E402
from balancing import (IPHash, LeastConnections, RandomTwo, RoundRobin,  # noqa: E402
                       WeightedRoundRobin, make_policy)
from backend_urls import parse_backend  # noqa: E402
from cluster import DRAIN, MAINT, READY, Attempt, ServerCluster  # noqa: E402
from tests.support import cluster_view  # noqa: E402

_null_handler = logging.NullHandler()


def setUpModule():
    # The cluster logs state changes at WARNING; keep the test output clean
    # (assertLogs still captures where a test checks the log).
    logging.getLogger("cclb").addHandler(_null_handler)


def tearDownModule():
    logging.getLogger("cclb").removeHandler(_null_handler)


NAMES = "abcdefgh"


def make_cluster(*weights: int, policy=None, **options) -> tuple[ServerCluster, dict]:
    """A cluster of backends a, b, c... on 127.0.0.1:7000+ with the given weights."""
    specs = [parse_backend(f"http://127.0.0.1:{7000 + i},weight={w}") for i, w in enumerate(weights)]
    servers = ServerCluster(specs, policy, **options)
    names = {backend: NAMES[i] for i, backend in enumerate(servers.backends)}
    return servers, names


_OPEN_ATTEMPTS: dict[int, list[Attempt]] = {}  # backend id() -> attempts not yet released


def acquire(servers: ServerCluster, client: str, exclude: tuple = ()) -> cluster.Backend | None:
    """``servers.acquire`` for tests that think in backends: keeps the Attempt for ``release``."""
    attempt = servers.acquire(client, exclude)
    if attempt is None:
        return None
    _OPEN_ATTEMPTS.setdefault(id(attempt.backend), []).append(attempt)
    return attempt.backend


def release(backend: cluster.Backend, status: int | None, duration: float = 0.0,
            retried: bool = False) -> None:
    """End the oldest open attempt on ``backend``: a response, or a (retried) failure."""
    attempt = _OPEN_ATTEMPTS[id(backend)].pop(0)
    if status is None or retried:
        attempt.failed(None, retried=retried)
    else:
        attempt.done(status, duration)


def cluster_of(test: unittest.TestCase, *texts: str, **params) -> ServerCluster:
    """A cluster of ``parse_backend`` specs, its pools closed at the end of ``test``."""
    servers = ServerCluster([parse_backend(text) for text in texts], **params)
    test.addCleanup(servers.close)
    return servers


def picks(servers: ServerCluster, names: dict, count: int, client: str = "10.0.0.1") -> str:
    """Letters of ``count`` backends chosen in a row, each request ending at once."""
    chosen = []
    for _ in range(count):
        backend = acquire(servers, client)
        assert backend is not None
        chosen.append(names[backend])
        release(backend, 200)
    return "".join(chosen)


class FakeClock:
    """Stands in for the ``time`` module inside ``cluster``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()


# --- parse_backend -----------------------------------------------------------------

class ParseBackendTest(unittest.TestCase):
    def test_valid(self):
        cases = [
            ("127.0.0.1:7000", ("http://127.0.0.1:7000", "127.0.0.1", 7000, 1)),
            ("http://localhost:80", ("http://localhost:80", "localhost", 80, 1)),
            ("http://localhost:80/", ("http://localhost:80", "localhost", 80, 1)),
            ("http://[::1]:8080", ("http://[::1]:8080", "::1", 8080, 1)),
            ("h:7000,weight=3", ("http://h:7000", "h", 7000, 3)),
            ("http://h:7000, weight=1000", ("http://h:7000", "h", 7000, 1000)),
            ("h:65535", ("http://h:65535", "h", 65535, 1)),
        ]
        for text, (url, host, port, weight) in cases:
            with self.subTest(text=text):
                spec = parse_backend(text)
                self.assertEqual((spec.url, spec.host, spec.port, spec.weight), (url, host, port, weight))
                self.assertEqual((spec.scheme, spec.tls), ("http", False))

    def test_https(self):
        cases = [
            ("https://localhost:8443", ("https://localhost:8443", "localhost", 8443, 1)),
            ("HTTPS://Example.COM:443/", ("https://example.com:443", "example.com", 443, 1)),
            ("https://[::1]:8443,weight=7", ("https://[::1]:8443", "::1", 8443, 7)),
            ("https://127.0.0.1:443", ("https://127.0.0.1:443", "127.0.0.1", 443, 1)),
        ]
        for text, (url, host, port, weight) in cases:
            with self.subTest(text=text):
                spec = parse_backend(text)
                self.assertEqual((spec.url, spec.host, spec.port, spec.weight), (url, host, port, weight))
                self.assertEqual((spec.scheme, spec.tls), ("https", True))
        # Same address, other scheme: another backend (the URL is its name everywhere).
        self.assertNotEqual(parse_backend("https://h:1"), parse_backend("http://h:1"))
        for text in ("https://h", "https://h:1/x", "https://u@h:1", "https://h:0"):
            with self.subTest(text=text):
                with self.assertRaisesRegex(ValueError, "https://host:port|port must be"):
                    parse_backend(text)

    def test_invalid(self):
        for text in ("h", "http://h", "h:0", "h:65536", "h:abc", "http://h:1/path",
                     "http://h:1?q=1", "http://u@h:1", "ftp://h:1", "ws://h:1", "", ":80",
                     "h:1,weight=0", "h:1,weight=1001", "h:1,weight=x", "h:1,weight=-1",
                     "h:1,weight=", "h:1,foo=1"):
            with self.subTest(text=text):
                with self.assertRaises(ValueError):
                    parse_backend(text)


# --- policies -------------------------------------------------------------------------

class PolicyRegistryTest(unittest.TestCase):
    def test_every_name_builds_its_policy(self):
        expected = {"round-robin": RoundRobin, "weighted-round-robin": WeightedRoundRobin,
                    "least-connections": LeastConnections, "random-two": RandomTwo,
                    "ip-hash": IPHash}
        self.assertEqual(set(balancing.POLICIES), set(expected))
        for name, cls in expected.items():
            with self.subTest(name=name):
                policy = make_policy(name)
                self.assertIsInstance(policy, cls)
                self.assertEqual(policy.name, name)
        self.assertIsInstance(ServerCluster([]).policy, RoundRobin)


class RoundRobinTest(unittest.TestCase):
    def test_exact_order(self):
        servers, names = make_cluster(1, 1, 1)
        self.assertEqual(picks(servers, names, 9), "abcabcabc")

    def test_weights_are_ignored(self):
        servers, names = make_cluster(5, 1, 1)
        self.assertEqual(picks(servers, names, 6), "abcabc")

    def test_skips_unavailable_backends(self):
        servers, names = make_cluster(1, 1, 1)
        b = servers.backends[1]
        b.healthy = False
        result = picks(servers, names, 10)
        self.assertNotIn("b", result)
        self.assertEqual(Counter(result), Counter({"a": 5, "c": 5}))
        for first, second in zip(result, result[1:]):
            self.assertNotEqual(first, second, result)
        b.healthy = True
        self.assertEqual(Counter(picks(servers, names, 9)), Counter({"a": 3, "b": 3, "c": 3}))

    def test_even_spread_while_requests_overlap(self):
        servers, names = make_cluster(1, 1, 1)
        held = [acquire(servers, "x") for _ in range(30)]
        self.assertEqual(Counter(names[b] for b in held), Counter({"a": 10, "b": 10, "c": 10}))


class WeightedRoundRobinTest(unittest.TestCase):
    def test_nginx_smooth_sequence_5_1_1(self):
        servers, names = make_cluster(5, 1, 1, policy=WeightedRoundRobin())
        self.assertEqual(picks(servers, names, 7 * 4), "aabacaa" * 4)

    def test_other_weights_keep_exact_proportions(self):
        for weights in ((1, 1, 1), (2, 1), (3, 2, 1), (1, 4), (10, 1, 1, 1)):
            with self.subTest(weights=weights):
                servers, names = make_cluster(*weights, policy=WeightedRoundRobin())
                total = sum(weights)
                result = picks(servers, names, total * 3)
                # every period of sum(weights) picks holds each backend exactly weight times
                for start in range(0, len(result), total):
                    self.assertEqual(Counter(result[start:start + total]),
                                     Counter({NAMES[i]: w for i, w in enumerate(weights)}), result)

    def test_equal_weights_is_round_robin(self):
        servers, names = make_cluster(1, 1, 1, policy=WeightedRoundRobin())
        self.assertEqual(picks(servers, names, 6), "abcabc")

    def test_skips_unavailable_backends(self):
        servers, names = make_cluster(5, 1, 1, policy=WeightedRoundRobin())
        servers.backends[2].admin_state = MAINT
        result = picks(servers, names, 12)
        self.assertEqual(Counter(result), Counter({"a": 10, "b": 2}))


class LeastConnectionsTest(unittest.TestCase):
    def test_picks_fewest_in_flight(self):
        servers, names = make_cluster(1, 1, 1, policy=LeastConnections())
        a, b, c = servers.backends
        a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
        self.assertEqual(names[acquire(servers, "x")], "b")
        self.assertEqual(b.in_flight, 2)
        # now a=3, b=2, c=2: tie between b and c, never a
        chosen = acquire(servers, "x")
        self.assertIn(names[chosen], "bc")

    def test_weight_aware(self):
        servers, names = make_cluster(4, 1, policy=LeastConnections())
        a, b = servers.backends
        a.in_flight, b.in_flight = 3, 1  # 0.75 per weight unit vs 1.0
        self.assertEqual(names[acquire(servers, "x")], "a")
        held = []
        servers2, names2 = make_cluster(3, 1, policy=LeastConnections())
        for _ in range(40):
            held.append(names2[acquire(servers2, "x")])
        self.assertEqual(Counter(held), Counter({"a": 30, "b": 10}))

    def test_ties_broken_round_robin(self):
        servers, names = make_cluster(1, 1, 1, policy=LeastConnections())
        self.assertEqual(picks(servers, names, 9), "abcabcabc")

    def test_overlapping_requests_spread_evenly(self):
        servers, names = make_cluster(1, 1, 1, policy=LeastConnections())
        held = [acquire(servers, "x") for _ in range(3)]
        self.assertEqual(sorted(names[b] for b in held), ["a", "b", "c"])
        release(held[0], 200)
        self.assertIs(acquire(servers, "x"), held[0])

    def test_skips_unavailable_even_if_idle(self):
        servers, names = make_cluster(1, 1, policy=LeastConnections())
        a, b = servers.backends
        a.in_flight, b.in_flight = 5, 0
        b.healthy = False
        self.assertIs(acquire(servers, "x"), a)


class RandomTwoTest(unittest.TestCase):
    def test_prefers_the_less_loaded(self):
        servers, names = make_cluster(1, 1, policy=RandomTwo(seed=1))
        a, b = servers.backends
        a.in_flight = 5
        for _ in range(50):
            self.assertIs(servers.policy.select(servers.backends, "x"), b)

    def test_most_loaded_of_three_is_never_chosen(self):
        servers, names = make_cluster(1, 1, 1, policy=RandomTwo(seed=42))
        servers.backends[0].in_flight = 10
        chosen = Counter(names[servers.policy.select(servers.backends, "x")] for _ in range(1000))
        self.assertNotIn("a", chosen)
        self.assertEqual(set(chosen), {"b", "c"})

    def test_equal_load_is_roughly_uniform(self):
        servers, names = make_cluster(1, 1, 1, 1, policy=RandomTwo(seed=1234))
        result = Counter(picks(servers, names, 4000))
        self.assertEqual(set(result), set("abcd"))
        for name, count in result.items():
            self.assertTrue(850 <= count <= 1150, result)

    def test_deterministic_with_a_seed(self):
        first, names1 = make_cluster(1, 1, 1, policy=RandomTwo(seed=99))
        second, names2 = make_cluster(1, 1, 1, policy=RandomTwo(seed=99))
        self.assertEqual(picks(first, names1, 50), picks(second, names2, 50))

    def test_single_backend(self):
        servers, names = make_cluster(1, policy=RandomTwo(seed=3))
        self.assertEqual(picks(servers, names, 5), "aaaaa")


def client_ips(count: int) -> list[str]:
    return [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(count)]


class IPHashTest(unittest.TestCase):
    def mapping(self, servers, names, clients):
        result = {}
        for client in clients:
            backend = acquire(servers, client)
            result[client] = names[backend]
            release(backend, 200)
        return result

    def test_stable_per_client(self):
        servers, names = make_cluster(1, 1, 1, policy=IPHash())
        for client in ("10.0.0.1", "192.168.1.20", "::1", "2001:db8::7"):
            with self.subTest(client=client):
                self.assertEqual(len(set(picks(servers, names, 20, client))), 1)
        # a second policy object (e.g. after a reload) agrees
        other, other_names = make_cluster(1, 1, 1, policy=IPHash())
        clients = client_ips(200)
        self.assertEqual(self.mapping(servers, names, clients),
                         self.mapping(other, other_names, clients))

    def test_spread_over_backends(self):
        servers, names = make_cluster(1, 1, 1, policy=IPHash())
        counts = Counter(self.mapping(servers, names, client_ips(3000)).values())
        self.assertEqual(set(counts), {"a", "b", "c"})
        for name, count in counts.items():
            self.assertTrue(850 <= count <= 1150, counts)

    def test_weights_keep_their_proportions(self):
        servers, names = make_cluster(3, 1, policy=IPHash())
        counts = Counter(self.mapping(servers, names, client_ips(4000)).values())
        self.assertAlmostEqual(counts["a"] / 4000, 0.75, delta=0.03)

    def test_removing_a_backend_moves_only_its_clients(self):
        clients = client_ips(2000)
        for how in ("remove", "down", "drain"):
            with self.subTest(how=how):
                servers, names = make_cluster(1, 1, 1, 1, policy=IPHash())
                before = self.mapping(servers, names, clients)
                gone = servers.backends[1]
                if how == "remove":
                    servers.remove(gone)
                elif how == "down":
                    gone.healthy = False
                else:
                    gone.admin_state = DRAIN
                after = self.mapping(servers, names, clients)
                moved = {c for c in clients if before[c] != after[c]}
                self.assertEqual(moved, {c for c in clients if before[c] == "b"})
                self.assertNotIn("b", after.values())
                # and the clients that moved spread over the others
                self.assertEqual(set(after[c] for c in moved), {"a", "c", "d"})

    def test_adding_a_backend_moves_clients_only_to_it(self):
        clients = client_ips(2000)
        servers, names = make_cluster(1, 1, 1, policy=IPHash())
        before = self.mapping(servers, names, clients)
        added = servers.add(parse_backend("http://127.0.0.1:7009"))
        names[added] = "z"
        after = self.mapping(servers, names, clients)
        for client in clients:
            if before[client] != after[client]:
                self.assertEqual(after[client], "z")
        self.assertTrue(400 <= Counter(after.values())["z"] <= 600)


# --- ServerCluster -------------------------------------------------------------------------

ALL_POLICIES = (RoundRobin, WeightedRoundRobin, LeastConnections, lambda: RandomTwo(seed=5), IPHash)


class AcquireTest(unittest.TestCase):
    def test_never_returns_an_unavailable_backend(self):
        def down(backend):
            backend.healthy = False

        def drain(backend):
            backend.admin_state = DRAIN

        def maint(backend):
            backend.admin_state = MAINT

        for make in ALL_POLICIES:
            for how in (down, drain, maint):
                policy = make()
                with self.subTest(policy=policy.name, how=how.__name__):
                    servers, names = make_cluster(1, 3, 1, policy=policy)
                    how(servers.backends[1])
                    self.assertFalse(servers.backends[1].available)
                    seen = Counter()
                    for client in client_ips(300):
                        backend = acquire(servers, client)
                        seen[names[backend]] += 1
                        release(backend, 200)
                    self.assertEqual(set(seen), {"a", "c"})

    def test_none_when_nothing_is_available(self):
        for make in ALL_POLICIES:
            policy = make()
            with self.subTest(policy=policy.name):
                servers, _ = make_cluster(1, 1, 1, policy=policy)
                a, b, c = servers.backends
                a.healthy = False
                b.admin_state = DRAIN
                c.admin_state = MAINT
                self.assertIsNone(acquire(servers, "10.0.0.1"))
                self.assertEqual([x.in_flight for x in servers.backends], [0, 0, 0])
        self.assertIsNone(acquire(ServerCluster([]), "10.0.0.1"))

    def test_back_to_ready_is_chosen_again(self):
        servers, names = make_cluster(1, 1)
        b = servers.backends[1]
        servers.set_admin_state(b, MAINT)
        self.assertEqual(b.state, MAINT)
        self.assertEqual(picks(servers, names, 4), "aaaa")
        servers.set_admin_state(b, READY)
        self.assertEqual(b.state, "up")
        self.assertIn("b", picks(servers, names, 2))

    def test_exclude(self):
        servers, names = make_cluster(1, 1, 1)
        a, b, c = servers.backends
        for _ in range(6):
            chosen = acquire(servers, "x", exclude=(a,))
            self.assertIn(chosen, (b, c))
            release(chosen, 502, retried=True)
        self.assertIsNone(acquire(servers, "x", exclude=(a, b, c)))

    def test_in_flight_and_counters(self):
        servers, names = make_cluster(1)
        (a,) = servers.backends
        first = acquire(servers, "x")
        second = acquire(servers, "x")
        self.assertEqual(a.in_flight, 2)
        release(first, 200, 0.01)
        release(second, None, retried=True)  # a failed attempt has no status
        self.assertEqual(a.in_flight, 0)
        self.assertEqual(a.responses, {200: 1})
        self.assertEqual(a.retries, 1)
        for status in (404, 503, 302, 200):
            release(acquire(servers, "x"), status, 0.02)
        self.assertEqual(a.responses, {200: 2, 404: 1, 503: 1, 302: 1})

    def test_state_names(self):
        servers, _ = make_cluster(1)
        (a,) = servers.backends
        self.assertEqual((a.state, a.available), ("up", True))
        a.healthy = False
        self.assertEqual((a.state, a.available), ("down", False))
        a.healthy = True
        a.admin_state = DRAIN
        self.assertEqual((a.state, a.available), ("drain", False))
        a.admin_state = MAINT
        self.assertEqual((a.state, a.available), ("maint", False))


class MembershipTest(unittest.TestCase):
    """Adding backends: a URL is in the cluster at most once."""

    def test_cluster_add_refuses_a_url_already_there_even_from_racing_threads(self):
        cluster = cluster_of(self, "127.0.0.1:9001")
        self.assertIsNone(cluster.add(parse_backend("http://127.0.0.1:9001/,weight=4")))
        self.assertEqual(cluster_view(cluster), [("http://127.0.0.1:9001", 1, True, READY)])
        spec = parse_backend("127.0.0.1:9002")
        barrier = threading.Barrier(16)
        results = []

        def add() -> None:
            barrier.wait(5)
            results.append(cluster.add(spec))
        threads = [threading.Thread(target=add) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        self.assertEqual(len([r for r in results if r is not None]), 1, results)
        self.assertEqual([b.url for b in cluster.snapshot()],
                         ["http://127.0.0.1:9001", "http://127.0.0.1:9002"])


class PassiveFailureTest(unittest.TestCase):
    def setUp(self):
        self.clock = FakeClock()
        patcher = mock.patch.object(cluster, "time", self.clock)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_default_one_failure_marks_down_at_once_and_logs_once(self):
        servers, names = make_cluster(1, 1)
        a, b = servers.backends
        with self.assertLogs("cclb", "WARNING") as logs:
            servers.report_failure(b, "connection refused")
            servers.report_failure(b, "connection refused")
        self.assertFalse(b.available)
        self.assertEqual(b.state, "down")
        self.assertEqual(b.failures, 2)
        down_lines = [line for line in logs.output if "DOWN" in line]
        self.assertEqual(len(down_lines), 1, logs.output)
        self.assertIn("http://127.0.0.1:7001", down_lines[0])
        self.assertIn("connection refused", down_lines[0])
        self.assertEqual(picks(servers, names, 3), "aaa")

    def test_max_fails_within_fail_timeout(self):
        servers, _ = make_cluster(1, 1, max_fails=3, fail_timeout=10.0)
        b = servers.backends[1]
        servers.report_failure(b, "reset")
        self.clock.now += 4
        servers.report_failure(b, "reset")
        self.assertTrue(b.available, "2 of 3 failures")
        self.clock.now += 4
        servers.report_failure(b, "reset")
        self.assertFalse(b.available, "3 failures within 10 s")

    def test_failures_older_than_fail_timeout_do_not_count(self):
        servers, _ = make_cluster(1, 1, max_fails=2, fail_timeout=10.0)
        b = servers.backends[1]
        for _ in range(5):
            servers.report_failure(b, "reset")
            self.clock.now += 10.5
        self.assertTrue(b.available)
        self.assertEqual(b.failures, 5)
        servers.report_failure(b, "reset")
        self.clock.now += 9
        servers.report_failure(b, "reset")
        self.assertFalse(b.available)

    def test_max_fails_zero_never_marks_down(self):
        servers, _ = make_cluster(1, 1, max_fails=0, fail_timeout=10.0)
        b = servers.backends[1]
        for _ in range(20):
            servers.report_failure(b, "reset")
        self.assertTrue(b.available)
        self.assertEqual(b.failures, 20)

    def test_single_backend_pool_is_never_emptied(self):
        servers, names = make_cluster(1, max_fails=1)
        (a,) = servers.backends
        for _ in range(10):
            servers.report_failure(a, "connection refused")
        self.assertTrue(a.available)
        self.assertIs(acquire(servers, "x"), a)

    def test_down_lasts_fail_timeout(self):
        # Issue 4: "--max-fails N within --fail-timeout SECONDS mark a backend
        # down for that time (nginx semantics)": once fail_timeout has passed
        # the backend is tried again, even without an active health check
        # (--health-interval 0 turns active checks off).
        servers, names = make_cluster(1, 1, max_fails=1, fail_timeout=10.0)
        b = servers.backends[1]
        servers.report_failure(b, "connection refused")
        self.assertEqual(picks(servers, names, 4), "aaaa")
        self.clock.now += 10.5
        self.assertIn("b", picks(servers, names, 4))

    def test_recovery_by_active_check_clears_failures(self):
        servers, names = make_cluster(1, 1, max_fails=2, fail_timeout=10.0)
        b = servers.backends[1]
        servers.report_failure(b, "x")
        servers.report_failure(b, "x")
        self.assertFalse(b.available)
        with self.assertLogs("cclb", "WARNING") as logs:
            servers.report_check(b, True, "HTTP 200", 0.01)
        self.assertTrue(b.available)
        self.assertTrue(any("UP again" in line for line in logs.output), logs.output)
        servers.report_failure(b, "x")
        self.assertTrue(b.available, "earlier failures were forgotten when it came back")

    # Review: the passive rule once emptied the pool of its last available backend.
    def test_last_available_backend_is_not_taken_out_passively(self):
        cluster = cluster_of(self, "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003",
                               max_fails=1, fail_timeout=10)
        down, maint, last = cluster.snapshot()
        with self.assertLogs("cclb", "WARNING"):
            cluster.report_check(down, False, "connection refused", None, rise=1, fall=1)
        cluster.set_admin_state(maint, MAINT, quiet=True)
        self.assertEqual([b.available for b in cluster.snapshot()], [False, False, True])

        with self.assertNoLogs("cclb", "WARNING"):
            cluster.report_failure(last, "connection refused")
        self.assertTrue(last.available, "the only backend left was taken out by one failure")
        picked = acquire(cluster, "10.0.0.1")
        self.assertIs(picked, last)
        release(picked, 200)

        # Control: with a second backend available the same rule does take it out.
        cluster.set_admin_state(maint, READY, quiet=True)
        with self.assertLogs("cclb", "WARNING") as logs:
            cluster.report_failure(last, "connection refused")
        self.assertIn("is DOWN", logs.output[0])
        self.assertFalse(last.available)
        self.assertIs(acquire(cluster, "10.0.0.1"), maint)


class _RecordingLock:
    """A lock that records what the cluster looks like each time it is taken."""

    def __init__(self, cluster: ServerCluster) -> None:
        self.lock = threading.Lock()
        self.cluster = cluster
        self.seen: list[list[tuple[str, int]]] = []

    def __enter__(self):
        self.lock.acquire()
        self.seen.append([(b.url, b.weight) for b in self.cluster.backends])
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def acquire(self, *args) -> bool:
        return self.lock.acquire(*args)

    def release(self) -> None:
        self.lock.release()


class SlowStartAndReloadTest(unittest.TestCase):
    def setUp(self):
        self.clock = FakeClock()
        patcher = mock.patch.object(cluster, "time", self.clock)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_weight_ramps_up_linearly_after_recovery(self):
        servers, _ = make_cluster(1, 4, slow_start=10.0)
        b = servers.backends[1]
        servers.report_check(b, False, "refused", None)
        self.clock.now += 100
        servers.report_check(b, True, "HTTP 200", 0.01)
        self.assertAlmostEqual(b.effective_weight(), 4 * 0.05)  # small but never zero
        self.clock.now += 5
        self.assertAlmostEqual(b.effective_weight(), 2.0)
        self.clock.now += 5
        self.assertAlmostEqual(b.effective_weight(), 4.0)
        self.clock.now += 50
        self.assertAlmostEqual(b.effective_weight(), 4.0)

    def test_no_slow_start_means_full_weight(self):
        servers, _ = make_cluster(3)
        self.assertEqual(servers.backends[0].effective_weight(), 3)

    def test_reconcile_keeps_state_of_backends_that_stay(self):
        servers, _ = make_cluster(1, 1, 1)
        a, b, c = servers.backends
        a.in_flight = 2
        b.healthy = False
        specs = [parse_backend("http://127.0.0.1:7000,weight=5"), parse_backend("127.0.0.1:7001"),
                 parse_backend("127.0.0.1:7005")]
        added, removed = servers.reconcile(specs)
        self.assertEqual(added, ["http://127.0.0.1:7005"])
        self.assertEqual(removed, ["http://127.0.0.1:7002"])
        self.assertEqual([x.url for x in servers.backends],
                         ["http://127.0.0.1:7000", "http://127.0.0.1:7001", "http://127.0.0.1:7005"])
        self.assertIs(servers.backends[0], a)
        self.assertEqual((a.weight, a.in_flight), (5, 2))
        self.assertIs(servers.backends[1], b)
        self.assertFalse(b.healthy)
        self.assertNotIn(c, servers.backends)
        self.assertEqual(len({x.id for x in servers.backends}), 3)

    def test_reconcile_adds_removes_and_reweights_in_one_step(self):
        cluster = cluster_of(self, "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003")
        a, b, c = cluster.snapshot()
        before = [(x.url, x.weight) for x in cluster.backends]
        recorder = _RecordingLock(cluster)
        cluster._lock = recorder  # the test looks inside: is reconcile one locked step?
        wanted = [parse_backend(text) for text in ("127.0.0.1:9002,weight=3", "127.0.0.1:9003",
                                                   "[::1]:9004,weight=2")]
        added, removed = cluster.reconcile(wanted)
        self.assertEqual((added, removed), (["http://[::1]:9004"], ["http://127.0.0.1:9001"]))
        after = [(x.url, x.weight) for x in cluster.backends]
        self.assertEqual(after, [("http://127.0.0.1:9002", 3), ("http://127.0.0.1:9003", 1),
                                 ("http://[::1]:9004", 2)])
        self.assertIs(cluster.backends[0], b)  # a backend that stays keeps its state
        self.assertIs(cluster.backends[1], c)
        self.assertEqual(cluster.backends[2].id, 4)
        # Every time another thread could have looked, it saw the old list: no half-done step.
        self.assertEqual(recorder.seen, [before], "reconcile took the lock more than once")
        self.assertEqual(cluster.reconcile(wanted), ([], []))


class ActiveCheckTest(unittest.TestCase):
    def test_fall_threshold(self):
        servers, _ = make_cluster(1, 1)
        b = servers.backends[1]
        servers.report_check(b, False, "connection refused", None, rise=1, fall=3)
        servers.report_check(b, False, "connection refused", None, rise=1, fall=3)
        self.assertTrue(b.healthy)
        servers.report_check(b, True, "HTTP 200", 0.01, rise=1, fall=3)  # resets the count
        servers.report_check(b, False, "connection refused", None, rise=1, fall=3)
        servers.report_check(b, False, "connection refused", None, rise=1, fall=3)
        self.assertTrue(b.healthy)
        with self.assertLogs("cclb", "WARNING") as logs:
            servers.report_check(b, False, "connection refused", None, rise=1, fall=3)
        self.assertFalse(b.healthy)
        self.assertEqual(len(logs.output), 1)
        self.assertIn("DOWN", logs.output[0])
        self.assertEqual(b.last_check, "connection refused")

    def test_rise_threshold(self):
        servers, _ = make_cluster(1, 1)
        b = servers.backends[1]
        servers.report_check(b, False, "refused", None, rise=2, fall=1)
        self.assertFalse(b.healthy)
        servers.report_check(b, True, "HTTP 200", 0.01, rise=2, fall=1)
        self.assertFalse(b.healthy)
        servers.report_check(b, False, "refused", None, rise=2, fall=1)  # resets the count
        servers.report_check(b, True, "HTTP 200", 0.01, rise=2, fall=1)
        self.assertFalse(b.healthy)
        servers.report_check(b, True, "HTTP 204", 0.02, rise=2, fall=1)
        self.assertTrue(b.healthy)
        self.assertEqual((b.last_check, b.last_check_latency), ("HTTP 204", 0.02))

    def test_defaults_flip_on_each_result_and_log_each_transition_once(self):
        servers, _ = make_cluster(1, 1)
        b = servers.backends[1]
        with self.assertLogs("cclb", "WARNING") as logs:
            for ok in (True, False, False, False, True, True, False):
                servers.report_check(b, ok, "HTTP 200" if ok else "connection refused", None)
                self.assertEqual(b.healthy, ok)
        self.assertEqual(len(logs.output), 3, logs.output)  # down, up, down

    def test_single_backend_can_be_taken_down_by_active_checks(self):
        servers, _ = make_cluster(1)
        (a,) = servers.backends
        servers.report_check(a, False, "refused", None)
        self.assertFalse(a.healthy)
        self.assertIsNone(acquire(servers, "x"))


if __name__ == "__main__":
    unittest.main()

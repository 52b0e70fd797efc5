"""Unit tests for ``cluster``: Attempt release paths, passive failures, copies, reloads.

Backends are real ``cluster.Backend`` objects built from ``parse_backend``
specs; nothing here connects (a pool only connects when a request is
forwarded), so the ports need not be listening.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import settings  # noqa: E402
from backend_urls import parse_backend  # noqa: E402
from balancing import LeastConnections, RoundRobin  # noqa: E402
from cluster import Attempt, Backend, ServerCluster  # noqa: E402
from metrics import Histogram, TrafficCounters  # noqa: E402

_null_handler = logging.NullHandler()


def setUpModule() -> None:
    logging.getLogger("cclb").addHandler(_null_handler)  # state changes log at WARNING


def tearDownModule() -> None:
    logging.getLogger("cclb").removeHandler(_null_handler)


URL1, URL2, URL3 = "http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"


def make_cluster(*texts: str, **options: float) -> ServerCluster:
    return ServerCluster([parse_backend(text) for text in texts], **options)


class AttemptReleaseTests(unittest.TestCase):
    """An Attempt releases its in-flight count exactly once, whatever the path."""

    def setUp(self) -> None:
        self.cluster = make_cluster("127.0.0.1:9001")
        self.addCleanup(self.cluster.close)
        (self.backend,) = self.cluster.snapshot()

    def acquire(self) -> Attempt:
        attempt = self.cluster.acquire("client")
        self.assertIsNotNone(attempt)
        self.assertIs(attempt.backend, self.backend)
        self.assertEqual(self.backend.in_flight, 1)
        return attempt

    def assert_released(self) -> None:
        self.assertGreaterEqual(self.backend.in_flight, 0)
        self.assertEqual(self.backend.in_flight, 0)

    def test_done(self) -> None:
        """done() releases once and counts the response and its latency."""
        attempt = self.acquire()
        attempt.done(200, 0.02)
        self.assert_released()
        self.assertTrue(attempt.released)
        self.assertEqual(self.backend.responses, {200: 1})
        self.assertEqual(self.backend.latency.count, 1)

    def test_done_twice_counts_once(self) -> None:
        """A second done() is a no-op: no second response, no second decrement."""
        other = self.cluster.acquire("other")  # keeps in_flight at 1 if we double-decrement
        attempt = self.cluster.acquire("client")
        self.assertEqual(self.backend.in_flight, 2)
        attempt.done(200, 0.01)
        self.assertEqual(self.backend.in_flight, 1)
        attempt.done(500, 0.01)
        self.assertEqual(self.backend.in_flight, 1)
        self.assertEqual(self.backend.responses, {200: 1})
        other.done(200, 0.01)
        self.assert_released()

    def test_with_block_releases_without_a_response(self) -> None:
        """Leaving the with block releases an open attempt and counts no response."""
        with self.acquire():
            self.assertEqual(self.backend.in_flight, 1)
        self.assert_released()
        self.assertEqual(self.backend.responses, {})
        self.assertEqual(self.backend.latency.count, 0)

    def test_with_block_releases_on_exception(self) -> None:
        """An exception inside the block releases the attempt and still propagates."""
        with self.assertRaises(KeyError):
            with self.acquire():
                raise KeyError("boom")
        self.assert_released()

    def test_done_then_exit(self) -> None:
        """done() inside the block, then leaving it: one release, one response."""
        other = self.cluster.acquire("other")
        with self.cluster.acquire("client") as attempt:
            attempt.done(204, 0.01)
            self.assertEqual(self.backend.in_flight, 1)
        self.assertEqual(self.backend.in_flight, 1, "exit after done did not decrement again")
        self.assertEqual(self.backend.responses, {204: 1})
        other.done(200, 0.01)
        self.assert_released()

    def test_failed_then_done_then_exit(self) -> None:
        """failed() releases; a later done() and exit count nothing more."""
        other = self.cluster.acquire("other")
        with self.cluster.acquire("client") as attempt:
            attempt.failed("connection reset", retried=True)
            self.assertEqual(self.backend.in_flight, 1)
            attempt.done(200, 0.01)
            self.assertEqual(self.backend.in_flight, 1)
            attempt.failed("again", retried=True)
            self.assertEqual(self.backend.in_flight, 1)
        self.assertEqual(self.backend.in_flight, 1)
        self.assertEqual(self.backend.responses, {})
        self.assertEqual(self.backend.failures, 1)
        self.assertEqual(self.backend.retries, 1)
        other.done(200, 0.01)
        self.assert_released()

    def test_exit_then_done(self) -> None:
        """Released by the with block, a late done() counts no response."""
        with self.acquire() as attempt:
            pass
        attempt.done(200, 0.01)
        self.assert_released()
        self.assertEqual(self.backend.responses, {})

    def test_failed_with_reason_counts_a_passive_failure(self) -> None:
        """failed(reason) counts a transport failure; retried=True counts a retry."""
        self.acquire().failed("connection refused", retried=True)
        self.assert_released()
        self.assertEqual(self.backend.failures, 1)
        self.assertEqual(self.backend.retries, 1)
        self.assertEqual(len(self.backend.passive_failures), 1)

    def test_failed_none_is_not_a_passive_failure(self) -> None:
        """failed(None) (a pooled connection that died idle) releases but counts no failure."""
        self.acquire().failed(None)
        self.assert_released()
        self.assertEqual(self.backend.failures, 0)
        self.assertEqual(self.backend.passive_failures, [])
        self.assertEqual(self.backend.retries, 0)
        self.assertTrue(self.backend.available)


class PassiveFailureTests(unittest.TestCase):
    def test_max_fails_one_takes_a_backend_out_but_never_the_last(self) -> None:
        """With max_fails=1: a failure takes one of two out; the last one stays in."""
        cluster = make_cluster("127.0.0.1:9001", "127.0.0.1:9002", max_fails=1, fail_timeout=30)
        self.addCleanup(cluster.close)
        first = cluster.acquire("c")
        with self.assertLogs("cclb", logging.WARNING) as captured:
            first.failed("connection refused")
        self.assertIn("is DOWN: connection refused", captured.output[0])
        self.assertFalse(first.backend.available)
        self.assertEqual(first.backend.state, "down")
        survivor = next(b for b in cluster.snapshot() if b is not first.backend)
        for _ in range(4):
            attempt = cluster.acquire("c")
            self.assertIs(attempt.backend, survivor)
            attempt.done(200, 0.01)
        last = cluster.acquire("c")
        last.failed("connection refused")
        self.assertTrue(survivor.available, "the last available backend is never taken out")
        self.assertEqual(survivor.failures, 1)
        self.assertIsNotNone(cluster.acquire("c"))

    def test_failed_none_never_takes_a_backend_out(self) -> None:
        """failed(None) with max_fails=1: both backends stay available."""
        cluster = make_cluster("127.0.0.1:9001", "127.0.0.1:9002", max_fails=1)
        self.addCleanup(cluster.close)
        attempt = cluster.acquire("c")
        attempt.failed(None)
        self.assertTrue(all(b.available for b in cluster.snapshot()))

    def test_max_fails_counts_failures_within_fail_timeout_only(self) -> None:
        """max_fails=2: an old failure (older than fail_timeout) does not count toward it."""
        cluster = make_cluster("127.0.0.1:9001", "127.0.0.1:9002", max_fails=2, fail_timeout=10)
        self.addCleanup(cluster.close)
        one, _ = cluster.snapshot()
        cluster.report_failure(one, "reset")
        self.assertTrue(one.available)
        one.passive_failures = [t - 60 for t in one.passive_failures]  # a minute ago
        cluster.report_failure(one, "reset")
        self.assertTrue(one.available, "the old failure had expired")
        with self.assertLogs("cclb", logging.WARNING):
            cluster.report_failure(one, "reset")  # two within the window
        self.assertFalse(one.available)
        self.assertEqual(one.failures, 3)

    def test_served_after_its_time_out_clears_passive_down(self) -> None:
        """Once fail_timeout has passed, a response from the backend clears its passive mark."""
        cluster = make_cluster("127.0.0.1:9001", "127.0.0.1:9002", max_fails=1, fail_timeout=10)
        self.addCleanup(cluster.close)
        one, _ = cluster.snapshot()
        cluster.report_failure(one, "reset")
        self.assertFalse(one.available)
        one.passive_down_until = time.monotonic() - 1  # its fail_timeout is over
        self.assertTrue(one.available)
        attempt = cluster.acquire("c", exclude=tuple(b for b in cluster.snapshot() if b is not one))
        self.assertIs(attempt.backend, one)
        attempt.done(200, 0.01)
        self.assertEqual(one.passive_down_until, 0.0)
        self.assertEqual(one.state, "up")

    def test_max_fails_zero_disables_passive_checks(self) -> None:
        """max_fails=0: failures are counted, nobody is taken out."""
        cluster = make_cluster("127.0.0.1:9001", "127.0.0.1:9002", max_fails=0)
        self.addCleanup(cluster.close)
        for _ in range(5):
            cluster.acquire("c").failed("reset")
        self.assertTrue(all(b.available for b in cluster.snapshot()))
        self.assertEqual(sum(b.failures for b in cluster.snapshot()), 5)


class StatsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.cluster = make_cluster("127.0.0.1:9001", "127.0.0.1:9002")
        self.addCleanup(self.cluster.close)
        self.one, self.two = self.cluster.snapshot()

    def test_stats_are_copies(self) -> None:
        """Mutating what stats() returned changes nothing in the cluster."""
        attempt = self.cluster.acquire("c")
        attempt.done(200, 0.01)
        self.cluster.report_check(self.one, True, "200 OK", 0.001)
        self.cluster.count_unrouted(503)
        stats = self.cluster.stats()
        copy = stats.backends[0]
        copy.traffic.responses[500] = 99
        copy.traffic.latency.observe(1.0)
        copy.traffic.latency.counts[0] = 1000
        copy.health_checks["fail"] = 7
        stats.unrouted[502] = 3
        stats.backends.clear()
        again = self.cluster.stats()
        self.assertEqual(len(again.backends), 2)
        self.assertEqual(again.unrouted, {503: 1})
        self.assertEqual(again.backends[0].health_checks, {"pass": 1})
        total = again.backends[0].traffic.responses
        self.assertNotIn(500, total)
        self.assertEqual(self.one.latency.count + self.two.latency.count, 1)
        self.assertEqual(self.one.latency.counts[0], 0)
        self.assertNotIn(500, self.one.responses)

    def test_stats_copy_is_consistent(self) -> None:
        """The copy shows the counters as they were when taken, all together."""
        held = self.cluster.acquire("c")
        finished = self.cluster.acquire("c")
        finished.done(200, 0.01)
        stats = self.cluster.stats()
        held.done(200, 0.01)  # after the copy: not in it
        by_url = {b.url: b for b in stats.backends}
        self.assertEqual(by_url[held.backend.url].traffic.in_flight, 1)
        self.assertEqual(by_url[held.backend.url].traffic.responses, {})
        self.assertEqual(by_url[finished.backend.url].traffic.responses, {200: 1})
        self.assertEqual(by_url[finished.backend.url].traffic.latency.count, 1)
        self.assertEqual(stats.policy, "round-robin")
        self.assertEqual([b.id for b in stats.backends], [self.one.id, self.two.id])
        self.assertEqual(stats.backends[0].state, "up")
        self.assertTrue(stats.backends[0].available)

    def test_adopt_traffic(self) -> None:
        """adopt_traffic shows counters summed elsewhere; unknown URLs are ignored; copies kept."""
        traffic = TrafficCounters({200: 7, 502: 1}, 2, 3, 1, Histogram())
        traffic.latency.observe(0.03)
        self.cluster.adopt_traffic({URL1: traffic, "http://127.0.0.1:1": TrafficCounters()},
                                   {503: 4})
        traffic.responses[200] = 1000  # the caller's object stays the caller's
        traffic.latency.observe(5.0)
        stats = self.cluster.stats()
        one = next(b for b in stats.backends if b.url == URL1)
        two = next(b for b in stats.backends if b.url == URL2)
        self.assertEqual(one.traffic.responses, {200: 7, 502: 1})
        self.assertEqual((one.traffic.in_flight, one.traffic.failures, one.traffic.retries),
                         (2, 3, 1))
        self.assertEqual(one.traffic.latency.count, 1)
        self.assertEqual(two.traffic, TrafficCounters())
        self.assertEqual(stats.unrouted, {503: 4})
        self.assertEqual(len(stats.backends), 2)


class SettingsTests(unittest.TestCase):
    @staticmethod
    def pool(*argv: str) -> settings.PoolSettings:
        return settings.load(list(argv)).pools["default"]

    def test_from_settings(self) -> None:
        """from_settings takes members, policy, timeouts and thresholds from the pool settings."""
        pool = self.pool("-b", "127.0.0.1:9001", "-b", "127.0.0.1:9002,weight=4",
                         "--algorithm", "least-connections", "--connect-timeout", "1.5",
                         "--max-fails", "3", "--slow-start", "2")
        cluster = ServerCluster.from_settings(pool)
        self.addCleanup(cluster.close)
        self.assertIsInstance(cluster.policy, LeastConnections)
        self.assertEqual([(b.url, b.weight) for b in cluster.snapshot()], [(URL1, 1), (URL2, 4)])
        self.assertEqual(cluster.connect_timeout, 1.5)
        self.assertEqual(cluster.max_fails, 3)
        self.assertEqual(cluster.slow_start, 2.0)
        self.assertTrue(all(b.pool.connect_timeout == 1.5 for b in cluster.snapshot()))
        self.assertTrue(all(b.slow_start == 2.0 for b in cluster.snapshot()))

    def test_apply_settings_adds_removes_reweights_and_switches_policy(self) -> None:
        """A reload: new member added, missing one removed (pool retired), the rest keep state."""
        old = self.pool("-b", "127.0.0.1:9001", "-b", "127.0.0.1:9002")
        new = self.pool("-b", "127.0.0.1:9002,weight=5", "-b", "127.0.0.1:9003",
                        "--algorithm", "least-connections", "--connect-timeout", "0.5")
        cluster = ServerCluster.from_settings(old)
        self.addCleanup(cluster.close)
        one, two = cluster.snapshot()
        self.assertIsInstance(cluster.policy, RoundRobin)
        attempt = cluster.acquire("c")
        while attempt.backend is not two:
            attempt.done(200, 0.01)
            attempt = cluster.acquire("c")
        attempt.done(201, 0.01)
        added, removed = cluster.apply_settings(old, new)
        self.assertEqual((added, removed), ([URL3], [URL1]))
        members = cluster.snapshot()
        self.assertEqual([b.url for b in members], [URL2, URL3])
        self.assertIs(members[0], two, "a backend that stays is the same object")
        self.assertEqual(two.weight, 5)
        self.assertEqual(two.responses.get(201), 1, "it keeps its counters")
        self.assertNotIn(members[1].id, (one.id, two.id), "a new backend gets a new id")
        self.assertTrue(one.pool.retired)
        self.assertFalse(two.pool.retired)
        self.assertIsInstance(cluster.policy, LeastConnections)
        self.assertEqual(cluster.stats().policy, "least-connections")
        self.assertTrue(all(b.pool.connect_timeout == 0.5 for b in members))
        self.assertIsNone(cluster.find(one.id))

    def test_apply_settings_keeps_the_policy_object_when_unchanged(self) -> None:
        """Same algorithm: the policy (and its rotation state) is kept."""
        old = self.pool("-b", "127.0.0.1:9001")
        new = self.pool("-b", "127.0.0.1:9001", "-b", "127.0.0.1:9002")
        cluster = ServerCluster.from_settings(old)
        self.addCleanup(cluster.close)
        policy = cluster.policy
        self.assertEqual(cluster.apply_settings(old, new), ([URL2], []))
        self.assertIs(cluster.policy, policy)

    def test_remove_retires_the_pool(self) -> None:
        """remove(): the backend leaves the list and its pool never pools again."""
        cluster = make_cluster("127.0.0.1:9001", "127.0.0.1:9002")
        self.addCleanup(cluster.close)
        one, two = cluster.snapshot()
        cluster.remove(one)
        self.assertEqual(cluster.snapshot(), [two])
        self.assertTrue(one.pool.retired)


class ConcurrencyTests(unittest.TestCase):
    @staticmethod
    def backend_weight(cluster: ServerCluster, url: str) -> int:
        return next(b.weight for b in cluster.snapshot() if b.url == url)

    def test_acquire_done_racing_with_reconcile(self) -> None:
        """Threads acquire/done while another reconciles: every response counted, in-flight 0."""
        cluster = make_cluster("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003")
        self.addCleanup(cluster.close)
        workers, rounds, per_round = 6, 40, 10
        # A cyclic Barrier starts every round together: the workers' bursts
        # and one reconcile (alternately dropping and re-adding 9003) overlap.
        start = threading.Barrier(workers + 1)
        members: set[Backend] = set(cluster.snapshot())  # every Backend that ever was a member
        errors: list[BaseException] = []
        with_three = [parse_backend(t) for t in ("127.0.0.1:9001", "127.0.0.1:9002,weight=2",
                                                 "127.0.0.1:9003")]
        with_two = with_three[:2]

        def worker(index: int) -> None:
            try:
                for r in range(rounds):
                    start.wait(timeout=10)
                    for n in range(per_round):
                        attempt = cluster.acquire(f"client-{index}-{n}")
                        assert attempt is not None, "9001 and 9002 are always members"
                        if n % 3 == 0:
                            with attempt:
                                attempt.done(200, 0.001)
                        else:
                            attempt.done(200, 0.001)
                        assert attempt.backend.in_flight >= 0
            except BaseException as error:
                errors.append(error)
                start.abort()  # the others stop waiting for this thread

        def reloader() -> None:
            try:
                for r in range(rounds):
                    start.wait(timeout=10)
                    cluster.reconcile(with_two if r % 2 == 0 else with_three)
                    members.update(cluster.snapshot())
            except BaseException as error:
                errors.append(error)
                start.abort()  # the others stop waiting for this thread

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
        threads.append(threading.Thread(target=reloader))
        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        self.addCleanup(sys.setswitchinterval, switch)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        self.assertEqual(errors, [])
        self.assertFalse(any(thread.is_alive() for thread in threads))
        # 9001, 9002, the first 9003 and a new 9003 for each of the rounds // 2 re-adds.
        self.assertEqual(len(members), 3 + rounds // 2)
        total = workers * rounds * per_round
        self.assertEqual(sum(b.responses.get(200, 0) for b in members), total)
        self.assertEqual(sum(b.latency.count for b in members), total)
        self.assertEqual([b.in_flight for b in members], [0] * len(members))
        self.assertEqual(self.backend_weight(cluster, "http://127.0.0.1:9002"), 2)
        urls = [b.url for b in cluster.snapshot()]
        self.assertEqual(len(urls), len(set(urls)), "no URL is a member twice")


if __name__ == "__main__":
    unittest.main()

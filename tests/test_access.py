"""access.py: address lists, the real client behind trusted proxies, rates and token buckets.

Pure tests (no sockets); the clock is passed in.
"""

from __future__ import annotations

import inspect
import sys
import threading
import time
import unittest
from typing import Callable

from access import AddressList, Rate, RateLimiter, parse_rate, real_client


class AddressListTest(unittest.TestCase):
    LIST = AddressList(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1", "::ffff:198.51.100.0/120"],
                       "allow")

    def test_membership(self) -> None:
        cases = [
            ("10.0.0.1", True), ("10.255.255.255", True), ("11.0.0.0", False), ("9.255.255.255", False),
            ("192.0.2.7", True), ("192.0.2.8", False),
            ("2001:db8::1", True), ("2001:DB8:ffff::1", True), ("2001:db9::", False),
            ("::1", True), ("::2", False), ("0:0:0:0:0:0:0:1", True),
            # IPv4-mapped IPv6 peers match IPv4 entries, and mapped entries match IPv4 peers
            ("::ffff:10.0.0.1", True), ("::ffff:a00:1", True), ("::ffff:11.0.0.1", False),
            ("198.51.100.9", True), ("::ffff:198.51.100.9", True), ("198.51.101.9", False),
            # a zone on a peer address is ignored
            ("2001:db8::1%eth0", True),
            # not addresses: simply not in the list, never an exception
            ("", False), ("10.0.0.1 ", False), ("010.0.0.1", False), ("10.0.0", False),
            ("10.0.0.1/8", False), ("example.com", False), ("1.2.3.4:80", False), ("10.0.0.1\x00", False),
            ("10.0.0.é", False), (":::", False), ("unknown", False), (None, False), (167772161, False),
        ]
        for address, expected in cases:
            with self.subTest(address=address):
                self.assertIs(address in self.LIST, expected)

    def test_everything_and_nothing(self) -> None:
        everything = AddressList(["0.0.0.0/0", "::/0"], "allow")
        self.assertIn("1.2.3.4", everything)
        self.assertIn("2001:db8::1", everything)
        self.assertIn("::ffff:1.2.3.4", everything)
        only_v4 = AddressList(["0.0.0.0/0"], "allow")
        self.assertIn("::ffff:1.2.3.4", only_v4)
        self.assertNotIn("2001:db8::1", only_v4)
        only_v6 = AddressList(["::/0"], "allow")
        self.assertNotIn("1.2.3.4", only_v6)
        empty = AddressList([], "deny")
        self.assertFalse(empty)
        self.assertEqual(len(empty), 0)
        self.assertNotIn("1.2.3.4", empty)
        self.assertTrue(self.LIST)
        self.assertEqual(len(self.LIST), 5)

    def test_host_bits_mean_the_network(self) -> None:
        lst = AddressList(["10.1.2.3/8"], "allow")
        self.assertIn("10.200.0.1", lst)
        self.assertEqual(str(lst.networks[0]), "10.0.0.0/8")

    def test_bad_entries_name_the_key_and_the_entry(self) -> None:
        for entry in ["10.0.0.300/8", "10.0.0.0/33", "2001:db8::/129", "example.com", "", " 10.0.0.1",
                      "010.0.0.1", "fe80::1%eth0", "10.0.0.0/8/8", "10.0.0.0/-1", 10, None]:
            with self.subTest(entry=entry):
                with self.assertRaises(ValueError) as caught:
                    AddressList(["127.0.0.1", entry], "allow")  # type: ignore[list-item]
                self.assertEqual(str(caught.exception), f"allow: {entry!r} is not an address or CIDR")

    def test_a_string_is_not_a_list(self) -> None:
        with self.assertRaises(ValueError) as caught:
            AddressList("10.0.0.0/8", "deny")
        self.assertEqual(str(caught.exception), "deny: expected a list of addresses or CIDRs, got '10.0.0.0/8'")

    def test_equality_for_reload_comparisons(self) -> None:
        self.assertEqual(AddressList(["10.0.0.0/8"], "allow"), AddressList(["10.0.0.1/8"], "deny"))
        self.assertNotEqual(AddressList(["10.0.0.0/8"], "allow"), AddressList(["10.0.0.0/16"], "allow"))
        self.assertEqual(len({AddressList(["::1"], "a"), AddressList(["::1"], "b")}), 1)


class RealClientTest(unittest.TestCase):
    TRUSTED = AddressList(["10.0.0.0/8", "2001:db8::/32"], "trusted_proxies")

    def test_table(self) -> None:
        cases = [
            # (peer, X-Forwarded-For values, expected client, why)
            ("203.0.113.5", ["1.2.3.4"], "203.0.113.5", "untrusted peer: the header is ignored"),
            ("203.0.113.5", [], "203.0.113.5", "untrusted peer, no header"),
            ("10.0.0.2", [], "10.0.0.2", "trusted peer without a header is the client"),
            ("10.0.0.2", ["1.2.3.4"], "1.2.3.4", "one proxy"),
            ("10.0.0.2", ["6.6.6.6, 1.2.3.4"], "1.2.3.4", "the client's own left part is not believed"),
            ("10.0.0.2", ["6.6.6.6, 1.2.3.4, 10.9.9.9"], "1.2.3.4", "two trusted hops"),
            ("10.0.0.2", ["6.6.6.6", "1.2.3.4, 10.9.9.9"], "1.2.3.4", "several fields are one list"),
            ("10.0.0.2", ["6.6.6.6, 1.2.3.4", "10.9.9.9"], "1.2.3.4", "split across fields"),
            ("10.0.0.2", ["10.1.1.1, 10.9.9.9"], "10.1.1.1", "all trusted: the left-most"),
            ("10.0.0.2", ["10.1.1.1", "10.9.9.9"], "10.1.1.1", "all trusted over two fields"),
            ("10.0.0.2", ["1.2.3.4,10.9.9.9"], "1.2.3.4", "no space after the comma"),
            ("10.0.0.2", [" 1.2.3.4 ,\t10.9.9.9 "], "1.2.3.4", "optional whitespace"),
            ("10.0.0.2", ["6.6.6.6, unknown, 10.9.9.9"], "10.9.9.9", "malformed stops at the last good"),
            ("10.0.0.2", ["6.6.6.6, unknown"], "10.0.0.2", "malformed first: the peer"),
            ("10.0.0.2", [""], "10.0.0.2", "empty header: the peer"),
            ("10.0.0.2", ["6.6.6.6,, 10.9.9.9"], "10.9.9.9", "empty element stops the walk"),
            ("10.0.0.2", ["6.6.6.6, 10.9.9.9,"], "10.0.0.2", "trailing comma stops at once"),
            ("10.0.0.2", ["1.2.3.4", ""], "10.0.0.2", "an empty last field stops the walk"),
            ("10.0.0.2", ["01.2.3.4"], "10.0.0.2", "leading zeros are malformed"),
            ("10.0.0.2", ["2001:DB8:0::5, 2001:0DB9::1"], "2001:db9::1", "IPv6, canonical text"),
            ("2001:db8::7", ["1.2.3.4"], "1.2.3.4", "IPv6 trusted peer"),
            ("::ffff:10.0.0.2", ["1.2.3.4"], "1.2.3.4", "IPv4-mapped trusted peer"),
            ("10.0.0.2", ["::ffff:10.1.1.1, ::ffff:1.2.3.4"], "::ffff:1.2.3.4", "mapped elements"),
            ("10.0.0.2", ["1.2.3.4:5678"], "1.2.3.4", "IPv4 with a port"),
            ("10.0.0.2", ["[2001:db9::1]:443"], "2001:db9::1", "bracketed IPv6 with a port"),
            ("10.0.0.2", ["[2001:db9::1]"], "2001:db9::1", "bracketed IPv6"),
            ("10.0.0.2", ["1.2.3.4:x"], "10.0.0.2", "bad port"),
            ("10.0.0.2", ["[2001:db9::1]x"], "10.0.0.2", "junk after the bracket"),
            ("10.0.0.2", ["[1.2.3.4]"], "10.0.0.2", "brackets around IPv4"),
            ("10.0.0.2", ["2001:db9::1%eth0"], "10.0.0.2", "a zone in the header"),
            ("10.0.0.2", ["for=1.2.3.4"], "10.0.0.2", "Forwarded syntax is not X-Forwarded-For"),
            ("10.0.0.2", ["1.2.3.4\x00"], "10.0.0.2", "NUL"),
            ("not an address", ["1.2.3.4"], "not an address", "unparseable peer is returned as is"),
        ]
        for peer, values, expected, why in cases:
            with self.subTest(why, peer=peer, values=values):
                self.assertEqual(real_client(peer, values, self.TRUSTED), expected)

    def test_no_trusted_proxies_means_the_peer(self) -> None:
        self.assertEqual(real_client("10.0.0.2", ["1.2.3.4"], AddressList([], "trusted_proxies")), "10.0.0.2")

    def test_long_forged_header_walks_only_the_trusted_tail(self) -> None:
        forged = ", ".join(["garbage"] * 10_000 + ["1.2.3.4", "10.0.0.9"])
        self.assertEqual(real_client("10.0.0.2", [forged], self.TRUSTED), "1.2.3.4")


class ParseRateTest(unittest.TestCase):
    def test_good(self) -> None:
        cases = [
            ("20/s", None, Rate(20.0, 20.0)),
            ("1/s", None, Rate(1.0, 1.0)),
            ("0.5/s", None, Rate(0.5, 1.0)),  # at least one token
            ("120/m", None, Rate(2.0, 2.0)),
            ("30/m", None, Rate(0.5, 1.0)),
            ("20/s", 40, Rate(20.0, 40.0)),
            ("20/s", 1, Rate(20.0, 1.0)),
            ("1/m", 2.5, Rate(1 / 60, 2.5)),
        ]
        for text, burst, expected in cases:
            with self.subTest(text=text, burst=burst):
                self.assertEqual(parse_rate(text, burst), expected)

    def test_bad_text(self) -> None:
        for text in ["", "20", "20/h", "20/S", "/s", "-1/s", "0/s", "0.0/m", "1e3/s", "inf/s", "nan/s",
                     " 20/s", "20 /s", "20/s ", "1_000/s", "20/sec", ".5/s", "5./s", "9" * 400 + "/s", 20, None]:
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as caught:
                    parse_rate(text)  # type: ignore[arg-type]
                self.assertIn(repr(text), str(caught.exception))

    def test_bad_burst(self) -> None:
        for burst in [0, 0.5, -1, float("inf"), float("nan"), True, "40"]:
            with self.subTest(burst=burst):
                with self.assertRaises(ValueError) as caught:
                    parse_rate("20/s", burst)  # type: ignore[arg-type]
                self.assertIn("burst", str(caught.exception))

    def test_rate_checks_itself(self) -> None:
        for per_second, burst in [(0, 1), (-1, 1), (1, 0.5), (float("nan"), 1), (1, float("inf"))]:
            with self.subTest(per_second=per_second, burst=burst), self.assertRaises(ValueError):
                Rate(per_second, burst)


class RateLimiterTest(unittest.TestCase):
    def test_burst_then_refill(self) -> None:
        limiter = RateLimiter()
        rate = parse_rate("2/s", 3)
        key = ("api", "1.2.3.4")
        self.assertEqual([limiter.take(key, rate, 100.0) for _ in range(3)], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(limiter.take(key, rate, 100.0), 0.5)  # empty: one token in 1/2 s
        self.assertAlmostEqual(limiter.take(key, rate, 100.25), 0.25)  # half a token refilled
        self.assertEqual(limiter.take(key, rate, 100.5), 0.0)
        self.assertAlmostEqual(limiter.take(key, rate, 100.5), 0.5)
        # refill is capped at the burst
        self.assertEqual([limiter.take(key, rate, 1000.0) for _ in range(3)], [0.0, 0.0, 0.0])
        self.assertGreater(limiter.take(key, rate, 1000.0), 0.0)

    def test_keys_are_independent(self) -> None:
        limiter = RateLimiter()
        rate = parse_rate("1/m")
        self.assertEqual(limiter.take(("api", "a"), rate, 0.0), 0.0)
        self.assertAlmostEqual(limiter.take(("api", "a"), rate, 0.0), 60.0)
        self.assertEqual(limiter.take(("api", "b"), rate, 0.0), 0.0)
        self.assertEqual(limiter.take(("web", "a"), rate, 0.0), 0.0)
        self.assertAlmostEqual(limiter.take(("api", "a"), rate, 59.0), 1.0)
        self.assertEqual(limiter.take(("api", "a"), rate, 60.0), 0.0)

    def test_slow_rate_retry_after(self) -> None:
        limiter = RateLimiter()
        rate = parse_rate("30/m")  # burst 1, a token every 2 s
        self.assertEqual(limiter.take("k", rate, 10.0), 0.0)
        self.assertAlmostEqual(limiter.take("k", rate, 10.0), 2.0)
        self.assertAlmostEqual(limiter.take("k", rate, 11.5), 0.5)

    def test_clock_going_backwards_refills_nothing(self) -> None:
        limiter = RateLimiter()
        rate = parse_rate("1/s")
        self.assertEqual(limiter.take("k", rate, 50.0), 0.0)
        self.assertGreater(limiter.take("k", rate, 10.0), 0.0)
        self.assertAlmostEqual(limiter.take("k", rate, 50.5), 0.5)
        self.assertEqual(limiter.take("k", rate, 51.0), 0.0)

    def test_a_lower_burst_applies_at_once(self) -> None:
        limiter = RateLimiter()
        limiter.take("k", parse_rate("1/s", 100), 0.0)  # 99 tokens left
        small = parse_rate("1/s", 2)
        self.assertEqual([limiter.take("k", small, 0.0) for _ in range(2)], [0.0, 0.0])
        self.assertGreater(limiter.take("k", small, 0.0), 0.0)

    def test_denied_requests_do_not_spend(self) -> None:
        limiter = RateLimiter()
        rate = parse_rate("1/s")
        limiter.take("k", rate, 0.0)
        for _ in range(100):
            self.assertGreater(limiter.take("k", rate, 0.5), 0.0)
        self.assertEqual(limiter.take("k", rate, 1.0), 0.0)

    def test_memory_is_bounded(self) -> None:
        limiter = RateLimiter(max_keys=50)
        rate = parse_rate("1/m", 5)
        for i in range(1000):
            limiter.take(i, rate, 0.0)  # nobody's bucket is full again before t=240
            self.assertLessEqual(len(limiter), 50)
        self.assertEqual(len(limiter), 50)
        # the least recently used buckets went: key 949 is gone, key 999 is remembered
        self.assertEqual(limiter.take(999, rate, 0.0), 0.0)
        for _ in range(3):
            limiter.take(999, rate, 0.0)
        self.assertGreater(limiter.take(999, rate, 0.0), 0.0)

    def test_full_buckets_go_first(self) -> None:
        limiter = RateLimiter(max_keys=3)
        fast, slow = parse_rate("10/s"), parse_rate("1/m")
        limiter.take("old-slow", slow, 0.0)   # full again at t=60
        limiter.take("fast", fast, 0.0)       # full again at t=0.1
        limiter.take("new-slow", slow, 0.0)
        limiter.take("old-slow", slow, 0.5)   # now the least recently used is "fast", full by now
        limiter.take("fourth", slow, 1.0)
        self.assertEqual(len(limiter), 3)
        # "old-slow" and "new-slow" kept their (empty) buckets
        self.assertGreater(limiter.take("old-slow", slow, 1.0), 0.0)
        self.assertGreater(limiter.take("new-slow", slow, 1.0), 0.0)

    def test_full_buckets_are_swept_as_new_keys_arrive(self) -> None:
        limiter = RateLimiter(max_keys=1000)
        rate = parse_rate("10/s")
        for i in range(100):
            limiter.take(i, rate, 0.0)
        self.assertEqual(len(limiter), 100)
        for i in range(100, 200):  # every old bucket is full by t=10: each new key drops two
            limiter.take(i, rate, 10.0)
        self.assertEqual(len(limiter), 100)
        self.assertEqual(limiter.take(150, rate, 10.0), 0.0)

    def test_a_take_waits_for_another_in_its_read_modify_write(self) -> None:
        """Force the interleaving: A has read the bucket's last token and is paused before writing
        it back; B takes from the same bucket.  B must wait for A (RateLimiter._lock), so exactly
        one of them gets the token."""
        limiter = RateLimiter()
        plain = parse_rate("1/s", 1)
        limiter.take("k", plain, 0.0)  # empty now; at t=1 exactly one token is back
        lines, first = inspect.getsourcelines(RateLimiter.take)
        lock_line = first + next(i for i, line in enumerate(lines) if "with self._lock" in line)
        b_started, b_done = threading.Event(), threading.Event()
        results: dict[str, float] = {}
        threads: dict[str, threading.Thread] = {}

        def b_waits_at_the_lock() -> bool:
            frame = sys._current_frames().get(threads["b"].ident or 0)
            return frame is not None and frame.f_code is RateLimiter.take.__code__ \
                and frame.f_lineno == lock_line

        def pause_a() -> None:  # runs inside A's take, between reading and writing the tokens
            b_started.set()
            deadline = time.monotonic() + 5
            steady = 0
            while not b_done.is_set() and steady < 3:  # B finished (no lock) or B stays blocked
                steady = steady + 1 if b_waits_at_the_lock() else 0
                if time.monotonic() > deadline:
                    results["stuck"] = 1.0  # B neither finished nor waited at the lock
                    return
                time.sleep(0.001)

        hooked = _HookedRate(1.0, 1.0)
        object.__setattr__(hooked, "hook", pause_a)

        def run_a() -> None:
            results["a"] = limiter.take("k", hooked, 1.0)

        def run_b() -> None:
            if not b_started.wait(5):
                return  # the hook never ran
            results["b"] = limiter.take("k", plain, 1.0)
            b_done.set()

        threads["a"] = threading.Thread(target=run_a)
        threads["b"] = threading.Thread(target=run_b)
        for thread in threads.values():
            thread.start()
        for thread in threads.values():
            thread.join(10)
            self.assertFalse(thread.is_alive())
        self.assertTrue(b_started.is_set(), "the hook never ran: take() no longer reads rate.per_second "
                                            "between reading and writing the tokens; move the hook")
        self.assertNotIn("stuck", results)
        self.assertEqual(results["a"], 0.0)  # A read the token first and kept it
        self.assertGreater(results["b"], 0.0)  # B saw A's write, not the token A had already read

    def hammer(self, limiter: RateLimiter, rate: Rate, churn: bool) -> int:
        """8 threads take 300 tokens each from one key at a frozen clock; how many were granted."""
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as possible to interleave takes
        self.addCleanup(sys.setswitchinterval, old)
        start = threading.Barrier(8)
        granted = [0] * 8

        def worker(index: int) -> None:
            start.wait()
            for step in range(300):
                if limiter.take("shared", rate, 0.0) == 0.0:
                    granted[index] += 1
                if churn:  # new keys: eviction runs concurrently with the takes
                    limiter.take((index, step), rate, 0.0)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
            self.assertFalse(thread.is_alive())
        return sum(granted)

    def test_no_token_is_spent_twice_under_threads(self) -> None:
        # probabilistic: without RateLimiter._lock this fails most runs (a frozen clock: exactly
        # `burst` tokens may ever be granted)
        for _ in range(4):
            self.assertEqual(self.hammer(RateLimiter(), parse_rate("1/s", 600), churn=False), 600)

    def test_eviction_under_threads_stays_bounded(self) -> None:
        limiter = RateLimiter(max_keys=4)
        # "shared" may be evicted by the churn and come back full: at least one burst is granted
        self.assertGreaterEqual(self.hammer(limiter, parse_rate("1/s", 100), churn=True), 100)
        self.assertLessEqual(len(limiter), 4)

    def test_bad_max_keys(self) -> None:
        with self.assertRaises(ValueError):
            RateLimiter(max_keys=0)


class _HookedRate(Rate):
    """A Rate that calls ``hook`` (once) when ``take`` reads ``per_second``: in the middle of the
    bucket's read-modify-write (the refill reads the tokens, then the rate, then writes)."""

    hook: Callable[[], None] | None = None

    def __getattribute__(self, name: str) -> object:
        if name == "per_second":
            hook = object.__getattribute__(self, "hook")
            if hook is not None:
                object.__setattr__(self, "hook", None)
                hook()
        return object.__getattribute__(self, name)


if __name__ == "__main__":
    unittest.main()

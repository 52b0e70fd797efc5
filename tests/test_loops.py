"""Long-lived loops survive an unexpected exception in one round (loops.LoopGuard).

Each test injects a fault into one loop and checks that the loop logged it
once, at ERROR with a traceback, and kept working.  The health checker's
loop is covered in test_health_checkers, the access-log writer's in
test_loggers, the admin server's in test_admin.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import unittest
from unittest import mock

import cclb
import engine
import workers
from backend_urls import parse_backend
from cluster import ServerCluster
from loops import LoopGuard
from tests.support import wait_for


class LoopGuardTests(unittest.TestCase):

    def test_an_exception_is_logged_with_its_traceback_and_swallowed(self) -> None:
        guard = LoopGuard("test")
        with self.assertLogs("cclb", logging.ERROR) as logs:
            with guard:
                raise ValueError("boom")
        self.assertEqual(guard.failures, 1)
        self.assertIn("unexpected error in the test loop", logs.output[0])
        self.assertIn("Traceback", logs.output[0])
        self.assertIn("ValueError: boom", logs.output[0])

    def test_a_repeated_failure_is_logged_once_a_minute(self) -> None:
        guard = LoopGuard("test")
        clock = [1000.0]

        def one_round() -> None:
            with guard:
                raise ValueError("same fault")
        with mock.patch("loops.time.monotonic", lambda: clock[0]):
            with self.assertLogs("cclb", logging.ERROR) as logs:
                for _ in range(5):
                    one_round()
                clock[0] += 61
                one_round()
        self.assertEqual(guard.failures, 6)
        self.assertEqual(len(logs.output), 2, logs.output)
        self.assertIn("failed again", logs.output[1])
        self.assertNotIn("Traceback", logs.output[1])

    def test_a_request_to_stop_is_not_swallowed(self) -> None:
        for stop in (SystemExit(0), KeyboardInterrupt()):
            with self.subTest(stop=type(stop).__name__), self.assertRaises(type(stop)):
                with LoopGuard("test"):
                    raise stop


class ExpiringHandler:
    """Stands in for a ProxyHandler parked in the engine with a head deadline."""

    def __init__(self, fault: bool = False) -> None:
        self.fault = fault
        self.expired = threading.Event()
        self.closed = threading.Event()
        self.sock, self.peer = socket.socketpair()
        self.deadline = 0.0
        self.interest = engine.READ

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_ready(self, events: int) -> engine.Verdict:
        return engine.Verdict.WAIT

    def on_deadline(self) -> engine.Verdict:
        self.expired.set()
        if self.fault:
            raise OSError(9, "injected: bad file descriptor")
        return engine.Verdict.CLOSE

    def run(self) -> None:
        pass

    def close(self) -> None:
        self.sock.close()
        self.peer.close()
        self.closed.set()


class WatchdogTests(unittest.TestCase):
    """Head deadlines (slowloris defence): the engine's timer heap, which replaced proxy.Watchdog."""

    def test_a_fault_expiring_one_handler_spares_the_others_and_the_loop(self) -> None:
        timers = engine.Engine(1, name="test")
        faulty, other, later = ExpiringHandler(fault=True), ExpiringHandler(), ExpiringHandler()
        timers.park(faulty, 0.0)  # type: ignore[arg-type]
        timers.park(other, 0.0)  # type: ignore[arg-type]
        with self.assertLogs("cclb", logging.ERROR) as logs:
            timers.start()
            self.addCleanup(timers.stop, 5)
            self.assertTrue(other.expired.wait(5), "a fault in one expiry spared the next handler")
            timers.park(later, 0.0)  # type: ignore[arg-type]
            self.assertTrue(later.expired.wait(5), "the selector loop stopped after the fault")
        self.assertTrue(faulty.expired.is_set())
        self.assertTrue(faulty.closed.wait(5), "the faulty connection is closed")
        assert timers.selector_thread is not None
        self.assertTrue(timers.selector_thread.is_alive())
        self.assertIn("injected: bad file descriptor", "\n".join(logs.output))
        self.assertEqual(timers.timer_of, {})


class FakeProcess:
    """Stands in for a cclb role in ``cclb.serve``; its second tick fails."""

    def __init__(self) -> None:
        self.ticks = 0
        self.reloads = 0
        self.stopped = False
        self.enough_ticks = threading.Event()

    def start(self) -> None:
        pass

    def announce(self) -> None:
        pass

    def reload(self) -> None:
        self.reloads += 1
        raise RuntimeError("injected fault in reload")

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks == 2:
            os.kill(os.getpid(), signal.SIGHUP)  # the next round reloads, which fails too
            raise RuntimeError("injected fault in tick")
        if self.ticks == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    def stop(self) -> None:
        self.stopped = True


class MainLoopTests(unittest.TestCase):
    """The signal loop of ``cclb.serve`` (also the supervisor's loop: its tick is watch + merge)."""

    def setUp(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))

    def test_the_main_loop_survives_faults_in_tick_and_reload_then_stops_on_sigterm(self) -> None:
        process = FakeProcess()
        with mock.patch.object(cclb, "make_process", lambda *args: process):
            with self.assertLogs("cclb", logging.ERROR) as logs:
                code = cclb.serve(mock.Mock(), cclb.Role.SINGLE, [])
        self.assertEqual(code, 0)
        self.assertGreaterEqual(process.ticks, 5)
        self.assertEqual(process.reloads, 1)
        self.assertTrue(process.stopped)
        text = "\n".join(logs.output)
        self.assertEqual(text.count("RuntimeError: injected fault in tick"), 1, text)
        self.assertEqual(text.count("RuntimeError: injected fault in reload"), 1, text)


class SupervisorLinkTests(unittest.TestCase):
    """A worker's loop reading state snapshots from its supervisor."""

    def test_the_link_survives_a_fault_applying_one_snapshot(self) -> None:
        cluster = ServerCluster([parse_backend("127.0.0.1:9001")])
        read_fd, write_fd = os.pipe()
        self.addCleanup(os.close, read_fd)
        gone = threading.Event()
        link = threading.Thread(target=workers.follow_supervisor,
                                args=(cluster, read_fd, gone.set), daemon=True)
        real_apply = workers.apply_snapshot
        calls: list[int] = []

        def apply_failing_once(target: ServerCluster, rows: list) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise KeyError("injected fault applying a snapshot")
            real_apply(target, rows)
        with mock.patch.object(workers, "apply_snapshot", apply_failing_once), \
                self.assertLogs("cclb", logging.ERROR) as logs:
            link.start()
            os.write(write_fd, workers.encode_snapshot([["http://127.0.0.1:9001", 1, "down", "ready"]]))
            os.write(write_fd, workers.encode_snapshot([["http://127.0.0.1:9002", 3, "up", "drain"]]))
            wait_for(lambda: [b.url for b in cluster.snapshot()] == ["http://127.0.0.1:9002"], 5,
                     message="the second snapshot to be applied")
            os.close(write_fd)  # the supervisor goes away: the worker is told to stop
            self.assertTrue(gone.wait(5))
        link.join(5)
        (row,) = cluster.stats().backends
        self.assertEqual((row.weight, row.admin_state), (3, "drain"))
        self.assertIn("KeyError: 'injected fault applying a snapshot'", "\n".join(logs.output))


if __name__ == "__main__":
    unittest.main()

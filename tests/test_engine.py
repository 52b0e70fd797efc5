"""The connection engine (engine.py): parking, complete-head hand-over, deadlines, FIFO order.

Unit tests over socket pairs with a toy connection (``HeadConnection``)
that reads an HTTP-like head the way ``proxy.ProxyHandler`` does; the
proxy's own use of the engine is covered end to end by the rest of the
suite (test_proxy, test_hardening, test_forwarding, test_tls, ...).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import unittest

import engine
from engine import EOF, NOTHING, READ, Engine, Verdict, head_ready, receive
from tests.support import wait_for


class HeadConnection:
    """A parked connection that is ready once a whole head (``head_ready``) is buffered."""

    def __init__(self, sock: socket.socket, eng: Engine, deadline: float = 60.0,
                 on_run: object = None) -> None:
        self.sock = sock
        self.engine = eng
        self.buffer = bytearray()
        self.deadline = time.monotonic() + deadline
        self.interest = READ
        self.lock = threading.Lock()
        self.readies = 0  # on_ready calls; guarded by lock
        self.runs: list[tuple[bytes, str]] = []  # (buffer when run, thread name); guarded by lock
        self.expired = threading.Event()
        self.closed = threading.Event()
        self.ran = threading.Event()
        self.on_run = on_run

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_ready(self, events: int) -> Verdict:
        with self.lock:
            self.readies += 1
        got, self.interest = receive(self.sock, self.buffer)
        if got == EOF:
            return Verdict.CLOSE
        if head_ready(self.buffer, 100, 1000):
            return Verdict.RUN
        return Verdict.WAIT

    def on_deadline(self) -> Verdict:
        self.expired.set()
        return Verdict.CLOSE

    def run(self) -> None:
        with self.lock:
            self.runs.append((bytes(self.buffer), threading.current_thread().name))
        if callable(self.on_run):
            self.on_run(self)
        self.ran.set()

    def close(self) -> None:
        self.sock.close()
        self.closed.set()


class EngineCase(unittest.TestCase):
    threads = 4

    def setUp(self) -> None:
        self.engine = Engine(self.threads, name="test")
        self.engine.start()
        self.addCleanup(self.engine.stop, 5)

    def pair(self, **options: object) -> tuple[HeadConnection, socket.socket]:
        """A parked server side and its client socket."""
        server, client = socket.socketpair()
        self.addCleanup(client.close)
        self.addCleanup(server.close)
        connection = HeadConnection(server, self.engine, **options)  # type: ignore[arg-type]
        self.engine.park(connection)
        return connection, client


class ParkingTests(EngineCase):

    def test_a_complete_head_runs_on_a_pool_thread(self) -> None:
        connection, client = self.pair()
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(connection.ran.wait(5))
        ((buffered, thread),) = connection.runs
        self.assertEqual(buffered, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(thread, "test-pool")

    def test_a_head_dribbled_a_byte_at_a_time_is_handed_over_once_whole(self) -> None:
        connection, client = self.pair()
        head = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
        for index in range(len(head) - 1):
            client.sendall(head[index:index + 1])
            wait_for(lambda: connection.readies > index or connection.runs, 5,
                     message="the selector to read the byte")
            self.assertEqual(connection.runs, [], f"handed over after {index + 1} bytes")
        client.sendall(head[-1:])
        self.assertTrue(connection.ran.wait(5))
        self.assertEqual(connection.runs[0][0], head)

    def test_parked_connections_cost_no_thread(self) -> None:
        before = threading.active_count()
        pairs = [self.pair() for _ in range(300)]
        for connection, client in pairs[::10]:
            client.sendall(b"GET / HT")  # half a head: still parked
        time.sleep(0.2)
        self.assertEqual(threading.active_count(), before)
        self.assertEqual(self.engine.threads, self.threads)
        self.assertTrue(all(not connection.runs for connection, _ in pairs))

    def test_a_connection_parked_again_is_woken_again(self) -> None:
        """What a keep-alive connection does: served, parked, served (registered once)."""
        def again(connection: HeadConnection) -> None:
            if len(connection.runs) == 1:
                connection.buffer.clear()
                connection.ran.clear()
                self.engine.park(connection, time.monotonic() + 60)

        connection, client = self.pair(on_run=again)
        client.sendall(b"GET /1 HTTP/1.1\r\n\r\n")
        wait_for(lambda: len(connection.runs) == 1, 5, message="the first run")
        client.sendall(b"GET /2 HTTP/1.1\r\n\r\n")
        wait_for(lambda: len(connection.runs) == 2, 5, message="the second run")
        self.assertEqual(connection.runs[1][0], b"GET /2 HTTP/1.1\r\n\r\n")

    def test_the_client_closing_closes_a_parked_connection(self) -> None:
        connection, client = self.pair()
        client.close()
        self.assertTrue(connection.closed.wait(5))
        self.assertEqual(connection.runs, [])

    def test_a_fault_in_one_connection_closes_it_and_spares_the_loop(self) -> None:
        faulty, faulty_client = self.pair()
        faulty.on_ready = lambda events: 1 / 0  # type: ignore[assignment,method-assign]
        with self.assertLogs("cclb", logging.ERROR) as logs:
            faulty_client.sendall(b"x")
            self.assertTrue(faulty.closed.wait(5))
        self.assertIn("ZeroDivisionError", "\n".join(logs.output))
        healthy, client = self.pair()
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(healthy.ran.wait(5))

    def test_stop_closes_parked_connections(self) -> None:
        connection, _ = self.pair()
        self.engine.stop(5)
        self.assertTrue(connection.closed.wait(5))
        late, peer = socket.socketpair()
        self.addCleanup(late.close)
        self.addCleanup(peer.close)
        parked_late = HeadConnection(late, self.engine)
        self.engine.park(parked_late)  # after the stop: closed at once
        self.assertTrue(parked_late.closed.is_set())


class DeadlineTests(EngineCase):

    def test_a_deadline_expires_the_connection_and_not_before(self) -> None:
        started = time.monotonic()
        connection, _ = self.pair(deadline=0.3)
        self.assertTrue(connection.expired.wait(5))
        self.assertGreaterEqual(time.monotonic() - started, 0.29)
        self.assertTrue(connection.closed.is_set())

    def test_deadlines_expire_in_their_order_whatever_the_order_of_parking(self) -> None:
        order: list[int] = []
        lock = threading.Lock()
        connections = []
        for number, delay in enumerate([0.5, 0.1, 0.3, 0.2, 0.4]):
            connection, _ = self.pair(deadline=delay)
            connection.on_deadline = (lambda n=number: (lock.acquire(), order.append(n), lock.release(),  # type: ignore[method-assign]
                                                        Verdict.CLOSE)[-1])
            connections.append(connection)
        wait_for(lambda: len(order) == 5, 5, message="every deadline")
        self.assertEqual(order, [1, 3, 2, 4, 0])

    def test_parking_again_replaces_the_deadline(self) -> None:
        connection, _ = self.pair(deadline=0.2)
        self.engine.park(connection, time.monotonic() + 60)  # a later deadline replaces it
        time.sleep(0.5)
        self.assertFalse(connection.expired.is_set())
        self.engine.park(connection, time.monotonic() + 0.1)  # and an earlier one wakes the selector
        self.assertTrue(connection.expired.wait(2))

    def test_a_woken_connection_has_no_deadline_left(self) -> None:
        connection, client = self.pair(deadline=0.3)
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(connection.ran.wait(5))
        time.sleep(0.5)
        self.assertFalse(connection.expired.is_set())
        self.assertEqual(self.engine.timer_of, {})

    def test_stale_timers_do_not_pile_up(self) -> None:
        connection, _ = self.pair()
        for _ in range(5000):
            self.engine.park(connection, time.monotonic() + 60)
        with self.engine.lock:
            self.assertLess(len(self.engine.timers), 2100)
            self.assertEqual(len(self.engine.timer_of), 1)


class FifoTests(EngineCase):
    threads = 1

    def test_waiting_connections_are_served_first_come_first_served(self) -> None:
        release = threading.Event()
        order: list[int] = []
        blocker, client = self.pair(on_run=lambda c: release.wait(10))
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        wait_for(lambda: blocker.runs, 5, message="the pool thread to be busy")
        waiting = []
        for number in range(6):
            connection, client = self.pair(on_run=lambda c, n=number: order.append(n))
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            wait_for(lambda: self.engine.queue_length() == number + 1, 5, message="the queue to grow")
            waiting.append(connection)
        release.set()
        wait_for(lambda: len(order) == 6, 5, message="the queue to be served")
        self.assertEqual(order, list(range(6)))
        counts, total, count, busy = self.engine.stats.snapshot()
        self.assertEqual(count, 7)
        self.assertEqual(sum(counts), 7)
        self.assertGreater(total, 0)

    def test_resize_grows_and_shrinks_the_pool(self) -> None:
        self.engine.resize(5)
        wait_for(lambda: self.engine.threads == 5, 5, message="five pool threads")
        self.engine.resize(2)
        wait_for(lambda: self.engine.threads == 2, 5, message="two pool threads")
        connection, client = self.pair()
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(connection.ran.wait(5))


class FallbackTests(unittest.TestCase):
    """Without epoll, arming goes through the selector thread; the behaviour is the same."""

    def test_parking_and_deadlines_without_epoll(self) -> None:
        eng = Engine(2, name="fallback", use_epoll=False)
        eng.start()
        self.addCleanup(eng.stop, 5)
        server, client = socket.socketpair()
        self.addCleanup(server.close)
        self.addCleanup(client.close)
        connection = HeadConnection(server, eng)
        eng.park(connection)
        client.sendall(b"GET / HTTP/1.1\r\n")
        client.sendall(b"\r\n")
        self.assertTrue(connection.ran.wait(5))
        other, _peer = socket.socketpair()
        self.addCleanup(other.close)
        self.addCleanup(_peer.close)
        late = HeadConnection(other, eng, deadline=0.2)
        eng.park(late)
        self.assertTrue(late.expired.wait(5))


class HeadReadyTests(unittest.TestCase):

    def test_complete_and_incomplete_heads(self) -> None:
        cases = [
            (b"", False),
            (b"GET / HTTP/1.1", False),
            (b"GET / HTTP/1.1\r\n", False),
            (b"GET / HTTP/1.1\r\nHost: x\r\n", False),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
            (b"GET / HTTP/1.0\r\n\r\n", True),
            (b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", True),  # one empty line first is skipped
            (b"\r\nGET / HTTP/1.1\r\n", False),
            (b"GET / HTTP/1.1\nHost: x\n", True),  # bare LF: the parser refuses it now
            (b"x" * 102, False),
            (b"x" * 103, True),  # request line over the limit: 414 without waiting
            (b"GET / HTTP/1.1\r\n" + b"a: b\r\n" * 200, True),  # header section over the limit: 431
        ]
        for data, expected in cases:
            with self.subTest(data=data[:40]):
                self.assertEqual(head_ready(data, 100, 1000), expected)


class ReceiveTests(unittest.TestCase):

    def test_nothing_data_and_end_of_stream(self) -> None:
        server, client = socket.socketpair()
        self.addCleanup(server.close)
        self.addCleanup(client.close)
        buffer = bytearray()
        self.assertEqual(receive(server, buffer), (NOTHING, READ))
        self.assertTrue(server.getblocking(), "a plain socket stays in blocking mode")
        client.sendall(b"abc")
        self.assertEqual(receive(server, buffer), (3, READ))
        client.close()
        self.assertEqual(receive(server, buffer), (EOF, READ))
        self.assertEqual(buffer, b"abc")


class FdLimitTests(unittest.TestCase):

    def test_the_soft_limit_is_raised_within_the_hard_one(self) -> None:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        lowered = min(soft, 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        before, now, reported_hard = engine.raise_fd_limit(lowered + 100)
        self.assertEqual((before, reported_hard), (lowered, hard))
        self.assertEqual(now, lowered + 100 if hard == resource.RLIM_INFINITY or hard >= lowered + 100 else hard)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], now)


if __name__ == "__main__":
    unittest.main()

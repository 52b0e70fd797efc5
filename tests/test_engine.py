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
from pathlib import Path
from unittest import mock

import engine
from engine import EOF, NOTHING, READ, Engine, Verdict, head_ready, receive
from tests.support import (Balancer, DemoServer, RawBackend, collect_until_close, connect, get,
                           http_exchange, parse_responses, post, process_threads, read_response,
                           send_and_collect, wait_admin_port, wait_for)


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
        before = set(threading.enumerate())
        pairs = [self.pair() for _ in range(300)]
        for connection, client in pairs[::10]:
            client.sendall(b"GET / HT")  # half a head: still parked
        time.sleep(0.2)
        # No thread started (threads of earlier tests in this process may have ended since).
        self.assertEqual(set(threading.enumerate()) - before, set())
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
        self.assertTrue(connection.closed.wait(5))

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


class AdaptiveLimitTests(unittest.TestCase):
    """How many pool threads serve at once: more while requests wait and CPU is spare, fewer while CPU-bound."""

    def step(self, eng: Engine, used: float, waits: list[float]) -> int:
        for waited in waits:
            eng.stats.observe(waited)
            eng.stats.done()
        eng.cpu_mark, eng.adapted_at = 0.0, 0.0
        with mock.patch.object(engine.time, "process_time", return_value=used):
            eng.adapt(1.0)  # one second, ``used`` CPU seconds
        return eng.thread_limit()

    def test_the_limit_follows_the_load(self) -> None:
        eng = Engine(64, name="adaptive")
        self.addCleanup(eng.stop)
        self.assertEqual(eng.thread_limit(), 16)
        slow_backend = [0.02] * 10  # requests waited 20 ms, the process mostly idle
        self.assertEqual(self.step(eng, 0.2, slow_backend), 32)
        self.assertEqual(self.step(eng, 0.2, slow_backend), 64)
        self.assertEqual(self.step(eng, 0.2, slow_backend), 64)  # --threads caps it
        self.assertEqual(self.step(eng, 0.5, []), 64)  # calm: unchanged
        self.assertEqual(self.step(eng, 0.5, [0.001] * 10), 64)  # short waits: unchanged
        self.assertEqual(self.step(eng, 1.0, slow_backend), 56)  # CPU-bound: an eighth fewer
        for _ in range(20):
            limit = self.step(eng, 1.0, slow_backend)
        self.assertEqual(limit, 16)  # never below min(16, --threads)

    def test_a_small_pool_serves_with_all_its_threads(self) -> None:
        eng = Engine(4, name="small")
        self.addCleanup(eng.stop)
        self.assertEqual(eng.thread_limit(), 4)
        self.assertEqual(self.step(eng, 1.0, [0.02]), 4)

    def test_a_fixed_pool_does_not_adapt(self) -> None:
        eng = Engine(64, name="fixed", adaptive=False)
        self.addCleanup(eng.stop)
        self.assertEqual(eng.thread_limit(), 64)
        self.assertEqual(self.step(eng, 1.0, [0.02]), 64)

    def test_threads_over_the_limit_wait_and_serve_once_it_rises(self) -> None:
        eng = Engine(8, name="gate", adaptive=False)
        self.addCleanup(eng.stop, 5)
        with eng.slots:
            eng.limit = 1
        eng.start()
        release = threading.Event()
        running: list[str] = []
        lock = threading.Lock()

        def hold(connection: HeadConnection) -> None:
            with lock:
                running.append(threading.current_thread().name)
            release.wait(10)

        pairs = []
        for _ in range(3):
            server, client = socket.socketpair()
            self.addCleanup(server.close)
            self.addCleanup(client.close)
            connection = HeadConnection(server, eng, on_run=hold)
            eng.park(connection)
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            pairs.append(connection)
        wait_for(lambda: len(running) == 1 and eng.queue_length() == 2, 5, message="one served, two queued")
        with eng.slots:
            eng.limit = 3
            eng.slots.notify_all()
        wait_for(lambda: len(running) == 3, 5, message="all three served")
        release.set()


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


# --- end to end: cclb.py on the engine ----------------------------------------------------

CERTS = Path(__file__).resolve().parent / "certs"


def scrape_metrics(admin_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from tests.test_metrics import parse_exposition
    with socket.create_connection(("127.0.0.1", admin_port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = collect_until_close(sock)[0]
    _, samples = parse_exposition(data.partition(b"\r\n\r\n")[2].decode())
    return {(name, tuple(sorted(labels.items()))): value for name, labels, value in samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def websocket_open(port: int) -> tuple[socket.socket, bytes]:
    """A WebSocket handshake through cclb to server.py's /ws; (socket, response head)."""
    import websocket
    sock = connect(port)
    sock.sendall(("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  f"Sec-WebSocket-Key: {websocket.new_key()}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            break
        head += data
    return sock, head


class EngineEndToEndTests(unittest.TestCase):
    """cclb.py with one handler thread: what waits (slow, idle, tunnels) holds none of it."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.demo = DemoServer()
        cls.addClassCleanup(cls.demo.stop)
        cls.balancer = Balancer([cls.demo.port], "--health-interval", "0", "--access-log", "off",
                                "--threads", "1", "--admin-port", "0", "--header-timeout", "30",
                                "--body-timeout", "30")
        cls.addClassCleanup(cls.balancer.stop)
        cls.admin = wait_admin_port(cls.balancer)

    def tearDown(self) -> None:
        self.assertNotIn("Traceback", self.balancer.log_text())

    def open(self) -> socket.socket:
        sock = connect(self.balancer.port)
        self.addCleanup(sock.close)
        return sock

    def settled_threads(self) -> int:
        """The balancer's thread count once it stops changing (after a warm-up request)."""
        self.quick_get("warm-up")
        counts: list[int] = []

        def stable() -> bool:
            counts.append(process_threads(self.balancer.pid))
            return len(counts) >= 5 and len(set(counts[-5:])) == 1
        wait_for(stable, 10, interval=0.05, message="the thread count to settle")
        return counts[-1]

    def quick_get(self, path: str) -> None:
        started = time.monotonic()
        response = http_exchange(self.balancer.port, get(f"/users?{path}", "Connection: close"), timeout=5)
        self.assertEqual(response.status, 200)
        self.assertLess(time.monotonic() - started, 2.0, f"{path} waited behind slow clients")

    def test_slow_heads_slow_bodies_and_tunnels_leave_the_one_thread_free(self) -> None:
        pid = self.balancer.pid
        threads_before = self.settled_threads()
        slow = []
        for number in range(20):  # slowloris: heads that never end
            sock = self.open()
            sock.sendall(f"GET /slow/{number} HTTP/1.1\r\nHost: x\r\n".encode())
            slow.append(sock)
        for number in range(10):  # slow bodies that cclb buffers anyway (100 bytes declared, 10 sent)
            sock = self.open()
            sock.sendall(post(f"/echo?n={number}", b"x" * 100)[:-90])
            slow.append(sock)
        tunnels = []
        for _ in range(2):
            sock, head = websocket_open(self.balancer.port)
            self.addCleanup(sock.close)
            self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
            tunnels.append(sock)
        for number in range(10):
            self.quick_get(f"n={number}")
        # One thread per tunnel; none for the 30 slow clients.
        self.assertLessEqual(process_threads(pid), threads_before + len(tunnels) + 1)
        samples = scrape_metrics(self.admin)
        self.assertGreaterEqual(metric(samples, "cclb_parked_connections"), 30)
        self.assertEqual(metric(samples, "cclb_handler_threads", state="busy")
                         + metric(samples, "cclb_handler_threads", state="idle"), 1)
        # The slow bodies, once complete, are served.
        slow[-1].sendall(b"x" * 90)
        with slow[-1].makefile("rb") as reader:
            self.assertEqual(read_response(reader).status, 200)

    def test_idle_keepalive_connections_hold_no_thread(self) -> None:
        pid = self.balancer.pid
        threads_before = self.settled_threads()
        idle = []
        for number in range(200):
            sock = self.open()
            sock.sendall(get(f"/users?idle={number}"))
            idle.append(sock)
        for sock in idle:
            with sock.makefile("rb") as reader:
                self.assertEqual(read_response(reader).status, 200)
        self.assertLessEqual(process_threads(pid), threads_before + 1)
        wait_for(lambda: metric(scrape_metrics(self.admin), "cclb_parked_connections") >= 200, 5,
                 message="200 parked connections")
        self.quick_get("after-idle")

    def test_queue_metrics(self) -> None:
        before = metric(scrape_metrics(self.admin), "cclb_handler_queue_wait_seconds_count")
        for number in range(5):
            self.quick_get(f"q={number}")
        samples = scrape_metrics(self.admin)
        self.assertGreaterEqual(metric(samples, "cclb_handler_queue_wait_seconds_count"), before + 5)
        self.assertIn(("cclb_handler_queue_length", ()), samples)
        self.assertGreaterEqual(metric(samples, "cclb_handler_queue_wait_seconds_bucket", le="+Inf"),
                                before + 5)


class PerAddressLimitTests(unittest.TestCase):

    def test_one_address_over_its_share_gets_a_fast_503(self) -> None:
        demo = DemoServer()
        self.addCleanup(demo.stop)
        balancer = Balancer([demo.port], "--health-interval", "0", "--access-log", "off",
                            "--max-connections-per-ip", "2", "--admin-port", "0")
        self.addCleanup(balancer.stop)
        admin = wait_admin_port(balancer)
        held = [connect(balancer.port) for _ in range(2)]
        for sock in held:
            self.addCleanup(sock.close)
            sock.sendall(get("/users"))
            with sock.makefile("rb") as reader:
                self.assertEqual(read_response(reader).status, 200)
        raw, closed = send_and_collect(balancer.port, get("/third"), timeout=5)
        answer = parse_responses(raw)[0]
        self.assertEqual(answer.status, 503)
        self.assertEqual(answer.header("Retry-After"), "1")
        self.assertTrue(closed)
        wait_for(lambda: metric(scrape_metrics(admin), "cclb_rejected_total",
                                reason="max_connections_per_ip") == 1, 5, message="the refusal counted")
        held[0].close()
        wait_for(lambda: send_and_collect(balancer.port, get("/users?later", "Connection: close"))[0]
                 .startswith(b"HTTP/1.1 200 "), 5, message="room for the address again")


class MinBodyRateTests(unittest.TestCase):

    def test_a_streamed_body_slower_than_the_floor_gets_408(self) -> None:
        backend = RawBackend()
        self.addCleanup(backend.stop)
        balancer = Balancer([backend.port], "--health-interval", "0", "--access-log", "off",
                            "--min-body-rate", "100000", "--body-timeout", "1")
        self.addCleanup(balancer.stop)
        body = 400_000  # over the 256 KiB cclb buffers: streamed, holding a handler thread
        sock = connect(balancer.port)
        self.addCleanup(sock.close)
        sock.sendall(f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {body}\r\n\r\n".encode())
        started = time.monotonic()
        sent = 0
        sock.settimeout(0.1)
        answer = b""
        while time.monotonic() - started < 5 and sent < body:
            try:  # 20 KB/s: never silent, but a fifth of the floor
                sock.sendall(b"x" * 2000)
                sent += 2000
            except OSError:
                break
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            answer += data
            if not data or b"\r\n\r\n" in answer:
                break
        elapsed = time.monotonic() - started
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer[:200])
        self.assertLess(elapsed, 4.0)
        self.assertLess(sent, body)
        # A body at full speed is not affected.
        data = post("/fast", b"y" * body)
        raw, _ = send_and_collect(balancer.port, data, timeout=10)
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:200])
        self.assertNotIn("Traceback", balancer.log_text())


class ParkedHandshakeTests(unittest.TestCase):

    def test_stalled_tls_handshakes_do_not_block_the_one_thread(self) -> None:
        demo = DemoServer()
        self.addCleanup(demo.stop)
        balancer = Balancer([demo.port], "--health-interval", "0", "--access-log", "off",
                            "--threads", "1", "--tls-cert", str(CERTS / "localhost.pem"))
        self.addCleanup(balancer.stop)
        stalled = [connect(balancer.port) for _ in range(5)]  # TCP only: no ClientHello
        for sock in stalled:
            self.addCleanup(sock.close)
        half = connect(balancer.port)
        self.addCleanup(half.close)
        half.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        import tls
        context = tls.client_context(str(CERTS / "ca.pem"))
        for _ in range(3):
            started = time.monotonic()
            with context.wrap_socket(connect(balancer.port), server_hostname="localhost") as client:
                client.sendall(get("/users", "Connection: close"))
                with client.makefile("rb") as reader:
                    self.assertEqual(read_response(reader).status, 200)
            self.assertLess(time.monotonic() - started, 2.0)
        self.assertNotIn("Traceback", balancer.log_text())


class ParkedProxyHeaderTests(unittest.TestCase):
    """--proxy-protocol: the header is read by the selector thread, before TLS; slow ones hold no thread."""

    def start(self, *extra: str) -> Balancer:
        demo = DemoServer()
        self.addCleanup(demo.stop)
        balancer = Balancer([demo.port], "--health-interval", "0", "--access-log", "off", "--threads", "1",
                            "--proxy-protocol", "--trusted-proxy", "127.0.0.1", "--header-timeout", "30",
                            *extra)
        self.addCleanup(balancer.stop)
        return balancer

    def stall(self, port: int) -> None:
        for data in (b"", b"PROXY TCP4 203.0.113.5 ", b"\r\n\r\n\x00\r\nQU"):  # nothing, half v1, half v2
            sock = connect(port)
            self.addCleanup(sock.close)
            if data:
                sock.sendall(data)

    def test_plain(self) -> None:
        balancer = self.start()
        self.stall(balancer.port)
        sock = connect(balancer.port)
        self.addCleanup(sock.close)
        sock.sendall(b"PROXY TCP4 203.0.113.5 10.0.0.1 5555 80\r\n")
        time.sleep(0.1)  # the header and the request in two segments
        sock.sendall(post("/echo", b"{}", "Connection: close"))
        raw, _ = collect_until_close(sock, 5)
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:200])
        self.assertIn(b"203.0.113.5", raw)  # the header's source, in X-Forwarded-For
        self.assertNotIn("Traceback", balancer.log_text())

    def test_over_tls(self) -> None:
        balancer = self.start("--tls-cert", str(CERTS / "localhost.pem"))
        self.stall(balancer.port)
        import tls
        context = tls.client_context(str(CERTS / "ca.pem"))
        raw_sock = connect(balancer.port)
        raw_sock.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n")
        with context.wrap_socket(raw_sock, server_hostname="localhost") as client:
            client.sendall(post("/echo", b"{}", "Connection: close"))
            with client.makefile("rb") as reader:
                response = read_response(reader, "POST")
        self.assertEqual(response.status, 200)
        self.assertIn(b"203.0.113.7", response.body)
        self.assertNotIn("Traceback", balancer.log_text())


if __name__ == "__main__":
    unittest.main()

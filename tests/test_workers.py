"""``--workers N``: worker processes sharing the port under one supervisor that
restarts them, checks health once for all of them, forwards SIGHUP and stops
them on SIGTERM.  Real processes, real sockets.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import unittest

from tests.support import (ROOT, Balancer, DemoServer, RawBackend, accepts, admin_call, admin_status,
                           child_pids, cluster_view, free_port, http_request, process_gone,
                           read_body, read_head, served_by, wait_admin_port, wait_for)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import websocket  # noqa: E402
import workers  # noqa: E402
import metrics  # noqa: E402
from metrics import EngineNumbers, FrontendCounters, FrontendMetrics, Histogram, TrafficCounters, TunnelMetrics  # noqa: E402
from workers import SnapshotReader, decode_snapshot, encode_snapshot, write_snapshot  # noqa: E402
from backend_urls import parse_backend  # noqa: E402
from cluster import MAINT, READY, ServerCluster  # noqa: E402


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def socket_owners(clients: list[socket.socket], pids: set[int]) -> list[int | None]:
    """For each connected ``client``, which of ``pids`` holds the server end (or None)."""
    server_port = clients[0].getpeername()[1]
    wanted = {client.getsockname()[1] for client in clients}
    inodes: dict[int, str] = {}  # client port -> inode of the server-side socket
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local_port = int(fields[1].rpartition(":")[2], 16)
            remote_port = int(fields[2].rpartition(":")[2], 16)
            if local_port == server_port and remote_port in wanted:
                inodes[remote_port] = fields[9]
    holder: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                holder[link[8:-1]] = pid
    return [holder.get(inodes.get(client.getsockname()[1], ""), None) for client in clients]


def open_served(port: int, count: int, owner: unittest.TestCase) -> list[socket.socket]:
    """``count`` keep-alive connections, each having had one request answered 200."""
    clients = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        owner.addCleanup(client.close)
        client.sendall(b"GET /owner HTTP/1.1\r\nHost: x\r\n\r\n")
        owner.assertTrue(client.recv(65536).startswith(b"HTTP/1.1 200"))
        clients.append(client)
    return clients


class Backend:
    """An in-process backend named ``name``: 200 to everything, X-Backend-Server: name.

    The health path answers ``health_status`` (changeable) and every check's
    arrival time is recorded; other requests are counted in ``targets``.
    """

    def __init__(self, name: str, health_path: str = "/healthz") -> None:
        self.name = name
        self.health_path = health_path
        self.health_status = 200
        self.lock = threading.Lock()
        self.targets: list[str] = []
        self.health_times: list[float] = []
        self.health_answered: list[tuple[float, int]] = []  # (time, status) after sending
        self.raw = RawBackend(self.respond)
        self.port = self.raw.port
        self.url = f"http://127.0.0.1:{self.port}"

    def respond(self, head: bytes, conn: socket.socket, reader) -> bool:
        read_body(head, reader)
        target = head.split(b" ", 2)[1].decode("latin-1")
        status = 200
        health = target.partition("?")[0] == self.health_path
        with self.lock:
            if health:
                self.health_times.append(time.monotonic())
                status = self.health_status
            else:
                self.targets.append(target)
        body = json.dumps({"name": self.name}).encode()
        conn.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nX-Backend-Server: %s\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (status, self.name.encode(), len(body), body))
        if health:
            with self.lock:
                self.health_answered.append((time.monotonic(), status))
        return True

    def count(self) -> int:
        with self.lock:
            return len(self.targets)

    def checks(self) -> int:
        with self.lock:
            return len(self.health_times)


def toml_backends(*backends: Backend) -> str:
    return "".join(f'[[backends]]\nurl = "{b.url}"\n' for b in backends)


class WorkersCase(unittest.TestCase):

    def backend(self, name: str) -> Backend:
        backend = Backend(name)
        self.addCleanup(backend.raw.stop)
        return backend

    def start(self, backends, *extra: str, workers: int = 2) -> Balancer:
        balancer = Balancer([b.url if isinstance(b, Backend) else b for b in backends],
                            "--workers", str(workers), *extra, ready_timeout=20)
        self.addCleanup(self.kill_all, balancer)
        return balancer

    @staticmethod
    def kill_all(balancer: Balancer) -> None:
        """SIGKILL the supervisor, then its workers (by pid); wait until all are gone."""
        workers = child_pids(balancer.pid) if balancer.proc.poll() is None else set()
        balancer.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in workers:
            wait_for(lambda: process_gone(pid), 5, message=f"worker {pid} to exit")

    def workers_of(self, balancer: Balancer, count: int = 2) -> set[int]:
        """The supervisor's worker pids, once there are exactly ``count`` running cclb.py."""
        return wait_for(lambda: (lambda pids: pids if len(pids) == count and all(
            "cclb.py" in cmdline(pid) for pid in pids) else None)(child_pids(balancer.pid)),
            10, message=f"{count} worker processes")

    def spread_requests(self, port: int, count: int, tag: str) -> list[str]:
        """``count`` GETs, each on its own connection (the kernel spreads them over workers)."""
        return [served_by(port, f"/{tag}{number}") for number in range(count)]


class SharedWorkersTests(WorkersCase):
    """One --workers 2 balancer in front of backends a and b, shared by tests that leave
    it as they found it (health checked every INTERVAL s, admin API on)."""

    INTERVAL = 0.25

    @classmethod
    def setUpClass(cls) -> None:
        cls.a, cls.b = Backend("a"), Backend("b")
        cls.addClassCleanup(cls.a.raw.stop)
        cls.addClassCleanup(cls.b.raw.stop)
        cls.balancer = Balancer([cls.a.url, cls.b.url], "--workers", "2", "--health-interval",
                                str(cls.INTERVAL), "--health-path", "/healthz", "--admin-port", "0",
                                ready_timeout=20)
        cls.addClassCleanup(cls.kill_all, cls.balancer)

    def test_ready_line_two_workers_both_serving(self):
        """--workers 2: the ready line says (2 workers); two cclb.py child processes exist and
        both accept connections; requests are served round robin over the backends."""
        balancer = self.balancer
        ready = [line for line in balancer.stdout if "listening on" in line]
        self.assertEqual(len(ready), 1, balancer.stdout)
        self.assertRegex(ready[0].rstrip("\n"),
                         rf"^cclb listening on http://127\.0\.0\.1:{balancer.port} -> 2 backends "
                         r"\(2 workers\)$")
        workers = self.workers_of(balancer)
        self.assertNotIn(balancer.pid, workers)
        names = self.spread_requests(balancer.port, 20, "r")
        self.assertEqual(set(names), {"a", "b"})
        # Which process holds each accepted connection: both workers take their share.
        clients = open_served(balancer.port, 16, self)
        owners = set(socket_owners(clients, workers | {balancer.pid}))
        self.assertEqual(owners, workers, "connections are not spread over both workers")

    def test_health_is_checked_once_per_interval_by_the_supervisor(self):
        """With 2 workers, a backend sees one health check per interval (the supervisor's),
        not one per worker."""
        backend, interval = self.a, self.INTERVAL
        first = backend.checks()
        wait_for(lambda: backend.checks() >= first + 5, 10, message="five more health checks")
        with backend.lock:
            times = list(backend.health_times[first:first + 5])
        span = times[-1] - times[0]
        # One checker: four intervals; two checkers would need only about half of that.
        self.assertGreater(span, 4 * interval * 0.8, f"5 checks in {span:.2f}s: checked more than once")

    def test_backend_failing_health_gets_no_traffic_from_any_worker(self):
        """A backend that starts failing its health check gets no new request from any worker
        one interval after the supervisor's verdict, and traffic comes back when it passes."""
        b, balancer = self.b, self.balancer
        self.addCleanup(setattr, b, "health_status", 200)
        self.assertEqual(set(self.spread_requests(balancer.port, 10, "before")), {"a", "b"})
        with b.lock:
            b.health_status = 503  # b still serves requests: only the health verdict counts
            failed_from = len(b.health_answered)
        wait_for(lambda: any(status == 503 for _, status in b.health_answered[failed_from:]), 5,
                 message="a failed health check")
        verdict = next(t for t, status in b.health_answered[failed_from:] if status == 503)
        # One interval after the verdict (the next round's check has arrived).
        wait_for(lambda: any(t > verdict for t in b.health_times), 5, message="the next round")
        before = b.count()
        names = self.spread_requests(balancer.port, 30, "down")
        self.assertEqual(set(names), {"a"})
        self.assertEqual(b.count(), before, "a worker still sent requests to the DOWN backend")
        with b.lock:
            b.health_status = 200
        wait_for(lambda: "b" in self.spread_requests(balancer.port, 4, "back"), 5,
                 message="traffic back on b")

    def test_admin_api_runs_in_the_supervisor_and_reports_its_port(self):
        """--admin-port 0 with workers: the `cclb admin on` line gives the port; /status shows
        the health the supervisor checks."""
        port = wait_admin_port(self.balancer, 3)
        status, _, body = http_request(port, path="/status")
        self.assertEqual(status, 200)
        self.assertEqual([entry["url"] for entry in json.loads(body)["backends"]],
                         [self.a.url, self.b.url])
        wait_for(lambda: json.loads(http_request(port, path="/status")[2])["backends"][0]["last_check"]
                 == "HTTP 200", 5, message="a health check shown in /status")


class WorkersAdminTests(WorkersCase):

    def admin_call(self, port: int, method: str, path: str, document=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            body = json.dumps(document).encode() if document is not None else b""
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def routes_settle(self, port: int, wanted: set[str], tag: str) -> None:
        """Poll until a batch of fresh connections reaches exactly ``wanted``, then check that
        it stays so (every worker applied the change)."""
        wait_for(lambda: set(self.spread_requests(port, 10, tag)) == wanted, 3,
                 message=f"traffic to reach exactly {sorted(wanted)}")
        self.assertEqual(set(self.spread_requests(port, 30, tag + "-after")), wanted)

    def test_admin_writes_reach_every_worker(self):
        """With workers, admin API changes made in the supervisor apply to every worker's
        traffic: maint takes a backend out, ready brings it back, POST /backends adds one
        that then gets traffic, DELETE removes it."""
        a, b, c = self.backend("a"), self.backend("b"), self.backend("c")
        balancer = self.start([a, b], "--health-interval", "0.25", "--health-path", "/healthz",
                              "--admin-port", "0")
        admin = wait_admin_port(balancer)
        self.workers_of(balancer)
        a_id = next(entry["id"] for entry in self.admin_call(admin, "GET", "/status")[1]["backends"]
                    if entry["url"] == a.url)
        self.assertEqual(self.admin_call(admin, "POST", f"/backends/{a_id}/maint")[0], 200)
        self.routes_settle(balancer.port, {"b"}, "maint")
        self.assertEqual(self.admin_call(admin, "POST", f"/backends/{a_id}/ready")[0], 200)
        self.routes_settle(balancer.port, {"a", "b"}, "ready")
        status, added = self.admin_call(admin, "POST", "/backends", {"url": c.url})
        self.assertEqual(status, 201)
        self.routes_settle(balancer.port, {"a", "b", "c"}, "added")
        self.assertEqual(self.admin_call(admin, "DELETE", f"/backends/{added['id']}")[0], 200)
        self.routes_settle(balancer.port, {"a", "b"}, "deleted")


class WorkersLifecycleTests(WorkersCase):
    def test_killed_worker_is_restarted_and_service_continues(self):
        """SIGKILL one worker: requests keep being served, the supervisor starts a new worker
        (a new child pid) and logs it."""
        a, b = self.backend("a"), self.backend("b")
        balancer = self.start([a, b], "--health-interval", "0")
        workers = self.workers_of(balancer)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: process_gone(victim), 5, message="the killed worker to die")
        self.assertEqual(set(self.spread_requests(balancer.port, 20, "during")), {"a", "b"})
        replaced = wait_for(lambda: (lambda pids: pids if len(pids) == 2 and victim not in pids
                                     else None)(self.workers_of(balancer)), 10,
                            message="a replacement worker")
        self.assertEqual(len(replaced & workers), 1)
        new = (replaced - workers).pop()
        wait_for(lambda: f"pid {victim}" in balancer.log_text(), 5, message="the restart log line")
        wait_for(lambda: f"worker started (pid {new}," in balancer.log_text(), 10,
                 message="the new worker to listen")
        # The new worker takes and serves connections too.
        owners = socket_owners(open_served(balancer.port, 16, self), replaced)
        self.assertIn(new, owners, "the new worker serves no connection")
        self.assertNotIn(None, owners)
        self.assertEqual(set(self.spread_requests(balancer.port, 10, "after")), {"a", "b"})
        self.assertIsNone(balancer.proc.poll())

    def test_sigterm_exits_0_and_leaves_no_process(self):
        """SIGTERM: the supervisor stops its workers gracefully, exits 0 and the port is closed."""
        a = self.backend("a")
        balancer = self.start([a], "--health-interval", "0")
        workers = self.workers_of(balancer)
        self.assertEqual(served_by(balancer.port), "a")
        balancer.signal(signal.SIGTERM)
        self.assertEqual(balancer.proc.wait(15), 0)
        for pid in workers:
            self.assertTrue(process_gone(pid), f"worker {pid} outlived the supervisor")
        self.assertFalse(accepts(balancer.port))
        balancer.kill()  # joins the output readers
        log_text = balancer.log_text()
        self.assertNotIn("Traceback", log_text)
        # Each worker finished gracefully (not killed after a timeout), then the supervisor.
        self.assertEqual(log_text.count("cclb stopped"), 3, log_text)

    def test_sigterm_refuses_new_connections_at_once_while_workers_drain(self):
        """SIGTERM to the supervisor: every worker stops listening at once (a new client is
        refused, not parked in a backlog), while a request in flight still completes."""
        arrived, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def slow(head, conn, reader):
            arrived.set()
            release.wait(20)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
            return True
        backend = RawBackend(slow)
        self.addCleanup(backend.stop)
        balancer = self.start([backend.port], "--health-interval", "0")
        self.workers_of(balancer)
        result: list[object] = []
        thread = threading.Thread(target=lambda: result.append(http_request(balancer.port)),
                                  daemon=True)
        thread.start()
        self.assertTrue(arrived.wait(10))
        balancer.signal(signal.SIGTERM)
        wait_for(lambda: balancer.log_text().count("cclb stopping") >= 3, 5,
                 message="the supervisor and both workers to start stopping")

        def refused() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", balancer.port), timeout=1) as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    return sock.recv(1) == b""
            except TimeoutError:
                return False  # parked in a backlog nobody accepts from
            except OSError:
                return True
        for _ in range(5):  # each new connection could land on either worker
            wait_for(refused, 3, message="new connections to be refused")
        self.assertIsNone(balancer.proc.poll(), "exited with a request in flight")
        release.set()
        thread.join(10)
        self.assertEqual(result and result[0][0], 200)
        self.assertEqual(balancer.proc.wait(15), 0)

    def test_workers_exit_when_the_supervisor_is_killed(self):
        """SIGKILL of the supervisor: the workers notice and exit by themselves (no orphans)."""
        a = self.backend("a")
        balancer = self.start([a], "--health-interval", "0")
        workers = self.workers_of(balancer)
        self.addCleanup(lambda: [os.kill(pid, signal.SIGKILL) for pid in workers
                                 if not process_gone(pid)])
        balancer.proc.kill()
        balancer.proc.wait()
        for pid in workers:
            wait_for(lambda: process_gone(pid), 10, message=f"orphaned worker {pid} to exit")
        wait_for(lambda: not accepts(balancer.port), 5, message="the port to close")

    def test_sighup_reloads_every_worker(self):
        """SIGHUP: every worker re-reads the file: the added backend gets traffic and no worker
        sends any to the removed one."""
        a, b, c = self.backend("a"), self.backend("b"), self.backend("c")
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "cclb.toml")
        with open(path, "w") as handle:
            handle.write("health_interval = 0\n" + toml_backends(a, b))
        balancer = self.start([], "--config", path)
        self.workers_of(balancer)
        self.assertEqual(set(self.spread_requests(balancer.port, 10, "before")), {"a", "b"})
        with open(path + ".new", "w") as handle:
            handle.write("health_interval = 0\n" + toml_backends(b, c))
        os.replace(path + ".new", path)
        balancer.signal(signal.SIGHUP)
        wait_for(lambda: balancer.log_text().count("configuration reloaded from") >= 2, 5,
                 message="both workers to reload")
        before = a.count()
        names = self.spread_requests(balancer.port, 30, "after")
        self.assertEqual(set(names), {"b", "c"})
        self.assertEqual(a.count(), before, "a worker still uses the removed backend")
        self.assertEqual(len(child_pids(balancer.pid)), 2)


class WorkersCountersTests(WorkersCase):
    """The supervisor's admin API adds up the traffic counted by every worker."""

    def test_status_and_metrics_count_all_workers_even_after_one_dies(self) -> None:
        backend = DemoServer()
        self.addCleanup(backend.stop)
        balancer = self.start([backend.port], "--health-interval", "0", "--access-log", "off",
                              "--admin-port", "0")
        admin = wait_admin_port(balancer)

        def fetch(port: int, path: str) -> tuple[int, bytes]:
            status, _, body = http_request(port, path=path)
            return status, body
        for _ in range(40):  # new connections: the kernel spreads them over both workers
            self.assertEqual(fetch(balancer.port, "/")[0], 200)

        def requests_counted() -> int:
            status = json.loads(fetch(admin, "/status")[1])
            return sum(b["requests"] for b in status["backends"])
        wait_for(lambda: requests_counted() == 40, 10, message="40 requests in /status")
        metrics = fetch(admin, "/metrics")[1].decode()
        self.assertIn(f'cclb_requests_total{{backend="http://127.0.0.1:{backend.port}",code="200"}} 40',
                      metrics)
        # A worker that dies takes nothing with it: its counts stay in the totals.
        pids = sorted(child_pids(balancer.pid))
        self.assertEqual(len(pids), 2)
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: len(child_pids(balancer.pid) - {pids[0]}) == 2, 10,
                 message="the worker to be replaced")
        self.assertEqual(fetch(balancer.port, "/")[0], 200)
        wait_for(lambda: requests_counted() == 41, 10, message="41 requests in /status")

    def test_supervisor_metrics_count_503s_of_all_workers(self):
        """Answers without a backend (503) are counted by the supervisor too (a review fix)."""
        dead = free_port()  # nothing listens there
        balancer = self.start([dead], "--admin-port", "0", "--health-interval", "0.2",
                              "--access-log", "off")
        admin = wait_admin_port(balancer)
        wait_for(lambda: admin_status(self, balancer, admin)["backends"][0]["state"] == "down", 5,
                 message="the backend DOWN in the supervisor")
        # Every worker has the supervisor's "down" verdict once ten requests in a row (each
        # on a new connection, spread by the kernel) are answered 503 without a backend.
        answers: list[int] = []

        def ten_503s_in_a_row() -> bool:
            answers.append(http_request(balancer.port, path=f"/r{len(answers)}")[0])
            return answers[-10:] == [503] * 10
        wait_for(ten_503s_in_a_row, 10, interval=0.05, message="ten 503s in a row")
        unrouted = answers.count(503)
        line = f'cclb_requests_total{{backend="none",code="503"}} {unrouted}'

        def metrics() -> str:
            return admin_call(self, balancer, admin, "GET", "/metrics")[2].decode()
        try:
            wait_for(lambda: line in metrics(), 6, message="the unrouted 503s in /metrics")
        except AssertionError:
            shown = [l for l in metrics().splitlines() if l.startswith("cclb_requests_total")]
            self.fail(f"{line!r} not in the supervisor's /metrics; got {shown} (answers {answers})")
        self.assertEqual(admin_status(self, balancer, admin)["unrouted"], {"503": unrouted})

    def test_supervisor_adds_up_the_rejections_and_tunnels_of_all_workers(self) -> None:
        """Requests refused by cclb (400 here) are counted by reason across workers, and
        WebSocket tunnels held by both workers are summed (open count, bytes) in /metrics
        and /status (one balancer for both: starting one costs seconds)."""
        backend = DemoServer()
        self.addCleanup(backend.stop)
        balancer = self.start([backend.port], "--health-interval", "0", "--access-log", "off",
                              "--admin-port", "0")
        admin = wait_admin_port(balancer)
        for _ in range(40):  # new connections: the kernel spreads them over both workers
            with socket.create_connection(("127.0.0.1", balancer.port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # no Host: 400
                self.assertTrue(sock.recv(100).startswith(b"HTTP/1.1 400 "))
        pids = self.workers_of(balancer)
        clients: list[socket.socket] = []

        def open_tunnel() -> None:
            sock = socket.create_connection(("127.0.0.1", balancer.port), timeout=10)
            self.addCleanup(sock.close)
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                         b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                         % websocket.new_key().encode())
            reader = sock.makefile("rb")
            self.addCleanup(reader.close)
            self.assertEqual(read_head(reader).status, 101)
            sock.sendall(websocket.encode_frame(websocket.Opcode.BINARY, b"x" * 1000, mask=True))
            frame = websocket.read_frame(reader.read, require_mask=False, max_payload=1 << 20)
            self.assertEqual(len(frame.payload), 1000)
            clients.append(sock)
        # New connections until both workers hold a tunnel (the kernel spreads them).
        wait_for(lambda: open_tunnel() or set(socket_owners(clients, pids)) == pids, 10, interval=0,
                 message="a tunnel in each worker")
        opened = len(clients)
        line = 'cclb_rejected_total{reason="bad_request"} 40'

        def metrics() -> str:
            return admin_call(self, balancer, admin, "GET", "/metrics")[2].decode()

        def tunnels_seen(text: str, count: int) -> bool:
            up = re.search(r'^cclb_tunnel_bytes_total\{direction="client_to_backend"\} (\d+)$', text, re.M)
            return f"cclb_tunnels_open {count}\n" in text and up is not None and int(up[1]) >= 1000 * opened
        wait_for(lambda: (lambda text: line in text and tunnels_seen(text, opened))(metrics()), 10,
                 message=f"40 rejections and {opened} tunnels in the supervisor's /metrics")
        self.assertIn('cclb_responses_total{source="cclb",code="400"} 40', metrics())
        frontend = admin_status(self, balancer, admin)["frontend"]
        self.assertEqual(frontend["rejected"], {"bad_request": 40})
        self.assertEqual(frontend["tunnels"]["open"], opened)
        self.assertGreaterEqual(frontend["tunnels"]["bytes_to_client"], 1000 * opened)
        # (That a closed tunnel leaves the sum: the latest report replaces a worker's numbers,
        # see CounterReportTests; not waited for here, to keep this test short.)
        # The engines' numbers are summed too: both pools of 64 handler threads, and every
        # request that waited for one of them (the 40 refused ones at least).
        def engine_sums(text: str) -> tuple[int, int]:
            threads = sum(int(n) for n in re.findall(r'^cclb_handler_threads\{state="\w+"\} (\d+)$',
                                                      text, re.M))
            waited = re.search(r"^cclb_handler_queue_wait_seconds_count (\d+)$", text, re.M)
            return threads, int(waited[1]) if waited else 0
        wait_for(lambda: (lambda sums: sums[0] == 128 and sums[1] >= 40)(engine_sums(metrics())), 10,
                 message="both workers' handler threads and queue waits in the supervisor's /metrics")

class SnapshotTests(unittest.TestCase):
    """The supervisor's state snapshots (one JSON line each) and how a worker applies them,
    in-process."""

    def cluster(self, *texts: str, **params) -> ServerCluster:
        cluster = ServerCluster([parse_backend(text) for text in texts], **params)
        self.addCleanup(cluster.close)
        return cluster

    @staticmethod
    def rows(*entries: tuple[str, str]) -> list[list]:
        return [[url, 1, health, READY] for url, health in entries]

    # Review: a repeated "up" from the supervisor once cleared a worker's passive down.
    def test_passive_down_is_kept_until_the_supervisor_says_down_then_up(self):
        cluster = self.cluster("127.0.0.1:9001", "127.0.0.1:9002", max_fails=1, fail_timeout=10)
        a, b = cluster.snapshot()
        with self.assertLogs("cclb", "WARNING"):
            cluster.report_failure(a, "connection refused")
        self.assertFalse(a.available)

        for _ in range(3):  # the supervisor repeats "up" every health round
            workers.apply_snapshot(cluster, self.rows((a.url, "up"), (b.url, "up")))
        self.assertFalse(a.available, "a repeated 'up' cleared the worker's passive down")
        self.assertEqual(a.state, "down")
        self.assertIsNone(cluster.acquire("10.0.0.1", exclude=(b,)))  # no Attempt: none left
        cluster.apply_published_health(a, True)  # directly, too
        self.assertFalse(a.available)

        workers.apply_snapshot(cluster, self.rows((a.url, "down"), (b.url, "up")))
        self.assertFalse(a.available)
        workers.apply_snapshot(cluster, self.rows((a.url, "up"), (b.url, "up")))
        self.assertTrue(a.available, "down then up from the supervisor did not bring it back")
        with cluster.acquire("10.0.0.1", exclude=(b,)) as attempt:
            self.assertIs(attempt.backend, a)
            attempt.done(200, 0.001)

    def test_state_line_round_trip_and_a_cut_off_snapshot_is_skipped(self):
        supervisor = self.cluster("127.0.0.1:9001,weight=2", "[::1]:9002", "127.0.0.1:9003")
        a, b, c = supervisor.snapshot()
        with self.assertLogs("cclb", "WARNING"):
            supervisor.report_check(b, False, "HTTP 500", 0.001)
        supervisor.set_admin_state(c, MAINT, quiet=True)
        line = workers.encode_snapshot(workers.state_rows(supervisor))
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1, "a snapshot must be one line")
        rows = workers.decode_snapshot(line[:-1])
        self.assertEqual(rows, [["http://127.0.0.1:9001", 2, "up", "ready"],
                                ["http://[::1]:9002", 1, "down", "ready"],
                                ["http://127.0.0.1:9003", 1, "up", "maint"]])

        worker = self.cluster("127.0.0.1:9001", "127.0.0.1:9099")
        read_fd, write_fd = os.pipe()
        self.addCleanup(os.close, read_fd)
        write_open = [True]

        def close_write() -> None:
            if write_open[0]:
                write_open[0] = False
                os.close(write_fd)
        self.addCleanup(close_write)
        exited = threading.Event()
        follower = threading.Thread(target=workers.follow_supervisor,
                                    args=(worker, read_fd, exited.set), daemon=True)
        follower.start()

        os.write(write_fd, line)
        expected = cluster_view(supervisor)
        wait_for(lambda: cluster_view(worker) == expected, 5, message="the worker to adopt the snapshot")

        supervisor.remove(c)
        supervisor.add(parse_backend("127.0.0.1:9004,weight=5"))
        second = workers.encode_snapshot(workers.state_rows(supervisor))
        os.write(write_fd, second[:len(second) // 2])  # the supervisor's write was cut short
        time.sleep(0.2)  # an observation window, not synchronisation: nothing may change
        self.assertEqual(cluster_view(worker), expected, "half a snapshot was applied")
        os.write(write_fd, second + second)  # the next rounds send it whole
        expected = cluster_view(supervisor)
        wait_for(lambda: cluster_view(worker) == expected, 5,
                 message=f"the worker to adopt the next whole snapshot: {cluster_view(worker)}")
        self.assertTrue(follower.is_alive() and not exited.is_set(),
                        "a cut-off line ended the supervisor link")
        close_write()
        self.assertTrue(exited.wait(5), "end of input: on_exit was not called")
        follower.join(5)



def snapshot_rows(count: int, state: str = "up") -> list[list]:
    return [[f"http://10.0.{i // 250}.{i % 250 + 1}:8080", 1 + i % 3, state, "ready"]
            for i in range(count)]


class PipeCase(unittest.TestCase):

    def pipe(self) -> tuple[int, int]:
        read_fd, write_fd = os.pipe()
        self.addCleanup(os.close, read_fd)
        self.addCleanup(os.close, write_fd)
        os.set_blocking(write_fd, False)
        os.set_blocking(read_fd, False)
        return read_fd, write_fd

    @staticmethod
    def fill(write_fd: int) -> None:
        """Fill the pipe with bytes a worker skips (empty lines)."""
        while True:
            try:
                os.write(write_fd, b"\n" * 4096)
            except BlockingIOError:
                try:
                    os.write(write_fd, b"\n")  # the last partial page
                except BlockingIOError:
                    return

    @staticmethod
    def drain(read_fd: int) -> bytes:
        data = bytearray()
        while True:
            try:
                piece = os.read(read_fd, 1 << 16)
            except BlockingIOError:
                return bytes(data)
            if not piece:
                return bytes(data)
            data += piece


class SnapshotFramingTests(PipeCase):
    """Snapshots are self-delimiting lines: a torn one costs only itself."""

    def test_round_trip(self) -> None:
        snapshot = snapshot_rows(3)
        line = encode_snapshot(snapshot)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(SnapshotReader().feed(line), [snapshot])
        self.assertEqual(decode_snapshot(line[:-1]), snapshot)

    def test_torn_or_malformed_lines_are_rejected(self) -> None:
        line = encode_snapshot(snapshot_rows(2))[:-1]
        for bad in (line[:-1], line[:5], b"", b"12", b"x " + line, b"2 []x", b"7 [1,2,3]",
                    b'13 [["a",1,"up"]]'):
            with self.subTest(bad=bad):
                self.assertIsNone(decode_snapshot(bad))

    def test_a_line_arriving_in_pieces_is_decoded_once_whole(self) -> None:
        line = encode_snapshot(snapshot_rows(40))
        reader = SnapshotReader()
        got = []
        for start in range(0, len(line), 7):
            got += reader.feed(line[start:start + 7])
        self.assertEqual(got, [snapshot_rows(40)])

    def test_a_snapshot_torn_by_a_full_pipe_costs_only_itself(self) -> None:
        """Regression: the torn start of one snapshot used to be glued to the next
        one (no separator), so both were lost.  Now the next write ends the torn
        line first: the worker drops the torn one and reads the next one whole."""
        read_fd, write_fd = self.pipe()
        first, second = snapshot_rows(400, "up"), snapshot_rows(400, "down")  # each well over PIPE_BUF
        self.fill(write_fd)
        os.read(read_fd, 4096 + 100)  # room for about a page: the snapshot is cut after it
        torn = write_snapshot(write_fd, encode_snapshot(first), torn=False)
        self.assertTrue(torn, "the snapshot was expected to be cut short")
        received = self.drain(read_fd)  # the worker catches up
        torn = write_snapshot(write_fd, encode_snapshot(second), torn)
        self.assertFalse(torn)
        received += self.drain(read_fd)
        snapshots = SnapshotReader().feed(bytes(received))
        self.assertEqual(snapshots, [second])

    def test_a_pipe_with_no_room_takes_nothing_and_keeps_the_torn_state(self) -> None:
        read_fd, write_fd = self.pipe()
        self.fill(write_fd)
        for torn in (False, True):
            with self.subTest(torn=torn):
                self.assertEqual(write_snapshot(write_fd, encode_snapshot(snapshot_rows(1)), torn), torn)

    def test_a_closed_pipe_raises_for_the_caller_to_ignore(self) -> None:
        read_fd, write_fd = os.pipe()
        os.close(read_fd)
        self.addCleanup(os.close, write_fd)
        with self.assertRaises(OSError) as caught:
            write_snapshot(write_fd, encode_snapshot(snapshot_rows(1)), False)
        self.assertEqual(caught.exception.errno, errno.EPIPE)


class CounterReportTests(unittest.TestCase):

    def test_reports_add_up_and_round_trip(self) -> None:
        one = workers.CounterReport({"http://a:1": TrafficCounters({200: 2}, 1, 1, 0, Histogram())},
                                    {503: 1})
        one.backends["http://a:1"].latency.observe(0.003)
        two = workers.CounterReport.decode(one.encode())
        self.assertEqual(two, one)
        total = workers.CounterReport()
        total.add(one)
        total.add(two, in_flight=False)
        traffic = total.backends["http://a:1"]
        self.assertEqual((traffic.responses, traffic.in_flight, traffic.failures),
                         ({200: 4}, 1, 2))
        self.assertEqual(traffic.latency.count, 2)
        self.assertEqual(total.unrouted, {503: 2})
        self.assertEqual(total.frontend, FrontendCounters())
        for bad in (b"{}", b"[]", b'{"backends": {"x": {}}, "unrouted": {}}', b"nonsense"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                workers.CounterReport.decode(bad)

    def test_frontend_counters_add_up_and_round_trip(self) -> None:
        """The client side travels with the report; a dead worker's gauges are dropped."""
        frontend = FrontendCounters({"bad_request": 2, "max_connections": 1},
                                    {("cclb", 400): 2, ("backend", 200): 5}, 100, 900, 3, 1, 2)
        one = workers.CounterReport({}, {}, frontend)
        two = workers.CounterReport.decode(one.encode())
        self.assertEqual(two, one)
        total = workers.CounterReport()
        total.add(one)
        total.add(two, in_flight=False)  # retired: its connections are gone
        self.assertEqual(total.frontend, FrontendCounters(
            {"bad_request": 4, "max_connections": 2}, {("cclb", 400): 4, ("backend", 200): 10},
            200, 1800, 3, 1, 2))
        for bad in (b'{"backends": {}, "unrouted": {}}',
                    b'{"backends": {}, "unrouted": {}, "frontend": {"rejected": 1}}'):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                workers.CounterReport.decode(bad)

    def test_tunnel_numbers_add_up_and_a_dead_workers_open_tunnels_are_dropped(self) -> None:
        one = workers.CounterReport({}, {}, FrontendCounters(tunnels_open=2, tunnel_to_backend=10,
                                                             tunnel_to_client=70))
        two = workers.CounterReport.decode(one.encode())
        self.assertEqual(two, one)
        total = workers.CounterReport()
        total.add(one)
        total.add(two, in_flight=False)  # retired: its tunnels are gone, its bytes stay
        self.assertEqual((total.frontend.tunnels_open, total.frontend.tunnel_to_backend,
                          total.frontend.tunnel_to_client), (2, 20, 140))
        self.assertEqual(total.frontend.dashboard()["tunnels"],
                         {"open": 2, "bytes_to_backend": 20, "bytes_to_client": 140})

    def test_engine_numbers_add_up_and_a_dead_workers_gauges_are_dropped(self) -> None:
        def report(busy: int, parked: int, waits: list[int]) -> workers.CounterReport:
            return workers.CounterReport({}, {}, FrontendCounters(engine=EngineNumbers(
                (0.001, 0.01), waits, 0.5, sum(waits), busy, 64, 16, 2, parked)))
        one = report(3, 100, [5, 1, 0])
        self.assertEqual(workers.CounterReport.decode(one.encode()), one)
        total = workers.CounterReport()
        total.add(one)
        total.add(report(7, 9000, [1, 0, 2]), in_flight=False)  # retired: its gauges are gone
        engine = total.frontend.engine
        self.assertEqual((engine.wait_counts, engine.wait_sum, engine.wait_count),
                         ([6, 1, 2], 1.0, 9))
        self.assertEqual((engine.busy, engine.threads, engine.limit, engine.queued, engine.parked),
                         (3, 64, 16, 2, 100))
        supervisor = FrontendMetrics()
        supervisor.adopt(total.frontend)
        cluster = ServerCluster([])
        cluster.frontend = supervisor
        rendered = metrics.render(cluster.stats())
        for line in ('cclb_handler_threads{state="busy"} 3', 'cclb_handler_threads{state="idle"} 61',
                     "cclb_parked_connections 100", 'cclb_handler_queue_wait_seconds_bucket{le="0.01"} 7',
                     'cclb_handler_queue_wait_seconds_bucket{le="+Inf"} 9',
                     "cclb_handler_queue_wait_seconds_count 9"):
            self.assertIn(line + "\n", rendered)
        for bad in ({"bounds": [0.1], "wait_counts": [1]}, {"bounds": "x"}):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                EngineNumbers.from_json(bad)

    def test_a_listener_shows_its_own_tunnels_and_the_supervisor_the_adopted_sum(self) -> None:
        tunnels = TunnelMetrics()
        tunnels.opened()
        tunnels.counters.add_tunnel_bytes(5, 7)
        listening = FrontendMetrics()
        listening.tunnels = tunnels  # as the proxy server sets it
        self.assertEqual(listening.snapshot().dashboard()["tunnels"],
                         {"open": 1, "bytes_to_backend": 5, "bytes_to_client": 7})
        supervisor = FrontendMetrics()  # no listener: shows what it adopted
        supervisor.adopt(FrontendCounters(tunnels_open=3, tunnel_to_backend=50, tunnel_to_client=90))
        self.assertEqual(supervisor.snapshot().dashboard()["tunnels"],
                         {"open": 3, "bytes_to_backend": 50, "bytes_to_client": 90})
        cluster = ServerCluster([])
        cluster.frontend = supervisor
        rendered = metrics.render(cluster.stats())
        self.assertIn("cclb_tunnels_open 3\n", rendered)
        self.assertIn('cclb_tunnel_bytes_total{direction="client_to_backend"} 50\n', rendered)
        self.assertIn('cclb_tunnel_bytes_total{direction="backend_to_client"} 90\n', rendered)


if __name__ == "__main__":
    unittest.main()

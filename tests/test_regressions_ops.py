"""Regression tests for the second review's fixes (commit "Second review fixes: ...").

One test class per fix.  Pure fixes (cluster, workers, health_checkers) are
tested in-process; reload, admin API, workers and signals end to end with
real processes and sockets.  Every wait is a poll with a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from tests.support import (PYTHON, ROOT, Balancer, ChildProcess, RawBackend, accepts, connect,
                           free_port, http_request, read_until_close, wait_admin_port, wait_for)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import workers  # noqa: E402
from cluster import MAINT, READY, ServerCluster, parse_backend  # noqa: E402
from health_checkers import HealthSettings, probe  # noqa: E402

CCLB = str(ROOT / "cclb.py")
HEALTH_PATH = "/hc"


# --- helpers -----------------------------------------------------------------------

def write_file(path: str, text: str) -> None:
    """Replace ``path`` atomically (a reload never reads half a file)."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def health_count(backend: RawBackend, path: str = HEALTH_PATH) -> int:
    with backend.lock:
        return sum(1 for head in backend.heads if head.startswith(f"GET {path} ".encode()))


def specs(*texts: str):
    return [parse_backend(text) for text in texts]


def view(cluster: ServerCluster) -> list[tuple[str, int, bool, str]]:
    """(url, weight, healthy, admin state) of every backend, in order."""
    with cluster.lock:
        return [(b.url, b.weight, b.healthy, b.admin_state) for b in cluster.backends]


class Case(unittest.TestCase):
    """Cleanups for backends, balancers and temporary directories."""

    def raw_backend(self) -> RawBackend:
        backend = RawBackend()
        self.addCleanup(backend.stop)
        return backend

    def balancer(self, backends, *extra: str) -> Balancer:
        balancer = Balancer(backends, *extra)
        self.addCleanup(balancer.kill)
        return balancer

    def tempdir(self) -> str:
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        return directory.name

    def cluster(self, *texts: str, **params) -> ServerCluster:
        cluster = ServerCluster(specs(*texts), **params)
        self.addCleanup(cluster.close)
        return cluster

    def call(self, balancer: Balancer, port: int, method: str, path: str,
             body: bytes | None = None, headers: dict[str, str] | None = None):
        """An admin request; a dropped connection is a test failure, not an error."""
        headers = dict(headers or {})
        if body is None and method in ("POST", "DELETE"):
            headers.setdefault("Content-Length", "0")
        try:
            return http_request(port, method, path, body=body, headers=headers, timeout=5)
        except (OSError, http.client.HTTPException) as error:
            self.fail(f"{method} {path[:60]}: no answer ({error!r}); "
                      f"log: {balancer.log_text()[-1500:]}")

    def post_json(self, balancer: Balancer, port: int, path: str, document,
                  token: str | None = None):
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.call(balancer, port, "POST", path, json.dumps(document).encode(), headers)

    def status(self, balancer: Balancer, port: int) -> dict:
        code, _, body = self.call(balancer, port, "GET", "/status")
        self.assertEqual(code, 200)
        return json.loads(body)


# --- 1. reload to health_interval = 0 stops the checks -------------------------------

class ReloadToIntervalZeroTests(Case):

    def test_reload_to_interval_zero_stops_active_checks_without_a_busy_loop(self):
        backend = self.raw_backend()
        path = os.path.join(self.tempdir(), "cclb.toml")
        body = f'health_path = "{HEALTH_PATH}"\nbackends = ["http://127.0.0.1:{backend.port}"]\n'
        write_file(path, "health_interval = 0.2\n" + body)
        balancer = self.balancer([], "--config", path, "--access-log", "off")
        wait_for(lambda: health_count(backend) >= 2, 5, message="two active checks at 0.2s")

        write_file(path, "health_interval = 0\n" + body)
        balancer.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in balancer.log_text(), 5,
                 message="the reload log line")
        time.sleep(0.3)  # a round that was under way when the reload came may finish
        checks, cpu = health_count(backend), cpu_seconds(balancer.pid)
        time.sleep(1.0)  # five old intervals
        self.assertEqual(health_count(backend), checks,
                         "active checks go on after a reload to health_interval = 0")
        used = cpu_seconds(balancer.pid) - cpu
        self.assertLess(used, 0.3, f"{used:.2f}s of CPU in 1s while idle: a busy loop")
        self.assertEqual(http_request(balancer.port, path="/x")[0], 200)
        self.assertNotIn("reload failed", balancer.log_text())


# --- 2. a reload re-validates: the admin token cannot be dropped ----------------------

class ReloadRevalidatesTests(Case):

    def test_reload_cannot_drop_the_token_of_a_non_loopback_admin(self):
        backend = self.raw_backend()
        path = os.path.join(self.tempdir(), "cclb.toml")
        backends = f'backends = ["http://127.0.0.1:{backend.port}"]\n'
        write_file(path, 'admin_host = "0.0.0.0"\nadmin_token = "s3cret"\nadmin_port = 0\n'
                         "health_interval = 0\n" + backends)
        balancer = self.balancer([], "--config", path, "--access-log", "off")
        admin = wait_admin_port(balancer)
        self.assertEqual(self.call(balancer, admin, "POST", "/backends/1/maint")[0], 401)

        write_file(path, 'admin_host = "127.0.0.1"\nadmin_port = 0\nhealth_interval = 0\n'
                         + backends)
        balancer.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in balancer.log_text(), 5,
                 message=f"'reload failed' in the log: {balancer.log_text()[-800:]}")
        self.assertNotIn("configuration reloaded", balancer.log_text())

        code, headers, _ = self.call(balancer, admin, "POST", "/backends/1/maint")
        self.assertEqual(code, 401, "an admin write without the token was accepted after the reload")
        self.assertIn("Bearer", headers.get("WWW-Authenticate", ""))
        self.assertEqual(self.status(balancer, admin)["backends"][0]["state"], "up")
        # The old token is still the one in force.
        code, _, _ = self.call(balancer, admin, "POST", "/backends/1/maint",
                               headers={"Authorization": "Bearer s3cret"})
        self.assertEqual(code, 200)


# --- 3. admin writes: close the connection, bounded ids and JSON ------------------------

class AdminHardeningTests(Case):

    def setUp(self):
        self.backend = self.raw_backend()
        self.lb = self.balancer([self.backend.port], "--admin-port", "0", "--health-interval", "0",
                                "--access-log", "off")
        self.admin = wait_admin_port(self.lb)

    def assert_no_traceback(self):
        time.sleep(0.1)  # socketserver prints a handler's traceback after the connection ends
        self.assertNotIn("Traceback", self.lb.log_text())

    def test_a_body_holding_another_request_is_never_run(self):
        smuggled = b"DELETE /backends/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        request = (b"POST /backends/1/ready HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled))
        with connect(self.admin, timeout=5) as sock:
            sock.sendall(request)
            raw = read_until_close(sock, timeout=3)
        heads = re.findall(rb"(?m)^HTTP/1\.[01] (\d{3})", raw)
        self.assertEqual(heads, [b"200"], f"answers: {raw[:600]!r}")
        head = raw.split(b"\r\n\r\n", 1)[0].lower()
        self.assertIn(b"\r\nconnection: close", head)
        document = self.status(self.lb, self.admin)
        self.assertEqual([b["id"] for b in document["backends"]], [1],
                         "the request hidden in the body removed the backend")
        self.assertNotIn("removed by the admin API", self.lb.log_text())

    def test_huge_backend_id_is_404(self):
        huge = "1" * 5000
        for method, path in (("DELETE", f"/backends/{huge}"), ("POST", f"/backends/{huge}/drain")):
            with self.subTest(method=method):
                code, headers, body = self.call(self.lb, self.admin, method, path)
                self.assertEqual(code, 404, body[:200])
                self.assertEqual(headers.get("Connection", "").lower(), "close")
        self.assertEqual(len(self.status(self.lb, self.admin)["backends"]), 1)
        self.assert_no_traceback()

    def test_deeply_nested_json_is_400(self):
        code, _, body = self.call(self.lb, self.admin, "POST", "/backends", b"[" * 50000,
                                  {"Content-Type": "application/json"})
        self.assertEqual(code, 400, body[:200])
        self.assertTrue(json.loads(body)["error"])
        self.assertEqual(len(self.status(self.lb, self.admin)["backends"]), 1)
        self.assert_no_traceback()


# --- 4. the passive rule never takes out the last available backend ------------------------

class PassiveRuleTests(Case):

    def test_last_available_backend_is_not_taken_out_passively(self):
        cluster = self.cluster("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003",
                               max_fails=1, fail_timeout=10)
        down, maint, last = cluster.snapshot()
        with self.assertLogs("cclb", "WARNING"):
            cluster.report_check(down, False, "connection refused", None, rise=1, fall=1)
        cluster.set_admin_state(maint, MAINT, quiet=True)
        self.assertEqual([b.available for b in cluster.snapshot()], [False, False, True])

        with self.assertNoLogs("cclb", "WARNING"):
            cluster.report_failure(last, "connection refused")
        self.assertTrue(last.available, "the only backend left was taken out by one failure")
        picked = cluster.acquire("10.0.0.1")
        self.assertIs(picked, last)
        cluster.release(picked, 200)

        # Control: with a second backend available the same rule does take it out.
        cluster.set_admin_state(maint, READY, quiet=True)
        with self.assertLogs("cclb", "WARNING") as logs:
            cluster.report_failure(last, "connection refused")
        self.assertIn("is DOWN", logs.output[0])
        self.assertFalse(last.available)
        self.assertIs(cluster.acquire("10.0.0.1"), maint)


# --- 5. a worker's passive down survives published snapshots --------------------------------

class PublishedHealthTests(Case):

    @staticmethod
    def rows(*entries: tuple[str, str]) -> list[list]:
        return [[url, 1, health, READY] for url, health in entries]

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
        self.assertIsNone(cluster.acquire("10.0.0.1", exclude=(b,)))
        cluster.apply_published_health(a, True)  # directly, too
        self.assertFalse(a.available)

        workers.apply_snapshot(cluster, self.rows((a.url, "down"), (b.url, "up")))
        self.assertFalse(a.available)
        workers.apply_snapshot(cluster, self.rows((a.url, "up"), (b.url, "up")))
        self.assertTrue(a.available, "down then up from the supervisor did not bring it back")
        picked = cluster.acquire("10.0.0.1", exclude=(b,))
        self.assertIs(picked, a)
        cluster.release(picked, 200)


# --- 6. --workers: answers without a backend are counted by the supervisor ------------------

class WorkersUnroutedTests(Case):

    def test_supervisor_metrics_count_503s_of_all_workers(self):
        dead = free_port()  # nothing listens there
        balancer = self.balancer([dead], "--workers", "2", "--admin-port", "0",
                                 "--health-interval", "0.2", "--access-log", "off")
        admin = wait_admin_port(balancer)
        wait_for(lambda: self.status(balancer, admin)["backends"][0]["state"] == "down", 5,
                 message="the backend DOWN in the supervisor")
        time.sleep(0.5)  # more rounds: every worker has the "down" verdict
        answers = [http_request(balancer.port, path=f"/r{n}")[0] for n in range(10)]
        self.assertEqual(answers, [503] * 10)

        line = 'cclb_requests_total{backend="none",code="503"} 10'

        def metrics() -> str:
            return self.call(balancer, admin, "GET", "/metrics")[2].decode()
        try:
            wait_for(lambda: line in metrics(), 6, message="the unrouted 503s in /metrics")
        except AssertionError:
            shown = [l for l in metrics().splitlines() if l.startswith("cclb_requests_total")]
            self.fail(f"{line!r} not in the supervisor's /metrics; got {shown}")
        self.assertEqual(self.status(balancer, admin)["unrouted"], {"503": 10})


# --- 7. duplicate and invalid backends ---------------------------------------------------------

class DuplicateBackendTests(Case):

    def test_duplicate_or_invalid_backends_on_the_command_line_exit_2(self):
        runs = {
            "duplicate": (["-b", "127.0.0.1:7000", "-b", "http://127.0.0.1:7000/"],
                          ["http://127.0.0.1:7000", "twice"]),
            "space": (["-b", "a b:1"], ["a b"]),
            "dash": (["--backend=-:1"], ["'-'"]),  # "-b -:1" would be an argparse error
        }
        procs = {}
        for name, (args, _) in runs.items():
            procs[name] = subprocess.Popen(
                [PYTHON, CCLB, "-p", "0", "--host", "127.0.0.1", "--health-interval", "0",
                 "--access-log", "off", *args],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)
            self.addCleanup(lambda p=procs[name]: (p.poll() is None and p.kill(), p.wait()))
        for name, (args, words) in runs.items():
            with self.subTest(backends=args):
                proc = procs[name]
                try:
                    stdout, stderr = proc.communicate(timeout=8)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    stdout, stderr = proc.communicate()
                self.assertEqual(proc.returncode, 2, f"stdout: {stdout!r} stderr: {stderr!r}")
                self.assertNotIn("listening", stdout)
                self.assertNotIn("Traceback", stderr)
                for word in words:
                    self.assertIn(word, stderr)

    def test_cluster_add_refuses_a_url_already_there_even_from_racing_threads(self):
        cluster = self.cluster("127.0.0.1:9001")
        self.assertIsNone(cluster.add(parse_backend("http://127.0.0.1:9001/,weight=4")))
        self.assertEqual(view(cluster), [("http://127.0.0.1:9001", 1, True, READY)])
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

    def test_admin_add_of_an_existing_url_is_409_and_concurrent_adds_make_one(self):
        backend = self.raw_backend()
        balancer = self.balancer([backend.port], "--admin-port", "0", "--health-interval", "0",
                                 "--access-log", "off")
        admin = wait_admin_port(balancer)
        for url in (f"http://127.0.0.1:{backend.port}", f"127.0.0.1:{backend.port}",
                    f"http://127.0.0.1:{backend.port}/"):
            with self.subTest(url=url):
                self.assertEqual(self.post_json(balancer, admin, "/backends", {"url": url})[0], 409)

        threads_per_round = 8
        for number in range(5):
            url = f"http://127.0.0.1:{20001 + number}"
            barrier = threading.Barrier(threads_per_round)
            codes: list[int] = []

            def add() -> None:
                barrier.wait(5)
                try:
                    code = http_request(admin, "POST", "/backends", json.dumps({"url": url}).encode(),
                                        {"Content-Type": "application/json"}, timeout=5)[0]
                except OSError:
                    code = 0
                codes.append(code)
            threads = [threading.Thread(target=add) for _ in range(threads_per_round)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            with self.subTest(url=url):
                self.assertEqual(sorted(codes), [201] + [409] * (threads_per_round - 1))
        urls = [b["url"] for b in self.status(balancer, admin)["backends"]]
        self.assertEqual(len(urls), len(set(urls)), urls)
        self.assertEqual(len(urls), 6)


# --- 8. atomic reconcile; the JSON state line and its follower ------------------------------

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


class ReconcileAndStateLineTests(Case):

    def test_reconcile_adds_removes_and_reweights_in_one_step(self):
        cluster = self.cluster("127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003")
        a, b, c = cluster.snapshot()
        before = [(x.url, x.weight) for x in cluster.backends]
        recorder = _RecordingLock(cluster)
        cluster.lock = recorder
        added, removed = cluster.reconcile(specs("127.0.0.1:9002,weight=3", "127.0.0.1:9003",
                                                 "[::1]:9004,weight=2"))
        self.assertEqual((added, removed), (["http://[::1]:9004"], ["http://127.0.0.1:9001"]))
        after = [(x.url, x.weight) for x in cluster.backends]
        self.assertEqual(after, [("http://127.0.0.1:9002", 3), ("http://127.0.0.1:9003", 1),
                                 ("http://[::1]:9004", 2)])
        self.assertIs(cluster.backends[0], b)  # a backend that stays keeps its state
        self.assertIs(cluster.backends[1], c)
        self.assertEqual(cluster.backends[2].id, 4)
        # Every time another thread could have looked, it saw the old list: no half-done step.
        self.assertEqual(recorder.seen, [before], "reconcile took the lock more than once")
        self.assertEqual(cluster.reconcile(specs("127.0.0.1:9002,weight=3", "127.0.0.1:9003",
                                                 "[::1]:9004,weight=2")), ([], []))

    def test_state_line_round_trip_and_a_cut_off_snapshot_is_skipped(self):
        supervisor = self.cluster("127.0.0.1:9001,weight=2", "[::1]:9002", "127.0.0.1:9003")
        a, b, c = supervisor.snapshot()
        with self.assertLogs("cclb", "WARNING"):
            supervisor.report_check(b, False, "HTTP 500", 0.001)
        supervisor.set_admin_state(c, MAINT, quiet=True)
        line = workers.state_lines(supervisor)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1, "a snapshot must be one line")
        rows = json.loads(line)
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
        expected = view(supervisor)
        wait_for(lambda: view(worker) == expected, 5, message="the worker to adopt the snapshot")

        supervisor.remove(c)
        supervisor.add(parse_backend("127.0.0.1:9004,weight=5"))
        second = workers.state_lines(supervisor)
        os.write(write_fd, second[:len(second) // 2])  # the supervisor's write was cut short
        time.sleep(0.2)
        self.assertEqual(view(worker), expected, "half a snapshot was applied")
        os.write(write_fd, second + second)  # the next rounds send it whole
        expected = view(supervisor)
        wait_for(lambda: view(worker) == expected, 5,
                 message=f"the worker to adopt the next whole snapshot: {view(worker)}")
        self.assertTrue(follower.is_alive() and not exited.is_set(),
                        "a cut-off line ended the supervisor link")
        close_write()
        self.assertTrue(exited.wait(5), "end of input: on_exit was not called")
        follower.join(5)


# --- 9. health check Host header for an IPv6 backend ------------------------------------------

class IPv6HealthHostTests(Case):

    def test_health_check_host_of_an_ipv6_backend_is_bracketed(self):
        try:
            listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError as error:
            self.skipTest(f"no IPv6: {error}")
        self.addCleanup(listener.close)
        try:
            listener.bind(("::1", 0))
        except OSError as error:
            self.skipTest(f"IPv6 loopback unavailable: {error}")
        listener.listen(8)
        listener.settimeout(5)
        port = listener.getsockname()[1]
        heads: list[bytes] = []

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(4096)
                    if not data:
                        break
                    head += data
                heads.append(head)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)

        cluster = self.cluster(f"http://[::1]:{port}")
        ok, detail, _ = probe(cluster.snapshot()[0], HealthSettings(path=HEALTH_PATH, timeout=3))
        thread.join(5)
        self.assertEqual(len(heads), 1)
        hosts = re.findall(rb"(?im)^host:[ \t]*(.*?)[ \t]*\r$", heads[0])
        self.assertEqual(hosts, [f"[::1]:{port}".encode()], heads[0])
        self.assertTrue(ok, detail)

    def test_health_check_host_of_an_ipv4_backend_is_unchanged(self):
        backend = self.raw_backend()
        cluster = self.cluster(f"127.0.0.1:{backend.port}")
        ok, detail, _ = probe(cluster.snapshot()[0], HealthSettings(path=HEALTH_PATH, timeout=3))
        self.assertTrue(ok, detail)
        self.assertIn(f"\r\nHost: 127.0.0.1:{backend.port}\r\n".encode(), backend.heads[0])


# --- 10. SIGHUP during startup --------------------------------------------------------------

class EarlySighupTests(Case):

    def test_sighup_before_the_handlers_are_installed_does_not_kill(self):
        """The access log is a FIFO: opening it blocks cclb mid-startup (after its
        listener is bound, before its signal handlers exist) until a reader comes.
        That is where the SIGHUP is sent.  (Right after spawning would be too early:
        no Python program can ignore a signal before the interpreter runs it.)"""
        backend = self.raw_backend()
        fifo = os.path.join(self.tempdir(), "access.fifo")
        os.mkfifo(fifo)
        port = free_port()
        child = ChildProcess([PYTHON, CCLB, "-p", str(port), "--host", "127.0.0.1",
                              "-b", f"127.0.0.1:{backend.port}", "--health-interval", "0",
                              "--access-log", fifo])
        self.addCleanup(child.kill)
        wait_for(lambda: accepts(port) or child.proc.poll() is not None, 10,
                 message="the listener to be bound")
        self.assertIsNone(child.proc.poll(), child.log_text())
        time.sleep(0.1)  # past the bind: blocked opening the FIFO
        self.assertEqual(child.stdout, [], "started before the access log was opened?")

        child.signal(signal.SIGHUP)
        time.sleep(0.1)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets cclb's open() go on
        stop_draining = threading.Event()
        self.addCleanup(os.close, reader)
        self.addCleanup(stop_draining.set)

        def drain() -> None:
            while not stop_draining.is_set():
                try:
                    if not os.read(reader, 65536):
                        time.sleep(0.05)
                except BlockingIOError:
                    time.sleep(0.05)
                except OSError:
                    return
        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        self.addCleanup(drainer.join, 2)

        match = child.wait_line(r"listening on http://[^:]+:(\d+)", 10)
        self.assertEqual(int(match[1]), port)
        code, _, body = http_request(port, path="/after-sighup")
        self.assertEqual(code, 200, body[:200])
        self.assertEqual(child.stop(), 0, child.log_text()[-1500:])


if __name__ == "__main__":
    unittest.main()


class OverrunningHealthCheckTest(unittest.TestCase):
    """A backend that dribbles its answer cannot keep a health-check thread alive."""

    def test_dribbling_backend_is_cut_off_at_the_deadline(self) -> None:
        import socket as socket_module
        import threading as threading_module
        import time as time_module

        from cluster import ServerCluster, parse_backend
        from health_checkers import HealthChecker, HealthSettings

        listener = socket_module.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        stop = threading_module.Event()
        self.addCleanup(stop.set)

        def dribble() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
                    if stop.wait(0.2):  # one byte every 0.2 s: each read is within the timeout
                        return
                    try:
                        conn.send(bytes([byte]))
                    except OSError:
                        return
        server = threading_module.Thread(target=dribble, daemon=True)
        server.start()
        self.addCleanup(server.join, 5)
        cluster = ServerCluster([parse_backend(f"127.0.0.1:{listener.getsockname()[1]}")])
        checker = HealthChecker(cluster, HealthSettings(interval=60, timeout=0.5))
        started = time_module.monotonic()
        checker.check_all()
        self.assertLess(time_module.monotonic() - started, 3.0)
        wait_for(lambda: not any(t.name.startswith("health-") for t in threading_module.enumerate()),
                 5, message="the health-check thread to end")
        self.assertFalse(cluster.backends[0].available)

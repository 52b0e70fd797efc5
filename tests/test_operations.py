"""Operations features end to end, with real processes and sockets: balancing
policies, health thresholds and probes, the admin API (status, Prometheus
metrics, the dashboard, backend changes, tokens, its own request handling),
the config file, SIGHUP reload, the access log (JSON, request ids, rotation).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import math
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from collections import Counter

from tests.support import (PYTHON, ROOT, Balancer, DemoServer, RawBackend, admin_call, admin_status,
                           connect, free_port, get, http_exchange, http_request, read_body,
                           read_response, read_until_close, served_by, wait_admin_port, wait_for)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import settings  # noqa: E402
from backend_urls import parse_backend  # noqa: E402
from cluster import ServerCluster  # noqa: E402
from health_checkers import HealthChecker, HealthSettings, probe  # noqa: E402

CCLB = str(ROOT / "cclb.py")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


# --- helpers -----------------------------------------------------------------

class Admin:
    """A client of the admin API."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token

    def call(self, method: str, path: str, document=None, auth: str | None = None):
        """(status, headers, body); ``auth`` None: the token if any, "": no field, else as given."""
        headers = {}
        if auth is not None:  # "" sends no Authorization field at all
            if auth:
                headers["Authorization"] = auth
        elif self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        body = None
        if document is not None:
            body = json.dumps(document).encode()
            headers["Content-Type"] = "application/json"
        elif method in ("POST", "DELETE"):
            headers["Content-Length"] = "0"
        return http_request(self.port, method, path, body=body, headers=headers)

    def json(self, method: str, path: str, document=None, auth: str | None = None):
        status, _, data = self.call(method, path, document, auth)
        return status, json.loads(data)

    def status(self) -> dict:
        status, document = self.json("GET", "/status")
        assert status == 200, status
        return document

    def backend(self, url: str) -> dict | None:
        return next((b for b in self.status()["backends"] if b["url"] == url), None)

    def metrics(self) -> str:
        status, headers, data = self.call("GET", "/metrics")
        assert status == 200, status
        return data.decode()


class Backend:
    """An in-process backend named ``name`` (a RawBackend underneath).

    - ``/hold...`` requests wait until ``release()`` (``holding`` counts them);
    - ``/code/NNN`` answers status NNN; ``/close-<name>`` closes without an answer;
    - the health path answers ``health_status``, or, when ``script_health()``
      was called, the next status put in ``health_script`` (waiting for it);
    - anything else answers 200.
    Every answer carries ``X-Backend-Server: name`` and a JSON body naming it.
    """

    def __init__(self, name: str, health_path: str = "/healthz") -> None:
        self.name = name
        self.health_path = health_path
        self.lock = threading.Lock()
        self.targets: list[str] = []  # non-health request targets, in arrival order
        self.health_times: list[float] = []  # arrival of each health check (monotonic)
        self.health_answers: list[int] = []  # statuses answered to health checks
        self.health_status = 200
        self.health_script: queue.Queue[int] | None = None
        self.holding = 0
        self.gate = threading.Event()
        self.raw = RawBackend(self.respond)
        self.port = self.raw.port
        self.url = f"http://127.0.0.1:{self.port}"

    def respond(self, head: bytes, conn: socket.socket, reader) -> bool:
        read_body(head, reader)
        target = head.split(b" ", 2)[1].decode("latin-1")
        path = target.partition("?")[0]
        status = 200
        if path == self.health_path:
            with self.lock:
                self.health_times.append(time.monotonic())
            if self.health_script is not None:
                status = self.health_script.get(timeout=20)
            else:
                status = self.health_status
        else:
            with self.lock:
                self.targets.append(target)
            if path.startswith("/hold"):
                with self.lock:
                    gate = self.gate
                    self.holding += 1
                gate.wait(20)
                with self.lock:
                    self.holding -= 1
            elif path.startswith("/code/"):
                status = int(path[6:9])
            elif path == f"/close-{self.name}":
                return False  # no answer at all
        body = json.dumps({"name": self.name, "target": target}).encode()
        extra = b"Location: /elsewhere\r\n" if 300 <= status < 400 else b""
        conn.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nX-Backend-Server: %s\r\n"
                     b"%sContent-Length: %d\r\n\r\n%s"
                     % (status, self.name.encode(), extra, len(body), body))
        if path == self.health_path:
            with self.lock:
                self.health_answers.append(status)
        return True

    def script_health(self) -> None:
        self.health_script = queue.Queue()

    def release(self) -> None:
        """Let every held request answer (later /hold requests wait again)."""
        with self.lock:
            gate, self.gate = self.gate, threading.Event()
        gate.set()

    def count(self) -> int:
        with self.lock:
            return len(self.targets)

    def heads(self) -> list[bytes]:
        with self.raw.lock:
            return list(self.raw.heads)

    def stop(self) -> None:
        self.gate.set()
        if self.health_script is not None:
            for _ in range(8):
                self.health_script.put(200)
        self.raw.stop()


class Background:
    """Run ``http_request(...)`` in a thread; ``result()`` waits for (status, headers, body)."""

    def __init__(self, *args, **kwargs) -> None:
        self.outcome: list = []
        self.thread = threading.Thread(target=self._run, args=args, kwargs=kwargs, daemon=True)
        self.thread.start()

    def _run(self, *args, **kwargs) -> None:
        try:
            self.outcome.append(http_request(*args, **kwargs))
        except Exception as error:  # noqa: BLE001 - reported by result()
            self.outcome.append(error)

    def result(self, timeout: float = 10.0):
        self.thread.join(timeout)
        if not self.outcome:
            raise AssertionError("request still pending")
        if isinstance(self.outcome[0], Exception):
            raise AssertionError(f"request failed: {self.outcome[0]!r}")
        return self.outcome[0]


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


def health_count(backend: RawBackend, path: str) -> int:
    """How many ``GET path`` requests (health checks) ``backend`` has read."""
    with backend.lock:
        return sum(1 for head in backend.heads if head.startswith(f"GET {path} ".encode()))


def toml_backends(*backends: Backend | str, weights: dict | None = None) -> str:
    urls = [b.url if isinstance(b, Backend) else b for b in backends]
    return "".join(f'[[backends]]\nurl = "{url}"\nweight = {(weights or {}).get(url, 1)}\n'
                   for url in urls)


class OperationsCase(unittest.TestCase):
    """Starts backends and balancers with cleanups registered."""

    def backend(self, name: str, health_path: str = "/healthz") -> Backend:
        backend = Backend(name, health_path)
        self.addCleanup(backend.stop)
        return backend

    def raw_backend(self) -> RawBackend:
        """A ``RawBackend`` answering 200 to everything."""
        backend = RawBackend()
        self.addCleanup(backend.stop)
        return backend

    def cluster(self, *texts: str, **params) -> ServerCluster:
        """An in-process cluster of ``parse_backend`` specs, closed at cleanup."""
        cluster = ServerCluster([parse_backend(text) for text in texts], **params)
        self.addCleanup(cluster.close)
        return cluster

    def demos(self, *names: str) -> list[DemoServer]:
        """server.py processes, started in parallel."""
        servers: dict[str, DemoServer] = {}
        errors: list[BaseException] = []

        def start(name: str) -> None:
            try:
                servers[name] = DemoServer(name=name)
            except BaseException as error:  # noqa: BLE001 - re-raised below
                errors.append(error)
        threads = [threading.Thread(target=start, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for server in servers.values():
            self.addCleanup(server.kill)
        if errors:
            raise errors[0]
        return [servers[name] for name in names]

    def balancer(self, backends, *extra: str) -> Balancer:
        balancer = Balancer(backends, *extra)
        self.addCleanup(balancer.kill)
        return balancer

    def with_admin(self, backends, *extra: str, token: str | None = None) -> tuple[Balancer, Admin]:
        args = ["--admin-port", "0"] + (["--admin-token", token] if token else [])
        balancer = self.balancer(backends, *args, *extra)
        return balancer, Admin(wait_admin_port(balancer), token)

    def tempdir(self) -> str:
        # Chromium's helper processes may still write to a profile here for a moment after
        # the browser exits (the soak run caught "Directory not empty").
        directory = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self.addCleanup(directory.cleanup)
        return directory.name

    def hold_one(self, port: int, backends: list[Backend]) -> tuple[Background, Backend]:
        """Start a /hold request; returns it and the backend holding it."""
        pending = Background(port, path="/hold")
        holder = wait_for(lambda: next((b for b in backends if b.holding), None), 5,
                          message="the held request to reach a backend")
        return pending, holder

    @staticmethod
    def settle(admin: Admin, in_flight: int) -> None:
        """Wait until the balancer counts ``in_flight`` requests in flight in all.

        A backend's count drops just after the client has its answer, so a
        client's next request can overtake it; policies reading in-flight
        counts are only deterministic once they have settled.
        """
        wait_for(lambda: sum(b["in_flight"] for b in admin.status()["backends"]) == in_flight,
                 5, message=f"{in_flight} request(s) in flight")

    @staticmethod
    def settled_status(admin: Admin, answered: int) -> dict[str, dict]:
        """/status backends by URL once ``answered`` answers are counted and none is in flight."""
        def check():
            entries = {entry["url"]: entry for entry in admin.status()["backends"]}
            done = sum(entry["requests"] for entry in entries.values())
            idle = all(entry["in_flight"] == 0 for entry in entries.values())
            return entries if done >= answered and idle else None
        return wait_for(check, 5, message=f"{answered} answers counted")

    def one_at_a_time(self, port: int, admin: Admin, held: int, count: int, tag: str) -> list[str]:
        """``count`` sequential requests, each sent once the in-flight counts have settled."""
        names = []
        for number in range(count):
            self.settle(admin, held)
            names.append(served_by(port, f"/{tag}{number}"))
        return names


# --- balancing policies --------------------------------------------------------

class PolicyTests(OperationsCase):

    def test_weighted_round_robin_is_smooth(self):
        """Weights 5:1:1 give exactly a a b a c a a, again and again (nginx's smooth WRR)."""
        a, b, c = self.demos("a", "b", "c")
        balancer = self.balancer(
            [f"http://127.0.0.1:{a.port},weight=5", f"http://127.0.0.1:{b.port},weight=1",
             f"http://127.0.0.1:{c.port},weight=1"],
            "--algorithm", "weighted-round-robin", "--health-interval", "0")
        conn = http.client.HTTPConnection("127.0.0.1", balancer.port, timeout=10)
        self.addCleanup(conn.close)
        sequence = ""
        for _ in range(21):
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            self.assertEqual(response.status, 200)
            sequence += response.headers["X-Backend-Server"]
        self.assertEqual(sequence, "aabacaa" * 3)

    def test_least_connections_sends_new_requests_to_the_idle_backend(self):
        """least-connections: while one backend holds a request, every new one goes to the other."""
        x, y = self.backend("x"), self.backend("y")
        balancer, admin = self.with_admin([x.url, y.url], "--algorithm", "least-connections",
                                          "--health-interval", "0")
        pending, busy = self.hold_one(balancer.port, [x, y])
        idle = y if busy is x else x
        answered = self.one_at_a_time(balancer.port, admin, 1, 8, "n")
        self.assertEqual(answered, [idle.name] * 8)
        busy.release()
        status, headers, _ = pending.result()
        self.assertEqual((status, headers["X-Backend-Server"]), (200, busy.name))
        # Both idle again: ties go round robin, strictly alternating.
        after = self.one_at_a_time(balancer.port, admin, 0, 4, "t")
        self.assertEqual(Counter(after), Counter({"x": 2, "y": 2}), after)
        self.assertNotEqual(after[0], after[1])

    def test_ip_hash_keeps_each_client_on_one_backend_and_remaps_only_removed_ones(self):
        """ip-hash: a client address always lands on the same backend; removing a backend
        moves only the clients that were on it (each client here: its own 127.0.0.N address)."""
        backends = [self.backend(name) for name in ("p", "q", "r")]
        balancer, admin = self.with_admin([b.url for b in backends], "--algorithm", "ip-hash",
                                          "--health-interval", "0")
        clients = [f"127.0.0.{n}" for n in range(2, 22)]
        placement = {}
        for client in clients:
            seen = {served_by(balancer.port, f"/c{i}", source=client) for i in range(3)}
            self.assertEqual(len(seen), 1, f"{client} was sent to {seen}")
            placement[client] = seen.pop()
        # The same client keeps its backend over many requests (one keep-alive connection).
        conn = http.client.HTTPConnection("127.0.0.1", balancer.port, timeout=10,
                                          source_address=(clients[0], 0))
        self.addCleanup(conn.close)
        for _ in range(30):
            conn.request("GET", "/again")
            response = conn.getresponse()
            response.read()
            self.assertEqual(response.headers["X-Backend-Server"], placement[clients[0]])
        load = Counter(placement.values())
        self.assertGreaterEqual(len(load), 2, f"20 clients all hashed to one backend: {load}")
        victim_name = load.most_common(1)[0][0]
        victim = next(b for b in backends if b.name == victim_name)
        status, _ = admin.json("DELETE", f"/backends/{admin.backend(victim.url)['id']}")
        self.assertEqual(status, 200)
        for client in clients:
            now = served_by(balancer.port, "/after", source=client)
            if placement[client] == victim_name:
                self.assertNotEqual(now, victim_name)
            else:
                self.assertEqual(now, placement[client], f"{client} moved although its backend stayed")

    def test_random_two_spreads_and_never_picks_the_busier_of_two(self):
        """random-two: sequential requests reach every backend; a backend holding a request
        loses every comparison with an idle one, so it gets nothing new."""
        backends = [self.backend(name) for name in ("u", "v", "w")]
        balancer, admin = self.with_admin([b.url for b in backends], "--algorithm", "random-two",
                                          "--health-interval", "0")
        spread = Counter(served_by(balancer.port, f"/s{i}") for i in range(60))
        self.assertEqual(set(spread), {"u", "v", "w"}, spread)
        self.assertGreaterEqual(min(spread.values()), 5, spread)
        pending, busy = self.hold_one(balancer.port, backends)
        during = Counter(self.one_at_a_time(balancer.port, admin, 1, 30, "d"))
        self.assertNotIn(busy.name, during)
        self.assertEqual(len(during), 2, during)
        busy.release()
        self.assertEqual(pending.result()[0], 200)


# --- health semantics ------------------------------------------------------------

class HealthTests(OperationsCase):

    def test_rise_and_fall_count_consecutive_results(self):
        """--fall 2: DOWN only after two failures in a row; --rise 2: UP only after two passes
        in a row (seen in /status, the DOWN/UP log lines and the traffic)."""
        backend = self.backend("h")
        backend.script_health()
        balancer, admin = self.with_admin(
            [backend.url], "--rise", "2", "--fall", "2", "--health-interval", "0.2",
            # A check waits for the script's next answer: the first one starts with the
            # balancer, so its timeout must outlast a slow start (5 s was cut off once in 20
            # soak runs, and the answer went to a closed check).
            "--health-path", "/healthz", "--health-timeout", "15")
        steps = [  # (answer to the next check, state after it)
            (200, "up"), (500, "up"), (200, "up"), (503, "up"), (502, "down"),
            (204, "down"), (500, "down"), (201, "down"), (202, "up")]
        for number, (code, expected) in enumerate(steps, 1):
            backend.health_script.put(code)
            wait_for(lambda: len(backend.health_answers) >= number, 5,
                     message=f"health check {number} answered")
            entry = wait_for(lambda: (lambda b: b if b["last_check"] == f"HTTP {code}" else None)(
                admin.backend(backend.url)), 5, message=f"/status to show check {number}")
            self.assertEqual(entry["state"], expected, f"after check {number} ({code})")
            downs = balancer.log_text().count(f"backend {backend.url} is DOWN")
            if expected == "up" and number < 5:
                self.assertEqual(downs, 0, balancer.log_text())
            if number == 5:
                wait_for(lambda: "is DOWN: HTTP 502" in balancer.log_text(), 5,
                         message="the DOWN log line")
                status, headers, _ = http_request(balancer.port, path="/while-down")
                self.assertEqual(status, 503, "a DOWN backend was given a request")
            if number == 8:
                self.assertNotIn("is UP again", balancer.log_text())
        wait_for(lambda: "is UP again" in balancer.log_text(), 5, message="the UP log line")
        log_text = balancer.log_text()
        self.assertEqual(log_text.count(f"backend {backend.url} is DOWN"), 1, log_text)
        self.assertEqual(log_text.count(f"backend {backend.url} is UP again"), 1, log_text)
        self.assertEqual(served_by(balancer.port, "/back"), "h")

    def test_health_status_range_decides_what_passes(self):
        """--health-status 200-299 makes a 302 health answer fail; the default 200-399 passes it."""
        backend = self.backend("redirecting")
        backend.health_status = 302
        strict, strict_admin = self.with_admin(
            [backend.url], "--health-status", "200-299", "--health-interval", "0.1",
            "--health-path", "/healthz")
        lenient, lenient_admin = self.with_admin(
            [backend.url], "--health-interval", "0.1", "--health-path", "/healthz")
        down = wait_for(lambda: (lambda b: b if b["state"] == "down" else None)(
            strict_admin.backend(backend.url)), 5, message="the strict balancer to mark it down")
        self.assertEqual(down["last_check"], "HTTP 302")
        wait_for(lambda: "is DOWN: HTTP 302" in strict.log_text(), 5, message="the DOWN log line")
        self.assertEqual(http_request(strict.port, path="/x")[0], 503)
        checked = wait_for(lambda: (lambda b: b if b["last_check"] == "HTTP 302" else None)(
            lenient_admin.backend(backend.url)), 5, message="the lenient balancer's check")
        self.assertEqual(checked["state"], "up")
        self.assertEqual(http_request(lenient.port, path="/x")[0], 200)
        self.assertEqual(strict_admin.status()["settings"]["health_status"], "200-299")


class HealthProbeTests(OperationsCase):
    """One active check (``probe``, ``HealthChecker``) in-process against a scripted listener."""

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
        ok, detail, _ = probe(cluster.snapshot()[0], HealthSettings(path="/hc", timeout=3))
        thread.join(5)
        self.assertEqual(len(heads), 1)
        hosts = re.findall(rb"(?im)^host:[ \t]*(.*?)[ \t]*\r$", heads[0])
        self.assertEqual(hosts, [f"[::1]:{port}".encode()], heads[0])
        self.assertTrue(ok, detail)

    def test_health_check_host_of_an_ipv4_backend_is_unchanged(self):
        backend = self.raw_backend()
        cluster = self.cluster(f"127.0.0.1:{backend.port}")
        ok, detail, _ = probe(cluster.snapshot()[0], HealthSettings(path="/hc", timeout=3))
        self.assertTrue(ok, detail)
        self.assertIn(f"\r\nHost: 127.0.0.1:{backend.port}\r\n".encode(), backend.heads[0])

    def test_dribbling_backend_is_cut_off_at_the_deadline(self) -> None:
        """A backend dribbling its answer cannot keep a health-check thread alive."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        stop = threading.Event()
        self.addCleanup(stop.set)

        def dribble() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
                    # The behaviour under test: one byte every 0.2 s, so each read is
                    # within the timeout and only an overall deadline can stop the check.
                    if stop.wait(0.2):
                        return
                    try:
                        conn.send(bytes([byte]))
                    except OSError:
                        return
        server = threading.Thread(target=dribble, daemon=True)
        server.start()
        self.addCleanup(server.join, 5)
        cluster = self.cluster(f"127.0.0.1:{listener.getsockname()[1]}")
        checker = HealthChecker(cluster, HealthSettings(interval=60, timeout=0.5))
        started = time.monotonic()
        checker.check_all()
        self.assertLess(time.monotonic() - started, 3.0)
        wait_for(lambda: not any(t.name.startswith("health-") for t in threading.enumerate()),
                 5, message="the health-check thread to end")
        self.assertFalse(cluster.backends[0].available)


# --- admin API --------------------------------------------------------------------

SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*,?)?)\})?'
    r' (?P<value>[^ ]+)(?: -?\d+)?$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_prometheus(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """Parse the text exposition format line by line, strictly; returns (types, samples).

    Every sample must follow the ``# HELP`` and ``# TYPE`` lines of its own
    family, and the samples of a family must be contiguous.
    """
    assert text.endswith("\n"), "the exposition must end with a newline"
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    samples = []
    current = None
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name), where
            assert name not in helps, f"second HELP for {name}, {where}"
            assert help_text.strip(), f"empty HELP, {where}"
            helps[name] = help_text
            current = None
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name in helps, f"TYPE before HELP, {where}"
            assert name not in types, f"second TYPE for {name}, {where}"
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), where
            types[name] = kind
            current = name
        elif line.startswith("#"):
            continue
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample, {where}"
            name = match["name"]
            family = name
            if current and types[current] == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    if name == current + suffix:
                        family = current
            assert family == current, f"sample outside its family's HELP/TYPE block, {where}"
            labels = dict(LABEL.findall(match["labels"] or ""))
            value = float(match["value"])  # also accepts +Inf, -Inf, NaN
            samples.append((name, labels, value))
    return types, samples


class AdminTests(OperationsCase):

    def test_status_document_lists_every_backend_policy_and_settings(self):
        """GET /status: JSON with each backend's id, url, weight, state, since, last check and
        its latency, in flight, responses, failures, retries; the policy; the settings."""
        a, b = self.backend("a"), self.backend("b")
        balancer, admin = self.with_admin(
            [a.url, f"{b.url},weight=3"], "--health-interval", "0.2", "--health-path", "/healthz",
            "--algorithm", "weighted-round-robin", "--admin-token", "t0ps3cret")
        status, headers, data = admin.call("GET", "/status")
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("application/json"), headers)
        self.assertNotIn(b"t0ps3cret", data, "the admin token leaks through an unauthenticated GET")
        wait_for(lambda: all(entry["last_check"] for entry in admin.status()["backends"]), 5,
                 message="a health check of each backend")
        document = admin.status()
        self.assertEqual(document["policy"], "weighted-round-robin")
        settings = document["settings"]
        self.assertEqual((settings["algorithm"], settings["health_interval"],
                          settings["health_path"]), ("weighted-round-robin", 0.2, "/healthz"))
        self.assertIn("read_timeout", settings)
        backends = document["backends"]
        self.assertEqual([entry["url"] for entry in backends], [a.url, b.url])
        self.assertEqual([entry["weight"] for entry in backends], [1, 3])
        self.assertEqual(len({entry["id"] for entry in backends}), 2)
        for entry in backends:
            for key in ("id", "url", "weight", "state", "since", "last_check",
                        "last_check_latency_ms", "in_flight", "responses", "failures", "retries"):
                self.assertIn(key, entry)
            self.assertIsInstance(entry["id"], int)
            self.assertEqual(entry["state"], "up")
            self.assertTrue(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["since"]), entry)
            self.assertEqual(entry["last_check"], "HTTP 200")
            self.assertIsInstance(entry["last_check_latency_ms"], (int, float))
            self.assertGreaterEqual(entry["last_check_latency_ms"], 0)
            self.assertEqual((entry["in_flight"], entry["failures"], entry["retries"]), (0, 0, 0))
            self.assertIsInstance(entry["responses"], dict)

    def test_status_counters_follow_traffic(self):
        """Responses by status class, failures and retries in /status move with real traffic."""
        a, b = self.backend("a"), self.backend("b")
        dead = free_port()
        dead_url = f"http://127.0.0.1:{dead}"
        balancer, admin = self.with_admin([a.url, b.url, dead_url], "--health-interval", "0")
        before = {entry["url"]: entry for entry in admin.status()["backends"]}
        self.assertEqual(before[a.url]["responses"], {})
        answers = [http_request(balancer.port, path=path)[0]
                   for path in ("/1", "/2", "/3", "/code/404", "/5", "/code/503", "/7", "/8")]
        self.assertEqual(answers, [200, 200, 200, 404, 200, 503, 200, 200])
        after = self.settled_status(admin, 8)
        served = Counter()
        for url in (a.url, b.url):
            for status_class, count in after[url]["responses"].items():
                served[status_class] += count
            self.assertEqual(after[url]["in_flight"], 0)
            self.assertEqual((after[url]["failures"], after[url]["retries"]), (0, 0))
        self.assertEqual(served, Counter({"2xx": 6, "4xx": 1, "5xx": 1}))
        self.assertEqual(sum(after[url]["requests"] for url in (a.url, b.url)), a.count() + b.count())
        # The refused backend: one failure, retried on another backend, then out (passive check).
        self.assertEqual((after[dead_url]["failures"], after[dead_url]["retries"]), (1, 1))
        self.assertEqual(after[dead_url]["state"], "down")
        self.assertEqual(after[dead_url]["responses"], {})

    def test_metrics_parse_as_prometheus_text_line_by_line(self):
        """GET /metrics is valid Prometheus text (HELP/TYPE per family, cumulative buckets
        ending in +Inf equal to _count) with the documented families and true values."""
        a, b = self.backend("a"), self.backend("b")
        dead_url = f"http://127.0.0.1:{free_port()}"
        balancer, admin = self.with_admin([a.url, b.url], "--health-interval", "0.2",
                                          "--health-path", "/healthz", "--max-fails", "0")
        wait_for(lambda: len(a.health_answers) >= 1 and len(b.health_answers) >= 1, 5,
                 message="one health check each")
        answers = [http_request(balancer.port, path=path)[0]
                   for path in ("/1", "/2", "/3", "/4", "/code/404", "/6", "/close-a")]
        # /close-a: backend a hangs up without answering; the GET is retried on b.
        self.assertEqual(answers, [200, 200, 200, 200, 404, 200, 200])
        # A third backend added later and refused: active checks take it down.
        self.assertEqual(admin.json("POST", "/backends", {"url": dead_url})[0], 201)
        wait_for(lambda: (admin.backend(dead_url) or {}).get("state") == "down", 5,
                 message="the refused backend to be down")
        self.settled_status(admin, 7)
        status, headers, _ = admin.call("GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/plain"), headers)
        self.assertIn("version=0.0.4", headers["Content-Type"])
        types, samples = parse_prometheus(admin.metrics())
        expected_types = {"cclb_requests_total": "counter", "cclb_backend_up": "gauge",
                          "cclb_in_flight": "gauge", "cclb_request_duration_seconds": "histogram",
                          "cclb_health_checks_total": "counter", "cclb_retries_total": "counter"}
        for name, kind in expected_types.items():
            self.assertEqual(types.get(name), kind, name)
        for name, kind in types.items():
            if kind == "counter":
                self.assertTrue(name.endswith("_total"), name)

        def values(name: str) -> dict[tuple, float]:
            return {tuple(sorted(labels.items())): value
                    for sample, labels, value in samples if sample == name}

        requests = values("cclb_requests_total")
        for key in requests:
            self.assertEqual({label for label, _ in key}, {"backend", "code"}, key)
        self.assertEqual(requests[(("backend", a.url), ("code", "200"))]
                         + requests[(("backend", b.url), ("code", "200"))], 6)
        self.assertEqual(sum(v for k, v in requests.items() if ("code", "404") in k), 1)
        self.assertEqual(values("cclb_backend_up"),
                         {(("backend", a.url),): 1.0, (("backend", b.url),): 1.0,
                          (("backend", dead_url),): 0.0})
        self.assertEqual(set(values("cclb_in_flight").values()), {0.0})
        retries = values("cclb_retries_total")
        self.assertEqual(set(retries), {(("backend", url),) for url in (a.url, b.url, dead_url)})
        self.assertGreaterEqual(sum(retries.values()), 1)
        checks = values("cclb_health_checks_total")
        self.assertGreaterEqual(checks[(("backend", a.url), ("result", "pass"))], 1)
        self.assertGreaterEqual(checks[(("backend", dead_url), ("result", "fail"))], 1)
        for key in checks:
            self.assertIn(dict(key)["result"], ("pass", "fail"))
        # Histogram: per backend, le increasing, cumulative counts, +Inf last and == _count.
        counts = values("cclb_request_duration_seconds_count")
        sums = values("cclb_request_duration_seconds_sum")
        for url in (a.url, b.url):
            buckets = [(labels["le"], value) for name, labels, value in samples
                       if name == "cclb_request_duration_seconds_bucket" and labels["backend"] == url]
            self.assertGreater(len(buckets), 1)
            bounds = [float(le) for le, _ in buckets]
            self.assertEqual(bounds, sorted(bounds))
            self.assertEqual(len(set(bounds)), len(bounds))
            self.assertEqual(buckets[-1][0], "+Inf")
            cumulative = [value for _, value in buckets]
            self.assertEqual(cumulative, sorted(cumulative), f"buckets not cumulative for {url}")
            self.assertEqual(cumulative[-1], counts[(("backend", url),)])
            self.assertEqual(counts[(("backend", url),)],
                             sum(v for k, v in requests.items() if ("backend", url) in k))
            self.assertGreaterEqual(sums[(("backend", url),)], 0)
            self.assertTrue(math.isfinite(sums[(("backend", url),)]))
        self.assertEqual(sum(counts[(("backend", url),)] for url in (a.url, b.url)), 7)

    def test_dashboard_is_self_contained_and_reads_fields_status_has(self):
        """GET / is an HTML page with no external asset that polls `status`; every field its
        script reads exists in the /status JSON."""
        a = self.backend("a")
        balancer, admin = self.with_admin([a.url], "--health-interval", "0")
        status, headers, data = admin.call("GET", "/")
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/html"), headers)
        page = data.decode()
        self.assertIn("<html", page.lower())
        self.assertIn("status", page)
        self.assertIsNone(re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I))
        self.assertIsNone(re.search(r"""url\(\s*["']?\s*(?:https?:)?//""", page, re.I))
        self.assertIsNone(re.search(r"@import", page))
        polled = re.findall(r"""fetch\(\s*["']([^"']+)["']""", page)
        self.assertTrue(polled, "the dashboard fetches nothing")
        for target in polled:
            self.assertIn("status", target)
            absolute = target if target.startswith("/") else "/" + target
            code, response_headers, body = admin.call("GET", absolute)
            self.assertEqual(code, 200, absolute)
            document = json.loads(body)
        backend_fields = set(document["backends"][0])
        used = set(re.findall(r"\bb\.([A-Za-z_]+)", page))
        self.assertTrue(used)
        self.assertLessEqual(used, backend_fields, "the dashboard reads fields /status lacks")
        # "frontend" is optional (the proxy's own numbers); the page draws it only if present.
        self.assertLessEqual(set(re.findall(r"\bstatus\.([A-Za-z_]+)", page)),
                             set(document) | {"frontend"})
        self.assertLessEqual(set(re.findall(r"\bhistory\.([A-Za-z_]+)", page)),
                             set(document["history"]))
        self.assertLessEqual(set(re.findall(r"""\br\[\s*["'](\w+)["']\s*\]""", page)),
                             {"1xx", "2xx", "3xx", "4xx", "5xx"})

    def test_dashboard_renders_backends_in_a_headless_browser(self):
        """In headless Chromium: every backend's row, the four SVG charts with their lines
        (total and per backend), no horizontal scrolling at 1280 px nor at 390 px; the drain
        button drains, asking for the admin token once (on the 401), ready then needs no prompt."""
        from tests.browser import DevToolsPage, find_browser
        executable = find_browser()
        if executable is None:
            self.skipTest("no headless browser installed: none of chromium, chromium-browser, "
                          "google-chrome on PATH")
        a, b = self.backend("a"), self.backend("b")
        balancer, admin = self.with_admin([a.url, b.url], "--health-interval", "0", token="t0k3n")
        for i in range(6):
            served_by(balancer.port, f"/warm{i}")
        page = DevToolsPage(executable, self.tempdir())
        self.addCleanup(page.close)
        page.call("Page.enable")
        page.call("Page.navigate", {"url": f"http://127.0.0.1:{admin.port}/"})
        wait_for(lambda: page.evaluate("document.querySelectorAll('#rows tr').length") == 2, 20,
                 message="the backends' rows")
        rows = page.evaluate("document.getElementById('rows').innerHTML")
        for url in (a.url, b.url):
            self.assertIn(url, rows, "the script did not render the backends")
        self.assertIn('class="state up"', rows)
        self.assertEqual(page.evaluate("document.getElementById('error').textContent"), "")
        self.assertEqual(page.evaluate("[...document.querySelectorAll('#charts svg')]"
                                       ".map(s => s.dataset.series).join()"),
                         "rps,p50_ms,p99_ms,error_rate")
        # The first sample comes one interval (5 s) after the admin server started.
        drawn = ("[...document.querySelectorAll('#charts svg[data-series=rps] path')]"
                 ".map(p => p.dataset.name).sort().join()")
        wait_for(lambda: page.evaluate(drawn) == ",".join(sorted([a.url, b.url, "total"])), 20,
                 message="the requests/s chart's lines (total and each backend)")
        self.assertRegex(page.evaluate("document.querySelector('#charts path.total')"
                                       ".getAttribute('d')"), r"^M[\d.]+ [\d.]+")
        self.assertNotEqual(page.evaluate("document.getElementById('total-rps').textContent"), "-")
        no_scroll = "document.documentElement.scrollWidth <= window.innerWidth"
        self.assertGreaterEqual(page.evaluate("window.innerWidth"), 1200)
        self.assertTrue(page.evaluate(no_scroll), "horizontal scrolling at 1280 px")
        page.call("Emulation.setDeviceMetricsOverride",
                  {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
        self.assertEqual(page.evaluate("window.innerWidth"), 390)
        self.assertTrue(page.evaluate(no_scroll), "horizontal scrolling on a 390 px phone")
        page.call("Emulation.clearDeviceMetricsOverride")
        # drain: 401 first, the page asks for the token, then the write goes through.
        a_id = admin.backend(a.url)["id"]
        button = "document.querySelector('button[data-action={}][data-id=\"%d\"]')" % a_id
        page.evaluate(button.format("drain") + ".click()")
        dialog = page.wait_event("Page.javascriptDialogOpening")
        self.assertEqual(dialog["params"]["type"], "prompt")
        page.call("Page.handleJavaScriptDialog", {"accept": True, "promptText": "t0k3n"})
        wait_for(lambda: admin.backend(a.url)["state"] == "drain", 10, message="a drained")
        wait_for(lambda: page.evaluate(button.format("drain") + ".disabled"), 10,
                 message="the page to show the drain")
        self.assertIn("is now drain", page.evaluate("document.getElementById('note').textContent"))
        # ready: the token is remembered, no second prompt.
        page.evaluate(button.format("ready") + ".click()")
        wait_for(lambda: admin.backend(a.url)["state"] == "up", 10, message="a ready again")
        self.assertEqual(admin.backend(b.url)["state"], "up")
        self.assertFalse([e for e in page.events if e["method"] == "Page.javascriptDialogOpening"])

    def test_add_and_remove_backends(self):
        """POST /backends adds one (traffic reaches it); DELETE /backends/<id> removes one
        (traffic stops); bad requests get 400/404/409 and change nothing."""
        a, b = self.backend("a"), self.backend("b")
        balancer, admin = self.with_admin([a.url], "--health-interval", "0")
        self.assertEqual({served_by(balancer.port) for _ in range(3)}, {"a"})
        status, added = admin.json("POST", "/backends", {"url": b.url, "weight": 2})
        self.assertEqual(status, 201)
        self.assertEqual((added["url"], added["weight"], added["state"]), (b.url, 2, "up"))
        self.assertIsInstance(added["id"], int)
        self.assertEqual([entry["url"] for entry in admin.status()["backends"]], [a.url, b.url])
        self.assertEqual(set(served_by(balancer.port, f"/after-add{i}") for i in range(4)), {"a", "b"})
        for document, expected in (({"url": b.url}, 409), ({"url": "ftp://127.0.0.1:1"}, 400),
                                   ({"url": "http://127.0.0.1:80/path"}, 400),
                                   ({"url": b.url, "weight": "2"}, 400), ({"weight": 2}, 400),
                                   ([b.url], 400)):
            self.assertEqual(admin.json("POST", "/backends", document)[0], expected, document)
        status, _, _ = admin.call("POST", "/backends", None)
        self.assertEqual(status, 400)
        self.assertEqual(admin.json("DELETE", "/backends/9999")[0], 404)
        self.assertEqual(admin.json("POST", "/backends/9999/drain")[0], 404)
        self.assertEqual(admin.json("POST", "/nothing")[0], 404)
        self.assertEqual(len(admin.status()["backends"]), 2)
        a_id = admin.backend(a.url)["id"]
        status, removed = admin.json("DELETE", f"/backends/{a_id}")
        self.assertEqual(status, 200)
        self.assertEqual([entry["url"] for entry in admin.status()["backends"]], [b.url])
        before = a.count()
        self.assertEqual({served_by(balancer.port, f"/after-delete{i}") for i in range(6)}, {"b"})
        self.assertEqual(a.count(), before)

    def test_drain_maint_ready_and_delete_let_in_flight_requests_finish(self):
        """drain: the request in flight completes with 200 while new ones avoid the backend;
        maint keeps it out; ready brings it back; DELETE too lets its in-flight request finish."""
        x, y = self.backend("x"), self.backend("y")
        balancer, admin = self.with_admin([x.url, y.url], "--health-interval", "0")
        pending, busy = self.hold_one(balancer.port, [x, y])
        other = y if busy is x else x
        busy_id = admin.backend(busy.url)["id"]
        self.assertEqual(admin.backend(busy.url)["in_flight"], 1)
        self.assertIn(f'cclb_in_flight{{backend="{busy.url}"}} 1', admin.metrics())
        status, drained = admin.json("POST", f"/backends/{busy_id}/drain")
        self.assertEqual((status, drained["state"]), (200, "drain"))
        before = busy.count()
        self.assertEqual({served_by(balancer.port, f"/d{i}") for i in range(8)}, {other.name})
        self.assertEqual(busy.count(), before)
        busy.release()
        status, headers, body = pending.result()
        self.assertEqual((status, json.loads(body)["name"]), (200, busy.name))
        wait_for(lambda: admin.backend(busy.url)["in_flight"] == 0, 5, message="in_flight back to 0")
        self.assertEqual(admin.backend(busy.url)["state"], "drain")
        self.assertEqual(admin.json("POST", f"/backends/{busy_id}/maint")[1]["state"], "maint")
        self.assertEqual({served_by(balancer.port, f"/m{i}") for i in range(4)}, {other.name})
        self.assertIn(f'cclb_backend_up{{backend="{busy.url}"}} 0', admin.metrics())
        self.assertEqual(admin.json("POST", f"/backends/{busy_id}/ready")[1]["state"], "up")
        self.assertEqual({served_by(balancer.port, f"/r{i}") for i in range(4)}, {"x", "y"})
        log_text = wait_for(lambda: (lambda t: t if "set to ready" in t else None)(balancer.log_text()),
                            5, message="admin state changes in the log")
        self.assertIn(f"backend {busy.url} set to drain", log_text)
        # DELETE while a request is in flight on the backend.
        pending, busy = self.hold_one(balancer.port, [x, y])
        other = y if busy is x else x
        self.assertEqual(admin.json("DELETE", f"/backends/{admin.backend(busy.url)['id']}")[0], 200)
        self.assertEqual({served_by(balancer.port, f"/x{i}") for i in range(4)}, {other.name})
        busy.release()
        status, _, body = pending.result()
        self.assertEqual((status, json.loads(body)["name"]), (200, busy.name))

    def test_token_required_for_writes_only(self):
        """--admin-token: writes without it or with a wrong one are 401 and change nothing;
        with it they succeed; GETs stay open."""
        a, b = self.backend("a"), self.backend("b")
        balancer, admin = self.with_admin([a.url], "--health-interval", "0", token="s3cret-token")
        a_id = admin.backend(a.url)["id"]
        writes = [("POST", "/backends", {"url": b.url}), ("POST", f"/backends/{a_id}/drain", None),
                  ("POST", f"/backends/{a_id}/maint", None), ("POST", f"/backends/{a_id}/ready", None),
                  ("DELETE", f"/backends/{a_id}", None)]
        for method, path, document in writes:
            for auth in ("", "Bearer wrong", "Bearer s3cret-token-and-more", "Bearer s3cret-toke",
                         "Basic czNjcmV0LXRva2Vu", "s3cret-token"):
                status, headers, body = admin.call(method, path, document, auth=auth)
                self.assertEqual(status, 401, f"{method} {path} with Authorization {auth!r}")
                self.assertIn("Bearer", headers.get("WWW-Authenticate", ""))
        document = admin.status()
        self.assertEqual([(e["url"], e["state"]) for e in document["backends"]], [(a.url, "up")])
        for path in ("/", "/status", "/metrics"):
            self.assertEqual(admin.call("GET", path, auth="")[0], 200, path)
        self.assertEqual(admin.json("POST", "/backends", {"url": b.url})[0], 201)
        self.assertEqual(admin.json("POST", f"/backends/{a_id}/drain")[0], 200)
        self.assertEqual(admin.json("DELETE", f"/backends/{a_id}")[0], 200)
        self.assertEqual([e["url"] for e in admin.status()["backends"]], [b.url])

    def test_non_loopback_admin_without_token_is_refused(self):
        """--admin-host 0.0.0.0 without --admin-token: exit 2 with a message, before listening."""
        result = subprocess.run(
            [PYTHON, CCLB, "-p", "0", "--host", "127.0.0.1", "-b", "127.0.0.1:9",
             "--admin-port", "0", "--admin-host", "0.0.0.0", "--health-interval", "0"],
            cwd=ROOT, capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("--admin-token", result.stderr)
        self.assertIn("0.0.0.0", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertNotIn("listening", result.stdout)

    def test_admin_add_of_an_existing_url_is_409_and_concurrent_adds_make_one(self):
        backend = self.raw_backend()
        balancer = self.balancer([backend.port], "--admin-port", "0", "--health-interval", "0",
                                 "--access-log", "off")
        admin = wait_admin_port(balancer)
        for url in (f"http://127.0.0.1:{backend.port}", f"127.0.0.1:{backend.port}",
                    f"http://127.0.0.1:{backend.port}/"):
            with self.subTest(url=url):
                self.assertEqual(admin_call(self, balancer, admin, "POST", "/backends",
                                            json.dumps({"url": url}).encode(),
                                            {"Content-Type": "application/json"})[0], 409)

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
        urls = [b["url"] for b in admin_status(self, balancer, admin)["backends"]]
        self.assertEqual(len(urls), len(set(urls)), urls)
        self.assertEqual(len(urls), 6)


class AdminRequestHardeningTests(OperationsCase):
    """The admin API's own HTTP handling: a write closes the connection (a body can
    never hide a second request), ids and JSON are bounded."""

    def setUp(self):
        self.backend = self.raw_backend()
        self.lb = self.balancer([self.backend.port], "--admin-port", "0", "--health-interval", "0",
                                "--access-log", "off")
        self.admin = wait_admin_port(self.lb)

    def assert_no_traceback(self):
        """No handler traceback: stop the balancer first, so that its stderr is read to the end."""
        self.lb.stop()
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
        document = admin_status(self, self.lb, self.admin)
        self.assertEqual([b["id"] for b in document["backends"]], [1],
                         "the request hidden in the body removed the backend")
        self.assertNotIn("removed by the admin API", self.lb.log_text())

    def test_huge_backend_id_is_404(self):
        huge = "1" * 5000
        for method, path in (("DELETE", f"/backends/{huge}"), ("POST", f"/backends/{huge}/drain")):
            with self.subTest(method=method):
                code, headers, body = admin_call(self, self.lb, self.admin, method, path)
                self.assertEqual(code, 404, body[:200])
                self.assertEqual(headers.get("Connection", "").lower(), "close")
        self.assertEqual(len(admin_status(self, self.lb, self.admin)["backends"]), 1)
        self.assert_no_traceback()

    def test_deeply_nested_json_is_400(self):
        code, _, body = admin_call(self, self.lb, self.admin, "POST", "/backends", b"[" * 50000,
                                   {"Content-Type": "application/json"})
        self.assertEqual(code, 400, body[:200])
        self.assertTrue(json.loads(body)["error"])
        self.assertEqual(len(admin_status(self, self.lb, self.admin)["backends"]), 1)
        self.assert_no_traceback()


# --- the configuration file --------------------------------------------------------

class ConfigFileTests(OperationsCase):

    def test_file_settings_apply_and_command_line_overrides(self):
        """--config FILE: its backends (with weights) and settings are in force; an option
        given on the command line wins over the file."""
        a, b = self.backend("a"), self.backend("b")
        directory = self.tempdir()
        path = os.path.join(directory, "cclb.toml")
        file_port = free_port()
        write_file(path, f"""# cclb test configuration
port = {file_port}
algorithm = "weighted-round-robin"
health_interval = 0
rise = 3
gzip_level = 0
max_body_size = "1k"
admin_port = 0
{toml_backends(a, b, weights={a.url: 2})}""")
        balancer = self.balancer([], "--config", path, "--rise", "2")
        admin = Admin(wait_admin_port(balancer))
        self.assertNotEqual(balancer.port, file_port, "-p 0 on the command line did not win")
        document = admin.status()
        self.assertEqual(document["policy"], "weighted-round-robin")
        settings = document["settings"]
        self.assertEqual((settings["rise"], settings["gzip_level"], settings["max_body_size"],
                          settings["health_interval"]), (2, 0, 1024, 0))
        self.assertEqual([(e["url"], e["weight"]) for e in document["backends"]],
                         [(a.url, 2), (b.url, 1)])
        self.assertEqual("".join(served_by(balancer.port) for _ in range(6)), "abaaba")
        self.assertEqual(http_request(balancer.port, "POST", "/big", body=b"x" * 2000)[0], 413)

    BAD_FILES = [  # (file text, words the message must contain)
        ("health_interval = 1\nbogus_key = 3\n", ["bogus_key", "line 2"]),
        ("\n\nrise = \"two\"\n", ["rise", "line 3"]),
        ("algorithm = \"fastest\"\n", ["algorithm", "line 1", "fastest"]),
        ("# thresholds\nfall = 0\n", ["fall", "line 2"]),
        ("workers = true\n", ["workers", "line 1"]),
        ("health_interval = [1]\n", ["health_interval", "line 1"]),
        ("port = 70000\n", ["port", "line 1"]),
        ("health_status = \"299-200\"\n", ["health_status", "line 1"]),
        ("log_format = \"xml\"\n", ["log_format", "line 1"]),
        ("max_body_size = \"lots\"\n", ["max_body_size", "line 1"]),
        ("\nbackends = [\"http://127.0.0.1:99999\"]\n", ["backends", "line 2"]),
        ("backends = [\"ftp://127.0.0.1:8443\"]\n", ["backends", "line 1"]),
        ("backends = []\n", ["backends", "line 1"]),
        ("gzip_level = 4\n\n[[backends]]\nurl = \"http://127.0.0.1:8000\"\nweigth = 2\n",
         ["backends", "weigth", "line"]),
        ("[health]\ninterval = 1\n", ["health", "line 1"]),
        ("demo = true\n", ["demo", "line 1"]),
        ("admin_port = 0\nadmin_host = \"0.0.0.0\"\n", ["admin-token"]),
        ("rise = \n", ["line 1"]),
    ]

    def test_bad_files_exit_2_naming_key_and_line(self):
        """Unknown keys, wrong types, bad values, bad TOML: exit 2 with a message naming the
        key and the line (settings.load, the code path of cclb.py's start)."""
        directory = self.tempdir()
        for number, (text, words) in enumerate(self.BAD_FILES):
            with self.subTest(text=text):
                path = os.path.join(directory, f"bad{number}.toml")
                write_file(path, text)
                stderr = io.StringIO()
                with contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit) as exit:
                    settings.load(["--config", path, "-p", "0"])
                self.assertEqual(exit.exception.code, 2, stderr.getvalue())
                for word in words:
                    self.assertIn(word, stderr.getvalue())

    def test_bad_files_stop_the_process_with_exit_2_and_no_traceback(self):
        """As a process: exit code 2, the message on stderr, no traceback, never listening."""
        directory = self.tempdir()
        chosen = [self.BAD_FILES[i] for i in (0, 1, 2, 13, 17)]
        runs = []
        for number, (text, words) in enumerate(chosen):
            path = os.path.join(directory, f"bad{number}.toml")
            write_file(path, text)
            runs.append((path, words))
        runs.append((os.path.join(directory, "none.toml"), ["none.toml"]))
        procs = [subprocess.Popen([PYTHON, CCLB, "--config", path, "-p", "0", "--host", "127.0.0.1"],
                                  cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for path, _ in runs]
        for proc in procs:
            self.addCleanup(lambda p=proc: (p.poll() is None and p.kill(), p.wait()))
        for (path, words), proc in zip(runs, procs):
            with self.subTest(path=path):
                try:
                    stdout, stderr = proc.communicate(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    stdout, stderr = proc.communicate()
                self.assertEqual(proc.returncode, 2, stderr)
                self.assertNotIn("Traceback", stderr)
                self.assertNotIn("listening", stdout)
                for word in words:
                    self.assertIn(word, stderr)


# --- SIGHUP reload ------------------------------------------------------------------

class KeepAliveLoop:
    """One raw keep-alive connection sending GETs back to back in a thread.

    Records (monotonic send time, X-Backend-Server) per answer; any error,
    non-200 answer or ``Connection: close`` ends the loop and is recorded.
    """

    def __init__(self, port: int) -> None:
        self.sock = connect(port)
        self.local = self.sock.getsockname()
        self.reader = self.sock.makefile("rb")
        self.answers: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        number = 0
        while not self.stopped.is_set():
            number += 1
            sent = time.monotonic()
            try:
                self.sock.sendall(f"GET /loop/{number} HTTP/1.1\r\nHost: cclb\r\n\r\n".encode())
                response = read_response(self.reader)
            except Exception as error:  # noqa: BLE001 - recorded for the test
                self.errors.append(f"request {number}: {error!r}")
                return
            if response.status != 200 or (response.header("connection") or "").lower() == "close":
                self.errors.append(f"request {number}: {response.status} {response.headers}")
                return
            self.answers.append((sent, response.header("x-backend-server")))
            time.sleep(0.002)  # pacing, not synchronisation: leave the CPU to the balancer

    def since(self, moment: float) -> list[str]:
        return [name for sent, name in list(self.answers) if sent > moment]

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(10)
        self.reader.close()
        self.sock.close()


class ReloadTests(OperationsCase):

    def test_sighup_adds_and_removes_backends_under_a_keepalive_client(self):
        """SIGHUP re-reads the file: an added backend gets traffic, a removed one gets none,
        changed settings apply (the command line still wins), an invalid file is logged and
        changes nothing; one keep-alive client sending all along sees no error and keeps its
        connection."""
        a, b, c = self.backend("a"), self.backend("b"), self.backend("c")
        directory = self.tempdir()
        path = os.path.join(directory, "cclb.toml")
        header = "health_interval = 0.5\nhealth_path = \"/healthz\"\nmax_fails = 2\n"
        write_file(path, header + toml_backends(a, b))
        balancer = self.balancer([], "--config", path, "--max-fails", "3", "--admin-port", "0")
        admin = Admin(wait_admin_port(balancer))
        client = KeepAliveLoop(balancer.port)
        self.addCleanup(client.stop)

        def reloads() -> int:
            return balancer.log_text().count("configuration reloaded")

        def seen(names: set[str], since: float, at_least: int = 20):
            def check():
                recent = client.since(since)
                if client.errors:
                    raise AssertionError(f"client error: {client.errors}")
                return recent if len(recent) >= at_least and names <= set(recent) else None
            return wait_for(check, 10, message=f"traffic to {names}")

        seen({"a", "b"}, 0)
        write_file(path, header + toml_backends(a, b, c))
        balancer.signal(signal.SIGHUP)
        wait_for(lambda: reloads() == 1, 5, message="the first reload")
        self.assertIn(f"backends added: {c.url}; removed: none", balancer.log_text())
        seen({"a", "b", "c"}, time.monotonic())

        header = header.replace("health_interval = 0.5", "health_interval = 0.4")
        write_file(path, header + toml_backends(b, c))
        balancer.signal(signal.SIGHUP)
        wait_for(lambda: reloads() == 2, 5, message="the second reload")
        self.assertIn(f"removed: {a.url}", balancer.log_text())
        after_removal = time.monotonic()
        count_a = a.count()
        recent = seen({"b", "c"}, after_removal, 30)
        self.assertNotIn("a", recent)
        settings = admin.status()["settings"]
        self.assertEqual(settings["health_interval"], 0.4, "a changed setting was not applied")
        self.assertEqual(settings["max_fails"], 3, "the command line no longer wins after a reload")

        write_file(path, header + "rise = 0\n" + toml_backends(a, b, c))
        balancer.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in balancer.log_text(), 5, message="the failed reload")
        after_failure = time.monotonic()
        recent = seen({"b", "c"}, after_failure, 30)
        self.assertNotIn("a", recent, "an invalid file was partly applied")
        self.assertEqual(a.count(), count_a)
        self.assertEqual(reloads(), 2)
        self.assertRegex(balancer.log_text(), r"reload failed.*rise")
        self.assertEqual(client.errors, [])
        self.assertEqual(client.sock.getsockname(), client.local)
        self.assertIsNone(balancer.proc.poll())
        self.assertNotIn("Traceback", balancer.log_text())

    # Review: a reload to health_interval = 0 once left the checker spinning.
    def test_reload_to_interval_zero_stops_active_checks_without_a_busy_loop(self):
        backend = self.raw_backend()
        path = os.path.join(self.tempdir(), "cclb.toml")
        body = f'health_path = "/hc"\nbackends = ["http://127.0.0.1:{backend.port}"]\n'
        write_file(path, "health_interval = 0.2\n" + body)
        balancer = self.balancer([], "--config", path, "--access-log", "off")
        wait_for(lambda: health_count(backend, "/hc") >= 2, 5, message="two active checks at 0.2s")

        write_file(path, "health_interval = 0\n" + body)
        balancer.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in balancer.log_text(), 5,
                 message="the reload log line")
        # Observation windows, not synchronisation: no event marks "no more checks".
        # A round that was under way when the reload came may still finish...
        time.sleep(0.3)
        checks, cpu = health_count(backend, "/hc"), cpu_seconds(balancer.pid)
        time.sleep(1.0)  # ...then five old intervals must pass with no check and no busy loop
        self.assertEqual(health_count(backend, "/hc"), checks,
                         "active checks go on after a reload to health_interval = 0")
        used = cpu_seconds(balancer.pid) - cpu
        self.assertLess(used, 0.3, f"{used:.2f}s of CPU in 1s while idle: a busy loop")
        self.assertEqual(http_request(balancer.port, path="/x")[0], 200)
        self.assertNotIn("reload failed", balancer.log_text())

    # Review: a reload is validated like a start (the admin token rule).
    def test_reload_cannot_drop_the_token_of_a_non_loopback_admin(self):
        backend = self.raw_backend()
        path = os.path.join(self.tempdir(), "cclb.toml")
        backends = f'backends = ["http://127.0.0.1:{backend.port}"]\n'
        write_file(path, 'admin_host = "0.0.0.0"\nadmin_token = "s3cret"\nadmin_port = 0\n'
                         "health_interval = 0\n" + backends)
        balancer = self.balancer([], "--config", path, "--access-log", "off")
        admin = wait_admin_port(balancer)
        self.assertEqual(admin_call(self, balancer, admin, "POST", "/backends/1/maint")[0], 401)

        write_file(path, 'admin_host = "127.0.0.1"\nadmin_port = 0\nhealth_interval = 0\n'
                         + backends)
        balancer.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in balancer.log_text(), 5,
                 message=f"'reload failed' in the log: {balancer.log_text()[-800:]}")
        self.assertNotIn("configuration reloaded", balancer.log_text())

        code, headers, _ = admin_call(self, balancer, admin, "POST", "/backends/1/maint")
        self.assertEqual(code, 401, "an admin write without the token was accepted after the reload")
        self.assertIn("Bearer", headers.get("WWW-Authenticate", ""))
        self.assertEqual(admin_status(self, balancer, admin)["backends"][0]["state"], "up")
        # The old token is still the one in force.
        code, _, _ = admin_call(self, balancer, admin, "POST", "/backends/1/maint",
                                headers={"Authorization": "Bearer s3cret"})
        self.assertEqual(code, 200)


# --- access log and request ids --------------------------------------------------------

class AccessLogTests(OperationsCase):

    def test_json_access_log_and_request_ids(self):
        """--log-format json: one object per line with client, method, target, status, bytes,
        backend, duration_ms, request_id. A valid client X-Request-ID is forwarded, returned
        and logged; an invalid or missing one is replaced by a generated one."""
        backend = self.backend("logged")
        path = os.path.join(self.tempdir(), "access.json")
        balancer = self.balancer([backend.url], "--log-format", "json", "--access-log", path,
                                 "--health-interval", "0")
        requests = [  # (method, target, client X-Request-ID or None, body)
            ("GET", "/a?x=1&y=%22q%22", "client-id_1.2:3", None),
            ("GET", "/b", "bad id with spaces", None),
            ("GET", "/c", "x" * 300, None),
            ("GET", "/d", None, None),
            ("POST", "/e", 'quote"and\\backslash', b"payload"),
            ("GET", "/code/404", "missing-1", None),
        ]
        results = []
        for method, target, given, body in requests:
            heads_before = len(backend.heads())
            headers = {} if given is None else {"X-Request-ID": given}
            status, response_headers, data = http_request(balancer.port, method, target, body=body,
                                                          headers=headers)
            returned = response_headers.get_all("X-Request-ID") or []
            self.assertEqual(len(returned), 1, f"{target}: {returned}")
            forwarded = [line.split(b":", 1)[1].strip().decode()
                         for line in backend.heads()[heads_before].split(b"\r\n")
                         if line.lower().startswith(b"x-request-id:")]
            self.assertEqual(forwarded, returned, f"{target}: backend got {forwarded}")
            if given is not None and REQUEST_ID.fullmatch(given):
                self.assertEqual(returned[0], given)
            else:
                self.assertNotEqual(returned[0], given)
                self.assertRegex(returned[0], REQUEST_ID)
            results.append((method, target, status, len(data), returned[0]))
        generated = [r[4] for r in results[1:5]]
        self.assertEqual(len(set(generated)), 4, "generated request ids repeat")

        def lines() -> list[str]:
            try:
                with open(path, encoding="utf-8") as handle:
                    return handle.read().splitlines()
            except FileNotFoundError:
                return []
        wait_for(lambda: len(lines()) >= len(requests), 5, message="the access log lines")
        entries = [json.loads(line) for line in lines()]  # every line is one JSON object
        self.assertEqual(len(entries), len(requests))
        by_id = {entry["request_id"]: entry for entry in entries}
        for method, target, status, size, request_id in results:
            entry = by_id[request_id]
            self.assertEqual(
                {key: entry.get(key) for key in ("client", "method", "target", "status",
                                                   "bytes", "backend")},
                {"client": "127.0.0.1", "method": method, "target": target, "status": status,
                 "bytes": size, "backend": backend.url})
            self.assertIsInstance(entry["duration_ms"], (int, float))
            self.assertGreaterEqual(entry["duration_ms"], 0)
            self.assertLess(entry["duration_ms"], 5000)

    def test_sighup_reopens_a_moved_access_log(self) -> None:
        """SIGHUP reopens the access log file (logrotate's move-then-HUP)."""
        backend = DemoServer()
        self.addCleanup(backend.stop)
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        path = os.path.join(folder.name, "access.log")
        balancer = Balancer([backend.port], "--health-interval", "0", "--access-log", path)
        self.addCleanup(balancer.stop)

        def logged(file: str, target: str) -> bool:
            try:
                with open(file, encoding="utf-8") as handle:
                    return f'"GET {target}"' in handle.read()
            except FileNotFoundError:
                return False

        self.assertEqual(http_exchange(balancer.port, get("/?when=before", "Connection: close")).status, 200)
        wait_for(lambda: logged(path, "/?when=before"), 5, message="the first line in the log")
        os.rename(path, path + ".1")  # what logrotate does before signalling
        balancer.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in balancer.log_text(), 5,
                 message="the reload")
        self.assertEqual(http_exchange(balancer.port, get("/?when=after", "Connection: close")).status, 200)
        wait_for(lambda: logged(path, "/?when=after"), 5, message="a new file with the next line")
        self.assertFalse(logged(path + ".1", "/?when=after"), "the rotated file kept growing")
        self.assertNotIn("Traceback", balancer.log_text())



# --- the admin listener, hardened (end to end) ---------------------------------------

class AdminListenerEndToEndTests(OperationsCase):
    """The admin API of a real cclb process: CSRF refused, only complete requests act,
    clients that go away leave no traceback, 64 connections at most."""

    def setUp(self):
        self.backend = self.raw_backend()
        self.lb = self.balancer([self.backend.port], "--admin-port", "0", "--health-interval", "0",
                                "--access-log", "off")
        self.admin = wait_admin_port(self.lb)

    def backends(self) -> list[tuple[str, str]]:
        return [(b["url"], b["state"]) for b in admin_status(self, self.lb, self.admin)["backends"]]

    def test_cross_site_writes_are_refused_and_same_origin_json_works(self):
        before = self.backends()
        new_url = f"http://127.0.0.1:{free_port()}"
        body = json.dumps({"url": new_url}).encode()
        code, _, answer = admin_call(self, self.lb, self.admin, "POST", "/backends", body,
                                     {"Content-Type": "text/plain", "Origin": "http://evil.example"})
        self.assertEqual(code, 403, answer)
        code, _, answer = admin_call(self, self.lb, self.admin, "POST", "/backends", body,
                                     {"Content-Type": "text/plain"})
        self.assertEqual(code, 415, answer)
        code, _, answer = admin_call(self, self.lb, self.admin, "POST", "/backends/1/maint", None,
                                     {"Sec-Fetch-Site": "cross-site"})
        self.assertEqual(code, 403, answer)
        self.assertEqual(self.backends(), before)
        code, _, answer = admin_call(self, self.lb, self.admin, "POST", "/backends", body,
                                     {"Content-Type": "application/json",
                                      "Origin": f"http://127.0.0.1:{self.admin}",
                                      "Sec-Fetch-Site": "same-origin"})
        self.assertEqual(code, 201, answer)
        self.assertEqual(self.backends(), before + [(new_url, "up")])

    def test_incomplete_requests_never_act_and_leave_no_traceback(self):
        before = self.backends()
        for data in (b"POST /backends/1/maint HTTP/1.1\r\nHost: x\r\n",
                     b"DELETE /backends/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"):
            with connect(self.admin, timeout=5) as sock:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                raw = read_until_close(sock, timeout=5)
            self.assertNotRegex(raw, rb"^HTTP/1\.[01] 2", raw)
        for _ in range(20):  # clients that reset mid-body, the disconnect storm in small
            sock = connect(self.admin, timeout=5)
            sock.sendall(b"POST /backends HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"url\": ")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        self.assertEqual(self.backends(), before)
        self.lb.stop()  # its stderr is then read to the end
        log = self.lb.log_text()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("ERROR", log)
        self.assertNotIn("removed by the admin API", log)

    def test_connection_cap_answers_503_then_recovers(self):
        held = []
        for _ in range(64):
            sock = connect(self.admin, timeout=5)
            self.addCleanup(sock.close)
            held.append(sock)
        # Connections are accepted in order: this one comes after the 64 held ones.
        with connect(self.admin, timeout=5) as extra:
            raw = read_until_close(extra, timeout=5)
        self.assertTrue(raw.startswith(b"HTTP/1.1 503 "), raw[:200])
        held.pop().close()

        def serves() -> bool:
            try:
                return http_request(self.admin, "GET", "/status", timeout=5)[0] == 200
            except OSError:
                return False

        wait_for(serves, 10, message="room for a new admin connection")
        # A held connection is still served.
        held[0].sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(held[0].recv(12).startswith(b"HTTP/1.1 200"))


if __name__ == "__main__":
    unittest.main()

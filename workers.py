"""``--workers N``: N worker processes sharing the port, under one supervisor.

The GIL lets one Python process use about one core; workers use them all.

- Sharing the port: each worker binds the same address with ``SO_REUSEPORT``
  (the kernel spreads new connections over them).  Where that option does not
  exist, the supervisor listens once and the workers inherit the socket.
- Health is checked once, by the supervisor, not N times: after every round,
  and after every admin API change, it publishes each backend's state
  (membership, health, admin state) to every worker through the worker's
  stdin; a worker runs no checker of its own.
  Passive failures are still detected by each worker on its own traffic.
  A worker whose stdin closes (the supervisor is gone) stops: no orphans.
- The supervisor restarts a worker that dies, forwards SIGHUP (each worker
  re-reads the config file) and, on SIGTERM/SIGINT, stops them all and exits.
- The admin API runs in the supervisor: backends, health, admin states and
  settings are exact, and its writes reach every worker.  Each worker reports
  its traffic counters (responses, in-flight, failures, retries, latency)
  once a second on its stdout; the supervisor adds them up, keeping what
  dead workers had counted, so /status and /metrics cover all workers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cluster import DRAIN, MAINT, READY, ServerCluster, parse_backend
from metrics import Histogram

log = logging.getLogger("cclb")

WORKER_ENV = "CCLB_WORKER"  # "1" in a worker process
PORT_ENV = "CCLB_WORKER_PORT"  # the port to bind (resolved by the supervisor)
FD_ENV = "CCLB_LISTEN_FD"  # inherited listening socket, when SO_REUSEPORT is missing
READY_LINE = b"ready\n"
COUNTERS_INTERVAL = 1.0  # seconds between two counter reports of a worker
CCLB = Path(__file__).resolve().parent / "cclb.py"


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def state_lines(cluster: ServerCluster) -> bytes:
    """The supervisor's view of every backend as one JSON line.

    ``[[url, weight, "up"|"down", "ready"|"drain"|"maint"], ...]``: health,
    membership and admin state, so changes made through the admin API reach
    every worker.  One line per snapshot: a snapshot cut short (see
    ``Worker.publish``) spoils one line, which the worker skips.
    """
    with cluster.lock:
        rows = [[b.url, b.weight, "up" if b.healthy else "down", b.admin_state]
                for b in cluster.backends]
    return (json.dumps(rows, separators=(",", ":")) + "\n").encode()


def follow_supervisor(cluster: ServerCluster, fd: int, on_exit: Any) -> None:
    """Worker side: adopt each published snapshot until the supervisor goes away.

    Reads the raw descriptor with ``os.read``: a daemon thread blocked inside
    a buffered ``sys.stdin`` would hold its lock during interpreter shutdown.
    """
    pending = b""
    while data := os.read(fd, 65536):
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            try:
                rows = json.loads(line)
                snapshot = [[str(url), int(weight), str(health), str(admin)]
                            for url, weight, health, admin in rows]
            except (ValueError, TypeError):
                continue  # a cut-off snapshot: the next one is whole
            apply_snapshot(cluster, snapshot)
    on_exit()


def apply_snapshot(cluster: ServerCluster, snapshot: list[list[Any]]) -> None:
    """Adopt the supervisor's backends, health verdicts and admin states."""
    try:
        specs = [parse_backend(f"{url},weight={weight}") for url, weight, _, _ in snapshot]
    except ValueError as error:
        log.error("ignoring a malformed state snapshot from the supervisor: %s", error)
        return
    cluster.reconcile(specs)
    states = {url: (health == "up", admin) for url, _, health, admin in snapshot}
    for backend in cluster.snapshot():
        if backend.url not in states:  # changed meanwhile; the next snapshot settles it
            continue
        healthy, admin = states[backend.url]
        cluster.apply_published_health(backend, healthy)
        if admin in (READY, DRAIN, MAINT) and admin != backend.admin_state:
            cluster.set_admin_state(backend, admin, quiet=True)


def counter_snapshot(cluster: ServerCluster) -> dict[str, Any]:
    """A worker's traffic counters: per backend URL, and answers given without one."""
    with cluster.lock:
        backends = {b.url: {"responses": {str(code): n for code, n in b.responses.items()},
                            "in_flight": b.in_flight, "failures": b.failures,
                            "retries": b.retries, "latency": list(b.latency.counts),
                            "latency_sum": b.latency.total, "latency_count": b.latency.count}
                    for b in cluster.backends}
        unrouted = {str(code): n for code, n in cluster.unrouted.items()}
    return {"backends": backends, "unrouted": unrouted}


def report_counters(cluster: ServerCluster) -> None:
    """Worker side: write the counters to stdout (the supervisor) every second."""
    while True:
        time.sleep(COUNTERS_INTERVAL)
        line = (json.dumps(counter_snapshot(cluster), separators=(",", ":")) + "\n").encode()
        try:
            os.write(1, line)
        except OSError:
            return


def add_counters(total: dict[str, Any], part: dict[str, Any], in_flight: bool = True) -> None:
    """Add one worker's snapshot into ``total`` (in place; same shape)."""
    totals = total.setdefault("backends", {})
    for url, counters in part.get("backends", {}).items():
        into = totals.setdefault(url, {"responses": {}, "in_flight": 0, "failures": 0,
                                       "retries": 0, "latency": [0] * len(counters["latency"]),
                                       "latency_sum": 0.0, "latency_count": 0})
        for code, n in counters["responses"].items():
            into["responses"][code] = into["responses"].get(code, 0) + n
        for key in ("failures", "retries", "latency_sum", "latency_count"):
            into[key] += counters[key]
        if in_flight:
            into["in_flight"] += counters["in_flight"]
        into["latency"] = [a + b for a, b in zip(into["latency"], counters["latency"])]
    unrouted = total.setdefault("unrouted", {})
    for code, n in part.get("unrouted", {}).items():
        unrouted[code] = unrouted.get(code, 0) + n


class Worker:
    """One worker process and its two pipes."""

    def __init__(self, number: int, argv: list[str], port: int, listen_fd: int | None) -> None:
        self.number = number
        env = dict(os.environ, **{WORKER_ENV: "1", PORT_ENV: str(port)})
        pass_fds: tuple[int, ...] = ()
        if listen_fd is not None:
            env[FD_ENV] = str(listen_fd)
            pass_fds = (listen_fd,)
        self.started = time.monotonic()
        self.counters: dict[str, Any] = {}  # latest report (replaced whole)
        self.proc = subprocess.Popen([sys.executable, str(CCLB), *argv], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     pass_fds=pass_fds)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        os.set_blocking(self.proc.stdin.fileno(), False)  # a stuck worker must not block us

    def wait_ready(self, timeout: float) -> bool:
        """Wait for the worker's ready line (it is listening), then follow its reports."""
        assert self.proc.stdout is not None
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if result != [READY_LINE]:
            return False
        threading.Thread(target=self.read_counters, name=f"worker-{self.number}-counters",
                         daemon=True).start()
        return True

    def read_counters(self) -> None:
        """Keep the latest counter snapshot the worker reported (one line each)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.counters = json.loads(line)
            except ValueError:
                continue

    def publish(self, data: bytes) -> None:
        """Send a state snapshot; a worker that cannot take it whole gets the next one.

        The pipe is non-blocking so a stuck worker cannot stall the supervisor.
        A snapshot cut short by a full pipe is one spoilt line the worker skips.
        """
        try:
            assert self.proc.stdin is not None
            fd = self.proc.stdin.fileno()
            while data:
                data = data[os.write(fd, data):]
        except BlockingIOError:
            pass  # full pipe: the worker is busy; the next round resends everything
        except (OSError, ValueError):
            pass  # the worker is gone (closed pipe): watch() restarts it

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def close_pipes(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(self, config: Any, argv: list[str], cluster: ServerCluster) -> None:
        self.config = config
        self.argv = argv
        self.cluster = cluster
        self.workers: list[Worker] = []
        self.listener: socket.socket | None = None
        self.port = config.port
        self.retired: dict[str, Any] = {}  # what dead workers had counted
        self.publish_lock = threading.Lock()

    def bind(self) -> int:
        """Reserve the port (and listen, without SO_REUSEPORT); returns it.

        Raises OSError if the address is in use.
        """
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.config.host, self.config.port))  # held, not listening
        else:
            sock.bind((self.config.host, self.config.port))
            sock.listen(1024)
            os.set_inheritable(sock.fileno(), True)
        self.listener = sock
        self.port = sock.getsockname()[1]
        return self.port

    def start_worker(self, number: int) -> Worker:
        listen_fd = None if hasattr(socket, "SO_REUSEPORT") else self.listener.fileno()
        worker = Worker(number, self.argv, self.port, listen_fd)
        worker.publish(state_lines(self.cluster))
        return worker

    def start(self, timeout: float = 15.0) -> bool:
        """Start all workers; False (and nothing left running) if one fails."""
        self.workers = [self.start_worker(n) for n in range(self.config.workers)]
        if all(worker.wait_ready(timeout) for worker in self.workers):
            return True
        self.stop(1.0)
        return False

    def publish_state(self) -> None:
        """Send every worker the current backends, health and admin states.

        Called from the health checker, admin and main threads: ``publish_lock``
        keeps two snapshots from interleaving in a pipe.
        """
        data = state_lines(self.cluster)
        with self.publish_lock:
            for worker in list(self.workers):
                worker.publish(data)

    def watch(self) -> None:
        """Restart workers that died (at most one restart per second each).

        The replacement's start-up is awaited in a thread of its own, so the
        supervisor keeps handling signals meanwhile; one that never gets
        ready is killed, and so restarted again by a later ``watch``.
        """
        for index, worker in enumerate(self.workers):
            code = worker.proc.poll()
            if code is None or time.monotonic() - worker.started < 1.0:
                continue
            log.error("worker %d (pid %d) exited with %s; restarting it",
                      worker.number, worker.proc.pid, code)
            add_counters(self.retired, worker.counters, in_flight=False)
            worker.close_pipes()
            self.workers[index] = replacement = self.start_worker(worker.number)
            threading.Thread(target=self.await_ready, args=(replacement,),
                             name=f"worker-{worker.number}-start", daemon=True).start()

    @staticmethod
    def await_ready(worker: Worker, timeout: float = 15.0) -> None:
        if not worker.wait_ready(timeout):
            log.error("worker %d (pid %d) did not get ready; killing it",
                      worker.number, worker.proc.pid)
            worker.proc.kill()

    def merge_counters(self) -> None:
        """Show the sum of all workers' counters on the supervisor's backends."""
        total: dict[str, Any] = {}
        add_counters(total, self.retired, in_flight=False)
        for worker in self.workers:
            add_counters(total, worker.counters)
        backends = total.get("backends", {})
        with self.cluster.lock:
            self.cluster.unrouted = {int(code): n for code, n in total.get("unrouted", {}).items()}
            for backend in self.cluster.backends:
                counters = backends.get(backend.url)
                if counters is None:
                    continue
                backend.responses = {int(code): n for code, n in counters["responses"].items()}
                backend.in_flight = counters["in_flight"]
                backend.failures = counters["failures"]
                backend.retries = counters["retries"]
                backend.latency = Histogram(counters["latency"], counters["latency_sum"],
                                            counters["latency_count"])

    def forward(self, signum: int) -> None:
        for worker in self.workers:
            worker.signal(signum)

    def stop(self, timeout: float) -> None:
        self.forward(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
            worker.close_pipes()
        if self.listener is not None:
            self.listener.close()

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
  its traffic counters (responses, in-flight, failures, retries, latency,
  and the client side: rejections, responses by source, bytes, connections,
  upgrade tunnels)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from backend_urls import parse_backend
from cluster import DRAIN, MAINT, READY, ServerCluster
from loops import LoopGuard
from metrics import FrontendCounters, RouteCounters, TrafficCounters
from settings import Config

log = logging.getLogger("cclb")

WORKER_ENV = "CCLB_WORKER"  # "1" in a worker process
PORT_ENV = "CCLB_WORKER_PORT"  # the port to bind (resolved by the supervisor)
FD_ENV = "CCLB_LISTEN_FD"  # inherited listening socket, when SO_REUSEPORT is missing
READY_LINE = b"ready\n"
COUNTERS_INTERVAL = 1.0  # seconds between two counter reports of a worker
CCLB = Path(__file__).resolve().parent / "cclb.py"


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


# --- state snapshots, supervisor -> worker (the worker's stdin) ---------------
#
# One snapshot per line: b"<length> <json>\n", where <length> is the JSON's
# size in bytes.  The pipe is non-blocking on the supervisor's side, so a
# snapshot can be cut short by a full pipe; the supervisor then ends that
# line with a bare b"\n" before the next snapshot, and the worker, finding
# the length wrong, drops it.  A torn snapshot costs only itself.

def encode_snapshot(rows: list[list[Any]]) -> bytes:
    """One self-delimiting snapshot line for ``rows``."""
    payload = json.dumps(rows, separators=(",", ":")).encode()
    return b"%d %s\n" % (len(payload), payload)


# Where the supervisor's and a worker's pools come from: one cluster (the pool
# default), or a function returning every pool (named pools, see cclb.Process).
PoolSource = Union[ServerCluster, Callable[[], Sequence[ServerCluster]]]


def clusters_of(source: PoolSource) -> list[ServerCluster]:
    return [source] if isinstance(source, ServerCluster) else list(source())


def state_rows(source: PoolSource) -> list[list[Any]]:
    """The supervisor's view of every backend of every pool.

    ``[[url, weight, "up"|"down", "ready"|"drain"|"maint"(, pool)], ...]``:
    health, membership and admin state, so changes made through the admin
    API reach every worker.  A backend of a pool other than ``default``
    carries its pool's name as a fifth element; a pool without backends is
    named by a row with an empty URL (so a worker empties it too).
    """
    rows: list[list[Any]] = []
    for cluster in clusters_of(source):
        stats = cluster.stats()
        pool = [stats.pool] if stats.pool != "default" else []
        rows.extend([b.url, b.weight, "up" if b.healthy else "down", b.admin_state, *pool]
                    for b in stats.backends)
        if not stats.backends and not isinstance(source, ServerCluster):
            rows.append(["", 0, "", "", stats.pool])  # an empty pool: still named (emptied)
    return rows


def decode_snapshot(line: bytes) -> list[list[Any]] | None:
    """The rows of one snapshot line (without its b"\n"), or None if torn or malformed."""
    length, _, payload = line.partition(b" ")
    if not length.isdigit() or int(length) != len(payload):
        return None
    try:
        return [[str(url), int(weight), str(health), str(admin), *map(str, pool)]
                for url, weight, health, admin, *pool in json.loads(payload) if len(pool) <= 1]
    except (ValueError, TypeError):
        return None


class SnapshotReader:
    """Worker side: splits the bytes from the supervisor into whole snapshots."""

    def __init__(self) -> None:
        self.pending = b""  # an incomplete last line

    def feed(self, data: bytes) -> list[list[list[Any]]]:
        """Every whole, intact snapshot completed by ``data``, oldest first."""
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        snapshots = []
        for line in lines:
            rows = decode_snapshot(line)
            if rows is None:
                log.debug("skipping a torn state snapshot from the supervisor")
            else:
                snapshots.append(rows)
        return snapshots


def follow_supervisor(cluster: PoolSource, fd: int, on_exit: Callable[[], None]) -> None:
    """Worker side: adopt each published snapshot until the supervisor goes away.

    Reads the raw descriptor with ``os.read``: a daemon thread blocked inside
    a buffered ``sys.stdin`` would hold its lock during interpreter shutdown.
    """
    reader = SnapshotReader()
    guard = LoopGuard("supervisor link")
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if not data:
            break
        for rows in reader.feed(data):
            with guard:
                apply_snapshot(cluster, rows)
    on_exit()


def apply_snapshot(source: PoolSource, snapshot: list[list[Any]]) -> None:
    """Adopt the supervisor's backends, health verdicts and admin states, pool by pool.

    A pool the snapshot does not name is left alone (a reload may be under
    way; the next snapshot settles it), as are rows of a pool this worker
    does not have.
    """
    by_pool: dict[str, list[list[Any]]] = {}
    for row in snapshot:
        rows = by_pool.setdefault(row[4] if len(row) > 4 else "default", [])
        if row[0]:  # else only the name of an empty pool
            rows.append(row[:4])
    if isinstance(source, ServerCluster):
        by_pool = {source.name: by_pool.get(source.name, [])}
    for cluster in clusters_of(source):
        if cluster.name in by_pool:
            apply_pool_snapshot(cluster, by_pool[cluster.name])


def apply_pool_snapshot(cluster: ServerCluster, snapshot: list[list[Any]]) -> None:
    """One pool's part of ``apply_snapshot``."""
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
        if admin in (READY, DRAIN, MAINT):
            cluster.set_admin_state(backend, admin, quiet=True)


# --- traffic counters, worker -> supervisor (the worker's stdout) -------------

@dataclass
class CounterReport:
    """A worker's traffic counters: per backend URL, answers given without one, and
    the client side (rejections, responses by source, bytes, open connections, tunnels)."""

    backends: dict[str, TrafficCounters] = field(default_factory=dict)
    unrouted: dict[int, int] = field(default_factory=dict)
    frontend: FrontendCounters = field(default_factory=FrontendCounters)
    routes: dict[str, list[int]] = field(default_factory=dict)  # RouteCounters, by route name

    @classmethod
    def of(cls, source: PoolSource, routes: RouteCounters | None = None) -> CounterReport:
        """Every pool's counters (backend URLs are unique across pools); the first
        cluster is the front one, whose client-side numbers these are."""
        report = cls()
        for index, cluster in enumerate(clusters_of(source)):
            stats = cluster.stats()
            report.backends.update({b.url: b.traffic for b in stats.backends})
            for code, n in stats.unrouted.items():
                report.unrouted[code] = report.unrouted.get(code, 0) + n
            if index == 0:
                report.frontend = stats.frontend
        if routes is not None:
            report.routes = routes.snapshot()
        return report

    def add(self, other: CounterReport, in_flight: bool = True) -> None:
        """Add ``other`` into this report (``in_flight=False``: a dead worker's)."""
        for url, traffic in other.backends.items():
            self.backends.setdefault(url, TrafficCounters()).add(traffic, in_flight)
        for code, count in other.unrouted.items():
            self.unrouted[code] = self.unrouted.get(code, 0) + count
        self.frontend.add(other.frontend, gauges=in_flight)
        for name, row in other.routes.items():
            mine = self.routes.setdefault(name, [0, 0, 0])
            for i, n in enumerate(row[:3]):
                mine[i] += n

    def encode(self) -> bytes:
        document = {"backends": {url: t.to_json() for url, t in self.backends.items()},
                    "unrouted": {str(code): n for code, n in self.unrouted.items()},
                    "frontend": self.frontend.to_json(), "routes": self.routes}
        return (json.dumps(document, separators=(",", ":")) + "\n").encode()

    @classmethod
    def decode(cls, line: bytes) -> CounterReport:
        """The inverse of ``encode``; ValueError for a malformed line."""
        try:
            document = json.loads(line)
            return cls({str(url): TrafficCounters.from_json(data)
                        for url, data in document["backends"].items()},
                       {int(code): int(n) for code, n in document["unrouted"].items()},
                       FrontendCounters.from_json(document["frontend"]),
                       {str(name): [int(n) for n in row][:3]
                        for name, row in document.get("routes", {}).items()})
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed counter report: {error!r}") from None


def report_counters(cluster: PoolSource, stopped: threading.Event,
                    routes: RouteCounters | None = None) -> None:
    """Worker side: write the counters to stdout (the supervisor) every second."""
    guard = LoopGuard("counter report")
    while not stopped.wait(COUNTERS_INTERVAL):
        with guard:
            try:
                os.write(1, CounterReport.of(cluster, routes).encode())
            except OSError:
                return  # the supervisor is gone


def write_snapshot(fd: int, snapshot: bytes, torn: bool) -> bool:
    """Write ``snapshot`` to the non-blocking pipe ``fd``; True if the pipe now ends mid-line.

    ``torn``: the pipe already ends with the unfinished start of a line,
    which is ended (b"\n") first, so the worker drops it and reads the new
    snapshot whole.  A full pipe may take part of the data, or none.
    """
    data = (b"\n" if torn else b"") + snapshot
    written = 0
    try:
        while written < len(data):
            written += os.write(fd, data[written:])
    except BlockingIOError:
        pass  # full pipe: the worker is busy; the next round sends the state again
    if written == 0:
        return torn
    return data[written - 1:written] != b"\n"


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
        self.counters = CounterReport()  # the latest report (replaced whole)
        self.torn = False  # the pipe holds the unfinished start of a snapshot line
        self.proc = subprocess.Popen([sys.executable, str(CCLB), *argv], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     pass_fds=pass_fds)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        os.set_blocking(self.proc.stdin.fileno(), False)  # a stuck worker must not block us

    def wait_ready(self, timeout: float) -> bool:
        """Wait for the worker's ready line (it is listening), then follow its reports."""
        stdout = self.proc.stdout
        assert stdout is not None
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if result != [READY_LINE]:
            return False
        threading.Thread(target=self.read_counters, name=f"worker-{self.number}-counters",
                         daemon=True).start()
        return True

    def read_counters(self) -> None:
        """Keep the latest counter report the worker sent (one line each)."""
        assert self.proc.stdout is not None
        guard = LoopGuard(f"worker {self.number} counters")
        for line in self.proc.stdout:
            with guard:
                try:
                    self.counters = CounterReport.decode(line)
                except ValueError:
                    log.debug("worker %d sent a malformed counter report", self.number)

    def publish(self, snapshot: bytes) -> None:
        """Send a state snapshot line (``encode_snapshot``) without ever blocking.

        The pipe is non-blocking so a stuck worker cannot stall the supervisor.
        If a full pipe cuts a snapshot short, the next publish first ends that
        line (the worker drops it) and then sends its own whole: see
        ``encode_snapshot``.  Called with ``Supervisor.publish_lock`` held.
        """
        assert self.proc.stdin is not None
        try:
            self.torn = write_snapshot(self.proc.stdin.fileno(), snapshot, self.torn)
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

    def __init__(self, config: Config, argv: list[str], cluster: ServerCluster) -> None:
        self.config = config
        self.argv = argv
        self.cluster = cluster
        # Every pool, the front one (``cluster``) first; set by cclb (reloads change it).
        self.pools: Callable[[], Sequence[ServerCluster]] = lambda: [cluster]
        self.route_counters: RouteCounters | None = None  # the sums of the workers' are shown here
        self.workers: list[Worker] = []
        self.listener: socket.socket | None = None
        self.port = config.port
        self.retired = CounterReport()  # what dead workers had counted
        # Keeps two snapshots from interleaving in a pipe, and guards each
        # Worker's ``torn`` flag.
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
        listen_fd = None
        if not hasattr(socket, "SO_REUSEPORT"):
            assert self.listener is not None  # bind() came first
            listen_fd = self.listener.fileno()
        worker = Worker(number, self.argv, self.port, listen_fd)
        snapshot = encode_snapshot(state_rows(self.pools))
        with self.publish_lock:
            worker.publish(snapshot)
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
        snapshot = encode_snapshot(state_rows(self.pools))
        with self.publish_lock:
            for worker in list(self.workers):
                worker.publish(snapshot)

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
            self.retired.add(worker.counters, in_flight=False)
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
        total = CounterReport()
        total.add(self.retired, in_flight=False)
        for worker in self.workers:
            total.add(worker.counters)
        for cluster in self.pools():  # every answer without a backend is shown on the front
            if cluster is self.cluster:
                cluster.adopt_traffic(total.backends, total.unrouted, total.frontend)
            else:
                cluster.adopt_traffic(total.backends, {})
        if self.route_counters is not None:
            self.route_counters.adopt(total.routes)

    def forward(self, signum: int) -> None:
        for worker in self.workers:
            worker.signal(signum)

    def stop_accepting(self) -> None:
        """Turn new clients away at once: the shared listener stops listening.

        With SO_REUSEPORT the supervisor's socket only reserves the port
        (each worker stops its own listener); without it, the workers share
        this one, so shutting it down refuses connections for all of them.
        """
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not listening (SO_REUSEPORT): nothing to refuse

    def stop(self, timeout: float) -> None:
        """SIGTERM every worker and wait for them (killing stragglers at ``timeout``)."""
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

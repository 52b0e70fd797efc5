"""Metrics: the traffic counters' layout, a latency histogram, Prometheus text.

The numbers themselves live on the objects they describe (``Backend``
counters, guarded by ``ServerCluster``'s lock).  This module defines, once,
the layout of a backend's traffic counters (``TrafficCounters``: what a
worker reports, what the supervisor adds up, what /status and /metrics
show) and renders a consistent copy (``cluster.ClusterStats``) as
Prometheus text (format version 0.0.4: ``# HELP``/``# TYPE`` lines, then
samples).  ``TrafficHistory`` keeps the last 15 minutes of per-interval
samples for the dashboard (``/status`` ``"history"``).
"""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from loops import LoopGuard
from settings import VERSION
from tunnel import TunnelCounters

if TYPE_CHECKING:
    from cluster import BackendStats, ClusterStats

# Seconds; what a load balancer's users care about: sub-ms to a few seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    """Cumulative-on-render histogram; not thread-safe (the owner's lock guards it)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1  # first bucket with value <= bound
        self.total += value
        self.count += 1

    def copy(self) -> Histogram:
        return Histogram(list(self.counts), self.total, self.count)


@dataclass
class TrafficCounters:
    """One backend's traffic counters; plain data, owned by whoever holds the copy."""

    responses: dict[int, int] = field(default_factory=dict)  # status code -> count
    in_flight: int = 0
    failures: int = 0  # attempts failed at the transport level
    retries: int = 0  # of those, how many were retried elsewhere
    latency: Histogram = field(default_factory=Histogram)

    def add(self, other: TrafficCounters, in_flight: bool = True) -> None:
        """Add ``other`` into these counters (``in_flight=False``: a dead worker's)."""
        for code, count in other.responses.items():
            self.responses[code] = self.responses.get(code, 0) + count
        self.failures += other.failures
        self.retries += other.retries
        if in_flight:
            self.in_flight += other.in_flight
        self.latency = Histogram([a + b for a, b in zip(self.latency.counts, other.latency.counts)],
                                 self.latency.total + other.latency.total,
                                 self.latency.count + other.latency.count)

    def to_json(self) -> dict[str, Any]:
        return {"responses": {str(code): n for code, n in self.responses.items()},
                "in_flight": self.in_flight, "failures": self.failures, "retries": self.retries,
                "latency": list(self.latency.counts), "latency_sum": self.latency.total,
                "latency_count": self.latency.count}

    @classmethod
    def from_json(cls, data: Any) -> TrafficCounters:
        """The inverse of ``to_json``; ValueError for anything of another shape."""
        try:
            counts = [int(n) for n in data["latency"]]
            if len(counts) != len(BUCKETS) + 1:
                raise ValueError("wrong number of latency buckets")
            return cls({int(code): int(n) for code, n in data["responses"].items()},
                       int(data["in_flight"]), int(data["failures"]), int(data["retries"]),
                       Histogram(counts, float(data["latency_sum"]), int(data["latency_count"])))
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed traffic counters: {error!r}") from None


# Why cclb itself turned a connection or a request away (``cclb_rejected_total``).
# A status cclb refuses a request with maps to one reason; a TLS handshake that
# failed is counted in ``cclb_tls_handshake_failures_total`` instead.
REJECT_REASONS = {
    400: "bad_request", 405: "method_not_allowed", 408: "header_timeout",
    413: "body_too_large", 414: "uri_too_long", 417: "expectation_failed",
    431: "headers_too_large", 501: "not_implemented", 505: "version_not_supported",
    403: "denied", 404: "no_route", 429: "rate_limited",  # [[routes]]: allow/deny, no match, rate_limit
}
MAX_CONNECTIONS = "max_connections"  # turned away at --max-connections (a 503, then close)
BODY_TIMEOUT = "body_timeout"  # a 408 while reading the request body, not its head


class RouteCounters:
    """Per-route request, 403 and 429 counters, by route name (they survive reloads).

    ``lock`` guards ``counts`` (route name -> [requests, forbidden, limited]).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, list[int]] = {}

    def count(self, name: str, status: int) -> None:
        """A request taken by route ``name``; ``status`` 403 or 429 when refused."""
        with self.lock:
            row = self.counts.get(name)
            if row is None:
                row = self.counts[name] = [0, 0, 0]
            row[0] += 1
            if status == 403:
                row[1] += 1
            elif status == 429:
                row[2] += 1

    def snapshot(self) -> dict[str, list[int]]:
        with self.lock:
            return {name: list(row) for name, row in self.counts.items()}

    def adopt(self, counts: dict[str, list[int]]) -> None:
        """--workers: show the sums of the workers' counters."""
        with self.lock:
            self.counts = {name: list(row) for name, row in counts.items()}


def reject_reason(status: int) -> str:
    """The ``cclb_rejected_total`` reason of a request cclb refused with ``status``."""
    return REJECT_REASONS.get(status) or f"status_{status}"


@dataclass
class EngineNumbers:
    """The connection engine's numbers (``engine.Engine``): plain data, like FrontendCounters.

    Counters: the queue-wait histogram (``wait_counts`` per bucket of
    ``bounds`` and +Inf, ``wait_sum`` seconds, ``wait_count``).  Gauges: pool
    threads ``busy`` and in all (``threads``), the ``limit`` of threads serving
    at once, requests ``queued`` for a thread, connections ``parked`` in the
    selector.  A supervisor shows the sum of its workers'.
    """

    bounds: tuple[float, ...] = ()
    wait_counts: list[int] = field(default_factory=lambda: [0])
    wait_sum: float = 0.0
    wait_count: int = 0
    busy: int = 0
    threads: int = 0
    limit: int = 0
    queued: int = 0
    parked: int = 0

    def add(self, other: EngineNumbers, gauges: bool = True) -> None:
        """Add ``other`` into these (``gauges=False``: a dead worker's)."""
        if not self.bounds and self.wait_count == 0:
            self.bounds, self.wait_counts = other.bounds, [0] * len(other.wait_counts)
        if other.bounds == self.bounds:  # the same build: always, but never mix buckets
            self.wait_counts = [a + b for a, b in zip(self.wait_counts, other.wait_counts)]
            self.wait_sum += other.wait_sum
            self.wait_count += other.wait_count
        if gauges:
            self.busy += other.busy
            self.threads += other.threads
            self.limit += other.limit
            self.queued += other.queued
            self.parked += other.parked

    def copy(self) -> EngineNumbers:
        return replace(self, wait_counts=list(self.wait_counts))

    def to_json(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "wait_counts": self.wait_counts, "wait_sum": self.wait_sum,
                "wait_count": self.wait_count, "busy": self.busy, "threads": self.threads,
                "limit": self.limit, "queued": self.queued, "parked": self.parked}

    @classmethod
    def from_json(cls, data: Any) -> EngineNumbers:
        """The inverse of ``to_json``; ValueError for anything of another shape."""
        try:
            bounds = tuple(float(b) for b in data["bounds"])
            counts = [int(n) for n in data["wait_counts"]]
            if len(counts) != len(bounds) + 1:
                raise ValueError("a bucket count per bound and +Inf")
            return cls(bounds, counts, float(data["wait_sum"]), int(data["wait_count"]),
                       int(data["busy"]), int(data["threads"]), int(data["limit"]),
                       int(data["queued"]), int(data["parked"]))
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed engine numbers: {error!r}") from None


@dataclass
class FrontendCounters:
    """The client side's numbers: plain data, owned by whoever holds the copy.

    Counters: ``rejected`` (reason -> count), ``responses`` ((source, status)
    -> count; source "cclb" for answers cclb made itself, "backend" for
    relayed ones), bytes ``received`` from and ``sent`` to clients, bytes
    relayed through upgrade tunnels ``tunnel_to_backend`` and
    ``tunnel_to_client``.  Gauges: ``open_connections``, handler threads
    ``busy`` with a request and ``idle`` (waiting on a keep-alive
    connection), ``tunnels_open``.
    """

    rejected: dict[str, int] = field(default_factory=dict)
    responses: dict[tuple[str, int], int] = field(default_factory=dict)
    received: int = 0
    sent: int = 0
    open_connections: int = 0
    busy: int = 0
    idle: int = 0
    tunnels_open: int = 0
    tunnel_to_backend: int = 0
    tunnel_to_client: int = 0
    engine: EngineNumbers = field(default_factory=EngineNumbers)

    def add(self, other: FrontendCounters, gauges: bool = True) -> None:
        """Add ``other`` into these (``gauges=False``: a dead worker's, whose connections are gone)."""
        for reason, count in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count
        for key, count in other.responses.items():
            self.responses[key] = self.responses.get(key, 0) + count
        self.received += other.received
        self.sent += other.sent
        self.tunnel_to_backend += other.tunnel_to_backend
        self.tunnel_to_client += other.tunnel_to_client
        if gauges:
            self.open_connections += other.open_connections
            self.busy += other.busy
            self.idle += other.idle
            self.tunnels_open += other.tunnels_open
        self.engine.add(other.engine, gauges)

    def to_json(self) -> dict[str, Any]:
        return {"rejected": dict(self.rejected),
                "responses": [[source, code, n] for (source, code), n in self.responses.items()],
                "received": self.received, "sent": self.sent,
                "open_connections": self.open_connections, "busy": self.busy, "idle": self.idle,
                "tunnels_open": self.tunnels_open, "tunnel_to_backend": self.tunnel_to_backend,
                "tunnel_to_client": self.tunnel_to_client, "engine": self.engine.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> FrontendCounters:
        """The inverse of ``to_json``; ValueError for anything of another shape."""
        try:
            return cls({str(reason): int(n) for reason, n in data["rejected"].items()},
                       {(str(source), int(code)): int(n) for source, code, n in data["responses"]},
                       int(data["received"]), int(data["sent"]), int(data["open_connections"]),
                       int(data["busy"]), int(data["idle"]), int(data["tunnels_open"]),
                       int(data["tunnel_to_backend"]), int(data["tunnel_to_client"]),
                       EngineNumbers.from_json(data["engine"]))
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed frontend counters: {error!r}") from None

    def dashboard(self) -> dict[str, Any]:
        """The /status ``"frontend"`` document: ``{"open_connections": N, "rejected": {reason: N},
        ..., "tunnels": {"open": N, "bytes_to_backend": N, "bytes_to_client": N}}``."""
        return {"open_connections": self.open_connections, "rejected": dict(self.rejected),
                "busy_threads": self.busy, "idle_threads": self.idle,
                "tunnels": {"open": self.tunnels_open, "bytes_to_backend": self.tunnel_to_backend,
                            "bytes_to_client": self.tunnel_to_client}}


class FrontendMetrics:
    """The live client-side counters of one listener (or, adopted, of all workers).

    Request threads call ``count``/``reject`` once per request or refusal.
    ``lock`` guards ``counters``.  ``gauges`` (set by the listening server)
    reads the open connections and busy/idle handler threads at snapshot
    time, so connection churn costs nothing here; without it (the
    supervisor) the adopted gauges are shown.  Likewise ``tunnels`` (set by
    the listening server: the process's ``TUNNELS``) supplies the tunnel
    numbers at snapshot time; without it the adopted ones are shown.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters = FrontendCounters()
        self.gauges: Callable[[], tuple[int, int, int]] | None = None
        self.tunnels: TunnelMetrics | None = None
        self.engine: EngineMetrics | None = None  # likewise: this process's engine (ENGINE)

    def count(self, source: str | None, status: int, received: int, sent: int,
              reason: str | None = None) -> None:
        """One request (or refused connection) ended: its answer's ``source`` (None: no
        answer went out), ``status``, client bytes, and ``reason`` if cclb refused it."""
        with self.lock:
            counters = self.counters
            if source is not None:
                key = (source, status)
                counters.responses[key] = counters.responses.get(key, 0) + 1
            if reason is not None:
                counters.rejected[reason] = counters.rejected.get(reason, 0) + 1
            counters.received += received
            counters.sent += sent

    def snapshot(self) -> FrontendCounters:
        """A consistent copy, with the gauges read now."""
        gauges = self.gauges() if self.gauges is not None else None
        tunnels = self.tunnels.snapshot() if self.tunnels is not None else None
        engine = self.engine.snapshot() if self.engine is not None else None
        with self.lock:
            c = self.counters
            copy = FrontendCounters(dict(c.rejected), dict(c.responses), c.received, c.sent,
                                    c.open_connections, c.busy, c.idle, c.tunnels_open,
                                    c.tunnel_to_backend, c.tunnel_to_client,
                                    engine if engine is not None else c.engine.copy())
        if gauges is not None:
            copy.open_connections, copy.busy, copy.idle = gauges
        if tunnels is not None:
            copy.tunnels_open, copy.tunnel_to_backend, copy.tunnel_to_client = tunnels
        return copy

    def adopt(self, counters: FrontendCounters) -> None:
        """Show counters added up elsewhere (--workers: the supervisor sums its workers')."""
        with self.lock:
            self.counters = counters


class ProcessMetrics:
    """This process's own numbers: start time, reloads, access-log losses.

    One per process (``PROCESS``): with --workers the supervisor's /metrics
    shows the supervisor's process, as Prometheus' process collectors do.
    ``lock`` guards the counters.
    """

    def __init__(self, version: str = "") -> None:
        self.version = version
        self.started = time.time()
        self.lock = threading.Lock()
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload: float | None = None
        self.access_log_lost = 0  # lines that could not be written
        self.tls_handshake_failures = 0

    def record_reload(self, ok: bool) -> None:
        with self.lock:
            self.reloads["success" if ok else "failure"] += 1
            self.last_reload = time.time()

    def count_tls_handshake_failure(self) -> None:
        with self.lock:
            self.tls_handshake_failures += 1

    def count_access_log_loss(self, lines: int) -> None:
        with self.lock:
            self.access_log_lost += lines

    def families(self) -> list[tuple[str, str, str, list[str]]]:
        """(name, type, help, samples) for every process metric."""
        with self.lock:
            reloads = dict(self.reloads)
            last_reload = self.last_reload
            lost = self.access_log_lost
            handshakes_failed = self.tls_handshake_failures
        times = os.times()
        result = [
            ("cclb_build_info", "gauge", "cclb's version and the Python running it (always 1).",
             [f"cclb_build_info{_labels(version=self.version, python=platform.python_version())} 1"]),
            ("process_start_time_seconds", "gauge", "Start time of the process, in Unix seconds.",
             [f"process_start_time_seconds {self.started:.3f}"]),
            ("process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.",
             [f"process_cpu_seconds_total {times.user + times.system:.3f}"]),
        ]
        resident = _resident_bytes()
        if resident is not None:
            result.append(("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
                           [f"process_resident_memory_bytes {resident}"]))
        open_fds = _open_fds()
        if open_fds is not None:
            result.append(("process_open_fds", "gauge", "Number of open file descriptors.",
                           [f"process_open_fds {open_fds}"]))
        result.append(("process_max_fds", "gauge", "Maximum number of open file descriptors.",
                       [f"process_max_fds {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}"]))
        result.append(("cclb_config_reloads_total", "counter", "Configuration reloads (SIGHUP), by result.",
                       [f"cclb_config_reloads_total{_labels(result=r)} {n}" for r, n in reloads.items()]))
        if last_reload is not None:
            result.append(("cclb_config_last_reload_timestamp_seconds", "gauge",
                           "Time of the last reload attempt, in Unix seconds.",
                           [f"cclb_config_last_reload_timestamp_seconds {last_reload:.3f}"]))
        result.append(("cclb_access_log_lines_lost_total", "counter",
                       "Access log lines that could not be written (e.g. disk full).",
                       [f"cclb_access_log_lines_lost_total {lost}"]))
        result.append(("cclb_tls_handshake_failures_total", "counter",
                       "TLS handshakes that failed or were abandoned (plain HTTP, scanners, timeouts).",
                       [f"cclb_tls_handshake_failures_total {handshakes_failed}"]))
        return result


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


PROCESS = ProcessMetrics(VERSION)


class TunnelMetrics:
    """Upgraded connections (WebSocket tunnels) of this process: how many are open, bytes relayed.

    ``counters`` is handed to every ``tunnel.relay`` (it sums bytes as they
    move, under its own lock); ``lock`` guards ``open``.  The listening
    server hands it to its cluster's ``FrontendMetrics`` (``tunnels``), so the
    numbers travel with the client-side counters: in worker reports, summed
    by the supervisor, in /status and /metrics.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0
        self.counters = TunnelCounters()

    def opened(self) -> None:
        with self.lock:
            self.open += 1

    def closed(self) -> None:
        with self.lock:
            self.open -= 1

    def snapshot(self) -> tuple[int, int, int]:
        """(open tunnels, bytes client→backend, bytes backend→client), read now."""
        with self.lock:
            open_now = self.open
        return (open_now, *self.counters.snapshot())


def tunnel_families(frontend: FrontendCounters) -> list[tuple[str, str, str, list[str]]]:
    """(name, type, help, samples) for ``cclb_tunnels_open`` and ``cclb_tunnel_bytes_total``."""
    return [
        ("cclb_tunnels_open", "gauge", "Upgraded connections (WebSocket tunnels) open now.",
         [f"cclb_tunnels_open {frontend.tunnels_open}"]),
        ("cclb_tunnel_bytes_total", "counter", "Bytes relayed through tunnels, by direction.",
         [f"cclb_tunnel_bytes_total{_labels(direction='client_to_backend')} {frontend.tunnel_to_backend}",
          f"cclb_tunnel_bytes_total{_labels(direction='backend_to_client')} {frontend.tunnel_to_client}"]),
    ]


TUNNELS = TunnelMetrics()


class EngineMetrics:
    """The connection engine of this process (``engine.Engine``): handler threads, queue, parked.

    ``engine`` is attached by the listening server when it starts; ``lock``
    guards it.  Read at render time: handler threads busy and idle, the
    FIFO queue's length and how long requests waited in it (a histogram),
    and the connections parked in the selector.  The listening server hands
    it to its cluster's ``FrontendMetrics`` (``engine``), so the numbers travel
    with the client-side counters: in worker reports, summed by the supervisor.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.engine: Any = None

    def attach(self, engine: Any) -> None:
        with self.lock:
            self.engine = engine

    def snapshot(self) -> EngineNumbers | None:
        """The attached engine's numbers now (None: no engine in this process, the supervisor)."""
        with self.lock:
            engine = self.engine
        if engine is None:
            return None
        counts, total, count, busy = engine.stats.snapshot()
        return EngineNumbers(tuple(engine.stats.bounds), list(counts), total, count, busy,
                             engine.threads, engine.thread_limit(), engine.queue_length(),
                             engine.parked_count())


def engine_families(numbers: EngineNumbers) -> list[tuple[str, str, str, list[str]]]:
    """(name, type, help, samples) of the engine's families (``EngineNumbers``)."""
    samples = []
    cumulative = 0
    for bound, n in zip(numbers.bounds + (float("inf"),), numbers.wait_counts):
        cumulative += n
        le = "+Inf" if bound == float("inf") else repr(bound)
        samples.append(f"cclb_handler_queue_wait_seconds_bucket{_labels(le=le)} {cumulative}")
    samples.append(f"cclb_handler_queue_wait_seconds_sum {numbers.wait_sum:.6f}")
    samples.append(f"cclb_handler_queue_wait_seconds_count {numbers.wait_count}")
    return [
        ("cclb_handler_threads", "gauge",
         "Pool threads (--threads) serving a request now (busy) or waiting for one (idle).",
         [f"cclb_handler_threads{_labels(state='busy')} {numbers.busy}",
          f"cclb_handler_threads{_labels(state='idle')} {max(0, numbers.threads - numbers.busy)}"]),
        ("cclb_handler_thread_limit", "gauge",
         "Handler threads allowed to serve at once now: fewer while the process is CPU-bound, "
         "up to --threads while requests wait on slow backends.",
         [f"cclb_handler_thread_limit {numbers.limit}"]),
        ("cclb_handler_queue_length", "gauge",
         "Connections with a complete request waiting for a free handler thread.",
         [f"cclb_handler_queue_length {numbers.queued}"]),
        ("cclb_handler_queue_wait_seconds", "histogram",
         "Time from a complete request head to a handler thread taking it.", samples),
        ("cclb_parked_connections", "gauge",
         "Connections held by the selector thread: idle keep-alive, request head or body "
         "still arriving, TLS handshake in progress.",
         [f"cclb_parked_connections {numbers.parked}"]),
    ]


ENGINE = EngineMetrics()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def render(stats: ClusterStats, pools: Sequence[ClusterStats] | None = None,
           routes: dict[str, list[int]] | None = None) -> str:
    """The /metrics page for consistent copies of the pools (``ServerCluster.stats``).

    ``stats`` is the front pool's copy (it holds the client-side numbers);
    ``pools`` every configured pool's (``stats`` itself among them when it is
    one).  With named pools, backend series carry a ``pool`` label; with only
    the pool ``default`` (the command line) they look as they always did.
    ``routes``: route name -> [requests, 403s, 429s] (``RouteCounters``).
    """
    pools = [stats] if pools is None else list(pools)
    labelled = [p.pool for p in pools] != ["default"]
    backends = [b for p in pools for b in p.backends]
    pool_of = {id(b): p.pool for p in pools for b in p.backends}
    unrouted = dict(stats.unrouted)
    for p in pools:
        if p is not stats:
            for code, n in p.unrouted.items():
                unrouted[code] = unrouted.get(code, 0) + n
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)

    def of(b: BackendStats, **labels: str) -> str:
        """A backend series' labels: with its pool when there are named pools."""
        if labelled:
            return _labels(backend=b.url, pool=pool_of[id(b)], **labels)
        return _labels(backend=b.url, **labels)

    family("cclb_requests_total", "counter", "Responses relayed, by backend and status code.",
           [f"cclb_requests_total{of(b, code=str(code))} {n}"
            for b in backends for code, n in sorted(b.traffic.responses.items())]
           + [f"cclb_requests_total{_labels(backend='none', code=str(code))} {n}"
              for code, n in sorted(unrouted.items())])
    family("cclb_backend_up", "gauge", "1 if the backend may receive new requests, else 0.",
           [f"cclb_backend_up{of(b)} {int(b.available)}" for b in backends])
    family("cclb_in_flight", "gauge", "Requests currently being served by the backend.",
           [f"cclb_in_flight{of(b)} {b.traffic.in_flight}" for b in backends])
    family("cclb_backend_failures_total", "counter",
           "Attempts that failed at the transport level (refused, reset, closed).",
           [f"cclb_backend_failures_total{of(b)} {b.traffic.failures}"
            for b in backends])
    family("cclb_retries_total", "counter", "Attempts retried on another backend after failing on this one.",
           [f"cclb_retries_total{of(b)} {b.traffic.retries}" for b in backends])
    family("cclb_health_checks_total", "counter", "Active health checks, by result.",
           [f"cclb_health_checks_total{of(b, result=result)} {n}"
            for b in backends for result, n in sorted(b.health_checks.items())])
    samples = []
    for b in backends:
        latency = b.traffic.latency
        cumulative = 0
        for bound, count in zip(BUCKETS + (float("inf"),), latency.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            samples.append(f"cclb_request_duration_seconds_bucket{of(b, le=le)} {cumulative}")
        samples.append(f"cclb_request_duration_seconds_sum{of(b)} {latency.total:.6f}")
        samples.append(f"cclb_request_duration_seconds_count{of(b)} {latency.count}")
    family("cclb_request_duration_seconds", "histogram",
           "Time from the request head to the end of the response, by backend.", samples)
    frontend = stats.frontend
    family("cclb_responses_total", "counter",
           "Responses sent to clients, by source (cclb itself or a backend) and status code.",
           [f"cclb_responses_total{_labels(source=source, code=str(code))} {n}"
            for (source, code), n in sorted(frontend.responses.items())])
    family("cclb_rejected_total", "counter",
           "Connections and requests cclb turned away itself, by reason.",
           [f"cclb_rejected_total{_labels(reason=reason)} {n}"
            for reason, n in sorted(frontend.rejected.items())])
    family("cclb_open_connections", "gauge", "Client connections currently open.",
           [f"cclb_open_connections {frontend.open_connections}"])
    family("cclb_threads", "gauge",
           "Client connections busy with a request (from its first byte to its answer), or idle "
           "between two (keep-alive).",
           [f"cclb_threads{_labels(state='busy')} {frontend.busy}",
            f"cclb_threads{_labels(state='idle')} {frontend.idle}"])
    family("cclb_client_bytes_total", "counter", "Bytes received from and sent to clients.",
           [f"cclb_client_bytes_total{_labels(direction='received')} {frontend.received}",
            f"cclb_client_bytes_total{_labels(direction='sent')} {frontend.sent}"])
    if routes:
        family("cclb_route_requests_total", "counter", "Requests taken by a route ([[routes]]), by route.",
               [f"cclb_route_requests_total{_labels(route=name)} {row[0]}"
                for name, row in routes.items()])
        family("cclb_route_denied_total", "counter", "Requests a route refused with 403 (allow/deny).",
               [f"cclb_route_denied_total{_labels(route=name)} {row[1]}"
                for name, row in routes.items()])
        family("cclb_route_limited_total", "counter",
               "Requests a route refused with 429 (rate_limit), by route.",
               [f"cclb_route_limited_total{_labels(route=name)} {row[2]}"
                for name, row in routes.items()])
    for name, kind, help_text, process_samples in (PROCESS.families() + tunnel_families(frontend)
                                                   + engine_families(frontend.engine)):
        family(name, kind, help_text, process_samples)
    return "\n".join(lines) + "\n"


# --- history for the dashboard ----------------------------------------------------

HISTORY_INTERVAL = 5.0  # seconds between two samples
HISTORY_SIZE = 180  # samples kept: 15 minutes


def quantile(counts: list[int], q: float) -> float | None:
    """The ``q`` quantile (0..1), in seconds, estimated from one histogram's bucket counts.

    ``counts`` are per bucket (not cumulative), laid out as ``Histogram.counts``
    (``BUCKETS`` then +Inf).  As Prometheus' ``histogram_quantile``: linear
    interpolation inside the bucket holding the rank, from 0 for the first
    bucket; a rank in the +Inf bucket answers the highest finite bound.
    None when there is no observation.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count > 0 and seen + count >= rank:
            if index >= len(BUCKETS):
                return BUCKETS[-1]
            lower = BUCKETS[index - 1] if index > 0 else 0.0
            return lower + (BUCKETS[index] - lower) * max(0.0, rank - seen) / count
        seen += count
    return BUCKETS[-1]


@dataclass(frozen=True, slots=True)
class Totals:
    """Cumulative counters of one backend (or of all) at one moment, as the sampler keeps them."""

    requests: int
    errors: int  # 5xx responses
    latency: tuple[int, ...]  # per-bucket counts, as Histogram.counts


def _delta(now: Totals, before: Totals | None) -> Totals:
    """What happened between two cumulative readings.

    A counter that went down was reset (a backend removed and added again,
    a worker's counters replaced): everything since the reset is ``now``.
    """
    if before is None or now.requests < before.requests or now.errors < before.errors or any(
            a < b for a, b in zip(now.latency, before.latency)):
        return now
    return Totals(now.requests - before.requests, now.errors - before.errors,
                  tuple(a - b for a, b in zip(now.latency, before.latency)))


@dataclass(frozen=True, slots=True)
class Interval:
    """One sample: what happened during ``seconds`` seconds up to ``time`` (Unix seconds)."""

    time: float
    seconds: float
    total: Totals  # every backend, plus the answers given without one (no latency)
    backends: dict[str, Totals]  # backend URL -> its traffic in the interval


def _series(totals: list[Totals | None], seconds: list[float]) -> dict[str, list[Any]]:
    """Columns for one line of the charts; None where there is nothing to show."""
    requests: list[int | None] = []
    errors: list[int | None] = []
    rate: list[float | None] = []
    error_rate: list[float | None] = []
    p50: list[float | None] = []
    p99: list[float | None] = []
    for entry, dt in zip(totals, seconds):
        if entry is None:
            for column in (requests, errors, rate, error_rate, p50, p99):
                column.append(None)  # type: ignore[attr-defined]
            continue
        requests.append(entry.requests)
        errors.append(entry.errors)
        rate.append(round(entry.requests / dt, 3))
        error_rate.append(round(entry.errors / entry.requests, 4) if entry.requests else None)
        for column, q in ((p50, 0.5), (p99, 0.99)):
            value = quantile(list(entry.latency), q)
            column.append(None if value is None else round(value * 1000, 3))
    return {"requests": requests, "errors": errors, "rps": rate, "error_rate": error_rate,
            "p50_ms": p50, "p99_ms": p99}


class TrafficHistory:
    """The last ``size`` per-interval samples of the cluster's traffic (15 minutes by default).

    ``sample(now)`` reads the cumulative counters (``source()``, a
    ``ClusterStats``) and records what changed since the previous call:
    requests, 5xx responses and the latency histogram, in total and per
    backend (by URL).  A daemon thread (``start``/``stop``) calls it every
    ``interval`` seconds under a ``LoopGuard``, so a failing round is logged
    and the next one runs.  ``lock`` guards ``samples`` and ``previous``
    (the last cumulative reading and its time).
    """

    def __init__(self, source: Callable[[], ClusterStats], interval: float = HISTORY_INTERVAL,
                 size: int = HISTORY_SIZE) -> None:
        self.source = source
        self.interval = interval
        self.size = size
        self.lock = threading.Lock()
        self.samples: deque[Interval] = deque(maxlen=size)
        self.previous: tuple[float, Totals, dict[str, Totals]] | None = None
        self.guard = LoopGuard("dashboard history")
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def sample(self, now: float) -> Interval | None:
        """Record the traffic since the previous call; returns the new sample.

        The first call (or one whose clock went backwards) only takes the
        baseline and returns None.
        """
        stats = self.source()
        backends: dict[str, Totals] = {}
        latency = [0] * (len(BUCKETS) + 1)
        for backend in stats.backends:
            traffic = backend.traffic
            backends[backend.url] = Totals(
                sum(traffic.responses.values()),
                sum(n for code, n in traffic.responses.items() if 500 <= code <= 599),
                tuple(traffic.latency.counts))
            latency = [a + b for a, b in zip(latency, traffic.latency.counts)]
        unrouted = stats.unrouted
        total = Totals(sum(b.requests for b in backends.values()) + sum(unrouted.values()),
                       sum(b.errors for b in backends.values())
                       + sum(n for code, n in unrouted.items() if 500 <= code <= 599),
                       tuple(latency))
        with self.lock:
            previous, self.previous = self.previous, (now, total, backends)
            if previous is None or now <= previous[0]:
                return None
            before_time, before_total, before_backends = previous
            # The total is the sum of its parts' deltas: a backend removed
            # in between must not make it go down.
            parts = {url: _delta(now_totals, before_backends.get(url))
                     for url, now_totals in backends.items()}
            unrouted_before = (before_total.requests - sum(b.requests for b in before_backends.values()),
                               before_total.errors - sum(b.errors for b in before_backends.values()))
            unrouted_now = (total.requests - sum(b.requests for b in backends.values()),
                            total.errors - sum(b.errors for b in backends.values()))
            unrouted_delta = [a - b if a >= b else a  # went down: reset
                              for a, b in zip(unrouted_now, unrouted_before)]
            interval_total = Totals(
                sum(p.requests for p in parts.values()) + unrouted_delta[0],
                sum(p.errors for p in parts.values()) + unrouted_delta[1],
                tuple(map(sum, zip(*(p.latency for p in parts.values()))))
                if parts else (0,) * (len(BUCKETS) + 1))
            entry = Interval(now, now - before_time, interval_total, parts)
            self.samples.append(entry)
            return entry

    def to_json(self) -> dict[str, Any]:
        """The ``/status`` ``"history"`` document: columns, oldest sample first.

        ``{"interval": 5.0, "size": 180, "time": [t, ...], "seconds": [dt, ...],
        "total": SERIES, "backends": {url: SERIES}}`` where SERIES is
        ``{"requests": [...], "errors": [...], "rps": [...], "error_rate": [...],
        "p50_ms": [...], "p99_ms": [...]}``, every list as long as ``time``;
        ``null`` where a backend did not exist, and for the error rate and
        latencies of an interval without requests.
        """
        with self.lock:
            samples = list(self.samples)
        seconds = [entry.seconds for entry in samples]
        urls: dict[str, None] = {}
        for entry in samples:
            urls.update(dict.fromkeys(entry.backends))
        return {
            "interval": self.interval, "size": self.size,
            "time": [round(entry.time, 3) for entry in samples],
            "seconds": [round(dt, 3) for dt in seconds],
            "total": _series([entry.total for entry in samples], seconds),
            "backends": {url: _series([entry.backends.get(url) for entry in samples], seconds)
                         for url in urls},
        }

    # --- the sampling thread ---------------------------------------------------

    def start(self) -> None:
        """Start the daemon thread that samples every ``interval`` seconds (once)."""
        with self.lock:
            if self.thread is not None:
                return
            self.thread = threading.Thread(target=self.run, name="dashboard-history", daemon=True)
        self.thread.start()

    def run(self) -> None:
        """Take the baseline, then one sample per interval until ``stop``; survives failures."""
        with self.guard:
            self.sample(time.time())
        while not self.stopped.wait(self.interval):
            with self.guard:
                self.sample(time.time())

    def stop(self) -> None:
        """Stop the thread and wait for it (a round in progress finishes)."""
        self.stopped.set()
        with self.lock:
            thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

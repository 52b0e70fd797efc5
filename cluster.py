"""The backends and their shared state: ``Backend`` and ``ServerCluster``.

Each backend's state (health, admin state, in-flight requests, counters)
lives on one ``Backend`` object.  ``ServerCluster._lock`` guards the backend
list, every Backend field marked "guarded" below, and the policy's state; it
stays inside this module: other modules read consistent copies
(``ServerCluster.stats``, ``BackendStats``) and change state through the
cluster's methods.  Each backend's connection pool has its own lock (see
``upstream``), so requests to different backends never contend on socket
bookkeeping.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

from access import AddressList, RateLimiter
from backend_urls import BackendSpec
from balancing import Policy, RoundRobin, make_policy
from metrics import FrontendCounters, FrontendMetrics, Histogram, RouteCounters, TrafficCounters
from routing import RouteTable, sticky_value
from upstream import BackendTLS, ConnectionPool

if TYPE_CHECKING:
    from settings import PoolSettings

log = logging.getLogger("cclb")

READY, DRAIN, MAINT = "ready", "drain", "maint"


@dataclass(eq=False)
class Backend:
    """One backend server and everything cclb knows about it."""

    id: int
    url: str
    host: str
    port: int
    weight: int
    pool: ConnectionPool
    # guarded by ServerCluster._lock:
    healthy: bool = True
    admin_state: str = READY
    since: float = field(default_factory=time.time)  # when `state` last changed
    up_since: float = field(default_factory=time.monotonic)  # for slow start
    in_flight: int = 0
    check_successes: int = 0  # consecutive
    check_failures: int = 0  # consecutive
    last_check: str = ""
    last_check_latency: float | None = None
    passive_failures: list[float] = field(default_factory=list)  # monotonic times
    passive_down_until: float = 0.0  # monotonic; set by passive checks (nginx fail_timeout)
    responses: dict[int, int] = field(default_factory=dict)  # status code -> count
    latency: Histogram = field(default_factory=Histogram)
    health_checks: dict[str, int] = field(default_factory=dict)  # "pass"/"fail" -> count
    failures: int = 0  # attempts failed at the transport level
    retries: int = 0  # of those, how many were retried elsewhere
    slow_start: float = 0.0
    cookie: str = ""  # its sticky-session cookie value (routing.sticky_value), fixed

    @property
    def state(self) -> str:
        if self.admin_state != READY:
            return self.admin_state
        return "up" if self.healthy and not self.passively_down() else "down"

    @property
    def available(self) -> bool:
        return self.healthy and self.admin_state == READY and not (
            self.passive_down_until and self.passively_down())

    def passively_down(self) -> bool:
        return time.monotonic() < self.passive_down_until

    def stats(self) -> BackendStats:
        """A copy of this backend's state and counters (caller holds the cluster lock)."""
        return BackendStats(
            self.id, self.url, self.weight, self.effective_weight(), self.state, self.available,
            self.healthy, self.admin_state, self.since, self.last_check, self.last_check_latency,
            dict(self.health_checks),
            TrafficCounters(dict(self.responses), self.in_flight, self.failures, self.retries,
                            self.latency.copy()))

    def adopt_traffic(self, traffic: TrafficCounters) -> None:
        """Show ``traffic`` as this backend's counters (caller holds the cluster lock)."""
        self.responses = dict(traffic.responses)
        self.in_flight = traffic.in_flight
        self.failures = traffic.failures
        self.retries = traffic.retries
        self.latency = traffic.latency.copy()

    def effective_weight(self) -> float:
        """The weight, ramped up linearly during slow start."""
        if self.slow_start <= 0:
            return self.weight
        ramp = (time.monotonic() - self.up_since) / self.slow_start
        return self.weight * min(1.0, max(ramp, 0.05))


@dataclass(frozen=True, slots=True)
class BackendStats:
    """A consistent copy of one backend's state and counters, free of any lock."""

    id: int
    url: str
    weight: int
    effective_weight: float
    state: str  # "up", "down", "drain" or "maint"
    available: bool
    healthy: bool
    admin_state: str
    since: float  # wall-clock time of the last state change
    last_check: str
    last_check_latency: float | None
    health_checks: dict[str, int]
    traffic: TrafficCounters


@dataclass(frozen=True, slots=True)
class ClusterStats:
    """A consistent copy of the whole cluster, taken in one step under its lock."""

    policy: str
    backends: list[BackendStats]
    unrouted: dict[int, int]  # answers given without a backend, by status
    # The client side: rejections, responses by source, bytes, connections.
    frontend: FrontendCounters = field(default_factory=FrontendCounters)
    pool: str = "default"  # the pool's name


class Attempt:
    """One request's hold on one backend: from ``ServerCluster.acquire`` to one release.

    Every path ends it exactly once: ``done`` (a response, or an answer cclb
    gave on the backend's behalf, with its status), ``failed`` (a transport
    failure, maybe retried elsewhere), or leaving the ``with`` block, which
    releases an attempt that is still open without counting a response.  A
    second release is a no-op, so in-flight counts can never go below zero.
    ``released`` is guarded by ``ServerCluster._lock``.
    """

    __slots__ = ("cluster", "backend", "released")

    def __init__(self, cluster: ServerCluster, backend: Backend) -> None:
        self.cluster = cluster
        self.backend = backend
        self.released = False

    def done(self, status: int, duration: float) -> None:
        """The attempt ended with ``status`` after ``duration`` seconds."""
        self.cluster._release(self, status, duration, retried=False)

    def failed(self, reason: str | None, retried: bool = False) -> None:
        """The attempt failed at the transport level.

        ``reason`` (for the log) counts as a passive health-check failure;
        None does not (e.g. a pooled connection that had died while idle).
        """
        if self.cluster._release(self, None, 0.0, retried) and reason is not None:
            self.cluster.report_failure(self.backend, reason)

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cluster._release(self, None, 0.0, retried=False)


class ServerCluster:
    """A named pool of backends and the policy that picks among them."""

    def __init__(self, specs: Iterable[BackendSpec], policy: Policy | None = None, *,
                 name: str = "default", connect_timeout: float = 3.0, read_timeout: float = 60.0,
                 max_fails: int = 1, fail_timeout: float = 10.0, slow_start: float = 0.0,
                 transitions_level: int = logging.WARNING,
                 backend_tls: BackendTLS | None = None, ids: Iterator[int] | None = None,
                 sticky_cookie: str | None = None, sticky_key: bytes = b"") -> None:
        self.name = name
        # --workers: each worker logs its passive take-downs at DEBUG, so a
        # transition is logged once, by the supervisor that checks health.
        self.transitions_level = transitions_level
        self._lock = threading.Lock()
        self.policy: Policy = policy or RoundRobin()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self.slow_start = slow_start
        self.backend_tls = backend_tls or BackendTLS()  # for https:// backends' pools
        self.backends: list[Backend] = []
        # Backend ids: shared by all the pools of a process, so an id names one backend
        # (next() on an itertools.count is atomic in CPython).
        self.ids = ids if ids is not None else itertools.count(1)
        self.sticky_cookie = sticky_cookie  # the cookie's name, when the pool is sticky
        self.sticky_key = sticky_key  # the key of its values (routing.sticky_value)
        self.unrouted: dict[int, int] = {}  # answers given without a backend (503...)
        # The listener's own numbers (its own lock; the server fills its gauges).
        self.frontend = FrontendMetrics()
        for spec in specs:
            self.add(spec)

    @classmethod
    def from_settings(cls, pool: PoolSettings, ids: Iterator[int] | None = None,
                      sticky_key: bytes = b"") -> ServerCluster:
        return cls(pool.backends, make_policy(pool.algorithm), name=pool.name,
                   connect_timeout=pool.connect_timeout, read_timeout=pool.read_timeout,
                   max_fails=pool.max_fails, fail_timeout=pool.fail_timeout,
                   slow_start=pool.slow_start, backend_tls=BackendTLS.of(pool), ids=ids,
                   sticky_cookie=pool.sticky_cookie, sticky_key=sticky_key)

    def apply_settings(self, old: PoolSettings, new: PoolSettings) -> tuple[list[str], list[str]]:
        """A reload: adopt ``new`` (members, policy, timeouts); returns (added, removed) URLs."""
        added, removed = self.reconcile(new.backends)
        self.configure(
            make_policy(new.algorithm) if new.algorithm != old.algorithm else None,
            connect_timeout=new.connect_timeout, read_timeout=new.read_timeout,
            max_fails=new.max_fails, fail_timeout=new.fail_timeout, slow_start=new.slow_start,
            backend_tls=BackendTLS.of(new, self.backend_tls))
        self.sticky_cookie = new.sticky_cookie
        return added, removed

    # --- membership -------------------------------------------------------

    def add(self, spec: BackendSpec) -> Backend | None:
        """Add a backend; None if one with the same URL is already there."""
        with self._lock:
            return self._add_locked(spec)

    def _add_locked(self, spec: BackendSpec) -> Backend | None:
        # caller holds self._lock
        if any(backend.url == spec.url for backend in self.backends):
            return None
        pool = ConnectionPool(spec.host, spec.port, self.connect_timeout, self.read_timeout,
                              tls=self.backend_tls if spec.tls else None)
        backend = Backend(next(self.ids), spec.url, spec.host, spec.port, spec.weight, pool,
                          slow_start=self.slow_start,
                          cookie=sticky_value(self.sticky_key, spec.url))
        self.backends.append(backend)
        return backend

    def remove(self, backend: Backend) -> None:
        """Take a backend out; requests in flight on it finish normally."""
        with self._lock:
            if backend in self.backends:
                self.backends.remove(backend)
        backend.pool.retire()

    def reconcile(self, specs: Iterable[BackendSpec]) -> tuple[list[str], list[str]]:
        """Make the backend list match ``specs`` (a reload); returns (added, removed) URLs.

        Backends that stay keep their state, counters and pooled
        connections; only their weight follows the new spec.  One step
        under the lock, so concurrent changes cannot interleave.
        """
        wanted = {spec.url: spec for spec in specs}
        with self._lock:
            removed = [b for b in self.backends if b.url not in wanted]
            for backend in self.backends:
                if backend.url in wanted:
                    backend.weight = wanted[backend.url].weight
            self.backends = [b for b in self.backends if b.url in wanted]
            added = [b.url for spec in wanted.values() if (b := self._add_locked(spec))]
        for backend in removed:
            backend.pool.retire()
        return added, [backend.url for backend in removed]

    def configure(self, policy: Policy | None = None, **params: float | BackendTLS) -> None:
        """Change the policy or the timeouts/thresholds (a reload)."""
        with self._lock:
            if policy is not None:
                self.policy = policy
            for name, value in params.items():
                setattr(self, name, value)
            for backend in self.backends:
                backend.slow_start = self.slow_start
                backend.pool.connect_timeout = self.connect_timeout
                backend.pool.read_timeout = self.read_timeout
                if backend.pool.tls is not None:
                    backend.pool.tls = self.backend_tls

    def find(self, backend_id: int) -> Backend | None:
        with self._lock:
            return next((b for b in self.backends if b.id == backend_id), None)

    def snapshot(self) -> list[Backend]:
        with self._lock:
            return list(self.backends)

    # --- consistent copies for the admin API, metrics and workers ----------

    def stats(self) -> ClusterStats:
        """Every backend's state and counters, copied in one step."""
        frontend = self.frontend.snapshot()  # outside our lock: it reads the server's
        with self._lock:
            return ClusterStats(self.policy.name, [b.stats() for b in self.backends],
                                dict(self.unrouted), frontend, self.name)

    def backend_stats(self, backend: Backend) -> BackendStats:
        with self._lock:
            return backend.stats()

    def adopt_traffic(self, per_url: dict[str, TrafficCounters], unrouted: dict[int, int],
                      frontend: FrontendCounters | None = None) -> None:
        """Show counters added up elsewhere (--workers: the supervisor sums its workers')."""
        if frontend is not None:
            self.frontend.adopt(frontend)
        with self._lock:
            self.unrouted = dict(unrouted)
            for backend in self.backends:
                traffic = per_url.get(backend.url)
                if traffic is not None:
                    backend.adopt_traffic(traffic)

    # --- the request path -------------------------------------------------

    def acquire(self, client: str, exclude: tuple[Backend, ...] = (),
                sticky: str | None = None) -> Attempt | None:
        """Pick a backend for a request and count it in flight, or None if none is up.

        ``sticky``: a sticky-session cookie value; the backend it names takes
        the request while it is available.  The returned ``Attempt`` owns
        that in-flight count until it is released (exactly once, see ``Attempt``).
        """
        with self._lock:
            candidates = [b for b in self.backends if b.available and b not in exclude]
            if not candidates:
                return None
            backend = next((b for b in candidates if b.cookie == sticky), None) if sticky else None
            if backend is None:
                backend = self.policy.select(candidates, client)
            backend.in_flight += 1
        return Attempt(self, backend)

    def _release(self, attempt: Attempt, status: int | None, duration: float,
                 retried: bool) -> bool:
        """End ``attempt``: with ``status``, or failed (None).  False if it had ended already."""
        backend = attempt.backend
        with self._lock:
            if attempt.released:
                return False
            attempt.released = True
            assert backend.in_flight > 0, f"in-flight count of {backend.url} would go below zero"
            backend.in_flight -= 1
            if status is not None:
                backend.responses[status] = backend.responses.get(status, 0) + 1
                if status != 101:  # a tunnel's life is not a latency (README: WebSocket)
                    backend.latency.observe(duration)
                if backend.passive_down_until and not backend.passively_down():
                    backend.passive_down_until = 0.0  # served again after its time out
            if retried:
                backend.retries += 1
        return True

    def count_unrouted(self, status: int) -> None:
        """A request answered by cclb itself because no backend could take it."""
        with self._lock:
            self.unrouted[status] = self.unrouted.get(status, 0) + 1

    def report_failure(self, backend: Backend, reason: str) -> None:
        """Passive check: a request to ``backend`` failed at the transport level.

        ``max_fails`` failures within ``fail_timeout`` seconds take it out of
        rotation for ``fail_timeout`` seconds (nginx semantics), or until an
        active check passes ``rise`` times, whichever comes first.  A pool of
        one is never emptied by passive failures alone.
        """
        now = time.monotonic()
        with self._lock:
            backend.failures += 1
            recent = [t for t in backend.passive_failures if now - t < self.fail_timeout]
            recent.append(now)
            backend.passive_failures = recent
            if (self.max_fails == 0 or len(recent) < self.max_fails or not backend.available
                    or sum(b.available for b in self.backends) < 2):
                return  # never take out the last backend that can take traffic
            backend.passive_down_until = now + self.fail_timeout
            backend.passive_failures = []
            backend.check_successes = 0
            backend.since = time.time()
        log.log(self.transitions_level, "backend %s is DOWN: %s", backend.url, reason)

    def report_check(self, backend: Backend, ok: bool, detail: str, latency: float | None,
                     rise: int = 1, fall: int = 1) -> None:
        """Active check result; flips health after ``rise``/``fall`` in a row."""
        revived = quiet = False
        with self._lock:
            backend.last_check = detail
            backend.last_check_latency = latency
            result = "pass" if ok else "fail"
            backend.health_checks[result] = backend.health_checks.get(result, 0) + 1
            if ok:
                backend.check_successes += 1
                backend.check_failures = 0
                changed = not backend.healthy and backend.check_successes >= rise
                if backend.passive_down_until and backend.check_successes >= rise:
                    revived = backend.healthy and backend.passively_down()
                    backend.passive_down_until = 0.0
            else:
                backend.check_failures += 1
                backend.check_successes = 0
                changed = backend.healthy and backend.check_failures >= fall
                # Already out (and logged) through passive checks: confirm quietly.
                quiet = changed and backend.passive_down_until > 0
            if changed:
                self._set_health(backend, ok)
            if revived:
                backend.since = time.time()
                backend.up_since = time.monotonic()
        if (changed and ok) or revived:
            log.log(self.transitions_level, "backend %s is UP again", backend.url)
        elif changed and not quiet:
            log.log(self.transitions_level, "backend %s is DOWN: %s", backend.url, detail)
        if changed and not ok:
            backend.pool.close_all()

    def apply_published_health(self, backend: Backend, healthy: bool) -> None:
        """A worker adopts the supervisor's verdict (see workers.py); no log."""
        with self._lock:
            # Only a change of the verdict counts: an "up" repeated every round
            # must not cut short this worker's own passive fail_timeout.
            if backend.healthy != healthy:
                self._set_health(backend, healthy)

    def set_admin_state(self, backend: Backend, state: str, quiet: bool = False) -> None:
        """Put ``backend`` in ``state`` (ready, drain, maint); ``since`` moves only on a change."""
        with self._lock:
            if backend.admin_state != state:
                backend.admin_state = state
                backend.since = time.time()
        if not quiet:
            log.warning("backend %s set to %s", backend.url, state)

    def _set_health(self, backend: Backend, healthy: bool) -> None:
        # caller holds self._lock
        backend.healthy = healthy
        backend.since = time.time()
        if healthy:
            backend.up_since = time.monotonic()
            backend.passive_failures = []
            backend.passive_down_until = 0.0

    def close(self) -> None:
        for backend in self.snapshot():
            backend.pool.retire()


def sticky_key(secret: str | None) -> bytes:
    """The key of sticky-cookie values: ``--sticky-secret``, else one derived from this machine.

    Derived from /etc/machine-id (else the host name), it is the same for
    every process on this machine and across restarts, and reveals nothing.
    """
    if secret:
        return hashlib.sha256(b"cclb sticky\0" + secret.encode("utf-8")).digest()
    try:
        with open("/etc/machine-id", "rb") as handle:
            seed = handle.read().strip()
    except OSError:
        seed = b""
    return hashlib.sha256(b"cclb sticky\0" + (seed or socket.gethostname().encode())).digest()


@dataclass(frozen=True, eq=False)
class Routing:
    """The route table and the pools it sends to: one object, replaced whole on reload.

    A request reads ``server.routing`` once and is routed entirely under that
    table (an attribute store is atomic).  ``front`` is the pool ``default``
    (the one cclb had before routes; it also holds the client-side metrics);
    it is in ``pools`` only when configured.  ``counters`` and ``limiter``
    carry over from one table to the next.
    """

    table: RouteTable
    pools: dict[str, ServerCluster]
    front: ServerCluster
    counters: RouteCounters
    limiter: RateLimiter | None = None  # when a route has a rate limit
    trusted: AddressList | None = None  # trusted_proxies

    @property
    def plain(self) -> bool:
        """Nothing to decide per request: no routes, only the pool default, no stickiness,
        no trusted proxies (the proxy then skips routing: the hot path as before)."""
        return (not self.table.routes and list(self.pools) == ["default"]
                and self.front.sticky_cookie is None and not self.trusted)

    def all_pools(self) -> list[ServerCluster]:
        return list(self.pools.values())

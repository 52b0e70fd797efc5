"""Metrics: a latency histogram and the Prometheus text exposition format.

The numbers themselves live on the objects they describe (``Backend``
counters, guarded by ``ServerCluster.lock``); this module only provides the
histogram type and renders a consistent snapshot as Prometheus text
(format version 0.0.4: ``# HELP``/``# TYPE`` lines, then samples).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from cluster import Backend, ServerCluster

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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def render(cluster: ServerCluster) -> str:
    """The /metrics page for ``cluster`` (consistent: taken under its lock)."""
    with cluster.lock:
        backends = [_BackendView.of(backend) for backend in cluster.backends]
        unrouted = dict(cluster.unrouted)
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)

    family("cclb_requests_total", "counter", "Responses relayed, by backend and status code.",
           [f"cclb_requests_total{_labels(backend=b.url, code=str(code))} {n}"
            for b in backends for code, n in sorted(b.responses.items())]
           + [f"cclb_requests_total{_labels(backend='none', code=str(code))} {n}"
              for code, n in sorted(unrouted.items())])
    family("cclb_backend_up", "gauge", "1 if the backend may receive new requests, else 0.",
           [f"cclb_backend_up{_labels(backend=b.url)} {int(b.available)}" for b in backends])
    family("cclb_in_flight", "gauge", "Requests currently being served by the backend.",
           [f"cclb_in_flight{_labels(backend=b.url)} {b.in_flight}" for b in backends])
    family("cclb_backend_failures_total", "counter",
           "Attempts that failed at the transport level (refused, reset, closed).",
           [f"cclb_backend_failures_total{_labels(backend=b.url)} {b.failures}" for b in backends])
    family("cclb_retries_total", "counter", "Attempts retried on another backend after failing on this one.",
           [f"cclb_retries_total{_labels(backend=b.url)} {b.retries}" for b in backends])
    family("cclb_health_checks_total", "counter", "Active health checks, by result.",
           [f"cclb_health_checks_total{_labels(backend=b.url, result=result)} {n}"
            for b in backends for result, n in sorted(b.health_checks.items())])
    samples = []
    for b in backends:
        cumulative = 0
        for bound, count in zip(BUCKETS + (float("inf"),), b.latency.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            samples.append(f"cclb_request_duration_seconds_bucket{_labels(backend=b.url, le=le)} {cumulative}")
        samples.append(f"cclb_request_duration_seconds_sum{_labels(backend=b.url)} {b.latency.total:.6f}")
        samples.append(f"cclb_request_duration_seconds_count{_labels(backend=b.url)} {b.latency.count}")
    family("cclb_request_duration_seconds", "histogram",
           "Time from the request head to the end of the response, by backend.", samples)
    return "\n".join(lines) + "\n"


@dataclass
class _BackendView:
    """A copy of one backend's numbers, taken under the cluster lock."""

    url: str
    available: bool
    in_flight: int
    failures: int
    retries: int
    responses: dict[int, int]
    health_checks: dict[str, int]
    latency: Histogram

    @classmethod
    def of(cls, backend: Backend) -> _BackendView:
        return cls(backend.url, backend.available, backend.in_flight, backend.failures,
                   backend.retries, dict(backend.responses), dict(backend.health_checks),
                   backend.latency.copy())

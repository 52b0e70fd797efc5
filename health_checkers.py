"""Active health checks: a daemon thread that probes every backend each period.

Health checking is separate from selection: the checker only reports
results to ``ServerCluster.report_check``, which flips a backend's health
after ``rise``/``fall`` consecutive results and logs each transition once.
Each backend is probed in its own short-lived thread, so one slow backend
never delays the verdict on the others.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from cluster import Backend, ServerCluster

log = logging.getLogger("cclb")


@dataclass
class HealthSettings:
    interval: float = 10.0
    path: str = "/"
    timeout: float = 2.0
    expected: tuple[int, int] = (200, 399)
    rise: int = 1
    fall: int = 1


def probe(backend: Backend, settings: HealthSettings) -> tuple[bool, str, float | None]:
    """One check: (passed, human-readable detail, latency in seconds or None)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(backend.host, backend.port, timeout=settings.timeout)
    try:
        conn.request("GET", settings.path, headers={
            "Host": backend.url.partition("://")[2],  # host:port, IPv6 in brackets
            "User-Agent": "cclb-health-check",
            "Connection": "close"})
        response = conn.getresponse()
        response.read(65536)
        latency = time.monotonic() - started
        low, high = settings.expected
        if low <= response.status <= high:
            return True, f"HTTP {response.status}", latency
        return False, f"HTTP {response.status}", latency
    except ConnectionRefusedError:
        return False, "connection refused", None
    except (socket.timeout, TimeoutError):
        return False, f"no answer within {settings.timeout:g}s", None
    except (OSError, http.client.HTTPException) as error:
        return False, describe_error(error), None
    finally:
        conn.close()


def describe_error(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve host ({error.strerror})"
    text = str(error) or type(error).__name__
    return text


class HealthChecker(threading.Thread):
    """Daemon thread checking every backend of ``cluster`` every interval."""

    def __init__(self, cluster: ServerCluster, settings: HealthSettings,
                 on_round: Callable[[], None] | None = None) -> None:
        super().__init__(name="health-checker", daemon=True)
        self.cluster = cluster
        self.settings = settings
        self.on_round = on_round  # called after every round (workers.py publishes)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set() and self.settings.interval > 0:
            started = time.monotonic()
            self.check_all()
            if self.on_round is not None:
                self.on_round()
            self.stopped.wait(max(0.0, self.settings.interval - (time.monotonic() - started)))

    def check_all(self) -> None:
        """Probe all backends in parallel; wait at most the check timeout (+ margin)."""
        settings = self.settings
        threads = [threading.Thread(target=self.check_one, args=(backend, settings),
                                    name=f"health-{backend.id}", daemon=True)
                   for backend in self.cluster.snapshot()]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + settings.timeout + 1.0
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def check_one(self, backend: Backend, settings: HealthSettings) -> None:
        ok, detail, latency = probe(backend, settings)
        self.cluster.report_check(backend, ok, detail, latency, settings.rise, settings.fall)

    def stop(self) -> None:
        self.stopped.set()

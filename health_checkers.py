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


def probe(backend: Backend, settings: HealthSettings,
          conn: http.client.HTTPConnection | None = None) -> tuple[bool, str, float | None]:
    """One check: (passed, human-readable detail, latency in seconds or None).

    ``conn`` lets the caller keep a handle to abort a check that overruns.
    """
    started = time.monotonic()
    if conn is None:
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
    if isinstance(error, http.client.HTTPException):
        return f"invalid answer ({type(error).__name__})"
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
        """Probe all backends in parallel, each for at most the check timeout (+ margin).

        The socket timeout bounds each read, not a whole check: a backend that
        dribbles bytes would keep its thread.  Checks still running at the
        deadline are cut off by shutting their socket down (they report a fail).
        """
        settings = self.settings
        checks = []
        for backend in self.cluster.snapshot():
            conn = http.client.HTTPConnection(backend.host, backend.port,
                                              timeout=settings.timeout)
            thread = threading.Thread(target=self.check_one, args=(backend, settings, conn),
                                      name=f"health-{backend.id}", daemon=True)
            thread.start()
            checks.append((thread, conn))
        deadline = time.monotonic() + settings.timeout + 1.0
        for thread, conn in checks:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive() and conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def check_one(self, backend: Backend, settings: HealthSettings,
                  conn: http.client.HTTPConnection | None = None) -> None:
        ok, detail, latency = probe(backend, settings, conn)
        self.cluster.report_check(backend, ok, detail, latency, settings.rise, settings.fall)

    def stop(self) -> None:
        self.stopped.set()

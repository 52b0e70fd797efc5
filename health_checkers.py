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
from typing import TYPE_CHECKING, Callable

from cluster import Backend, ServerCluster
from loops import LoopGuard
from upstream import describe_error

if TYPE_CHECKING:
    from settings import PoolSettings

log = logging.getLogger("cclb")


@dataclass(frozen=True)
class HealthSettings:
    interval: float = 10.0
    path: str = "/"
    timeout: float = 2.0
    expected: tuple[int, int] = (200, 399)
    rise: int = 1
    fall: int = 1

    @classmethod
    def of(cls, pool: PoolSettings) -> HealthSettings:
        return cls(pool.health_interval, pool.health_path, pool.health_timeout,
                   pool.health_status, pool.rise, pool.fall)


class Probe:
    """One active check of one backend, which another thread may cut off.

    ``lock`` guards ``cut`` and the hand-over of the socket: ``cut_off``
    reads ``conn.sock`` once, under the lock, so the probe thread closing
    the connection at the same moment can never make it fail (the socket
    it got is then closed, and shutting a closed socket is a harmless
    OSError).  A probe that connects after being cut off gives up at once.

    An ``https://`` backend is checked over ``http.client.HTTPSConnection``
    with the client context of its pool (``--backend-ca``/``--backend-insecure``),
    so a check passes only if a request would get through: a certificate
    that fails verification fails the check with a reason that says so.
    """

    def __init__(self, backend: Backend, settings: HealthSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.setup_error: OSError | None = None  # the TLS context could not be built
        backend_tls = backend.pool.tls
        context = None
        if backend_tls is not None:
            try:
                context = backend_tls.context()
            except OSError as error:  # BackendTLSError: reported by run()
                self.setup_error = error
        self.conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(backend.host, backend.port, timeout=settings.timeout, context=context)
            if context is not None else
            http.client.HTTPConnection(backend.host, backend.port, timeout=settings.timeout))
        self.lock = threading.Lock()
        self.cut = False

    def run(self) -> tuple[bool, str, float | None]:
        """Check once: (passed, human-readable detail, latency in seconds or None)."""
        settings = self.settings
        if self.setup_error is not None:
            return False, describe_error(self.setup_error), None
        started = time.monotonic()
        try:
            self.conn.connect()  # and, for https, the handshake
            with self.lock:
                if self.cut:
                    return False, self.timeout_detail(), None
            self.conn.request("GET", settings.path, headers={
                "Host": self.backend.url.partition("://")[2],  # host:port, IPv6 in brackets
                "User-Agent": "cclb-health-check",
                "Connection": "close"})
            response = self.conn.getresponse()
            response.read(65536)
            latency = time.monotonic() - started
            with self.lock:
                if self.cut:  # http.client may take the shut stream's end for a whole answer
                    return False, self.timeout_detail(), None
            low, high = settings.expected
            return low <= response.status <= high, f"HTTP {response.status}", latency
        except (OSError, http.client.HTTPException) as error:
            with self.lock:
                if self.cut:  # whatever the shut socket made the read fail with
                    return False, self.timeout_detail(), None
            if isinstance(error, (socket.timeout, TimeoutError)):
                return False, self.timeout_detail(), None
            return False, describe_error(error), None
        finally:
            self.conn.close()

    def timeout_detail(self) -> str:
        return f"no answer within {self.settings.timeout:g}s"

    def cut_off(self) -> None:
        """Abort a check that overran: its blocked read returns and it reports a timeout."""
        with self.lock:
            self.cut = True
            sock = self.conn.sock
        if sock is not None:
            try:
                # The descriptor's shutdown, also for a TLS socket: SSLSocket.shutdown
                # would drop its SSL object under the probe thread's feet.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the probe thread


def probe(backend: Backend, settings: HealthSettings) -> tuple[bool, str, float | None]:
    """One check of ``backend`` in the calling thread (see ``Probe.run``)."""
    return Probe(backend, settings).run()


class HealthChecker(threading.Thread):
    """Daemon thread checking every backend of ``cluster`` every interval."""

    # A check gets its timeout plus this margin before it is cut off: none, so
    # that --health-timeout bounds the whole exchange (connect, request,
    # answer), as HAProxy's "timeout check" does, not just each read.
    cut_off_margin = 0.0

    def __init__(self, cluster: ServerCluster, settings: HealthSettings,
                 on_round: Callable[[], None] | None = None) -> None:
        super().__init__(name="health-checker", daemon=True)
        self.cluster = cluster
        self.settings = settings
        self.on_round = on_round  # called after every round (workers.py publishes)
        self.stopped = threading.Event()
        self.guard = LoopGuard("health checker")

    def run(self) -> None:
        while not self.stopped.is_set() and self.settings.interval > 0:
            started = time.monotonic()
            with self.guard:
                self.check_all()
            if self.on_round is not None:
                with self.guard:
                    self.on_round()
            self.stopped.wait(max(0.0, self.settings.interval - (time.monotonic() - started)))

    def check_all(self) -> None:
        """Probe all backends in parallel, each for at most the check timeout (+ margin).

        The socket timeout bounds each read, not a whole check: a backend that
        dribbles bytes would keep its thread.  Checks still running at the
        deadline, counted from before the first probe starts, are cut off
        (they report a timeout).
        """
        settings = self.settings
        deadline = time.monotonic() + settings.timeout + self.cut_off_margin
        checks = []
        for backend in self.cluster.snapshot():
            probe = Probe(backend, settings)
            thread = threading.Thread(target=self.check_one, args=(probe,),
                                      name=f"health-{backend.id}", daemon=True)
            thread.start()
            checks.append((thread, probe))
        for thread, probe in checks:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                probe.cut_off()

    def check_one(self, probe: Probe) -> None:
        with self.guard:
            ok, detail, latency = probe.run()
            settings = probe.settings
            self.cluster.report_check(probe.backend, ok, detail, latency, settings.rise, settings.fall)

    def stop(self) -> None:
        self.stopped.set()

#!/usr/bin/env python3
"""cclb: an HTTP/1.1 load balancer in pure-stdlib Python.

Usage: ``python3 cclb.py [options]`` (``--help`` lists them all).

This module wires the pieces together and owns the process: settings,
logging, the listening server, the health checker, signals, and the
``--demo`` backends.  The request path is in ``proxy.py``.
"""

from __future__ import annotations

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

import settings
from balancing import make_policy
from cluster import ServerCluster
from health_checkers import HealthChecker, HealthSettings
from loggers import AccessLog, setup_app_logger
from proxy import LoadBalancerServer

HERE = Path(__file__).resolve().parent
DEMO_PORTS = (7000, 7001, 7002)
DRAIN_SECONDS = 5.0

log = logging.getLogger("cclb")


def build_cluster(config: Any) -> ServerCluster:
    return ServerCluster(
        config.backends, make_policy(config.algorithm),
        connect_timeout=config.connect_timeout, read_timeout=config.read_timeout,
        max_fails=config.max_fails, fail_timeout=config.fail_timeout,
        slow_start=config.slow_start)


def health_settings(config: Any) -> HealthSettings:
    return HealthSettings(config.health_interval, config.health_path, config.health_timeout,
                          config.health_status, config.rise, config.fall)


def run(config: Any) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code."""
    cluster = build_cluster(config)
    if config.max_fails == 0:
        cluster.max_fails = 10 ** 9
    try:
        server = LoadBalancerServer((config.host, config.port), config, cluster,
                                    AccessLog("off"))
    except OSError as error:
        reason = error.strerror or str(error)
        print(f"cclb: cannot listen on {config.host}:{config.port}: {reason}", file=sys.stderr)
        return 1
    try:
        server.access_log = AccessLog(config.access_log, config.log_format)
    except OSError as error:
        server.server_close()
        print(f"cclb: cannot open access log {config.access_log}: {error.strerror}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    checker = HealthChecker(cluster, health_settings(config))
    if config.health_interval > 0:
        checker.start()
    serving = threading.Thread(target=server.serve_forever, name="acceptor", daemon=True)
    serving.start()
    host, port = server.server_address[:2]
    count = len(config.backends)
    print(f"cclb listening on http://{host}:{port} -> {count} backend{'s' * (count != 1)}",
          flush=True)
    log.info("cclb started (pid %d, %s, backends: %s)", os.getpid(), config.algorithm,
             ", ".join(spec.url for spec in config.backends))
    while not stop.wait(0.5):
        pass
    log.info("cclb stopping: finishing in-flight requests")
    server.shutdown()
    checker.stop()
    if not server.drain(DRAIN_SECONDS):
        log.warning("gave up waiting for in-flight requests after %.0fs", DRAIN_SECONDS)
    server.server_close()
    cluster.close()
    server.access_log.close()
    log.info("cclb stopped")
    return 0


# --- --demo: the three server.py backends as child processes ------------------

def start_demo_backends() -> list[subprocess.Popen[bytes]]:
    """Start server.py on the demo ports and wait until each accepts.

    Raises RuntimeError (after stopping any started child) if one fails.
    """
    children: list[subprocess.Popen[bytes]] = []
    try:
        for port in DEMO_PORTS:
            children.append(subprocess.Popen(
                [sys.executable, str(HERE / "server.py"), str(port)],
                stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        for port, child in zip(DEMO_PORTS, children):
            while not accepts("127.0.0.1", port):
                if child.poll() is not None:
                    raise RuntimeError(f"demo backend on port {port} exited "
                                       f"(code {child.returncode}); is the port in use?")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"demo backend on port {port} did not start in time")
                time.sleep(0.05)
    except BaseException:
        stop_children(children)
        raise
    return children


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every child, wait a little, SIGKILL the stubborn ones."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(argv: list[str] | None = None) -> int:
    config = settings.load(argv)
    setup_app_logger(config.log_level)
    children: list[subprocess.Popen[bytes]] = []
    # Until the balancer installs its own handlers, SIGTERM must still lead
    # through the finally below, so the demo children are never orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if config.demo:
            try:
                children = start_demo_backends()
            except RuntimeError as error:
                print(f"cclb: {error}", file=sys.stderr)
                return 1
            log.info("demo backends started on ports %s", ", ".join(map(str, DEMO_PORTS)))
        return run(config)
    except KeyboardInterrupt:
        return 0
    finally:
        stop_children(children)


if __name__ == "__main__":
    sys.exit(main())

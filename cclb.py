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
from admin import AdminServer
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


# Settings that belong to the listening sockets: a reload cannot change them.
RESTART_ONLY = ("host", "port", "workers", "admin_port", "admin_host")


class LoadBalancer:
    """The running balancer: listener, cluster, health checker, admin API."""

    def __init__(self, config: Any, server: LoadBalancerServer) -> None:
        self.config = config
        self.server = server
        self.cluster = server.cluster
        self.checker = HealthChecker(self.cluster, health_settings(config))
        self.admin: AdminServer | None = None
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        if self.config.health_interval > 0:
            self.checker.start()
        self._spawn(self.server.serve_forever, "acceptor")
        if self.config.admin_port is not None:
            self.admin = AdminServer((self.config.admin_host, self.config.admin_port),
                                     self.cluster, lambda: self.config)
            self._spawn(self.admin.serve_forever, "admin")

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply it, or keep the old one if invalid."""
        try:
            new = settings.resolve(self.config.cli)
        except (settings.SettingsError, ValueError) as error:
            log.error("reload failed, keeping the current configuration: %s", error)
            return
        for name in RESTART_ONLY:
            if new.values[name] != self.config.values[name]:
                log.warning("reload: %s changed but needs a restart; keeping %r",
                            name, self.config.values[name])
                new.values[name] = self.config.values[name]
        added, removed = self.cluster.reconcile(new.backends)
        self.cluster.configure(
            make_policy(new.algorithm) if new.algorithm != self.config.algorithm else None,
            connect_timeout=new.connect_timeout, read_timeout=new.read_timeout,
            max_fails=new.max_fails, fail_timeout=new.fail_timeout, slow_start=new.slow_start)
        self.checker.settings = health_settings(new)
        if new.health_interval > 0 and not self.checker.is_alive():
            self.checker = HealthChecker(self.cluster, self.checker.settings)
            self.checker.start()
        if (new.access_log, new.log_format) != (self.config.access_log, self.config.log_format):
            old_log, self.server.access_log = self.server.access_log, AccessLog(
                new.access_log, new.log_format)
            old_log.close()
        logging.getLogger("cclb").setLevel(new.log_level)
        self.server.configure(new)
        self.config = new
        log.warning("configuration reloaded from %s (backends added: %s; removed: %s)",
                    new.source or "the command line", ", ".join(added) or "none",
                    ", ".join(removed) or "none")

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, release everything."""
        log.info("cclb stopping: finishing in-flight requests")
        self.server.shutdown()
        if self.admin is not None:
            self.admin.shutdown()
            self.admin.server_close()
        self.checker.stop()
        if not self.server.drain(DRAIN_SECONDS):
            log.warning("gave up waiting for in-flight requests after %.0fs", DRAIN_SECONDS)
        self.server.server_close()
        self.cluster.close()
        self.server.access_log.close()
        log.info("cclb stopped")


def run(config: Any) -> int:
    """Serve until SIGINT/SIGTERM (SIGHUP reloads); returns the exit code."""
    try:
        server = LoadBalancerServer((config.host, config.port), config, build_cluster(config),
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
    balancer = LoadBalancer(config, server)
    try:
        balancer.start()
    except OSError as error:
        server.server_close()
        print(f"cclb: cannot listen on admin port {config.admin_host}:{config.admin_port}: "
              f"{error.strerror or error}", file=sys.stderr)
        return 1
    stop = threading.Event()
    reload_requested = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    host, port = server.server_address[:2]
    count = len(config.backends)
    print(f"cclb listening on http://{host}:{port} -> {count} backend{'s' * (count != 1)}",
          flush=True)
    if balancer.admin is not None:
        admin_host, admin_port = balancer.admin.server_address[:2]
        print(f"cclb admin on http://{admin_host}:{admin_port}/", flush=True)
    log.info("cclb started (pid %d, %s, backends: %s)", os.getpid(), config.algorithm,
             ", ".join(spec.url for spec in config.backends))
    while not stop.wait(0.2):
        if reload_requested.is_set():
            reload_requested.clear()
            balancer.reload()
    balancer.stop()
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

#!/usr/bin/env python3
"""cclb: an HTTP/1.1 load balancer in pure-stdlib Python.

Usage: ``python3 cclb.py [options]`` (``--help`` lists them all).

This module wires the pieces together and owns the process: settings,
logging, the listening server, the health checker, the admin API, signals
(SIGTERM/SIGINT stop, SIGHUP reloads), the ``--workers`` supervisor loop and
the ``--demo`` backends.  The request path is in ``proxy.py``.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":
    # Before the slower imports: a SIGHUP (reload) arriving while cclb starts
    # must not kill it (the default action); handlers are installed later.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import settings
import workers
from admin import AdminServer
from balancing import make_policy
from cluster import ServerCluster
from health_checkers import HealthChecker, HealthSettings
from loggers import AccessLog, setup_app_logger
from proxy import LoadBalancerServer

HERE = Path(__file__).resolve().parent
DEMO_PORTS = (7000, 7001, 7002)
# Where --demo starts its backends: "7100,7101,7102" moves them (tests use it
# to get ports that are free; pair it with matching --backend options).
DEMO_PORTS_ENV = "CCLB_DEMO_PORTS"
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


def apply_to_cluster(cluster: ServerCluster, old: Any, new: Any) -> tuple[list[str], list[str]]:
    """Apply reloaded settings to the backends; returns (added, removed) URLs."""
    added, removed = cluster.reconcile(new.backends)
    cluster.configure(
        make_policy(new.algorithm) if new.algorithm != old.algorithm else None,
        connect_timeout=new.connect_timeout, read_timeout=new.read_timeout,
        max_fails=new.max_fails, fail_timeout=new.fail_timeout, slow_start=new.slow_start)
    return added, removed


def updated_checker(checker: HealthChecker, cluster: ServerCluster, new: Any) -> HealthChecker:
    """The health checker for reloaded settings: adjusted, stopped (interval 0) or new."""
    checker.settings = health_settings(new)
    if new.health_interval <= 0:
        checker.stop()
        return checker
    if workers.is_worker() or (checker.is_alive() and not checker.stopped.is_set()):
        return checker
    fresh = HealthChecker(cluster, checker.settings, checker.on_round)
    fresh.start()
    return fresh


def reload_settings(old: Any, cluster: ServerCluster, checker: HealthChecker
                    ) -> tuple[Any, HealthChecker, list[str], list[str]] | None:
    """SIGHUP: re-read the settings and apply them to the cluster, checker and log level.

    Returns (settings, checker, added, removed), or None (logged) if the new
    settings are invalid, in which case nothing changes.
    """
    try:
        new = settings.resolve(old.cli)
        for name in RESTART_ONLY:
            if new.values[name] != old.values[name]:
                log.warning("reload: %s changed but needs a restart; keeping %r",
                            name, old.values[name])
                new.values[name] = old.values[name]
        settings.validate(new.values)  # again: e.g. a kept admin_host needs its token
    except (settings.SettingsError, ValueError) as error:
        log.error("reload failed, keeping the current configuration: %s", error)
        return None
    added, removed = apply_to_cluster(cluster, old, new)
    checker = updated_checker(checker, cluster, new)
    logging.getLogger("cclb").setLevel(new.log_level)
    return new, checker, added, removed


class LoadBalancer:
    """The running balancer: listener, cluster, health checker, admin API."""

    def __init__(self, config: Any, server: LoadBalancerServer) -> None:
        self.config = config
        self.server = server
        self.cluster = server.cluster
        self.checker = HealthChecker(self.cluster, health_settings(config))
        self.admin: AdminServer | None = None

    def start(self) -> None:
        if self.config.health_interval > 0 and not workers.is_worker():
            self.checker.start()
        self._spawn(self.server.serve_forever, "acceptor")
        if self.config.admin_port is not None and not workers.is_worker():
            self.admin = AdminServer((self.config.admin_host, self.config.admin_port),
                                     self.cluster, lambda: self.config)
            self._spawn(self.admin.serve_forever, "admin")

    def _spawn(self, target: Any, name: str) -> None:
        threading.Thread(target=target, name=name, daemon=True).start()

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply it, or keep the old one if invalid."""
        result = reload_settings(self.config, self.cluster, self.checker)
        if result is None:
            return
        new, self.checker, added, removed = result
        if new.access_log not in ("-", "off") or (new.access_log, new.log_format) != (
                self.config.access_log, self.config.log_format):
            # A log file is always reopened, so SIGHUP also serves log rotation.
            try:
                fresh = AccessLog(new.access_log, new.log_format)
            except OSError as error:
                log.error("cannot open access log %s, keeping the old one: %s",
                          new.access_log, error.strerror)
            else:
                old_log, self.server.access_log = self.server.access_log, fresh
                old_log.close()
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


class Signals:
    """What SIGINT/SIGTERM (stop) and SIGHUP (reload) asked for.

    The handlers only set plain attributes: a handler runs in the main thread
    between two bytecodes, so one that took a lock (``Event.set``) could wait
    forever for a lock the interrupted main thread itself holds.
    """

    def __init__(self) -> None:
        self.stop = False
        self.reload = False
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    def request_stop(self, *_: Any) -> None:
        self.stop = True

    def request_reload(self, *_: Any) -> None:
        self.reload = True

    def wait(self) -> bool:
        """Sleep a little; True while no stop was asked for."""
        time.sleep(0.1)
        return not self.stop

    def take_reload(self) -> bool:
        requested, self.reload = self.reload, False
        return requested


def ready_line(host: str, port: int, backends: int, extra: str = "") -> str:
    return f"cclb listening on http://{host}:{port} -> {backends} backend{'s' * (backends != 1)}{extra}"


def run(config: Any) -> int:
    """Serve until SIGINT/SIGTERM (SIGHUP reloads); returns the exit code."""
    port, reuse_port, inherited_fd = config.port, False, None
    if workers.is_worker():
        port = int(os.environ[workers.PORT_ENV])
        inherited_fd = int(os.environ[workers.FD_ENV]) if workers.FD_ENV in os.environ else None
        reuse_port = inherited_fd is None
    try:
        server = LoadBalancerServer((config.host, port), config, build_cluster(config),
                                    AccessLog("off"), reuse_port, inherited_fd)
    except OSError as error:
        reason = error.strerror or str(error)
        print(f"cclb: cannot listen on {config.host}:{port}: {reason}", file=sys.stderr)
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
    signals = Signals()
    if workers.is_worker():
        threading.Thread(target=workers.follow_supervisor, name="supervisor-link", daemon=True,
                         args=(server.cluster, sys.stdin.fileno(), signals.request_stop)).start()
        sys.stdout.buffer.write(workers.READY_LINE)
        sys.stdout.flush()
        threading.Thread(target=workers.report_counters, args=(server.cluster,),
                         name="counter-report", daemon=True).start()
    else:
        host, port = server.server_address[:2]
        print(ready_line(host, port, len(config.backends)), flush=True)
        if balancer.admin is not None:
            admin_host, admin_port = balancer.admin.server_address[:2]
            print(f"cclb admin on http://{admin_host}:{admin_port}/", flush=True)
    log.info("cclb %s (pid %d, %s, backends: %s)",
             "worker started" if workers.is_worker() else "started", os.getpid(),
             config.algorithm, ", ".join(spec.url for spec in config.backends))
    while signals.wait():
        if signals.take_reload():
            balancer.reload()
    balancer.stop()
    return 0


def run_supervisor(config: Any, argv: list[str]) -> int:
    """--workers N: start N workers, check health once for all, supervise."""
    cluster = build_cluster(config)
    supervisor = workers.Supervisor(config, argv, cluster)
    try:
        port = supervisor.bind()
    except OSError as error:
        print(f"cclb: cannot listen on {config.host}:{config.port}: {error.strerror or error}",
              file=sys.stderr)
        return 1
    signals = Signals()
    if not supervisor.start():
        print("cclb: a worker failed to start (see the messages above)", file=sys.stderr)
        return 1
    checker = HealthChecker(cluster, health_settings(config), supervisor.publish_state)
    if config.health_interval > 0:
        checker.start()
    admin = None
    if config.admin_port is not None:
        try:
            admin = AdminServer((config.admin_host, config.admin_port), cluster, lambda: config,
                                on_change=supervisor.publish_state)
        except OSError as error:
            supervisor.stop(DRAIN_SECONDS)
            print(f"cclb: cannot listen on admin port {config.admin_port}: {error.strerror}",
                  file=sys.stderr)
            return 1
        threading.Thread(target=admin.serve_forever, name="admin", daemon=True).start()
    print(ready_line(config.host, port, len(config.backends), f" ({config.workers} workers)"),
          flush=True)
    if admin is not None:
        admin_host, admin_port = admin.server_address[:2]
        print(f"cclb admin on http://{admin_host}:{admin_port}/", flush=True)
    log.info("cclb supervisor started (pid %d, %d workers)", os.getpid(), config.workers)
    while signals.wait():
        if signals.take_reload():
            result = reload_settings(config, cluster, checker)
            if result is not None:
                config, checker, _, _ = result
                supervisor.publish_state()
                supervisor.forward(signal.SIGHUP)
                log.warning("configuration reloaded; workers told to reload")
        supervisor.watch()
        supervisor.merge_counters()
    log.info("cclb stopping: workers finish their in-flight requests")
    checker.stop()
    if admin is not None:
        admin.shutdown()
        admin.server_close()
    supervisor.stop(DRAIN_SECONDS + 2)
    cluster.close()
    log.info("cclb stopped")
    return 0


# --- --demo: the three server.py backends as child processes ------------------

def demo_ports() -> tuple[int, ...]:
    """The --demo backend ports: 7000-7002, or the list in $CCLB_DEMO_PORTS."""
    text = os.environ.get(DEMO_PORTS_ENV, "")
    if not text:
        return DEMO_PORTS
    try:
        ports = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise RuntimeError(f"{DEMO_PORTS_ENV} must be a comma-separated list of ports, "
                           f"got {text!r}") from None
    if not ports or not all(1 <= port <= 65535 for port in ports):
        raise RuntimeError(f"{DEMO_PORTS_ENV} must list ports in 1-65535, got {text!r}")
    return ports


def start_demo_backends(ports: tuple[int, ...]) -> list[subprocess.Popen[bytes]]:
    """Start server.py on ``ports`` and wait until each accepts.

    Raises RuntimeError (after stopping any started child) if one fails.
    """
    children: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            children.append(subprocess.Popen(
                [sys.executable, str(HERE / "server.py"), str(port)],
                stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        for port, child in zip(ports, children):
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
    argv = sys.argv[1:] if argv is None else argv
    # Until the handlers are in place a SIGHUP must not kill us (its default).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = settings.load(argv)
    setup_app_logger(config.log_level)
    if workers.is_worker():
        return run(config)
    children: list[subprocess.Popen[bytes]] = []
    # Until the balancer installs its own handlers, SIGTERM must still lead
    # through the finally below, so the demo children are never orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if config.demo:
            try:
                ports = demo_ports()
                children = start_demo_backends(ports)
            except RuntimeError as error:
                print(f"cclb: {error}", file=sys.stderr)
                return 1
            log.info("demo backends started on ports %s", ", ".join(map(str, ports)))
        if config.workers > 1:
            return run_supervisor(config, [arg for arg in argv if arg != "--demo"])
        return run(config)
    except KeyboardInterrupt:
        return 0
    finally:
        stop_children(children)


if __name__ == "__main__":
    sys.exit(main())

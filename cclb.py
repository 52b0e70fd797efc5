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
    # Before the slower imports: a SIGHUP (reload) or SIGUSR1 (reopen logs)
    # arriving while cclb starts must not kill it (the default action);
    # handlers are installed later.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import settings
import systemd
from access import AddressList, RateLimiter
import workers
from admin import AdminServer
from cluster import Routing, ServerCluster, sticky_key
from health_checkers import HealthChecker, HealthSettings
from loggers import AccessLog, setup_app_logger
from loops import LoopGuard
from engine import raise_fd_limit
from metrics import PROCESS, RouteCounters
from proxy import LoadBalancerServer
from redirect_http import RedirectServer
from settings import Config, PoolSettings
from tls import CertificateStore, TLSConfigError, load_certificates, parse_min_version

HERE = Path(__file__).resolve().parent
DEMO_PORTS = (7000, 7001, 7002)
# Where --demo starts its backends: "7100,7101,7102" moves them (tests use it
# to get ports that are free; pair it with matching --backend options).
DEMO_PORTS_ENV = "CCLB_DEMO_PORTS"

# Settings that belong to the listening sockets: a reload cannot change them.
RESTART_ONLY = ("host", "port", "workers", "admin_port", "admin_host", "redirect_http", "sticky_secret")

log = logging.getLogger("cclb")


class Role(Enum):
    """What this process is: the whole balancer, one of N workers, or their supervisor."""

    SINGLE = "single"
    WORKER = "worker"
    SUPERVISOR = "supervisor"


class StartError(Exception):
    """cclb cannot start; the message is printed as is, ``code`` is the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def listen_error(what: str, host: str, port: int | None, error: OSError) -> StartError:
    return StartError(f"cannot listen on {what}{host}:{port}: {error.strerror or error}")


def reload_config(old: Config) -> Config | None:
    """SIGHUP: the settings re-read from the same sources, or None (logged) if invalid.

    Settings that belong to the listening sockets keep their old value (a
    warning says so); every setting that does change is logged.
    """
    try:
        new = settings.resolve(old.cli)
        kept = {}
        for name in RESTART_ONLY:
            if getattr(new, name) != getattr(old, name):
                log.warning("reload: %s changed but needs a restart; keeping %r",
                            name, getattr(old, name))
                kept[name] = getattr(old, name)
        if bool(new.tls_certs) != bool(old.tls_certs):  # the listener's protocol itself
            log.warning("reload: switching TLS on or off needs a restart; keeping it %s",
                        "on" if old.tls_certs else "off")
            kept["tls_certs"] = old.tls_certs
        new = replace(new, **kept)
        settings.validate(new.values)  # again: e.g. a kept admin_host needs its token
    except (settings.SettingsError, ValueError) as error:
        log.error("reload failed, keeping the current configuration: %s", error)
        return None
    for name, value in new.values.items():
        if name not in ("backends", "admin_token") and value != getattr(old, name):
            log.warning("reload: %s changed from %r to %r", name, getattr(old, name), value)
    return new


class Process:
    """The parts every role shares: the settings, the backend pool, health, admin API.

    ``start``, ``reload``, ``tick`` (a round of the main loop) and ``stop``
    are called by the main thread only; ``serve`` runs the one sequence.
    """

    role: Role

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ids = itertools.count(1)  # backend ids, unique across pools, never reused
        self.sticky_key = sticky_key(config.sticky_secret)
        # The pool "default" (empty and unrouted when the config has none): the one
        # the admin API, workers and client-side metrics knew before pools.
        self.cluster = ServerCluster.from_settings(front_settings(config), self.ids, self.sticky_key)
        self.transitions_level = logging.WARNING
        self.routing = self.build_routing(config)
        # One health checker per pool; started by start_checks_and_admin (never in a worker).
        self.checkers: dict[str, HealthChecker] = {}
        self.checks_started = False
        self.sync_checkers(config)
        self.admin: AdminServer | None = None
        self.redirect: RedirectServer | None = None

    def build_routing(self, config: Config, old: Routing | None = None,
                      old_config: Config | None = None) -> Routing:
        """The pools and route table of ``config``; a reload keeps the pools that stay
        (their backends, state and counters) and adopts their new settings."""
        pools: dict[str, ServerCluster] = {}
        for name, pool in config.pools.items():
            if name == "default":
                cluster = self.cluster
            elif old is not None and name in old.pools:
                cluster = old.pools[name]
                assert old_config is not None
                cluster.apply_settings(old_config.pools[name], pool)
            else:
                cluster = ServerCluster.from_settings(pool, self.ids, self.sticky_key)
                cluster.transitions_level = self.transitions_level
            pools[name] = cluster
        trusted = limiter = None
        if config.trusted_proxies:
            trusted = AddressList(config.trusted_proxies, "trusted_proxies")
        if any(route.rate is not None for route in config.routes.routes):
            limiter = old.limiter if old is not None and old.limiter is not None else None
            if limiter is None:
                limiter = RateLimiter()
        counters = old.counters if old is not None else RouteCounters()
        return Routing(config.routes, pools, self.cluster, counters, limiter, trusted)

    def sync_checkers(self, config: Config) -> None:
        """One health checker per pool, with the pool's settings; started, stopped or
        restarted to match (only once checks have started: never in a worker)."""
        pools = config.pools
        for name, cluster in self.routing.pools.items():
            health = HealthSettings.of(pools[name])
            checker = self.checkers.get(name)
            if checker is None or checker.cluster is not cluster:
                checker = self.checkers[name] = HealthChecker(cluster, health, self.on_health_round)
            checker.settings = health
            if not self.checks_started:
                continue
            if health.interval <= 0:
                checker.stop()
            elif not checker.is_alive() or checker.stopped.is_set():
                if checker.ident is not None:  # a thread starts once: a new one
                    checker = self.checkers[name] = HealthChecker(cluster, health,
                                                                  self.on_health_round)
                checker.start()
        for name in [name for name in self.checkers if name not in self.routing.pools]:
            self.checkers.pop(name).stop()

    def on_health_round(self) -> None:
        """Called by the health checker after each round."""

    def on_admin_change(self) -> None:
        """Called by the admin API after a write."""

    def start_checks_and_admin(self) -> None:
        self.checks_started = True
        self.sync_checkers(self.config)
        if self.config.admin_port is not None:
            try:
                self.admin = AdminServer((self.config.admin_host, self.config.admin_port),
                                         self.cluster, lambda: self.config,
                                         on_change=self.on_admin_change)
                # The dashboard's client-side row: this listener's (or, adopted, all workers').
                self.admin.frontend = lambda: self.cluster.frontend.snapshot().dashboard()
                self.admin.routing = lambda: self.routing  # read at each request: reloads swap it
            except OSError as error:
                raise listen_error("admin port ", self.config.admin_host,
                                   self.config.admin_port, error) from None
            spawn(self.admin.serve_forever, "admin")
        if self.config.redirect_http is not None:
            try:
                self.redirect = RedirectServer((self.config.host, self.config.redirect_http),
                                               self.port())
            except OSError as error:
                raise listen_error("the redirect port ", self.config.host,
                                   self.config.redirect_http, error) from None
            spawn(self.redirect.serve_forever, "redirect-http")

    def announce(self) -> None:
        if self.admin is not None:
            print(f"cclb admin on http://{self.admin.server_name}:{self.admin.server_port}/",
                  flush=True)
        if self.config.demo:
            host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host
            print(f"cclb demo ready: try  curl -s http://{host}:{self.port()}/  (the challenge: "
                  "curl --compressed --parallel --parallel-immediate --parallel-max 3 "
                  "--config urls.txt)", flush=True)

    def port(self) -> int:
        """The port clients connect to."""
        return self.config.port

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; apply it, or keep the old one if invalid."""
        if self.role is not Role.WORKER:
            systemd.reloading()
        try:
            new = self.reload_config()
            PROCESS.record_reload(new is not None)
            if new is not None:
                self.apply_config(new)
        finally:
            if self.role is not Role.WORKER:
                systemd.ready("reloaded")

    def apply_config(self, new: Config) -> None:
        """Apply a valid new configuration: pools first, then one swap of the whole table.

        Pools that stay keep their backends' state; the new route table and
        pool set replace the old in one attribute store (``install``), so a
        request is routed entirely under the old or entirely under the new.
        """
        old, old_routing = self.config, self.routing
        added, removed = self.cluster.apply_settings(front_settings(old), front_settings(new))
        before = {name: {b.url for b in c.snapshot()} for name, c in old_routing.pools.items()}
        routing = self.build_routing(new, old_routing, old)
        self.routing = routing
        self.install(routing)
        for name, cluster in routing.pools.items():
            if name != "default":
                urls = {b.url for b in cluster.snapshot()}
                added += [f"{url} (pool {name})" for url in sorted(urls - before.get(name, set()))]
                removed += [f"{url} (pool {name})" for url in sorted(before.get(name, set()) - urls)]
        for name, cluster in old_routing.pools.items():
            if name not in routing.pools and cluster is not self.cluster:
                removed += [f"{url} (pool {name})" for url in sorted(before[name])]
                cluster.close()  # requests in flight on it finish normally
        self.sync_checkers(new)
        logging.getLogger("cclb").setLevel(new.log_level)
        self.apply(new)
        self.config = new
        log.warning("configuration reloaded from %s (pools: %s; routes: %d; backends added: %s; "
                    "removed: %s)", new.source or "the command line", ", ".join(routing.pools) or "none",
                    len(routing.table.routes), ", ".join(added) or "none", ", ".join(removed) or "none")

    def install(self, routing: Routing) -> None:
        """Make ``routing`` the table requests use (the listening roles)."""

    def reload_config(self) -> Config | None:
        return reload_config(self.config)

    def apply(self, new: Config) -> None:
        """Role-specific part of a reload (the new settings are valid)."""

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen log files only (logrotate), without reloading the configuration."""

    def tick(self) -> None:
        """One round of the main loop (every 0.1 s)."""

    def all_clusters(self) -> list[ServerCluster]:
        """The front pool first, then every other pool (for workers' snapshots and counters)."""
        return [self.cluster, *(c for c in self.routing.pools.values() if c is not self.cluster)]

    def close_pools(self) -> None:
        for cluster in {id(c): c for c in [self.cluster, *self.routing.pools.values()]}.values():
            cluster.close()

    def stop_checks_and_admin(self) -> None:
        for checker in self.checkers.values():
            checker.stop()
        for server in (self.admin, self.redirect):
            if server is not None:
                server.shutdown()
                server.server_close()


class Balancer(Process):
    """A listening balancer: the whole of cclb (single) or one of N workers."""

    def __init__(self, config: Config, role: Role,
                 on_supervisor_gone: Callable[[], None] = lambda: None) -> None:
        super().__init__(config)
        self.role = role
        self.on_supervisor_gone = on_supervisor_gone  # a worker stops without its supervisor
        self.server: LoadBalancerServer | None = None
        self.shared_listener = False  # --workers without SO_REUSEPORT: one socket for all
        self.tls: CertificateStore | None = None  # the certificates, when the listener speaks TLS
        if role is Role.WORKER:
            self.transitions_level = logging.DEBUG  # the supervisor logs them once
            for cluster in self.routing.pools.values():
                cluster.transitions_level = logging.DEBUG
            self.cluster.transitions_level = logging.DEBUG
        self.stopped = threading.Event()  # ends the worker's counter reports

    def start(self) -> None:
        config = self.config
        port, reuse_port, inherited_fd = config.port, False, None
        if self.role is Role.WORKER:
            port = int(os.environ[workers.PORT_ENV])
            inherited_fd = int(os.environ[workers.FD_ENV]) if workers.FD_ENV in os.environ else None
            reuse_port = inherited_fd is None
            self.shared_listener = inherited_fd is not None
        if config.tls_certs:
            try:
                self.tls = CertificateStore(config.tls_certs, parse_min_version(config.tls_min_version))
            except TLSConfigError as error:
                raise StartError(str(error), code=2) from None
        self.raise_fd_limit()
        access_log = AccessLog("off")
        try:
            self.server = LoadBalancerServer(replace(config.listener, port=port), config, self.cluster,
                                             access_log, reuse_port, inherited_fd, self.tls)
        except OSError as error:
            access_log.close()
            raise listen_error("", config.host, port, error) from None
        self.install(self.routing)
        try:  # after the bind: a port in use is the first thing to report
            access_log.reopen(config.access_log, config.log_format)
        except OSError as error:
            self.server.server_close()
            access_log.close()
            raise StartError(f"cannot open access log {config.access_log}: {error.strerror}",
                             code=2) from None
        if self.role is Role.SINGLE:  # a worker follows its supervisor's checks and admin API
            try:
                self.start_checks_and_admin()
            except StartError:
                self.server.server_close()
                access_log.close()
                raise
        spawn(self.server.serve_forever, "acceptor")

    def raise_fd_limit(self) -> None:
        """Raise the soft open-file limit to fit --max-connections, and log the limits in force.

        Each client connection needs a descriptor, and each busy one a second
        for its backend; plus some for logs, pipes and listeners.
        """
        config = self.config
        wanted = 2 * config.max_connections + 256
        before, soft, hard = raise_fd_limit(wanted)
        level = logging.DEBUG if self.role is Role.WORKER else logging.INFO
        shown_hard = "unlimited" if hard < 0 else str(hard)
        log.log(level, "limits: --max-connections %d, --threads %d; open files %d%s (hard limit %s)",
                config.max_connections, config.threads, soft,
                f" (raised from {before})" if soft != before else "", shown_hard)
        if soft < config.max_connections + 64:
            log.warning("the open-file limit (%d, hard %s) is below --max-connections %d: accepting "
                        "fails beyond about %d connections; raise the hard limit (ulimit -Hn, "
                        "systemd LimitNOFILE=) or lower --max-connections", soft, shown_hard,
                        config.max_connections, max(0, soft - 64))

    def announce(self) -> None:
        assert self.server is not None
        if self.role is Role.WORKER:
            spawn(workers.follow_supervisor, "supervisor-link",
                  self.all_clusters, sys.stdin.fileno(), self.on_supervisor_gone)
            spawn(workers.report_counters, "counter-report", self.all_clusters, self.stopped,
                  self.routing.counters)
            sys.stdout.buffer.write(workers.READY_LINE)
            sys.stdout.flush()
        else:
            print(ready_line(self.server.server_name, self.server.server_port,
                             backend_count(self.config), scheme=self.config.listener.scheme),
                  flush=True)
            super().announce()
        log.info("cclb %s (pid %d, %s, backends: %s)",
                 "worker started" if self.role is Role.WORKER else "started", os.getpid(),
                 self.config.algorithm, describe_pools(self.config))

    def install(self, routing: Routing) -> None:
        if self.server is not None:
            self.server.routing = None if routing.plain else routing

    def apply(self, new: Config) -> None:
        assert self.server is not None
        old = self.config
        if self.tls is not None:
            error = self.tls.reload(new.tls_certs, parse_min_version(new.tls_min_version))
            if error is not None:
                log.error("reload: keeping the current TLS certificates: %s", error)
        if new.access_log not in ("-", "off") or (new.access_log, new.log_format) != (
                old.access_log, old.log_format):
            # A log file is always reopened, so SIGHUP also serves log rotation.
            try:
                self.server.access_log.reopen(new.access_log, new.log_format)
            except OSError as error:
                log.error("cannot open access log %s, keeping the old one: %s",
                          new.access_log, error.strerror)
        self.server.configure(new)

    def stop(self) -> None:
        """Stop accepting at once, let in-flight requests finish, release everything."""
        assert self.server is not None
        log.info("cclb stopping: finishing in-flight requests")
        self.stopped.set()
        self.server.draining = True  # from now on every response says Connection: close
        self.stop_accepting()
        self.server.shutdown()
        self.server.server_close()
        self.stop_checks_and_admin()
        drain = self.config.drain_timeout
        if not self.server.drain(drain):
            log.warning("gave up waiting for in-flight requests after %gs", drain)
        self.close_pools()
        self.server.access_log.close()

    def port(self) -> int:
        assert self.server is not None
        return self.server.server_port

    def reopen_logs(self) -> None:
        assert self.server is not None
        try:
            self.server.access_log.reopen(self.config.access_log, self.config.log_format)
        except OSError as error:
            log.error("cannot reopen access log %s, keeping the old one: %s",
                      self.config.access_log, error.strerror)
            return
        log.info("log files reopened")

    def stop_accepting(self) -> None:
        """Refuse new connections now, those waiting in the backlog included.

        ``shutdown`` on a listening socket takes it out of the LISTEN state
        (the kernel resets queued connections), so clients are turned away
        at once instead of waiting in the backlog for a process that is
        about to exit.  A listener shared by all workers is left to the
        supervisor, which stops them all.
        """
        if self.server is not None and not self.shared_listener:
            try:
                self.server.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def abort(self) -> None:
        """A second stop signal: stop at once (in-flight requests are cut off)."""
        self.stop_accepting()
        if self.server is not None:
            self.server.access_log.close()


class SupervisorProcess(Process):
    """--workers N: N worker processes, health checked and admin API served once, here."""

    role = Role.SUPERVISOR

    def __init__(self, config: Config, argv: list[str]) -> None:
        super().__init__(config)
        self.supervisor = workers.Supervisor(config, argv, self.cluster)
        self.supervisor.pools = self.all_clusters
        self.supervisor.route_counters = self.routing.counters

    def on_health_round(self) -> None:
        self.supervisor.publish_state()

    def on_admin_change(self) -> None:
        self.supervisor.publish_state()

    def start(self) -> None:
        try:
            self.supervisor.bind()
        except OSError as error:
            raise listen_error("", self.config.host, self.config.port, error) from None
        if not self.supervisor.start():
            raise StartError("a worker failed to start (see the messages above)")
        try:
            self.start_checks_and_admin()
        except StartError:
            self.supervisor.stop(1.0)
            raise

    def announce(self) -> None:
        print(ready_line(self.config.host, self.supervisor.port, backend_count(self.config),
                         f" ({self.config.workers} workers)", self.config.listener.scheme),
              flush=True)
        super().announce()
        log.info("cclb supervisor started (pid %d, %d workers)", os.getpid(), self.config.workers)

    def apply(self, new: Config) -> None:
        self.supervisor.publish_state()
        self.supervisor.forward(signal.SIGHUP)
        log.warning("workers told to reload")

    def port(self) -> int:
        return self.supervisor.port

    def reopen_logs(self) -> None:
        self.supervisor.forward(signal.SIGUSR1)  # each worker has its own access log

    def tick(self) -> None:
        self.supervisor.watch()
        self.supervisor.merge_counters()

    def stop(self) -> None:
        log.info("cclb stopping: workers finish their in-flight requests")
        self.supervisor.stop_accepting()
        self.stop_checks_and_admin()
        self.supervisor.stop(self.config.drain_timeout + 2)
        self.close_pools()

    def abort(self) -> None:
        """A second stop signal: the workers get theirs too, and stop at once."""
        self.supervisor.stop_accepting()
        self.supervisor.forward(signal.SIGTERM)
        self.supervisor.stop(2.0)


def describe_pools(config: Config) -> str:
    """The backends for the start-up log line (with their pool when there are named pools)."""
    pools = config.pools
    if list(pools) == ["default"]:
        return ", ".join(spec.url for spec in pools["default"].backends)
    return "; ".join(f"pool {name}: {', '.join(spec.url for spec in pool.backends)}"
                     for name, pool in pools.items())


def backend_count(config: Config) -> int:
    return sum(len(pool.backends) for pool in config.pools.values())


def front_settings(config: Config) -> PoolSettings:
    """The pool default's settings; an empty pool when the configuration has none."""
    return config.pools.get("default") or config.pool("default", {"backends": []})


def spawn(target: Callable[..., Any], name: str, *args: Any) -> None:
    threading.Thread(target=target, args=args, name=name, daemon=True).start()


class StopNow(BaseException):
    """A second SIGTERM/SIGINT: stop at once, without waiting for in-flight requests."""


class Signals:
    """What SIGINT/SIGTERM (stop) and SIGHUP (reload) asked for.

    The handlers only set plain attributes: a handler runs in the main thread
    between two bytecodes, so one that took a lock (``Event.set``) could wait
    forever for a lock the interrupted main thread itself holds.  The one
    exception is a second stop signal, which raises ``StopNow`` in the main
    thread wherever it is (the graceful stop is under way; locks held there
    are released by their ``with`` blocks as the exception passes).
    """

    def __init__(self) -> None:
        self.stop = False
        self.reload = False
        self.reopen = False
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        signal.signal(signal.SIGUSR1, self.request_reopen)

    def request_stop(self, *_: Any) -> None:
        """SIGTERM/SIGINT: the first asks for a graceful stop, a second for an immediate one."""
        if self.stop:
            raise StopNow()
        self.stop = True

    def ask_stop(self) -> None:
        """Ask for a graceful stop from any thread (never raises)."""
        self.stop = True

    def request_reload(self, *_: Any) -> None:
        self.reload = True

    def request_reopen(self, *_: Any) -> None:
        self.reopen = True

    def wait(self) -> bool:
        """Sleep a little; True while no stop was asked for."""
        time.sleep(0.1)
        return not self.stop

    def take_reload(self) -> bool:
        requested, self.reload = self.reload, False
        return requested

    def take_reopen(self) -> bool:
        requested, self.reopen = self.reopen, False
        return requested


def ready_line(host: str, port: int, backends: int, extra: str = "", scheme: str = "http") -> str:
    return (f"cclb listening on {scheme}://{host}:{port} -> {backends} "
            f"backend{'s' * (backends != 1)}{extra}")


def make_process(config: Config, role: Role, argv: list[str],
                 signals: Signals) -> Balancer | SupervisorProcess:
    if role is Role.SUPERVISOR:
        return SupervisorProcess(config, [arg for arg in argv if arg != "--demo"])
    return Balancer(config, role, on_supervisor_gone=signals.ask_stop)


def serve(config: Config, role: Role, argv: list[str]) -> int:
    """Start, serve until SIGINT/SIGTERM (SIGHUP reloads), stop; returns the exit code.

    The one sequence for every role; what differs lives in the role's class.
    """
    signals = Signals()  # a stop asked for while starting is honoured right after
    process = make_process(config, role, argv, signals)
    try:
        try:
            process.start()
        except StartError as error:
            print(f"cclb: {error}", file=sys.stderr)
            return error.code
        process.announce()
        if role is not Role.WORKER:
            systemd.ready("serving")
        guard = LoopGuard("main")
        while signals.wait():
            with guard:
                if signals.take_reload():
                    process.reload()
                if signals.take_reopen():
                    process.reopen_logs()
                process.tick()
        if role is not Role.WORKER:
            systemd.stopping()
        process.stop()
    except StopNow:
        log.warning("second stop signal: stopping at once")
        process.abort()
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
    for port in ports:
        if not port_free("127.0.0.1", port):
            # Checked first: another program answering on the port would look
            # like a demo backend that started.
            raise RuntimeError(f"demo port {port} is already in use")
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
            if child.poll() is not None:  # something else took the port meanwhile
                raise RuntimeError(f"demo backend on port {port} exited "
                                   f"(code {child.returncode}); is the port in use?")
    except BaseException:
        stop_children(children)
        raise
    return children


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound now (TIME_WAIT leftovers do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


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


def check_certificates(config: Config) -> str | None:
    """The first problem with the configured certificates (one line), or None."""
    if not config.tls_certs:
        return None
    try:
        load_certificates(config.tls_certs, parse_min_version(config.tls_min_version))
    except TLSConfigError as error:
        return str(error)
    return None


def check(config: Config) -> int:
    """--check: what settings.load could not verify without side effects, then the summary."""
    problem = check_certificates(config)
    if problem is not None:
        print(f"cclb: {problem}", file=sys.stderr)
        return 2
    if config.access_log not in ("-", "off"):
        try:
            with open(config.access_log, "a", encoding="utf-8"):
                pass
        except OSError as error:
            print(f"cclb: cannot open access log {config.access_log}: {error.strerror}",
                  file=sys.stderr)
            return 2
    print(settings.summary(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Until the handlers are in place a SIGHUP must not kill us (its default).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    config = settings.load(argv)
    if config.check:
        return check(config)
    setup_app_logger(config.log_level)
    problem = check_certificates(config) if not workers.is_worker() else None
    if problem is not None:  # before any child process starts
        print(f"cclb: {problem}", file=sys.stderr)
        return 2
    if workers.is_worker():
        return serve(config, Role.WORKER, argv)
    role = Role.SUPERVISOR if config.workers > 1 else Role.SINGLE
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
        return serve(config, role, argv)
    except KeyboardInterrupt:
        return 0
    finally:
        stop_children(children)


if __name__ == "__main__":
    sys.exit(main())

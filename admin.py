"""The admin API and dashboard (``--admin-port``), on its own listener.

Routes:
    GET  /                         HTML dashboard (no external assets; polls /status)
    GET  /status                   JSON: backends, policy, settings in force
    GET  /metrics                  Prometheus text exposition format
    POST /backends                 add a backend: {"url": "http://h:p", "weight": 1}
    DELETE /backends/<id>          remove a backend (in-flight requests finish)
    POST /backends/<id>/drain      no new requests; in-flight ones finish
    POST /backends/<id>/maint      out of rotation
    POST /backends/<id>/ready      back in rotation

With ``--admin-token`` every write needs ``Authorization: Bearer <token>``.
It is bound to 127.0.0.1 unless configured otherwise; a non-loopback bind
without a token is refused at start (settings.validate).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, Callable, Sequence

import metrics
from dashboard import PAGE
from loops import LoopGuard
from settings import Config
from backend_urls import parse_backend
from cluster import DRAIN, MAINT, READY, Backend, BackendStats, ClusterStats, ServerCluster

log = logging.getLogger("cclb")

_BACKEND_ACTION = re.compile(r"/backends/([0-9]{1,9})(?:/(drain|maint|ready))?")
MAX_ADMIN_BODY = 64 * 1024


def backend_json(backend: BackendStats, now: float) -> dict[str, Any]:
    """One backend as shown by /status."""
    classes: dict[str, int] = {}
    for code, count in backend.traffic.responses.items():
        key = f"{code // 100}xx"
        classes[key] = classes.get(key, 0) + count
    return {
        "id": backend.id,
        "url": backend.url,
        "weight": backend.weight,
        "effective_weight": round(backend.effective_weight, 3),
        "state": backend.state,
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(backend.since)),
        "seconds_in_state": round(now - backend.since, 1),
        "last_check": backend.last_check,
        "last_check_latency_ms": (None if backend.last_check_latency is None
                                  else round(backend.last_check_latency * 1000, 2)),
        "in_flight": backend.traffic.in_flight,
        "responses": dict(sorted(classes.items())),
        "requests": sum(classes.values()),
        "failures": backend.traffic.failures,
        "retries": backend.traffic.retries,
    }


def status_document(stats: ClusterStats, config: Config) -> dict[str, Any]:
    """The /status JSON, built from a copy: the cluster lock is not held meanwhile."""
    now = time.time()
    settings = {key: value for key, value in config.values.items()
                if key not in ("admin_token", "backends", "demo")}
    settings["health_status"] = "-".join(map(str, config.health_status))
    return {"policy": stats.policy, "backends": [backend_json(b, now) for b in stats.backends],
            "unrouted": {str(code): count for code, count in stats.unrouted.items()},
            "settings": settings, "time": now}


class AdminHandler(BaseHTTPRequestHandler):
    """Routes of the admin API; small, JSON in and out."""

    protocol_version = "HTTP/1.1"
    server: AdminServer
    replied = False  # whether this request's answer has started

    def handle_one_request(self) -> None:
        """One request; an unexpected error in a route answers 500 and is logged, once."""
        self.replied = False
        try:
            super().handle_one_request()
        except Exception as error:  # a bug in one route must not take the admin API down
            self.server.guard.report(error)
            self.close_connection = True
            if not self.replied:
                try:
                    self.reply_json(500, {"error": "internal error (see the cclb log)"})
                except OSError:
                    pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            self.reply(200, PAGE, "text/html; charset=utf-8")
        elif path == "/status":
            self.reply_json(200, status_document(self.server.cluster.stats(),
                                                 self.server.get_config()))
        elif path == "/metrics":
            self.reply(200, metrics.render(self.server.cluster.stats()).encode(),
                       "text/plain; version=0.0.4; charset=utf-8")
        else:
            self.reply_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        # Writes are rare: close after each, so an unread or partly read body
        # can never be taken for a next request on the connection.
        self.close_connection = True
        if not self.authorized():
            return
        path = self.path.split("?", 1)[0]
        if path == "/backends":
            self.add_backend()
            return
        target = self.backend_target(path, with_action=True)
        if target is None:
            return
        backend, action = target
        state = {"drain": DRAIN, "maint": MAINT, "ready": READY}[action]
        self.server.cluster.set_admin_state(backend, state)
        self.changed()
        self.reply_json(200, self.describe(backend))

    def do_DELETE(self) -> None:
        self.close_connection = True  # as for POST
        if not self.authorized():
            return
        target = self.backend_target(self.path.split("?", 1)[0], with_action=False)
        if target is None:
            return
        backend, _ = target
        self.server.cluster.remove(backend)
        self.changed()
        log.warning("backend %s removed by the admin API", backend.url)
        self.reply_json(200, {"removed": backend.url})

    def backend_target(self, path: str, with_action: bool) -> tuple[Backend, str] | None:
        """The backend (and action) named by ``/backends/<id>[/<action>]``.

        Answers 404 itself, and returns None, for any other path or an unknown id.
        """
        match = _BACKEND_ACTION.fullmatch(path)
        if match is None or bool(match[2]) != with_action:
            self.reply_json(404, {"error": "not found"})
            return None
        backend = self.server.cluster.find(int(match[1]))
        if backend is None:
            self.reply_json(404, {"error": f"no backend with id {match[1]}"})
            return None
        return backend, match[2] or ""

    def add_backend(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_ADMIN_BODY:
                raise ValueError("a JSON body is required")
            data = json.loads(self.rfile.read(length))
            if not isinstance(data, dict) or not isinstance(data.get("url"), str):
                raise ValueError('expected {"url": "http://host:port", "weight": N}')
            weight = data.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, int):
                raise ValueError("weight must be a whole number")
            spec = parse_backend(f"{data['url']},weight={weight}")
        except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
            self.reply_json(400, {"error": str(error) or "invalid JSON"})
            return
        backend = self.server.cluster.add(spec)
        if backend is None:
            self.reply_json(409, {"error": f"{spec.url} is already a backend"})
            return
        self.changed()
        log.warning("backend %s added by the admin API", backend.url)
        self.reply_json(201, self.describe(backend))

    def changed(self) -> None:
        if self.server.on_change is not None:
            self.server.on_change()

    def describe(self, backend: Backend) -> dict[str, Any]:
        return backend_json(self.server.cluster.backend_stats(backend), time.time())

    def authorized(self) -> bool:
        """Writes need the bearer token when one is configured (401 otherwise)."""
        token = self.server.get_config().admin_token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode()):
            return True
        self.close_connection = True
        self.reply_json(401, {"error": "a valid Authorization: Bearer token is required"},
                        [("WWW-Authenticate", 'Bearer realm="cclb admin"')])
        return False

    def reply_json(self, status: int, document: Any, extra: Sequence[tuple[str, str]] = ()) -> None:
        self.reply(status, (json.dumps(document, indent=1) + "\n").encode(),
                   "application/json", extra)

    def reply(self, status: int, body: bytes, content_type: str,
              extra: Sequence[tuple[str, str]] = ()) -> None:
        self.replied = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("admin: " + format, *args)


class AdminServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], cluster: ServerCluster,
                 get_config: Callable[[], Config],
                 on_change: Callable[[], None] | None = None) -> None:
        self.cluster = cluster
        self.get_config = get_config
        self.on_change = on_change  # --workers: publish the change to the workers
        self.guard = LoopGuard("admin server")
        super().__init__(address, AdminHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An error that escaped a connection's handler: logged, the server carries on."""
        error = sys.exc_info()[1]
        if isinstance(error, Exception):
            self.guard.report(error)

    def server_bind(self) -> None:
        # Skip HTTPServer's getfqdn() DNS lookup.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

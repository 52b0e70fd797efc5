"""The admin API and dashboard (``--admin-port``), on its own listener.

Routes:
    GET  /                         HTML dashboard (no external assets; polls /status)
    GET  /status                   JSON: backends, policy, settings in force, the last
                                   15 minutes of traffic ("history"; metrics.TrafficHistory)
    GET  /metrics                  Prometheus text exposition format
    HEAD on each GET route         the GET's status and headers (its Content-Length), no body
    POST /backends                 add a backend: {"url": "http://h:p", "weight": 1}
    DELETE /backends/<id>          remove a backend (in-flight requests finish)
    POST /backends/<id>/drain      no new requests; in-flight ones finish
    POST /backends/<id>/maint      out of rotation
    POST /backends/<id>/ready      back in rotation

With ``--admin-token`` every write needs ``Authorization: Bearer <token>``.
It is bound to 127.0.0.1 unless configured otherwise; a non-loopback bind
without a token is refused at start (settings.validate).

The listener is hardened like the proxy's: a deadline for each whole
request (head and body), an idle keep-alive timeout, a small connection cap
(a fast 503 beyond it, from the accepting thread) and a real listen backlog.
Only a complete request acts: a head that never ends, or a body cut short,
is never dispatched.  Writes (POST, DELETE) are refused to other origins
(cross-site request forgery: 403) and need a JSON body type (415).  A client
that goes away or stalls is logged at DEBUG, not as an error.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, Callable, Sequence

import metrics
from dashboard import PAGE
from loops import Deadlines, LoopGuard
from settings import Config
from backend_urls import parse_backend
from routing import Route
from cluster import DRAIN, MAINT, READY, Backend, BackendStats, ClusterStats, Routing, ServerCluster

log = logging.getLogger("cclb")

_BACKEND_ACTION = re.compile(r"/backends/([0-9]{1,9})(?:/(drain|maint|ready))?")
MAX_ADMIN_BODY = 64 * 1024
MAX_ADMIN_HEAD = 64 * 1024  # request line and fields, in bytes
MAX_ADMIN_FIELDS = 99  # http.client.parse_headers allows 100 lines, the empty one included
WRITE_METHODS = frozenset({"POST", "DELETE"})
# Sec-Fetch-Site values of a request a browser sent on its own (a page of
# another origin, even of the same site, e.g. another port of this host, is
# refused).  "none": typed by the user, not sent by a page.
_OWN_FETCH_SITES = frozenset({"same-origin", "none"})

REFUSAL_LOG_INTERVAL = 60.0  # seconds between two WARNING lines about refused cross-origin writes

_BUSY_BODY = b'{"error": "too many admin connections, try again later"}\n'
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nRetry-After: 1\r\nCache-Control: no-store\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


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
    """The /status JSON, built from a copy: the cluster lock is not held meanwhile.

    ``policy``/``backends``/``unrouted`` are the pool ``default``'s (as before
    pools); ``routing_document`` adds every pool and route.
    """
    now = time.time()
    settings = {key: value for key, value in config.values.items()
                if key not in ("admin_token", "backends", "demo", "sticky_secret")}
    settings["health_status"] = "-".join(map(str, config.health_status))
    return {"policy": stats.policy, "backends": [backend_json(b, now) for b in stats.backends],
            "unrouted": {str(code): count for code, count in stats.unrouted.items()},
            "settings": settings, "time": now}


def routing_document(front: ClusterStats, pools: list[ClusterStats],
                     routing: Routing) -> dict[str, Any]:
    """/status "pools" (each with its backends), "routes" (with counters), "default_route",
    and "unrouted" over every pool (the 404s of no route included)."""
    now = time.time()
    counts = routing.counters.snapshot()
    return {
        "unrouted": {str(code): n for code, n in total_unrouted(front, pools).items()},
        "pools": [{"name": p.pool, "policy": p.policy,
                   "sticky_cookie": routing.pools[p.pool].sticky_cookie if p.pool in routing.pools else None,
                   "backends": [backend_json(b, now) for b in p.backends],
                   "unrouted": {str(code): n for code, n in p.unrouted.items()}}
                  for p in pools],
        "routes": [route_json(route, counts.get(route.name, [0, 0, 0]))
                   for route in routing.table.routes],
        "default_route": routing.table.default,  # where unmatched requests go (None: 404)
    }


def total_unrouted(front: ClusterStats, pools: list[ClusterStats]) -> dict[int, int]:
    """Answers given without a backend, by status, over every pool (``front`` once)."""
    total = dict(front.unrouted)
    for p in pools:
        if p is not front:
            for code, n in p.unrouted.items():
                total[code] = total.get(code, 0) + n
    return total


def route_json(route: Route, counts: list[int]) -> dict[str, Any]:
    """One route as shown by /status: what it matches, what it does, its counters."""
    match = {key: value for key, value in (
        ("host", route.host), ("path_prefix", route.path_prefix),
        ("methods", sorted(route.methods) if route.methods else None),
        ("headers", dict(route.headers) or None)) if value is not None}
    action: dict[str, Any] = (
        {"pool": route.pool, "strip_prefix": route.strip_prefix} if route.pool is not None else
        {"redirect": route.redirect, "status": route.status} if route.redirect is not None else
        {"respond": route.respond})
    return {"name": route.name, "index": route.index, "match": match, **action,
            "allow": route.allow is not None, "deny": route.deny is not None,
            "rate_limit": str(route.rate) if route.rate is not None else None,
            "requests": counts[0], "denied": counts[1], "limited": counts[2]}


def own_origin(host: str | None) -> str | None:
    """The admin's own origin as a browser serializes it: ``http://<Host>``, lower case.

    The default port is left out, as browsers do (RFC 6454 6.1); None
    without a Host field.
    """
    if not host:
        return None
    host = host.strip().lower()
    if host.endswith(":80"):
        host = host[:-3]
    return f"http://{host}"


def cross_origin_problem(origin: str | None, fetch_site: str | None,
                         host: str | None) -> str | None:
    """Why a write must be refused as cross-site request forgery, or None if it may go on.

    A browser sends ``Origin`` with every POST and DELETE (RFC 6454 7.2,
    Fetch); it must be the admin's own origin (``http://<Host>``).  No
    ``Origin`` at all is a client that is not a browser (curl, scripts), which
    a page cannot make.  ``Sec-Fetch-Site``, when present, must say the
    request came from this origin (or from the user, ``none``).
    """
    if fetch_site is not None and fetch_site.strip().lower() not in _OWN_FETCH_SITES:
        return f"cross-origin write refused (Sec-Fetch-Site: {fetch_site.strip()[:40]})"
    if origin is None:
        return None
    expected = own_origin(host)
    given = origin.strip().lower()
    if given.endswith(":80"):
        given = given[:-3]
    if expected is None or given != expected:
        return f"cross-origin write refused (Origin: {origin.strip()[:100]})"
    return None


def is_json_type(content_type: str | None) -> bool:
    """Whether a Content-Type field names application/json (parameters allowed)."""
    if content_type is None:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


class AdminHandler(BaseHTTPRequestHandler):
    """Routes of the admin API; small, JSON in and out."""

    protocol_version = "HTTP/1.1"
    server: AdminServer
    replied = False  # whether this request's answer has started
    timed_out = False  # set by the server (under its lock) when the request deadline passed
    body = b""  # the request body, read whole before dispatch

    def setup(self) -> None:
        # StreamRequestHandler.setup applies ``timeout`` to the socket: the
        # longest silence of a client, i.e. the idle keep-alive timeout (and
        # the longest a write may block on a client that does not read).
        self.timeout = self.server.idle_timeout  # type: ignore[misc]  # per connection
        super().setup()

    def expire(self) -> None:
        """Called by ``request_deadlines``, under its lock, when this request's deadline passed.

        Shutting the socket for reading makes the blocked read return at
        once (end of stream); ``timed_out`` tells the handler why.
        """
        self.timed_out = True
        try:
            self.connection.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def handle_one_request(self) -> None:
        """Read one whole request, then dispatch it; the connection closes on any failure.

        A client that goes away or stalls (reset, broken pipe, timeout) is
        not a fault of cclb: one DEBUG line.  An unexpected error in a route
        answers 500 (if nothing was sent yet) and is logged at ERROR with its
        traceback, once (LoopGuard).
        """
        self.replied = False
        self.close_connection = True
        self.command, self.requestline, self.request_version = "", "", "HTTP/1.1"
        self.body = b""
        try:
            if self.read_request():
                self.dispatch()
        except (ConnectionError, TimeoutError) as error:
            self.close_connection = True
            log.debug("admin: client %s went away or stalled: %s",
                      self.client_address[0], error.__class__.__name__)
        except Exception as error:  # a bug in one route must not take the admin API down
            self.server.guard.report(error)
            self.close_connection = True
            if not self.replied:
                try:
                    self.reply_json(500, {"error": "internal error (see the cclb log)"})
                except OSError:
                    pass

    def read_request(self) -> bool:
        """Read one request completely within ``server.header_timeout``; True if it may act.

        Waits for its first byte under the idle timeout (TimeoutError on an
        idle keep-alive connection), then reads the head up to its empty
        line and the whole body, with the deadline running.  Anything
        incomplete (end of stream, deadline) is answered (400, 408, 413,
        431, 501) or simply closed, and never dispatched.
        """
        if not self.rfile.peek(1):  # type: ignore[attr-defined]  # a BufferedReader
            return False  # the client closed an idle connection
        self.server.request_deadlines.watch(self, time.monotonic() + self.server.header_timeout)
        try:
            return self.read_head() and self.read_body()
        finally:
            self.server.request_deadlines.unwatch(self)

    def read_head(self) -> bool:
        """Read and parse the request head; True if it ended with its empty line and is valid.

        BaseHTTPRequestHandler would accept a head cut off by the end of the
        stream (``http.client.parse_headers`` stops at EOF as at an empty
        line), and act on it: so the head is read here, line by line, and only
        a terminated one is handed to ``parse_request``.
        """
        lines: list[bytes] = []
        size = 0
        while True:
            line = self.rfile.readline(MAX_ADMIN_HEAD + 1 - size)
            size += len(line)
            if self.timed_out:
                self.refuse(408, "request not received in time")
                return False
            if size > MAX_ADMIN_HEAD or len(lines) > MAX_ADMIN_FIELDS + 1:  # + the request line
                self.refuse(431, "request head too large")
                return False
            if not line.endswith(b"\n"):  # the stream ended inside the head
                if lines or line:
                    log.debug("admin: unterminated request head from %s ignored",
                              self.client_address[0])
                    self.refuse(400, "incomplete request head")
                return False
            if lines and line in (b"\r\n", b"\n"):
                break
            lines.append(line)
        self.raw_requestline = lines[0]
        connection_file = self.rfile
        # parse_request reads the fields from ``rfile``: give it exactly the
        # complete head, so it cannot read past it (or stop early) itself.
        self.rfile = io.BytesIO(b"".join(lines[1:]) + b"\r\n")
        try:
            return self.parse_request()  # answers its own errors (400, 431, 505)
        finally:
            self.rfile = connection_file

    def read_body(self) -> bool:
        """Read the whole body announced by Content-Length; True if it all arrived."""
        if "Transfer-Encoding" in self.headers:
            self.refuse(501, "the admin API accepts only Content-Length bodies")
            return False
        lengths = set(self.headers.get_all("Content-Length") or [])
        if not lengths:
            return True
        length_text = lengths.pop()
        if lengths or not (length_text.isascii() and length_text.isdigit()):
            self.refuse(400, "invalid Content-Length")
            return False
        length = int(length_text)
        if length > MAX_ADMIN_BODY:
            self.refuse(413, "request body too large")
            return False
        self.body = self.rfile.read(length)
        if self.timed_out:
            self.refuse(408, "request not received in time")
            return False
        if len(self.body) < length:  # the client closed mid-body: nothing acts on a part
            log.debug("admin: request body from %s cut short", self.client_address[0])
            return False
        return True

    def refuse(self, status: int, message: str) -> None:
        """Answer an error about the request itself; the connection closes after it."""
        self.close_connection = True
        self.reply_json(status, {"error": message})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """BaseHTTPRequestHandler's error path (parse_request), answered in JSON; closes."""
        self.refuse(code, message or HTTPStatus(code).phrase)

    def dispatch(self) -> None:
        """Call ``do_<METHOD>`` for a complete request (501 for other methods)."""
        handler = getattr(self, f"do_{self.command}", None)
        if handler is None:
            self.refuse(501, f"method {self.command[:20]} not supported")
            return
        handler()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            self.reply(200, PAGE, "text/html; charset=utf-8")
        elif path == "/status":
            front, pools, routing = self.server.pool_stats()
            document = status_document(front, self.server.get_config())
            if routing is not None:
                document.update(routing_document(front, pools, routing))
            document["history"] = self.server.history.to_json()
            frontend = self.server.frontend
            if frontend is not None:
                try:
                    document["frontend"] = frontend()
                except Exception as error:  # the rest of /status still answers
                    self.server.guard.report(error)
            self.reply_json(200, document)
        elif path == "/metrics":
            front, pools, routing = self.server.pool_stats()
            routes = None
            if routing is not None:  # every route of the table, counted or not yet
                counts = routing.counters.snapshot()
                routes = {route.name: counts.get(route.name, [0, 0, 0])
                          for route in routing.table.routes}
            self.reply(200, metrics.render(front, pools, routes).encode(),
                       "text/plain; version=0.0.4; charset=utf-8")
        else:
            self.reply_json(404, {"error": "not found"})

    def do_HEAD(self) -> None:
        """HEAD on any GET route: the GET's status and headers, without the body.

        The body is built as for GET (so Content-Length is the GET body's);
        ``reply`` leaves it out for HEAD.
        """
        self.do_GET()

    def do_POST(self) -> None:
        # Writes are rare: close after each, so an unread or partly read body
        # can never be taken for a next request on the connection.
        self.close_connection = True
        if not self.write_allowed():
            return
        path = self.path.split("?", 1)[0]
        if path == "/backends":
            self.add_backend()
            return
        target = self.backend_target(path, with_action=True)
        if target is None:
            return
        cluster, backend, action = target
        state = {"drain": DRAIN, "maint": MAINT, "ready": READY}[action]
        cluster.set_admin_state(backend, state)
        self.changed()
        self.reply_json(200, self.describe(cluster, backend))

    def do_DELETE(self) -> None:
        self.close_connection = True  # as for POST
        if not self.write_allowed():
            return
        target = self.backend_target(self.path.split("?", 1)[0], with_action=False)
        if target is None:
            return
        cluster, backend, _ = target
        cluster.remove(backend)
        self.changed()
        log.warning("backend %s removed by the admin API", backend.url)
        self.reply_json(200, {"removed": backend.url})

    def backend_target(self, path: str, with_action: bool
                       ) -> tuple[ServerCluster, Backend, str] | None:
        """The backend (and action) named by ``/backends/<id>[/<action>]``.

        Answers 404 itself, and returns None, for any other path or an unknown id.
        """
        match = _BACKEND_ACTION.fullmatch(path)
        if match is None or bool(match[2]) != with_action:
            self.reply_json(404, {"error": "not found"})
            return None
        for cluster in self.server.clusters():
            backend = cluster.find(int(match[1]))
            if backend is not None:
                return cluster, backend, match[2] or ""
        self.reply_json(404, {"error": f"no backend with id {match[1]}"})
        return None

    def add_backend(self) -> None:
        if self.body and not is_json_type(self.headers.get("Content-Type")):
            self.refuse_media_type()  # a body read as JSON must say it is JSON
            return
        try:
            if not self.body:
                raise ValueError("a JSON body is required")
            data = json.loads(self.body)
            if not isinstance(data, dict) or not isinstance(data.get("url"), str):
                raise ValueError('expected {"url": "http://host:port", "weight": N, "pool": NAME}')
            pool = data.get("pool", "default")
            if not isinstance(pool, str):
                raise ValueError("pool must be a pool's name")
            weight = data.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, int):
                raise ValueError("weight must be a whole number")
            spec = parse_backend(f"{data['url']},weight={weight}")
        except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
            self.reply_json(400, {"error": str(error) or "invalid JSON"})
            return
        clusters = {cluster.name: cluster for cluster in self.server.clusters()}
        cluster = clusters.get(pool)
        if cluster is None:
            self.reply_json(404, {"error": f"no pool named {pool!r} (pools: {', '.join(clusters)})"})
            return
        owner = next((c.name for c in clusters.values()
                      if any(b.url == spec.url for b in c.snapshot())), None)
        backend = cluster.add(spec) if owner is None else None
        if backend is None:
            self.reply_json(409, {"error": f"{spec.url} is already a backend"
                                  + (f" (pool {owner})" if owner not in (None, pool) else "")})
            return
        self.changed()
        log.warning("backend %s added to pool %s by the admin API", backend.url, pool)
        self.reply_json(201, self.describe(cluster, backend))

    def changed(self) -> None:
        if self.server.on_change is not None:
            self.server.on_change()

    def describe(self, cluster: ServerCluster, backend: Backend) -> dict[str, Any]:
        return {**backend_json(cluster.backend_stats(backend), time.time()), "pool": cluster.name}

    def write_allowed(self) -> bool:
        """Whether a write may go on; if not, the refusal has been answered.

        403 for a request a page of another origin made (cross-site request
        forgery), 401 without the token (when one is set), 415 for a
        Content-Type that is not JSON: a page can send a cross-origin form or
        text/plain POST without asking, but not an application/json one (that
        needs a CORS preflight, which the admin API never grants).  A body
        without any Content-Type is refused where it is read (``add_backend``);
        the other writes take no body and ignore one.
        """
        problem = cross_origin_problem(self.headers.get("Origin"),
                                       self.headers.get("Sec-Fetch-Site"), self.headers.get("Host"))
        if problem is not None:
            self.server.note_refusal(problem, self.client_address[0])
            self.reply_json(403, {"error": problem})
            return False
        if not self.authorized():
            return False
        content_type = self.headers.get("Content-Type")
        if content_type is not None and not is_json_type(content_type):
            self.refuse_media_type()
            return False
        return True

    def refuse_media_type(self) -> None:
        self.reply_json(415, {"error": "writes need Content-Type: application/json"})

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
    """The admin listener: bounded connections, request deadlines, graceful close.

    ``lock`` guards ``connections`` (the open client sockets) and
    ``last_refusal_log``; ``request_deadlines`` (its own lock) holds the time by
    which each request must have been read, expired by ``service_actions``.  The limits are class attributes so
    that tests can shrink them.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # as the proxy's: the stdlib's 5 drops connections under load
    header_timeout = 10.0  # seconds for a whole request, head and body (slowloris defence)
    idle_timeout = 30.0  # seconds of silence: idle keep-alive, or a client that stalls
    max_connections = 64  # beyond: a fast 503 from the accepting thread, no thread started

    def __init__(self, address: tuple[str, int], cluster: ServerCluster,
                 get_config: Callable[[], Config],
                 on_change: Callable[[], None] | None = None) -> None:
        self.cluster = cluster
        self.get_config = get_config
        self.on_change = on_change  # --workers: publish the change to the workers
        self.guard = LoopGuard("admin server")
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.request_deadlines = Deadlines("admin request deadlines")
        self.last_refusal_log = -REFUSAL_LOG_INTERVAL
        # The dashboard's 15 minutes of traffic; sampled while serve_forever runs.
        self.history = metrics.TrafficHistory(self.all_stats)
        # Optional, set by the process: the proxy's own numbers, shown by /status as
        # "frontend" ({"open_connections": N, "rejected": {reason: N}}) when set.
        self.frontend: Callable[[], dict[str, Any]] | None = None
        # Optional, set by the process: the pools and routes in force (None: ``cluster`` only).
        self.routing: Callable[[], Routing] | None = None
        if ":" in address[0]:  # --admin-host ::1 is loopback too
            self.address_family = socket.AF_INET6
        super().__init__(address, AdminHandler)

    def clusters(self) -> list[ServerCluster]:
        """Every pool (the pool default first, as ``cluster`` is, when it is one)."""
        if self.routing is None:
            return [self.cluster]
        routing = self.routing()
        return list(routing.pools.values()) or [self.cluster]

    def all_stats(self) -> ClusterStats:
        """Every pool's backends in one copy (the dashboard's history charts them all)."""
        front, pools, _ = self.pool_stats()
        if len(pools) == 1 and pools[0] is front:
            return front
        return ClusterStats(front.policy, [b for p in pools for b in p.backends],
                            total_unrouted(front, pools), front.frontend, front.pool)

    def pool_stats(self) -> tuple[ClusterStats, list[ClusterStats], Routing | None]:
        """Copies of the front pool's and every pool's state, and the routing in force."""
        front = self.cluster.stats()
        if self.routing is None:
            return front, [front], None
        routing = self.routing()
        pools = [front if cluster is self.cluster else cluster.stats()
                 for cluster in routing.pools.values()]
        return front, pools, routing

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until ``shutdown``; the history sampler runs meanwhile and stops with it."""
        self.history.start()
        try:
            super().serve_forever(poll_interval)
        finally:
            self.history.stop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An error that escaped a connection's handler: logged, the server carries on."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("admin: client %s went away: %s", client_address[0],
                      error.__class__.__name__)
        elif isinstance(error, Exception):
            self.guard.report(error)

    def server_bind(self) -> None:
        # Skip HTTPServer's getfqdn() DNS lookup.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    # --- connections --------------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a handler thread, or answer a fast 503 past ``max_connections``."""
        with self.lock:
            full = len(self.connections) >= self.max_connections
            if not full:
                self.connections.add(request)
        if full:
            self.reject(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # can't start a new thread
            self.forget(request)
            self.reject(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.forget(request)

    def forget(self, request: socket.socket) -> None:
        with self.lock:
            self.connections.discard(request)

    def reject(self, request: socket.socket) -> None:
        """Answer a connection over the limit with a 503 and close it, from the accept thread.

        Non-blocking: a client that does not read cannot hold the accept thread.
        """
        log.debug("admin: connection refused, %d open", self.max_connections)
        try:
            request.setblocking(False)
            request.send(BUSY_RESPONSE)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.shutdown_request(request)

    def server_close(self) -> None:
        """Close the listener and every open connection.

        Handler threads are daemon threads, which ``server_close`` does not
        join: without this, one serving an idle keep-alive client (a
        dashboard tab) would outlive the server until the client left.
        """
        self.history.stop()
        with self.lock:
            still_open = list(self.connections)
        for sock in still_open:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        super().server_close()

    def note_refusal(self, problem: str, client: str) -> None:
        """Log a refused cross-origin write: a WARNING at most once a minute.

        A hostile page can send such requests in a loop; the log must not
        become the attack's amplifier.  The others go to DEBUG.
        """
        now = time.monotonic()
        with self.lock:
            loud = now - self.last_refusal_log >= REFUSAL_LOG_INTERVAL
            if loud:
                self.last_refusal_log = now
        if loud:
            log.warning("admin: %s from %s (a web page tried to change cclb; "
                        "more such refusals are logged at DEBUG for a minute)", problem, client)
        else:
            log.debug("admin: %s from %s", problem, client)

    # --- request deadlines ----------------------------------------------------

    def service_actions(self) -> None:
        """Called by ``serve_forever`` after every select (at least each poll interval)."""
        with self.guard:
            self.request_deadlines.expire_due(time.monotonic())

"""The forwarding path: ``LoadBalancerServer`` and its ``ProxyHandler``.

Connections are owned by the ``engine``: while a client is idle, or its
request head (or a small body) is still arriving, or its TLS handshake is
in progress, the connection is parked in the engine's selector thread and
costs no thread.  Once a whole request head is buffered, one of
``--threads`` pool threads runs the handler with blocking I/O, as a
thread-per-connection server would.  The handler does the I/O and the
sequencing only: it reads each request head (``message_reader``), has
``forwarding`` check it and build the head sent upstream, asks the
``ServerCluster`` for a backend, sends the request over a pooled keep-alive
connection, and relays the response the way ``forwarding.response_plan``
says (gzip, framing, Connection).  Failures that are safe to retry go to
the next backend.  Then the connection is parked again, closed, or (an
upgrade tunnel) kept by a thread of its own.
"""

from __future__ import annotations

import itertools
import logging
import math
import select
import socket
import ssl
import threading
import time
import zlib
from dataclasses import replace
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, NamedTuple, Sequence, cast

import http11
from access import real_client
from proxy_protocol import V2_MAX_LENGTH, ProxyHeader, ProxyProtocolError, parse_proxy_header
from cluster import Attempt, Backend, Routing, ServerCluster
from forwarding import (BUFFERED, NO_BODY, TRACE_ALLOW, Request, ResponsePlan, check_request_head,
                        error_closes_connection, new_request_id, request_id_for, response_plan,
                        upstream_request_head)
from forwarding import switching_protocols_head
from http11 import Fields, Headers, ProtocolError
from loggers import AccessLog, WarningLimiter, sanitize
from message_reader import (BodyTooLarge, EmptyResponse, IncompleteHead, Limits, MalformedBody, ResponseHead,
                            TruncatedBody, iter_body, read_field_lines, read_response_head,
                            read_small_body)
from engine import EOF, NOTHING, READ, WRITE, Engine, Verdict, head_ready, receive
from socket_io import RECV_SIZE, SocketReader, SocketWriter
from tls import CertificateStore, set_timeouts
from metrics import BODY_TIMEOUT, ENGINE, MAX_CONNECTIONS, PROCESS, TUNNELS, reject_reason
from routing import Answer, HeaderRules, cookie_value, decide, set_cookie
from settings import Config, Listener
from tunnel import Tunnel
from upstream import SHARED_IDLE_WATCHER, UpstreamConnection, describe_error

log = logging.getLogger("cclb")
# Backend failures: the operator gets the backend and the cause (the client
# only a fixed message and the request id), at most once a second per pair.
backend_warnings = WarningLimiter(log)

# The bodies of answers cclb makes itself when a backend fails: fixed texts,
# never a backend address or an exception's text (those go to the app log).
BAD_GATEWAY = "bad gateway: the backend failed to answer"
GATEWAY_TIMEOUT = "gateway timeout: the backend did not answer in time"
NO_BACKEND = "no healthy backend is available right now, try again shortly"
ALL_FAILED = "no backend could take the request, try again shortly"
TOO_MANY_CONNECTIONS = "too many connections, try again later"

# A failed attempt's cause (``BackendError.cause``) -> the request's termination.
TERMINATIONS = {"refused": "backend_refused", "reset": "backend_reset", "timeout": "backend_timeout",
                "closed": "backend_closed", "truncated": "backend_truncated"}


def cause_of(error: BaseException) -> str:
    """A short, fixed cause for a failed exchange with a backend (attempts, terminations)."""
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(error, (TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(error, socket.gaierror):
        return "dns"
    return "error"


class BodyRate:
    """--min-body-rate: a streamed body must come at ``rate`` bytes/s or more over each window.

    ``check`` (before each read) raises TimeoutError once a window has
    passed with fewer bytes than that; the socket's timeout is at most one
    window, so a client that goes silent is caught too.
    """

    __slots__ = ("rate", "window", "start", "mark")

    def __init__(self, rate: int, window: float, received: int) -> None:
        self.rate, self.window = rate, window
        self.start, self.mark = time.monotonic(), received

    def check(self, received: int) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        if elapsed >= self.window:
            if received - self.mark < self.rate * elapsed:
                raise TimeoutError("request body slower than --min-body-rate")
            self.start, self.mark = now, received


class CountingReader(SocketReader):
    """A ``SocketReader`` that counts the bytes it receives (``received``).

    ``floor``: while a body streams, its ``BodyRate`` (checked before each read).
    """

    __slots__ = ("received", "floor")

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.received = 0
        self.floor: BodyRate | None = None

    def fill(self) -> bool:
        if self.floor is not None:
            self.floor.check(self.received)
        before = len(self.buffer)
        if not SocketReader.fill(self):
            return False
        self.received += len(self.buffer) - before
        return True

    def read1(self, n: int) -> bytes:
        if not self.buffer and n >= RECV_SIZE:
            if self.floor is not None:
                self.floor.check(self.received)
            # SocketReader.read1 then recv()s straight into the result, bypassing fill().
            data = SocketReader.read1(self, n)
            self.received += len(data)
            return data
        return SocketReader.read1(self, n)


class CountingWriter(SocketWriter):
    """A ``SocketWriter`` that counts the bytes it sends (``sent``)."""

    __slots__ = ("sent",)

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.sent = 0

    def write(self, data: bytes) -> int:
        sent = SocketWriter.write(self, data)
        self.sent += sent
        return sent

# Bodies up to this size are held in memory: request bodies so that a failed
# attempt can be replayed on another backend, responses so that head and body
# leave in one write (and can be gzipped in one call).  Larger ones stream.
BUFFER_LIMIT = 256 * 1024
PIECE = 64 * 1024
# After the drain period, open tunnels are stopped; their handlers get this
# long to log the tunnel and close both sockets before drain() gives up.
TUNNEL_STOP_GRACE = 2.0
# Backends are trusted more than clients (many Set-Cookie fields are normal)
# but not blindly: a runaway head still ends in a 502.
RESPONSE_LIMITS = Limits(max_line=16 * 1024, max_header_bytes=128 * 1024, max_fields=500)

# A client connection's state, guarded by ``LoadBalancerServer.lock``.  IDLE:
# waiting for the next request, nothing of it consumed (the server may reclaim
# the connection).  BUSY: a request has started (its bytes are readable or
# buffered) until its answer is written.  RECLAIMED: the server closed it
# while idle; the handler ends quietly.
IDLE, BUSY, RECLAIMED = "idle", "busy", "reclaimed"

# What a parked connection waits for in the engine's selector thread
# (``ProxyHandler.phase``): its PROXY protocol header, its TLS handshake to finish, the first byte of a
# request (keep-alive), the rest of a request head, or the rest of a body
# that cclb buffers anyway (up to BUFFER_LIMIT).
HANDSHAKE, WAITING, HEAD, BODY = "handshake", "waiting", "head", "body"
PROXY_HEADER = "proxy"  # --proxy-protocol: the PROXY header, before anything else (even TLS)
# After an answer, a pool thread waits this long (ms) for the connection's next
# request before parking it, when no other connection waits for a thread.
LINGER_MS = 2
# --min-body-rate is checked over windows of this many seconds (at most --body-timeout).
BODY_RATE_WINDOW = 10.0
MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"  # cclb_rejected_total reason

# Tokens naming client connections, for ``ConnectionPool.acquire``'s owner
# rule (``--upstream-reuse safe``).  ``next()`` on a count is atomic under
# the GIL, so handler threads need no lock to draw one.
_client_tokens = itertools.count(1)


def has_input(sock: socket.socket) -> bool:
    """Whether ``sock`` has bytes (or end of stream) to read now; True if it cannot tell.

    Its own poll object: ``select.poll`` objects must not be polled from two
    threads at once, and the handler owns the connection's.  A TLS socket may
    hold decrypted bytes the kernel no longer shows (``pending``).
    """
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed meanwhile: its handler is ending
        return True


def shutdown_quietly(sock: socket.socket) -> None:
    """Shut both directions; the handler's wait or read then returns."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class ClientError(Exception):
    """The client broke off, timed out or sent a bad body; status to answer (if any)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status


class Truncated(NamedTuple):
    """A response whose body ended short, held back so that it can be retried."""

    message: bytes  # the head (with the declared Content-Length) and the bytes that came
    status: int
    body_bytes: int


class BackendError(Exception):
    """An attempt failed on the backend side."""

    def __init__(self, message: str, sent: bool, stale: bool = False,
                 truncated: Truncated | None = None, cause: str = "error") -> None:
        super().__init__(message)
        # "refused", "reset", "timeout", "closed", "truncated", "dns" or "error":
        # the attempt's outcome in the access log, and the termination's basis.
        self.cause = cause
        self.sent = sent  # did any byte of the request reach the backend
        self.stale = stale  # a reused connection that the backend had closed
        self.truncated = truncated  # the cut-off response, relayed if no retry answers


class LoadBalancerServer(ThreadingHTTPServer):
    """The listening side: bounded connections, big backlog, graceful stop.

    ``serve_forever`` (the acceptor thread) accepts; each connection gets
    its ``ProxyHandler`` at once and is handed to ``engine`` (parked until a
    request head is complete, then served by a pool thread).

    ``lock`` guards ``connections`` (open client socket -> its handler, None
    while its TLS handshake is in progress), ``per_ip`` (open connections by
    client address) and every handler's ``state`` (IDLE, BUSY, RECLAIMED).
    A connection is closed from here (to make room at ``--max-connections``,
    or to drain) only if it is IDLE with nothing to read, and it is marked
    RECLAIMED in the same critical section; a handler moves IDLE -> BUSY
    under the lock before it consumes a byte of the next request.  So a
    request that has started is never cut off.
    """

    request_queue_size = 4096  # the stdlib's 5 drops connections under load
    daemon_threads = True
    allow_reuse_address = True
    # The route table and pools (cclb.py sets it; a reload replaces it whole).
    # None: no routing configured, every request goes to ``cluster`` as before.
    routing: Routing | None = None

    def __init__(self, listener: Listener, config: Config, cluster: ServerCluster,
                 access_log: AccessLog, reuse_port: bool = False,
                 inherited_fd: int | None = None, tls: CertificateStore | None = None) -> None:
        self.listener = listener
        self.tls = tls  # the certificates when this listener speaks TLS (--tls-cert)
        self.config = config
        self.cluster = cluster
        self.access_log = access_log
        self.limits = Limits(config.max_request_line, config.max_header_size, config.max_headers)
        self.response_limits = RESPONSE_LIMITS
        self.lock = threading.Lock()
        self.connections: dict[socket.socket, ProxyHandler | None] = {}
        self.addresses: dict[socket.socket, str] = {}  # client address of each open connection
        self.per_ip: dict[str, int] = {}  # open connections by client address
        self.closed = False  # server_close() was called: the engine stops with the last connection
        self.draining = False
        # Open upgrade tunnels, so that a drain can end them; guarded by ``lock``.
        # ``tunnels_closed``: drain() has stopped them, later ones stop at once.
        self.tunnels: set[Tunnel] = set()
        self.tunnels_closed = False
        self.engine = Engine(config.threads, name="cclb")
        cluster.frontend.gauges = self.gauges
        cluster.frontend.tunnels = TUNNELS  # this process's tunnels, in /status and worker reports
        cluster.frontend.engine = ENGINE  # and its engine's numbers
        self.allow_reuse_port = reuse_port  # --workers: siblings bind the same port
        if ":" in listener.host:
            self.address_family = socket.AF_INET6
        super().__init__((listener.host, listener.port), ProxyHandler,
                         bind_and_activate=inherited_fd is None)
        if inherited_fd is not None:  # --workers without SO_REUSEPORT: a shared socket
            self.socket.close()
            self.socket = socket.socket(fileno=inherited_fd)
            self.server_address = self.socket.getsockname()
            # Siblings share this socket: accept() must not block when another won.
            self.socket.setblocking(False)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept; a TLS listener wraps the socket here and handshakes in the handler's thread."""
        sock, address = super().get_request()
        if self.tls is not None:
            sock = self.tls.context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        return sock, address

    def configure(self, config: Config) -> None:
        """Apply new settings (a reload); requests read them per request."""
        self.limits = Limits(config.max_request_line, config.max_header_size, config.max_headers)
        self.config = config
        self.engine.resize(config.threads)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(), a DNS lookup.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        SHARED_IDLE_WATCHER.start()  # the process's idle pooled backend connections
        self.engine.start()
        ENGINE.attach(self.engine)
        super().serve_forever(poll_interval)

    def server_close(self) -> None:
        """Close the listening socket; the engine ends once the last connection has closed."""
        super().server_close()
        with self.lock:
            self.closed = True
            stop = not self.connections
        if stop:
            self.engine.stop()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Admit a new connection (or answer a fast 503) and hand it to the engine."""
        address = client_address[0] if isinstance(client_address, tuple) else "-"
        per_ip = self.config.max_connections_per_ip
        reason: str | None = None
        idle = None
        with self.lock:
            if per_ip and self.per_ip.get(address, 0) >= per_ip:
                reason = MAX_CONNECTIONS_PER_IP  # refused first: no one's idle connection is reclaimed for it
            elif len(self.connections) >= self.config.max_connections:
                # Like nginx, reclaim an idle keep-alive connection before
                # turning a new client away.
                idle = self.reclaim_idle()
                if idle is None:
                    reason = MAX_CONNECTIONS
            if reason is None:
                self.connections[request] = None
                self.addresses[request] = address
                self.per_ip[address] = self.per_ip.get(address, 0) + 1
        if idle is not None:
            shutdown_quietly(idle)  # the selector sees it end; its handler sees RECLAIMED
        if reason is not None:
            self.reject_connection(request, client_address, reason)
            return
        try:
            handler_class = cast("type[ProxyHandler]", self.RequestHandlerClass)
            handler = handler_class(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
            self.forget(request)
            return
        if handler.tls:
            self.engine.park(handler)  # the handshake is done by the selector thread
        else:
            # Often the request is already there: read it now, saving a trip through the selector.
            try:
                verdict = handler.on_ready(0)
            except Exception:
                self.handle_error(request, client_address)
                verdict = Verdict.CLOSE
            self.engine.dispatch(handler, verdict)

    def reclaim_idle(self) -> socket.socket | None:
        """Take one idle connection out of the table, marked RECLAIMED; caller holds ``lock``.

        Only a handler that is IDLE and whose socket has nothing to read: bytes
        there mean the client has sent its next request (which the handler is
        about to claim), and closing would cut it off.  The caller shuts the
        returned socket down.
        """
        for sock, handler in self.connections.items():
            if handler is not None and handler.state == IDLE and not has_input(sock):
                handler.state = RECLAIMED
                self.remove(sock)
                return sock
        return None

    def remove(self, sock: socket.socket) -> None:
        """Take ``sock`` out of the table (and its address's count); caller holds ``lock``."""
        if self.connections.pop(sock, False) is False:
            return
        address = self.addresses.pop(sock, "-")
        left = self.per_ip.get(address, 1) - 1
        if left > 0:
            self.per_ip[address] = left
        else:
            self.per_ip.pop(address, None)

    def forget(self, request: Any) -> None:
        with self.lock:
            self.remove(request)
            stop = self.closed and not self.connections
        if stop:
            self.engine.stop()

    def reject_connection(self, request: socket.socket, client_address: Any,
                          reason: str = MAX_CONNECTIONS) -> None:
        """Answer a connection over a limit with a fast 503, from the accept thread.

        Counted as rejected (``reason``: ``max_connections`` or
        ``max_connections_per_ip``) and access-logged, like any answer cclb
        makes itself.
        """
        request_id = new_request_id()
        body = error_body(TOO_MANY_CONNECTIONS, request_id)
        sent = 0
        source: str | None = None
        if not isinstance(request, ssl.SSLSocket):  # no handshake yet: nothing to say over TLS
            try:
                request.setblocking(False)
                sent = request.send(error_response(503, body, close=True, retry_after=1,
                                                   request_id=request_id))
                source = "cclb"
                request.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.shutdown_request(request)
        self.cluster.frontend.count(source, 503, 0, sent, reason)
        client = client_address[0] if isinstance(client_address, tuple) else "-"
        access_log = self.access_log
        details: dict[str, Any] | None = None
        if access_log.json:
            details = {"host": None, "protocol": None,
                       "scheme": "https" if self.tls is not None else "http",
                       "request_bytes": 0, "user_agent": None, "referer": None,
                       "upstream_connect_ms": None, "upstream_header_ms": None,
                       "attempts": [], "termination": "rejected"}
        access_log.record(client, "-", "-", 503, len(body) if source else 0, "-", 0.0,
                          request_id, details)

    def gauges(self) -> tuple[int, int, int]:
        """Open client connections, and those busy with a request / idle between two (``FrontendMetrics.gauges``).

        Busy counts a request from its first byte (its head may still be
        arriving, parked) to its answer; idle, keep-alive connections waiting.
        """
        with self.lock:
            states = [handler.state for handler in self.connections.values() if handler is not None]
            return len(self.connections), states.count(BUSY), states.count(IDLE)

    def register(self, handler: ProxyHandler) -> None:
        with self.lock:
            if handler.connection in self.connections:
                self.connections[handler.connection] = handler

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("internal error while serving %s", client_address[0])

    def add_tunnel(self, tunnel: Tunnel) -> None:
        """Track an open tunnel (``drain`` stops it); stopped at once if the drain already did."""
        with self.lock:
            self.tunnels.add(tunnel)
            closed = self.tunnels_closed
        if closed:
            tunnel.stop()

    def remove_tunnel(self, tunnel: Tunnel) -> None:
        with self.lock:
            self.tunnels.discard(tunnel)

    def stop_tunnels(self) -> int:
        """Stop every open tunnel (and any opened later); how many were open."""
        with self.lock:
            self.tunnels_closed = True
            tunnels = list(self.tunnels)
        for tunnel in tunnels:
            tunnel.stop()  # thread-safe: the handler's run() returns STOPPED
        return len(tunnels)

    def drain(self, timeout: float) -> bool:
        """Stop keep-alive, close idle connections, wait for in-flight requests.

        Idle means the same as for ``reclaim_idle``: a connection whose client
        has already sent its next request counts as busy (that request is
        served, with Connection: close).  Upgrade tunnels count as busy: they
        get the drain period like requests, then are stopped (their handlers
        get ``TUNNEL_STOP_GRACE`` more seconds to log and close them).
        """
        self.draining = True
        deadline = time.monotonic() + timeout
        tunnels_stopped = False
        while True:
            idle: list[socket.socket] = []
            busy_count = 0
            with self.lock:
                for sock, handler in self.connections.items():
                    if handler is not None and handler.state == RECLAIMED:
                        continue  # closed already; its thread is ending
                    if (handler is None or handler.state == IDLE) and not has_input(sock):
                        if handler is not None:
                            handler.state = RECLAIMED
                        idle.append(sock)
                    else:
                        busy_count += 1
            for sock in idle:
                shutdown_quietly(sock)
            if busy_count and not tunnels_stopped and time.monotonic() >= deadline:
                tunnels_stopped = True
                if self.stop_tunnels():
                    deadline = time.monotonic() + TUNNEL_STOP_GRACE
                    continue
            if busy_count == 0 or time.monotonic() >= deadline:
                return busy_count == 0
            time.sleep(0.05)


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header value, formatted at most once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def error_body(message: str, request_id: str) -> bytes:
    """The body of an answer cclb makes itself: a fixed message and the request id."""
    return f"{message}\nrequest id: {request_id}\n".encode("utf-8")


def error_response(status: int, body: bytes, close: bool, retry_after: int | None = None,
                   extra: Sequence[tuple[str, str]] = (), request_id: str = "") -> bytes:
    """A short plain-text response generated by cclb itself (``body`` from ``error_body``).

    It carries X-Request-ID like a relayed response, so a client can quote
    the id that the access log and the application log show.
    """
    headers: Headers = [("Date", http_date()), ("Server", "cclb"),
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Length", str(len(body)))]
    if request_id:
        headers.append(("X-Request-ID", request_id))
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    headers.extend(extra)
    if close:
        headers.append(("Connection", "close"))
    reason = HTTPStatus(status).phrase
    return http11.serialize_head(f"HTTP/1.1 {status} {reason}", headers) + body


def pull_proxy_header(sock: socket.socket, received: bytes) -> tuple[ProxyHeader | None, bytes]:
    """One non-blocking step of reading a PROXY header (for an event loop; never waits).

    The thread-per-connection handler reads the header blocking
    (``take_proxy_header``); this is the same for a selector-driven
    connection engine, which must not block on a connection.

    ``received``: the header's bytes consumed by earlier steps.  Returns the
    header once complete (the request bytes behind it stay unread), else
    (None, the bytes so far) when more must arrive.  Raises
    ``ProxyProtocolError`` (malformed, or closed before the end) or OSError.
    ``sock`` must be a plain socket: on a TLS listener, a raw view of the
    connection's descriptor (the header precedes the TLS handshake).
    """
    try:
        peeked = sock.recv(V2_MAX_LENGTH - len(received), socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None, received
    if not peeked:
        raise ProxyProtocolError("connection closed before the end of the PROXY protocol header")
    parsed = parse_proxy_header(received + peeked)
    take = len(peeked) if parsed is None else parsed[1] - len(received)
    while take > 0:  # already in the kernel's buffer: no waiting
        take -= len(sock.recv(take, socket.MSG_DONTWAIT))
    return (None, received + peeked) if parsed is None else (parsed[0], b"")


class ProxyHandler(BaseHTTPRequestHandler):
    """Handles one client connection: reads requests, forwards them, relays answers.

    Its life is split between the engine's threads (``engine.Connection``):
    ``setup`` at accept; ``on_ready``/``on_deadline`` in the selector thread
    while parked (non-blocking: the TLS handshake, reading a head or a small
    body); ``run`` in a pool thread once a whole head is buffered (the
    request, its answer, and any pipelined request already buffered); then
    ``park`` again, or ``close``.  Only one thread holds it at a time.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    rfile: CountingReader  # type: ignore[assignment]  # not StreamRequestHandler's makefile()
    wfile: CountingWriter  # type: ignore[assignment]
    server: LoadBalancerServer

    def __init__(self, request: Any, client_address: Any, server: LoadBalancerServer) -> None:
        # Not BaseRequestHandler.__init__, which serves the connection to its end
        # in the calling thread: here setup() runs now, the engine does the rest.
        self.request = request
        self.client_address = client_address
        self.server = server
        self.setup()

    def setup(self) -> None:
        # Instead of StreamRequestHandler's makefile() pair: see socket_io.
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.connection.fileno()
        self.tls = isinstance(self.connection, ssl.SSLSocket)
        self.timed_out = False  # the head's deadline passed (408)
        self.body_timed_out = False  # the body parked for went silent (408)
        config = self.server.config
        if self.tls:
            self.connection.settimeout(0)  # parked: non-blocking (see park)
            self.timeout_now = 0.0
        else:
            self.timeout_now = config.keepalive_timeout
            set_timeouts(self.connection, self.timeout_now)
        self.rfile = CountingReader(self.connection)
        self.wfile = CountingWriter(self.connection)
        # Client bytes already counted in cclb_client_bytes_total.
        self.received_mark = self.sent_mark = 0
        self.reset_request_state()
        self.body_pending = False
        self.response_started = False
        self.client_ip = self.client_address[0]
        self.state = IDLE  # guarded by server.lock; see LoadBalancerServer
        self.request_id = ""
        self.token = next(_client_tokens)  # this client connection, as backend connections' owner
        self.first_request = True  # no request of this connection has been forwarded yet
        # Parked in the engine: what for (phase), until when, readable or writable.
        self.phase = PROXY_HEADER if config.proxy_protocol else HANDSHAKE if self.tls else WAITING
        self.proxy_received = b""  # the PROXY header's bytes so far
        self.interest = READ
        now = time.monotonic()
        self.deadline = now + (config.keepalive_timeout if self.phase == WAITING else config.header_timeout)
        self.head_started = now  # when the current request's first byte came
        self.parked_request: Request | None = None  # parked for its body (phase BODY)
        self.poller: select.poll | None = None  # linger()'s, made on first use
        self.body_needed = 0
        if self.phase == WAITING:
            self.server.register(self)  # else once its PROXY header and TLS handshake are done

    def fileno(self) -> int:
        return self.fd

    # --- parked: the selector thread (never blocks) ---------------------------------

    def on_ready(self, events: int) -> Verdict:
        """The socket is ready: read what is there; RUN once a whole head (or the body) is in.

        ``events`` 0: not known to be ready (a connection just accepted, tried at once).
        """
        if self.phase == PROXY_HEADER:
            verdict = self.take_proxy_header()
            if verdict is not None:
                return verdict
        if self.phase == HANDSHAKE:
            verdict = self.handshake()
            if verdict is not None:
                return verdict
        if self.phase == WAITING:
            if not self.claim(bool(events)):
                return Verdict.CLOSE  # reclaimed (--max-connections) or drained while idle
            got = self.pull()
            if got == NOTHING:  # woken for nothing: idle again
                with self.server.lock:
                    if self.state == RECLAIMED:
                        return Verdict.CLOSE
                    self.state = IDLE
                return Verdict.WAIT
            if got < 0:
                return Verdict.CLOSE  # the client closed (or reset) between requests
            self.begin_head()
            return Verdict.RUN if self.head_in() else Verdict.WAIT
        got = self.pull()
        if self.phase == HEAD:
            if got == EOF or (got > 0 and self.head_in()):
                return Verdict.RUN  # a truncated head gets its 400 from the parser
            return Verdict.CLOSE if got < 0 else Verdict.WAIT
        # BODY: the request waits for a body that cclb buffers anyway.
        if got > 0:
            self.deadline = time.monotonic() + self.server.config.body_timeout
        if got < 0 or self.rfile.buffered >= self.body_needed:
            return Verdict.RUN  # complete, or cut short (logged as the client's doing)
        return Verdict.WAIT

    def on_deadline(self) -> Verdict:
        """The deadline passed while parked: close, or RUN to answer 408."""
        if self.phase == PROXY_HEADER:
            log.debug("PROXY protocol header from %s refused: timed out", self.client_address[0])
            return Verdict.CLOSE
        if self.phase == HANDSHAKE:
            self.timed_out = True
            self.handshake_failed("timed out")
            return Verdict.CLOSE
        if self.phase == WAITING:
            return Verdict.CLOSE  # idle keep-alive timeout: closed quietly
        if self.phase == HEAD:
            self.timed_out = True
            try:  # the parser reads what came, then the end: 408 with the request line logged
                self.connection.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            return Verdict.RUN
        self.body_timed_out = True
        return Verdict.RUN

    def handshake(self) -> Verdict | None:
        """One step of the TLS handshake, within --header-timeout; None once it is done.

        A failed or abandoned handshake (plain HTTP on the TLS port, a scanner,
        a client that stalls) is counted and logged at DEBUG, never a traceback.
        """
        try:
            self.connection.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self.interest = READ
            return Verdict.WAIT
        except ssl.SSLWantWriteError:
            self.interest = WRITE
            return Verdict.WAIT
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            self.handshake_failed(error)
            return Verdict.CLOSE
        self.phase = WAITING
        self.interest = READ
        self.deadline = time.monotonic() + self.server.config.keepalive_timeout
        self.server.register(self)
        return None

    def take_proxy_header(self) -> Verdict | None:
        """``proxy_protocol``: one non-blocking step of reading the PROXY header; None once read.

        Its source becomes the client address.  Accepted only from a
        trusted proxy; anything else (an untrusted peer, a malformed or late
        header, a reset) closes the connection quietly (logged at DEBUG,
        never a traceback).  Read from the raw socket even on a TLS
        listener: it precedes the TLS handshake.  Within --header-timeout
        from the accept, like a handshake.
        """
        peer = self.client_address[0]
        routing = self.server.routing
        if routing is None or not routing.trusted or peer not in routing.trusted:
            log.debug("PROXY protocol: %s is not a trusted proxy; connection closed", peer)
            return Verdict.CLOSE
        sock = self.connection
        raw = socket.socket(sock.family, sock.type, sock.proto, fileno=self.fd) if self.tls else sock
        try:
            header, self.proxy_received = pull_proxy_header(raw, self.proxy_received)
        except (ProxyProtocolError, OSError) as error:
            log.debug("PROXY protocol header from %s refused: %s", peer, error)
            return Verdict.CLOSE
        finally:
            if raw is not sock:
                raw.detach()  # the fd stays the connection's
        if header is None:
            self.interest = READ
            return Verdict.WAIT
        if header.source is not None:
            self.client_address = header.source
            self.client_ip = header.source[0]
        if self.tls:
            self.phase = HANDSHAKE  # the deadline stays: header and handshake share it
        else:
            self.phase = WAITING
            self.deadline = time.monotonic() + self.server.config.keepalive_timeout
            self.server.register(self)
        return None

    def handshake_failed(self, error: object) -> None:
        PROCESS.count_tls_handshake_failure()
        log.debug("TLS handshake with %s failed: %s", self.client_address[0], error)

    def claim(self, readable: bool = True) -> bool:
        """IDLE -> BUSY before the first byte of a request is consumed; False if reclaimed."""
        if readable:
            self.before_claim()
        with self.server.lock:
            if self.state == RECLAIMED:
                return False
            self.state = BUSY
        return True

    def before_claim(self) -> None:
        """Called between "the next request is readable" and claiming it (a test seam)."""

    def pull(self) -> int:
        """Read what the socket has now (bytes, or NOTHING/EOF/FAILED), counted as received."""
        got, self.interest = receive(self.connection, self.rfile.buffer)
        if got > 0:
            self.rfile.received += got
        return got

    def begin_head(self) -> None:
        """A request's first bytes are buffered: its head has --header-timeout from now."""
        self.phase = HEAD
        self.timed_out = False
        self.head_started = now = time.monotonic()
        self.deadline = now + self.server.config.header_timeout

    def head_in(self) -> bool:
        """Is a whole head buffered (or enough for the parser to refuse it)?"""
        limits = self.server.limits
        return head_ready(self.rfile.buffer, limits.max_line, limits.max_header_bytes)

    def park(self) -> None:
        """Hand the connection back to the selector thread (``phase`` and ``deadline`` set)."""
        if self.tls and self.timeout_now != 0.0:
            self.connection.settimeout(0)  # TLS is read in non-blocking mode while parked
            self.timeout_now = 0.0
        self.server.engine.park(self)

    # --- running: a pool thread (blocking I/O) --------------------------------------

    def run(self) -> None:
        """Serve the requests whose heads are buffered; then park, close or hand on the connection."""
        self.serve_connection(True, None)

    def handle(self) -> None:
        self.run()

    def serve_connection(self, pooled: bool, request: Request | None) -> None:
        keep = False
        try:
            keep = self.serve(pooled, request)
        except Exception:
            self.server.handle_error(self.request, self.client_address)
        finally:
            if not keep:
                self.close()

    def serve(self, pooled: bool, request: Request | None) -> bool:
        """The request loop; True when the connection lives on (parked, or with its own thread).

        ``pooled``: running on a pool thread, which an upgrade request must
        not hold for the tunnel's life (it gets a thread of its own).
        """
        config = self.server.config
        try:
            self.set_client_timeout(config.keepalive_timeout)  # TLS: blocking again, with a timeout
        except OSError:
            return False
        if request is None and self.parked_request is not None:
            request, self.parked_request = self.parked_request, None
            if self.body_timed_out:
                self.send_error_response(408, "request body not received in time")
                self.log_request_done(request, 408, self.error_bytes, None, "cclb", "body_timeout",
                                      BODY_TIMEOUT)
                return False
        while True:
            if request is None:
                request = self.next_request()
                if request is None:
                    return False
                if self.wait_for_body(request):
                    return True
                if pooled and request.upgrade is not None and self.detach(request):
                    return True
            self.dispatch(request)
            request = None
            if self.close_connection:
                return False
            verdict = self.next_step()
            if verdict is Verdict.CLOSE:
                return False
            if verdict is Verdict.WAIT:
                return True
            if pooled and self.server.engine.queue_length():
                # Others wait for a thread: this connection's next request queues behind them.
                self.server.engine.submit(self)
                return True

    def next_step(self) -> Verdict:
        """After an answer: RUN if the next head is buffered already, else park (WAIT) or CLOSE.

        Pipelined requests already buffered are served without a trip
        through the selector; so is a request that is already there (one
        non-blocking read, while still BUSY, so no reclaim can cut it off).
        RUN does not jump the queue: when other connections wait for a
        thread, ``serve`` puts this one at the back of it.
        """
        if not self.rfile.buffer:
            if self.tls:
                self.connection.settimeout(0)
                self.timeout_now = 0.0
            got = self.pull()
            if got == NOTHING and self.linger():
                got = self.pull()
            if got == NOTHING:
                with self.server.lock:
                    if self.state == RECLAIMED:
                        return Verdict.CLOSE
                    self.state = IDLE
                self.phase = WAITING
                self.deadline = time.monotonic() + self.server.config.keepalive_timeout
                self.park()
                return Verdict.WAIT
            if got < 0:
                return Verdict.CLOSE
        self.begin_head()
        if self.head_in():
            return Verdict.RUN
        self.park()
        return Verdict.WAIT

    def linger(self) -> bool:
        """Wait LINGER seconds for the next request on this thread, if nobody waits for one.

        A client that sends its next request at once (a busy keep-alive
        client, a benchmark) then costs no trip through the selector thread:
        two thread wake-ups fewer per request, measured at about a third of
        the CPU per request with one connection.  Still BUSY meanwhile, so
        no reclaim can cut the request off.  True if something came.
        """
        if self.server.engine.queue_length():
            return False
        poller = self.poller
        if poller is None:
            poller = self.poller = select.poll()
            poller.register(self.fd, select.POLLIN)
        try:
            return bool(poller.poll(LINGER_MS))
        except (OSError, ValueError):
            return True  # closed meanwhile: the read says so

    def wait_for_body(self, request: Request) -> bool:
        """Park for a body that ``forward`` buffers anyway, if it is not all here yet.

        So a client sending its body slowly holds no pool thread; past
        --body-timeout of silence it gets its 408 all the same.
        """
        framing = request.framing
        if (framing.kind != "length" or framing.length > BUFFER_LIMIT or request.expect_continue
                or self.rfile.buffered >= framing.length or hasattr(self, f"do_{request.method}")):
            return False
        self.parked_request = request
        self.body_needed = framing.length
        self.body_timed_out = False
        self.phase = BODY
        self.deadline = time.monotonic() + self.server.config.body_timeout
        self.park()
        return True

    def detach(self, request: Request) -> bool:
        """Serve an upgrade request (a tunnel's whole life) on a thread of its own."""
        try:
            threading.Thread(target=self.serve_connection, args=(False, request),
                             name="cclb-tunnel", daemon=True).start()
        except RuntimeError:  # can't start a new thread: the pool thread serves it
            return False
        return True

    def close(self) -> None:
        """The connection's end: its last bytes counted, the socket closed, out of the table."""
        try:
            self.finish()
        finally:
            self.server.shutdown_request(self.connection)
            self.server.forget(self.connection)

    def finish(self) -> None:
        # Bytes no request accounted for (a head never completed, a connection idle-closed).
        received, sent = self.rfile.received - self.received_mark, self.wfile.sent - self.sent_mark
        if received or sent:
            self.server.cluster.frontend.count(None, 0, received, sent)
            self.received_mark, self.sent_mark = self.rfile.received, self.wfile.sent
        self.rfile.close()

    def reset_request_state(self) -> None:
        """Forget the previous request's accounting (attempts, timings, bytes)."""
        self.attempts: list[tuple[str, str | int]] = []  # (backend URL, outcome), in order
        self.upstream_connect: float | None = None  # seconds to get a backend connection
        self.upstream_header: float | None = None  # seconds from sending to the response head
        self.relayed_status = 0  # the backend's status, once its head went to the client
        self.error_bytes = 0  # body bytes of the answer cclb made itself
        self.consumed_mark = self.rfile.received - self.rfile.buffered  # where the request starts
        self.client = ""  # the real client address when it differs from the peer's (routing)
        self.routed: tuple[str | None, str | None] | None = None  # (route name, pool) for the log
        self.response_edit: tuple[HeaderRules, str | None, str | None] | None = None

    def set_client_timeout(self, seconds: float) -> None:
        """Change the client socket's kernel timeouts (only when it differs)."""
        if seconds != self.timeout_now:
            set_timeouts(self.connection, seconds)
            self.timeout_now = seconds

    # --- the request loop ---------------------------------------------------

    def handle_one_request(self) -> None:
        """Read one buffered request and dispatch it to ``do_<METHOD>`` (or ``forward``)."""
        request = self.next_request()
        if request is not None:
            self.dispatch(request)

    def next_request(self) -> Request | None:
        """The buffered request head, parsed and checked; None once answered or if the client left."""
        self.close_connection = True
        request = self.read_request()
        if request is None:
            return None
        self.close_connection = not request.keep_alive or self.server.draining
        self.command, self.path = request.method, request.shown_target
        self.request_version = f"HTTP/{request.version[0]}.{request.version[1]}"
        self.response_started = False
        self.body_pending = request.framing.has_body  # until a handler reads it
        self.continue_sent = False
        # Every answer carries it, cclb's own included (the client's valid one, else new).
        self.request_id = request_id_for(request.headers)
        return request

    def dispatch(self, request: Request) -> None:
        try:
            # http.server's idiom: do_<METHOD> where one exists, else forward.
            getattr(self, f"do_{request.method}", self.forward)(request)
        finally:
            self.first_request = False

    def read_request(self) -> Request | None:
        """Parse the buffered request head, or answer an error.

        The engine hands the connection over only with a whole head
        buffered, past its deadline (``timed_out``: the socket is shut for
        reading, so the parser sees the end and the answer is a 408), or at
        the end of the stream.  Returns None when the connection should
        close (client gone, or an error answered here).
        """
        if not self.rfile.buffer:
            return None
        self.started = self.head_started
        self.requestline = ""
        self.request_id = ""
        self.reset_request_state()
        try:
            return self.parse_head()
        except ProtocolError as error:
            status = 408 if self.timed_out else error.status
            message = "request head not received in time" if self.timed_out else error.message
            self.request_id = new_request_id()
            self.send_error_response(status, message)
            self.log_rejected(status)
        except OSError:
            if self.timed_out:
                self.request_id = new_request_id()
                self.send_error_response(408, "request head not received in time")
                self.log_rejected(408)
        return None  # the connection closes: its state no longer matters

    def parse_head(self) -> Request:
        """Parse and check a request head (RFC 9112 2-6); ProtocolError if bad."""
        limits = self.server.limits
        line = self.rfile.readline(limits.max_line + 3)
        if line == b"\r\n":  # RFC 9112 2.2: ignore an empty line before the request line
            line = self.rfile.readline(limits.max_line + 3)
        if self.timed_out and not line.endswith(b"\n"):
            raise ProtocolError(408, "timeout")  # a request line that never ended: nothing to log
        if len(line) > limits.max_line + 2:
            raise ProtocolError(414, "request line too long")
        self.requestline = line.rstrip(b"\r\n").decode("latin-1")
        request_line = http11.parse_request_line(line, limits.max_line)
        fields = read_field_lines(self.rfile, limits, for_response=False)
        if self.timed_out:
            raise ProtocolError(408, "timeout")
        return check_request_head(request_line, fields, self.server.config.max_body_size)

    # --- methods --------------------------------------------------------------

    def do_TRACE(self, request: Request) -> None:
        # TRACE would echo cookies and auth headers back (cross-site tracing).
        self.send_error_response(405, "TRACE is disabled", extra=[("Allow", TRACE_ALLOW)])
        self.log_request_done(request, 405, self.error_bytes, None, "cclb", "rejected",
                              reject_reason(405))

    def forward(self, request: Request) -> None:
        """Forward ``request`` to a backend, retrying where safe, and relay the answer."""
        routing = self.server.routing
        cluster = self.server.cluster
        client = self.client_ip
        sticky = None
        if routing is not None:
            routed = self.route(request, routing)
            if routed is None:
                return  # answered by cclb (redirect, respond, 403, 404, 429)
            request, cluster, sticky = routed
            client = self.client or client
        body: bytes | None = b""
        if request.framing.kind == "length" and request.framing.length <= BUFFER_LIMIT \
                and not request.expect_continue:
            try:
                self.set_client_timeout(self.server.config.body_timeout)
                body = read_small_body(self.rfile, request.framing.length)
                self.body_pending = False
            except TimeoutError:
                self.send_error_response(408, "request body not received in time")
                self.log_request_done(request, 408, self.error_bytes, None, "cclb", "body_timeout",
                                      BODY_TIMEOUT)
                return
            except (TruncatedBody, OSError):
                self.log_request_done(request, 400, 0, None, None, "client_closed")
                self.close_connection = True  # the client gave up mid-body
                return
        elif request.framing.has_body:
            body = None  # streamed: cannot be replayed
        head = upstream_request_head(request, self.client_ip, "https" if self.tls else "http",
                                     self.request_id)
        tried: list[Backend] = []
        last_error: BackendError | None = None
        truncated: tuple[Truncated, Backend] | None = None
        while True:
            attempt = cluster.acquire(client, tuple(tried), sticky)
            if attempt is None:
                if truncated is not None:
                    self.relay_truncated(request, *truncated)
                elif last_error is not None and last_error.sent:
                    # A backend took the request and failed: a gateway error.
                    self.send_error_response(502, BAD_GATEWAY)
                    cluster.count_unrouted(502)
                    self.log_request_done(request, 502, self.error_bytes, tried[-1], "cclb",
                                          TERMINATIONS.get(last_error.cause, "backend_error"))
                else:
                    self.answer_no_backend(request, last_error, cluster)
                return
            backend = attempt.backend
            with attempt:  # released exactly once, whatever happens below
                error = self.try_backend(request, attempt, head, body)
                if error is None:
                    return
                retry = http11.may_retry(request.method, error.sent, False, body is not None)
                # A dead idle connection says nothing of the backend.
                attempt.failed(None if error.stale else str(error), retried=retry)
            self.attempts.append((backend.url, error.cause))
            # The details are the operator's, never the client's (its body is fixed).
            backend_warnings.warn((backend.url, error.cause), "backend %s failed: %s (%s %s, "
                                  "request id %s; %s)", backend.url, error, request.method,
                                  request.shown_target[:200], self.request_id,
                                  "trying another backend" if retry else "answered 502")
            if error.truncated is not None:
                truncated = (error.truncated, backend)
            if not retry:
                self.send_error_response(502, BAD_GATEWAY)
                self.log_request_done(request, 502, self.error_bytes, backend, "cclb",
                                      TERMINATIONS.get(error.cause, "backend_error"))
                return
            tried.append(backend)
            last_error = error

    def route(self, request: Request, routing: Routing
              ) -> tuple[Request, ServerCluster, str | None] | None:
        """Apply the route table: the request to forward, its pool and sticky cookie value.

        None when cclb answered itself (redirect, respond, 403, 404, 429).
        The decision is ``routing.decide``'s (pure); the rate limit is the one
        stateful rule, taken here.
        """
        client = self.client_ip
        trusted = routing.trusted
        if trusted and client in trusted:
            client = real_client(client, request.headers.index.get("x-forwarded-for", ()), trusted)
        self.client = client
        decision = decide(request.method, request.target, request.host, request.headers, client,
                          routing.table)
        route = decision.route
        self.routed = (None if route is None else route.name,
                       None if isinstance(decision, Answer) else decision.pool)
        if isinstance(decision, Answer):
            if route is not None:
                routing.counters.count(route.name, decision.status)
            else:
                routing.front.count_unrouted(decision.status)
            self.answer(request, decision.status, decision.body, decision.location,
                        decision.refused, rules=None if route is None else route.response_headers)
            return None
        cluster = routing.pools[decision.pool]
        if route is not None:
            if route.rate is not None and routing.limiter is not None:
                wait = routing.limiter.take((route.name, client), route.rate, time.monotonic())
                if wait > 0:
                    self.routed = (route.name, None)
                    routing.counters.count(route.name, 429)
                    self.answer(request, 429, "too many requests, slow down", None, True,
                                retry_after=max(1, math.ceil(wait)))
                    return None
            routing.counters.count(route.name, 0)
            if route.request_headers or decision.target != request.target:
                request = replace(request, target=decision.target,
                                  headers=route.request_headers.apply(request.headers))
        sticky = None
        name = cluster.sticky_cookie
        if name is not None:
            sticky = cookie_value(request.headers, name)
        if name is not None or (route is not None and route.response_headers):
            self.response_edit = (route.response_headers if route is not None else HeaderRules(),
                                  name, sticky)
        return request, cluster, sticky

    def answer(self, request: Request, status: int, text: str, location: str | None,
               refused: bool, retry_after: int | None = None,
               rules: HeaderRules | None = None) -> None:
        """An answer a route makes (redirect, respond) or a refusal (403, 404, 429).

        The route's ``response_headers`` set/add fields go on a redirect or a
        configured response too (not on refusals).
        """
        extra = [("Location", location)] if location is not None else []
        if rules and not refused:
            extra.extend(rules.set)
            extra.extend(rules.add)
        if self.tls and self.server.config.hsts:
            extra.append(("Strict-Transport-Security", f"max-age={self.server.config.hsts}"))
        close = self.close_connection or self.body_pending or self.server.draining
        self.close_connection = close
        if location is not None and not text:
            text = f"see {location}"
        body = f"{text}\n".encode("utf-8") if text else b""
        data = error_response(status, body, close, retry_after, extra, self.request_id)
        if request.method == "HEAD":  # RFC 9110 9.3.2: the fields of a GET, no content
            data = data[:len(data) - len(body)]
        try:
            self.wfile.write(data)
            self.error_bytes = 0 if request.method == "HEAD" else len(body)
        except OSError:
            self.close_connection = True
        self.log_request_done(request, status, self.error_bytes, None, "cclb",
                              "rejected" if refused else "ok",
                              reject_reason(status) if refused else None)

    def relay_truncated(self, request: Request, truncated: Truncated, backend: Backend) -> None:
        """Send a response that was cut short and could not be retried, then close.

        Like nginx and HAProxy: when no other backend answered in its place,
        the client gets the message as it arrived, under its declared
        Content-Length, and the connection closes, so it can tell the
        message is incomplete (RFC 9112 8); never a complete-looking short 200.
        """
        self.close_connection = True
        try:
            self.write(truncated.message)
        except ClientError:
            pass
        self.log_request_done(request, truncated.status, truncated.body_bytes, backend,
                              termination="backend_truncated")

    def try_backend(self, request: Request, attempt: Attempt, head: bytes,
                    body: bytes | None) -> BackendError | None:
        """``exchange`` on one backend; None when it answered, else the failure.

        When a pooled connection turns out to have died while idle (not the
        backend's fault; its siblings probably died too), the request goes
        once more to the same backend on a fresh connection, if it may.
        """
        for last_try in (False, True):
            try:
                self.exchange(request, attempt, head, body)
                return None
            except BackendError as error:
                if last_try or not error.stale or not http11.may_retry(
                        request.method, error.sent, False, body is not None):
                    return error
                attempt.backend.pool.close_all()
        raise AssertionError("unreachable")

    def answer_no_backend(self, request: Request, last_error: BackendError | None,
                          cluster: ServerCluster) -> None:
        """A 503: no backend was available (or every one tried failed before taking it)."""
        if last_error is not None:
            message = ALL_FAILED
            termination = TERMINATIONS.get(last_error.cause, "backend_error")
        else:
            message = NO_BACKEND
            termination = "no_backend"
            backend_warnings.warn(("-", "no_backend"), "no backend available: answered 503 to "
                                  "%s %s (request id %s)", request.method,
                                  request.shown_target[:200], self.request_id)
        retry_after = max(1, int(self.server.config.health_interval or 1))
        self.send_error_response(503, message, retry_after=retry_after)
        cluster.count_unrouted(503)
        self.log_request_done(request, 503, self.error_bytes, None, "cclb", termination)

    def exchange(self, request: Request, attempt: Attempt, head: bytes, body: bytes | None) -> None:
        """One attempt on ``attempt.backend``: send, read the response head, relay it.

        Raises BackendError when the attempt failed in a way ``forward`` may
        retry (it then ends ``attempt``); everything else is answered and ended here.
        """
        backend = attempt.backend
        # --upstream-reuse safe: a client connection's first request gets a
        # backend connection no other client connection has used.
        own_only = self.first_request and self.server.config.upstream_reuse == "safe"
        begun = time.monotonic()
        try:
            conn, reused = backend.pool.acquire(self.token, own_only)
        except OSError as error:
            raise BackendError(describe_error(error), sent=False, cause=cause_of(error)) from None
        connected = time.monotonic()
        self.upstream_connect = connected - begun
        status = 0
        # This attempt's entry in the access log's "attempts", made before the
        # request is logged (in ``relay`` or ``fail``).
        attempts = self.attempts
        try:
            response = self.send_and_receive(request, conn, reused, head, body)
            self.upstream_header = time.monotonic() - connected
            status = response.status
            attempts.append((backend.url, status))
            if status == 101:  # only ever read for an upgrade request
                self.tunnel(request, response, conn, backend)  # closes conn
            else:
                self.relay(request, response, conn, backend, body is not None)  # pools or closes conn
        except BackendError:
            conn.close()
            if status:
                attempts.pop()  # forward() lists the failure's cause instead
            status = 0  # forward() releases the backend and decides on a retry
            raise
        except ClientError as error:
            conn.close()
            if error.status is None:
                termination, reason = "client_closed", None
            elif error.status == 408:
                termination, reason = "body_timeout", BODY_TIMEOUT
            else:
                termination, reason = "rejected", reject_reason(error.status)
            if not status:  # the client failed before the backend answered
                attempts.append((backend.url, "client_closed"))
            status = error.status or 499  # 499: the client went away (nginx's code)
            self.fail(request, backend, status, str(error), termination,
                      answer=error.status is not None, reason=reason)
        except TimeoutError:
            conn.close()
            if not status:  # else the entry is the status the backend sent before failing
                attempts.append((backend.url, "timeout"))
            status = 504
            backend_warnings.warn((backend.url, "timeout"), "backend %s did not answer in time "
                                  "(%s %s, request id %s; answered 504)", backend.url,
                                  request.method, request.shown_target[:200], self.request_id)
            self.fail(request, backend, 504, GATEWAY_TIMEOUT, "backend_timeout")
        except (ValueError, OSError, MalformedBody) as error:
            conn.close()
            cause = cause_of(error)
            if not status:
                attempts.append((backend.url, cause))
            status = 502
            backend_warnings.warn((backend.url, cause), "backend %s failed: %s (%s %s, request "
                                  "id %s; answered 502)", backend.url, describe_error(error),
                                  request.method, request.shown_target[:200], self.request_id)
            self.fail(request, backend, 502, BAD_GATEWAY, TERMINATIONS.get(cause, "backend_error"))
        except BaseException:
            conn.close()
            status = 500
            raise
        finally:
            if status:
                attempt.done(status, time.monotonic() - self.started)

    def fail(self, request: Request, backend: Backend | None, status: int, message: str,
             termination: str, answer: bool = True, reason: str | None = None) -> None:
        """End a request that failed; answer ``status`` if no response byte went out yet.

        ``message`` goes to the client: a fixed text, never internals.
        ``termination`` and ``reason`` (a refusal's) are for the access log and metrics.
        """
        if self.response_started or not answer:
            self.close_connection = True  # the client sees a cut-off message
            # What the client got, if anything, was the backend's (cut short).
            source = "backend" if self.relayed_status else None
            self.log_request_done(request, status, 0, backend, source, termination, reason,
                                  response_code=self.relayed_status)
        else:
            self.send_error_response(status, message)
            self.log_request_done(request, status, self.error_bytes, backend, "cclb",
                                  termination, reason)

    def send_and_receive(self, request: Request, conn: UpstreamConnection, reused: bool,
                         head: bytes, body: bytes | None) -> ResponseHead:
        """Send the request (streaming a large body) and read the response head."""
        if body is None and request.expect_continue and not self.continue_sent:
            # Only now that a backend is connected (RFC 9110 10.1.1), and once.
            self.continue_sent = True
            try:
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                raise ClientError(None, "client went away") from None
        sent = False
        limits = self.server.response_limits
        try:
            if body is not None:
                conn.send_all(head + body)
                sent = True
            else:
                conn.send_all(head)
                sent = True
                try:
                    self.stream_request_body(request, conn)
                except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
                    # The backend stopped reading the body: it may have answered
                    # early (413, 401...).  Relay that; the client's unread rest
                    # of the body means this connection must close afterwards.
                    self.close_connection = True
            # --read-timeout bounds the whole response head from here, not
            # each read: a backend dribbling its head gets no more time.
            reader = conn.reader
            reader.deadline = time.monotonic() + conn.read_timeout
            try:
                return read_response_head(reader, request.method, limits,
                                          upgrade=request.upgrade is not None)
            finally:
                reader.end_deadline()
        except EmptyResponse as error:
            raise BackendError(str(error), sent=sent, stale=reused, cause="closed") from None
        except IncompleteHead as error:
            raise BackendError(str(error), sent=sent, cause="closed") from None
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as error:
            # On a reused connection a reset most likely means the backend had
            # closed it while idle: not a sign the backend is down.
            raise BackendError(describe_error(error), sent=sent, stale=reused,
                               cause="reset") from None

    def stream_request_body(self, request: Request, conn: UpstreamConnection) -> None:
        """Copy a large or chunked request body from the client to the backend.

        It holds a pool thread, so it must keep coming: --min-body-rate over
        each window (``BodyRate``), besides --body-timeout of silence.
        """
        config = self.server.config
        if config.min_body_rate:
            window = min(BODY_RATE_WINDOW, config.body_timeout)
            self.set_client_timeout(window)
            self.rfile.floor = BodyRate(config.min_body_rate, window, self.rfile.received)
        else:
            self.set_client_timeout(config.body_timeout)
        try:
            self.stream_body_pieces(request, conn)
        finally:
            self.rfile.floor = None

    def stream_body_pieces(self, request: Request, conn: UpstreamConnection) -> None:
        chunked = request.framing.kind == "chunked"
        pieces = iter_body(self.rfile, request.framing, PIECE, self.server.config.max_body_size)
        while True:
            try:
                piece = next(pieces, None)
            except BodyTooLarge:
                raise ClientError(413, "request body too large") from None
            except MalformedBody:
                raise ClientError(400, "malformed request body") from None
            except TimeoutError:
                raise ClientError(408, "request body not received in time") from None
            except (TruncatedBody, OSError):
                raise ClientError(None, "client closed while sending the body") from None
            if piece is None:
                break
            conn.send_all(http11.chunk(piece) if chunked else piece)
        if chunked:
            conn.send_all(http11.LAST_CHUNK)
        self.body_pending = False

    # --- the response ---------------------------------------------------------

    def relay(self, request: Request, response: ResponseHead, conn: UpstreamConnection,
              backend: Backend, replayable: bool) -> None:
        """Send the backend's response to the client; pool or close ``conn``.

        Raises BackendError if the backend broke off before anything reached
        the client and the request may be retried (``replayable``: its body,
        if any, is still held).
        """
        config = self.server.config
        if self.response_edit is not None:
            response = self.edit_response(response, backend)
        # Draining (SIGTERM) may have begun since the request arrived: close after this one.
        plan = response_plan(request, response, self.request_id, config.gzip_level,
                             config.gzip_min_size, self.close_connection or self.server.draining,
                             BUFFER_LIMIT)
        if self.tls and config.hsts:
            hsts = ("Strict-Transport-Security", f"max-age={config.hsts}")
            for headers in {id(plan.headers): plan.headers,
                            id(plan.identity_headers): plan.identity_headers}.values():
                headers.append(hsts)  # RFC 6797 7.1: sent over secure transport only
        self.close_connection = plan.close
        self.relayed_status = response.status
        sent = 0
        try:
            if plan.body == NO_BODY:
                self.write(plan.head())
            elif plan.body == BUFFERED:
                length = response.framing.length
                try:
                    data = read_small_body(conn.reader, length)
                except TruncatedBody as error:
                    message = plan.identity_head(length) + error.partial
                    if http11.may_retry(request.method, True, False, replayable):
                        # Nothing reached the client yet: try another backend;
                        # ``forward`` relays this message if none answers.
                        conn.close()
                        raise BackendError(str(error), sent=True, cause="truncated", truncated=Truncated(
                            message, response.status, len(error.partial))) from None
                    # What arrived, under the declared length, then a close:
                    # the client sees an incomplete message, never a short 200.
                    sent = len(error.partial)
                    self.write(message)
                    raise
                if plan.gzip:
                    data = http11.gzip_compress(data, config.gzip_level)
                self.write(plan.head(len(data)) + data)
                sent = len(data)
            else:
                sent = self.stream_response(plan, response, conn, config.gzip_level)
        except TruncatedBody:
            # The client must see an incomplete message, never a short 200.
            self.close_connection = True
            conn.close()
            self.log_request_done(request, response.status, sent, backend,
                                  termination="backend_truncated")
            return
        if response.reusable and not conn.has_leftover_bytes():
            backend.pool.release(conn)
        else:
            conn.close()
        self.log_request_done(request, response.status, sent, backend)

    def edit_response(self, response: ResponseHead, backend: Backend) -> ResponseHead:
        """The route's response header rules, and the sticky cookie when it must be (re)set."""
        assert self.response_edit is not None
        rules, cookie, sent = self.response_edit
        headers = rules.apply(response.headers) if rules else response.headers
        if cookie is not None and sent != backend.cookie:
            if headers is response.headers:
                headers = Fields(headers.items)
            headers.add(*set_cookie(cookie, backend.cookie))
        return replace(response, headers=headers)

    def tunnel(self, request: Request, response: ResponseHead, conn: UpstreamConnection,
               backend: Backend) -> None:
        """Relay a ``101 Switching Protocols``, then bytes both ways until the tunnel ends.

        RFC 9110 7.8: after the 101 both connections speak the new protocol,
        so cclb only copies bytes (``tunnel.Tunnel``: half-close passed on,
        ``--tunnel-idle-timeout``, stopped by a drain).  Bytes already read
        past either head belong to the tunnel and go first.  The client
        connection keeps its handler (and its place under --max-connections)
        and closes afterwards; ``conn`` never returns to the pool.  One
        access-log line when it ends: status 101, bytes sent to the client.
        """
        config = self.server.config
        self.close_connection = True  # never HTTP again on this connection
        extra = [("Strict-Transport-Security", f"max-age={config.hsts}")] if self.tls and config.hsts else []
        head = switching_protocols_head(response, self.request_id, extra)  # ValueError: 502
        self.relayed_status = 101
        self.write(head)
        # What the client sent after its request head, what the backend sent after its 101
        # (read() of what is buffered takes it without a system call).
        to_backend = self.rfile.read(self.rfile.buffered)
        to_client = conn.reader.read(conn.reader.buffered)
        tunnel = Tunnel(self.connection, conn.sock, config.tunnel_idle_timeout, TUNNELS.counters,
                        to_backend, to_client)
        self.server.add_tunnel(tunnel)
        TUNNELS.opened()
        try:
            result = tunnel.run()  # never raises for socket or TLS failures
        finally:
            TUNNELS.closed()
            self.server.remove_tunnel(tunnel)
            conn.close()
        log.debug("tunnel %s %s <-> %s ended (%s%s) after %.1fs: %d bytes up, %d down",
                  self.request_id, self.client_ip, backend.url, result.end.value,
                  f": {result.error}" if result.error else "", result.duration,
                  result.client_to_backend, result.backend_to_client)
        self.log_request_done(request, 101, result.backend_to_client, backend)

    def stream_response(self, plan: ResponsePlan, response: ResponseHead,
                        conn: UpstreamConnection, gzip_level: int) -> int:
        """Relay a large or unknown-length body in bounded pieces, as ``plan`` says; bytes sent."""
        compressor = http11.gzip_stream(gzip_level) if plan.gzip else None
        chunked = plan.chunked
        self.write(plan.head())
        sent = 0
        for piece in iter_body(conn.reader, response.framing, PIECE):
            if compressor is not None:
                piece = compressor.compress(piece)
                if conn.reader.buffered < 64:
                    # Little or nothing more at hand (maybe just the chunk's CRLF):
                    # flush, so a slow stream is not held back by the compressor.
                    piece += compressor.flush(zlib.Z_SYNC_FLUSH)
                if not piece:
                    continue
            self.write(http11.chunk(piece) if chunked else piece)
            sent += len(piece)
        tail = compressor.flush() if compressor is not None else b""
        if chunked:
            self.write((http11.chunk(tail) if tail else b"") + http11.LAST_CHUNK)
        elif tail:
            self.write(tail)
        sent += len(tail)
        return sent

    def write(self, data: bytes) -> None:
        """Send bytes to the client; ClientError if it has gone away."""
        self.response_started = True
        try:
            self.wfile.write(data)
        except OSError:
            raise ClientError(None, "client went away") from None

    # --- answers generated by cclb -------------------------------------------

    def send_error_response(self, status: int, message: str, retry_after: int | None = None,
                            extra: Sequence[tuple[str, str]] = ()) -> None:
        """Answer with a short plain-text error; errors on a bad request close the connection."""
        # After a malformed request, or with its body still unread, the rest of
        # the stream cannot be trusted as the start of a next request.
        close = (self.close_connection or self.body_pending or self.server.draining
                 or error_closes_connection(status))
        if close:
            self.close_connection = True
        if self.tls and self.server.config.hsts:
            extra = [*extra, ("Strict-Transport-Security", f"max-age={self.server.config.hsts}")]
        if not self.request_id:
            self.request_id = new_request_id()
        body = error_body(message, self.request_id)
        try:
            self.wfile.write(error_response(status, body, close, retry_after, extra,
                                            self.request_id))
            self.error_bytes = len(body)
        except OSError:
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """BaseHTTPRequestHandler's error path, routed to our plain answers."""
        self.close_connection = True
        self.send_error_response(code, message or HTTPStatus(code).phrase)

    def count(self, source: str | None, status: int, reason: str | None) -> None:
        """Count the request's answer and the client bytes since the previous count."""
        received, sent = self.rfile.received, self.wfile.sent
        self.server.cluster.frontend.count(source, status, received - self.received_mark,
                                           sent - self.sent_mark, reason)
        self.received_mark, self.sent_mark = received, sent

    def log_request_done(self, request: Request, status: int, sent: int,
                         backend: Backend | None, source: str | None = "backend",
                         termination: str = "ok", reason: str | None = None,
                         response_code: int = 0) -> None:
        """Count and access-log a finished request.

        ``sent``: body bytes sent (a relayed body, or cclb's own answer's);
        ``source``: who made the answer the client got ("cclb", "backend",
        None when none went out), counted with ``response_code`` (else
        ``status``); ``reason``: why cclb refused it, if it did.
        """
        self.count(source, response_code or status, reason)
        access_log = self.server.access_log
        details = None
        if access_log.json and access_log.stream is not None:
            details = self.log_details(request, termination)
        access_log.record(
            self.client or self.client_ip, request.method, request.shown_target, status, sent,
            backend.url if backend else "-", time.monotonic() - self.started, self.request_id,
            details)

    def log_details(self, request: Request | None, termination: str) -> dict[str, Any]:
        """The JSON access log's fields beyond the base ones (see README "Logs")."""
        headers = request.headers if request is not None else None
        connect, header = self.upstream_connect, self.upstream_header
        if request is not None:
            protocol: str | None = self.request_version
        else:
            version = self.requestline.rpartition(" ")[2]
            protocol = sanitize(version[:16]) if version.startswith("HTTP/") else None
        return {
            "host": request.host if request is not None else None,
            "protocol": protocol,
            "scheme": "https" if self.tls else "http",
            "request_bytes": self.rfile.received - self.rfile.buffered - self.consumed_mark,
            "user_agent": headers.get("user-agent") if headers is not None else None,
            "referer": headers.get("referer") if headers is not None else None,
            "upstream_connect_ms": None if connect is None else round(connect * 1000, 2),
            "upstream_header_ms": None if header is None else round(header * 1000, 2),
            "attempts": [{"backend": url, "outcome": outcome} for url, outcome in self.attempts],
            "termination": termination,
            **({} if self.routed is None else {"route": self.routed[0], "pool": self.routed[1]}),
        }

    def log_rejected(self, status: int) -> None:
        """Count and access-log a request refused before it was understood."""
        self.count("cclb", status, reject_reason(status))
        access_log = self.server.access_log
        details = None
        if access_log.json and access_log.stream is not None:
            details = self.log_details(None, "header_timeout" if status == 408 else "rejected")
        method, _, rest = self.requestline.partition(" ")
        target = rest.rpartition(" ")[0] or rest
        access_log.record(self.client_ip, sanitize(method[:16]) or "-",
                          sanitize(target[:200]) or "-", status, self.error_bytes, "-",
                          time.monotonic() - self.started, self.request_id, details)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)

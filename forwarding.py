"""The proxy's decisions about one request/response pair, as pure functions.

``http11`` holds the generic HTTP/1.1 message rules; this module applies them
to what cclb does as a gateway: which request heads it accepts
(``check_request_head``), the head it sends to a backend
(``upstream_request_head``, ``request_id_for``) and how a backend's response
goes out to this client (``response_plan``).  No sockets, no clocks:
``proxy.ProxyHandler`` reads, calls these, and writes what they say.
Section numbers refer to RFC 9110 (semantics) and RFC 9112 (HTTP/1.1).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Collection, NamedTuple, Sequence

from http11 import (HOP_BY_HOP, BodyFraming, Fields, Headers, ProtocolError, RequestLine,
                    connection_options, content_length, field_values, gzip_headers,
                    request_framing, should_gzip, split_absolute_form, valid_host,
                    valid_request_id, wants_keep_alive, without_fields)
from message_reader import ResponseHead

# Methods cclb answers itself instead of forwarding (see ``ProxyHandler``).
TRACE_ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

# After one of these errors the rest of the stream cannot be trusted as the
# start of a next request (a malformed or unread request), so the answer closes.
CLOSING_ERRORS = frozenset({400, 408, 413, 414, 417, 431, 501, 505})


@dataclass(slots=True)
class Request:
    """A request head that passed ``check_request_head``."""

    method: str
    target: str  # as forwarded: origin-form (or "*")
    shown_target: str  # as received, for the access log
    version: tuple[int, int]
    headers: Fields
    framing: BodyFraming
    has_length_field: bool
    host: str | None  # the authority (Host, or the absolute-form target's); None if absent (1.0)
    keep_alive: bool  # what the client asked for (RFC 9112 9.3)
    expect_continue: bool  # answer 100 Continue before reading the body
    # The protocols of an Upgrade request to pass on (RFC 9110 7.8), as the
    # Upgrade value to forward; None for an ordinary request.
    upgrade: str | None = None


def check_request_head(request_line: RequestLine, fields: Fields, max_body_size: int) -> Request:
    """Check a parsed request head against what cclb accepts; the ``Request`` to forward.

    Raises ProtocolError with the status the client gets: 400 (Host count or
    syntax, bad framing, bad absolute-form), 405 (CONNECT), 413 (declared
    body over ``max_body_size``), 417 (an Expect other than 100-continue),
    501 (unsupported transfer coding).  ``Request.upgrade`` says whether the
    request asks to switch protocols (``upgrade_protocols``).
    """
    version = request_line.version
    method = request_line.method
    hosts = fields.index.get("host", ())
    # RFC 9112 3.2: a 1.1 request has exactly one Host; more is a 400 in any version.
    if len(hosts) > 1 or (version >= (1, 1) and not hosts):
        raise ProtocolError(400, "exactly one Host header is required")
    if hosts and not valid_host(hosts[0]):
        raise ProtocolError(400, "malformed Host header")
    if method == "CONNECT":  # RFC 9110 9.3.6: a tunnel, which a load balancer does not offer
        raise ProtocolError(405, "CONNECT is not supported by a load balancer")
    framing = request_framing(fields, version)
    if framing.kind == "length" and framing.length > max_body_size:
        raise ProtocolError(413, "request body too large")
    target, host = request_line.target, (hosts[0] if hosts else None)
    if not target.startswith("/") and target != "*":
        # RFC 9112 3.2.2: absolute-form; its authority replaces Host.
        host, target = split_absolute_form(target)
        fields = Fields([(n, v) for n, v in fields if n.lower() != "host"] + [("Host", host)])
    expect = fields.get("expect")
    expect_continue = False
    if expect is not None and version >= (1, 1):  # RFC 9110 10.1.1: ignored in 1.0
        if expect.lower() != "100-continue":
            raise ProtocolError(417, "only Expect: 100-continue is supported")
        expect_continue = framing.has_body
    options = connection_options(fields)
    keep_alive = wants_keep_alive(version, options)
    has_length = "content-length" in fields.index
    return Request(method, target, request_line.target, version, fields, framing,
                   has_length, host, keep_alive, expect_continue,
                   upgrade_protocols(version, options, fields))


# Upgrade tokens never passed on.  h2c (RFC 7540 3.2) would switch the backend
# connection to HTTP/2, which cclb does not speak; RFC 9113 3.1 deprecates it anyway.
REFUSED_UPGRADES = frozenset({"h2c"})


def upgrade_protocols(version: tuple[int, int], options: Collection[str], fields: Fields) -> str | None:
    """The Upgrade value to forward for a request, or None if it asks for no (allowed) upgrade.

    RFC 9110 7.8: an upgrade request carries ``Upgrade`` *and* names it in
    ``Connection`` (otherwise the field is a stray hop-by-hop field, dropped);
    a server MUST ignore Upgrade in an HTTP/1.0 request.  Protocols in
    ``REFUSED_UPGRADES`` are removed; if none is left, no upgrade.
    """
    if version < (1, 1) or "upgrade" not in options:
        return None
    protocols = [token.strip() for value in fields.index.get("upgrade", ())
                 for token in value.split(",") if token.strip()]
    kept = [protocol for protocol in protocols
            if protocol.partition("/")[0].strip().lower() not in REFUSED_UPGRADES]
    return ", ".join(kept) if kept else None


def error_closes_connection(status: int) -> bool:
    """Whether cclb's own error answer with ``status`` must close the connection."""
    return status in CLOSING_ERRORS


# --- the request head sent upstream -------------------------------------------

def request_id_for(fields: Fields) -> str:
    """The request's id: the client's X-Request-ID if valid, else a new random one.

    It is forwarded, returned to the client and logged.
    """
    value = fields.get("x-request-id")
    if value is not None and valid_request_id(value):
        return value
    return f"{random.getrandbits(64):016x}"


def new_request_id() -> str:
    """A fresh request id (16 hex digits), for answers to requests that could not be read."""
    return f"{random.getrandbits(64):016x}"


# Never forwarded as received: hop-by-hop fields (RFC 9110 7.6.1), the framing
# and Expect (cclb re-frames the body and answers 100 Continue itself) and the
# X-Forwarded-* fields that cclb rewrites.
_UPSTREAM_DROP = HOP_BY_HOP | {"content-length", "expect", "x-forwarded-for",
                               "x-forwarded-proto", "x-forwarded-host"}
_UPSTREAM_DROP_WITH_ID = _UPSTREAM_DROP | {"x-request-id"}


def upstream_request_head(request: Request, client_ip: str, proto: str, request_id: str) -> bytes:
    """The request head as sent to a backend.

    Hop-by-hop fields and every field named in Connection are removed
    (except ``Connection: upgrade`` and ``Upgrade`` for an upgrade request,
    ``Request.upgrade``); Host
    is always present; X-Request-ID carries ``request_id`` (the client's
    fields are kept when it is theirs); X-Forwarded-For appends
    ``client_ip`` to the client's chain, X-Forwarded-Proto/-Host are set;
    the framing field matches the body as it will be sent.
    """
    fields = request.headers
    own_id = request_id == fields.get("x-request-id")
    headers, named = without_fields(fields, _UPSTREAM_DROP if own_id else _UPSTREAM_DROP_WITH_ID)
    if request.host is None or "host" in named:
        # RFC 9112 3.2: a 1.1 request always has Host (empty if unknown);
        # and Connection: host must not strip it.
        headers.insert(0, ("Host", request.host or ""))
    if not own_id:
        headers.append(("X-Request-ID", request_id))
    # De facto standard (cf. RFC 7239): the chain grows by the address we saw.
    chain = () if "x-forwarded-for" in named else fields.index.get("x-forwarded-for", ())
    headers.append(("X-Forwarded-For", ", ".join([*chain, client_ip]) if chain else client_ip))
    headers.append(("X-Forwarded-Proto", proto))
    if request.host:
        headers.append(("X-Forwarded-Host", request.host))
    framing = request.framing
    if framing.kind == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
    elif framing.kind == "length" or request.has_length_field:
        headers.append(("Content-Length", str(framing.length)))
    if request.upgrade is not None:
        # RFC 9110 7.8: the one hop-by-hop pair a gateway passes on, so that the
        # backend can switch protocols (the tunnel then spans both hops).
        headers.append(("Connection", "upgrade"))
        headers.append(("Upgrade", request.upgrade))
    return _serialize(f"{request.method} {request.target} HTTP/1.1", headers, None)


# --- how a response goes out ----------------------------------------------------

def switching_protocols_head(response: ResponseHead, request_id: str,
                             extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """The ``101 Switching Protocols`` head sent to the client before a tunnel starts.

    The backend's fields minus hop-by-hop ones (and those its Connection
    names), plus X-Request-ID, ``extra`` (HSTS), ``Connection: upgrade`` and
    the backend's ``Upgrade`` (RFC 9110 7.8: the protocol the connection
    switches to).  A 101 without Upgrade breaks RFC 9110 15.2.2 ("MUST
    generate an Upgrade header field"): ValueError, the proxy answers 502.
    """
    upgrade = ", ".join(value for value in field_values(response.headers, "upgrade") if value)
    if not upgrade:
        raise ValueError("backend switched protocols without an Upgrade header")
    headers, _ = without_fields(response.headers, _RESPONSE_DROP)
    headers.append(("X-Request-ID", request_id))
    headers.extend(extra)
    headers.append(("Connection", "upgrade"))
    headers.append(("Upgrade", upgrade))
    return _serialize(f"HTTP/1.1 101 {response.reason or 'Switching Protocols'}", headers, None)


NO_BODY, BUFFERED, STREAMED = "none", "buffered", "streamed"

# Recomputed by cclb: the framing and the request id.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "x-request-id"}


class ResponsePlan(NamedTuple):
    """How one backend response goes out to the client (immutable).

    A NamedTuple rather than a frozen dataclass: built once per response,
    and a frozen dataclass's ``__init__`` costs three times as much.

    ``headers`` are the fields to send, final except for a buffered body's
    Content-Length, which ``head`` adds once the (maybe gzipped) length is
    known.  ``identity_headers`` are the fields of a buffered body sent as
    received (the same list unless gzipping).
    """

    status_line: str
    headers: Headers
    body: str  # NO_BODY, BUFFERED (read whole, one write) or STREAMED (in pieces)
    gzip: bool
    chunked: bool  # a streamed body re-framed with the chunked coding
    close: bool  # the client connection must close after this response
    identity_headers: Headers

    def head(self, content_length: int | None = None) -> bytes:
        """The serialized head, with Content-Length when given."""
        return _serialize(self.status_line, self.headers, content_length)

    def identity_head(self, content_length: int) -> bytes:
        """The head for a buffered body sent as received (ungzipped)."""
        return _serialize(self.status_line, self.identity_headers, content_length)


def response_plan(request: Request, response: ResponseHead, request_id: str, gzip_level: int,
                  gzip_min_size: int, close_connection: bool, buffer_limit: int) -> ResponsePlan:
    """Decide how a backend's ``response`` to ``request`` reaches the client.

    ``close_connection``: the client connection closes after this response
    anyway (the client asked, or cclb is draining).  Bodies of known length
    up to ``buffer_limit`` are buffered, others streamed.  cclb answers as
    HTTP/1.1 whatever the backend's version.
    """
    status, fields, framing = response.status, response.headers, response.framing
    headers, named = without_fields(fields, _RESPONSE_DROP)
    headers.append(("X-Request-ID", request_id))
    kind = framing.kind
    known = kind == "length"
    if kind == "none":
        body = NO_BODY
    elif known and framing.length <= buffer_limit:
        body = BUFFERED
    else:
        body = STREAMED
    accept_encoding = request.headers.get("accept-encoding")
    gzip = body != NO_BODY and gzip_level > 0 and should_gzip(
        request.method, status, fields, accept_encoding,
        framing.length if known else None, gzip_min_size, named)
    client_11 = request.version >= (1, 1)
    close = close_connection
    if not client_11 and body == STREAMED and (gzip or not known):
        # RFC 9112 6.1: no Transfer-Encoding to a 1.0 client, and there is no
        # length to announce: the body ends with the connection.
        close = True
    if close:
        headers.append(("Connection", "close"))
    elif not client_11:
        headers.append(("Connection", "keep-alive"))  # RFC 9112 9.3: 1.0 keep-alive is opt-in
    identity = headers
    chunked = False
    if body == NO_BODY:
        headers = _bodiless_headers(request.method, status, fields, headers, accept_encoding,
                                    gzip_level, gzip_min_size, named)
        identity = headers
    elif gzip:
        headers = gzip_headers(headers)
        if body == STREAMED:
            chunked = client_11
            if chunked:
                headers.append(("Transfer-Encoding", "chunked"))
            identity = headers
    elif body == STREAMED:
        chunked = client_11 and not known
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        elif known:
            headers.append(("Content-Length", str(framing.length)))
    return ResponsePlan(f"HTTP/1.1 {status} {response.reason}", headers, body, gzip, chunked, close,
                        identity)


def _bodiless_headers(method: str, status: int, fields: Fields, headers: Headers,
                      accept_encoding: str | None, gzip_level: int, gzip_min_size: int,
                      ignored: Collection[str]) -> Headers:
    """Fields of a HEAD, 304 or 1xx/204 answer, consistent with the GET/200 we would gzip.

    RFC 9110 9.3.2: HEAD gets the fields GET would get; 15.4.5: a 304 carries
    the validators and Vary the 200 would have had.  RFC 9110 8.6: a 204
    has no Content-Length to pass on.
    """
    if status == 204:
        return headers
    # Already checked by http11.response_framing: a bad value never gets here.
    length = content_length(field_values(fields, "content-length"))
    if gzip_level > 0 and should_gzip("GET", 200, fields, accept_encoding, length,
                                      gzip_min_size, ignored):
        if method == "HEAD":
            return gzip_headers(headers)  # compressed length unknown: no Content-Length
        return gzip_headers(headers, encoded=False)
    if length is not None:
        headers.append(("Content-Length", str(length)))
    return headers


def _serialize(start_line: str, headers: Headers, content_length: int | None) -> bytes:
    """Start line, fields and an optional Content-Length as one head (RFC 9112 2.1)."""
    lines = [start_line]
    lines.extend([f"{name}: {value}" for name, value in headers])
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")

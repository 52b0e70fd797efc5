"""HTTP/1.1 message rules for cclb, as pure functions (no sockets, no I/O).

The generic rules live here: is the request line well formed, which headers
are hop-by-hop, how long is a body, may a connection be reused, may a failed
request be retried, should a response be gzipped.  ``forwarding`` applies them
to one request/response pair as cclb forwards it (what is accepted, the head
sent upstream, how the response goes out).  The socket code in ``proxy.py``,
``message_reader.py`` and ``upstream.py`` only moves bytes and asks these
functions.

Headers are handled as a list of ``(name, value)`` string pairs decoded as
ISO-8859-1 (which maps bytes 1:1, so nothing is lost on re-encoding), in the
order received.  Section numbers refer to RFC 9110 (semantics) and RFC 9112
(HTTP/1.1 message syntax).
"""

from __future__ import annotations

import re
import zlib
from urllib.parse import urlsplit
from dataclasses import dataclass
from typing import Collection, Iterable, Iterator, Sequence

Headers = list[tuple[str, str]]


class ProtocolError(Exception):
    """A message that cannot be accepted; ``status`` is what the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- Tokens and field syntax ---------------------------------------------
# RFC 9110 5.6.2: token = 1*tchar; a field name and a method are tokens.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 5.5: field-value = *(VCHAR / SP / HTAB / obs-text); no CR, LF or NUL
# and no other control character.
_BAD_VALUE_CHAR = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 2.3: HTTP-version = "HTTP/" DIGIT "." DIGIT
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
# RFC 9112 3.2: the request-target contains no whitespace or control characters.
_BAD_TARGET_CHAR = re.compile(rb"[\x00-\x20\x7f-\xff]")
_DIGITS = re.compile(r"[0-9]+")
# RFC 9110 7.2 / RFC 3986 3.2: Host = uri-host [ ":" port ]
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(:[0-9]*)?")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})

# RFC 9110 7.6.1: fields a proxy must not forward, plus the ones every proxy
# knows to be connection-specific (Proxy-Connection, Keep-Alive).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade",
})


@dataclass(slots=True)
class RequestLine:
    method: str
    target: str
    version: tuple[int, int]


@dataclass(slots=True)
class BodyFraming:
    """How a message body is delimited (RFC 9112 6.3)."""

    kind: str  # "none", "length", "chunked" or "close"
    length: int = 0

    @property
    def has_body(self) -> bool:
        return self.kind != "none" and not (self.kind == "length" and self.length == 0)


NO_BODY = BodyFraming("none")


class Fields:
    """Header fields in received order, with their lower-case names.

    ``items`` keeps names as received (they are forwarded as they came);
    ``index`` maps each lower-case name to its values, so the proxy's many
    lookups (Host, Content-Length, Connection...) cost one dict access each.
    """

    __slots__ = ("items", "lnames", "index")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self.items: Headers = []
        self.lnames: list[str] = []
        self.index: dict[str, list[str]] = {}
        for name, value in items:
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        lname = name.lower()
        self.items.append((name, value))
        self.lnames.append(lname)
        values = self.index.get(lname)
        if values is None:
            self.index[lname] = [value]
        else:
            values.append(value)

    def replace_last_value(self, value: str) -> None:
        name, old = self.items[-1]
        self.items[-1] = (name, value)
        values = self.index[self.lnames[-1]]
        values[-1] = value

    def get(self, lname: str) -> str | None:
        values = self.index.get(lname)
        return values[0] if values else None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Fields):
            return self.items == other.items
        return isinstance(other, list) and self.items == other

    def __repr__(self) -> str:
        return f"Fields({self.items!r})"


def as_fields(headers: Fields | Iterable[tuple[str, str]]) -> Fields:
    return headers if isinstance(headers, Fields) else Fields(headers)


# --- Request line and header section ------------------------------------

def parse_request_line(line: bytes, max_target: int) -> RequestLine:
    """Parse ``method SP target SP version CRLF`` strictly (RFC 9112 3).

    Raises ProtocolError: 400 for anything malformed, 414 for a target longer
    than ``max_target``, 505 for a well-formed version other than 1.0/1.1.
    """
    if not line.endswith(b"\r\n"):
        raise ProtocolError(400, "request line must end with CRLF")
    parts = line[:-2].split(b" ")
    if len(parts) != 3:
        if len(parts) > 3 and len(line) > max_target:
            raise ProtocolError(414, "request target too long")
        raise ProtocolError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise ProtocolError(400, "malformed method")
    if len(target) > max_target:
        raise ProtocolError(414, "request target too long")
    if not target or _BAD_TARGET_CHAR.search(target):
        raise ProtocolError(400, "malformed request target")
    match = _VERSION.fullmatch(version)
    if not match:
        raise ProtocolError(400, "malformed HTTP version")
    numbers = (int(match[1]), int(match[2]))
    if numbers not in ((1, 1), (1, 0)):
        raise ProtocolError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    method_text = method.decode("ascii")
    target_text = target.decode("latin-1")
    # RFC 9112 3.2: origin-form, absolute-form, authority-form (CONNECT only)
    # and asterisk-form (OPTIONS only).
    if target_text == "*":
        if method_text != "OPTIONS":
            raise ProtocolError(400, "asterisk-form is only valid for OPTIONS")
    elif not target_text.startswith("/") and method_text != "CONNECT":
        if not target_text.lower().startswith(("http://", "https://")):
            raise ProtocolError(400, "malformed request target")
    return RequestLine(method_text, target_text, numbers)


# One regex does the whole job for a valid line: name, colon, OWS, value, OWS, CRLF.
# (Trailing OWS is stripped after the match: a lazy pattern would backtrack.)
_FIELD_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)\r\n")


def parse_field_line(line: bytes) -> tuple[str, str]:
    """Parse one ``name: value CRLF`` field line strictly (RFC 9112 5).

    Rejects obs-fold (5.2), whitespace before the colon (5.1), invalid name
    characters and CR/LF/NUL or other controls in the value (RFC 9110 5.5).
    """
    match = _FIELD_LINE.fullmatch(line)
    if match is None:
        raise ProtocolError(400, _field_line_problem(line))
    return match[1].decode("ascii"), match[2].rstrip(b" \t").decode("latin-1")


def _field_line_problem(line: bytes) -> str:
    """Why ``line`` is not a valid field line (the slow path, for the message)."""
    if not line.endswith(b"\r\n"):
        return "header line must end with CRLF"
    if line[:1] in (b" ", b"\t"):
        return "obsolete line folding is not accepted"
    name, colon, _ = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        return "malformed header field name"
    return "invalid character in header field value"


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def valid_request_id(value: str | None) -> bool:
    """Whether a client's X-Request-ID is safe to keep, forward and log."""
    return value is not None and _REQUEST_ID.fullmatch(value) is not None


def split_absolute_form(target: str) -> tuple[str, str]:
    """(authority, origin-form target) of an absolute-form target (RFC 9112 3.2.2).

    ProtocolError 400 for a malformed one, one with userinfo, or no host.
    """
    try:
        parts = urlsplit(target)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ProtocolError(400, "malformed absolute-form request target") from None
    if not parts.hostname or "@" in parts.netloc or not valid_host(parts.netloc):
        raise ProtocolError(400, "absolute-form target needs a valid host and no userinfo")
    path = parts.path or "/"
    return parts.netloc, path + (f"?{parts.query}" if parts.query else "")


def valid_host(value: str) -> bool:
    """Whether a Host field value is a syntactically valid authority."""
    return _HOST.fullmatch(value) is not None


def field_values(headers: Fields | Headers, lname: str) -> list[str]:
    """All comma-separated list elements of field ``lname`` (lower case)."""
    values = as_fields(headers).index.get(lname)
    if not values:
        return []
    return [part.strip() for value in values for part in value.split(",")]


def get_field(headers: Fields | Headers, lname: str) -> str | None:
    """The value of the first field named ``lname`` (lower case), or None."""
    return as_fields(headers).get(lname)


def content_length(values: Sequence[str]) -> int | None:
    """Interpret the Content-Length elements of one message.

    RFC 9112 6.3 (5): a list of identical valid values may be merged; a
    differing or malformed value makes the framing invalid (ValueError).
    """
    if not values:
        return None
    first = values[0]
    for value in values:
        # 1*DIGIT only: "+5", "0x10", "-1", "" and "1 2" are all rejected.
        if value != first or not _DIGITS.fullmatch(value) or len(value) > 18:
            raise ValueError("invalid Content-Length")
    return int(first)


def transfer_codings(headers: Fields | Headers) -> list[str]:
    return [coding.lower() for coding in field_values(headers, "transfer-encoding")]


def request_framing(headers: Fields | Headers, version: tuple[int, int]) -> BodyFraming:
    """Decide how the request body is delimited, or raise ProtocolError.

    RFC 9112 6.1: a request with both Content-Length and Transfer-Encoding is
    a smuggling attempt; we reject it (400) rather than guess.  RFC 9112 6.3:
    Transfer-Encoding whose final coding is not chunked is a 400; codings we
    do not implement are a 501 (RFC 9112 6.1).
    """
    lengths = field_values(headers, "content-length")
    codings = transfer_codings(headers)
    if codings:
        if lengths:
            raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
        if version < (1, 1):
            raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if codings[-1] != "chunked" or codings.count("chunked") != 1:
            raise ProtocolError(400, "chunked must be the final transfer coding, once")
        if len(codings) != 1:
            raise ProtocolError(501, "unsupported transfer coding")
        return BodyFraming("chunked")
    try:
        length = content_length(lengths)
    except ValueError:
        raise ProtocolError(400, "invalid Content-Length") from None
    if length is None or length == 0:
        return NO_BODY
    return BodyFraming("length", length)


def response_framing(status: int, request_method: str, headers: Fields | Headers) -> BodyFraming:
    """Decide how a backend's response body is delimited (RFC 9112 6.3).

    Raises ValueError for framing a proxy must not pass on (ends in a 502).
    Both Content-Length and chunked: chunked wins and Content-Length is
    ignored (RFC 9112 6.3 (3)); the caller must not reuse the connection.
    """
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        # 6.3 (1): never a body, whatever the fields say; but a Content-Length
        # that is passed on (HEAD, 304) must still be valid.
        content_length(field_values(headers, "content-length"))
        return NO_BODY
    codings = transfer_codings(headers)
    if codings:
        if codings != ["chunked"]:
            raise ValueError("unsupported Transfer-Encoding from backend")
        return BodyFraming("chunked")
    length = content_length(field_values(headers, "content-length"))
    if length is None:
        return BodyFraming("close")  # 6.3 (8): read until the server closes
    return BodyFraming("length", length)


def parse_status_line(line: bytes) -> tuple[tuple[int, int], int, str]:
    """Parse ``HTTP/1.x SP 3DIGIT SP reason CRLF`` (RFC 9112 4); ValueError if bad."""
    if not line.endswith(b"\r\n"):
        raise ValueError("status line must end with CRLF")
    version, _, rest = line[:-2].partition(b" ")
    code, _, reason = rest.partition(b" ")
    match = _VERSION.fullmatch(version)
    if not match or match[1] != b"1" or len(code) != 3 or not code.isdigit():
        raise ValueError("malformed status line")
    if _BAD_VALUE_CHAR.search(reason):
        raise ValueError("malformed reason phrase")
    status = int(code)
    if status < 100:
        raise ValueError("malformed status code")
    return (1, int(match[2])), status, reason.decode("latin-1")


def parse_response_field_line(line: bytes) -> tuple[str, str]:
    """Parse a backend's field line; ValueError if it must not be forwarded."""
    match = _FIELD_LINE.fullmatch(line)
    if match is None:
        raise ValueError(_field_line_problem(line))
    return match[1].decode("ascii"), match[2].rstrip(b" \t").decode("latin-1")


def parse_trailer_line(line: bytes) -> tuple[str, str]:
    """Parse one trailer field line of a chunked body; ValueError if malformed.

    RFC 9112 7.1.2: the trailer section is a list of field lines with the
    syntax of the header section (RFC 9112 5), so the same strict rules
    apply in both directions: CRLF only (no bare CR or LF), a token name
    directly followed by the colon, no obs-fold (5.2; a proxy could unfold it
    in a header, but trailers are dropped, so there is nothing to repair),
    no NUL or other control character in the value (RFC 9110 5.5).  Anything
    else is not a trailer but bytes a peer hopes another parser reads
    differently (a request line hidden after a bare CR, say).
    """
    match = _FIELD_LINE.fullmatch(line)
    if match is None:
        raise ValueError(f"malformed trailer field: {_field_line_problem(line)}")
    return match[1].decode("ascii"), match[2].rstrip(b" \t").decode("latin-1")


def unfold_continuation(fields: Fields, line: bytes) -> None:
    """RFC 9112 5.2: a proxy replaces an obs-fold with SP before forwarding."""
    extra = line.strip(b" \t\r\n")
    if _BAD_VALUE_CHAR.search(extra):
        raise ValueError("invalid character in folded header value")
    value = fields.items[-1][1]
    fields.replace_last_value(f"{value} {extra.decode('latin-1')}".strip())


def parse_chunk_size(line: bytes) -> int:
    """Parse ``chunk-size [; ext] CRLF`` (RFC 9112 7.1); ValueError if bad.

    Only hex digits are accepted: no sign, no ``0x``, no whitespace, no
    underscores (Python's ``int(x, 16)`` would take all of those).
    """
    if not line.endswith(b"\r\n") or b"\n" in line[:-2] or b"\r" in line[:-2]:
        raise ValueError("chunk size line must end with CRLF")
    size, semicolon, _extension = line[:-2].partition(b";")
    if semicolon:
        size = size.rstrip(b" \t")  # BWS before a chunk extension (7.1.1)
    if not size or len(size) > 15 or size.strip(b"0123456789abcdefABCDEF"):
        raise ValueError("malformed chunk size")
    return int(size, 16)


# --- Connection management ------------------------------------------------

_NO_OPTIONS: frozenset[str] = frozenset()


def connection_options(headers: Fields | Headers) -> frozenset[str]:
    """The lower-cased tokens of every Connection field (RFC 9110 7.6.1)."""
    if "connection" not in as_fields(headers).index:
        return _NO_OPTIONS  # the usual case: no set to build
    return frozenset(token.lower() for token in field_values(headers, "connection") if token)


def wants_keep_alive(version: tuple[int, int], options: Collection[str]) -> bool:
    """RFC 9112 9.3: 1.1 is persistent unless "close"; 1.0 only with keep-alive."""
    if "close" in options:
        return False
    return version >= (1, 1) or "keep-alive" in options


def response_reusable(version: tuple[int, int], status: int, fields: Fields,
                      framing: BodyFraming) -> bool:
    """Whether a backend connection may carry another request after this final response.

    Not when the backend asked to close (RFC 9112 9.3), when the body ends
    with the close (6.3 (8)), or when the framing is suspect: whatever
    follows on such a connection cannot be trusted as the next response.
    """
    lengths = field_values(fields, "content-length")
    codings = transfer_codings(fields)
    # RFC 9112 6.3 (3): CL and TE together mean a smuggling attempt or a broken
    # server; 6.1: Transfer-Encoding in a 1.0 message means faulty framing.
    poisoned = (framing.kind == "chunked" and bool(lengths)) or (
        version < (1, 1) and bool(codings))
    if framing.kind == "none" and status >= 200 and (
            bool(codings) or any(v != "0" for v in lengths)):
        # A HEAD/204/304 answer that declares a body: a backend that sends it
        # anyway, even a moment later, would answer the next request with it.
        poisoned = True
    return (not poisoned and framing.kind != "close"
            and wants_keep_alive(version, connection_options(fields)))


def end_to_end(headers: Fields | Headers, extra_drop: Iterable[str] = ()) -> Headers:
    """Headers without the hop-by-hop ones (RFC 9110 7.6.1).

    Drops the fixed hop-by-hop set, every field named in Connection, and any
    lower-case name in ``extra_drop`` (e.g. content-length, which the proxy
    recomputes).
    """
    return without_fields(as_fields(headers), HOP_BY_HOP.union(extra_drop))[0]


def without_fields(fields: Fields, drop: frozenset[str]) -> tuple[Headers, frozenset[str]]:
    """(the fields not named in ``drop`` nor in Connection, the names Connection lists).

    ``drop`` holds lower-case names and normally includes ``HOP_BY_HOP``
    (RFC 9110 7.6.1); callers on the hot path pass a prebuilt frozenset.
    """
    named = connection_options(fields)
    if named:
        drop = drop | named
    return [item for item, lname in zip(fields.items, fields.lnames) if lname not in drop], named


def append_forwarded(headers: Headers, client_ip: str, proto: str,
                     host: str | None) -> Headers:
    """Add X-Forwarded-For/-Proto/-Host (de facto standard, cf. RFC 7239)."""
    previous = [value for name, value in headers if name.lower() == "x-forwarded-for"]
    kept = [(n, v) for n, v in headers
            if n.lower() not in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")]
    chain = ", ".join(previous + [client_ip])
    kept.append(("X-Forwarded-For", chain))
    kept.append(("X-Forwarded-Proto", proto))
    if host:
        kept.append(("X-Forwarded-Host", host))
    return kept


def may_retry(method: str, request_sent: bool, response_started: bool,
              body_replayable: bool) -> bool:
    """Whether a failed attempt may be sent again to another backend.

    Always when nothing was sent (e.g. connection refused).  After sending,
    only idempotent methods (RFC 9110 9.2.2) whose body we still hold, and
    only while no byte of the response reached the client.
    """
    if response_started:
        return False
    if not request_sent:
        return True
    return method in IDEMPOTENT_METHODS and body_replayable


# --- Content coding (gzip) -----------------------------------------------

_COMPRESSIBLE_PREFIXES = ("text/",)
_COMPRESSIBLE_TYPES = frozenset({
    "application/json", "application/javascript", "application/x-javascript",
    "application/xml", "application/xhtml+xml", "application/rss+xml",
    "application/atom+xml", "application/ld+json", "application/manifest+json",
    "application/problem+json", "image/svg+xml",
})


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding value allows gzip (RFC 9110 12.5.3).

    ``gzip;q=0`` forbids it; ``*`` allows it unless gzip is listed with q=0.
    """
    if not accept_encoding:
        return False
    star: float | None = None
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        quality = 1.0
        for param in params.split(";"):
            key, _, val = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(val.strip())
                except ValueError:
                    quality = 0.0
        if coding in ("gzip", "x-gzip"):
            return quality > 0
        if coding == "*":
            star = quality
    return star is not None and star > 0


def is_compressible_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.partition(";")[0].strip().lower()
    if media == "text/event-stream":
        return False  # compressing would hold events back until enough bytes pile up
    return (media.startswith(_COMPRESSIBLE_PREFIXES) or media in _COMPRESSIBLE_TYPES
            or media.endswith(("+json", "+xml")))


def should_gzip(method: str, status: int, response_headers: Fields | Headers,
                accept_encoding: str | None, body_length: int | None,
                min_length: int, ignored: Collection[str] = ()) -> bool:
    """Whether the proxy should gzip this response for this client.

    ``body_length`` is None when unknown (chunked or close-delimited).
    ``ignored``: lower-case names of fields that are not forwarded (those
    named in Connection), which therefore do not count.
    """
    if method == "HEAD" or status < 200 or status in (204, 206, 304):
        return False
    if body_length is not None and body_length < min_length:
        return False
    if not accepts_gzip(accept_encoding):
        return False
    index = as_fields(response_headers).index

    def values(lname: str) -> Sequence[str]:
        return () if lname in ignored else index.get(lname, ())
    if any(value.strip().lower() != "identity" for value in values("content-encoding")):
        return False
    if any("no-transform" in value.lower() for value in values("cache-control")):
        return False  # RFC 9111 5.2.2.6
    if values("content-range"):
        return False
    types = values("content-type")
    return is_compressible_type(types[-1] if types else None)


def gzip_headers(headers: Headers, encoded: bool = True) -> Headers:
    """Response headers for a body we gzip: Content-Encoding, Vary, weak ETag.

    RFC 9110 8.8.3: a changed representation may not keep a strong ETag.
    ``encoded=False`` gives the fields of a 304 for such a response (same
    Vary and ETag, no Content-Encoding).
    """
    result: Headers = []
    vary_done = False
    for name, value in headers:
        lname = name.lower()
        if lname == "content-encoding":
            continue
        if lname == "etag" and not value.startswith("W/"):
            value = "W/" + value
        elif lname == "vary":
            tokens = {token.strip().lower() for token in value.split(",")}
            if "accept-encoding" not in tokens and "*" not in tokens:
                value = f"{value}, Accept-Encoding"
            vary_done = True
        result.append((name, value))
    if encoded:
        result.append(("Content-Encoding", "gzip"))
    if not vary_done:
        result.append(("Vary", "Accept-Encoding"))
    return result


def gzip_compress(body: bytes, level: int) -> bytes:
    """One-shot gzip (wbits=31 writes the gzip header and trailer)."""
    return zlib.compress(body, level, 31)


def gzip_stream(level: int) -> "zlib._Compress":
    return zlib.compressobj(level, zlib.DEFLATED, 31)


# --- Serialisation ----------------------------------------------------------

def serialize_head(start_line: str, headers: Headers) -> bytes:
    """Start line and fields as one CRLF-terminated block (RFC 9112 2.1)."""
    lines = [start_line]
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of the chunked transfer coding (RFC 9112 7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"

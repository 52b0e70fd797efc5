"""Reading HTTP/1.1 message heads and bodies from a buffered byte stream.

The thin I/O layer over the rules in ``http11``: it reads lines and bytes
from any object with ``readline(limit)``, ``read(n)`` and ``read1(n)`` (in
production a ``socket_io.SocketReader``, whose ``read_head`` is used when
present; the tests also use ``io.BufferedReader``) and asks ``http11`` what
they mean.  Used for both directions: requests from clients and responses
from backends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import http11
from http11 import BodyFraming, Fields, ProtocolError


class Readable(Protocol):
    def readline(self, limit: int = -1, /) -> bytes: ...
    def read(self, n: int, /) -> bytes: ...
    def read1(self, n: int, /) -> bytes: ...


class TruncatedBody(Exception):
    """The peer closed before the end of a body whose length was declared."""

    def __init__(self, message: str, partial: bytes = b"") -> None:
        super().__init__(message)
        self.partial = partial  # what did arrive (read_small_body only)


class MalformedBody(Exception):
    """Bad chunked syntax, or a body larger than allowed."""


class BodyTooLarge(MalformedBody):
    pass


@dataclass(slots=True)
class Limits:
    """Size limits for a message head (see settings for the defaults)."""

    max_line: int = 8192
    max_header_bytes: int = 32768
    max_fields: int = 100


def read_head_block(reader: Readable, max_bytes: int) -> bytes:
    """The field lines and the empty line after them, as one block.

    Uses the reader's ``read_head`` when it has one (``SocketReader``: one
    search, no per-line calls); any file-like reader works line by line.
    """
    read_head = getattr(reader, "read_head", None)
    if read_head is not None:
        return read_head(max_bytes)
    lines = []
    total = 0
    while total <= max_bytes:
        line = reader.readline(max_bytes + 1)
        lines.append(line)
        total += len(line)
        if line in (b"\r\n", b""):
            break
    return b"".join(lines)


def read_field_lines(reader: Readable, limits: Limits, for_response: bool) -> Fields:
    """Read field lines up to the empty line that ends the head.

    Requests: strict (obs-fold and bad fields are a 400 ProtocolError, too many
    or too large a 431).  Responses: obs-fold is unfolded (RFC 9112 5.2), and
    anything unforwardable raises ValueError (the proxy answers 502).
    """
    block = read_head_block(reader, limits.max_header_bytes)
    if len(block) > limits.max_header_bytes:
        if for_response:
            raise ValueError("response head too large")
        raise ProtocolError(431, "request header fields too large")
    if not block.endswith(b"\r\n\r\n") and block != b"\r\n":
        if for_response:
            raise IncompleteHead("backend closed the connection inside the response head")
        raise ProtocolError(400, "incomplete request head")
    # bytes.splitlines splits at CR, LF and CRLF only; a bare CR or LF thus
    # leaves a line without CRLF, which the field parser rejects.
    lines = block.splitlines(keepends=True)
    lines.pop()  # the empty line
    if len(lines) > limits.max_fields:
        if for_response:
            raise ValueError("too many response header fields")
        raise ProtocolError(431, "too many header fields")
    fields = Fields()
    max_line = limits.max_line
    parse = http11.parse_response_field_line if for_response else http11.parse_field_line
    for line in lines:
        if len(line) > max_line:
            if for_response:
                raise ValueError("response header line too long")
            raise ProtocolError(431, "request header field too large")
        if for_response and line[:1] in (b" ", b"\t") and fields.items:
            http11.unfold_continuation(fields, line)
        else:
            fields.add(*parse(line))
    return fields


@dataclass(slots=True)
class ResponseHead:
    version: tuple[int, int]
    status: int
    reason: str
    headers: Fields
    framing: BodyFraming
    reusable: bool  # may the connection carry another request afterwards
    interim: list[int] = field(default_factory=list)


class EmptyResponse(ConnectionError):
    """The backend closed the connection without sending a byte."""


class IncompleteHead(ConnectionError):
    """The backend closed the connection in the middle of a response head."""


def read_response_head(reader: Readable, request_method: str, limits: Limits,
                       upgrade: bool = False) -> ResponseHead:
    """Read a backend's response head, skipping 1xx interim responses.

    ``upgrade``: the request asked to switch protocols (RFC 9110 7.8); a
    ``101 Switching Protocols`` then ends the head (no body, never
    reusable: what follows is the new protocol).  Without it a 101 is a
    ValueError.  Raises EmptyResponse if the connection closed before any
    byte, IncompleteHead if it closed inside the head, ValueError for a
    head that must not be forwarded (the caller answers 502).
    """
    interim: list[int] = []
    while True:
        line = reader.readline(limits.max_line + 1)
        if not line:
            if interim:
                raise ValueError("backend closed after an interim response")
            raise EmptyResponse("backend closed the connection without a response")
        if not line.endswith(b"\n"):
            if len(line) > limits.max_line:
                raise ValueError("status line too long")
            raise IncompleteHead("backend closed the connection inside the status line")
        version, status, reason = http11.parse_status_line(line)
        headers = read_field_lines(reader, limits, for_response=True)
        if status == 101:
            if upgrade:
                return ResponseHead(version, status, reason, headers, http11.NO_BODY, False, interim)
            raise ValueError("backend switched protocols without being asked to")
        if status >= 200:
            break
        if len(interim) >= 10:
            raise ValueError("too many interim responses")
        interim.append(status)  # 100 Continue, 103 Early Hints: not relayed
    framing = http11.response_framing(status, request_method, headers)
    reusable = http11.response_reusable(version, status, headers, framing)
    return ResponseHead(version, status, reason, headers, framing, reusable, interim)


def iter_body(reader: Readable, framing: BodyFraming, piece: int = 65536,
              max_size: int | None = None) -> Iterator[bytes]:
    """Yield the decoded body in pieces of at most ``piece`` bytes.

    Raises TruncatedBody when the stream ends early, MalformedBody for bad
    chunk syntax (RFC 9112 7.1) and BodyTooLarge past ``max_size``.
    """
    kind = framing.kind
    if kind == "length":
        remaining = framing.length
        while remaining:
            data = reader.read1(min(piece, remaining))
            if not data:
                raise TruncatedBody(f"{remaining} bytes of the body missing")
            remaining -= len(data)
            yield data
    elif kind == "chunked":
        yield from _iter_chunked(reader, piece, max_size)
    elif kind == "close":
        while data := reader.read1(piece):
            yield data


def _iter_chunked(reader: Readable, piece: int, max_size: int | None) -> Iterator[bytes]:
    total = 0
    while True:
        line = reader.readline(1024)
        if not line:
            raise TruncatedBody("stream ended inside a chunked body")
        try:
            size = http11.parse_chunk_size(line)
        except ValueError as error:
            raise MalformedBody(str(error)) from None
        if size == 0:
            _skip_trailers(reader)
            return
        total += size
        if max_size is not None and total > max_size:
            raise BodyTooLarge("chunked body larger than allowed")
        remaining = size
        while remaining:
            data = reader.read1(min(piece, remaining))
            if not data:
                raise TruncatedBody("stream ended inside a chunk")
            remaining -= len(data)
            yield data
        # A chunk longer than its declared size shows up here as data where
        # the CRLF should be.
        crlf = reader.read(2)
        if len(crlf) < 2 and b"\r\n".startswith(crlf):
            raise TruncatedBody("stream ended after chunk data")
        if crlf != b"\r\n":
            raise MalformedBody("chunk data does not end with CRLF")


# The trailer section is read and dropped, within limits of its own (it is
# not counted against the header limits of the message it ends).
MAX_TRAILER_FIELDS = 99
MAX_TRAILER_LINE = 8192


def _skip_trailers(reader: Readable) -> None:
    """Read, check and drop the trailer section (RFC 9112 7.1.2); we never forward it.

    Every line up to the empty one must be a well-formed field line
    (``http11.parse_trailer_line``), at most ``MAX_TRAILER_LINE`` bytes, at
    most ``MAX_TRAILER_FIELDS`` of them: MalformedBody otherwise.
    TruncatedBody if the stream ends inside the section.
    """
    for _ in range(MAX_TRAILER_FIELDS + 1):
        line = reader.readline(MAX_TRAILER_LINE + 1)
        if line == b"\r\n":
            return
        if not line.endswith(b"\n"):
            if len(line) > MAX_TRAILER_LINE:
                raise MalformedBody("trailer field line too long")
            # Short and without LF: the stream ended mid-line (or before it).
            raise TruncatedBody("stream ended inside the trailer section")
        try:
            http11.parse_trailer_line(line)
        except ValueError as error:
            raise MalformedBody(str(error)) from None
    raise MalformedBody("too many trailer fields")


def read_small_body(reader: Readable, length: int) -> bytes:
    """Read exactly ``length`` bytes, or raise TruncatedBody."""
    data = reader.read(length)
    if len(data) != length:
        raise TruncatedBody(f"{length - len(data)} bytes of the body missing", data)
    return data

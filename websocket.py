"""RFC 6455 WebSocket building blocks, pure and small: handshake key, frames, messages, close codes.

What cclb itself needs is only to *tunnel* WebSocket bytes (``tunnel.py``);
this module serves the demo backend's ``/ws`` echo route (``server.py``) and
the tests that talk to it.  Nothing here does I/O except ``read_frame``,
which pulls bytes through a caller-supplied ``read_exact`` function.

- ``accept_key``: the ``Sec-WebSocket-Accept`` value (RFC 6455 4.2.2 step 5.4).
- ``handshake_problem``: why a request cannot be upgraded (RFC 6455 4.2.1), or None.
- ``encode_frame`` / ``decode_frame`` / ``read_frame``: the base framing
  protocol (RFC 6455 5.2), with masking (5.3) and its direction rules.
- ``MessageAssembler``: fragmentation (5.4), control frames in between
  (5.5), UTF-8 text (8.1), size limits (7.4.1 code 1009).
- ``encode_close`` / ``parse_close``: the close frame body (5.5.1, 7.4).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Mapping

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
VERSION = "13"  # RFC 6455 4.1: the only version this code speaks
MAX_CONTROL_PAYLOAD = 125  # RFC 6455 5.5


class Opcode(enum.IntEnum):
    """Frame opcodes (RFC 6455 5.2, 11.8); 3-7 and 11-15 are reserved."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA

    @property
    def is_control(self) -> bool:
        return self >= 0x8


class CloseCode(enum.IntEnum):
    """Status codes of a close frame (RFC 6455 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never sent: "no code in the close frame"
    ABNORMAL = 1006  # never sent: "closed without a close frame"
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011


# Codes an endpoint may put on the wire (RFC 6455 7.4.1/7.4.2; 1012-1014 from the IANA registry).
SENDABLE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class ProtocolError(Exception):
    """The peer broke RFC 6455: close the connection with ``code`` (and ``str()`` as reason)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class ConnectionClosed(Exception):
    """The stream ended (EOF) before a whole frame arrived."""


@dataclass(frozen=True)
class Frame:
    """One frame as on the wire, payload unmasked (RFC 6455 5.2)."""

    opcode: Opcode
    payload: bytes = b""
    fin: bool = True


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 4.2.2 5.4)."""
    digest = hashlib.sha1((key.strip() + GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def new_key() -> str:
    """A fresh client ``Sec-WebSocket-Key``: 16 random bytes, base64 (RFC 6455 4.1)."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def _tokens(value: str | None) -> set[str]:
    return {token.strip().lower() for token in (value or "").split(",") if token.strip()}


def handshake_problem(method: str, headers: Mapping[str, str]) -> tuple[int, str] | None:
    """Why this opening handshake must be refused, as (HTTP status, reason); None if it is fine.

    ``headers``: a case-insensitive mapping (``email.message.Message`` or a
    dict with lower-case keys).  RFC 6455 4.2.1: a GET with ``Upgrade:
    websocket``, ``Connection: upgrade``, a 16-byte base64
    ``Sec-WebSocket-Key`` and ``Sec-WebSocket-Version: 13`` (else 426 with
    the version we speak, 4.4).
    """
    def get(name: str) -> str | None:
        value = headers.get(name)
        return value if value is not None else headers.get(name.lower())

    if method != "GET":
        return 405, "a WebSocket handshake must be a GET"
    if "websocket" not in _tokens(get("Upgrade")) or "upgrade" not in _tokens(get("Connection")):
        return 426, "this route needs Upgrade: websocket and Connection: Upgrade"
    if (get("Sec-WebSocket-Version") or "").strip() != VERSION:
        return 426, f"unsupported Sec-WebSocket-Version (this server speaks {VERSION})"
    key = (get("Sec-WebSocket-Key") or "").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        return 400, "Sec-WebSocket-Key must be 16 bytes in base64"
    return None


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (RFC 6455 5.3); its own inverse.

    One big-integer XOR instead of a Python loop per byte: ~100x faster.
    """
    if len(mask) != 4:
        raise ValueError("a masking key is 4 bytes")
    if not data:
        return b""
    length = len(data)
    repeated = (mask * (length // 4 + 1))[:length]
    value = int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")
    return value.to_bytes(length, "big")


def encode_frame(opcode: Opcode | int, payload: bytes = b"", fin: bool = True, mask: bytes | bool = False) -> bytes:
    """One frame on the wire (RFC 6455 5.2).

    ``mask``: False for server-to-client frames (they MUST NOT be masked,
    5.1), True for a random key (client-to-server frames MUST be masked), or
    an explicit 4-byte key (tests).  Lengths use the shortest encoding (5.2).
    Control frames must be final and carry at most 125 bytes (5.5).
    """
    opcode = Opcode(opcode)
    if opcode.is_control and (not fin or len(payload) > MAX_CONTROL_PAYLOAD):
        raise ValueError("a control frame must be final with at most 125 bytes of payload")
    length = len(payload)
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask is not False else 0
    if length < 126:
        head.append(mask_bit | length)
    elif length < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", length)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", length)
    if mask is False:
        return bytes(head) + payload
    key = os.urandom(4) if mask is True else bytes(mask)
    return bytes(head) + key + apply_mask(payload, key)


@dataclass
class _Head:
    fin: bool
    opcode: Opcode
    masked: bool
    length: int
    header_size: int


def _parse_head(data: bytes, require_mask: bool | None, max_payload: int) -> _Head | None:
    """The frame head at the start of ``data``; None if more bytes are needed."""
    if len(data) < 2:
        return None
    first, second = data[0], data[1]
    if first & 0x70:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
    try:
        opcode = Opcode(first & 0x0F)
    except ValueError:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {first & 0x0F:#x}") from None
    fin, masked, length = bool(first & 0x80), bool(second & 0x80), second & 0x7F
    if require_mask is True and not masked:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "client frames must be masked")
    if require_mask is False and masked:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "server frames must not be masked")
    size = 2
    if length == 126:
        if len(data) < 4:
            return None
        length, size = struct.unpack_from("!H", data, 2)[0], 4
        if length < 126:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "payload length not minimally encoded")
    elif length == 127:
        if len(data) < 10:
            return None
        length, size = struct.unpack_from("!Q", data, 2)[0], 10
        if length >> 63:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "payload length with the most significant bit set")
        if length < 1 << 16:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "payload length not minimally encoded")
    if opcode.is_control and (not fin or length > MAX_CONTROL_PAYLOAD):
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "control frames must be final with at most 125 bytes")
    if length > max_payload:
        raise ProtocolError(CloseCode.MESSAGE_TOO_BIG, f"frame of {length} bytes is over the limit of {max_payload}")
    return _Head(fin, opcode, masked, length, size + (4 if masked else 0))


def decode_frame(data: bytes | bytearray, require_mask: bool | None = None,
                 max_payload: int = 16 * 1024 * 1024) -> tuple[Frame, int] | None:
    """The first frame of ``data`` and the bytes it used; None if ``data`` holds no whole frame yet.

    ``require_mask``: True on a server (client frames MUST be masked), False on
    a client (server frames MUST NOT be), None to accept both.  Violations
    raise ``ProtocolError`` with the close code to send (1002, or 1009 over
    ``max_payload``).
    """
    data = bytes(data)
    head = _parse_head(data, require_mask, max_payload)
    if head is None or len(data) < head.header_size + head.length:
        return None
    payload = data[head.header_size:head.header_size + head.length]
    if head.masked:
        payload = apply_mask(payload, data[head.header_size - 4:head.header_size])
    return Frame(head.opcode, payload, head.fin), head.header_size + head.length


def read_frame(read_exact: Callable[[int], bytes], require_mask: bool | None = None,
               max_payload: int = 16 * 1024 * 1024) -> Frame:
    """The next frame from a stream; ``read_exact(n)`` returns n bytes or fewer at EOF.

    ``ConnectionClosed`` if the stream ends before the frame does;
    ``ProtocolError`` as in ``decode_frame``.
    """
    def take(n: int) -> bytes:
        data = read_exact(n) if n else b""
        if len(data) < n:
            raise ConnectionClosed("the stream ended inside a frame" if data else "end of stream")
        return data

    data = take(2)
    need = {126: 2, 127: 8}.get(data[1] & 0x7F, 0) + (4 if data[1] & 0x80 else 0)
    data += take(need)
    head = _parse_head(data, require_mask, max_payload)
    assert head is not None  # every head byte is here
    payload = take(head.length)
    if head.masked:
        payload = apply_mask(payload, data[head.header_size - 4:head.header_size])
    return Frame(head.opcode, payload, head.fin)


def encode_close(code: int | None = CloseCode.NORMAL, reason: str = "") -> bytes:
    """A close frame's payload: 2-byte code and UTF-8 reason, or empty (RFC 6455 5.5.1)."""
    if code is None:
        if reason:
            raise ValueError("a close reason needs a code")
        return b""
    if code not in SENDABLE_CODES and not 3000 <= code <= 4999:
        raise ValueError(f"close code {code} may not be sent")
    body = struct.pack("!H", code) + reason.encode("utf-8")
    if len(body) > MAX_CONTROL_PAYLOAD:
        raise ValueError("close reason too long (123 bytes at most)")
    return body


def parse_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a received close frame; 1005 when it has no code (RFC 6455 7.1.5).

    ``ProtocolError`` 1002 for a one-byte body or a code that may not be sent,
    1007 for a reason that is not UTF-8.
    """
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "close frame with a one-byte body")
    code = struct.unpack_from("!H", payload)[0]
    if code not in SENDABLE_CODES and not 3000 <= code <= 4999:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CloseCode.INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


@dataclass(frozen=True)
class Message:
    """A whole data message (TEXT payload already checked as UTF-8) or a control frame."""

    opcode: Opcode
    payload: bytes


@dataclass
class MessageAssembler:
    """Joins fragments into messages (RFC 6455 5.4); control frames pass straight through.

    Owned by one connection's thread: no lock.  ``feed`` returns a ``Message``
    when one is complete (or a control frame arrived), else None; it raises
    ``ProtocolError`` for a continuation without a start (1002), a new data
    frame inside a fragmented message (1002), text that is not UTF-8 (1007)
    or a message over ``max_message`` bytes (1009).
    """

    max_message: int = 16 * 1024 * 1024
    _opcode: Opcode | None = None
    _parts: list[bytes] = field(default_factory=list)
    _size: int = 0

    def feed(self, frame: Frame) -> Message | None:
        if frame.opcode.is_control:
            return Message(frame.opcode, frame.payload)  # may arrive between fragments (5.4)
        if frame.opcode == Opcode.CONTINUATION:
            if self._opcode is None:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "continuation frame without a message to continue")
        elif self._opcode is not None:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "new data frame inside a fragmented message")
        else:
            self._opcode = frame.opcode
        self._size += len(frame.payload)
        if self._size > self.max_message:
            raise ProtocolError(CloseCode.MESSAGE_TOO_BIG, f"message over the limit of {self.max_message} bytes")
        self._parts.append(frame.payload)
        if not frame.fin:
            return None
        opcode, payload = self._opcode, b"".join(self._parts)
        self._opcode, self._parts, self._size = None, [], 0
        if opcode == Opcode.TEXT:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(CloseCode.INVALID_DATA, "text message is not UTF-8") from None
        return Message(opcode, payload)  # type: ignore[arg-type]

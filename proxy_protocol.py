"""HAProxy's PROXY protocol, versions 1 (text) and 2 (binary), receiving side.

A proxy in front of cclb (HAProxy, an AWS NLB, ...) writes one header before
the connection's first byte saying whom the connection is really from.
Section numbers below refer to HAProxy's ``doc/proxy-protocol.txt``.

- ``parse_proxy_header(data)``: pure; the header and how many bytes it used,
  None when ``data`` is too short to decide, ``ProxyProtocolError`` when it
  cannot be a header.
- ``read_proxy_header(sock, timeout)``: reads exactly the header's bytes from a
  blocking socket (the request bytes after it stay unread), within a deadline.

A header without an address (v2 LOCAL, v1 UNKNOWN, v2 UNSPEC/UNIX/UDP families)
means "use the connection's own peer address" (2.1, 2.2).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


class ProxyProtocolError(ValueError):
    """The bytes cannot be a PROXY protocol header (or the peer closed before the end of it)."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the proxy in front said about the connection; ``source`` is the client when set."""

    version: int  # 1 or 2
    command: str  # "PROXY", or "LOCAL" (v2 LOCAL, v1 UNKNOWN): the real connection's addresses apply
    source: tuple[str, int] | None  # (address, port) of the client; None: use the peer address
    destination: tuple[str, int] | None  # (address, port) the client connected to


V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # 2.1: the longest line, CRLF included ("PROXY UNKNOWN" + two IPv6 + ports)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # 2.2: 12 bytes, then version/command, family, length
V2_FIXED = 16
# 2.2: the length field allows 64 KiB of addresses and TLVs; we cap the whole header at 16 KiB
# (HAProxy's default buffer size, tune.bufsize: it could never accept a longer one either), so a
# connection costs at most that much memory before it is known to be good.
V2_MAX_LENGTH = 16 * 1024
V2_TLV_HEADER = 3  # 2.2.x: type (1 byte), length (2 bytes, network order)

# 2.2: family (high nibble) -> address block length; only TCP (protocol 1) over IPv4/IPv6 carries
# an address we use; UDP and UNIX are valid but fall back to UNSPEC (no address), as 2.2 allows.
_ADDRESS_LENGTH = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}
_V1_ADDRESS_CHARACTERS = frozenset(b"0123456789abcdefABCDEF.: ")


def parse_proxy_header(data: bytes) -> tuple[ProxyHeader, int] | None:
    """``(header, bytes used)``, or None when ``data`` is a strict prefix of a possible header.

    Raises ``ProxyProtocolError`` as soon as ``data`` cannot start a valid
    header (2.1, 2.2: "any sequence which does not exactly match the protocol
    must be discarded").  For v1 the early check is the keyword, the protocol
    and the character set; the addresses and ports are checked once the CRLF
    has arrived (2.1: "the receiver must wait for the CRLF sequence before
    starting to decode the addresses").  Bytes after the header are not looked at.
    """
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data[:1] == b"P" or not data:
        return _parse_v1(data)
    raise ProxyProtocolError("not a PROXY protocol header")


# --- version 1 ----------------------------------------------------------------------------

def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    head = data[:V1_MAX_LENGTH]
    end = head.find(b"\r\n")
    if end < 0:
        # incomplete: a final CR may be the start of the CRLF
        _check_v1_start(head[:-1] if head.endswith(b"\r") else head, complete=False)
        if len(head) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"PROXY v1 line without CRLF in its first {V1_MAX_LENGTH} bytes")
        return None
    line = head[:end]
    _check_v1_start(line, complete=True)
    return _parse_v1_line(line), end + 2


_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")


def _check_v1_start(text: bytes, complete: bool) -> None:
    """Reject what no more bytes could make a valid line (``text``: the line so far, no CRLF)."""
    if not (text.startswith(V1_PREFIX) if len(text) >= len(V1_PREFIX) else V1_PREFIX.startswith(text)):
        raise ProxyProtocolError("not a PROXY protocol header")
    if b"\r" in text or b"\n" in text:  # 2.1: "must not tolerate a single CR or LF"
        raise ProxyProtocolError("PROXY v1 line must end with CRLF")
    rest = text[len(V1_PREFIX):]
    if rest.startswith(b"TCP4 ") or rest.startswith(b"TCP6 "):
        if not _V1_ADDRESS_CHARACTERS.issuperset(rest[5:]):
            raise ProxyProtocolError(f"bad character in PROXY v1 line {_show(text)}")
        return
    if rest == b"UNKNOWN" or rest.startswith(b"UNKNOWN "):
        return  # 2.1: "the receiver must ignore anything presented before the CRLF"
    if not complete and any(protocol.startswith(rest) for protocol in _V1_PROTOCOLS):
        return
    raise ProxyProtocolError(f"PROXY v1 line with an unknown protocol: {_show(text)}")


def _parse_v1_line(line: bytes) -> ProxyHeader:
    """The line without its CRLF, keyword and protocol already checked by ``_check_v1_start``."""
    fields = line.split(b" ")
    if fields[1] == b"UNKNOWN":  # 2.1: anything may follow UNKNOWN; the receiver ignores it
        return ProxyHeader(1, "LOCAL", None, None)
    if len(fields) != 6:
        raise ProxyProtocolError(f"PROXY v1 line is not 'PROXY TCP4|TCP6 src dst sport dport': {_show(line)}")
    family = socket.AF_INET if fields[1] == b"TCP4" else socket.AF_INET6
    source = _v1_address(fields[2], family), _v1_port(fields[4])
    destination = _v1_address(fields[3], family), _v1_port(fields[5])
    return ProxyHeader(1, "PROXY", source, destination)


def _v1_address(text: bytes, family: int) -> str:
    # 2.1: IPv4 is a dotted quad without leading zeros (inet_pton refuses them); IPv6 is the
    # RFC 4291 text form; the address must be of the announced family
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text.decode("ascii")))
    except (OSError, ValueError):
        kind = "IPv4" if family == socket.AF_INET else "IPv6"
        raise ProxyProtocolError(f"bad {kind} address {_show(text)} in PROXY v1 line") from None


def _v1_port(text: bytes) -> int:
    # 2.1: decimal 0..65535, no leading zeros
    if not text.isdigit() or len(text) > 5 or (text[:1] == b"0" and text != b"0") or int(text) > 65535:
        raise ProxyProtocolError(f"bad port {_show(text)} in PROXY v1 line")
    return int(text)


# --- version 2 ----------------------------------------------------------------------------

def _check_v2_fixed(data: bytes) -> None:
    """Check the fixed part (16 bytes) as far as it has arrived."""
    if not V2_SIGNATURE.startswith(data[:len(V2_SIGNATURE)]):
        raise ProxyProtocolError("not a PROXY protocol header")
    if len(data) <= 12:
        return
    version, command = data[12] >> 4, data[12] & 0xF
    if version != 2:  # 2.2: "the receiver must only accept this value"
        raise ProxyProtocolError(f"PROXY v2 header with version {version}, not 2")
    if command > 1:  # 2.2: 0 LOCAL, 1 PROXY; "receivers must drop connections presenting unexpected values"
        raise ProxyProtocolError(f"PROXY v2 header with unknown command {command}")
    if len(data) <= 13 or command == 0:  # 2.2: for LOCAL the family "is ignored"
        return
    if data[13] >> 4 not in _ADDRESS_LENGTH or data[13] & 0xF > 2:
        # 2.2: other families and protocols "must be rejected as invalid by receivers"
        raise ProxyProtocolError(f"PROXY v2 header with unknown family/protocol 0x{data[13]:02x}")


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    _check_v2_fixed(data[:V2_FIXED])
    if len(data) < V2_FIXED:
        return None
    command, family, protocol = data[12] & 0xF, data[13] >> 4, data[13] & 0xF
    length = int.from_bytes(data[14:16], "big")
    total = V2_FIXED + length
    if total > V2_MAX_LENGTH:
        raise ProxyProtocolError(f"PROXY v2 header of {total} bytes, more than the {V2_MAX_LENGTH} accepted")
    if len(data) < total:
        return None
    if command == 0:
        # 2.2: LOCAL: use the real connection's endpoints; skip the whole block, whatever it holds
        return ProxyHeader(2, "LOCAL", None, None), total
    block = data[V2_FIXED:total]
    address_length = _ADDRESS_LENGTH[family] if protocol else 0
    if length < address_length:
        raise ProxyProtocolError(f"PROXY v2 address block of {length} bytes, family 0x{family:x} needs "
                                 f"{address_length}")
    if family == 0 or protocol == 0:
        # 2.2: UNSPEC: "the receiver should ignore address information" (its layout is unknown,
        # so whatever follows is skipped, not read as TLVs)
        return ProxyHeader(2, "PROXY", None, None), total
    _check_tlvs(block[address_length:])
    if data[13] == 0x11:  # TCP over IPv4: 4 + 4 address bytes, 2 + 2 port bytes
        source = socket.inet_ntop(socket.AF_INET, block[0:4]), int.from_bytes(block[8:10], "big")
        destination = socket.inet_ntop(socket.AF_INET, block[4:8]), int.from_bytes(block[10:12], "big")
        return ProxyHeader(2, "PROXY", source, destination), total
    if data[13] == 0x21:  # TCP over IPv6: 16 + 16 address bytes, 2 + 2 port bytes
        source = socket.inet_ntop(socket.AF_INET6, block[0:16]), int.from_bytes(block[32:34], "big")
        destination = socket.inet_ntop(socket.AF_INET6, block[16:32]), int.from_bytes(block[34:36], "big")
        return ProxyHeader(2, "PROXY", source, destination), total
    # UDP, UNIX stream/datagram: valid, but no TCP address for us (2.2: fall back to UNSPEC)
    return ProxyHeader(2, "PROXY", None, None), total


def _check_tlvs(tlvs: bytes) -> None:
    """2.2.x: TLVs are skipped, but each must fit in the header (as HAProxy checks)."""
    offset = 0
    while offset < len(tlvs):
        if offset + V2_TLV_HEADER > len(tlvs):
            raise ProxyProtocolError("PROXY v2 header ends inside a TLV")
        offset += V2_TLV_HEADER + int.from_bytes(tlvs[offset + 1:offset + 3], "big")
        if offset > len(tlvs):
            raise ProxyProtocolError("PROXY v2 TLV longer than the header")


def _show(text: bytes) -> str:
    return repr(text[:V1_MAX_LENGTH])[1:]


# --- reading from a socket ----------------------------------------------------------------

def read_proxy_header(sock: socket.socket, timeout: float) -> ProxyHeader:
    """Read one PROXY header from a blocking, plain (not yet TLS) socket, and not one byte more.

    Each round peeks at what has arrived (``MSG_PEEK``), parses the header
    so far plus those bytes, and consumes only bytes that belong to the
    header: all of them while the header is still incomplete (so the next
    peek waits for new bytes instead of spinning), exactly the rest once it
    is complete.  The request bytes behind it stay in the socket.

    The whole header must arrive within ``timeout`` seconds of the call:
    otherwise ``TimeoutError`` (``socket.timeout``).  A malformed header, or
    the peer closing before its end, raises ``ProxyProtocolError``; a reset
    raises ``OSError``.  The socket's own timeout is restored afterwards.
    """
    deadline = time.monotonic() + timeout
    previous = sock.gettimeout()
    received = b""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete PROXY protocol header within {timeout:g} s")
            sock.settimeout(remaining)
            peeked = sock.recv(V2_MAX_LENGTH - len(received), socket.MSG_PEEK)
            if not peeked:
                raise ProxyProtocolError("connection closed before the end of the PROXY protocol header")
            parsed = parse_proxy_header(received + peeked)
            if parsed is None:
                _consume(sock, len(peeked))
                received += peeked
                continue
            header, used = parsed
            _consume(sock, used - len(received))
            return header
    finally:
        sock.settimeout(previous)


def _consume(sock: socket.socket, count: int) -> None:
    """Discard ``count`` bytes already peeked (they are in the kernel buffer: no waiting)."""
    while count > 0:
        chunk = sock.recv(count)
        if not chunk:
            raise ProxyProtocolError("connection closed before the end of the PROXY protocol header")
        count -= len(chunk)

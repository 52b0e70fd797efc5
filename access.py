"""Who is the client, may it come in, and how often: pure building blocks, no sockets.

- ``AddressList``: a route's ``allow``/``deny`` list or the ``trusted_proxies``
  list (CIDRs or single addresses, IPv4 and IPv6); ``address in list``.
- ``real_client``: the client address behind trusted proxies, from the peer and
  the ``X-Forwarded-For`` header values.
- ``Rate``/``parse_rate``: a route's ``rate_limit`` ("N/s", "N/m") and burst.
- ``RateLimiter``: token buckets per key (the proxy uses ``(route, client)``),
  thread-safe, bounded, O(1) per request.
"""

from __future__ import annotations

import math
import re
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Hashable, Iterable, Sequence


def _address_bits(address: str) -> tuple[int, int] | None:
    """``(version, integer)`` of a textual address, or None when it is not one.

    Strict: dotted quad without leading zeros for IPv4 (``inet_pton``), any
    RFC 4291 2.2 text form for IPv6.  A zone (``fe80::1%eth0``, as a peer
    address may carry) is ignored.
    """
    try:
        if ":" in address:
            packed = socket.inet_pton(socket.AF_INET6, address.partition("%")[0])
            return 6, int.from_bytes(packed, "big")
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
    except (OSError, ValueError):  # ValueError: an embedded NUL or a non-ASCII character
        return None


_MAPPED = 0xFFFF << 32  # ::ffff:0:0/96, IPv4-mapped IPv6 addresses (RFC 4291 2.5.5.2)


class AddressList:
    """A set of networks; ``address in lst`` never raises (a non-address is simply not in it).

    Matching costs one lookup per distinct prefix length in the list (not
    per entry): networks are kept as ``{prefix length: {network bits}}``.
    IPv6 entries inside ``::ffff:0:0/96`` also match plain IPv4 addresses and
    IPv4 entries also match IPv4-mapped IPv6 addresses.  An entry with host
    bits set (``10.0.0.1/8``) means its network (``10.0.0.0/8``), as in
    nginx and HAProxy.  Immutable once built; safe to share between threads.
    """

    __slots__ = ("what", "networks", "_v4", "_v6")

    def __init__(self, entries: Iterable[str], what: str) -> None:
        if isinstance(entries, (str, bytes)):  # a lone string would be read character by character
            raise ValueError(f"{what}: expected a list of addresses or CIDRs, got {entries!r}")
        self.what = what
        networks: list[IPv4Network | IPv6Network] = []
        v4: dict[int, set[int]] = {}
        v6: dict[int, set[int]] = {}
        for entry in entries:
            network = _parse_network(entry, what)
            networks.append(network)
            bits = int(network.network_address)
            if network.version == 6 and network.prefixlen >= 96 and bits >> 32 << 32 == _MAPPED:
                # an IPv4-mapped network: store it as the IPv4 network it maps
                v4.setdefault(network.prefixlen - 96, set()).add((bits & 0xFFFFFFFF) >> (128 - network.prefixlen))
            elif network.version == 4:
                v4.setdefault(network.prefixlen, set()).add(bits >> (32 - network.prefixlen))
            else:
                v6.setdefault(network.prefixlen, set()).add(bits >> (128 - network.prefixlen))
        self.networks: tuple[IPv4Network | IPv6Network, ...] = tuple(networks)
        # (shift, network bits): shortest prefixes first (the broad entries match most often)
        self._v4 = tuple((32 - length, frozenset(v4[length])) for length in sorted(v4))
        self._v6 = tuple((128 - length, frozenset(v6[length])) for length in sorted(v6))

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        parsed = _address_bits(address)
        if parsed is None:
            return False
        version, bits = parsed
        if version == 6:
            for shift, nets in self._v6:
                if bits >> shift in nets:
                    return True
            if bits >> 32 << 32 != _MAPPED:
                return False
            bits &= 0xFFFFFFFF  # an IPv4-mapped address also matches IPv4 entries
        for shift, nets in self._v4:
            if bits >> shift in nets:
                return True
        return False

    def __len__(self) -> int:
        return len(self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AddressList):
            return NotImplemented
        return self.networks == other.networks

    def __hash__(self) -> int:
        return hash(self.networks)

    def __repr__(self) -> str:
        return f"AddressList({[str(n) for n in self.networks]!r}, {self.what!r})"


def _parse_network(entry: object, what: str) -> IPv4Network | IPv6Network:
    bad = ValueError(f"{what}: {entry!r} is not an address or CIDR")
    if not isinstance(entry, str) or "%" in entry:  # a zone makes no sense in a list
        raise bad
    try:
        return ip_network(entry, strict=False)
    except ValueError:
        raise bad from None


# --- real client address -----------------------------------------------------------------

def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5


def _forwarded_address(entry: str) -> str | None:
    """The canonical address of one ``X-Forwarded-For`` element, or None when malformed.

    Accepted: a bare address (the de-facto format), and, because some proxies
    write them, ``[v6]``, ``[v6]:port`` and ``v4:port`` (the port is dropped).
    """
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            return None
        entry = host
        if ":" not in entry:
            return None
    elif entry.count(":") == 1:  # v4:port
        host, _, port = entry.partition(":")
        if not _is_port(port):
            return None
        entry = host
    if "%" in entry:
        return None
    family = socket.AF_INET6 if ":" in entry else socket.AF_INET
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, entry))
    except (OSError, ValueError):
        return None


def real_client(peer: str, forwarded_for: Sequence[str], trusted: AddressList) -> str:
    """The client address: ``peer``, or behind trusted proxies the address they were given.

    When ``peer`` is not in ``trusted`` (or ``trusted`` is empty) the peer is
    the client and ``X-Forwarded-For`` is ignored: anybody can write it.

    Otherwise walk the ``X-Forwarded-For`` elements (each header value is a
    comma-separated list; several header fields are one list in order,
    RFC 9110 5.3) from the right: every proxy appends the address it got the
    request from, so the right-most elements were written by our trusted
    proxies and the left part is whatever the client sent.  The first
    address that is not trusted is the client.  If all are trusted, the
    left-most one is (the request started inside the trusted network).

    A malformed or empty element stops the walk and the last address already
    walked over (a trusted proxy), or the peer when there is none, is the
    client: the element was written either by a trusted proxy that did not
    know its client (e.g. nginx/Squid's ``unknown``) or by the client
    itself, and in both cases nothing to its left can be believed.  nginx's
    ``real_ip_recursive`` does the same with an unparsable element (its
    ``ngx_http_get_forwarded_addr_internal`` keeps the last good address);
    nginx skips empty elements where we stop (no well-behaved proxy writes
    one, so it is the client's).  The first untrusted element from the right,
    never the left-most one, is the client for the same reason: everything
    left of it is the client's own text.  Addresses taken from the header are
    returned as canonical text (``2001:db8::1``; a port is dropped).
    """
    if not trusted or peer not in trusted:
        return peer
    client = peer
    for value in reversed(forwarded_for):
        for element in reversed(value.split(",")):
            address = _forwarded_address(element.strip(" \t"))
            if address is None:
                return client
            client = address
            if address not in trusted:
                return client
    return client


# --- rate limits --------------------------------------------------------------------------

@dataclass(frozen=True)
class Rate:
    """A token bucket's refill rate (tokens per second) and capacity (``burst``, >= 1)."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if not (0 < self.per_second < math.inf) or not (1 <= self.burst < math.inf):
            raise ValueError(f"bad rate: {self.per_second!r}/s, burst {self.burst!r}")

    def __str__(self) -> str:
        return f"{self.per_second:g}/s burst {self.burst:g}"


_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)/([sm])")
_SECONDS = {"s": 1.0, "m": 60.0}


def parse_rate(text: str, burst: float | None = None) -> Rate:
    """``"20/s"`` or ``"30/m"`` (and an optional burst) -> ``Rate``; ValueError with the reason.

    The default burst is one second's worth of tokens, at least 1 (so
    ``"30/m"`` allows one request, then one every two seconds).  A burst
    below 1 could never grant a request and is refused.
    """
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a rate: use N/s or N/m with N a positive number, e.g. '20/s'")
    per_second = float(match.group(1)) / _SECONDS[match.group(2)]
    if not per_second > 0 or not math.isfinite(per_second):
        raise ValueError(f"{text!r} is not a rate: N must be a positive number")
    if burst is None:
        return Rate(per_second, max(1.0, per_second))
    if isinstance(burst, bool) or not isinstance(burst, (int, float)) \
            or not math.isfinite(burst) or burst < 1:
        raise ValueError(f"burst {burst!r} is not a number of requests >= 1")
    return Rate(per_second, float(burst))


class _Bucket:
    __slots__ = ("tokens", "stamp", "full_at")

    def __init__(self, tokens: float, stamp: float, full_at: float) -> None:
        self.tokens = tokens  # tokens left at ``stamp``
        self.stamp = stamp  # the caller's clock (monotonic seconds) at the last take
        self.full_at = full_at  # when the bucket is full again: from then on it equals no bucket


class RateLimiter:
    """Token buckets keyed by any hashable; ``take`` says whether a request may pass.

    A key without a bucket has a full one (``rate.burst`` tokens); a bucket
    refills at ``rate.per_second`` up to ``rate.burst``.  ``now`` is the
    caller's monotonic clock, passed in so tests are deterministic; a clock
    that goes backwards refills nothing.

    Memory is bounded by ``max_keys``: buckets are kept in least-recently-used
    order; each new key first drops up to two of the oldest buckets if they
    are full by now (a full bucket is the same as no bucket, so dropping it
    changes nothing), and when the table is still at ``max_keys`` it drops the
    least recently used bucket anyway (the stale one: that key, if it comes
    back, gets at most ``burst`` tokens too many).  Every call is O(1).

    ``_lock`` guards ``_buckets`` (and every bucket in it): read, refill,
    take and eviction happen under it, so a token is never spent twice.
    """

    SWEEP = 2  # full buckets dropped (at most) per new key

    def __init__(self, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()  # guarded by _lock; oldest first

    def take(self, key: Hashable, rate: Rate, now: float) -> float:
        """Take one token for ``key``: 0.0 if taken, else seconds until one is available (> 0)."""
        with self._lock:
            buckets = self._buckets
            bucket = buckets.get(key)
            if bucket is None:
                self._make_room(now)
                tokens = rate.burst
                bucket = buckets[key] = _Bucket(tokens, now, now)
            else:
                buckets.move_to_end(key)
                # min(): also when a reload lowered the burst.  (A test pauses a take between
                # reading bucket.tokens and reading rate.per_second, to force a concurrent take.)
                tokens = min(rate.burst, bucket.tokens + max(0.0, now - bucket.stamp) * rate.per_second)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / rate.per_second
            bucket.tokens = tokens
            bucket.stamp = max(now, bucket.stamp)
            bucket.full_at = bucket.stamp + (rate.burst - tokens) / rate.per_second
            return wait

    def _make_room(self, now: float) -> None:
        """Before adding a key: drop full buckets at the old end, then the oldest if still at max_keys."""
        buckets = self._buckets  # caller holds _lock
        for _ in range(self.SWEEP):
            if not buckets:
                return
            oldest = next(iter(buckets))
            if buckets[oldest].full_at > now:
                break
            del buckets[oldest]
        if len(buckets) >= self.max_keys:
            buckets.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

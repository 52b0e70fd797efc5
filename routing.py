"""Layer-7 routing: which pool (or which answer) a request gets, as pure functions.

``parse_routes`` turns the config's ``[[routes]]`` tables into checked
``Route`` objects (``RouteError`` names the route and key); ``RouteTable``
compiles them for fast matching; ``decide(method, target, host, headers,
client, table)`` is the whole decision for one request: forward to a pool
(maybe with its path stripped and header rules), redirect, respond, refuse
(403) or not found (404).  No sockets, no clocks: the proxy calls these and
does what they say; the rate limit (the one stateful rule) is applied by the
caller with ``access.RateLimiter`` on the ``Route.rate`` a decision carries.

First match wins, in file order.  A request no route takes goes to the pool
``default`` when it exists, else gets 404 from cclb.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, Sequence

from access import AddressList, Rate, parse_rate
from http11 import HOP_BY_HOP, Fields, Headers

DEFAULT_POOL = "default"

ROUTE_KEYS = frozenset({
    "name", "host", "path_prefix", "strip_prefix", "methods", "headers", "pool", "redirect",
    "status", "respond", "body", "request_headers", "response_headers", "allow", "deny",
    "rate_limit", "rate_limit_burst",
})
REDIRECT_STATUSES = (301, 302, 307, 308)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.6.2
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # RFC 9110 5.5: no CR, LF, NUL
_HOST_PATTERN = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9\-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]*[a-z0-9])?)*\.?")

# Header rules may not touch what frames or routes the message (RFC 9110 7.6.1
# hop-by-hop fields, RFC 9112 6 framing); Host may only be set.
FORBIDDEN_RULE_FIELDS = HOP_BY_HOP | {"content-length", "transfer-encoding"}


class RouteError(ValueError):
    """A bad route or pool in the configuration; ``key`` is e.g. ``routes[2].pool``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class HeaderRules:
    """``set`` (replace every field of that name), ``add`` (append), ``remove`` (drop).

    Applied in the order remove, set, add.  Names in ``remove`` are lower case.
    """

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)

    def apply(self, fields: Fields) -> Fields:
        """A new ``Fields`` with the rules applied (``fields`` is left alone)."""
        drop = self.remove | {name.lower() for name, _ in self.set}
        result = Fields((name, value) for (name, value), lname in zip(fields.items, fields.lnames)
                        if lname not in drop)
        for name, value in self.set:
            result.add(name, value)
        for name, value in self.add:
            result.add(name, value)
        return result


NO_RULES = HeaderRules()


@dataclass(frozen=True, eq=False)
class Route:
    """One ``[[routes]]`` table, checked.  ``index`` is its position in the file (from 0)."""

    index: int
    name: str
    host: str | None = None  # lower case, no port; "*.example.com" for a wildcard
    path_prefix: str | None = None
    strip_prefix: bool = False
    methods: frozenset[str] | None = None
    headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, exact value)
    pool: str | None = None
    redirect: str | None = None
    status: int = 302  # of a redirect
    respond: int | None = None
    body: str = ""
    request_headers: HeaderRules = NO_RULES
    response_headers: HeaderRules = NO_RULES
    allow: AddressList | None = None
    deny: AddressList | None = None
    rate: Rate | None = None

    def refuses(self, client: str) -> bool:
        """``deny`` first, then ``allow``: whether ``client`` gets a 403 here."""
        if self.deny is not None and client in self.deny:
            return True
        return self.allow is not None and client not in self.allow


# --- decisions ------------------------------------------------------------------

class Forward(NamedTuple):
    """Send the request to ``pool``, with ``target`` as the request target.

    (Decisions are NamedTuples: made per request, and a frozen dataclass's
    ``__init__`` costs several times as much.)
    """

    route: Route | None  # None: no route matched, the default pool takes it
    pool: str
    target: str


class Answer(NamedTuple):
    """cclb answers itself: a redirect (``location``), a configured response, 403 or 404."""

    route: Route | None
    status: int
    body: str = ""
    location: str | None = None
    refused: bool = False  # a refusal (403, 404), not an answer the route is configured to give


Decision = Forward | Answer


# One route as the matching loop wants it: (path prefix, "" for any; methods or
# None; header matches; wildcard suffix ".example.com" or None; the route).
Entry = tuple[str, "frozenset[str] | None", "tuple[tuple[str, str], ...]", "str | None", "Route"]


@dataclass(frozen=True, slots=True)
class Candidates:
    """Routes that may match one host, narrowed further by the path's first segment.

    A route whose prefix names a whole first segment ("/api/...") is only in
    ``by_segment[that segment]``; the others ("/", "/api", none) are in every
    list and in ``rest``, which serves a path whose first segment no prefix
    names.  Every list keeps file order, so the first match still wins.
    """

    by_segment: dict[str, tuple[Entry, ...]]
    rest: tuple[Entry, ...]

    @classmethod
    def of(cls, entries: Sequence[Entry]) -> Candidates:
        keys = [segment_of(entry[0]) for entry in entries]
        by_segment = {key: tuple(e for e, k in zip(entries, keys) if k is None or k == key)
                      for key in set(keys) if key is not None}
        return cls(by_segment, tuple(e for e, k in zip(entries, keys) if k is None))


def segment_of(path: str) -> str | None:
    """The first segment of ``path`` when the path goes on after it ("/a/b" -> "a"), else None."""
    end = path.find("/", 1)
    return path[1:end] if end > 0 else None


@dataclass(frozen=True, eq=False)
class RouteTable:
    """The compiled routes and the pool names they may use; swapped whole on reload.

    Matching narrows the routes by host, then by the path's first segment
    (``Candidates``): ``by_host`` holds, for every exact host named by a
    route, the routes that can match it (host-less ones, wildcards that
    cover it, and its own) in file order; any other host tries ``other``
    (host-less routes and wildcards, the latter checked).
    """

    routes: tuple[Route, ...] = ()
    pools: frozenset[str] = frozenset({DEFAULT_POOL})
    by_host: dict[str, Candidates] = field(default_factory=dict)
    other: Candidates = Candidates({}, ())

    @classmethod
    def build(cls, routes: Sequence[Route], pools: Iterable[str]) -> RouteTable:
        def entry(route: Route, check_host: bool) -> Entry:
            wildcard = route.host[1:] if check_host and route.host and route.host.startswith("*.") else None
            return (route.path_prefix or "", route.methods, route.headers, wildcard, route)

        exact = {route.host for route in routes if route.host and not route.host.startswith("*.")}
        by_host = {host: Candidates.of([entry(route, False) for route in routes
                                        if host_matches(route.host, host)])
                   for host in exact}
        other = Candidates.of([entry(route, True) for route in routes
                               if route.host is None or route.host.startswith("*.")])
        return cls(tuple(routes), frozenset(pools), by_host, other)

    @property
    def default(self) -> str | None:
        return DEFAULT_POOL if DEFAULT_POOL in self.pools else None


def host_matches(pattern: str | None, host: str) -> bool:
    """``pattern`` (None: any; "*.example.com": any subdomain) against a normalised host."""
    if pattern is None:
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def normalise_host(host: str | None) -> str:
    """The Host value without its port, lower case, without a trailing dot (RFC 9110 7.2)."""
    if not host:
        return ""
    if host.startswith("["):  # an IPv6 literal
        return host[:host.find("]") + 1].lower()
    name = host.rpartition(":")[0] if ":" in host else host
    return name.rstrip(".").lower()


def match(method: str, path: str, host: str, fields: Fields, table: RouteTable) -> Route | None:
    """The first route that takes the request, or None.  ``host`` is normalised.

    The hot loop of routing: plain tuple unpacking and string tests, the
    cheapest test (the path prefix) first.
    """
    narrowed = table.by_host.get(host)
    if narrowed is None:
        narrowed = table.other
    end = path.find("/", 1)
    candidates = narrowed.rest if end < 0 else narrowed.by_segment.get(path[1:end], narrowed.rest)
    index = fields.index
    for prefix, methods, headers, wildcard, route in candidates:
        if not path.startswith(prefix):
            continue
        if methods is not None and method not in methods:
            continue
        if wildcard is not None and not (host.endswith(wildcard) and len(host) > len(wildcard)):
            continue
        if headers and not all(value in index.get(lname, ()) for lname, value in headers):
            continue
        return route
    return None


def decide(method: str, target: str, host: str | None, fields: Fields, client: str,
           table: RouteTable) -> Decision:
    """What to do with one request: a pure function of its head, the client and the table.

    Routes match the normalised path (``normalise_path``), and a request
    whose path it changed is forwarded normalised, so that a backend never
    reads a path other than the one that chose its route (``/api/../admin``
    cannot slip past a route on ``/admin/``).
    """
    path, question, query = target.partition("?")
    if table.routes:
        normal = normalise_path(path)
        if normal is not path:
            path, target = normal, normal + question + query
    route = match(method, path, normalise_host(host), fields, table) if table.routes else None
    if route is None:
        default = table.default
        if default is None:
            return Answer(None, 404, "no route for this request", refused=True)
        return Forward(None, default, target)
    if route.refuses(client):
        return Answer(route, 403, "access denied", refused=True)
    if route.redirect is not None:
        return Answer(route, route.status, location=with_query(route.redirect, query, bool(question)))
    if route.respond is not None:
        return Answer(route, route.respond, route.body)
    assert route.pool is not None
    if route.strip_prefix and route.path_prefix:
        target = strip(path, route.path_prefix) + question + query
    return Forward(route, route.pool, target)


def normalise_path(path: str) -> str:
    """``path`` with ``%2e`` decoded, empty segments merged and dot-segments removed.

    RFC 3986 6.2.2.2-3 and 5.2.4 (``remove_dot_segments``); merging "//"
    is nginx's ``merge_slashes``.  Returns ``path`` itself (the same object)
    when there is nothing to do, which is the usual case.  ``%2F`` stays
    encoded: it is data, not a separator.  "*" (OPTIONS) is left alone.
    """
    if path[:1] != "/" or ("/." not in path and "//" not in path and "%2" not in path):
        return path  # the usual case, three substring tests
    segments: list[str] = []
    parts = path.replace("%2e", ".").replace("%2E", ".").split("/")
    for segment in parts[1:]:
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in (".", ""):
            segments.append(segment)
    trailing = parts[-1] in ("", ".", "..") and bool(segments)
    normal = "/" + "/".join(segments) + ("/" if trailing else "")
    return path if normal == path else normal


def strip(path: str, prefix: str) -> str:
    """``path`` without ``prefix``, keeping a leading "/"."""
    rest = path[len(prefix):]
    return rest if rest.startswith("/") else "/" + rest


def with_query(location: str, query: str, had_query: bool) -> str:
    """The redirect target with the request's query kept."""
    if not had_query:
        return location
    return f"{location}{'&' if '?' in location else '?'}{query}"


# --- sticky sessions ------------------------------------------------------------

def sticky_value(key: bytes, url: str) -> str:
    """The cookie value naming a backend: a keyed hash of its URL (reveals no address)."""
    return hmac.new(key, url.encode("utf-8"), hashlib.sha256).hexdigest()[:20]


def cookie_value(fields: Fields, name: str) -> str | None:
    """The value of cookie ``name`` in the request's Cookie fields (RFC 6265 5.4), or None."""
    for header in fields.index.get("cookie", ()):
        for pair in header.split(";"):
            key, eq, value = pair.strip().partition("=")
            if eq and key == name:
                return value.strip().strip('"')
    return None


def set_cookie(name: str, value: str) -> tuple[str, str]:
    return ("Set-Cookie", f"{name}={value}; Path=/; HttpOnly; SameSite=Lax")


# --- parsing the configuration --------------------------------------------------

def parse_routes(raw: Any, pools: Iterable[str]) -> RouteTable:
    """The ``[[routes]]`` array, checked against the pool names; RouteError if bad."""
    pools = frozenset(pools)
    if not isinstance(raw, list):
        raise RouteError("routes", "expected an array of tables ([[routes]])")
    routes = [parse_route(index, item, pools) for index, item in enumerate(raw)]
    names = [route.name for route in routes]
    for route in routes:
        if names.count(route.name) > 1:
            raise RouteError(f"routes[{route.index}].name", f"duplicate route name {route.name!r}")
    return RouteTable.build(routes, pools)


def parse_route(index: int, item: Any, pools: frozenset[str]) -> Route:
    where = f"routes[{index}]"
    if not isinstance(item, dict):
        raise RouteError(where, "expected a table")
    unknown = sorted(set(item) - ROUTE_KEYS)
    if unknown:
        raise RouteError(f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(ROUTE_KEYS))})")

    def key(name: str) -> str:
        return f"{where}.{name}"

    def text(name: str) -> str | None:
        value = item.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise RouteError(key(name), f"expected a non-empty string, got {value!r}")
        return value

    name = text("name") or str(index)
    if not _TOKEN.fullmatch(name):
        raise RouteError(key("name"), f"use letters, digits, '-', '_' or '.', got {name!r}")
    host = text("host")
    if host is not None:
        host = host.lower().rstrip(".")
        if not _HOST_PATTERN.fullmatch(host):
            raise RouteError(key("host"), f"expected a host name or *.domain, got {item['host']!r}")
    prefix = text("path_prefix")
    if prefix is not None and (not prefix.startswith("/") or _BAD_VALUE.search(prefix) or " " in prefix):
        raise RouteError(key("path_prefix"), f"must be a path starting with /, got {prefix!r}")
    strip_prefix = item.get("strip_prefix", False)
    if not isinstance(strip_prefix, bool):
        raise RouteError(key("strip_prefix"), f"expected true or false, got {strip_prefix!r}")
    if strip_prefix and prefix is None:
        raise RouteError(key("strip_prefix"), "needs a path_prefix")
    methods = item.get("methods")
    if methods is not None:
        if not isinstance(methods, list) or not methods or not all(
                isinstance(m, str) and _TOKEN.fullmatch(m) for m in methods):
            raise RouteError(key("methods"), f"expected a list of methods, got {methods!r}")
        methods = frozenset(m.upper() for m in methods)
    headers = _string_table(item.get("headers", {}), key("headers"))
    actions = [k for k in ("pool", "redirect", "respond") if k in item]
    if len(actions) != 1:
        raise RouteError(where, "needs exactly one of pool, redirect or respond"
                         + (f", not {' and '.join(actions)}" if actions else ""))
    pool, redirect, respond = text("pool"), text("redirect"), item.get("respond")
    if pool is not None and pool not in pools:
        raise RouteError(key("pool"), f"unknown pool {pool!r} (pools: {', '.join(sorted(pools)) or 'none'})")
    if redirect is not None and _BAD_VALUE.search(redirect):
        raise RouteError(key("redirect"), "must not contain control characters")
    status = item.get("status", 302)
    if "status" in item and redirect is None:
        raise RouteError(key("status"), "only a redirect takes a status")
    if isinstance(status, bool) or status not in REDIRECT_STATUSES:
        raise RouteError(key("status"), f"must be one of {', '.join(map(str, REDIRECT_STATUSES))}, got {status!r}")
    if respond is not None and (isinstance(respond, bool) or not isinstance(respond, int)
                                or not 200 <= respond <= 599 or respond in (204, 304)):
        raise RouteError(key("respond"), f"expected a status in 200..599 (not 204 or 304: "
                         f"they have no body), got {respond!r}")
    body = item.get("body", "")
    if "body" in item and respond is None:
        raise RouteError(key("body"), "only respond takes a body")
    if not isinstance(body, str):
        raise RouteError(key("body"), f"expected a string, got {body!r}")
    request_rules = parse_header_rules(item.get("request_headers"), key("request_headers"), host_settable=True)
    response_rules = parse_header_rules(item.get("response_headers"), key("response_headers"), host_settable=False)
    if pool is None and (request_rules or strip_prefix):
        bad = "request_headers" if request_rules else "strip_prefix"
        raise RouteError(key(bad), "only applies to a route with a pool")
    allow = _address_list(item, "allow", key("allow"))
    deny = _address_list(item, "deny", key("deny"))
    rate = None
    if "rate_limit" in item:
        rate = _rate(item["rate_limit"], item.get("rate_limit_burst"), key)
    elif "rate_limit_burst" in item:
        raise RouteError(key("rate_limit_burst"), "needs a rate_limit")
    return Route(index, name, host, prefix, strip_prefix, methods,
                 tuple((n.lower(), v) for n, v in headers), pool, redirect, status, respond, body,
                 request_rules, response_rules, allow, deny, rate)


def _string_table(value: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(value, dict):
        raise RouteError(where, f"expected a table of name = \"value\", got {value!r}")
    pairs = []
    for name, text in value.items():
        if not _TOKEN.fullmatch(name):
            raise RouteError(where, f"invalid header name {name!r}")
        if not isinstance(text, str) or _BAD_VALUE.search(text):
            raise RouteError(f"{where}.{name}", f"expected a header value (a string without control characters), got {text!r}")
        pairs.append((name, text))
    return pairs


def parse_header_rules(value: Any, where: str, host_settable: bool) -> HeaderRules:
    """``{ set = {...}, add = {...}, remove = [...] }``; RouteError on forbidden fields."""
    if value is None:
        return NO_RULES
    if not isinstance(value, dict) or set(value) - {"set", "add", "remove"}:
        raise RouteError(where, f"expected a table with set, add and/or remove, got {value!r}")
    set_ = _string_table(value.get("set", {}), f"{where}.set")
    add = _string_table(value.get("add", {}), f"{where}.add")
    remove = value.get("remove", [])
    if not isinstance(remove, list) or not all(isinstance(n, str) and _TOKEN.fullmatch(n) for n in remove):
        raise RouteError(f"{where}.remove", f"expected a list of header names, got {remove!r}")
    for part, names in (("set", [n for n, _ in set_]), ("add", [n for n, _ in add]), ("remove", remove)):
        for name in names:
            lname = name.lower()
            if lname in FORBIDDEN_RULE_FIELDS:
                raise RouteError(f"{where}.{part}", f"{name} cannot be changed by a header rule "
                                 "(hop-by-hop or framing field)")
            if lname == "host" and not (host_settable and part == "set"):
                raise RouteError(f"{where}.{part}", "Host can only be set (request_headers.set)")
    return HeaderRules(tuple(set_), tuple(add), frozenset(n.lower() for n in remove))


def _address_list(item: dict[str, Any], name: str, where: str) -> AddressList | None:
    if name not in item:
        return None
    value = item[name]
    if not isinstance(value, list) or not all(isinstance(entry, str) for entry in value):
        raise RouteError(where, f"expected a list of addresses or CIDRs, got {value!r}")
    try:
        return AddressList(value, name)
    except ValueError as error:
        raise RouteError(where, str(error)) from None


def _rate(value: Any, burst: Any, key: Any) -> Rate:
    if not isinstance(value, str):
        raise RouteError(key("rate_limit"), f"expected a rate such as \"20/s\" or \"100/m\", got {value!r}")
    if burst is not None and (isinstance(burst, bool) or not isinstance(burst, (int, float)) or burst < 1):
        raise RouteError(key("rate_limit_burst"), f"expected a number of requests >= 1, got {burst!r}")
    try:
        return parse_rate(value, None if burst is None else float(burst))
    except ValueError as error:
        raise RouteError(key("rate_limit"), str(error)) from None


def apply_rules(headers: Headers, rules: HeaderRules) -> Headers:
    """Response header rules on a list of fields (the response plan's)."""
    return rules.apply(Fields(headers)).items

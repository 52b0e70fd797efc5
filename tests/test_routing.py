"""routing.py: route parsing, matching and decisions, table-driven and without sockets."""

from __future__ import annotations

import re
import unittest
from typing import Any

from http11 import Fields
from routing import (Answer, Forward, HeaderRules, RouteError, RouteTable, cookie_value, decide,
                     normalise_host, normalise_path, parse_routes, set_cookie, sticky_value, strip,
                     with_query)

POOLS = ("default", "api", "web")


def table(*routes: dict[str, Any], pools: tuple[str, ...] = POOLS) -> RouteTable:
    return parse_routes(list(routes), pools)


def request(t: RouteTable, target: str = "/", host: str | None = "example.com", method: str = "GET",
            headers: tuple[tuple[str, str], ...] = (), client: str = "127.0.0.1") -> Any:
    return decide(method, target, host, Fields(headers), client, t)


class MatchTest(unittest.TestCase):
    ROUTES = table(
        {"host": "api.example.com", "path_prefix": "/v1/", "strip_prefix": True, "pool": "api"},
        {"host": "api.example.com", "methods": ["POST"], "pool": "web"},
        {"host": "*.example.org", "pool": "web"},
        {"path_prefix": "/static/", "headers": {"X-Canary": "1"}, "pool": "api"},
        {"path_prefix": "/static/", "pool": "web"},
        {"path_prefix": "/old", "redirect": "https://example.com/new", "status": 308},
        {"path_prefix": "/gone", "respond": 410, "body": "gone for good"},
    )

    def test_first_match_wins_in_file_order(self) -> None:
        cases = [
            # (method, target, host, headers) -> (pool or status, forwarded target)
            (("GET", "/v1/users?x=1", "api.example.com", ()), ("api", "/users?x=1")),
            (("GET", "/v1/users", "API.Example.COM:8080", ()), ("api", "/users")),
            (("GET", "/v1/", "api.example.com", ()), ("api", "/")),
            (("POST", "/other", "api.example.com", ()), ("web", "/other")),
            (("GET", "/other", "api.example.com", ()), ("default", "/other")),
            (("GET", "/x", "a.example.org", ()), ("web", "/x")),
            (("GET", "/x", "a.b.example.org.", ()), ("web", "/x")),
            (("GET", "/x", "example.org", ()), ("default", "/x")),  # a wildcard needs a label
            (("GET", "/static/a.css", "x", (("x-canary", "1"),)), ("api", "/static/a.css")),
            (("GET", "/static/a.css", "x", (("X-Canary", "2"),)), ("web", "/static/a.css")),
            (("GET", "/static", "x", ()), ("default", "/static")),
            (("GET", "/v1/users", "api.example.com.", ()), ("api", "/users")),
            (("GET", "*", None, ()), ("default", "*")),
        ]
        for (method, target, host, headers), (pool, forwarded) in cases:
            with self.subTest(method=method, target=target, host=host):
                decision = request(self.ROUTES, target, host, method, headers)
                self.assertIsInstance(decision, Forward)
                self.assertEqual((decision.pool, decision.target), (pool, forwarded))

    def test_narrowing_by_segment_keeps_file_order(self) -> None:
        t = table({"path_prefix": "/api/v2/", "pool": "web"},
                  {"path_prefix": "/api", "pool": "api"},      # no trailing slash: /apiary too
                  {"path_prefix": "/api/", "pool": "web"},     # shadowed by the one above
                  {"host": "h.example.com", "path_prefix": "/", "pool": "web"},
                  {"host": "*.example.com", "path_prefix": "/x/", "pool": "web"},
                  pools=("api", "web"))
        cases = [("/api/v2/a", "a.b", "web"), ("/api/v1", "a.b", "api"), ("/apiary/x", "a.b", "api"),
                 ("/api", "a.b", "api"), ("/x/1", "a.example.com", "web"), ("/x/1", "a.b", None),
                 ("/api/v2/", "h.example.com", "web"), ("/api/v1", "h.example.com", "api"),
                 ("/other/1", "h.example.com", "web"), ("/", "h.example.com", "web"),
                 ("/", "a.b", None), ("/x", "a.example.com", None)]
        for target, host, pool in cases:
            with self.subTest(target=target, host=host):
                decision = request(t, target, host)
                self.assertEqual(decision.pool if isinstance(decision, Forward) else None, pool)

    def test_paths_are_matched_and_forwarded_normalised(self) -> None:
        cases = [
            ("/a/b", "/a/b"), ("/", "/"), ("/a/", "/a/"), ("/a/./b", "/a/b"), ("/a/../b", "/b"),
            ("/../../b", "/b"), ("/a/..", "/"), ("/a/b/..", "/a/"), ("/a/.", "/a/"),
            ("//a//b", "/a/b"), ("/a/%2e%2E/b", "/b"), ("/a/%2E/b", "/a/b"), ("/a%2Fb", "/a%2Fb"),
            ("/a/.b/..c", "/a/.b/..c"), ("*", "*"), ("/api/..%2fadmin", "/api/..%2fadmin"),
        ]
        for path, normal in cases:
            with self.subTest(path=path):
                self.assertEqual(normalise_path(path), normal)
        self.assertIs(normalise_path("/plain/path"), normalise_path("/plain/path"))
        t = table({"path_prefix": "/admin/", "respond": 403},
                  {"path_prefix": "/api/", "pool": "api"})
        for target in ("/api/../admin/x", "/api/%2e%2e/admin/x", "//admin/x", "/./admin/x"):
            with self.subTest(target=target):
                self.assertEqual(request(t, target).status, 403)
        self.assertEqual(request(t, "/api/v1/../users?a=../b"),
                         Forward(t.routes[1], "api", "/api/users?a=../b"))

    def test_redirect_keeps_the_query(self) -> None:
        cases = [
            ("/old", "https://example.com/new"),
            ("/old/x?a=1&b=2", "https://example.com/new?a=1&b=2"),
            ("/old?", "https://example.com/new?"),
        ]
        for target, location in cases:
            with self.subTest(target=target):
                self.assertEqual(request(self.ROUTES, target),
                                 Answer(self.ROUTES.routes[5], 308, location=location))
        self.assertEqual(with_query("https://x/?a=1", "b=2", True), "https://x/?a=1&b=2")

    def test_respond(self) -> None:
        self.assertEqual(request(self.ROUTES, "/gone"),
                         Answer(self.ROUTES.routes[6], 410, "gone for good"))

    def test_no_route_and_no_default_pool_is_404(self) -> None:
        t = table({"host": "a", "pool": "api"}, pools=("api",))
        decision = request(t, "/", "b")
        self.assertIsInstance(decision, Answer)
        self.assertEqual((decision.status, decision.route), (404, None))
        self.assertEqual(request(t, "/", "a"), Forward(t.routes[0], "api", "/"))

    def test_no_routes_at_all_goes_to_default(self) -> None:
        self.assertEqual(request(table(), "/a?b"), Forward(None, "default", "/a?b"))

    def test_helpers(self) -> None:
        for host, normal in [("Example.COM:80", "example.com"), ("[::1]:8080", "[::1]"),
                             ("a.b.", "a.b"), (None, ""), ("", "")]:
            self.assertEqual(normalise_host(host), normal)
        for path, prefix, stripped in [("/api/x", "/api/", "/x"), ("/api/x", "/api", "/x"),
                                       ("/api", "/api", "/"), ("/api/", "/api/", "/")]:
            self.assertEqual(strip(path, prefix), stripped)


class AccessTest(unittest.TestCase):
    def test_deny_is_checked_first_then_allow(self) -> None:
        t = table({"path_prefix": "/a", "pool": "api", "allow": ["10.0.0.0/8", "::1"],
                   "deny": ["10.9.0.0/16"]},
                  {"path_prefix": "/b", "pool": "api", "deny": ["192.0.2.0/24"]})
        cases = [("/a", "10.1.1.1", 200), ("/a", "10.9.1.1", 403), ("/a", "127.0.0.1", 403),
                 ("/a", "::1", 200), ("/b", "192.0.2.9", 403), ("/b", "127.0.0.1", 200)]
        for target, client, status in cases:
            with self.subTest(target=target, client=client):
                decision = request(t, target, client=client)
                self.assertEqual(decision.status if isinstance(decision, Answer) else 200, status)

    def test_rates_and_lists_are_checked(self) -> None:
        route = table({"pool": "api", "rate_limit": "20/s"}).routes[0]
        self.assertEqual((route.rate.per_second, route.rate.burst), (20.0, 20.0))
        route = table({"pool": "api", "rate_limit": "100/m", "rate_limit_burst": 40}).routes[0]
        self.assertEqual(route.rate.burst, 40.0)
        for bad, key in [({"rate_limit": "fast"}, "routes[0].rate_limit"),
                         ({"rate_limit": "1/s", "rate_limit_burst": 0}, "routes[0].rate_limit_burst"),
                         ({"allow": ["10.0.0.0/33"]}, "routes[0].allow"),
                         ({"deny": ["nonsense"]}, "routes[0].deny")]:
            with self.subTest(bad=bad):
                with self.assertRaisesRegex(RouteError, rf"^{re.escape(key)}: "):
                    table({"pool": "api", **bad})


class HeaderRulesTest(unittest.TestCase):
    def test_remove_then_set_then_add(self) -> None:
        rules = HeaderRules(set=(("X-Env", "prod"),), add=(("X-Via", "cclb"),),
                            remove=frozenset({"x-debug"}))
        fields = Fields([("Host", "a"), ("X-Debug", "1"), ("x-env", "dev"), ("X-Via", "edge"),
                         ("X-ENV", "test")])
        self.assertEqual(rules.apply(fields).items,
                         [("Host", "a"), ("X-Via", "edge"), ("X-Env", "prod"), ("X-Via", "cclb")])
        self.assertEqual(fields.items[1], ("X-Debug", "1"))  # the input is untouched
        self.assertFalse(HeaderRules())

    def test_rules_parsed_from_the_config(self) -> None:
        t = table({"pool": "api", "request_headers": {"set": {"Host": "internal", "X-Env": "prod"},
                                                       "add": {"X-Via": "cclb"}, "remove": ["X-Debug"]},
                   "response_headers": {"set": {"X-Frame-Options": "DENY"}, "remove": ["Server"]}})
        route = t.routes[0]
        self.assertEqual(route.request_headers, HeaderRules((("Host", "internal"), ("X-Env", "prod")),
                                                            (("X-Via", "cclb"),), frozenset({"x-debug"})))
        self.assertEqual(route.response_headers.remove, frozenset({"server"}))


class SettingsErrorsTest(unittest.TestCase):
    def test_bad_routes_name_the_key(self) -> None:
        cases = [
            ({"pool": "nope"}, "routes[0].pool: unknown pool 'nope'"),
            ({"pool": "api", "redirect": "https://x/"}, "routes[0]: needs exactly one of pool, redirect or respond, not pool and redirect"),
            ({"host": "a"}, "routes[0]: needs exactly one of"),
            ({"pool": "api", "colour": "red"}, "routes[0].colour: unknown key"),
            ({"redirect": "https://x/", "status": 200}, "routes[0].status: must be one of 301, 302, 307, 308"),
            ({"respond": 99}, "routes[0].respond: expected a status in 200..599"),
            ({"respond": True}, "routes[0].respond: expected a status"),
            ({"pool": "api", "status": 301}, "routes[0].status: only a redirect"),
            ({"pool": "api", "host": "bad host"}, "routes[0].host: expected a host name"),
            ({"pool": "api", "path_prefix": "api"}, "routes[0].path_prefix: must be a path"),
            ({"pool": "api", "strip_prefix": True}, "routes[0].strip_prefix: needs a path_prefix"),
            ({"pool": "api", "methods": "GET"}, "routes[0].methods: expected a list"),
            ({"pool": "api", "headers": {"X A": "1"}}, "routes[0].headers: invalid header name"),
            ({"pool": "api", "headers": {"X-A": "a\nb"}}, "routes[0].headers.X-A: expected a header value"),
            ({"pool": "api", "request_headers": {"set": {"Connection": "close"}}},
             "routes[0].request_headers.set: Connection cannot be changed"),
            ({"pool": "api", "request_headers": {"remove": ["Content-Length"]}},
             "routes[0].request_headers.remove: Content-Length cannot be changed"),
            ({"pool": "api", "response_headers": {"add": {"Transfer-Encoding": "chunked"}}},
             "routes[0].response_headers.add: Transfer-Encoding cannot be changed"),
            ({"pool": "api", "request_headers": {"remove": ["Host"]}},
             "routes[0].request_headers.remove: Host can only be set"),
            ({"pool": "api", "request_headers": {"add": {"host": "x"}}},
             "routes[0].request_headers.add: Host can only be set"),
            ({"pool": "api", "request_headers": {"replace": {}}}, "routes[0].request_headers: expected a table"),
            ({"respond": 403, "request_headers": {"set": {"X": "1"}}},
             "routes[0].request_headers: only applies to a route with a pool"),
            ({"pool": "api", "rate_limit_burst": 3}, "routes[0].rate_limit_burst: needs a rate_limit"),
            ({"pool": "api", "allow": "10.0.0.0/8"}, "routes[0].allow: expected a list"),
        ]
        for route, message in cases:
            with self.subTest(route=route):
                with self.assertRaises(RouteError) as caught:
                    table(route)
                self.assertIn(message, str(caught.exception))

    def test_the_index_counts_from_zero_in_file_order(self) -> None:
        with self.assertRaisesRegex(RouteError, r"routes\[2\]\.pool"):
            table({"pool": "api"}, {"pool": "web"}, {"pool": "other"})
        with self.assertRaisesRegex(RouteError, "duplicate route name 'x'"):
            table({"name": "x", "pool": "api"}, {"name": "x", "pool": "web"})
        with self.assertRaisesRegex(RouteError, "routes: expected an array"):
            parse_routes({"pool": "api"}, POOLS)


class StickyTest(unittest.TestCase):
    def test_cookie_value_is_a_keyed_hash(self) -> None:
        url = "http://10.0.0.7:7000"
        value = sticky_value(b"key", url)
        self.assertEqual(value, sticky_value(b"key", url))  # stable
        self.assertNotEqual(value, sticky_value(b"other", url))
        self.assertNotEqual(value, sticky_value(b"key", "http://10.0.0.7:7001"))
        self.assertNotIn("10.0.0.7", value)
        self.assertRegex(value, r"^[0-9a-f]{20}$")

    def test_cookie_parsing(self) -> None:
        cases = [
            ((("Cookie", "a=1; cclb=abc; b=2"),), "abc"),
            ((("Cookie", "a=1"), ("Cookie", "cclb=\"q\"")), "q"),
            ((("Cookie", "xcclb=1; cclb"),), None),
            ((), None),
        ]
        for headers, value in cases:
            with self.subTest(headers=headers):
                self.assertEqual(cookie_value(Fields(headers), "cclb"), value)
        self.assertEqual(set_cookie("n", "v"), ("Set-Cookie", "n=v; Path=/; HttpOnly; SameSite=Lax"))


if __name__ == "__main__":
    unittest.main()

"""Named pools and [[routes]]: the configuration (exit 2 on errors) and end to end."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import unittest
from pathlib import Path
from unittest import mock

import cclb
import server
import settings
from tests.support import Balancer, admin_status, read_until_close, wait_admin_port, wait_for

ROOT = Path(__file__).resolve().parent.parent


def write_config(test: unittest.TestCase, text: str) -> str:
    handle, path = tempfile.mkstemp(suffix=".toml")
    with os.fdopen(handle, "w") as out:
        out.write(textwrap.dedent(text))
    test.addCleanup(os.unlink, path)
    return path


class PoolSettingsTest(unittest.TestCase):
    def load(self, text: str, *argv: str) -> settings.Config:
        return settings.resolve({"config": write_config(self, text),
                                 **({"backends": list(argv)} if argv else {})})

    def test_pools_inherit_the_top_level_settings(self) -> None:
        config = self.load("""
            backends = ["127.0.0.1:7000"]
            algorithm = "least-connections"
            health_path = "/up"
            rise = 3
            [pools.api]
            backends = ["http://127.0.0.1:7001", "127.0.0.1:7002,weight=2"]
            health_path = "/health"
            sticky_cookie = "cclb_api"
            [pools.web]
            backends = ["127.0.0.1:7003"]
            algorithm = "round-robin"
            [[routes]]
            host = "api.example.com"
            pool = "api"
            """)
        pools = config.pools
        self.assertEqual(list(pools), ["default", "api", "web"])
        self.assertEqual([spec.url for spec in pools["default"].backends], ["http://127.0.0.1:7000"])
        self.assertEqual([(s.url, s.weight) for s in pools["api"].backends],
                         [("http://127.0.0.1:7001", 1), ("http://127.0.0.1:7002", 2)])
        self.assertEqual((pools["api"].algorithm, pools["api"].health_path, pools["api"].rise,
                          pools["api"].sticky_cookie),
                         ("least-connections", "/health", 3, "cclb_api"))
        self.assertEqual((pools["web"].algorithm, pools["web"].health_path, pools["web"].sticky_cookie),
                         ("round-robin", "/up", None))
        self.assertEqual(config.routes.routes[0].pool, "api")
        self.assertEqual(config.routes.default, "default")

    def test_without_top_level_backends_there_is_no_default_pool(self) -> None:
        config = self.load("""
            [pools.api]
            backends = ["127.0.0.1:7001"]
            """)
        self.assertEqual(list(config.pools), ["api"])
        self.assertIsNone(config.routes.default)
        # --backend on the command line fills the pool default
        config = self.load("""
            [pools.api]
            backends = ["127.0.0.1:7001"]
            """, "127.0.0.1:7009")
        self.assertEqual(list(config.pools), ["default", "api"])

    def test_the_command_line_alone_still_fills_default(self) -> None:
        config = settings.load(["-b", "127.0.0.1:7000"])
        self.assertEqual(list(config.pools), ["default"])
        self.assertEqual(config.routes.routes, ())

    def test_errors_name_the_key_and_line(self) -> None:
        cases = [
            ("""
             backends = ["127.0.0.1:7000"]
             [[routes]]
             pool = "default"
             [[routes]]
             pool = "api"
             """, "(line 5): routes[1].pool: unknown pool 'api'"),
            ("""
             [pools.api]
             backends = ["127.0.0.1:7001"]
             [[routes]]
             pool = "api"
             redirect = "https://x/"
             """, "(line 4): routes[0]: needs exactly one of pool, redirect or respond, not pool and redirect"),
            ("""
             [pools.api]
             backends = ["127.0.0.1:7001"]
             algorithm = "fastest"
             """, "(line 2): pools.api.algorithm: must be one of"),
            ("""
             [pools.api]
             backends = ["127.0.0.1:7001"]
             colour = "red"
             """, "pools.api.colour: unknown key"),
            ("""
             [pools.api]
             health_path = "/x"
             """, "pools.api: no backends"),
            ("""
             [pools.api]
             backends = ["127.0.0.1:7001"]
             sticky_cookie = "a b"
             """, "pools.api.sticky_cookie: expected a cookie name"),
            ("""
             backends = ["127.0.0.1:7000"]
             [pools.default]
             backends = ["127.0.0.1:7001"]
             """, "duplicate pool name 'default'"),
            ("""
             [pools.api]
             backends = ["127.0.0.1:7001"]
             [pools.api]
             backends = ["127.0.0.1:7002"]
             """, "invalid TOML"),
            ("""
             [pools.api]
             backends = ["127.0.0.1:7001"]
             [pools.web]
             backends = ["127.0.0.1:7001"]
             """, "pools.web.backends: http://127.0.0.1:7001 is in pool 'api' already"),
            ("""
             backends = ["127.0.0.1:7000"]
             [[routes]]
             pool = "default"
             request_headers = { set = { "Transfer-Encoding" = "gzip" } }
             """, "(line 3): routes[0].request_headers.set: Transfer-Encoding cannot be changed"),
            ("""
             backends = ["127.0.0.1:7000"]
             trusted_proxies = ["10.0.0.0/33"]
             """, "trusted_proxies: invalid address or CIDR '10.0.0.0/33'"),
            ("""
             backends = ["127.0.0.1:7000"]
             proxy_protocol = true
             """, "--proxy-protocol needs --trusted-proxy"),
        ]
        for text, message in cases:
            with self.subTest(message=message):
                with self.assertRaises(settings.SettingsError) as caught:
                    self.load(text)
                self.assertIn(message, str(caught.exception))

    def test_a_bad_route_exits_2_with_one_line(self) -> None:
        path = write_config(self, """
            backends = ["127.0.0.1:7000"]
            [[routes]]
            pool = "nope"
            """)
        result = subprocess.run([sys.executable, str(ROOT / "cclb.py"), "--config", path, "--check"],
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.strip().splitlines(),
                         [f"cclb.py: error: {path} (line 3): routes[0].pool: unknown pool 'nope' "
                          "(pools: default)"])


def start_backend(test: type[unittest.TestCase], name: str) -> int:
    """An in-process demo backend (server.py) named ``name``; its port."""
    backend = server.BackendServer(("127.0.0.1", 0), name, {"users": [], "products": []}, False)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    test.addClassCleanup(backend.server_close)
    test.addClassCleanup(backend.shutdown)
    return backend.server_address[1]


def start_balancer(test: type[unittest.TestCase], path: str) -> cclb.Balancer:
    """cclb in this process (the single role, admin API on a free port) with the config ``path``."""
    config = settings.resolve({"config": path, "port": 0, "host": "127.0.0.1", "admin_port": 0,
                               "access_log": "off", "log_level": "warning"})
    balancer = cclb.Balancer(config, cclb.Role.SINGLE)
    balancer.start()
    test.addClassCleanup(balancer.stop)
    return balancer


class Client:
    """A keep-alive http.client connection to cclb."""

    def __init__(self, test: unittest.TestCase, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        test.addCleanup(self.conn.close)

    def get(self, path: str, host: str = "example.com", method: str = "GET",
            **headers: str) -> tuple[int, http.client.HTTPMessage, bytes]:
        self.conn.request(method, path, headers={"Host": host,
                                                 **{k.replace("_", "-"): v for k, v in headers.items()}})
        response = self.conn.getresponse()
        return response.status, response.headers, response.read()

    def echo(self, path: str, host: str = "example.com", **headers: str) -> dict:
        status, _, body = self.get(path, host, **headers)
        assert status == 200, (status, body)
        return json.loads(body)


TWO_SERVICES = """
    health_interval = 0
    trusted_proxies = ["127.0.0.1"]
    [pools.api]
    backends = ["127.0.0.1:{api1}", "127.0.0.1:{api2}"]
    sticky_cookie = "cclb_api"
    [pools.web]
    backends = ["127.0.0.1:{web}"]

    [[routes]]
    name = "api"
    host = "api.example.com"
    path_prefix = "/api/"
    strip_prefix = true
    pool = "api"

    [[routes]]
    path_prefix = "/old"
    redirect = "https://example.com/new"
    status = 301

    [[routes]]
    path_prefix = "/gone"
    respond = 410
    body = "gone for good"
    response_headers = {{ set = {{ "Cache-Control" = "max-age=60" }} }}

    [[routes]]
    name = "private"
    path_prefix = "/private"
    pool = "web"
    allow = ["10.0.0.0/8"]
    deny = ["10.9.0.0/16"]

    [[routes]]
    name = "limited"
    path_prefix = "/limited"
    pool = "web"
    rate_limit = "1/m"
    rate_limit_burst = 2

    [[routes]]
    name = "web"
    host = "*.example.com"
    pool = "web"
    request_headers = {{ set = {{ "X-Env" = "prod" }}, add = {{ "X-Via" = "cclb" }}, remove = ["X-Debug"] }}
    response_headers = {{ set = {{ "X-Frame-Options" = "DENY" }}, remove = ["X-Backend-Server"] }}
    """


class TwoServicesTest(unittest.TestCase):
    """Two services behind one port (the README's worked example), in this process."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.ports = {name: start_backend(cls, name) for name in ("api1", "api2", "web")}
        handle, cls.path = tempfile.mkstemp(suffix=".toml")
        os.close(handle)
        cls.addClassCleanup(os.unlink, cls.path)
        cls.write(TWO_SERVICES)
        cls.balancer = start_balancer(cls, cls.path)
        cls.port = cls.balancer.port()

    @classmethod
    def write(cls, text: str) -> None:
        with open(cls.path, "w") as out:
            out.write(textwrap.dedent(text.format(**cls.ports)))

    def test_host_and_path_choose_the_pool_and_strip_the_prefix(self) -> None:
        client = Client(self, self.port)
        seen = set()
        for _ in range(4):
            echo = client.echo("/api/echo?x=1", "API.example.com:8080")
            self.assertEqual((echo["path"], echo["query"]), ("/echo", "x=1"))
            seen.add(echo["server"])
        self.assertEqual(seen, {"api1", "api2"})  # round-robin within the pool
        # The api route wants its host: this goes to web, which has no /api/echo.
        status, _, body = client.get("/api/echo", "www.example.com")
        self.assertEqual((status, json.loads(body)), (404, {"error": "not found"}))

    def test_header_rules(self) -> None:
        client = Client(self, self.port)
        status, headers, body = client.get("/echo", "www.example.com", X_Debug="1", X_Env="dev",
                                           X_Via="edge")
        self.assertEqual(status, 200)
        sent = [(name.lower(), value) for name, value in json.loads(body)["headers"]]
        self.assertNotIn("x-debug", dict(sent))
        self.assertEqual([v for n, v in sent if n == "x-env"], ["prod"])
        self.assertEqual([v for n, v in sent if n == "x-via"], ["edge", "cclb"])
        self.assertEqual(headers["X-Frame-Options"], "DENY")
        self.assertIsNone(headers["X-Backend-Server"])

    def test_redirect_respond_and_404(self) -> None:
        client = Client(self, self.port)
        status, headers, _ = client.get("/old/page?a=1", "x")
        self.assertEqual((status, headers["Location"]), (301, "https://example.com/new?a=1"))
        status, headers, body = client.get("/gone", "x")
        self.assertEqual((status, body, headers["Cache-Control"]), (410, b"gone for good\n", "max-age=60"))
        status, headers, body = client.get("/gone", "x", method="HEAD")
        self.assertEqual((status, body, headers["Content-Length"]), (410, b"", "14"))
        # No route matches and there is no pool default: 404 from cclb, connection kept.
        status, _, body = client.get("/echo", "other.org")
        self.assertEqual(status, 404)
        self.assertEqual(client.echo("/echo", "www.example.com")["server"], "web")

    def test_allow_deny_and_trusted_proxies(self) -> None:
        client = Client(self, self.port)
        cases = [
            ({}, 403),  # the peer, 127.0.0.1, is a trusted proxy: the client is itself
            ({"X_Forwarded_For": "10.1.2.3"}, 404),  # allowed: the web backend has no /private
            ({"X_Forwarded_For": "10.9.0.1"}, 403),  # denied first
            ({"X_Forwarded_For": "10.1.2.3, 192.0.2.7"}, 403),  # right-most untrusted
            ({"X_Forwarded_For": "192.0.2.7, 10.1.2.3, 127.0.0.1"}, 404),
        ]
        for headers, status in cases:
            with self.subTest(headers=headers):
                got, _, body = client.get("/private", "x", **headers)
                self.assertEqual(got, status, body)
        counts = self.balancer.routing.counters.snapshot()
        self.assertGreaterEqual(counts["private"][1], 3)

    def test_rate_limit(self) -> None:
        client = Client(self, self.port)
        for _ in range(2):  # the burst
            status, _, _ = client.get("/limited", "x", X_Forwarded_For="10.7.7.7")
            self.assertEqual(status, 404)  # forwarded (web has no /limited)
        status, headers, body = client.get("/limited", "x", X_Forwarded_For="10.7.7.7")
        self.assertEqual(status, 429, body)
        self.assertTrue(1 <= int(headers["Retry-After"]) <= 60, headers["Retry-After"])
        # Per client address: another client still gets through.
        status, _, _ = client.get("/limited", "x", X_Forwarded_For="10.7.7.8")
        self.assertEqual(status, 404)
        self.assertGreaterEqual(self.balancer.routing.counters.snapshot()["limited"][2], 1)

    def test_sticky_cookie(self) -> None:
        client = Client(self, self.port)
        status, headers, _ = client.get("/api/echo", "api.example.com")
        cookie = headers["Set-Cookie"]
        self.assertRegex(cookie, r"^cclb_api=[0-9a-f]{20}; Path=/; HttpOnly; SameSite=Lax$")
        value = cookie.split(";")[0]
        self.assertNotIn(str(self.ports["api1"]), value)
        servers = set()
        for _ in range(6):
            status, headers, body = client.get("/api/echo", "api.example.com", Cookie=f"a=b; {value}")
            self.assertIsNone(headers["Set-Cookie"])  # the cookie is right: not set again
            servers.add(json.loads(body)["server"])
        self.assertEqual(len(servers), 1)
        # Its backend draining: another one answers and the cookie is replaced.
        api = self.balancer.routing.pools["api"]
        mine = next(b for b in api.snapshot() if b.cookie == value.partition("=")[2])
        api.set_admin_state(mine, "drain", quiet=True)
        self.addCleanup(api.set_admin_state, mine, "ready", True)
        status, headers, body = client.get("/api/echo", "api.example.com", Cookie=value)
        self.assertNotEqual(json.loads(body)["server"], servers.pop())
        self.assertNotEqual(headers["Set-Cookie"].split(";")[0], value)
        api.set_admin_state(mine, "ready", quiet=True)
        # A cookie naming no backend (removed, or forged) is replaced.
        status, headers, _ = client.get("/api/echo", "api.example.com", Cookie="cclb_api=ffff")
        self.assertIn("cclb_api=", headers["Set-Cookie"])
        # The same value in a new process (stable across restarts and workers).
        backend = next(b for b in self.balancer.routing.pools["api"].snapshot()
                       if b.cookie == value.partition("=")[2])
        self.assertEqual(routing_value(backend.url), backend.cookie)

    def test_reload_swaps_pools_and_routes_on_a_kept_alive_connection(self) -> None:
        client = Client(self, self.port)
        self.assertEqual(client.echo("/echo", "www.example.com")["server"], "web")
        api_ids = {b.url: b.id for b in self.balancer.routing.pools["api"].snapshot()}
        # web's route now sends to a new pool "v2"; api loses api2
        self.write(TWO_SERVICES.replace('"127.0.0.1:{api2}"', '"127.0.0.1:{api1}"')
                   .replace('backends = ["127.0.0.1:{api1}", "127.0.0.1:{api1}"]',
                            'backends = ["127.0.0.1:{api1}"]')
                   .replace('[pools.web]\n    backends = ["127.0.0.1:{web}"]',
                            '[pools.web]\n    backends = ["127.0.0.1:{web}"]\n    [pools.v2]\n'
                            '    backends = ["127.0.0.1:{api2}"]')
                   .replace('host = "*.example.com"\n    pool = "web"',
                            'host = "*.example.com"\n    pool = "v2"'))
        self.addCleanup(self.reload, TWO_SERVICES)
        self.reload(None)
        self.assertEqual(client.echo("/echo", "www.example.com")["server"], "api2")
        self.assertEqual({b.url: b.id for b in self.balancer.routing.pools["api"].snapshot()},
                         {url: id for url, id in api_ids.items() if str(self.ports["api1"]) in url})
        self.assertEqual(client.echo("/api/echo", "api.example.com")["server"], "api1")

    def admin(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        assert self.balancer.admin is not None
        conn = http.client.HTTPConnection("127.0.0.1", self.balancer.admin.server_port, timeout=10)
        self.addCleanup(conn.close)
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"} if body is not None else {})
        response = conn.getresponse()
        return response.status, response.read()

    def test_admin_status_metrics_and_adding_to_a_pool(self) -> None:
        client = Client(self, self.port)
        client.echo("/echo", "www.example.com")
        client.get("/private", "x")  # 403
        client.get("/echo", "other.org")  # 404: no route, no pool default
        status, body = self.admin("GET", "/status")
        document = json.loads(body)
        self.assertEqual([p["name"] for p in document["pools"]], ["api", "web"])
        self.assertEqual(document["pools"][0]["sticky_cookie"], "cclb_api")
        self.assertEqual(document["backends"], [])  # no pool default in this configuration
        self.assertIsNone(document["default_route"])
        self.assertGreaterEqual(document["unrouted"].get("404", 0), 1)
        self.assertEqual(self.balancer.admin.all_stats().backends[0].url,
                         document["pools"][0]["backends"][0]["url"])  # the charts see every pool
        ids = [b["id"] for p in document["pools"] for b in p["backends"]]
        self.assertEqual(len(ids), len(set(ids)))  # unique across pools
        routes = {r["name"]: r for r in document["routes"]}
        self.assertEqual(list(routes), ["api", "1", "2", "private", "limited", "web"])
        self.assertEqual(routes["api"]["match"], {"host": "api.example.com", "path_prefix": "/api/"})
        self.assertEqual((routes["1"]["redirect"], routes["1"]["status"]), ("https://example.com/new", 301))
        self.assertGreaterEqual(routes["web"]["requests"], 1)
        self.assertGreaterEqual(routes["private"]["denied"], 1)
        status, body = self.admin("GET", "/metrics")
        text = body.decode()
        web = f"http://127.0.0.1:{self.ports['web']}"
        self.assertRegex(text, rf'cclb_backend_up{{backend="{web}",pool="web"}} 1\n')
        self.assertRegex(text, rf'cclb_requests_total{{backend="{web}",pool="web",code="200"}} \d+')
        self.assertRegex(text, r'cclb_route_requests_total{route="web"} [1-9]')
        self.assertRegex(text, r'cclb_route_denied_total{route="private"} [1-9]')
        self.assertIn('cclb_route_limited_total{route="limited"}', text)
        # POST /backends takes a pool; a URL already in another pool is a conflict.
        extra = start_backend(type(self), "web2")
        with self.assertLogs("cclb", "WARNING"):
            status, body = self.admin("POST", "/backends", {"url": f"127.0.0.1:{extra}", "pool": "web"})
        self.assertEqual(status, 201, body)
        added = json.loads(body)
        self.assertEqual(added["pool"], "web")
        self.assertNotIn(added["id"], ids)
        status, body = self.admin("POST", "/backends", {"url": f"127.0.0.1:{extra}", "pool": "api"})
        self.assertEqual((status, json.loads(body)["error"]),
                         (409, f"http://127.0.0.1:{extra} is already a backend (pool web)"))
        status, body = self.admin("POST", "/backends", {"url": "127.0.0.1:1", "pool": "nope"})
        self.assertEqual(status, 404, body)
        with self.assertLogs("cclb", "WARNING"):
            status, body = self.admin("DELETE", f"/backends/{added['id']}")
        self.assertEqual(status, 200, body)

    def test_a_request_is_routed_entirely_under_the_table_it_started_with(self) -> None:
        """Forced interleaving: the reload lands between the decision and the pool lookup."""
        import proxy
        decided, release = threading.Event(), threading.Event()
        real_decide = proxy.decide

        def slow_decide(*args):  # type: ignore[no-untyped-def]
            decision = real_decide(*args)
            if args[1] == "/echo" and not decided.is_set():
                decided.set()
                release.wait(10)
            return decision

        result: list = []
        client = Client(self, self.port)
        with mock.patch.object(proxy, "decide", slow_decide):
            thread = threading.Thread(target=lambda: result.append(
                client.echo("/echo", "www.example.com")["server"]))
            thread.start()
            self.assertTrue(decided.wait(10))
            # The new table sends this route to the pool api (a pool the old one had too).
            self.addCleanup(self.reload, TWO_SERVICES)
            self.reload(TWO_SERVICES.replace('host = "*.example.com"\n    pool = "web"',
                                             'host = "*.example.com"\n    pool = "api"'))
            release.set()
            thread.join(10)
        self.assertEqual(result, ["web"])  # the old decision, the old table's pool
        self.assertIn(Client(self, self.port).echo("/echo", "www.example.com")["server"],
                      {"api1", "api2"})

    def test_reloads_under_keep_alive_traffic_fail_no_request(self) -> None:
        stop = threading.Event()
        outcomes: list = []

        def traffic() -> None:
            client = Client(self, self.port)
            while not stop.is_set():
                status, _, body = client.get("/echo", "www.example.com")
                outcomes.append((status, json.loads(body)["server"] if status == 200 else body))

        threads = [threading.Thread(target=traffic) for _ in range(3)]
        for thread in threads:
            thread.start()
        self.addCleanup(self.reload, TWO_SERVICES)
        moved = TWO_SERVICES.replace('host = "*.example.com"\n    pool = "web"',
                                     'host = "*.example.com"\n    pool = "api"')
        for i in range(6):
            wait_for(lambda n=len(outcomes): len(outcomes) > n + 3, 10, message="traffic")
            self.reload(moved if i % 2 == 0 else TWO_SERVICES)
        stop.set()
        for thread in threads:
            thread.join(10)
        self.assertTrue(outcomes)
        self.assertEqual([o for o in outcomes if o[0] != 200], [])
        self.assertEqual({server for _, server in outcomes} - {"web", "api1", "api2"}, set())

    def reload(self, text: str | None) -> None:
        if text is not None:
            self.write(text)
        with self.assertLogs("cclb", "WARNING") as logs:
            self.balancer.reload()
        self.assertIn("configuration reloaded", logs.output[-1])


class PoolHealthTest(unittest.TestCase):
    """Each pool has its own health checker with its own settings."""

    def test_each_pool_checks_with_its_own_path(self) -> None:
        ports = {name: start_backend(type(self), name) for name in ("a", "b")}
        path = write_config(self, f"""
            health_interval = 0.1
            health_timeout = 1
            [pools.ok]
            backends = ["127.0.0.1:{ports['a']}"]
            health_path = "/health"
            [pools.bad]
            backends = ["127.0.0.1:{ports['b']}"]
            health_path = "/no-such-page"
            [[routes]]
            path_prefix = "/bad/"
            pool = "bad"
            [[routes]]
            pool = "ok"
            """)
        with self.assertLogs("cclb", "WARNING") as logs:
            balancer = start_balancer(type(self), path)
            bad = balancer.routing.pools["bad"]
            wait_for(lambda: not bad.snapshot()[0].healthy, 10, message="the bad pool's check")
        self.assertIn(f"backend http://127.0.0.1:{ports['b']} is DOWN: HTTP 404", "\n".join(logs.output))
        self.assertTrue(balancer.routing.pools["ok"].snapshot()[0].healthy)
        self.assertEqual(sorted(balancer.checkers), ["bad", "ok"])
        client = Client(self, balancer.port())
        self.assertEqual(client.echo("/echo")["server"], "a")
        with self.assertLogs("cclb", "WARNING") as logs:
            status, headers, _ = client.get("/bad/echo")
        self.assertEqual((status, headers["Retry-After"]), (503, "1"))
        self.assertIn("no backend available", logs.output[0])


class AccessLogTest(unittest.TestCase):
    """403/429/404 and routed requests in the JSON access log, with their route and pool."""

    def test_json_lines_name_the_route_and_pool(self) -> None:
        port = start_backend(type(self), "web")
        handle, log_path = tempfile.mkstemp(suffix=".log")
        os.close(handle)
        self.addCleanup(os.unlink, log_path)
        path = write_config(self, f"""
            health_interval = 0
            log_format = "json"
            [pools.web]
            backends = ["127.0.0.1:{port}"]
            [[routes]]
            name = "closed"
            path_prefix = "/closed/"
            pool = "web"
            deny = ["127.0.0.0/8"]
            [[routes]]
            name = "slow"
            path_prefix = "/slow/"
            pool = "web"
            rate_limit = "1/m"
            [[routes]]
            name = "site"
            host = "www.example.com"
            pool = "web"
            """)
        config = settings.resolve({"config": path, "port": 0, "host": "127.0.0.1",
                                   "access_log": log_path, "log_level": "warning"})
        balancer = cclb.Balancer(config, cclb.Role.SINGLE)
        balancer.start()
        self.addCleanup(balancer.stop)
        client = Client(self, balancer.port())
        self.assertEqual(client.get("/closed/x")[0], 403)
        self.assertEqual(client.get("/slow/x")[0], 404)  # forwarded: web has no /slow/x
        self.assertEqual(client.get("/slow/x")[0], 429)
        self.assertEqual(client.get("/x", "other.org")[0], 404)  # no route, no pool default
        self.assertEqual(client.get("/echo", "www.example.com")[0], 200)

        def lines() -> list[dict]:
            with open(log_path) as handle:
                return [json.loads(line) for line in handle if line.strip()]
        entries = wait_for(lambda: len(lines()) == 5 and lines(), 10, message="five log lines")
        self.assertEqual([(e["status"], e["route"], e["pool"], e["termination"]) for e in entries],
                         [(403, "closed", None, "rejected"), (404, "slow", "web", "ok"),
                          (429, "slow", None, "rejected"), (404, None, None, "rejected"),
                          (200, "site", "web", "ok")])


class ProxyProtocolTest(unittest.TestCase):
    """proxy_protocol = true: the header's source is the client; anything else is closed."""

    @classmethod
    def setUpClass(cls) -> None:
        port = start_backend(cls, "web")
        handle, path = tempfile.mkstemp(suffix=".toml")
        with os.fdopen(handle, "w") as out:
            out.write(textwrap.dedent(f"""
                health_interval = 0
                trusted_proxies = ["127.0.0.1"]
                proxy_protocol = true
                header_timeout = 2
                backends = ["127.0.0.1:{port}"]
                [[routes]]
                path_prefix = "/private"
                respond = 200
                body = "inside"
                allow = ["203.0.113.0/24"]
                """))
        cls.addClassCleanup(os.unlink, path)
        cls.port = start_balancer(cls, path).port()

    def exchange(self, data: bytes, source: str = "127.0.0.1") -> bytes:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                        source_address=(source, 0))
        self.addCleanup(sock.close)
        sock.sendall(data)
        return read_until_close(sock, 10)

    def test_v1_and_v2_headers_give_the_client_address(self) -> None:
        v2 = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + socket.inet_aton("203.0.113.9")
              + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 5555, 80))
        for header in (b"PROXY TCP4 203.0.113.5 10.0.0.1 5555 80\r\n", v2):
            with self.subTest(header=header[:12]):
                answer = self.exchange(header + b"GET /private HTTP/1.1\r\nHost: x\r\n"
                                       b"Connection: close\r\n\r\n")
                self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
                self.assertTrue(answer.endswith(b"inside\n"), answer)
        answer = self.exchange(b"PROXY TCP4 198.51.100.1 10.0.0.1 5555 80\r\n"
                               b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        echo = json.loads(answer.partition(b"\r\n\r\n")[2])
        self.assertIn(["X-Forwarded-For", "198.51.100.1"], echo["headers"])  # not the proxy
        answer = self.exchange(b"PROXY TCP4 198.51.100.1 10.0.0.1 5555 80\r\n"
                               b"GET /private HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)

    def test_no_bad_or_untrusted_header_closes_without_an_answer(self) -> None:
        cases = [(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.1"),  # no header
                 (b"PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\nGET / HTTP/1.1\r\n\r\n", "127.0.0.1"),
                 (b"PROXY TCP4 203.0.113.5 10.0.0.1 5555 80\r\nGET / HTTP/1.1\r\n\r\n",
                  "127.0.0.2")]  # from a peer that is not a trusted proxy
        for data, source in cases:
            with self.subTest(data=data[:20], source=source):
                self.assertEqual(self.exchange(data, source), b"")


class PullProxyHeaderTest(unittest.TestCase):
    """proxy.pull_proxy_header: the non-blocking step an event loop can call."""

    def test_byte_by_byte_then_the_request_stays_unread(self) -> None:
        from proxy import pull_proxy_header
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        header = b"PROXY TCP6 2001:db8::1 2001:db8::2 1000 443\r\n"
        received = b""
        self.assertEqual(pull_proxy_header(a, received), (None, b""))  # nothing yet: no wait
        for byte in header[:-1]:
            b.send(bytes([byte]))
            wait_for(lambda: select.select([a], [], [], 0)[0], 5)
            parsed, received = pull_proxy_header(a, received)
            self.assertIsNone(parsed)
        b.send(header[-1:] + b"GET / HTTP/1.1\r\n")
        wait_for(lambda: select.select([a], [], [], 0)[0], 5)
        parsed, received = pull_proxy_header(a, received)
        self.assertEqual((parsed.source, received), (("2001:db8::1", 1000), b""))
        self.assertEqual(a.recv(100), b"GET / HTTP/1.1\r\n")

    def test_malformed_or_closed(self) -> None:
        from proxy import pull_proxy_header
        from proxy_protocol import ProxyProtocolError
        for data in (b"GET / HTTP/1.1\r\n", b"PROXY TCP4 1.2.3"):
            with self.subTest(data=data):
                a, b = socket.socketpair()
                self.addCleanup(a.close)
                b.sendall(data)
                b.close()
                with self.assertRaises(ProxyProtocolError):
                    received = b""
                    for _ in range(3):
                        _, received = pull_proxy_header(a, received)


class WorkersTest(unittest.TestCase):
    """--workers 2 with two pools: routing in every worker, one view in the supervisor."""

    def test_pools_and_route_counters_across_workers(self) -> None:
        ports = {name: start_backend(type(self), name) for name in ("a", "b")}
        path = write_config(self, f"""
            health_interval = 0.5
            access_log = "off"
            [pools.one]
            backends = ["127.0.0.1:{ports['a']}"]
            sticky_cookie = "s1"
            [pools.two]
            backends = ["127.0.0.1:{ports['b']}"]
            [[routes]]
            name = "to-two"
            path_prefix = "/two/"
            strip_prefix = true
            pool = "two"
            [[routes]]
            name = "to-one"
            pool = "one"
            """)
        balancer = Balancer([], "--config", path, "--workers", "2", "--admin-port", "0")
        self.addCleanup(balancer.stop)
        admin = wait_admin_port(balancer)
        cookies = set()
        for i in range(8):
            status, headers, body = Client(self, balancer.port).get(f"/two/echo?i={i}")
            self.assertEqual((status, json.loads(body)["server"], json.loads(body)["path"]),
                             (200, "b", "/echo"))
            status, headers, body = Client(self, balancer.port).get("/echo")
            self.assertEqual(json.loads(body)["server"], "a")
            cookies.add(headers["Set-Cookie"])
        self.assertEqual(len(cookies), 1, "every worker makes the same sticky cookie value")

        def settled() -> dict | None:
            document = admin_status(self, balancer, admin)
            routes = {r["name"]: r["requests"] for r in document["routes"]}
            return document if routes == {"to-two": 8, "to-one": 8} else None
        document = wait_for(settled, 10, message="the workers' route counters")
        pools = {p["name"]: p for p in document["pools"]}
        self.assertEqual(sorted(pools), ["one", "two"])
        self.assertEqual(pools["two"]["backends"][0]["requests"], 8)
        self.assertEqual(pools["one"]["backends"][0]["state"], "up")


class SnapshotTest(unittest.TestCase):
    """workers.py: state snapshots name each backend's pool, and empty pools."""

    def test_rows_by_pool_round_trip(self) -> None:
        import workers
        from backend_urls import parse_backend
        from cluster import ServerCluster
        supervisor = [ServerCluster([parse_backend("127.0.0.1:9001")]),
                      ServerCluster([parse_backend("127.0.0.1:9002")], name="api"),
                      ServerCluster([], name="web")]
        rows = workers.decode_snapshot(workers.encode_snapshot(workers.state_rows(lambda: supervisor))[:-1])
        self.assertEqual(rows, [["http://127.0.0.1:9001", 1, "up", "ready"],
                                ["http://127.0.0.1:9002", 1, "up", "ready", "api"],
                                ["", 0, "", "", "web"]])
        worker = [ServerCluster([parse_backend("127.0.0.1:9001")]),
                  ServerCluster([parse_backend("127.0.0.1:9003")], name="api"),
                  ServerCluster([parse_backend("127.0.0.1:9004")], name="web"),
                  ServerCluster([parse_backend("127.0.0.1:9005")], name="other")]
        workers.apply_snapshot(lambda: worker, rows)
        self.assertEqual([[b.url for b in c.snapshot()] for c in worker],
                         [["http://127.0.0.1:9001"], ["http://127.0.0.1:9002"], [],
                          ["http://127.0.0.1:9005"]])  # a pool the snapshot does not name: kept


def routing_value(url: str) -> str:
    from cluster import sticky_key
    from routing import sticky_value
    return sticky_value(sticky_key(None), url)


if __name__ == "__main__":
    unittest.main()

"""Named pools and [[routes]]: the configuration (exit 2 on errors) and end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path

import settings

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


if __name__ == "__main__":
    unittest.main()

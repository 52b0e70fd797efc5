"""Unit tests for settings: one definition of every option, CLI and TOML file.

Config files are written to a temporary directory; ``settings.load`` is
called in-process (argparse exits with SystemExit, stderr is captured).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import settings  # noqa: E402
from backend_urls import BackendSpec  # noqa: E402
from settings import SettingsError, parse_size  # noqa: E402

MiB = 1024 ** 2


class ConfigFiles(unittest.TestCase):
    """Helpers: write a TOML file, load with it, expect exit code 2."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.count = 0

    def write(self, text: str) -> str:
        self.count += 1
        path = os.path.join(self.tmp.name, f"cclb{self.count}.toml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def load_exits_2(self, argv: list[str]) -> str:
        """Run settings.load(argv), assert exit code 2, return what went to stderr."""
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            with self.assertRaises(SystemExit) as ctx:
                settings.load(argv)
        self.assertEqual(ctx.exception.code, 2, stderr.getvalue())
        self.assertNotIn("Traceback", stderr.getvalue())
        return stderr.getvalue()

    def config_error(self, text: str) -> str:
        path = self.write(text)
        with self.assertRaises(SettingsError) as ctx:
            settings.read_config_file(path)
        message = str(ctx.exception)
        self.assertIn(path, message)
        with self.assertRaises(SettingsError):
            settings.resolve({"config": path})
        return message


class DefaultsTest(unittest.TestCase):
    def test_defaults(self):
        config = settings.load([])
        expected = {
            "port": 8080, "host": "0.0.0.0", "algorithm": "round-robin",
            "health_interval": 10.0, "health_path": "/", "health_timeout": 2.0,
            "health_status": (200, 399), "rise": 1, "fall": 1, "max_fails": 1,
            "fail_timeout": 10.0, "slow_start": 0.0, "connect_timeout": 3.0,
            "read_timeout": 60.0, "header_timeout": 10.0, "max_body_size": 10 * MiB,
            "max_headers": 100, "log_level": "INFO", "access_log": "-", "log_format": "text",
            "admin_port": None, "admin_host": "127.0.0.1", "admin_token": None,
            "config": None, "demo": False, "workers": 1,
        }
        for name, value in expected.items():
            with self.subTest(name=name):
                self.assertEqual(getattr(config, name), value)
        self.assertEqual([b.url for b in config.backends],
                         ["http://127.0.0.1:7000", "http://127.0.0.1:7001", "http://127.0.0.1:7002"])
        self.assertTrue(all(isinstance(b, BackendSpec) and b.weight == 1 for b in config.backends))
        self.assertIsNone(config.source)

    def test_every_setting_has_a_value(self):
        config = settings.load([])
        for setting in settings.SETTINGS:
            with self.subTest(name=setting.name):
                self.assertIn(setting.name, config.values)
        with self.assertRaises(AttributeError):
            config.no_such_setting  # noqa: B018

    def test_command_line_values(self):
        config = settings.load(["-p", "9000", "--host", "127.0.0.1", "-b", "127.0.0.1:7100",
                                "--backend", "http://localhost:7101,weight=4",
                                "--algorithm", "Least-Connections", "--health-interval", "0.5",
                                "--health-status", "200-299", "--max-body-size", "512k",
                                "--log-level", "debug", "--demo"])
        self.assertEqual(config.port, 9000)
        self.assertEqual(config.host, "127.0.0.1")
        self.assertEqual([(b.url, b.weight) for b in config.backends],
                         [("http://127.0.0.1:7100", 1), ("http://localhost:7101", 4)])
        self.assertEqual(config.algorithm, "least-connections")
        self.assertEqual(config.health_interval, 0.5)
        self.assertEqual(config.health_status, (200, 299))
        self.assertEqual(config.max_body_size, 512 * 1024)
        self.assertEqual(config.log_level, "DEBUG")
        self.assertIs(config.demo, True)


class OneDefinitionTest(unittest.TestCase):
    def test_names_and_flags_are_unique(self):
        names = [s.name for s in settings.SETTINGS]
        flags = [flag for s in settings.SETTINGS for flag in s.flags]
        self.assertEqual(len(names), len(set(names)))
        self.assertEqual(len(flags), len(set(flags)))
        self.assertEqual(set(settings.BY_NAME), set(names))

    def test_help_and_table_list_every_option(self):
        help_text = settings.build_parser().format_help()
        table = settings.markdown_table()
        for setting in settings.SETTINGS:
            with self.subTest(name=setting.name):
                for flag in setting.flags:
                    self.assertRegex(help_text, rf"(?<![\w-]){re.escape(flag)}(?![\w-])")
                    self.assertIn(f"`{flag}`", table)
                if not setting.cli_only:
                    self.assertIn(f"`{setting.name}`", table)

    def test_help_exits_0(self):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), self.assertRaises(SystemExit) as ctx:
            settings.load(["--help"])
        self.assertEqual(ctx.exception.code, 0)
        self.assertIn("--max-body-size", stdout.getvalue())
        self.assertIn("default: 8080", stdout.getvalue())


class ConfigFileTest(ConfigFiles):
    def test_values_from_the_file(self):
        path = self.write(
            'port = 9000\n'
            'algorithm = "ip-hash"\n'
            'health_interval = 5          # an integer is fine for a float setting\n'
            'health_status = "200-204"\n'
            'max_body_size = "1M"\n'
            'log_level = "warning"\n'
            'backends = ["127.0.0.1:7100", "http://127.0.0.1:7101,weight=2"]\n')
        config = settings.load(["--config", path])
        self.assertEqual(config.port, 9000)
        self.assertEqual(config.algorithm, "ip-hash")
        self.assertEqual(config.health_interval, 5.0)
        self.assertEqual(config.health_status, (200, 204))
        self.assertEqual(config.max_body_size, MiB)
        self.assertEqual(config.log_level, "WARNING")
        self.assertEqual([(b.url, b.weight) for b in config.backends],
                         [("http://127.0.0.1:7100", 1), ("http://127.0.0.1:7101", 2)])
        self.assertEqual(config.source, path)
        self.assertEqual(config.rise, 1, "keys absent from the file keep their default")

    def test_backends_as_tables(self):
        path = self.write(
            'port = 9000\n\n'
            '[[backends]]\nurl = "http://127.0.0.1:7000"\nweight = 5\n\n'
            '[[backends]]\nurl = "127.0.0.1:7001"\n')
        config = settings.load(["--config", path])
        self.assertEqual([(b.url, b.host, b.port, b.weight) for b in config.backends],
                         [("http://127.0.0.1:7000", "127.0.0.1", 7000, 5),
                          ("http://127.0.0.1:7001", "127.0.0.1", 7001, 1)])

    def test_command_line_overrides_file(self):
        path = self.write('port = 9000\nalgorithm = "ip-hash"\nrise = 3\n'
                          'backends = ["127.0.0.1:7100", "127.0.0.1:7101"]\n')
        config = settings.load(["--config", path, "-p", "9001", "--rise", "2",
                                "-b", "127.0.0.1:7200"])
        self.assertEqual(config.port, 9001)
        self.assertEqual(config.rise, 2)
        self.assertEqual(config.algorithm, "ip-hash")
        self.assertEqual([b.url for b in config.backends], ["http://127.0.0.1:7200"],
                         "-b replaces the file's backends, it does not add to them")
        # order on the command line does not matter
        config = settings.load(["-p", "9001", "--config", path])
        self.assertEqual(config.port, 9001)

    def test_unknown_key_names_key_and_line(self):
        cases = [
            ('port = 9000\n\nbogus = 1\n', "bogus", 3),
            ('# comment\nport = 9000\nhealth-interval = 5\n', "health-interval", 3),
            ('port = 9000\n[listener]\nhost = "x"\n', "listener", 2),
            ('demo = true\n', "demo", 1),      # command-line only
            ('config = "other.toml"\n', "config", 1),
        ]
        for text, key, line in cases:
            with self.subTest(key=key):
                message = self.config_error(text)
                self.assertIn(repr(key), message)
                self.assertIn(f"line {line}", message)
                self.assertIn("unknown", message)

    def test_bad_values_name_key_and_line(self):
        cases = [
            ('port = 70000\n', "port", 1),
            ('port = -1\n', "port", 1),
            ('\nport = "abc"\n', "port", 2),
            ('port = true\n', "port", 1),
            ('host = 5\n', "host", 1),
            ('algorithm = "fastest"\n', "algorithm", 1),
            ('health_path = "health"\n', "health_path", 1),
            ('health_status = "600"\n', "health_status", 1),
            ('health_status = "399-200"\n', "health_status", 1),
            ('health_interval = -1\n', "health_interval", 1),
            ('health_timeout = "fast"\n', "health_timeout", 1),
            ('health_timeout = nan\n', "health_timeout", 1),
            ('rise = 0\n', "rise", 1),
            ('fall = 101\n', "fall", 1),
            ('max_body_size = "10Q"\n', "max_body_size", 1),
            ('max_body_size = -5\n', "max_body_size", 1),
            ('max_body_size = 1.5\n', "max_body_size", 1),
            ('log_level = "loud"\n', "log_level", 1),
            ('log_format = "xml"\n', "log_format", 1),
            ('admin_token = 123\n', "admin_token", 1),
            ('gzip_level = 10\n', "gzip_level", 1),
            ('backends = []\n', "backends", 1),
            ('backends = 5\n', "backends", 1),
            ('backends = ["ftp://127.0.0.1:7000"]\n', "backends", 1),
            ('backends = ["127.0.0.1:99999"]\n', "backends", 1),
            ('backends = ["127.0.0.1"]\n', "backends", 1),
            ('port = 1\n\n[[backends]]\nurl = "127.0.0.1:7000"\nweight = 0\n', "backends", 3),
            ('[[backends]]\nurl = "127.0.0.1:7000"\nwieght = 2\n', "backends", 1),
            ('[[backends]]\nweight = 2\n', "backends", 1),
        ]
        for text, key, line in cases:
            with self.subTest(text=text):
                message = self.config_error(text)
                self.assertIn(key, message)
                self.assertIn(f"line {line}", message)

    # Issue 4: "Unknown keys, wrong types and bad values: exit code 2".  TOML
    # values are typed; a value of the wrong type must not be coerced.

    def test_fractional_number_for_whole_number_setting_is_rejected(self):
        # 8080.5 must not silently become port 8080, nor 2.7 become rise 2.
        for text, key in (('port = 8080.5\n', "port"), ('rise = 2.7\n', "rise"),
                          ('max_headers = 99.9\n', "max_headers")):
            with self.subTest(text=text):
                message = self.config_error(text)
                self.assertIn(key, message)
                self.assertIn("line 1", message)

    def test_string_for_number_setting_is_rejected(self):
        cases = [
            ('port = "8080"\n', "port"),
            ('max_headers = "100"\n', "max_headers"),
            ('health_interval = "5"\n', "health_interval"),
            ('[[backends]]\nurl = "127.0.0.1:7000"\nweight = "3"\n', "backends"),
        ]
        for text, key in cases:
            with self.subTest(text=text):
                message = self.config_error(text)
                self.assertIn(key, message)
                self.assertIn("line 1", message)

    def test_unreadable_or_invalid_files(self):
        missing = os.path.join(self.tmp.name, "missing.toml")
        with self.assertRaises(SettingsError) as ctx:
            settings.read_config_file(missing)
        self.assertIn(missing, str(ctx.exception))
        for text in ('port = \n', 'port = 1\nport = 2\n', '[[backends]\n', 'name = "unterminated\n'):
            with self.subTest(text=text):
                message = self.config_error(text)
                self.assertIn("invalid TOML", message)
        path = self.write("")
        with open(path, "wb") as handle:
            handle.write(b'host = "\xff"\n')
        with self.assertRaises(SettingsError):
            settings.read_config_file(path)

    def test_a_file_without_backends_is_refused(self):
        """An empty, partial or backend-less file would replace every backend with the
        built-in 127.0.0.1:7000-7002 (on start, or on a reload): refused, exit 2."""
        full = 'port = 9000\nbackends = ["127.0.0.1:7100", "127.0.0.1:7101"]\nalgorithm = "random-two"\n'
        for text in ("", "# nothing\n", "port = 9000\n", full[:full.index("backends")]):
            with self.subTest(text=text):
                path = self.write(text)
                self.assertIn("no backends", self.load_exits_2(["--config", path]))
        for cut in (full[:full.index("]") - 3], full[:-12]):  # cut mid-write
            with self.subTest(cut=cut):
                self.load_exits_2(["--config", self.write(cut)])
        config = settings.load(["--config", self.write(full)])
        self.assertEqual([b.port for b in config.backends], [7100, 7101])
        # The command line may name them instead.
        config = settings.load(["--config", self.write("port = 9000\n"), "-b", "127.0.0.1:7200"])
        self.assertEqual(([b.port for b in config.backends], config.port), ([7200], 9000))


class ExitCodeTest(ConfigFiles):
    def test_bad_command_line_exits_2(self):
        cases = [
            (["--port", "abc"], "--port"),
            (["--port", "70000"], "--port"),
            (["-b", "http://127.0.0.1:99999"], "backend"),
            (["-b", "ftp://127.0.0.1:7000"], "backend"),
            (["-b", "127.0.0.1:7000,weight=0"], "weight"),
            (["--algorithm", "fastest"], "algorithm"),
            (["--max-body-size", "lots"], "--max-body-size"),
            (["--health-path", "noslash"], "--health-path"),
            (["--no-such-option"], "--no-such-option"),
            (["--port"], "--port"),
        ]
        for argv, needle in cases:
            with self.subTest(argv=argv):
                self.assertIn(needle, self.load_exits_2(argv))

    def test_bad_config_file_exits_2_naming_key_and_line(self):
        path = self.write('port = 9000\nhealth_interval = "often"\n')
        stderr = self.load_exits_2(["--config", path])
        self.assertIn("health_interval", stderr)
        self.assertIn("line 2", stderr)
        stderr = self.load_exits_2(["--config", self.write('\n\nfoo = 1\n')])
        self.assertIn("'foo'", stderr)
        self.assertIn("line 3", stderr)
        self.load_exits_2(["--config", os.path.join(self.tmp.name, "missing.toml")])

    def test_command_line_error_wins_even_with_valid_file(self):
        path = self.write('port = 9000\n')
        self.assertIn("--port", self.load_exits_2(["--config", path, "--port", "x"]))

    def test_resolve_names_the_flag(self):
        with self.assertRaises(SettingsError) as ctx:
            settings.resolve({"port": "abc"})
        self.assertIn("--port", str(ctx.exception))


class AdminBindTest(ConfigFiles):
    def test_non_loopback_admin_without_token_is_refused(self):
        for host in ("0.0.0.0", "192.168.1.10", "::"):
            with self.subTest(host=host):
                stderr = self.load_exits_2(["--admin-port", "9100", "--admin-host", host])
                self.assertIn("admin-token", stderr)
        path = self.write('admin_port = 9100\nadmin_host = "0.0.0.0"\n')
        with self.assertRaises(SettingsError):
            settings.resolve({"config": path})
        self.load_exits_2(["--config", path])

    def test_allowed_combinations(self):
        cases = [
            ["--admin-port", "9100"],
            ["--admin-port", "9100", "--admin-host", "127.0.0.1"],
            ["--admin-port", "9100", "--admin-host", "localhost"],
            ["--admin-port", "9100", "--admin-host", "::1"],
            ["--admin-port", "9100", "--admin-host", "0.0.0.0", "--admin-token", "s3cret"],
            ["--admin-host", "0.0.0.0"],  # admin API off: nothing exposed
        ]
        for argv in cases:
            with self.subTest(argv=argv):
                config = settings.load(argv)
                self.assertEqual(config.admin_port, 9100 if "--admin-port" in argv else None)
        path = self.write('admin_port = 9100\nadmin_host = "0.0.0.0"\nadmin_token = "t"\n'
                          'backends = ["127.0.0.1:7000"]\n')
        self.assertEqual(settings.load(["--config", path]).admin_token, "t")
        # a token on the command line completes a file that lacks it
        path = self.write('admin_port = 9100\nadmin_host = "0.0.0.0"\nbackends = ["127.0.0.1:7000"]\n')
        self.assertEqual(settings.load(["--config", path, "--admin-token", "t"]).admin_host, "0.0.0.0")


class BackendTLSSettingsTest(ConfigFiles):
    """--backend-ca / --backend-insecure (issue 9): checked at start, passed to the pool."""

    CA = str(ROOT / "tests" / "certs" / "ca.pem")

    def test_defaults_and_values(self):
        config = settings.load(["-b", "https://localhost:8443"])
        self.assertEqual((config.backend_ca, config.backend_insecure), (None, False))
        self.assertEqual(config.backends[0].url, "https://localhost:8443")
        self.assertIn("system trust store", settings.summary(config))
        config = settings.load(["-b", "https://localhost:8443", "--backend-ca", self.CA, "--backend-insecure"])
        pool = config.pools["default"]
        self.assertEqual((pool.backend_ca, pool.backend_insecure), (self.CA, True))
        self.assertIn("NOT verified", settings.summary(config))
        path = self.write(f'backends = ["https://a.test:443"]\nbackend_ca = "{self.CA}"\n'
                          'backend_insecure = true\n')
        config = settings.load(["--config", path])
        self.assertEqual((config.backend_ca, config.backend_insecure), (self.CA, True))
        self.assertNotIn("https://", settings.summary(settings.load(["-b", "127.0.0.1:1"])))

    def test_a_bad_ca_file_exits_2_with_one_line_naming_the_file(self):
        not_pem = self.write("port = 1\n")
        for path, problem in ((os.path.join(self.tmp.name, "missing.pem"), "not found"),
                              (not_pem, "no CA certificate found")):
            with self.subTest(path=path):
                stderr = self.load_exits_2(["--backend-ca", path])
                self.assertEqual(len(stderr.strip().splitlines()), 1, stderr)
                self.assertIn(path, stderr)
                self.assertIn(problem, stderr)
                self.assertIn("--backend-ca", stderr)
        message = self.config_error(f'backend_ca = "{not_pem}"\n')
        self.assertIn("backend_ca", message)

    def test_insecure_must_be_a_boolean_in_the_file(self):
        self.assertIn("backend_insecure", self.config_error('backend_insecure = "yes"\n'))


class ParseSizeTest(unittest.TestCase):
    def test_valid(self):
        cases = [
            (0, 0), (1048576, 1048576), ("0", 0), ("100", 100), ("100b", 100), ("100B", 100),
            ("512k", 512 * 1024), ("512K", 512 * 1024), ("512kb", 512 * 1024),
            ("512KiB", 512 * 1024), ("10M", 10 * MiB), ("10m", 10 * MiB), ("10MB", 10 * MiB),
            ("10MiB", 10 * MiB), ("10 MiB", 10 * MiB), (" 7 ", 7), ("1g", 1024 ** 3),
            ("2GiB", 2 * 1024 ** 3),
        ]
        for value, expected in cases:
            with self.subTest(value=value):
                self.assertEqual(parse_size(value), expected)

    def test_invalid(self):
        for value in (-1, True, False, "", "-1", "1.5M", "10Q", "10ib", "M", "10 M B", "1e6",
                      "0x10", 1.5, None, "10TB"):
            with self.subTest(value=value):
                with self.assertRaises(ValueError):
                    parse_size(value)


if __name__ == "__main__":
    unittest.main()

"""Every cclb option, defined once: name, flag, config key, default, check, help.

The command line (``argparse``), the configuration file (TOML, read with
``tomllib``) and the README's option table are all derived from ``SETTINGS``
so they cannot drift apart (``python3 settings.py`` prints the table; a test
checks that the README holds it).  The command line overrides the file.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import platform
import re
import sys
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from balancing import POLICIES
from backend_urls import BackendSpec, parse_backend
from routing import RouteError, RouteTable, parse_routes
from tls import CertSpec, TLSConfigError, client_context, parse_cert_option

VERSION = "0.2.0"

DEFAULT_BACKENDS = ["http://127.0.0.1:7000", "http://127.0.0.1:7001", "http://127.0.0.1:7002"]


class SettingsError(Exception):
    """A bad option or config value; the message names it.  Exit code 2."""


# --- value checkers: text or TOML value -> value, ValueError if bad -----------

def _number(kind: type, low: float | None = None, high: float | None = None) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"expected a {'whole ' if kind is int else ''}number")
        if kind is int and isinstance(value, float):
            raise ValueError(f"expected a whole number, got {value!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a {'whole ' if kind is int else ''}number, got {value!r}") from None
        if kind is float and number != number:
            raise ValueError("expected a number")
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
            raise ValueError(f"must be in {bounds}, got {value!r}")
        return number
    check.numeric = True  # type: ignore[attr-defined]
    return check


_SIZE = re.compile(r"(\d+)\s*([kmg]i?b?|b)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_size(value: Any) -> int:
    """Bytes from ``1048576``, ``"512k"``, ``"10M"``, ``"10MiB"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10M")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    match = _SIZE.fullmatch(str(value).strip())
    if not match:
        raise ValueError(f"expected a size such as 1048576, 512k or 10M, got {value!r}")
    unit = (match[2] or "").lower()[:1]
    return int(match[1]) * _UNITS[unit]


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value.lower()
    return check


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _path(value: Any) -> str:
    value = _text(value)
    if not value.startswith("/") or any(c in value for c in " \r\n\t"):
        raise ValueError(f"must be a path starting with /, got {value!r}")
    return value


def _status_range(value: Any) -> tuple[int, int]:
    match = re.fullmatch(r"([1-5]\d\d)(?:-([1-5]\d\d))?", str(value).strip())
    if not match:
        raise ValueError(f"expected a status or range such as 200 or 200-399, got {value!r}")
    low = int(match[1])
    high = int(match[2] or low)
    if high < low:
        raise ValueError(f"empty status range {value!r}")
    return low, high


def _ca_file(value: Any) -> str:
    """A readable PEM file with at least one CA certificate (``--backend-ca``).

    Read here, once, so that a bad file stops cclb at start (exit 2, one
    line naming the file) instead of failing every backend connection.
    """
    path = _text(value)
    try:
        client_context(path)
    except TLSConfigError as error:
        raise ValueError(str(error)) from None
    return path


def _flag(value: Any) -> bool:
    """A TOML boolean (``true``/``false``); the command line gives True."""
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _cert_specs(value: Any) -> list[CertSpec]:
    items = value if isinstance(value, list) else [value]
    return [parse_cert_option(_text(item)) for item in items]


def _backends(value: Any) -> list[BackendSpec]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("at least one backend is needed")
    specs = []
    for item in items:
        if isinstance(item, dict):  # [[backends]] table: url = "...", weight = 3
            unknown = set(item) - {"url", "weight"}
            if unknown or "url" not in item:
                raise ValueError(f"a backend table takes url and weight, got {sorted(item)}")
            weight = item.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, int):
                raise ValueError(f"weight must be a whole number, got {weight!r}")
            item = f"{item['url']},weight={weight}"
        specs.append(parse_backend(_text(item)))
    urls = [spec.url for spec in specs]
    duplicates = sorted({url for url in urls if urls.count(url) > 1})
    if duplicates:
        raise ValueError(f"backend listed twice: {', '.join(duplicates)}")
    return specs


def _addresses(value: Any) -> list[str]:
    """Addresses and CIDRs (``trusted_proxies``), IPv4 or IPv6."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        try:
            ipaddress.ip_network(_text(item).strip(), strict=False)
        except ValueError:
            raise ValueError(f"invalid address or CIDR {item!r}") from None
    return [item.strip() for item in items]


def _cookie_name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", value):
        raise ValueError(f"expected a cookie name (letters, digits, - _ .), got {value!r}")
    return value


# The keys a [pools.NAME] table takes: its backends, the pool-only sticky
# cookie, and every policy, timeout and health setting (the top-level value
# is the default).
POOL_KEYS = ("backends", "algorithm", "connect_timeout", "read_timeout", "max_fails",
             "fail_timeout", "slow_start", "health_interval", "health_path", "health_timeout",
             "health_status", "rise", "fall", "sticky_cookie")
_POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


@dataclass(frozen=True)
class Listener:
    """Where clients connect, and whether they speak TLS there (``scheme`` "https")."""

    host: str
    port: int
    scheme: str = "http"


@dataclass(frozen=True)
class PoolSettings:
    """One named pool of backends: its members, policy, timeouts and health checks."""

    name: str
    backends: list[BackendSpec]
    algorithm: str
    connect_timeout: float
    read_timeout: float
    max_fails: int
    fail_timeout: float
    slow_start: float
    health_interval: float
    health_path: str
    health_timeout: float
    health_status: tuple[int, int]
    rise: int
    fall: int
    backend_ca: str | None = None  # --backend-ca: CA file for https:// backends (None: system store)
    backend_insecure: bool = False  # --backend-insecure: no verification of https:// backends
    sticky_cookie: str | None = None  # cookie stickiness: the cookie's name


@dataclass(frozen=True)
class Setting:
    name: str  # attribute and config-file key
    flags: tuple[str, ...]
    default: Any
    check: Callable[[Any], Any]
    help: str
    metavar: str | None = None
    section: str = "general"
    cli_only: bool = False
    repeat: bool = False  # flag may be given several times (collected in a list)
    flag_only: bool = False  # boolean switch without a value


_SETTING = "cclb.setting"  # the key of a Setting in a Config field's metadata


def option(flags: tuple[str, ...], default: Any, check: Callable[[Any], Any], help: str,
           metavar: str | None = None, section: str = "general", *, cli_only: bool = False,
           repeat: bool = False, flag_only: bool = False) -> Any:
    """A Config field for one option; the field's name becomes the setting's name."""
    setting = Setting("", flags, default, check, help, metavar, section, cli_only, repeat, flag_only)
    value = default if default is None or flag_only or cli_only else check(default)
    if isinstance(value, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(value), metadata={_SETTING: setting})
    return field(default=value, metadata={_SETTING: setting})


@dataclass(frozen=True)
class Config:
    """The settings in force, one typed attribute per option (gunicorn style).

    Each option is defined once, here: its field's ``option(...)`` holds the
    flags, default, check and help; ``SETTINGS`` (the command line, the
    config file, the README table) is read off these fields.  Frozen: a
    reload builds a new Config and swaps it in whole.
    """

    port: int = option(
        ("-p", "--port"), 8080, _number(int, 0, 65535),
        "port to listen on (0: any free port)", "PORT", "listener")
    host: str = option(
        ("--host",), "0.0.0.0", _text,
        "address to listen on (0.0.0.0: all interfaces)", "HOST", "listener")
    workers: int = option(
        ("--workers",), 1, _number(int, 1, 64),
        "worker processes sharing the port", "N", "listener")
    backends: list[BackendSpec] = option(
        ("-b", "--backend"), DEFAULT_BACKENDS, _backends,
        "backend as http://host:port, https://host:port or host:port (http), optionally "
        "',weight=N'; repeat for each backend",
        "URL", "backends", repeat=True)
    algorithm: str = option(
        ("--algorithm",), "round-robin", _choice(*POLICIES),
        f"balancing policy: {', '.join(POLICIES)}", "NAME", "backends")
    health_interval: float = option(
        ("--health-interval",), 10.0, _number(float, 0, 86400),
        "seconds between active health checks of each backend (0: no active checks)",
        "SECONDS", "health")
    health_path: str = option(
        ("--health-path",), "/", _path,
        "path requested by active health checks", "PATH", "health")
    health_timeout: float = option(
        ("--health-timeout",), 2.0, _number(float, 0.01, 3600),
        "seconds a health check may take", "SECONDS", "health")
    health_status: tuple[int, int] = option(
        ("--health-status",), "200-399", _status_range,
        "status (range) that makes a health check pass", "RANGE", "health")
    rise: int = option(
        ("--rise",), 1, _number(int, 1, 100),
        "consecutive passing checks that bring a backend UP", "N", "health")
    fall: int = option(
        ("--fall",), 1, _number(int, 1, 100),
        "consecutive failing checks that take a backend DOWN", "N", "health")
    max_fails: int = option(
        ("--max-fails",), 1, _number(int, 0, 1000),
        "failed requests within --fail-timeout that take a backend DOWN (0: never)",
        "N", "health")
    fail_timeout: float = option(
        ("--fail-timeout",), 10.0, _number(float, 0.1, 86400),
        "window for --max-fails, in seconds", "SECONDS", "health")
    slow_start: float = option(
        ("--slow-start",), 0.0, _number(float, 0, 3600),
        "seconds over which a recovered backend's weight ramps up (0: off)",
        "SECONDS", "health")
    connect_timeout: float = option(
        ("--connect-timeout",), 3.0, _number(float, 0.01, 3600),
        "seconds to connect to a backend before trying the next one", "SECONDS", "timeouts")
    read_timeout: float = option(
        ("--read-timeout",), 60.0, _number(float, 0.01, 86400),
        "seconds a backend has to send its whole response head (504 after); "
        "also the longest silence while it sends the body", "SECONDS", "timeouts")
    upstream_reuse: str = option(
        ("--upstream-reuse",), "safe", _choice("safe", "always"),
        "reuse of idle backend connections across clients: safe (a client's first request "
        "never goes over a connection another client used) or always", "MODE", "timeouts")
    header_timeout: float = option(
        ("--header-timeout",), 10.0, _number(float, 0.01, 3600),
        "seconds a client has to send a whole request head (408 after)", "SECONDS", "timeouts")
    keepalive_timeout: float = option(
        ("--keepalive-timeout",), 30.0, _number(float, 0.01, 86400),
        "seconds an idle client keep-alive connection stays open", "SECONDS", "timeouts")
    body_timeout: float = option(
        ("--body-timeout",), 30.0, _number(float, 0.01, 86400),
        "seconds a client may stay silent while sending a body (408 after)",
        "SECONDS", "timeouts")
    tunnel_idle_timeout: float = option(
        ("--tunnel-idle-timeout",), 3600.0, _number(float, 0.01, 7 * 86400),
        "seconds an upgraded connection (WebSocket tunnel) may stay silent both ways before "
        "it is closed", "SECONDS", "timeouts")
    tls_certs: list[CertSpec] = option(
        ("--tls-cert",), [], _cert_specs,
        "serve TLS with this PEM file (certificate chain and key, or PEM,key=KEYFILE); repeat "
        "for more certificates, chosen by SNI (the first one is the default)",
        "PEM", "tls", repeat=True)
    tls_min_version: str = option(
        ("--tls-min-version",), "1.2", _choice("1.2", "1.3"),
        "oldest TLS version accepted: 1.2 or 1.3", "VERSION", "tls")
    hsts: int = option(
        ("--hsts",), 0, _number(int, 0, 10 ** 9),
        "add Strict-Transport-Security: max-age=SECONDS to responses sent over TLS (0: off)",
        "SECONDS", "tls")
    redirect_http: int | None = option(
        ("--redirect-http",), None, _number(int, 0, 65535),
        "also listen for plain HTTP on this port and redirect every request to https (308)",
        "PORT", "tls")
    backend_ca: str | None = option(
        ("--backend-ca",), None, _ca_file,
        "verify https:// backends against the CA certificates in this PEM file instead of "
        "the system trust store", "FILE", "tls")
    backend_insecure: bool = option(
        ("--backend-insecure",), False, _flag,
        "do not verify the certificates of https:// backends (testing only; logs a warning)",
        None, "tls", flag_only=True)
    trusted_proxies: list[str] = option(
        ("--trusted-proxy",), [], _addresses,
        "address or CIDR of a proxy in front of cclb whose X-Forwarded-For (and PROXY "
        "protocol header) is believed; repeat for more", "CIDR", "listener", repeat=True)
    proxy_protocol: bool = option(
        ("--proxy-protocol",), False, _flag,
        "expect a PROXY protocol v1/v2 header before each connection's first byte (accepted "
        "only from --trusted-proxy addresses)", None, "listener", flag_only=True)
    sticky_secret: str | None = option(
        ("--sticky-secret",), None, _text,
        "key of the sticky-session cookie values (default: derived from this machine's id; "
        "give every cclb host the same one)", "TEXT", "backends")
    max_body_size: int = option(
        ("--max-body-size",), 10 * 1024 ** 2, parse_size,
        "largest request body accepted (413 beyond), e.g. 10M", "SIZE", "limits")
    max_header_size: int = option(
        ("--max-header-size",), 32 * 1024, parse_size,
        "largest request header section (431 beyond)", "SIZE", "limits")
    max_request_line: int = option(
        ("--max-request-line",), 8 * 1024, parse_size,
        "longest request line (414 beyond)", "SIZE", "limits")
    max_headers: int = option(
        ("--max-headers",), 100, _number(int, 1, 10000),
        "most header fields in a request (431 beyond)", "N", "limits")
    max_connections: int = option(
        ("--max-connections",), 10000, _number(int, 1, 1000000),
        "most client connections at once, idle and half-received ones included; beyond it new "
        "ones get a fast 503 (the open-file limit is raised to fit at start)", "N", "limits")
    max_connections_per_ip: int = option(
        ("--max-connections-per-ip",), 0, _number(int, 0, 1000000),
        "most connections at once from one client address; beyond it new ones from that address "
        "get a fast 503 (0: no limit)", "N", "limits")
    threads: int = option(
        ("--threads",), 64, _number(int, 1, 4096),
        "handler threads per process serving requests whose head has arrived (idle and slow "
        "clients wait without one; see README \"Engine\")", "N", "limits")
    min_body_rate: int = option(
        ("--min-body-rate",), 1024, _number(int, 0, 10 ** 9),
        "slowest a streamed request body (beyond 256 KiB, or chunked) may arrive, in bytes per "
        "second over each 10 s window, before a 408 (0: no floor)", "BYTES_PER_S", "timeouts")
    drain_timeout: float = option(
        ("--drain-timeout",), 10.0, _number(float, 0, 3600),
        "seconds SIGTERM waits for requests in flight before closing them", "SECONDS", "timeouts")
    gzip_level: int = option(
        ("--gzip-level",), 5, _number(int, 0, 9),
        "gzip compression level for clients that accept it (0: no compression)", "N", "gzip")
    gzip_min_size: int = option(
        ("--gzip-min-size",), 256, parse_size,
        "smallest response body worth compressing", "SIZE", "gzip")
    log_level: str = option(
        ("--log-level",), "INFO",
        lambda v: _choice("debug", "info", "warning", "error", "critical")(v).upper(),
        "application log level: debug, info, warning, error or critical", "LEVEL", "logging")
    access_log: str = option(
        ("--access-log",), "-", _text,
        "access log file, '-' for stderr, 'off' for none", "PATH", "logging")
    log_format: str = option(
        ("--log-format",), "text", _choice("text", "json"),
        "access log format: text or json", "FORMAT", "logging")
    admin_port: int | None = option(
        ("--admin-port",), None, _number(int, 0, 65535),
        "port of the admin API and dashboard (default: off)", "PORT", "admin")
    admin_host: str = option(
        ("--admin-host",), "127.0.0.1", _text,
        "address of the admin API (a non-loopback one needs --admin-token)", "HOST", "admin")
    admin_token: str | None = option(
        ("--admin-token",), None, _text,
        "bearer token required for admin API writes", "TOKEN", "admin")
    config: str | None = option(
        ("--config",), None, _text,
        "TOML configuration file (options on the command line override it)",
        "FILE", "general", cli_only=True)
    demo: bool = option(
        ("--demo",), False, bool,
        "also start the three demo backends (server.py on 7000-7002) as child processes",
        None, "general", cli_only=True, flag_only=True)
    check: bool = option(
        ("-t", "--check"), False, bool,
        "check the configuration, print a summary of what would run, and exit (0 if valid, else 2)",
        None, "general", cli_only=True, flag_only=True)

    # Not options: the [pools.NAME] tables (checked values; others inherit the
    # top-level ones), the [[routes]] table, whether the pool "default" exists.
    pool_tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    routes: RouteTable = field(default_factory=RouteTable, compare=False)
    has_default: bool = True
    # Not options: where the settings came from.
    source: str | None = field(default=None, compare=False)  # config file path, if any
    cli: dict[str, Any] = field(default_factory=dict, compare=False)  # what the command line gave

    @property
    def values(self) -> dict[str, Any]:
        """Every option's value by name (for /status and reload comparisons)."""
        return {setting.name: getattr(self, setting.name) for setting in SETTINGS}

    @property
    def listener(self) -> Listener:
        return Listener(self.host, self.port, "https" if self.tls_certs else "http")

    @property
    def pools(self) -> dict[str, PoolSettings]:
        """The named backend pools; the command line and top-level keys fill ``default``.

        Every setting a ``[pools.NAME]`` table leaves out is the top-level one.
        """
        tables = dict(self.pool_tables)
        if self.has_default:
            tables = {"default": {"backends": self.backends}, **tables}
        return {name: self.pool(name, table) for name, table in tables.items()}

    def pool(self, name: str, table: dict[str, Any]) -> PoolSettings:
        get = lambda key: table.get(key, getattr(self, key))  # noqa: E731
        return PoolSettings(
            name, list(table["backends"]), get("algorithm"), get("connect_timeout"),
            get("read_timeout"), get("max_fails"), get("fail_timeout"), get("slow_start"),
            get("health_interval"), get("health_path"), get("health_timeout"),
            get("health_status"), get("rise"), get("fall"), self.backend_ca,
            self.backend_insecure, table.get("sticky_cookie"))


SETTINGS: list[Setting] = [replace(f.metadata[_SETTING], name=f.name)
                           for f in fields(Config) if _SETTING in f.metadata]

BY_NAME = {setting.name: setting for setting in SETTINGS}


def version_line() -> str:
    return f"cclb {VERSION} (Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cclb.py",
        description="cclb: an HTTP/1.1 load balancer in pure-stdlib Python.",
    )
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print cclb's and Python's versions and exit")
    groups: dict[str, Any] = {}
    for setting in SETTINGS:
        group = groups.get(setting.section)
        if group is None:
            group = groups[setting.section] = parser.add_argument_group(setting.section)
        if setting.flag_only:
            group.add_argument(*setting.flags, dest=setting.name, action="store_true",
                               default=argparse.SUPPRESS, help=setting.help)
            continue
        shown_default = setting.default
        if setting.name == "backends":
            shown_default = " ".join(DEFAULT_BACKENDS)
        elif setting.name == "health_status":
            shown_default = "200-399"
        group.add_argument(*setting.flags, dest=setting.name, metavar=setting.metavar,
                           action="append" if setting.repeat else "store",
                           default=argparse.SUPPRESS,
                           help=setting.help + ("" if shown_default is None else f" (default: {shown_default})"))
    return parser


def _line_of(text: str, key: str) -> str:
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{re.escape(key)}\s*=", line) or re.match(rf"\s*\[+\s*{re.escape(key)}\s*\]", line):
            return f" (line {number})"
    return ""


def _route_lines(text: str) -> list[int]:
    """The line number of each ``[[routes]]`` header, in file order."""
    return [number for number, line in enumerate(text.splitlines(), 1)
            if re.match(r"\s*\[\[\s*routes\s*\]\]", line)]


def _read_pools(path: str, text: str, raw: Any) -> dict[str, dict[str, Any]]:
    """The ``[pools.NAME]`` tables, each value checked like its top-level setting."""
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise SettingsError(f"{path}{_line_of(text, 'pools')}: pools: expected tables "
                            "such as [pools.api]")
    pools: dict[str, dict[str, Any]] = {}
    for name, table in raw.items():
        where = f"{path}{_line_of(text, f'pools.{name}')}: pools.{name}"
        if not _POOL_NAME.fullmatch(name):
            raise SettingsError(f"{where}: a pool name is letters, digits, '-', '_' or '.'")
        unknown = sorted(set(table) - set(POOL_KEYS))
        if unknown:
            raise SettingsError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(POOL_KEYS)})")
        if "backends" not in table:
            raise SettingsError(f"{where}: no backends (backends = [...])")
        checked: dict[str, Any] = {}
        for key, value in table.items():
            try:
                if key == "sticky_cookie":
                    checked[key] = _cookie_name(value)
                    continue
                check = BY_NAME[key].check
                if isinstance(value, str) and getattr(check, "numeric", False):
                    raise ValueError(f"expected a number, not the string {value!r}")
                checked[key] = check(value)
            except ValueError as error:
                raise SettingsError(f"{where}.{key}: {error}") from None
        pools[name] = checked
    return pools


def read_config_file(path: str) -> dict[str, Any]:
    """Checked values from a TOML file; SettingsError names the key and line.

    ``[pools.NAME]`` tables come back checked under ``pool_tables``; the
    ``[[routes]]`` array raw under ``routes`` (with ``route_lines``): routes
    are checked by ``resolve``, once the pool names are known.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        data = tomllib.loads(raw.decode("utf-8"))
    except OSError as error:
        raise SettingsError(f"cannot read config file {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SettingsError(f"{path}: invalid TOML: {error}") from None
    text = raw.decode("utf-8")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "pools":
            values["pool_tables"] = _read_pools(path, text, value)
            continue
        if key == "routes":
            values["routes"] = value
            values["route_lines"] = _route_lines(text)
            continue
        setting = BY_NAME.get(key)
        if setting is None or setting.cli_only:
            known = ", ".join(s.name for s in SETTINGS if not s.cli_only)
            raise SettingsError(f"{path}{_line_of(text, key)}: unknown key {key!r} (known: {known})")
        try:
            if isinstance(value, str) and getattr(setting.check, "numeric", False):
                raise ValueError(f"expected a number, not the string {value!r}")
            values[key] = setting.check(value)
        except ValueError as error:
            raise SettingsError(f"{path}{_line_of(text, key)}: {key}: {error}") from None
    return values


def load(argv: list[str] | None = None) -> Config:
    """Settings from defaults, then the config file, then the command line.

    Exits with code 2 (argparse's convention) and a clear message on errors.
    """
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        return resolve(args)
    except SettingsError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
        raise  # unreachable; keeps type checkers happy


def resolve(cli: dict[str, Any]) -> Config:
    """Merge defaults, the file named by cli['config'] and the command line."""
    values = Config().values
    path = cli.get("config")
    from_file = read_config_file(path) if path else {}
    pool_tables = from_file.pop("pool_tables", {})
    raw_routes = from_file.pop("routes", [])
    route_lines = from_file.pop("route_lines", [])
    values.update(from_file)
    for name, raw in cli.items():
        setting = BY_NAME[name]
        if setting.cli_only:
            values[name] = raw
            continue
        try:
            values[name] = setting.check(raw)
        except ValueError as error:
            raise SettingsError(f"{'/'.join(setting.flags)}: {error}") from None
    validate(values)
    has_default = not path or "backends" in from_file or "backends" in cli
    if path and not has_default and not pool_tables:
        # An empty, truncated or half-written file must not swap every backend
        # for the built-in 127.0.0.1:7000-7002 of the bare challenge.
        raise SettingsError(f"{path}: no backends: a config file must name its backends "
                            "(backends = [...] or [pools.NAME] tables) unless --backend is given")
    if has_default and "default" in pool_tables:
        raise SettingsError(f"{path}: duplicate pool name 'default': the top-level backends "
                            "(or --backend) are the pool default already")
    owners: dict[str, str] = {}
    tables = {"default": {"backends": values["backends"]}} if has_default else {}
    for name, table in {**tables, **pool_tables}.items():
        for spec in table["backends"]:
            if spec.url in owners:
                raise SettingsError(f"{path}: pools.{name}.backends: {spec.url} is in pool "
                                    f"{owners[spec.url]!r} already (a backend belongs to one pool)")
            owners[spec.url] = name
    try:
        routes = parse_routes(raw_routes, [*tables, *pool_tables])
    except RouteError as error:
        index = re.match(r"routes\[(\d+)\]", error.key)
        line = ""
        if index and int(index[1]) < len(route_lines):
            line = f" (line {route_lines[int(index[1])]})"
        raise SettingsError(f"{path}{line}: {error}") from None
    return Config(**values, pool_tables=pool_tables, routes=routes, has_default=has_default,
                  source=path, cli=dict(cli))


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and "localhost": addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(values: dict[str, Any]) -> None:
    """Checks that involve more than one setting."""
    token = values["admin_token"]
    if token is not None and not token.strip():
        raise SettingsError("--admin-token must not be empty or blank")
    if values["proxy_protocol"] and not values["trusted_proxies"]:
        raise SettingsError("--proxy-protocol needs --trusted-proxy (trusted_proxies): the "
                            "header is accepted only from trusted proxies")
    host = values["admin_host"]
    if values["admin_port"] is not None and not token and not is_loopback(host):
        raise SettingsError(f"--admin-host {host} is not loopback: an --admin-token is required")


def _size(n: int) -> str:
    for unit, factor in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} bytes"


def summary(config: Config) -> str:
    """What ``config`` would run, on one screen (``--check``)."""
    lines = [f"cclb {VERSION}: configuration OK ({config.source or 'command line and defaults'})"]
    workers = f"{config.workers} worker{'s' * (config.workers != 1)}"
    lines.append(f"listen    {config.listener.scheme}://{config.host}:{config.port} ({workers}, "
                 f"at most {config.max_connections} connections)")
    for pool in config.pools.values():
        lines.append(f"pool      {pool.name}: {pool.algorithm}, {len(pool.backends)} "
                     f"backend{'s' * (len(pool.backends) != 1)}")
        lines.extend(f"            {spec.url} weight {spec.weight}" for spec in pool.backends)
        checks = (f"every {pool.health_interval:g}s GET {pool.health_path} (timeout "
                  f"{pool.health_timeout:g}s, {pool.health_status[0]}-{pool.health_status[1]}, "
                  f"rise {pool.rise}, fall {pool.fall})" if pool.health_interval > 0
                  else "active checks off")
        lines.append(f"health    {checks}; passive: {pool.max_fails} failure(s) in "
                     f"{pool.fail_timeout:g}s" + (f"; slow start {pool.slow_start:g}s"
                                                   if pool.slow_start else ""))
    for route in config.routes.routes:
        lines.append(f"route     {describe_route(route)}")
    if config.routes.routes:
        lines.append("route     anything else -> " + ("pool default" if config.routes.default
                                                      else "404"))
    if config.trusted_proxies:
        lines.append(f"clients   trusted proxies {', '.join(config.trusted_proxies)}"
                     + ("; PROXY protocol expected" if config.proxy_protocol else ""))
    lines.append(f"timeouts  connect {config.connect_timeout:g}s, read {config.read_timeout:g}s, "
                 f"header {config.header_timeout:g}s, keep-alive {config.keepalive_timeout:g}s, "
                 f"body {config.body_timeout:g}s, tunnel idle {config.tunnel_idle_timeout:g}s, "
                 f"drain {config.drain_timeout:g}s")
    lines.append(f"limits    body {_size(config.max_body_size)}, head {_size(config.max_header_size)}, "
                 f"request line {_size(config.max_request_line)}, {config.max_headers} fields")
    lines.append("gzip      " + (f"level {config.gzip_level} from {_size(config.gzip_min_size)}"
                                 if config.gzip_level else "off"))
    if config.tls_certs:
        lines.append(f"tls       TLS {config.tls_min_version}+ with " + ", ".join(map(str, config.tls_certs))
                     + (f"; HSTS max-age={config.hsts}" if config.hsts else "")
                     + (f"; plain HTTP on :{config.redirect_http} redirects here"
                        if config.redirect_http is not None else ""))
    if config.backend_insecure or config.backend_ca or any(spec.tls for spec in config.backends):
        verify = ("NOT verified (--backend-insecure)" if config.backend_insecure else
                  f"verified against {config.backend_ca}" if config.backend_ca else
                  "verified against the system trust store")
        lines.append(f"backends  https:// certificates {verify}")
    lines.append(f"upstream  reuse {config.upstream_reuse}")
    lines.append(f"logs      application {config.log_level} on stderr; access log "
                 f"{config.access_log} ({config.log_format})")
    admin = ("off" if config.admin_port is None else
             f"http://{config.admin_host}:{config.admin_port} "
             f"(writes {'need the token' if config.admin_token else 'open, loopback only'})")
    lines.append(f"admin     {admin}")
    return "\n".join(lines)


def describe_route(route: Any) -> str:
    """One line for ``--check``: what a route matches and what it does."""
    match = [f"host {route.host}" if route.host else "",
             f"path {route.path_prefix}*" if route.path_prefix else "",
             "methods " + ",".join(sorted(route.methods)) if route.methods else "",
             " ".join(f"{n}: {v}" for n, v in route.headers)]
    action = (f"pool {route.pool}" + (" (prefix stripped)" if route.strip_prefix else "")
              if route.pool else f"redirect {route.status} {route.redirect}" if route.redirect
              else f"respond {route.respond}")
    rules = [word for word, on in (("allow/deny", route.allow is not None or route.deny is not None),
                                   ("rate limit", route.rate is not None),
                                   ("header rules", bool(route.request_headers or route.response_headers)))
             if on]
    return (f"{route.name}: {' '.join(part for part in match if part) or 'any request'} -> {action}"
            + (f" [{', '.join(rules)}]" if rules else ""))


def markdown_table() -> str:
    """The README's option table."""
    rows = ["| option | config key | default | meaning |", "|---|---|---|---|"]
    for setting in SETTINGS:
        flags = ", ".join(f"`{flag}`" + (f" {setting.metavar}" if setting.metavar else "")
                          for flag in setting.flags)
        key = "(command line only)" if setting.cli_only else f"`{setting.name}`"
        default = setting.default
        if setting.name == "backends":
            default = "127.0.0.1:7000-7002"
        shown = "off" if default is None else f"`{default}`"
        rows.append(f"| {flags} | {key} | {shown} | {setting.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")

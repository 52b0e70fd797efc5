"""Backend addresses as configured: ``[http[s]://]host:port[,weight=N]``, parsed and checked.

Pure: no sockets, no shared state.  Settings, the admin API and the
workers' state snapshots all read backends through ``parse_backend``, so
they accept and reject exactly the same text.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """A backend as configured: ``http://host:port`` or ``https://host:port`` plus options.

    ``url`` keeps the scheme (it is the backend's name everywhere: logs,
    ``/status``, metrics, snapshots), so the same host and port over http
    and over https are two different backends.
    """

    url: str
    host: str
    port: int
    weight: int = 1
    scheme: str = "http"  # "http" or "https" (TLS to the backend)

    @property
    def tls(self) -> bool:
        """True for an ``https://`` backend."""
        return self.scheme == "https"


def parse_backend(text: str) -> BackendSpec:
    """Parse ``[http[s]://]host:port[,weight=N]``; ValueError with a clear message.

    No scheme means ``http://``.  The scheme is matched case-insensitively
    and shown in lower case in ``url``.
    """
    address, *options = [part.strip() for part in text.split(",")]
    raw = address if "://" in address else f"http://{address}"
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"invalid backend {text!r}: {error}") from None
    scheme = parts.scheme  # urlsplit lower-cases it
    if scheme not in ("http", "https"):
        raise ValueError(f"invalid backend {text!r}: only http:// and https:// backends are supported")
    if not parts.hostname or port is None:
        raise ValueError(f"invalid backend {text!r}: expected {scheme}://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"invalid backend {text!r}: expected {scheme}://host:port with no path")
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid backend {text!r}: port must be 1-65535")
    weight = 1
    for option in options:
        key, _, value = option.partition("=")
        if key != "weight" or not value.isdigit() or not 1 <= int(value) <= 1000:
            raise ValueError(f"invalid backend option {option!r} in {text!r}: expected weight=1..1000")
        weight = int(value)
    host = parts.hostname
    if not _HOSTNAME.fullmatch(host) and not _is_ip(host):
        raise ValueError(f"invalid backend {text!r}: {host!r} is not a host name or IP address")
    shown_host = f"[{host}]" if ":" in host else host
    return BackendSpec(f"{scheme}://{shown_host}:{port}", host, port, weight, scheme)

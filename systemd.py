"""systemd's service notifications (``Type=notify``), with the standard library.

When systemd starts cclb with ``Type=notify`` it sets ``NOTIFY_SOCKET`` to a
datagram socket; cclb sends ``READY=1`` once it listens, ``RELOADING=1``
(with ``MONOTONIC_USEC``) then ``READY=1`` around a reload, and
``STOPPING=1`` when it begins to stop (see sd_notify(3)).  Without the
variable every call is a no-op, so nothing changes outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("cclb")

NOTIFY_ENV = "NOTIFY_SOCKET"


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. "READY=1") to systemd; False if not under systemd or it failed."""
    address = os.environ.get(NOTIFY_ENV)
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket: a leading NUL byte
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as error:
        log.debug("cannot notify systemd at %s: %s", address, error)
        return False
    return True


def ready(status: str) -> None:
    notify("READY=1", f"STATUS={status}")


def reloading() -> None:
    # MONOTONIC_USEC lets systemd match this reload to the ExecReload it ran.
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> None:
    notify("STOPPING=1")

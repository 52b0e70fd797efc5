"""Long-lived loops survive an unexpected exception in one round.

Every loop that runs for the life of the process (health checker,
supervisor, header watchdog, access-log writer, admin server, the main
signal loop, the worker's pipes) wraps each round in a ``LoopGuard``: an
unexpected exception is logged at ERROR with its traceback, the round is
abandoned, and the loop carries on with the next one (as Caddy's health
loop does with ``recover``).  A failure that repeats every round is logged
with its traceback once, then at most once a minute, so a stuck fault can
neither kill the loop nor flood the log.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from types import TracebackType
from typing import Any

log = logging.getLogger("cclb")

REPEAT_LOG_INTERVAL = 60.0  # seconds between two log lines for the same repeated failure


class LoopGuard:
    """``with guard: one_round()`` logs and swallows an ``Exception`` of that round.

    ``BaseException`` (SystemExit, KeyboardInterrupt) still passes: those
    are requests to stop, not faults.  ``lock`` guards ``seen`` and
    ``failures`` (a guard may be shared by the threads of one loop).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.seen: dict[str, float] = {}  # failure signature -> monotonic time last logged
        self.failures = 0

    def __enter__(self) -> LoopGuard:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> bool:
        if error is None or not isinstance(error, Exception):
            return False
        self.report(error)
        return True  # the loop carries on

    def report(self, error: Exception) -> None:
        """Log ``error``: with its traceback the first time, then once a minute."""
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        signature = f"{type(error).__name__}: {error} at {where}"
        now = time.monotonic()
        with self.lock:
            self.failures += 1
            last = self.seen.get(signature)
            if last is not None and now - last < REPEAT_LOG_INTERVAL:
                return
            self.seen[signature] = now
            first = last is None
        if first:
            log.error("unexpected error in the %s loop; it carries on", self.name,
                      exc_info=(type(error), error, error.__traceback__))
        else:
            log.error("the %s loop failed again (%s); it carries on", self.name, signature)


class Deadlines:
    """Things with a deadline (``expire()`` methods), expired by a loop's rounds.

    Shared by the proxy's header watchdog and the admin listener.  ``lock``
    guards ``deadlines``; expiring under it means a handler that has
    unwatched can no longer be expired.  One handler's failing ``expire``
    is logged (``guard``) and spares none of the others.
    """

    def __init__(self, name: str) -> None:
        self.lock = threading.Lock()
        self.deadlines: dict[Any, float] = {}  # handler -> monotonic deadline
        self.guard = LoopGuard(name)

    def watch(self, handler: Any, deadline: float) -> None:
        with self.lock:
            self.deadlines[handler] = deadline

    def unwatch(self, handler: Any) -> None:
        with self.lock:
            self.deadlines.pop(handler, None)

    def expire_due(self, now: float) -> None:
        """Expire every handler whose deadline is ``now`` or earlier (one round)."""
        with self.lock:
            due = [handler for handler, deadline in self.deadlines.items() if deadline <= now]
            for handler in due:
                del self.deadlines[handler]
                with self.guard:
                    handler.expire()

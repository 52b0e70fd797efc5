"""Logging: the application log and the access log.

The application log (start, stop, health transitions, errors) is the
standard ``logging`` logger named "cclb", on stderr.

The access log gets one line per request.  ``logging`` costs several
microseconds per record (LogRecord, formatter, handler lock, a write per
line), too much for the hot path, so request threads only format a line and
append it to a deque; one writer thread writes the batch a few times a second.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from loops import LoopGuard
from metrics import PROCESS

APP_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
JOURNAL_FORMAT = "<%(priority)d>%(levelname)s %(message)s"  # journald adds the time
# syslog priorities (RFC 5424 6.2.1) of the logging levels, for journald's <N> prefix.
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
              logging.DEBUG: 7}

log = logging.getLogger("cclb")
_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\xff"\\]')


def sanitize(text: str) -> str:
    """Escape control characters, quotes and backslashes (no log injection)."""
    return _UNSAFE.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


class IsoFormatter(logging.Formatter):
    """Timestamps in ISO 8601 with milliseconds and the UTC offset."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class JournalFormatter(logging.Formatter):
    """``<N>`` priority prefixes that journald reads (sd-daemon(3)); no timestamp of ours."""

    def format(self, record: logging.LogRecord) -> str:
        record.priority = PRIORITIES.get(record.levelno, 6)
        return super().format(record)


def stderr_is_journal() -> bool:
    """True when systemd connected stderr to the journal (JOURNAL_STREAM is "dev:inode")."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        status = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


def setup_app_logger(level: str) -> logging.Logger:
    """Configure and return the "cclb" application logger (stderr, or the journal's format)."""
    logger = logging.getLogger("cclb")
    logger.setLevel(level.upper())
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter(JOURNAL_FORMAT) if stderr_is_journal()
                             else IsoFormatter(APP_LOG_FORMAT))
        logger.addHandler(handler)
    return logger


class WarningLimiter:
    """Application-log warnings, at most one per key per ``period`` seconds.

    A dead backend under load fails hundreds of requests a second; the
    operator needs the backend and the cause, not every occurrence.  The
    first warning of a key goes out at once; the ones that follow within
    ``period`` are only counted, and the next one that goes out says how
    many were held back.  ``lock`` guards ``last`` (key -> [time of the
    last warning written, warnings held back since]).
    """

    def __init__(self, logger: logging.Logger, period: float = 1.0, max_keys: int = 10000) -> None:
        self.logger = logger
        self.period = period
        self.max_keys = max_keys  # keys carry backend URLs: bounded, in case of churn
        self.lock = threading.Lock()
        self.last: dict[tuple[str, ...], list[float]] = {}

    def warn(self, key: tuple[str, ...], message: str, *args: object) -> bool:
        """Log ``message % args`` at WARNING unless ``key`` was warned about within ``period``.

        True if it was written.
        """
        if not self.logger.isEnabledFor(logging.WARNING):
            return False
        now = time.monotonic()
        with self.lock:
            entry = self.last.get(key)
            if entry is not None and now - entry[0] < self.period:
                entry[1] += 1
                return False
            held = int(entry[1]) if entry is not None else 0
            if entry is None and len(self.last) >= self.max_keys:
                self.last.clear()
            self.last[key] = [now, 0]
        if held:
            message += " (and %d more like it since the last such warning)"
            args = (*args, held)
        self.logger.warning(message, *args)
        return True


@dataclass(frozen=True)
class Stamps:
    """One second's timestamps in both formats, with the local UTC offset."""

    second: int
    text: str  # 01/Dec/2026:22:30:00 +0000 (nginx's $time_local)
    iso: str  # 2026-12-01T22:30:00 (milliseconds and offset follow)
    iso_offset: str  # +00:00

    @classmethod
    def at(cls, second: int) -> Stamps:
        local = time.localtime(second)
        offset = time.strftime("%z", local)
        return cls(second, time.strftime("%d/%b/%Y:%H:%M:%S ", local) + offset,
                   time.strftime("%Y-%m-%dT%H:%M:%S", local), f"{offset[:3]}:{offset[3:]}")


class AccessLog:
    """Asynchronous, batched access log writer.

    ``record`` is thread-safe and cheap: it formats one line and appends it
    to ``pending`` (``collections.deque.append`` is atomic, so request
    threads share no lock of ours).  The writer thread wakes every
    ``flush_interval`` seconds to write whatever accumulated in one call;
    waking it per line would cost a thread switch per request.

    ``lock`` guards ``stream``: the writer thread writes under it, and
    ``reopen`` (SIGHUP, log rotation) swaps the file under it, so a line
    queued at any moment lands in the old file or the new one, never
    nowhere.
    """

    def __init__(self, destination: str, log_format: str = "text",
                 flush_interval: float = 0.2) -> None:
        self.flush_interval = flush_interval
        self.lock = threading.Lock()
        self.stream: TextIO | None = self._open(destination)
        self.json = log_format == "json"
        self.pending: deque[str] = deque()
        self.stopped = threading.Event()
        self.stamps = Stamps.at(int(time.time()))
        self.last_loss_warning = 0.0  # monotonic; writer thread only
        self.guard = LoopGuard("access log writer")
        self.writer = threading.Thread(target=self._run, name="access-log", daemon=True)
        self.writer.start()

    @staticmethod
    def _open(destination: str) -> TextIO | None:
        """The stream for ``destination``; OSError if a file cannot be opened."""
        if destination == "off":
            return None
        if destination == "-":
            return sys.stderr
        return open(destination, "a", encoding="utf-8", buffering=1 << 16)

    def reopen(self, destination: str, log_format: str) -> None:
        """Switch to ``destination`` (the same path reopens it, for log rotation).

        OSError if it cannot be opened; the current stream is then kept.
        Lines queued before the switch are written to the old stream first.
        """
        fresh = self._open(destination)
        with self.lock:
            self._write_pending()
            old, self.stream = self.stream, fresh
            self.json = log_format == "json"
        if old is not None and old is not sys.stderr:
            old.close()

    def record(self, client: str, method: str, target: str, status: int, sent: int,
               backend: str, duration: float, request_id: str = "",
               details: dict[str, Any] | None = None) -> None:
        """Log one finished request (``duration`` in seconds).

        ``details``: more fields for the JSON format (``host``, ``protocol``,
        ``attempts``, ``termination``...: see README "Logs"), appended after
        the base ones; the text format ignores them.  Callers build them only
        when ``json`` is set.
        """
        if self.stream is None:
            return  # "off" (a stale read during a reopen costs at most one line)
        now = time.time()
        stamps = self.stamps
        if stamps.second != int(now):
            stamps = self.stamps = Stamps.at(int(now))  # one reference swap: no torn pair
        if self.json:
            document = {
                "time": f"{stamps.iso}.{int(now % 1 * 1000):03d}{stamps.iso_offset}",
                "client": client, "method": method, "target": target, "status": status,
                "bytes": sent, "backend": None if backend == "-" else backend,
                "duration_ms": round(duration * 1000, 2), "request_id": request_id,
            }
            if details:
                document.update(details)
            line = json.dumps(document, ensure_ascii=False)
        else:
            line = (f'{client} [{stamps.text}] "{method} {target}" {status} {sent} '
                    f'{backend} {duration * 1000:.1f}ms'
                    + (f" {request_id}" if request_id else ""))
        self.pending.append(line)

    def _run(self) -> None:
        while not self.stopped.wait(self.flush_interval):
            with self.guard:
                self.flush()
        self.flush()

    def flush(self) -> None:
        """Write every pending line to the current stream."""
        with self.lock:
            self._write_pending()

    def _write_pending(self) -> None:
        # caller holds self.lock
        lines = []
        pending = self.pending
        while pending:
            lines.append(pending.popleft())
        if lines and self.stream is not None:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError) as error:
                self._lost(len(lines), error)

    def _lost(self, count: int, error: Exception) -> None:
        """Count lines that could not be written; warn at most once a minute (never raise)."""
        PROCESS.count_access_log_loss(count)
        now = time.monotonic()
        if now - self.last_loss_warning >= 60 or not self.last_loss_warning:
            self.last_loss_warning = now
            log.warning("access log write failed, %d line(s) lost: %s (counted in "
                        "cclb_access_log_lines_lost_total; warned at most once a minute)",
                        count, error)

    def close(self) -> None:
        """Flush every queued line and stop the writer."""
        self.stopped.set()
        self.writer.join(timeout=5)
        with self.lock:
            self._write_pending()
            stream, self.stream = self.stream, None
        if stream is not None and stream is not sys.stderr:
            stream.close()

"""Logging: the application log and the access log.

The application log (start, stop, health transitions, errors) is the
standard ``logging`` logger named "cclb", on stderr.

The access log gets one line per request.  ``logging`` costs several
microseconds per record (LogRecord, formatter, handler lock, a write per
line), too much for the hot path, so request threads only format a line and
append it to a queue; one writer thread drains the queue in batches.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from typing import TextIO

APP_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_app_logger(level: str) -> logging.Logger:
    """Configure and return the "cclb" application logger (stderr)."""
    logger = logging.getLogger("cclb")
    logger.setLevel(level.upper())
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(APP_LOG_FORMAT))
        logger.addHandler(handler)
    return logger


class AccessLog:
    """Asynchronous access log writer.

    ``record`` is thread-safe and cheap: it formats one line and puts it on a
    ``queue.SimpleQueue`` (which needs no lock of ours).  The writer thread
    owns the output stream.
    """

    def __init__(self, destination: str, log_format: str = "text") -> None:
        self.json = log_format == "json"
        self.stream: TextIO | None
        if destination == "off":
            self.stream = None
        elif destination == "-":
            self.stream = sys.stderr
        else:
            self.stream = open(destination, "a", encoding="utf-8", buffering=1 << 16)
        self.queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._drain, name="access-log", daemon=True)
        if self.stream is not None:
            self.writer.start()

    @property
    def enabled(self) -> bool:
        return self.stream is not None

    def record(self, client: str, method: str, target: str, status: int, sent: int,
               backend: str, duration: float, request_id: str = "") -> None:
        """Log one finished request (``duration`` in seconds)."""
        if self.stream is None:
            return
        now = time.time()
        if self.json:
            line = json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
                "client": client, "method": method, "target": target, "status": status,
                "bytes": sent, "backend": backend, "duration_ms": round(duration * 1000, 2),
                "request_id": request_id,
            }, ensure_ascii=False)
        else:
            stamp = time.strftime("%d/%b/%Y:%H:%M:%S", time.localtime(now))
            line = (f'{client} [{stamp}] "{method} {target}" {status} {sent} '
                    f'{backend or "-"} {duration * 1000:.1f}ms'
                    + (f" {request_id}" if request_id else ""))
        self.queue.put(line)

    def _drain(self) -> None:
        assert self.stream is not None
        while True:
            line = self.queue.get()
            lines = []
            while line is not None:
                lines.append(line)
                try:
                    line = self.queue.get_nowait()
                except queue.Empty:
                    break
            if lines:
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass
            if line is None:
                return

    def close(self) -> None:
        """Flush every queued line and stop the writer."""
        if self.stream is None:
            return
        self.queue.put(None)
        self.writer.join(timeout=5)
        if self.stream is not sys.stderr:
            self.stream.close()

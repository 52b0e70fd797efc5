"""Unit tests for ``loggers``: the asynchronous AccessLog writer and ``sanitize``.

Every test writes to files in a temporary directory and reads back what
landed there, polling with a deadline (``wait_for``) for the writer thread.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import threading
import unittest
from unittest import mock
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import loggers  # noqa: E402
import metrics  # noqa: E402
from loggers import AccessLog, sanitize  # noqa: E402
from tests.support import wait_for  # noqa: E402

FAST = 0.01  # flush interval for tests, seconds


def read_lines(path: str) -> list[str]:
    """The lines of ``path`` ([] if it does not exist yet)."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().splitlines()
    except FileNotFoundError:
        return []


class FailingOnceStream:
    """Wraps a stream; its first ``write`` raises RuntimeError (an unexpected bug)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.failed = threading.Event()

    def write(self, text: str) -> int:
        if not self.failed.is_set():
            self.failed.set()
            raise RuntimeError("injected write failure")
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class AccessLogTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="cclb-loggers-")
        self.addCleanup(self._remove_directory)

    def _remove_directory(self) -> None:
        for name in os.listdir(self.directory):
            os.unlink(os.path.join(self.directory, name))
        os.rmdir(self.directory)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def open_log(self, destination: str, log_format: str = "text",
                 flush_interval: float = FAST) -> AccessLog:
        access_log = AccessLog(destination, log_format, flush_interval)
        self.addCleanup(access_log.close)
        return access_log

    def wait_lines(self, path: str, count: int) -> list[str]:
        """Wait until ``path`` holds at least ``count`` lines; return them."""
        wait_for(lambda: len(read_lines(path)) >= count, timeout=5,
                 message=f"{count} line(s) in {os.path.basename(path)}")
        return read_lines(path)


class FormatTests(AccessLogTestCase):
    def test_text_line(self) -> None:
        """A text line: client, [time], "method target", status, bytes, backend, ms, request id."""
        path = self.path("access.log")
        access_log = self.open_log(path)
        access_log.record("10.0.0.1", "GET", "/a?b=1", 200, 1234, "http://127.0.0.1:9001",
                          0.01234, "req-1")
        access_log.record("10.0.0.2", "POST", "/x", 503, 0, "-", 0.5)
        lines = self.wait_lines(path, 2)
        self.assertEqual(len(lines), 2)
        self.assertRegex(
            lines[0], r'^10\.0\.0\.1 \[\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] "GET /a\?b=1" 200 1234 '
                      r'http://127\.0\.0\.1:9001 12\.3ms req-1$')
        self.assertRegex(lines[1], r'^10\.0\.0\.2 \[[^]]+\] "POST /x" 503 0 - 500\.0ms$')

    def test_json_line(self) -> None:
        """A JSON line parses, with every field and its type."""
        path = self.path("access.json")
        access_log = self.open_log(path, "json")
        access_log.record("10.0.0.1", "GET", '/q"uote', 404, 17, "http://127.0.0.1:9001",
                          0.01234, "abc")
        (line,) = self.wait_lines(path, 1)
        document = json.loads(line)
        self.assertEqual(set(document), {"time", "client", "method", "target", "status", "bytes",
                                         "backend", "duration_ms", "request_id"})
        self.assertEqual(document["client"], "10.0.0.1")
        self.assertEqual(document["method"], "GET")
        self.assertEqual(document["target"], '/q"uote')
        self.assertEqual(document["status"], 404)
        self.assertEqual(document["bytes"], 17)
        self.assertEqual(document["backend"], "http://127.0.0.1:9001")
        self.assertEqual(document["duration_ms"], 12.34)
        self.assertEqual(document["request_id"], "abc")
        self.assertRegex(document["time"], r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}$")

    def test_sanitize_escapes_control_characters_quotes_and_backslashes(self) -> None:
        """No log injection: CR/LF, NUL, DEL, quotes, backslashes and bytes >= 0x80 are escaped."""
        self.assertEqual(sanitize("/plain/path?x=1"), "/plain/path?x=1")
        self.assertEqual(sanitize('a"b'), "a\\x22b")
        self.assertEqual(sanitize("a\\b"), "a\\x5cb")
        self.assertEqual(sanitize("line\r\nfake 200"), "line\\x0d\\x0afake 200")
        self.assertEqual(sanitize("\x00\x1f\x7f\xff"), "\\x00\\x1f\\x7f\\xff")
        escaped = sanitize('GET /\n10.0.0.9 [x] "GET /admin" 200')
        self.assertNotIn("\n", escaped)
        self.assertNotIn('"', escaped)

    def test_off_writes_nothing(self) -> None:
        """"off": no stream, record queues nothing and no file appears."""
        access_log = self.open_log("off")
        self.assertIsNone(access_log.stream)
        access_log.record("c", "GET", "/", 200, 1, "b", 0.001)
        self.assertEqual(len(access_log.pending), 0)
        access_log.close()
        self.assertEqual(os.listdir(self.directory), [])

    def test_close_flushes_everything_queued(self) -> None:
        """With a writer that would not wake for a minute, close still writes every line."""
        path = self.path("access.log")
        access_log = self.open_log(path, flush_interval=60.0)
        for n in range(500):
            access_log.record("c", "GET", f"/{n}", 200, n, "b", 0.001)
        access_log.close()
        lines = read_lines(path)
        self.assertEqual(len(lines), 500)
        self.assertTrue(lines[499].startswith("c ["))
        self.assertIn('"GET /499"', lines[499])
        self.assertFalse(access_log.writer.is_alive())

    def test_details_extend_json_only(self) -> None:
        """``details`` add JSON fields after the base ones; the text line does not change."""
        details = {"host": "h", "termination": "ok", "attempts": [{"backend": "b", "outcome": 200}]}
        json_path, text_path = self.path("access.json"), self.path("access.log")
        self.open_log(json_path, "json").record("c", "GET", "/d", 200, 1, "b", 0.001, "id", details)
        self.open_log(text_path).record("c", "GET", "/d", 200, 1, "b", 0.001, "id", details)
        entry = json.loads(self.wait_lines(json_path, 1)[0])
        self.assertEqual(list(entry)[-3:], ["host", "termination", "attempts"])
        self.assertEqual(entry["attempts"], [{"backend": "b", "outcome": 200}])
        self.assertRegex(self.wait_lines(text_path, 1)[0], r'"GET /d" 200 1 b 1\.0ms id$')


class WarningLimiterTests(unittest.TestCase):
    """Repeated identical warnings: one per key and period, with a count of the held-back ones."""

    def test_one_warning_per_key_and_period_with_a_count(self) -> None:
        logger = logging.getLogger("cclb-test-limiter")
        logger.setLevel(logging.WARNING)
        clock = [100.0]
        limiter = loggers.WarningLimiter(logger, period=1.0)
        with mock.patch("loggers.time.monotonic", lambda: clock[0]), \
                self.assertLogs(logger, logging.WARNING) as captured:
            self.assertTrue(limiter.warn(("b1", "refused"), "backend %s refused", "b1"))
            for _ in range(5):
                self.assertFalse(limiter.warn(("b1", "refused"), "backend %s refused", "b1"))
            self.assertTrue(limiter.warn(("b2", "refused"), "backend %s refused", "b2"))
            self.assertTrue(limiter.warn(("b1", "reset"), "backend %s reset", "b1"))
            clock[0] += 1.0
            self.assertTrue(limiter.warn(("b1", "refused"), "backend %s refused", "b1"))
        self.assertEqual([record.getMessage() for record in captured.records], [
            "backend b1 refused", "backend b2 refused", "backend b1 reset",
            "backend b1 refused (and 5 more like it since the last such warning)"])


class ReopenTests(AccessLogTestCase):
    """Regression: ``reopen`` (log rotation) never loses a line."""

    def test_lines_before_reopen_go_to_the_old_file_after_to_the_new(self) -> None:
        """Queued before the reopen: old file; recorded after: new file."""
        old_path, new_path = self.path("old.log"), self.path("new.log")
        access_log = self.open_log(old_path, flush_interval=60.0)  # nothing flushes by itself
        access_log.record("c", "GET", "/before", 200, 1, "b", 0.001)
        access_log.reopen(new_path, "text")
        access_log.record("c", "GET", "/after", 200, 1, "b", 0.001)
        access_log.close()
        old, new = read_lines(old_path), read_lines(new_path)
        self.assertEqual(len(old), 1)
        self.assertIn("/before", old[0])
        self.assertEqual(len(new), 1)
        self.assertIn("/after", new[0])

    def test_reopen_switches_the_format(self) -> None:
        """reopen with "json" makes the following lines JSON."""
        old_path, new_path = self.path("old.log"), self.path("new.json")
        access_log = self.open_log(old_path)
        access_log.reopen(new_path, "json")
        access_log.record("c", "GET", "/j", 200, 1, "b", 0.001)
        (line,) = self.wait_lines(new_path, 1)
        self.assertEqual(json.loads(line)["target"], "/j")
        self.assertEqual(read_lines(old_path), [])

    def test_reopen_to_off_stops_writing(self) -> None:
        """reopen("off"): earlier lines are written, later ones are not."""
        path = self.path("access.log")
        access_log = self.open_log(path, flush_interval=60.0)
        access_log.record("c", "GET", "/kept", 200, 1, "b", 0.001)
        access_log.reopen("off", "text")
        access_log.record("c", "GET", "/dropped", 200, 1, "b", 0.001)
        access_log.close()
        lines = read_lines(path)
        self.assertEqual(len(lines), 1)
        self.assertIn("/kept", lines[0])

    def test_concurrent_records_and_reopens_lose_no_line(self) -> None:
        """Threads record while another reopens to alternating files: every line lands somewhere."""
        paths = [self.path("a.log"), self.path("b.log")]
        access_log = self.open_log(paths[0], flush_interval=0.001)
        threads_count, rounds, per_round = 4, 40, 25
        # Every round starts together (a cyclic Barrier): the writers record a
        # burst of lines while the reopener switches files in the same round.
        start = threading.Barrier(threads_count + 1)
        errors: list[BaseException] = []

        def writer(index: int) -> None:
            try:
                for r in range(rounds):
                    start.wait(timeout=10)
                    for n in range(per_round):
                        access_log.record(f"t{index}", "GET", f"/{index}/{r}/{n}", 200, n, "b",
                                          0.001)
            except BaseException as error:  # pragma: no cover - reported below
                errors.append(error)
                start.abort()  # the others stop waiting for this thread

        def reopener() -> None:
            try:
                for r in range(rounds):
                    start.wait(timeout=10)
                    access_log.reopen(paths[(r + 1) % 2], "text")
            except BaseException as error:  # pragma: no cover - reported below
                errors.append(error)
                start.abort()  # the others stop waiting for this thread

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(threads_count)]
        threads.append(threading.Thread(target=reopener))
        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # many thread switches: records interleave with reopens
        self.addCleanup(sys.setswitchinterval, switch)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        self.assertEqual(errors, [])
        self.assertFalse(any(thread.is_alive() for thread in threads))
        access_log.close()
        lines = read_lines(paths[0]) + read_lines(paths[1])
        expected = {f'"GET /{i}/{r}/{n}"' for i in range(threads_count) for r in range(rounds)
                    for n in range(per_round)}
        seen = [re.search(r'"GET /\d+/\d+/\d+"', line).group() for line in lines]
        self.assertEqual(len(seen), len(expected), "a line was lost or duplicated")
        self.assertEqual(set(seen), expected)
        self.assertTrue(read_lines(paths[0]) and read_lines(paths[1]), "both files got lines")

    def test_failing_reopen_keeps_the_old_stream(self) -> None:
        """reopen into a missing directory raises OSError; lines keep going to the old file."""
        path = self.path("access.log")
        access_log = self.open_log(path)
        access_log.record("c", "GET", "/one", 200, 1, "b", 0.001)
        self.wait_lines(path, 1)
        with self.assertRaises(OSError):
            access_log.reopen(self.path("missing-dir/access.log"), "json")
        access_log.record("c", "GET", "/two", 200, 1, "b", 0.001)
        lines = self.wait_lines(path, 2)
        self.assertIn('"GET /two"', lines[1])  # still text, still the same file
        self.assertFalse(os.path.exists(self.path("missing-dir")))


class WriterLoopTests(AccessLogTestCase):
    def test_writer_survives_an_unexpected_exception(self) -> None:
        """A write raising RuntimeError is logged once at ERROR with a traceback; later lines arrive."""
        path = self.path("access.log")
        access_log = self.open_log(path)
        with access_log.lock:
            wrapper = FailingOnceStream(access_log.stream)
            access_log.stream = wrapper
        with self.assertLogs("cclb", logging.ERROR) as captured:
            access_log.record("c", "GET", "/lost", 200, 1, "b", 0.001)
            self.assertTrue(wrapper.failed.wait(timeout=5), "the writer never wrote")
            access_log.record("c", "GET", "/after-1", 200, 1, "b", 0.001)
            self.wait_lines(path, 1)
            access_log.record("c", "GET", "/after-2", 200, 1, "b", 0.001)
            lines = self.wait_lines(path, 2)
        self.assertIn('"GET /after-1"', lines[0])
        self.assertIn('"GET /after-2"', lines[1])
        self.assertTrue(access_log.writer.is_alive())
        errors = [record for record in captured.records if record.levelno >= logging.ERROR]
        self.assertEqual(len(errors), 1, [r.getMessage() for r in errors])
        self.assertIn("access log writer", errors[0].getMessage())
        self.assertIsNotNone(errors[0].exc_info)
        self.assertIs(errors[0].exc_info[0], RuntimeError)
        self.assertIn("Traceback", captured.output[0])
        self.assertIn("injected write failure", captured.output[0])
        self.assertEqual(access_log.guard.failures, 1)


class DiskFullStream:
    """A stream whose writes fail with ENOSPC until ``healed`` is set."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.healed = threading.Event()
        self.failures = 0

    def write(self, text: str) -> int:
        if not self.healed.is_set():
            self.failures += 1
            raise OSError(28, "No space left on device")
        return self.inner.write(text)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


class WriteFailureTests(AccessLogTestCase):
    def test_failed_writes_are_counted_and_warned_about_once(self) -> None:
        """Disk full: lost lines are counted (cclb_access_log_lines_lost_total), one WARNING
        (not one per batch), no exception for the request, and writing resumes afterwards."""
        path = self.path("access.log")
        access_log = self.open_log(path)
        process = metrics.ProcessMetrics()
        with access_log.lock:
            stream = DiskFullStream(access_log.stream)
            access_log.stream = stream
        with mock.patch.object(loggers, "PROCESS", process), \
                self.assertLogs("cclb", logging.WARNING) as captured:
            access_log.record("c", "GET", "/one", 200, 1, "b", 0.001)
            access_log.record("c", "GET", "/two", 200, 1, "b", 0.001)
            wait_for(lambda: stream.failures >= 1, 5, message="a failed write")
            access_log.record("c", "GET", "/three", 200, 1, "b", 0.001)
            wait_for(lambda: stream.failures >= 2, 5, message="a second failed write")
            wait_for(lambda: process.access_log_lost == 3, 5, message="three lost lines counted")
            stream.healed.set()
            access_log.record("c", "GET", "/four", 200, 1, "b", 0.001)
            lines = self.wait_lines(path, 1)
        self.assertIn('"GET /four"', lines[0])
        warnings = [r for r in captured.records if r.levelno == logging.WARNING]
        self.assertEqual(len(warnings), 1, [r.getMessage() for r in warnings])
        self.assertIn("No space left on device", warnings[0].getMessage())


if __name__ == "__main__":
    unittest.main()

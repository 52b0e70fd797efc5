"""Access log files and rotation: SIGHUP reopens the file (logrotate's move-then-HUP)."""

from __future__ import annotations

import os
import signal
import tempfile
import unittest

from tests.support import Balancer, DemoServer, http_exchange, wait_for


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: logs.test\r\nConnection: close\r\n\r\n".encode()


class AccessLogRotationTest(unittest.TestCase):
    def test_sighup_reopens_a_moved_access_log(self) -> None:
        backend = DemoServer()
        self.addCleanup(backend.stop)
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        path = os.path.join(folder.name, "access.log")
        balancer = Balancer([backend.port], "--health-interval", "0", "--access-log", path)
        self.addCleanup(balancer.stop)

        def logged(file: str, target: str) -> bool:
            try:
                with open(file, encoding="utf-8") as handle:
                    return f'"GET {target}"' in handle.read()
            except FileNotFoundError:
                return False

        self.assertEqual(http_exchange(balancer.port, get("/?when=before")).status, 200)
        wait_for(lambda: logged(path, "/?when=before"), 5, message="the first line in the log")
        os.rename(path, path + ".1")  # what logrotate does before signalling
        balancer.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in balancer.log_text(), 5,
                 message="the reload")
        self.assertEqual(http_exchange(balancer.port, get("/?when=after")).status, 200)
        wait_for(lambda: logged(path, "/?when=after"), 5, message="a new file with the next line")
        self.assertFalse(logged(path + ".1", "/?when=after"), "the rotated file kept growing")
        self.assertNotIn("Traceback", balancer.log_text())


if __name__ == "__main__":
    unittest.main()

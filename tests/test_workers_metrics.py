"""--workers: the supervisor's admin API adds up the traffic counted by every worker."""

from __future__ import annotations

import json
import os
import signal
import unittest

from tests.support import (Balancer, DemoServer, child_pids, http_request, wait_admin_port,
                           wait_for)


def fetch(port: int, path: str) -> tuple[int, bytes]:
    status, _, body = http_request(port, path=path)
    return status, body


class WorkerCountersTest(unittest.TestCase):
    def test_status_and_metrics_count_all_workers_even_after_one_dies(self) -> None:
        backend = DemoServer()
        self.addCleanup(backend.stop)
        balancer = Balancer([backend.port], "--workers", "2", "--health-interval", "0",
                            "--access-log", "off", "--admin-port", "0")
        self.addCleanup(balancer.stop)
        admin = wait_admin_port(balancer)
        for _ in range(40):  # new connections: the kernel spreads them over both workers
            self.assertEqual(fetch(balancer.port, "/")[0], 200)

        def requests_counted() -> int:
            status = json.loads(fetch(admin, "/status")[1])
            return sum(b["requests"] for b in status["backends"])
        wait_for(lambda: requests_counted() == 40, 10, message="40 requests in /status")
        metrics = fetch(admin, "/metrics")[1].decode()
        self.assertIn(f'cclb_requests_total{{backend="http://127.0.0.1:{backend.port}",code="200"}} 40',
                      metrics)
        # A worker that dies takes nothing with it: its counts stay in the totals.
        workers = sorted(child_pids(balancer.pid))
        self.assertEqual(len(workers), 2)
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: len(child_pids(balancer.pid) - {workers[0]}) == 2, 10,
                 message="the worker to be replaced")
        self.assertEqual(fetch(balancer.port, "/")[0], 200)
        wait_for(lambda: requests_counted() == 41, 10, message="41 requests in /status")


if __name__ == "__main__":
    unittest.main()

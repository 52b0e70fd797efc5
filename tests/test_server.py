"""End-to-end tests for server.py: each test talks to a real server process."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import unittest
from typing import Any

from tests.support import ROOT, accepts, free_port, wait_for

SERVER = ROOT / "server.py"
NAME = "test-backend"
STARTUP_TIMEOUT = 5.0


def run_server(*args: str) -> subprocess.CompletedProcess[str]:
    """Run server.py to completion (for argument/startup errors)."""
    return subprocess.run([sys.executable, str(SERVER), *args], capture_output=True, text=True, timeout=10)


def start_server(name: str = NAME, attempts: int = 5) -> tuple[subprocess.Popen[str], int]:
    """Start server.py on a free port and wait until it accepts connections."""
    for _ in range(attempts):
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(SERVER), str(port), "--name", name],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if wait_until_listening(proc, port):
            return proc, port
        stop(proc)  # port was taken in the meantime: try another one
    raise RuntimeError("server.py did not start")


def wait_until_listening(proc: subprocess.Popen[str], port: int) -> bool:
    """Poll (with a deadline) until the port accepts a connection; False if the process
    died first or the deadline passed."""
    def state() -> str | None:
        if proc.poll() is not None:
            return "dead"
        return "up" if accepts(port) else None
    try:
        return wait_for(state, STARTUP_TIMEOUT, interval=0.01, message=f"server.py on {port}") == "up"
    except AssertionError:
        return False


def stop(proc: subprocess.Popen[str]) -> None:
    """Terminate a server process, killing it if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


class ServerTest(unittest.TestCase):
    """Route and protocol tests against one shared server process."""

    proc: subprocess.Popen[str]
    port: int

    @classmethod
    def setUpClass(cls) -> None:
        cls.proc, cls.port = start_server()
        cls.addClassCleanup(stop, cls.proc)

    def setUp(self) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        self.addCleanup(self.conn.close)

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[http.client.HTTPResponse, Any]:
        """Send one request on the shared connection; return the response and decoded JSON (or None)."""
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        raw = response.read()
        self.assertEqual(response.getheader("Content-Type"), "application/json")
        self.assertEqual(response.getheader("X-Backend-Server"), NAME)
        return response, json.loads(raw) if raw else None

    def assert_reply(self, method: str, path: str, status: int, expected: Any = None) -> Any:
        """Check status (and payload, if given) of a request; return the payload."""
        response, payload = self.request(method, path)
        self.assertEqual(response.status, status, payload)
        if expected is not None:
            self.assertEqual(payload, expected)
        return payload

    def test_root_and_health(self) -> None:
        self.assert_reply("GET", "/", 200, {"response": True})
        self.assert_reply("GET", "/health", 200, {"status": "ok"})

    def test_collections(self) -> None:
        users = self.assert_reply("GET", "/users", 200)
        products = self.assert_reply("GET", "/products", 200)
        self.assertEqual([user["name"] for user in users], ["Alice", "Bob", "Charlie"])
        self.assertEqual([product["id"] for product in products], [101, 102, 103])

    def test_items(self) -> None:
        self.assert_reply("GET", "/user/2", 200,
                          {"id": 2, "name": "Bob", "age": 30, "email": "bob@example.com"})
        self.assert_reply("GET", "/product/103", 200,
                          {"id": 103, "name": "Book", "price": 20.0, "category": "Books"})

    def test_missing_items(self) -> None:
        self.assert_reply("GET", "/user/9", 404, {"error": "user 9 not found"})
        self.assert_reply("GET", "/product/1", 404, {"error": "product 1 not found"})

    def test_invalid_ids(self) -> None:
        for path in ("/user/abc", "/product/1x", "/user/-1", "/user/%20"):
            with self.subTest(path=path):
                self.assertIn("error", self.assert_reply("GET", path, 400))

    def test_unknown_path(self) -> None:
        for path in ("/nope", "/user/", "/user/1/x", "/users/"):
            with self.subTest(path=path):
                self.assert_reply("GET", path, 404, {"error": "not found"})

    def test_method_not_allowed_keeps_connection_usable(self) -> None:
        response, payload = self.request("POST", "/users", body=b'{"name": "Eve"}')
        self.assertEqual(response.status, 405)
        self.assertEqual(response.getheader("Allow"), "GET, HEAD")
        self.assertIn("error", payload)
        self.assert_reply("GET", "/health", 200)  # body was drained, connection still in sync

    def test_head_has_headers_but_no_body(self) -> None:
        _, users = self.request("GET", "/users")
        response, payload = self.request("HEAD", "/users")
        self.assertEqual(response.status, 200)
        self.assertIsNone(payload)
        self.assertEqual(int(response.getheader("Content-Length")), len(json.dumps(users, indent=2)) + 1)
        response, _ = self.request("HEAD", "/user/9")
        self.assertEqual(response.status, 404)

    def test_keep_alive_reuses_connection(self) -> None:
        self.assert_reply("GET", "/", 200)
        first_socket = self.conn.sock
        self.assert_reply("GET", "/users", 200)
        self.assertIsNotNone(first_socket)
        self.assertIs(self.conn.sock, first_socket)

    def test_echo_post_body(self) -> None:
        response, payload = self.request("POST", "/echo?a=1&b=2", body="héllo".encode(),
                                         headers={"X-Test": "1", "Content-Type": "text/plain"})
        self.assertEqual(response.status, 200)
        self.assertEqual(payload["method"], "POST")
        self.assertEqual(payload["path"], "/echo")
        self.assertEqual(payload["query"], "a=1&b=2")
        self.assertEqual(payload["body"], "héllo")
        self.assertEqual(payload["server"], NAME)
        self.assertIn(["X-Test", "1"], payload["headers"])

    def test_echo_chunked_body(self) -> None:
        response, payload = self.request("PUT", "/echo", body=iter([b"hello ", b"chunked ", b"world"]))
        self.assertEqual(response.status, 200)
        self.assertIn(["Transfer-Encoding", "chunked"], payload["headers"])
        self.assertEqual(payload["body"], "hello chunked world")

    def test_echo_any_method_and_duplicate_headers(self) -> None:
        for method in ("GET", "DELETE", "PATCH", "OPTIONS", "BREW"):
            with self.subTest(method=method):
                self.assertEqual(self.assert_reply(method, "/echo", 200)["method"], method)
        self.conn.putrequest("GET", "/echo")
        self.conn.putheader("X-Dup", "one")
        self.conn.putheader("X-Dup", "two")
        self.conn.endheaders()
        payload = json.loads(self.conn.getresponse().read())
        self.assertEqual([value for name, value in payload["headers"] if name == "X-Dup"], ["one", "two"])

    def test_raw_chunked_with_extensions_and_trailers(self) -> None:
        request = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-Trailer: t\r\n\r\n")
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(request)
            response = http.client.HTTPResponse(sock)
            response.begin()
            self.assertEqual(json.loads(response.read())["body"], "hello!")

    def test_malformed_request_gets_json_error(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
            response = http.client.HTTPResponse(sock)
            response.begin()
            self.assertEqual(response.status, 400)
            self.assertEqual(response.getheader("Connection"), "close")
            self.assertIn("error", json.loads(response.read()))


class LifecycleTest(unittest.TestCase):
    """Startup errors and shutdown behaviour."""

    def test_sigterm_exits_cleanly(self) -> None:
        proc, port = start_server()
        self.addCleanup(stop, proc)
        idle = socket.create_connection(("127.0.0.1", port))  # an idle keep-alive client must not block exit
        self.addCleanup(idle.close)
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=3), 0)
        self.assertEqual(proc.stdout.read(), f"{NAME} listening on http://127.0.0.1:{port}\n")
        self.assertEqual(proc.stderr.read(), "")

    def test_port_0_binds_a_free_port_and_prints_it(self) -> None:
        proc = subprocess.Popen([sys.executable, str(SERVER), "0"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(stop, proc)
        line = proc.stdout.readline()
        port = int(line.rpartition(":")[2])
        self.assertEqual(line, f"server-{port} listening on http://127.0.0.1:{port}\n")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        self.addCleanup(conn.close)
        conn.request("GET", "/")
        response = conn.getresponse()
        self.assertEqual(response.getheader("X-Backend-Server"), f"server-{port}")

    def test_sigterm_as_soon_as_it_listens_exits_cleanly(self) -> None:
        # The interleaving a fast client can cause: SIGTERM arrives right after listen(),
        # before main() has installed its handler (injected: the signal is sent from inside
        # server_activate). The default action would kill it (-15).
        inject = ("import os, runpy, signal, socketserver, sys\n"
                  "listen = socketserver.TCPServer.server_activate\n"
                  "def activate(self):\n"
                  "    listen(self)\n"
                  "    os.kill(os.getpid(), signal.SIGTERM)\n"
                  "socketserver.TCPServer.server_activate = activate\n"
                  f"sys.argv = [{str(SERVER)!r}, '0']\n"
                  f"runpy.run_path({str(SERVER)!r}, run_name='__main__')\n")
        result = subprocess.run([sys.executable, "-c", inject], capture_output=True, text=True,
                                timeout=10, cwd=ROOT)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"^server-\d+ listening on http://127\.0\.0\.1:\d+\n$")

    def test_invalid_port_is_usage_error(self) -> None:
        for port in ("abc", "65536", "-1", "1e3"):
            with self.subTest(port=port):
                self.assertEqual(run_server(port).returncode, 2)

    def test_port_in_use(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            result = run_server(str(sock.getsockname()[1]))
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)


if __name__ == "__main__":
    unittest.main()

"""A headless Chromium driven over the DevTools protocol, for the dashboard tests (stdlib only).

``find_browser()`` names an installed Chromium or Chrome, or None (the
tests then skip).  ``DevToolsPage`` starts one with its own profile, attaches
to its page over a minimal WebSocket client (RFC 6455: masked text frames
out, whole messages in) and offers ``call``, ``evaluate`` and
``wait_event``; ``close`` stops the browser.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

from tests.support import wait_for

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """The path of an installed headless-capable browser, or None."""
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


class DevToolsPage:
    """One headless browser and its first page, driven over DevTools.

    Not thread-safe: one test thread drives it.  ``events`` keeps the
    protocol events received while waiting for answers, oldest first.
    """

    def __init__(self, executable: str, profile: str, width: int = 1280, height: int = 900,
                 timeout: float = 30.0) -> None:
        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "--remote-debugging-port=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.sock: socket.socket | None = None
        self.events: list[dict[str, Any]] = []
        self.next_id = 0
        try:
            # Chromium writes the port it chose to <profile>/DevToolsActivePort.
            active = Path(profile) / "DevToolsActivePort"
            lines = wait_for(lambda: active.exists() and active.read_text().split(), timeout,
                             message="the browser's DevTools port")
            port = int(lines[0])  # type: ignore[index]
            page = wait_for(lambda: self.first_page(port), timeout, message="the browser's page")
            self.connect(port, page["webSocketDebuggerUrl"].split(str(port), 1)[1], timeout)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def first_page(port: int) -> dict[str, Any] | None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/json/list")
            targets = json.loads(connection.getresponse().read())
        except (OSError, ValueError):
            return None
        finally:
            connection.close()
        return next((t for t in targets if t.get("type") == "page"), None)

    def connect(self, port: int, path: str, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        status = self.file.readline()
        if b" 101 " not in status:
            raise ConnectionError(f"DevTools refused the WebSocket: {status!r}")
        while self.file.readline() not in (b"\r\n", b"\n", b""):
            pass

    def send(self, text: str) -> None:
        assert self.sock is not None
        payload = text.encode()
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x81, 0x80 | size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, size)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self) -> dict[str, Any]:
        """The next whole message (fragments joined)."""
        data = b""
        while True:
            first, second = self.file.read(2)
            size = second & 0x7F
            if size == 126:
                size = struct.unpack("!H", self.file.read(2))[0]
            elif size == 127:
                size = struct.unpack("!Q", self.file.read(8))[0]
            payload = self.file.read(size)
            opcode = first & 0x0F
            if opcode == 8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode in (0, 1, 2):
                data += payload
                if first & 0x80:
                    return json.loads(data)

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command; its result (events that arrive meanwhile go to ``events``)."""
        self.next_id += 1
        ident = self.next_id
        self.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        while True:
            message = self.receive()
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_event(self, method: str) -> dict[str, Any]:
        """The first event ``method`` received (now or later); the socket timeout bounds the wait."""
        while True:
            for index, event in enumerate(self.events):
                if event["method"] == method:
                    return self.events.pop(index)
            message = self.receive()
            if "method" in message:
                self.events.append(message)

    def close(self) -> None:
        """Close the connection and stop the browser (killed if it does not stop in 10 s)."""
        if self.sock is not None:
            self.file.close()
            self.sock.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

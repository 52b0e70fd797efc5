#!/usr/bin/env python3
"""Demo JSON backend for the cclb load balancer.

Usage: python3 server.py PORT [--host HOST] [--name NAME] [--verbose]

Every response is JSON, carries Content-Length and an X-Backend-Server header,
and is written with a single socket write (no Nagle/delayed-ACK stalls).
``/ws`` is a WebSocket echo endpoint (RFC 6455, see ``websocket.py``).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import websocket
from websocket import CloseCode, ConnectionClosed, MessageAssembler, Opcode, ProtocolError

DATA_FILE = Path(__file__).resolve().parent / "data.json"
MAX_BODY = 16 * 1024 * 1024
ITEM_ROUTE = re.compile(r"/(user|product)/([^/]+)")
DIGITS = re.compile(r"[0-9]+")
HEX = re.compile(rb"[0-9A-Fa-f]+")
WS_PATH = "/ws"
WS_MAX_MESSAGE = 16 * 1024 * 1024  # larger messages close with 1009 (RFC 6455 7.4.1)
WS_IDLE_TIMEOUT = 600.0  # seconds a WebSocket may stay silent before the server drops it

Reply = tuple[int, Any, dict[str, str]]  # status, JSON payload, extra headers


class BadRequestBody(Exception):
    """The request body cannot be read; the connection must be closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BackendServer(ThreadingHTTPServer):
    """Threaded HTTP server that carries the backend's name and data."""

    request_queue_size = 1024
    daemon_threads = True
    block_on_close = False  # never wait for idle keep-alive connections on exit

    def __init__(self, address: tuple[str, int], name: str, data: dict[str, Any], verbose: bool) -> None:
        self.name, self.data, self.verbose = name, data, verbose
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    """Serves the demo routes; any HTTP method is accepted and dispatched to handle_request."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: BackendServer

    def __getattr__(self, name: str) -> Any:
        """Resolve do_GET, do_POST, do_ANYTHING... to handle_request."""
        if name.startswith("do_"):
            return self.handle_request
        raise AttributeError(name)

    def handle_request(self) -> None:
        """Read the body, route the request and send exactly one response."""
        if self.path.partition("?")[0] == WS_PATH and self.headers.get("Upgrade") is not None:
            self.websocket_echo()
            return
        try:
            reply = self.route(self.read_body())
        except BadRequestBody as err:
            self.close_connection = True
            reply = err.status, {"error": str(err)}, {}
        self.respond(*reply)

    def route(self, body: bytes) -> Reply:
        """Map method and path to a reply."""
        path, _, query = self.path.partition("?")
        if path == "/echo":
            return 200, self.echo(path, query, body), {}
        if path == WS_PATH:  # a plain request (no Upgrade) to the WebSocket route
            return 426, {"error": "this route needs Upgrade: websocket"}, {"Upgrade": "websocket"}
        data = self.server.data
        static = {"/": {"response": True}, "/health": {"status": "ok"},
                  "/users": data["users"], "/products": data["products"]}
        item = ITEM_ROUTE.fullmatch(path)
        if path not in static and not item:
            return 404, {"error": "not found"}, {}
        if self.command not in ("GET", "HEAD"):
            return 405, {"error": f"method {self.command} not allowed"}, {"Allow": "GET, HEAD"}
        return self.find_item(*item.groups()) if item else (200, static[path], {})

    def find_item(self, kind: str, raw_id: str) -> Reply:
        """Look up a user or product by its numeric id."""
        if not DIGITS.fullmatch(raw_id):
            return 400, {"error": f"invalid {kind} id: {raw_id!r}"}, {}
        item_id = int(raw_id)
        for item in self.server.data[f"{kind}s"]:
            if item["id"] == item_id:
                return 200, item, {}
        return 404, {"error": f"{kind} {item_id} not found"}, {}

    def echo(self, path: str, query: str, body: bytes) -> dict[str, Any]:
        """Describe the request exactly as it was received."""
        return {"method": self.command, "path": path, "query": query,
                "headers": [[name, value] for name, value in self.headers.items()],
                "body": body.decode("utf-8", errors="replace"), "server": self.server.name}

    def websocket_echo(self) -> None:
        """``/ws``: the RFC 6455 opening handshake, then echo every message until a close.

        Text and binary messages come back whole (fragmented ones joined, RFC
        6455 5.4) in one frame of the same type; a ping gets a pong with its
        payload (5.5.3); a close gets a close with the same code (or none),
        then the server closes the TCP connection first (7.1.1).  A protocol
        error closes with its code (1002, 1007, 1009).
        """
        self.close_connection = True  # after a WebSocket, never another HTTP request
        problem = websocket.handshake_problem(self.command, self.headers)  # type: ignore[arg-type]
        if problem is not None:
            status, reason = problem
            extra = {"Sec-WebSocket-Version": websocket.VERSION} if status == 426 else {}
            self.respond(status, {"error": reason}, extra)
            return
        accept = websocket.accept_key(self.headers["Sec-WebSocket-Key"])
        head = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\nX-Backend-Server: {self.server.name}\r\n\r\n")
        self.wfile.write(head.encode("latin-1"))
        self.log_request(101)
        self.connection.settimeout(WS_IDLE_TIMEOUT)
        assembler = MessageAssembler(WS_MAX_MESSAGE)
        try:
            while True:
                frame = websocket.read_frame(self.rfile.read, require_mask=True, max_payload=WS_MAX_MESSAGE)
                message = assembler.feed(frame)
                if message is None or message.opcode == Opcode.PONG:
                    continue
                if message.opcode == Opcode.PING:
                    self.wfile.write(websocket.encode_frame(Opcode.PONG, message.payload))
                elif message.opcode == Opcode.CLOSE:
                    code, _ = websocket.parse_close(message.payload)
                    reply = b"" if code == CloseCode.NO_STATUS else websocket.encode_close(code)
                    self.wfile.write(websocket.encode_frame(Opcode.CLOSE, reply))
                    return
                else:
                    self.wfile.write(websocket.encode_frame(message.opcode, message.payload))
        except ProtocolError as error:
            self.wfile.write(websocket.encode_frame(Opcode.CLOSE, websocket.encode_close(error.code, str(error)[:100])))
        except (ConnectionClosed, OSError):
            pass  # the client went away (or stayed silent too long): nothing to answer

    def read_body(self) -> bytes:
        """Read the request body framed by Transfer-Encoding: chunked or Content-Length."""
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None:
            if encoding.strip().lower() != "chunked":
                raise BadRequestBody(501, f"unsupported transfer-encoding: {encoding}")
            return self.read_chunked()
        lengths = {value.strip() for value in self.headers.get_all("Content-Length", [])}
        if not lengths:
            return b""
        length = lengths.pop()
        if lengths or not DIGITS.fullmatch(length):
            raise BadRequestBody(400, "invalid Content-Length")
        return self.read_exact(int(length))

    def read_chunked(self) -> bytes:
        """Decode a chunked body, discarding chunk extensions and trailers."""
        chunks, total = [], 0
        while True:
            size_field = self.rfile.readline(1024).split(b";")[0].strip()
            if not HEX.fullmatch(size_field):
                raise BadRequestBody(400, "invalid chunk size")
            size = int(size_field, 16)
            if size == 0:
                break
            total += size
            if total > MAX_BODY:
                raise BadRequestBody(413, "request body too large")
            chunks.append(self.read_exact(size))
            if self.rfile.readline(3).strip():
                raise BadRequestBody(400, "chunk not terminated by CRLF")
        while self.rfile.readline(65537).strip():  # trailer section
            pass
        return b"".join(chunks)

    def read_exact(self, size: int) -> bytes:
        """Read exactly size bytes of body."""
        if size > MAX_BODY:
            raise BadRequestBody(413, "request body too large")
        data = self.rfile.read(size)
        if len(data) != size:
            raise BadRequestBody(400, "request body truncated")
        return data

    def respond(self, status: int, payload: Any, extra: dict[str, str]) -> None:
        """Send status line, headers and JSON body in a single write (no body for HEAD)."""
        # Indented: readable with curl, and the lists are then large enough
        # (over 256 bytes) for the balancer to gzip them, as the challenge shows.
        body = (json.dumps(payload, indent=2) + "\n").encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
                   "X-Backend-Server": self.server.name, "Date": self.date_time_string(), **extra}
        if self.close_connection:
            headers["Connection"] = "close"
        elif self.request_version == "HTTP/1.0":
            headers["Connection"] = "keep-alive"
        lines = [f"{self.protocol_version} {int(status)} {HTTPStatus(status).phrase}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + body)
        self.log_request(status)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer protocol errors detected by http.server as JSON too, then close."""
        self.close_connection = True
        self.respond(code, {"error": message or HTTPStatus(code).phrase}, {})

    def log_message(self, format: str, *args: Any) -> None:
        """Log to stderr only with --verbose."""
        if self.server.verbose:
            super().log_message(format, *args)


def port_number(text: str) -> int:
    """argparse type: a TCP port in 0-65535 (0: any free port, printed when listening)."""
    port = int(text) if DIGITS.fullmatch(text) else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (expected 0-65535)")
    return port


def header_value(text: str) -> str:
    """argparse type: printable ASCII without CR/LF, safe to put in a header."""
    if not re.fullmatch(r"[ -~]+", text):
        raise argparse.ArgumentTypeError(f"invalid name {text!r} (printable ASCII only)")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (the name, when not given, is set once the port is known)."""
    parser = argparse.ArgumentParser(description="Demo JSON backend for cclb.")
    parser.add_argument("port", type=port_number, help="TCP port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--name", type=header_value, help="X-Backend-Server value (default: server-PORT)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser.parse_args(argv)


def fail(message: str) -> int:
    """Print a one-line error to stderr and return exit code 1."""
    print(message, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM or Ctrl-C; return the exit code."""
    args = parse_args(argv)
    try:
        data = json.loads(DATA_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return fail(f"cannot load {DATA_FILE}: {err}")
    # SIGTERM/SIGINT wait (blocked) from before the socket listens until their handler is
    # in place: a client may connect and signal at once, and must not find the default action.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        server = BackendServer((args.host, args.port), args.name or "", data, args.verbose)
    except OSError as err:
        name = args.name or f"server-{args.port}"
        return fail(f"{name}: cannot listen on {args.host}:{args.port}: {err.strerror or err}")
    port = server.server_address[1]  # the one the system chose for port 0
    if not args.name:
        server.name = args.name = f"server-{port}"
    # SIGTERM and Ctrl-C ask serve_forever() to return (from another thread, as
    # shutdown() requires); raising an exception at an arbitrary point of the
    # accept loop could close a socket that a handler thread is using.
    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)  # one that came meanwhile runs now
    try:
        print(f"{args.name} listening on http://{args.host}:{port}", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared test fixtures: real processes, real sockets, deadlines instead of sleeps.

Test files import from here only, never from each other.

- ``Balancer``: ``python3 cclb.py`` as a child process on an ephemeral port.
- ``DemoServer``: ``python3 server.py`` as a child process.
- ``RawBackend``: an in-process TCP backend that records the exact bytes it
  receives and answers with whatever bytes a test scripts.
- ``Script``: a ``RawBackend`` responder (JSON echo, scripted routes) that
  records what it read (``Seen``); ``BalancerCase``: one ``Script`` backend
  behind one balancer per test class, with assertions on both sides.
- ``Client``, ``get``/``post``, ``send_and_collect``, ``parse_responses``:
  the client side of raw-socket tests; ``http_exchange`` / ``read_response``:
  one response; ``http_request``: one request through ``http.client``.
- ``wait_for``: poll a condition with a deadline (never a fixed sleep).
"""

from __future__ import annotations

import http.client
import io
import itertools
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> object:
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class ChildProcess:
    """A child process whose stdout/stderr lines are collected by reader threads."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, text=True, bufsize=1)
        self.stdout_lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _pump(self, stream, lines: list[str], to_queue: bool) -> None:
        for line in stream:
            lines.append(line)
            if to_queue:
                self.stdout_lines.put(line)
        stream.close()

    def wait_line(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait for a stdout line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} from {self.args}; "
                                     f"stderr: {''.join(self.stderr)[-2000:]}")
            try:
                line = self.stdout_lines.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                if self.proc.poll() is not None:
                    # Exited: once the stdout reader has met the end of the pipe, every
                    # line is in the queue.
                    self.readers[0].join(max(0.0, deadline - time.monotonic()))
                    if self.stdout_lines.empty() and not self.readers[0].is_alive():
                        raise AssertionError(f"{self.args} exited with {self.proc.returncode}; "
                                             f"stderr: {''.join(self.stderr)[-2000:]}")
                continue
            match = regex.search(line)
            if match:
                return match

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return "".join(self.stderr)

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for reader in self.readers:
            reader.join(timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for reader in self.readers:
            reader.join(timeout=5)


class Balancer(ChildProcess):
    """``cclb.py`` on an ephemeral port in front of ``backends`` (ports or URLs)."""

    def __init__(self, backends: list[int | str], *extra: str, ready_timeout: float = 10.0) -> None:
        args = [PYTHON, str(ROOT / "cclb.py"), "-p", "0", "--host", "127.0.0.1"]
        for backend in backends:
            args += ["-b", f"http://127.0.0.1:{backend}" if isinstance(backend, int) else backend]
        super().__init__(args + list(extra))
        match = self.wait_line(r"listening on https?://[^:]+:(\d+)", ready_timeout)
        self.port = int(match[1])


class DemoServer(ChildProcess):
    """``server.py`` on ``port``, or on a port it binds itself (no race with other processes)."""

    def __init__(self, port: int | None = None, name: str | None = None) -> None:
        args = [PYTHON, str(ROOT / "server.py"), str(port or 0)]
        if name:
            args += ["--name", name]
        super().__init__(args)
        self.port = int(self.wait_line(r"listening on http://[^:]+:(\d+)", 10)[1])


# --- raw sockets -----------------------------------------------------------

@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""
    complete: bool = True  # False: the connection closed before the body ended

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


def read_head(reader) -> Response:
    """Only the head of a response (the body, if any, is left in ``reader``)."""
    line = reader.readline()
    if not line:
        raise ConnectionError("connection closed before a response")
    raw = line
    _, status, reason = (line.decode("latin-1").rstrip("\r\n").split(" ", 2) + [""])[:3]
    headers = []
    while True:
        line = reader.readline()
        raw += line
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name, value.strip()))
    return Response(int(status), reason, headers, b"", raw)


def read_response(reader, method: str = "GET") -> Response:
    """Read one response from a ``makefile('rb')`` reader (CL, chunked or close)."""
    response = read_head(reader)
    code = response.status
    if method == "HEAD" or code < 200 or code in (204, 304):
        return response
    te = response.header("transfer-encoding")
    length = response.header("content-length")
    if te and "chunked" in te.lower():
        body = b""
        while True:
            size_line = reader.readline()
            if not size_line:
                response.complete = False
                break
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while reader.readline() not in (b"\r\n", b""):
                    pass
                break
            data = reader.read(size)
            body += data
            if len(data) < size:
                response.complete = False
                break
            reader.read(2)
        response.body = body
    elif length is not None:
        response.body = reader.read(int(length))
        response.complete = len(response.body) == int(length)
    else:
        response.body = reader.read()
    return response


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def http_exchange(port: int, data: bytes, method: str = "GET", timeout: float = 10.0) -> Response:
    """Send raw bytes on a new connection and read one response."""
    with connect(port, timeout) as sock:
        sock.sendall(data)
        with sock.makefile("rb") as reader:
            return read_response(reader, method)


def http_request(port: int, method: str = "GET", path: str = "/", body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 10.0,
                 source: str | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a fresh ``http.client`` connection: (status, headers, body).

    ``source``: the local IP address to connect from (any port).
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def served_by(port: int, path: str = "/", **kwargs) -> str:
    """The X-Backend-Server of a 200 answer to GET ``path`` on a fresh connection."""
    status, headers, body = http_request(port, path=path, **kwargs)
    if status != 200:
        raise AssertionError(f"GET {path}: {status} {body[:200]!r}")
    return headers["X-Backend-Server"]


def read_until_close(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the peer sends until it closes (or the timeout passes)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while data := sock.recv(65536):
            chunks.append(data)
    except (socket.timeout, ConnectionResetError):
        pass
    return b"".join(chunks)


class RawBackend:
    """An in-process backend on an ephemeral port, scripted with raw bytes.

    ``respond(head: bytes, conn: socket.socket, reader)`` is called once per
    request head (everything up to the blank line, inclusive).  It may read
    the body from ``reader`` and must write the answer itself; it returns
    False to close the connection.  Every byte read is recorded in
    ``connections`` (one bytearray per accepted connection).
    """

    def __init__(self, respond: Callable[..., bool | None] | None = None) -> None:
        self.respond = respond or self.ok
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.connections: list[bytearray] = []
        self.heads: list[bytes] = []
        self.lock = threading.Lock()
        self.stopped = False
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    @staticmethod
    def ok(head: bytes, conn: socket.socket, reader) -> bool:
        body = b'{"ok": true}'
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        return True

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            record = bytearray()
            with self.lock:
                self.connections.append(record)
            thread = threading.Thread(target=self._serve, args=(conn, record), daemon=True)
            thread.start()  # before it is listed: stop() joins only started threads
            with self.lock:
                self.threads.append(thread)

    def _serve(self, conn: socket.socket, record: bytearray) -> None:
        recording = _RecordingReader(conn, record)
        try:
            while not self.stopped:
                head = b""
                while True:
                    line = recording.readline()
                    if not line:
                        return
                    head += line
                    if line in (b"\r\n", b"\n"):
                        break
                with self.lock:
                    self.heads.append(head)
                if self.respond(head, conn, recording) is False:
                    return
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def received(self) -> bytes:
        with self.lock:
            return b"".join(bytes(r) for r in self.connections)

    def stop(self) -> None:
        self.stopped = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(timeout=2)
        self.acceptor.join(timeout=2)


class _RecordingReader:
    """A buffered reader over a socket that records every byte it reads."""

    def __init__(self, sock: socket.socket, record: bytearray) -> None:
        self.reader = sock.makefile("rb")
        self.record = record

    def readline(self, limit: int = -1) -> bytes:
        data = self.reader.readline(limit)
        self.record.extend(data)
        return data

    def read(self, n: int = -1) -> bytes:
        data = self.reader.read(n)
        self.record.extend(data)
        return data


def read_body(head: bytes, reader) -> bytes:
    """For RawBackend responders: read a request body framed by CL or chunked."""
    text = head.decode("latin-1").lower()
    match = re.search(r"\r\ncontent-length:\s*(\d+)", text)
    if "transfer-encoding: chunked" in text:
        body = b""
        while True:
            size = int(reader.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while reader.readline() not in (b"\r\n", b""):
                    pass
                return body
            body += reader.read(size)
            reader.read(2)
    if match:
        return reader.read(int(match[1]))
    return b""


def process_threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def process_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _status_kib(pid: int, key: str) -> int:
    """A ``key:`` line of /proc/PID/status, in KiB (0 if absent)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def process_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def process_peak_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


# --- processes -------------------------------------------------------------------

def child_pids(parent: int) -> set[int]:
    """Live (non-zombie) processes whose parent is ``parent``, from /proc/*/stat."""
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == parent and fields[0] != "Z":
            children.add(int(entry))
    return children


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited: reaped, or a zombie whose threads are all gone.

    A multi-threaded process's leader turns zombie before its other threads
    have exited, and its files (listening sockets...) close with the last one.
    """
    try:
        with open(f"/proc/{pid}/stat") as handle:
            if handle.read().rpartition(")")[2].split()[0] != "Z":
                return False
        return os.listdir(f"/proc/{pid}/task") == [str(pid)]
    except OSError:
        return True


def wait_admin_port(balancer: ChildProcess, timeout: float = 5.0) -> int:
    """The admin port from the ``cclb admin on http://H:P/`` line (after the ready line)."""
    return int(balancer.wait_line(r"cclb admin on http://[^\s/]+:(\d+)/", timeout)[1])


def admin_call(test: unittest.TestCase, balancer: ChildProcess, port: int, method: str, path: str,
               body: bytes | None = None, headers: dict[str, str] | None = None):
    """An admin API request: (status, headers, body); no answer at all fails ``test``."""
    headers = dict(headers or {})
    if body is None and method in ("POST", "DELETE"):
        headers.setdefault("Content-Length", "0")
    try:
        return http_request(port, method, path, body=body, headers=headers, timeout=5)
    except (OSError, http.client.HTTPException) as error:
        test.fail(f"{method} {path[:60]}: no answer ({error!r}); "
                  f"log: {balancer.log_text()[-1500:]}")


def admin_status(test: unittest.TestCase, balancer: ChildProcess, port: int) -> dict:
    """The admin API's ``/status`` document (asserting a 200)."""
    code, _, body = admin_call(test, balancer, port, "GET", "/status")
    test.assertEqual(code, 200)
    return json.loads(body)


def cluster_view(cluster) -> list[tuple[str, int, bool, str]]:
    """(url, weight, healthy, admin state) of every backend of a ``ServerCluster``, in order."""
    return [(b.url, b.weight, b.healthy, b.admin_state) for b in cluster.stats().backends]


# --- one scripted backend behind a balancer, spoken to over raw sockets --------------

BASE_ARGS = ("--health-interval", "0", "--access-log", "off")


def send_and_collect(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send ``data`` on a new connection; everything received, and whether the peer closed.

    ``closed`` is False when the connection was still open after ``timeout``.
    """
    with connect(port, timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return collect_until_close(sock, timeout)


def collect_until_close(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), False
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return b"".join(chunks), False
        except ConnectionResetError:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), True
        chunks.append(data)


def parse_responses(data: bytes, method: str = "GET") -> list[Response]:
    """Every response in ``data`` (a whole conversation's worth of bytes)."""
    reader = io.BytesIO(data)
    responses = []
    while reader.tell() < len(data):
        responses.append(read_response(reader, method))
    return responses


class Client:
    """One client connection with a buffered reader, closed at cleanup."""

    def __init__(self, test: unittest.TestCase, port: int, timeout: float = 5.0) -> None:
        self.sock = connect(port, timeout)
        self.reader = self.sock.makefile("rb")
        test.addCleanup(self.close)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, method: str = "GET") -> Response:
        return read_response(self.reader, method)

    def request(self, data: bytes, method: str = "GET") -> Response:
        self.send(data)
        return self.response(method)

    def closed(self, timeout: float = 3.0) -> tuple[bytes, bool]:
        """Wait for the server to close; (bytes that came instead, closed?)."""
        self.sock.settimeout(timeout)
        try:
            rest = self.reader.read1(65536)
        except (socket.timeout, TimeoutError):
            return b"", False
        except ConnectionResetError:
            return b"", True
        return rest, rest == b""

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            self.sock.close()


def get(path: str, *extra: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}", "Host: test.invalid", *extra, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def post(path: str, body: bytes, *extra: str) -> bytes:
    return get(path, f"Content-Length: {len(body)}", *extra, method="POST") + body


def echo_of(response: Response) -> dict:
    return json.loads(response.body)


# --- backend side: the scripted responder ---------------------------------------

@dataclass
class Seen:
    """A request the backend read completely."""

    method: str
    path: str
    head: bytes
    body: bytes  # first 64 KiB
    length: int
    crc: int
    record_id: int  # id() of the RawBackend record (one per backend connection)


Route = Callable[[socket.socket, "Seen"], bool]  # a Script route: answers, returns keep-alive?


def request_head_fields(head: bytes) -> tuple[str, str, list[tuple[bytes, bytes]]]:
    """(method, target, [(lower-case name, value)]) of a request head as the backend got it."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    method = parts[0].decode("latin-1")
    path = parts[1].decode("latin-1") if len(parts) > 1 else ""
    fields = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            fields.append((name.strip().lower(), value.strip()))
    return method, path, fields


def _read_exact(source, n: int, keep: bytearray, limit: int, crc: int = 0) -> tuple[int, int, bool]:
    """Read ``n`` bytes in pieces: (bytes read, running crc32, complete?)."""
    got = 0
    while got < n:
        data = source.read(min(n - got, 256 * 1024))
        if not data:
            return got, crc, False
        got += len(data)
        crc = zlib.crc32(data, crc)
        if len(keep) < limit:
            keep.extend(data[:limit - len(keep)])
    return got, crc, True


def read_request_body(fields, reader, recorded: bool) -> tuple[bool, bytes, int, int]:
    """Read a forwarded request body strictly: (complete?, first 64 KiB, length, crc).

    Large (``recorded=False``) bodies bypass the RawBackend record so that a
    200 MiB upload is counted, not kept in memory.
    """
    source = reader if recorded else getattr(reader, "reader", reader)
    keep = bytearray()
    limit = 64 * 1024
    codings = [v.lower() for n, v in fields if n == b"transfer-encoding"]
    lengths = [v for n, v in fields if n == b"content-length"]
    total = crc = 0
    if codings:
        if codings != [b"chunked"]:
            return False, b"", 0, 0
        while True:
            line = source.readline(1026)
            if not line.endswith(b"\r\n"):
                return False, bytes(keep), total, crc
            try:
                size = int(line[:-2].split(b";")[0], 16)
            except ValueError:
                return False, bytes(keep), total, crc
            if size == 0:
                while True:
                    trailer = source.readline(8192)
                    if trailer == b"\r\n":
                        return True, bytes(keep), total, crc
                    if not trailer.endswith(b"\r\n"):
                        return False, bytes(keep), total, crc
            got, crc, complete = _read_exact(source, size, keep, limit, crc)
            total += got
            if not complete or source.read(2) != b"\r\n":
                return False, bytes(keep), total, crc
    if lengths:
        if len(set(lengths)) != 1:
            return False, b"", 0, 0
        got, crc, complete = _read_exact(source, int(lengths[0]), keep, limit)
        return complete, bytes(keep), got, crc
    return True, b"", 0, 0


def raw_answer(raw: bytes, keep: bool = True) -> Route:
    """A ``Script`` route that sends ``raw`` as is; ``keep``: keep the backend connection."""
    def answer(conn: socket.socket, seen: Seen) -> bool:
        conn.sendall(raw)
        return keep
    return answer


class Script:
    """A RawBackend responder: JSON echo by default, ``routes`` (path -> handler) otherwise.

    ``/resp/hang`` never answers (until ``release`` is set).  Paths under
    ``/stream/`` have their bodies counted, not recorded.  Records every request read completely (``completed``, ``served``) and
    every request whose body ended early or was malformed (``aborted``).
    """

    def __init__(self, routes: dict[str, Route] | None = None) -> None:
        self.lock = threading.Lock()
        self.completed: dict[str, Seen] = {}
        self.served: list[Seen] = []
        self.aborted: list[str] = []
        self.release = threading.Event()  # frees /resp/hang
        self.routes: dict[str, Route] = dict(routes or {})
        self.routes["/resp/hang"] = self._hang

    def _hang(self, conn: socket.socket, seen: Seen) -> bool:
        self.release.wait(10)
        return False

    def __call__(self, head: bytes, conn: socket.socket, reader) -> bool:
        method, path, fields = request_head_fields(head)
        complete, body, length, crc = read_request_body(
            fields, reader, recorded=not path.startswith("/stream/"))
        seen = Seen(method, path, head, body, length, crc, id(getattr(reader, "record", reader)))
        with self.lock:
            if not complete:
                self.aborted.append(path)
                return False
            self.completed[path] = seen
            self.served.append(seen)
        route = self.routes.get(path.split("?")[0])
        if route is not None:
            return route(conn, seen)
        payload = json.dumps({"method": method, "path": path, "length": length, "crc": crc,
                              "body": body[:4096].decode("latin-1")}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        return True

    def seen(self, path: str) -> Seen | None:
        with self.lock:
            return self.completed.get(path)

    def was_aborted(self, path: str) -> bool:
        with self.lock:
            return path in self.aborted


# --- backend bookkeeping ---------------------------------------------------------

def backend_mark(backend: RawBackend) -> tuple[int, list[int]]:
    with backend.lock:
        return len(backend.heads), [len(record) for record in backend.connections]


def received_since(backend: RawBackend, mark: tuple[int, list[int]]) -> bytes:
    with backend.lock:
        records = list(backend.connections)
    sizes = mark[1]
    return b"".join(bytes(record[sizes[i] if i < len(sizes) else 0:])
                    for i, record in enumerate(records))


def heads_since(backend: RawBackend, mark: tuple[int, list[int]]) -> list[bytes]:
    with backend.lock:
        return list(backend.heads[mark[0]:])


def backend_connection_index(backend: RawBackend, record_id: int) -> int:
    with backend.lock:
        for index, record in enumerate(backend.connections):
            if id(record) == record_id:
                return index
    raise AssertionError("no such backend connection")


_markers = itertools.count(1)


class BalancerCase(unittest.TestCase):
    """One RawBackend (``Script``) and one Balancer shared by the tests of a class."""

    balancer_args: tuple[str, ...] = ()
    routes: dict[str, Route] = {}  # the Script's routes (besides its echo and /resp/hang)
    script: Script
    backend: RawBackend
    balancer: Balancer
    port: int

    @classmethod
    def setUpClass(cls) -> None:
        cls.script = Script(cls.routes)
        cls.backend = RawBackend(cls.script)
        cls.addClassCleanup(cls.backend.stop)
        cls.addClassCleanup(cls.script.release.set)  # runs first: frees hung responders
        cls.balancer = Balancer([cls.backend.port], *BASE_ARGS, *cls.balancer_args)
        cls.addClassCleanup(cls.balancer.stop)
        cls.port = cls.balancer.port

    def tearDown(self) -> None:
        log = self.balancer.log_text()
        self.assertNotIn("Traceback", log, f"balancer log has a traceback:\n{log[-3000:]}")

    def backend_heads_for(self, path: str) -> list[bytes]:
        """The request heads the backend got for target ``path`` (exactly)."""
        needle = f" {path} ".encode()
        with self.backend.lock:
            return [head for head in self.backend.heads if needle in head.split(b"\r\n", 1)[0]]

    # --- assertions -------------------------------------------------------------

    def assert_backend_untouched(self, mark: tuple[int, list[int]], context: object = "") -> None:
        """Nothing reached the backend since ``mark`` (synchronised by a marker request)."""
        marker = self.assert_backend_sync()
        heads = heads_since(self.backend, mark)
        others = [head for head in heads if marker.encode() not in head]
        self.assertEqual(others, [], f"{context}: the backend received a request it must not")
        self.assertEqual(received_since(self.backend, mark), b"".join(heads),
                         f"{context}: the backend received stray bytes")

    def assert_backend_sync(self) -> str:
        """Send a marker request and wait until it reached the backend; its path.

        The balancer handles a client's request synchronously, so once the
        client has its answer, whatever the balancer sent the backend for it
        is on the wire: the marker bounds the wait without a fixed sleep.
        """
        marker = f"/__marker/{next(_markers)}"
        response = http_exchange(self.port, get(marker, "Connection: close"))
        self.assertEqual(response.status, 200, f"marker request failed: {response.raw_head!r}")
        wait_for(lambda: self.script.seen(marker), 5, message="marker at the backend")
        return marker

    def assert_never_complete(self, path: str, context: object = "") -> None:
        """The (streamed) request ``path`` never arrived complete at the backend.

        A streamed body may have reached the backend in part; what matters is
        that the backend never got its end (e.g. the last chunk).
        """
        self.assert_backend_sync()
        if any(f" {path} ".encode() in head for head in self.backend.heads):
            wait_for(lambda: self.script.was_aborted(path) or self.script.seen(path), 5,
                     message=f"the backend to see the end of {path}")
        self.assertIsNone(self.script.seen(path),
                          f"{context}: the backend received the complete request {path}")

    def assert_rejected(self, data: bytes, statuses: tuple[int, ...], context: object = "") -> Response:
        """``data`` gets exactly one error response in ``statuses``, then the connection closes."""
        mark = backend_mark(self.backend)
        raw, closed = send_and_collect(self.port, data)
        self.assertTrue(raw, f"{context}: no response at all")
        responses = parse_responses(raw)
        self.assertEqual(len(responses), 1, f"{context}: expected one response, got {raw!r}")
        self.assertIn(responses[0].status, statuses, f"{context}: {raw!r}")
        self.assertTrue(closed, f"{context}: the connection must close after {raw!r}")
        self.assert_backend_untouched(mark, context)
        return responses[0]

    def assert_echo(self, response: Response, path: str, method: str = "GET") -> dict:
        self.assertEqual(response.status, 200, response.raw_head + response.body)
        echo = echo_of(response)
        self.assertEqual((echo["method"], echo["path"]), (method, path))
        return echo

    def assert_backend_connection_closed(self, path: str) -> None:
        """The balancer closed the backend connection that served ``path``."""
        seen = self.script.seen(path)
        self.assertIsNotNone(seen, f"{path} never reached the backend")
        index = backend_connection_index(self.backend, seen.record_id)
        wait_for(lambda: len(self.backend.threads) > index
                 and not self.backend.threads[index].is_alive(), 5,
                 message=f"the balancer to close the backend connection of {path}")

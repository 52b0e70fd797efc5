"""Load generation: drive `wrk`, or the built-in stdlib generator.

The built-in generator runs in its own process (``python3 loadgen.py ...``) so it
does not share a GIL with the harness.  It uses one thread per connection, each
with a raw keep-alive socket and a minimal HTTP/1.1 response parser
(Content-Length, chunked, read-until-close), and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Request:
    """One benchmark request: what both generators send."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""

    def raw(self, port: int) -> bytes:
        """The request serialized as HTTP/1.1 bytes."""
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        if self.body or self.method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body

    @property
    def keepalive(self) -> bool:
        return self.headers.get("Connection", "").lower() != "close"


@dataclass
class LoadResult:
    """Summary of one load run (one cell)."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    detail: str = ""


# --------------------------------------------------------------------------- wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> LoadResult:
    """Parse `wrk --latency` output into a LoadResult."""
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not m:
        raise ValueError("no request count in wrk output:\n" + out)
    requests, duration = int(m.group(1)), _ms(m.group(2) + m.group(3)) / 1e3
    rps_m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    rps = float(rps_m.group(1)) if rps_m else requests / duration
    pct = {p: _ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M)}
    errors, detail = 0, []
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(x) for x in sock.groups())
        detail.append(sock.group(0))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
        detail.append(non2xx.group(0))
    return LoadResult(requests, duration, rps, pct.get("50", float("nan")),
                      pct.get("99", float("nan")), errors, "; ".join(detail))


def wrk_lua(req: Request, path: Path) -> Path:
    """Write a wrk Lua script that sets method, headers and body of `req`."""
    body = req.body.decode("latin-1")
    assert all(c.isalnum() for c in body), "keep the POST body Lua-literal safe"
    lines = [f'wrk.method = "{req.method}"']
    if body:
        lines.append(f'wrk.body = "{body}"')
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in req.headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(port: int, req: Request, concurrency: int, duration: float,
            script: Path) -> LoadResult:
    """Run wrk against 127.0.0.1:port for `duration` seconds."""
    threads = 1 if concurrency < 2 else 2
    seconds = max(1, math.ceil(duration))  # wrk only takes whole seconds
    cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s",
           "--latency", "--timeout", "5s", "-s", str(wrk_lua(req, script)),
           f"http://127.0.0.1:{port}{req.path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        msg = (out.stderr.strip() or out.stdout.strip()).splitlines()
        raise RuntimeError(f"wrk failed ({out.returncode}): {' | '.join(msg[:2])}")
    return parse_wrk(out.stdout)


# ------------------------------------------------------------ stdlib generator

class ProtocolError(Exception):
    """The server sent something this tiny parser does not understand."""


class Conn:
    """A raw keep-alive client socket with a buffered HTTP/1.1 response reader."""

    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.scratch = bytearray(65536)

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        n = self.sock.recv_into(self.scratch)
        if n == 0:
            raise ConnectionError("connection closed by server")
        self.buf += memoryview(self.scratch)[:n]

    def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return line

    def _skip(self, n: int) -> None:
        """Consume n body bytes without keeping them."""
        take = min(n, len(self.buf))
        del self.buf[:take]
        n -= take
        while n > 0:
            got = self.sock.recv_into(self.scratch, min(n, len(self.scratch)))
            if got == 0:
                raise ConnectionError("connection closed inside body")
            n -= got

    def response(self) -> tuple[int, bool]:
        """Read one full response; return (status, server_wants_close)."""
        while (i := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = bytes(self.buf[:i]).decode("latin-1").split("\r\n")
        del self.buf[:i + 4]
        parts = head[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(head[0])
        status = int(parts[1])
        hdrs = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip().lower()
        close = hdrs.get("connection") == "close" or parts[0] == "HTTP/1.0"
        if "chunked" in hdrs.get("transfer-encoding", ""):
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():  # trailers, then the empty line
                        pass
                    break
                self._skip(size + 2)
        elif "content-length" in hdrs:
            self._skip(int(hdrs["content-length"]))
        elif status not in (204, 304) and not 100 <= status < 200:
            try:  # body delimited by connection close
                while True:
                    self._fill()
                    self.buf.clear()
            except ConnectionError:
                pass
            close = True
        return status, close


def _client(port: int, raw: bytes, keepalive: bool, deadline: float, timeout: float,
            lat: list[float], counts: list[int]) -> None:
    """One connection's loop; appends latencies, counts[0]=socket errors, [1]=non-2xx."""
    conn: Conn | None = None
    clock = time.perf_counter
    while clock() < deadline:
        try:
            if conn is None:
                conn = Conn(port, timeout)
            t0 = clock()
            conn.sock.sendall(raw)
            status, close = conn.response()
            lat.append(clock() - t0)
            if not 200 <= status < 300:
                counts[1] += 1
        except (OSError, ProtocolError, ValueError):
            counts[0] += 1
            close = True
            time.sleep(0.001)  # don't spin on a refused port
        if (close or not keepalive) and conn is not None:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def generate(port: int, raw: bytes, keepalive: bool, concurrency: int, duration: float,
             timeout: float = 5.0) -> LoadResult:
    """Run `concurrency` client threads for `duration` seconds; summarize."""
    start = time.perf_counter()
    deadline = start + duration
    lats: list[list[float]] = [[] for _ in range(concurrency)]
    counts = [[0, 0] for _ in range(concurrency)]
    threads = [threading.Thread(target=_client, daemon=True,
                                args=(port, raw, keepalive, deadline, timeout, lats[i], counts[i]))
               for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    all_lat = sorted(x for lst in lats for x in lst)
    n = len(all_lat)

    def pct(p: float) -> float:
        return all_lat[min(n - 1, int(p * n))] * 1e3 if n else float("nan")

    sock_err, non2xx = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return LoadResult(n, elapsed, n / elapsed, pct(0.50), pct(0.99), sock_err + non2xx,
                      f"socket errors {sock_err}; non-2xx {non2xx}")


def run_python(port: int, req: Request, concurrency: int, duration: float,
               workdir: Path) -> LoadResult:
    """Run the stdlib generator in a separate Python process."""
    req_file = workdir / "request.bin"
    req_file.write_bytes(req.raw(port))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--port", str(port),
           "--request-file", str(req_file), "--concurrency", str(concurrency),
           "--duration", str(duration)]
    if not req.keepalive:
        cmd.append("--close")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.strip()[-500:]}")
    return LoadResult(**json.loads(out.stdout))


def main() -> None:
    """Entry point of the generator subprocess: print a LoadResult as JSON."""
    ap = argparse.ArgumentParser(description="stdlib HTTP/1.1 load generator (loopback)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--request-file", type=Path, required=True)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--close", action="store_true", help="new connection per request")
    a = ap.parse_args()
    sys.setswitchinterval(0.0005)
    res = generate(a.port, a.request_file.read_bytes(), not a.close, a.concurrency, a.duration)
    print(json.dumps(res.__dict__))


if __name__ == "__main__":
    main()

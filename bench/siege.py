#!/usr/bin/env python3
"""Hold many idle, slowloris and slow-body connections open against a balancer (loopback only).

The background of the ``idle10k`` and ``slowloris`` scenarios of
``bench/run.py``: while this process holds its connections, a normal client
(wrk or the stdlib generator) measures what a legitimate user gets.

- ``--idle N``: keep-alive connections that made one request, read the
  answer and then say nothing (a browser's idle tabs).
- ``--slowloris N``: request heads dribbled a byte at a time, one byte per
  connection every ``--interval`` seconds, never finished.
- ``--slow-body N``: ``POST`` heads with ``Content-Length: 4096`` whose body
  then comes a byte at a time, like the heads.

A connection the balancer closes or answers (408, 503...) is counted and
opened again, so the siege keeps its size for ``--duration`` seconds.  One
thread, non-blocking sockets, a selector; connections are opened in batches
so as not to overflow the listen backlog.  Prints ``ready ...`` once every
connection was opened once (or after ``--ramp-timeout``), then a JSON
summary when the duration is over.  Standard library only.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import resource
import selectors
import socket
import sys
import time

IDLE, SLOWLORIS, SLOW_BODY = "idle", "slowloris", "slow_body"
BODY_BYTES = 4096


class Siege:
    def __init__(self, port: int, route: str, interval: float) -> None:
        self.port = port
        self.route = route
        self.interval = interval
        self.selector = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, socket.socket]] = []  # next dribble, per socket
        self.kind: dict[socket.socket, str] = {}
        self.state: dict[socket.socket, str] = {}  # "connecting", "waiting" (idle: for the answer), "held"
        self.sequence = 0
        self.to_open: list[str] = []  # kinds waiting to be (re)opened
        self.stats = {"opened": 0, "connect_errors": 0, "closed_by_server": 0, "answers": {}}

    # --- opening ----------------------------------------------------------------

    def open(self, kind: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            self.stats["connect_errors"] += 1
            self.to_open.append(kind)
            return
        self.kind[sock] = kind
        self.state[sock] = "connecting"
        self.selector.register(sock, selectors.EVENT_WRITE)
        self.stats["opened"] += 1

    def connected(self, sock: socket.socket) -> None:
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self.stats["connect_errors"] += 1
            self.drop(sock, count=False)
            return
        kind = self.kind[sock]
        self.selector.modify(sock, selectors.EVENT_READ)
        if kind == IDLE:
            self.send(sock, f"GET {self.route} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            self.state[sock] = "waiting"
        elif kind == SLOWLORIS:
            self.send(sock, b"G")
            self.state[sock] = "held"
            self.schedule(sock)
        else:
            self.send(sock, (f"POST {self.route} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             f"Content-Length: {BODY_BYTES}\r\n\r\n").encode())
            self.state[sock] = "held"
            self.schedule(sock)

    def send(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.send(data)
        except OSError:
            pass  # the read side will see the end

    def schedule(self, sock: socket.socket) -> None:
        self.sequence += 1
        heapq.heappush(self.timers, (time.monotonic() + self.interval, self.sequence, sock))

    # --- events -----------------------------------------------------------------

    def readable(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        kind = self.kind[sock]
        if not data:
            self.stats["closed_by_server"] += 1
            self.drop(sock)
            return
        if kind == IDLE and self.state[sock] == "waiting":
            self.state[sock] = "held"  # the one answer (small: one read); now idle
            self.count_answer(data)
            return
        self.count_answer(data)
        self.drop(sock)  # a slow client answered (408, 503): open another

    def count_answer(self, data: bytes) -> None:
        status = data[9:12].decode("latin-1", "replace") if data.startswith(b"HTTP/1.") else "?"
        answers = self.stats["answers"]
        answers[status] = answers.get(status, 0) + 1

    def dribble(self, sock: socket.socket) -> None:
        if sock not in self.kind:
            return  # closed since
        payload = b"x" if self.kind[sock] == SLOW_BODY else b"X"
        try:
            sock.send(payload)
        except BlockingIOError:
            pass
        except OSError:
            return
        self.schedule(sock)

    def drop(self, sock: socket.socket, count: bool = True) -> None:
        kind = self.kind.pop(sock)
        self.state.pop(sock, None)
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        self.to_open.append(kind)

    def held(self) -> dict[str, int]:
        counts = {IDLE: 0, SLOWLORIS: 0, SLOW_BODY: 0}
        for sock, kind in self.kind.items():
            if self.state.get(sock) == "held":
                counts[kind] += 1
        return counts

    # --- the loop ---------------------------------------------------------------

    def run(self, wanted: dict[str, int], duration: float, ramp_timeout: float, batch: int) -> dict:
        self.to_open = [kind for kind, n in wanted.items() for _ in range(n)]
        total = sum(wanted.values())
        started = time.monotonic()
        ready_at = None
        end = None
        while True:
            now = time.monotonic()
            if self.to_open:
                for _ in range(min(batch, len(self.to_open))):
                    self.open(self.to_open.pop(0))
            if ready_at is None:
                held = self.held()
                if sum(held.values()) >= total or now - started > ramp_timeout:
                    ready_at = now
                    end = now + duration
                    print("ready " + " ".join(f"{k}={v}" for k, v in held.items()), flush=True)
            if end is not None and now >= end:
                break
            for key, mask in self.selector.select(0.02):
                sock = key.fileobj
                if sock not in self.kind:
                    continue
                if self.state[sock] == "connecting":
                    if mask & selectors.EVENT_WRITE:
                        self.connected(sock)  # type: ignore[arg-type]
                elif mask & selectors.EVENT_READ:
                    self.readable(sock)  # type: ignore[arg-type]
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, sock = heapq.heappop(self.timers)
                self.dribble(sock)
        summary = dict(self.stats)
        summary["held_at_end"] = self.held()
        summary["ramp_s"] = round((ready_at or time.monotonic()) - started, 2)
        return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--route", default="/")
    ap.add_argument("--idle", type=int, default=0)
    ap.add_argument("--slowloris", type=int, default=0)
    ap.add_argument("--slow-body", type=int, default=0)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between two bytes of one slow connection")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds to hold after the ramp-up")
    ap.add_argument("--ramp-timeout", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=200, help="connections opened per loop round")
    args = ap.parse_args()
    total = args.idle + args.slowloris + args.slow_body
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < total + 100:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, total + 1000), hard))
        except (ValueError, OSError):
            pass
    siege = Siege(args.port, args.route, args.interval)
    try:
        summary = siege.run({IDLE: args.idle, SLOWLORIS: args.slowloris, SLOW_BODY: args.slow_body},
                            args.duration, args.ramp_timeout, args.batch)
    except OSError as error:
        if error.errno == errno.EMFILE:
            print(f"out of file descriptors: {error}", file=sys.stderr)
        raise
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

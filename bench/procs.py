"""Process management and config generation for the cclb benchmark harness.

Everything here is standard library only.  Each server the harness starts is a
:class:`Managed` process in its own session (process group), with its output
sent to a log file in the run's temp dir, so that it can be stopped as a whole
tree (terminate, then kill) and its CPU time read from ``/proc``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SMALL_BYTES = 1024
BIG_BYTES = 1024 * 1024
POST_BYTES = 16 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartError(RuntimeError):
    """A server did not come up; the message says why (with its log tail)."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Managed:
    """A started server process, killed with its whole process group on stop."""

    name: str
    argv: list[str]
    port: int
    log: Path
    cwd: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, timeout: float) -> None:
        """Start the process and poll its port until it accepts, or raise StartError."""
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:  # StartError, or Ctrl-C while waiting: leave nothing behind
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Poll the port until it accepts; StartError if the process exits or time runs out."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"{self.name} exited with code {self.proc.returncode}: "
                                 f"{self.log_tail()}")
            if port_open(self.port):
                return
            time.sleep(0.02)
        raise StartError(f"{self.name} did not accept on port {self.port} within "
                         f"{timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, lines: int = 4) -> str:
        """Last lines of the process output, squeezed onto one line."""
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:]) or "(no output)"

    @property
    def pid(self) -> int:
        """Pid of the started process (the root of its tree)."""
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the process group, wait up to `grace` seconds, then SIGKILL it."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # Leader gone: make sure no straggler (worker) in the group survives.
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        self.proc = None


# --------------------------------------------------------------------------- CPU

def _proc_table() -> dict[int, tuple[int, int]]:
    """Map pid -> (ppid, utime+stime+cutime+cstime in clock ticks) for all processes."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        # Fields after the ")" closing the command name: state ppid ... utime(14) stime(15)
        rest = raw[raw.rfind(")") + 2:].split()
        ppid = int(rest[1])
        ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
        table[int(entry)] = (ppid, ticks)
    return table


def tree_cpu_seconds(root_pids: list[int]) -> float:
    """CPU seconds (user+system, incl. reaped children) of the process trees under root_pids.

    Reaped children count through their parent's cutime/cstime, so a before/after
    difference stays right even when a worker exits in between.
    """
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack, seen = 0, [p for p in root_pids if p in table], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += table[pid][1]
        stack.extend(children.get(pid, []))
    return total / CLK_TCK


# ----------------------------------------------------------------------- content

def tree_threads_rss(root_pids: list[int]) -> tuple[int, int]:
    """Threads and resident KiB of the processes ``root_pids`` and their descendants."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo, seen = list(root_pids), set()
    threads = rss = 0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    threads += int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return threads, rss


def small_json() -> bytes:
    """A JSON document of exactly SMALL_BYTES bytes (compressible, like an API answer)."""
    users = [{"id": i, "name": f"user{i}", "active": i % 2 == 0} for i in range(18)]
    doc = {"users": users, "pad": ""}
    base = len(json.dumps(doc, separators=(",", ":")).encode())
    doc["pad"] = "x" * (SMALL_BYTES - base)
    data = json.dumps(doc, separators=(",", ":")).encode()
    assert len(data) == SMALL_BYTES, len(data)
    return data


def big_body() -> bytes:
    """SMALL_BYTES-sized JSON repeated up to BIG_BYTES (content of /big)."""
    return (small_json() * (BIG_BYTES // SMALL_BYTES))[:BIG_BYTES]


def _nginx_common(d: Path, workers: int) -> str:
    """Top of an nginx config: everything writable lives in temp dir d."""
    master = "on" if workers > 1 else "off"
    return f"""
worker_processes {workers};
master_process {master};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
"""


def _nginx_http_common(d: Path) -> str:
    return f"""
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_buffer_size 64k;
    client_max_body_size 4m;
"""


def _prepare_dir(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    # nginx workers may drop to 'nobody' when started as root: let them traverse.
    os.chmod(d, 0o755)


def nginx_backend(d: Path, port: int, name: str) -> Managed:
    """A single-process nginx that serves /small (1 KiB JSON), /big (1 MiB), POST /post."""
    _prepare_dir(d)
    www = d / "www"
    www.mkdir(exist_ok=True)
    os.chmod(www, 0o755)
    for fname, data in (("small.json", small_json()), ("big.json", big_body())):
        (www / fname).write_bytes(data)
        os.chmod(www / fname, 0o644)
    conf = _nginx_common(d, 1) + f"""
http {{
{_nginx_http_common(d)}
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        add_header X-Backend {name};
        location = /small {{ default_type application/json; alias {www}/small.json; }}
        location = /big   {{ default_type application/json; alias {www}/big.json; }}
        location = /post  {{ default_type application/json; return 200 '{{"ok":true}}'; }}
        location = /      {{ default_type application/json; return 200 '{{"response":true}}'; }}
        location = /health {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
        location / {{ default_type application/json; return 404 '{{"error":"not found"}}'; }}
    }}
}}
"""
    (d / "nginx.conf").write_text(conf)
    return Managed(name, ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"),
                          "-e", str(d / "error.log")], port, d / "out.log")


def nginx_balancer(d: Path, port: int, backends: list[int], workers: int) -> Managed:
    """nginx as round-robin reverse proxy with upstream keep-alive and gzip for JSON."""
    _prepare_dir(d)
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    conf = _nginx_common(d, workers) + f"""
http {{
{_nginx_http_common(d)}
    upstream backends {{
{servers}
        keepalive 32;
    }}
    gzip on;
    gzip_types application/json;
    gzip_min_length 256;
    gzip_proxied any;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffer_size 16k;
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""
    (d / "nginx.conf").write_text(conf)
    return Managed("nginx", ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"),
                             "-e", str(d / "error.log")], port, d / "out.log")


def haproxy_balancer(d: Path, port: int, backends: list[int], threads: int) -> Managed:
    """HAProxy in HTTP mode, round-robin, connection reuse, gzip for JSON."""
    _prepare_dir(d)
    servers = "\n".join(f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(backends, 1))
    conf = f"""
global
    nbthread {threads}
    maxconn 8192

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 65s

frontend fe
    bind 127.0.0.1:{port}
    compression algo gzip
    compression type application/json
    default_backend be

backend be
    balance roundrobin
    http-reuse always
{servers}
"""
    (d / "haproxy.cfg").write_text(conf)
    return Managed("haproxy", ["haproxy", "-db", "-f", str(d / "haproxy.cfg")],
                   port, d / "out.log")


def python_backend(python: str, server_py: Path, port: int, name: str, log: Path) -> Managed:
    """The repo's demo backend: `python3 server.py PORT --host 127.0.0.1 --name NAME`."""
    return Managed(name, [python, str(server_py), str(port), "--host", "127.0.0.1",
                          "--name", name], port, log, cwd=server_py.parent)


def cclb(python: str, cclb_py: Path, port: int, backends: list[int], workers: int,
         log: Path, extra: list[str] | None = None) -> Managed:
    """The checkout's balancer; `--workers` is only passed when workers > 1; `extra` args last."""
    argv = [python, str(cclb_py), "-p", str(port), "--host", "127.0.0.1"]
    for p in backends:
        argv += ["-b", f"http://127.0.0.1:{p}"]
    argv += ["--access-log", "/dev/null", "--log-level", "WARNING"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    argv += extra or []
    label = "cclb" if workers <= 1 else f"cclb-w{workers}"
    return Managed(label, argv, port, log, cwd=cclb_py.parent)


def have(tool: str) -> bool:
    """True when `tool` is on PATH."""
    return shutil.which(tool) is not None

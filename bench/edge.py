#!/usr/bin/env python3
"""Edge benchmark: TLS termination and WebSocket echo, cclb vs nginx vs HAProxy, in one run.

The same harness as ``bench/run.py`` (processes, CPU accounting, table, JSON),
with scenarios of their own:

* ``tls``       - GET the small document over HTTPS, keep-alive (wrk): the cost
                  of encrypting, once the handshake is amortised
* ``tls-close`` - the same with ``Connection: close``: a new TLS connection per
                  request (wrk resumes its TLS 1.2 session, an abbreviated
                  handshake, as a returning browser does; wrk speaks TLS 1.2)
* ``ws``        - WebSocket echo of 128-byte binary messages, one message in flight
                  per connection, through the balancer to ``server.py /ws``
* ``ws64k``     - the same with 64 KiB messages (bytes copied through the tunnel)

Each balancer terminates TLS with the same certificate (``tests/certs/localhost.pem``,
ECDSA P-256, chain and key in one file) and speaks plain HTTP/1.1 to the backends
(single-process nginx serving ``/small``, else ``server.py``).  For the WebSocket
scenarios the backends are always three ``server.py`` processes (their ``/ws`` echo)
and the load comes from a stdlib client (``--ws-procs`` processes, a thread per
connection); ``direct`` is one ``server.py`` without a balancer (the ceiling).
``req/s`` is messages echoed per second there.  There is no ``direct`` row for
the TLS scenarios (the backends speak plain HTTP).

A peer (nginx, haproxy) that is not installed is skipped with a note; the TLS
scenarios need wrk and are skipped without it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.dont_write_bytecode = True  # keep bench/ free of __pycache__
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import loadgen, procs  # noqa: E402
from bench.loadgen import LoadResult, Request  # noqa: E402
from bench.procs import Managed, StartError  # noqa: E402
from bench.report import Cell, Report, add_ratios, table, write_json  # noqa: E402
import websocket  # noqa: E402  (the repository's RFC 6455 helpers)

REPO = Path(__file__).resolve().parent.parent
CERT = REPO / "tests" / "certs" / "localhost.pem"
TLS_SCENARIOS = ("tls", "tls-close")
WS_SIZES = {"ws": 128, "ws64k": 64 * 1024}  # message bytes
SCENARIOS = (*TLS_SCENARIOS, *WS_SIZES)
PEERS = ("nginx", "haproxy")


def csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma list from %(default)s (default: all)")
    ap.add_argument("--concurrency", type=int, default=50, help="connections (default: %(default)s)")
    ap.add_argument("--duration", type=float, default=3.0,
                    help="measured seconds per cell (wrk rounds up) (default: %(default)s)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="unmeasured seconds of the same load per cell (default: %(default)s)")
    ap.add_argument("--contenders", default="direct,cclb,nginx,haproxy",
                    help="comma list from direct,cclb,nginx,haproxy (default: %(default)s)")
    ap.add_argument("--cclb-workers", default="1",
                    help="run cclb once per value (N>1: --workers N, labelled cclb-wN) "
                         "(default: %(default)s)")
    ap.add_argument("--peer-workers", type=int, default=1,
                    help="nginx worker_processes and HAProxy nbthread (default: %(default)s)")
    ap.add_argument("--ws-procs", type=int, default=2,
                    help="WebSocket client processes sharing the connections (default: %(default)s)")
    ap.add_argument("--cclb", type=Path, default=REPO / "cclb.py")
    ap.add_argument("--server", type=Path, default=REPO / "server.py")
    ap.add_argument("--cert", type=Path, default=CERT,
                    help="PEM with chain and key for every TLS listener (default: the test one)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--start-timeout", type=float, default=10.0)
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    args = ap.parse_args(argv)
    bad = [s for s in csv(args.scenarios) if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s): {','.join(bad)}")
    bad = [c for c in csv(args.contenders) if c not in ("direct", "cclb", *PEERS)]
    if bad:
        ap.error(f"unknown contender(s): {','.join(bad)}")
    if not all(w.isdigit() and int(w) > 0 for w in csv(args.cclb_workers)):
        ap.error("--cclb-workers must be a comma list of positive integers")
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0 or args.ws_procs < 1:
        ap.error("--concurrency, --duration and --ws-procs must be positive, --warmup >= 0")
    return args


# ------------------------------------------------------------------ contenders

def nginx_balancer(d: Path, port: int, backends: list[int], workers: int, cert: Path | None) -> Managed:
    """nginx as round-robin reverse proxy: TLS termination (``cert``) or WebSocket proxying."""
    procs._prepare_dir(d)
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    if cert is not None:
        listen = f"""listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {cert};
        ssl_protocols TLSv1.2 TLSv1.3;"""
        connection = 'proxy_set_header Connection "";'
    else:  # the documented WebSocket proxying (nginx.org/en/docs/http/websocket.html)
        listen = f"listen 127.0.0.1:{port} backlog=4096;"
        # An upgraded connection is relayed through proxy_buffer_size (4/8 KiB by
        # default): 64 KiB, as cclb's tunnel buffer, so ws64k compares like with like.
        connection = ('proxy_set_header Upgrade $http_upgrade;\n'
                      '            proxy_set_header Connection "upgrade";\n'
                      '            proxy_buffer_size 64k;\n'
                      '            proxy_buffers 8 64k;\n'
                      '            proxy_busy_buffers_size 128k;\n'
                      '            proxy_read_timeout 3600s;')
    conf = procs._nginx_common(d, workers) + f"""
http {{
{procs._nginx_http_common(d)}
    upstream backends {{
{servers}
        keepalive 32;
    }}
    server {{
        {listen}
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            {connection}
            proxy_set_header Host $host;
        }}
    }}
}}
"""
    (d / "nginx.conf").write_text(conf)
    return Managed("nginx", ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
                   port, d / "out.log")


def haproxy_balancer(d: Path, port: int, backends: list[int], threads: int, cert: Path | None) -> Managed:
    """HAProxy, mode http, round-robin: TLS termination (``cert``) or WebSocket (tunnel timeout)."""
    procs._prepare_dir(d)
    servers = "\n".join(f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(backends, 1))
    bind = f"bind 127.0.0.1:{port}" + (f" ssl crt {cert} alpn http/1.1" if cert is not None else "")
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
    timeout tunnel 1h
    timeout http-keep-alive 65s

frontend fe
    {bind}
    default_backend be

backend be
    balance roundrobin
    http-reuse always
{servers}
"""
    (d / "haproxy.cfg").write_text(conf)
    return Managed("haproxy", ["haproxy", "-db", "-f", str(d / "haproxy.cfg")], port, d / "out.log")


def start_contender(name: str, args: argparse.Namespace, d: Path, backends: list[int], tls: bool) -> Managed:
    port = procs.free_port()
    d.mkdir(parents=True, exist_ok=True)
    cert = args.cert if tls else None
    if name == "nginx":
        m = nginx_balancer(d, port, backends, args.peer_workers, cert)
    elif name == "haproxy":
        m = haproxy_balancer(d, port, backends, args.peer_workers, cert)
    else:
        workers = 1 if name == "cclb" else int(name.removeprefix("cclb-w"))
        m = procs.cclb(args.python, args.cclb, port, backends, workers, d / "out.log")
        if cert is not None:
            m.argv += ["--tls-cert", str(cert)]
    m.start(args.start_timeout)
    return m


# ------------------------------------------------------------ WebSocket client

def _ws_connect(port: int, timeout: float = 10.0) -> tuple[socket.socket, bytearray]:
    """A connection that completed the RFC 6455 opening handshake; bytes read past the 101."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = websocket.new_key()
    sock.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\n"
                 f"Upgrade: websocket\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    buf = bytearray()
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed during the handshake")
        buf += data
    status = buf[:end].split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        sock.close()
        raise ConnectionError(f"handshake answered {status.decode('latin-1')!r}")
    return sock, buf[end + 4:]


def _ws_echo_loop(port: int, size: int, deadline: float, latencies: list[float], errors: list[int]) -> None:
    """One connection: send a masked binary message, read its echo, until ``deadline`` (at least once)."""
    try:
        sock, buf = _ws_connect(port)
    except OSError:
        errors[0] += 1
        return
    # One masked frame, sent again and again (the server unmasks each; the key's
    # freshness, RFC 6455 5.3, matters against proxies caching, not here).
    frame = websocket.encode_frame(websocket.Opcode.BINARY, os.urandom(size), mask=True)
    header = 2 + (2 if size >= 126 else 0) + (6 if size >= 1 << 16 else 0)
    expected = header + size
    scratch = bytearray(1 << 17)
    clock = time.perf_counter
    try:
        while True:
            begun = clock()
            sock.sendall(frame)
            while len(buf) < expected:
                n = sock.recv_into(scratch)
                if n == 0:
                    raise ConnectionError("closed mid-echo")
                buf += memoryview(scratch)[:n]
            if buf[0] != 0x82:
                raise ConnectionError(f"unexpected frame byte {buf[0]:#x}")
            del buf[:expected]
            latencies.append(clock() - begun)
            if clock() >= deadline:
                break
        sock.sendall(websocket.encode_frame(websocket.Opcode.CLOSE, websocket.encode_close(1000), mask=True))
    except OSError:
        errors[0] += 1
    finally:
        sock.close()


def ws_client_main(argv: list[str]) -> None:
    """``edge.py --ws-client PORT SIZE CONNECTIONS SECONDS``: print latencies (ms) and errors as JSON."""
    port, size, connections, seconds = int(argv[0]), int(argv[1]), int(argv[2]), float(argv[3])
    sys.setswitchinterval(0.0005)
    deadline = time.perf_counter() + seconds
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [[0] for _ in range(connections)]
    threads = [threading.Thread(target=_ws_echo_loop, args=(port, size, deadline, latencies[i], errors[i]),
                                daemon=True) for i in range(connections)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 15)
    elapsed = time.perf_counter() - started
    print(json.dumps({"elapsed": elapsed, "errors": sum(e[0] for e in errors),
                      "latencies_ms": [round(x * 1e3, 4) for lst in latencies for x in lst]}))


def run_ws(port: int, size: int, connections: int, seconds: float, processes: int) -> LoadResult:
    """``connections`` echo loops spread over ``processes`` client processes."""
    shares = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    children = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--ws-client", str(port),
                                  str(size), str(n), str(seconds)], stdout=subprocess.PIPE, text=True)
                for n in shares if n > 0]
    latencies: list[float] = []
    errors, elapsed = 0, 0.0
    for child in children:
        out, _ = child.communicate(timeout=seconds + 60)
        if child.returncode != 0:
            raise RuntimeError(f"WebSocket client failed ({child.returncode})")
        result = json.loads(out)
        latencies += result["latencies_ms"]
        errors += result["errors"]
        elapsed = max(elapsed, result["elapsed"])
    latencies.sort()
    n = len(latencies)

    def pct(p: float) -> float:
        return latencies[min(n - 1, int(p * n))] if n else float("nan")
    return LoadResult(n, elapsed, n / elapsed if elapsed else 0.0, pct(0.5), pct(0.99), errors,
                      f"connection errors {errors}")


# -------------------------------------------------------------------- probes

def probe_tls(port: int, route: str) -> str:
    """One HTTPS GET: ``ok`` plus the TLS version, or what went wrong."""
    context = ssl.create_default_context(cafile=str(REPO / "tests" / "certs" / "ca.pem"))
    try:
        conn = http.client.HTTPSConnection("localhost", port, timeout=10, context=context)
        conn.request("GET", route)
        resp = conn.getresponse()
        resp.read()
        version = conn.sock.version() if conn.sock is not None else "?"
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        return f"probe failed: {type(e).__name__}: {e}"[:120]
    return f"ok, {version}" if resp.status == 200 else f"HTTP {resp.status}"


def probe_ws(port: int, size: int) -> str:
    latencies: list[float] = []
    errors = [0]
    _ws_echo_loop(port, size, 0.0, latencies, errors)  # one echo
    return "ok" if latencies and not errors[0] else "echo failed"


# ------------------------------------------------------------------- the run

def measure(name: str, scenario: str, args: argparse.Namespace, tool: str, port: int, route: str,
            pids: list[int], backend_pids: list[int], workdir: Path) -> Cell:
    cell = Cell(scenario, route, args.concurrency, name, tool)
    if scenario in TLS_SCENARIOS:
        cell.check = probe_tls(port, route)
        headers = {"Connection": "close"} if scenario == "tls-close" else {}
        request = Request("GET", route, headers)

        def load(seconds: float) -> LoadResult:
            return run_wrk_tls(port, request, args.concurrency, seconds, workdir / "req.lua")
    else:
        size = WS_SIZES[scenario]
        cell.check = probe_ws(port, size)

        def load(seconds: float) -> LoadResult:
            return run_ws(port, size, args.concurrency, seconds, args.ws_procs)
    try:
        if args.warmup > 0:
            load(args.warmup)
        cpu0, bcpu0 = procs.tree_cpu_seconds(pids), procs.tree_cpu_seconds(backend_pids)
        result = load(args.duration)
        cell.cpu_s = procs.tree_cpu_seconds(pids) - cpu0
        cell.backend_cpu_s = procs.tree_cpu_seconds(backend_pids) - bcpu0
    except (RuntimeError, ValueError, subprocess.TimeoutExpired, OSError) as e:
        cell.check = f"load failed: {e}"[:200]
        print(f"  {scenario:9} {name:8} FAILED: {cell.check}", flush=True)
        return cell
    cell.requests, cell.duration_s, cell.rps = result.requests, result.duration_s, result.rps
    cell.p50_ms, cell.p99_ms, cell.errors, cell.detail = result.p50_ms, result.p99_ms, result.errors, result.detail
    print(f"  {scenario:9} {name:8} {result.rps:9.0f} /s  p99 {result.p99_ms:7.2f} ms  err {result.errors:<5}"
          f" cpu {cell.us_per_req:6.0f} us/op  [{cell.check}]", flush=True)
    return cell


def run_wrk_tls(port: int, req: Request, concurrency: int, duration: float, script: Path) -> LoadResult:
    """``loadgen.run_wrk`` against https://127.0.0.1:port (wrk does not verify certificates)."""
    threads = 1 if concurrency < 2 else 2
    seconds = max(1, int(-(-duration // 1)))
    cmd = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--latency", "--timeout", "5s",
           "-s", str(loadgen.wrk_lua(req, script)), f"https://127.0.0.1:{port}{req.path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        msg = (out.stderr.strip() or out.stdout.strip()).splitlines()
        raise RuntimeError(f"wrk failed ({out.returncode}): {' | '.join(msg[:2])}")
    return loadgen.parse_wrk(out.stdout)


def start_backends(kind: str, args: argparse.Namespace, tmp: Path, running: list[Managed]) -> list[Managed]:
    started = []
    for i in range(3):
        port, name = procs.free_port(), f"{kind}-backend{i + 1}"
        if kind == "nginx":
            m = procs.nginx_backend(tmp / name, port, name)
        else:
            m = procs.python_backend(args.python, args.server, port, name, tmp / f"{name}.log")
        running.append(m)
        m.start(args.start_timeout)
        started.append(m)
    return started


def phase(label: str, scenarios: list[str], contenders: list[str], args: argparse.Namespace, tool: str,
          route: str, backends: list[Managed], tmp: Path, report: Report, running: list[Managed]) -> None:
    """Every scenario of one family against every contender, one contender at a time."""
    bports, bpids = [b.port for b in backends], [b.pid for b in backends]
    for name in contenders:
        if name == "direct":
            if label == "tls":
                continue  # the backends speak plain HTTP: no TLS ceiling to show
            for s in scenarios:
                report.cells.append(measure(name, s, args, tool, bports[0], route, [bpids[0]], bpids, tmp))
            continue
        try:
            m = start_contender(name, args, tmp / f"{label}-{name}", bports, tls=label == "tls")
        except StartError as e:
            note = f"{name} ({label}) failed to start: {e}"[:400]
            report.notes.append(note)
            print("  " + note, flush=True)
            continue
        running.append(m)
        print(f"{name} ({label}) on port {m.port} (pid {m.pid})", flush=True)
        try:
            for s in scenarios:
                report.cells.append(measure(name, s, args, tool, m.port, route, [m.pid], bpids, tmp))
            if not m.alive():
                report.notes.append(f"{name} died during the run: {m.log_tail()}")
        finally:
            m.stop()
            running.remove(m)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--ws-client"]:
        ws_client_main(argv[1:])
        return 0
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    notes: list[str] = []
    contenders: list[str] = []
    for name in csv(args.contenders):
        if name == "cclb":
            contenders += ["cclb" if int(w) == 1 else f"cclb-w{w}" for w in dict.fromkeys(csv(args.cclb_workers))]
        elif name in PEERS and not procs.have(name):
            notes.append(f"{name}: not installed, skipped")
        else:
            contenders.append(name)
    scenarios = csv(args.scenarios)
    tls_scenarios = [s for s in scenarios if s in TLS_SCENARIOS]
    ws_scenarios = [s for s in scenarios if s in WS_SIZES]
    if tls_scenarios and not procs.have("wrk"):
        notes.append("tls scenarios: skipped, they need wrk")
        tls_scenarios = []
    tls_backends = "nginx" if procs.have("nginx") else "python"
    route = "/small" if tls_backends == "nginx" else "/users"
    report = Report(machine_info(args), {
        "scenarios": tls_scenarios + ws_scenarios, "contenders": contenders, "concurrency": args.concurrency,
        "duration_s": args.duration, "warmup_s": args.warmup, "peer_workers": args.peer_workers,
        "ws_procs": args.ws_procs, "tls_backends": tls_backends, "cert": str(args.cert)}, notes=notes)
    print(f"cclb edge bench: {','.join(tls_scenarios + ws_scenarios)} x {','.join(contenders)}, "
          f"c={args.concurrency}, {args.duration:g}s (+{args.warmup:g}s warm-up) per cell", flush=True)
    for n in notes:
        print("  note: " + n)
    tmp = Path(tempfile.mkdtemp(prefix="cclb-edge-"))
    os.chmod(tmp, 0o755)
    running: list[Managed] = []
    started = time.monotonic()
    code = 0
    try:
        if tls_scenarios:
            backends = start_backends(tls_backends, args, tmp, running)
            phase("tls", tls_scenarios, contenders, args, "wrk", route, backends, tmp, report, running)
            for b in backends:
                b.stop()
                running.remove(b)
        if ws_scenarios:
            backends = start_backends("python", args, tmp, running)
            phase("ws", ws_scenarios, contenders, args, "ws-client", "/ws", backends, tmp, report, running)
    except KeyboardInterrupt:
        report.notes.append("run interrupted: partial results")
        code = 130
    except StartError as e:
        report.notes.append(f"backend failed to start: {e}")
        code = 1
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for m in reversed(running):
                m.stop()
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)
    report.config["elapsed_s"] = round(time.monotonic() - started, 1)
    add_ratios(report.cells)
    print()
    print(table(report.cells) if report.cells else "(no results)")
    for n in report.notes:
        print("note: " + n)
    print("note: ws rows: req/s = messages echoed per second, latency = one round trip; "
          "CPU = the contender's whole process tree (direct: the one backend).")
    print(f"elapsed {report.config['elapsed_s']:.0f} s")
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return code


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def machine_info(args: argparse.Namespace) -> dict:
    """The machine and tool versions, as ``bench/run.py`` records them."""
    from bench import run
    return run.machine_info(args)


if __name__ == "__main__":
    sys.exit(main())

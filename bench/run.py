#!/usr/bin/env python3
"""Benchmark cclb against nginx and HAProxy, in one run, on this machine (loopback only).

Three backends are started on free loopback ports (fast single-process nginx
instances when nginx is installed, else the repo's ``server.py``).  Each
contender is then put in front of the same three backends, round-robin, on its
own port, and loaded in turn with ``wrk`` (or a stdlib generator):

* ``direct``  - one backend with no balancer: the ceiling
* ``cclb``    - this checkout's ``cclb.py`` (``cclb-wN`` with ``--workers N``)
* ``nginx``   - nginx as balancer (upstream keepalive 32, HTTP/1.1, gzip for JSON)
* ``haproxy`` - HAProxy (mode http, roundrobin, http-reuse always, gzip for JSON)

Scenarios: ``small`` (GET 1 KiB JSON), ``gzip`` (the same with
``Accept-Encoding: gzip``), ``post16k`` (POST a 16 KiB body), ``big`` (GET
1 MiB), ``close`` (small GET with ``Connection: close``); ``c200`` and
``c1000`` (small GETs over 200 and 1,000 connections); ``idle10k`` (10
connections of small GETs while ``bench/siege.py`` holds 10,000 idle
keep-alive connections, 2,000 slowloris heads and 500 slow bodies) and
``slowloris`` (the same with 2,000 slowloris heads only).  For every cell it
reports req/s, p50/p99 latency, errors (socket errors + non-2xx), the
contender's CPU time (whole process tree, from /proc) per 10k requests and per
request, and on cclb rows cclb's req/s relative to nginx and HAProxy.

Only the standard library is used; nginx, haproxy and wrk are used when on PATH.
Every started process is stopped (SIGTERM, then SIGKILL) and the temp dir
removed, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.dont_write_bytecode = True  # keep bench/ free of __pycache__
# The repository root, so that `python3 bench/run.py` finds the bench package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import loadgen, procs  # noqa: E402
from bench.loadgen import LoadResult, Request  # noqa: E402
from bench.procs import Managed, StartError  # noqa: E402
from bench.report import Cell, Report, add_ratios, svg_chart, table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PEERS = ("nginx", "haproxy")


@dataclass(frozen=True)
class Scenario:
    """A request shape; `python_route` is the closest server.py route (None: skip)."""

    name: str
    method: str
    route: str
    python_route: str | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    expect_bytes: int | None = None  # body size from the nginx backends
    concurrency: int | None = None  # fixed connection count (c200, c1000, the sieges)
    siege: tuple[int, int, int] | None = None  # bench/siege.py: idle, slowloris, slow-body connections


POST_BODY = b"x" * procs.POST_BYTES
SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("small", "GET", "/small", "/users", expect_bytes=procs.SMALL_BYTES),
    Scenario("gzip", "GET", "/small", "/users", {"Accept-Encoding": "gzip"}),
    Scenario("post16k", "POST", "/post", "/echo",
             {"Content-Type": "application/octet-stream"}, POST_BODY),
    Scenario("big", "GET", "/big", None, expect_bytes=procs.BIG_BYTES),
    Scenario("close", "GET", "/small", "/users", {"Connection": "close"},
             expect_bytes=procs.SMALL_BYTES),
    # The connection engine's scenarios (issue 12): many connections, and slow or idle ones.
    Scenario("c200", "GET", "/small", "/users", expect_bytes=procs.SMALL_BYTES, concurrency=200),
    Scenario("c1000", "GET", "/small", "/users", expect_bytes=procs.SMALL_BYTES, concurrency=1000),
    Scenario("idle10k", "GET", "/small", "/users", expect_bytes=procs.SMALL_BYTES, concurrency=10,
             siege=(10000, 2000, 500)),
    Scenario("slowloris", "GET", "/small", "/users", expect_bytes=procs.SMALL_BYTES, concurrency=10,
             siege=(0, 2000, 0)),
]}
ENGINE_SCENARIOS = ("c200", "c1000", "idle10k", "slowloris")


@dataclass
class Plan:
    """What this run will do, resolved from the options and the installed tools."""

    backends: str                       # "nginx" | "python"
    tool: str                           # "wrk" | "python"
    contenders: list[str]               # e.g. ["direct", "cclb", "cclb-w2", "nginx", "haproxy"]
    cells: list[tuple[Scenario, int]]   # (scenario, concurrency), in run order
    notes: list[str] = field(default_factory=list)

    def route(self, s: Scenario) -> str | None:
        return s.route if self.backends == "nginx" else s.python_route


def csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Default run: small,gzip,post16k,big,close at concurrency 50 plus small at "
               "concurrency 1, 4 s per cell, contenders direct,cclb,cclb-w2,nginx,haproxy "
               "(a little over 2 minutes).  Example: python3 bench/run.py --json out.json "
               "--plot out.svg;  without nginx/wrk: python3 bench/run.py --tool python "
               "--backends python")
    ap.add_argument("--backends", choices=["auto", "nginx", "python"], default="auto",
                    help="backend servers: three single-process nginx (serving /small 1 KiB "
                         "JSON, /big 1 MiB, POST /post), or three `server.py PORT` (routes "
                         "/users, /echo; no 1 MiB route, so 'big' is skipped); auto = nginx "
                         "when installed (default: %(default)s)")
    ap.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto",
                    help="load generator: wrk (-t2 -c50 / -t1 -c1, --latency) or the built-in "
                         "stdlib generator (one thread + raw keep-alive socket per "
                         "connection, in its own process); auto = wrk when installed")
    ap.add_argument("--scenarios", default="small,gzip,post16k,big,close",
                    help=f"comma list from {','.join(SCENARIOS)} (default: %(default)s)")
    ap.add_argument("--concurrency", default="auto",
                    help="comma list of connection counts, each run for every scenario; "
                         "'auto' = 50 for every scenario plus 1 for 'small' (default)")
    ap.add_argument("--duration", type=float, default=4.0,
                    help="measured seconds per cell; wrk rounds up to whole seconds "
                         "(default: %(default)s)")
    ap.add_argument("--siege-duration", type=float, default=30.0,
                    help="measured seconds of the idle10k and slowloris cells, while the slow "
                         "and idle connections are held (default: %(default)s)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="unmeasured seconds of small GETs at concurrency 50 after each "
                         "contender starts; 0 = none (default: %(default)s)")
    ap.add_argument("--contenders", default="direct,cclb,nginx,haproxy",
                    help="comma list from direct,cclb,nginx,haproxy; missing tools are "
                         "skipped with a note (default: %(default)s)")
    ap.add_argument("--cclb-workers", default="1,2",
                    help="run cclb once per value; N>1 passes `--workers N` and is labelled "
                         "cclb-wN; skipped with a note if cclb rejects --workers "
                         "(default: %(default)s)")
    ap.add_argument("--peer-workers", type=int, default=1,
                    help="nginx worker_processes and HAProxy nbthread for the balancers "
                         "(default: %(default)s, like single-process cclb)")
    ap.add_argument("--cclb", type=Path, default=REPO / "cclb.py",
                    help="path of cclb.py (default: the checkout's)")
    ap.add_argument("--cclb-args", default="",
                    help="extra arguments for every cclb, one string (e.g. '--max-connections "
                         "14000' for idle10k)")
    ap.add_argument("--server", type=Path, default=REPO / "server.py",
                    help="path of server.py for --backends python (default: the checkout's)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter for cclb.py and server.py (default: this one)")
    ap.add_argument("--start-timeout", type=float, default=10.0,
                    help="seconds to wait for a server's port to accept (default: %(default)s)")
    ap.add_argument("--json", type=Path, metavar="FILE",
                    help="also write results + machine info as JSON")
    ap.add_argument("--plot", type=Path, metavar="FILE.svg",
                    help="also write an SVG grouped bar chart of req/s")
    args = ap.parse_args(argv)
    bad = [s for s in csv(args.scenarios) if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s): {','.join(bad)}")
    bad = [c for c in csv(args.contenders) if c not in ("direct", "cclb", *PEERS)]
    if bad:
        ap.error(f"unknown contender(s): {','.join(bad)}")
    if args.concurrency != "auto" and not all(c.isdigit() and int(c) > 0
                                              for c in csv(args.concurrency)):
        ap.error("--concurrency must be 'auto' or a comma list of positive integers")
    if not all(w.isdigit() and int(w) > 0 for w in csv(args.cclb_workers)):
        ap.error("--cclb-workers must be a comma list of positive integers")
    if args.duration <= 0 or args.warmup < 0:
        ap.error("--duration must be > 0 and --warmup >= 0")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    """Resolve 'auto' choices against what is installed; note what gets skipped."""
    notes: list[str] = []
    backends = args.backends
    if backends == "auto":
        backends = "nginx" if procs.have("nginx") else "python"
    if backends == "nginx" and not procs.have("nginx"):
        sys.exit("--backends nginx: nginx is not installed")
    if backends == "python" and not args.server.is_file():
        sys.exit(f"--backends python: {args.server} not found")
    tool = args.tool
    if tool == "auto":
        tool = "wrk" if procs.have("wrk") else "python"
    if tool == "wrk" and not procs.have("wrk"):
        sys.exit("--tool wrk: wrk is not installed")

    contenders: list[str] = []
    for name in csv(args.contenders):
        if name == "cclb":
            contenders += ["cclb" if int(w) == 1 else f"cclb-w{w}"
                           for w in dict.fromkeys(csv(args.cclb_workers))]
        elif name in PEERS and not procs.have(name):
            notes.append(f"{name}: not installed, skipped")
        else:
            contenders.append(name)

    cells: list[tuple[Scenario, int]] = []
    for sname in csv(args.scenarios):
        s = SCENARIOS[sname]
        if backends == "python" and s.python_route is None:
            notes.append(f"{sname}: skipped, server.py has no 1 MiB route")
            continue
        if s.siege is not None and not all(c.startswith("cclb") for c in contenders):
            notes.append(f"{sname}: cclb only (the peers' connection limits are not set for it)")
        if s.concurrency is not None:
            concs = [s.concurrency]
        elif args.concurrency == "auto":
            concs = [1, 50] if sname == "small" else [50]
        else:
            concs = sorted({int(c) for c in csv(args.concurrency)})
        cells += [(s, c) for c in concs]
    return Plan(backends, tool, contenders, cells, notes)


def estimate_seconds(plan: Plan, args: argparse.Namespace) -> float:
    """Rough wall time: load time plus per-run and per-start overheads."""
    dur, warm = args.duration, args.warmup
    if plan.tool == "wrk":
        dur, warm = max(1, math.ceil(dur)), (max(1, math.ceil(warm)) if warm > 0 else 0)
    per_cell = dur + (0.4 if plan.tool == "python" else 0.15)
    return len(plan.contenders) * (len(plan.cells) * per_cell + warm + 0.5) + 2.0


# ------------------------------------------------------------------ machine info

def _first_line(cmd: list[str]) -> str | None:
    """First non-empty output line of a version command (stdout or stderr)."""
    if not shutil.which(cmd[0]):
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln.strip() for ln in (r.stdout + "\n" + r.stderr).splitlines() if ln.strip()]
    return lines[0] if lines else None


def machine_info(args: argparse.Namespace) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "contender_python": _first_line([args.python, "--version"]),
        "nginx": _first_line(["nginx", "-v"]),
        "haproxy": _first_line(["haproxy", "-v"]),
        "wrk": _first_line(["wrk", "-v"]),
        "cclb_commit": _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }


# ------------------------------------------------------------------- measuring

def probe(port: int, s: Scenario, route: str) -> str:
    """Send one request of scenario `s`; return a short verdict for the 'check' column."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(s.method, route, body=s.body or None, headers=s.headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        return f"probe failed: {type(e).__name__}"
    if resp.status != 200:
        return f"HTTP {resp.status}"
    if s.name == "gzip":
        return "gzip" if "gzip" in (resp.getheader("Content-Encoding") or "") else "no gzip"
    if s.expect_bytes is not None and route == s.route and len(data) != s.expect_bytes:
        return f"ok, {len(data)} B"
    return "ok"


def run_load(plan: Plan, port: int, req: Request, conc: int, duration: float,
             workdir: Path) -> LoadResult:
    if plan.tool == "wrk":
        return loadgen.run_wrk(port, req, conc, duration, workdir / "req.lua")
    return loadgen.run_python(port, req, conc, duration, workdir)


class Sampler:
    """Samples a process tree's thread count and resident memory every 0.2 s (their maximum)."""

    def __init__(self, pids: list[int]) -> None:
        import threading
        self.pids = pids
        self.threads = 0
        self.rss_kib = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            threads, rss = procs.tree_threads_rss(self.pids)
            self.threads, self.rss_kib = max(self.threads, threads), max(self.rss_kib, rss)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(2)


def run_siege(plan: Plan, args: argparse.Namespace, s: Scenario, port: int, route: str,
              pids: list[int], req: Request, conc: int, workdir: Path,
              cell: Cell) -> LoadResult:
    """Hold the scenario's slow and idle connections (bench/siege.py) while the load runs."""
    assert s.siege is not None
    idle, slowloris, slow_body = s.siege
    seconds = args.siege_duration
    hold = max(1, math.ceil(seconds)) + 3
    siege = subprocess.Popen(
        [args.python, str(Path(__file__).resolve().parent / "siege.py"), "--port", str(port),
         "--route", route, "--idle", str(idle), "--slowloris", str(slowloris),
         "--slow-body", str(slow_body), "--duration", str(hold), "--ramp-timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert siege.stdout is not None
        ready = siege.stdout.readline().strip()
        if not ready.startswith("ready"):
            raise RuntimeError(f"siege did not start: {ready or siege.stderr.read()[-300:]}")
        sampler = Sampler(pids)
        try:
            cpu0 = procs.tree_cpu_seconds(pids)
            result = run_load(plan, port, req, conc, seconds, workdir)
            cell.cpu_s = procs.tree_cpu_seconds(pids) - cpu0
        finally:
            sampler.stop()
        summary_line = siege.stdout.readline().strip()
        siege.wait(hold + 30)
    finally:
        if siege.poll() is None:
            siege.kill()
            siege.wait()
    held = ready.removeprefix("ready ")
    cell.check = (f"{cell.check}; held {held}; max {sampler.threads} threads, "
                  f"{sampler.rss_kib / 1024:.0f} MiB RSS")
    cell.detail = summary_line
    return result


def measure(plan: Plan, args: argparse.Namespace, name: str, port: int, pids: list[int],
            backend_pids: list[int], workdir: Path, cells: list[Cell]) -> None:
    """Run every cell of the plan against one started contender, appending to `cells`."""
    if args.warmup > 0:  # fill connection pools, caches, allocators before measuring
        small = SCENARIOS["small"]
        warm = Request("GET", plan.route(small) or small.route, {})
        try:
            run_load(plan, port, warm, 50, args.warmup, workdir)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            print(f"  {name}: warm-up failed: {e}", flush=True)
    for s, conc in plan.cells:
        route = plan.route(s)
        assert route is not None
        cell = Cell(s.name, route, conc, name, plan.tool)
        cell.check = probe(port, s, route)
        req = Request(s.method, route, dict(s.headers), s.body)
        if s.siege is not None and not name.startswith("cclb"):
            continue  # noted in the plan
        try:
            cpu0, bcpu0 = procs.tree_cpu_seconds(pids), procs.tree_cpu_seconds(backend_pids)
            if s.siege is not None:
                res = run_siege(plan, args, s, port, route, pids, req, conc, workdir, cell)
            else:
                res = run_load(plan, port, req, conc, args.duration, workdir)
                cell.cpu_s = procs.tree_cpu_seconds(pids) - cpu0
            cell.backend_cpu_s = procs.tree_cpu_seconds(backend_pids) - bcpu0
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
            cell.check = f"load failed: {e}"[:200]
            cells.append(cell)
            print(f"  {s.name:8} c={conc:<3} {name:8} FAILED: {cell.check}", flush=True)
            continue
        cell.requests, cell.duration_s, cell.rps = res.requests, res.duration_s, res.rps
        cell.p50_ms, cell.p99_ms, cell.errors, cell.detail = (
            res.p50_ms, res.p99_ms, res.errors, res.detail)
        print(f"  {s.name:8} c={conc:<3} {name:8} {res.rps:9.0f} req/s  p99 {res.p99_ms:7.2f} ms"
              f"  err {res.errors:<5} cpu {cell.us_per_req:6.0f} us/req  [{cell.check}]",
              flush=True)
        cells.append(cell)


def start_contender(name: str, args: argparse.Namespace, tmp: Path,
                    backend_ports: list[int]) -> Managed:
    port = procs.free_port()
    d = tmp / name
    d.mkdir(exist_ok=True)
    if name == "nginx":
        m = procs.nginx_balancer(d, port, backend_ports, args.peer_workers)
    elif name == "haproxy":
        m = procs.haproxy_balancer(d, port, backend_ports, args.peer_workers)
    else:
        workers = 1 if name == "cclb" else int(name.removeprefix("cclb-w"))
        if not args.cclb.is_file():
            raise StartError(f"{args.cclb} not found")
        m = procs.cclb(args.python, args.cclb, port, backend_ports, workers, d / "out.log",
                       shlex.split(args.cclb_args))
    m.start(args.start_timeout)
    return m


def run(args: argparse.Namespace, plan: Plan, report: Report) -> None:
    """Start backends, then each contender in turn; append cells and notes to report."""
    tmp = Path(tempfile.mkdtemp(prefix="cclb-bench-"))
    os.chmod(tmp, 0o755)
    running: list[Managed] = []
    try:
        backends: list[Managed] = []
        for i in range(3):
            port, name = procs.free_port(), f"backend{i + 1}"
            if plan.backends == "nginx":
                m = procs.nginx_backend(tmp / name, port, name)
            else:
                m = procs.python_backend(args.python, args.server, port, name,
                                         tmp / f"{name}.log")
            running.append(m)
            m.start(args.start_timeout)
            backends.append(m)
        bports = [b.port for b in backends]
        bpids = [b.pid for b in backends]
        print(f"backends ({plan.backends}) on ports {bports}", flush=True)

        for name in plan.contenders:
            if name == "direct":
                measure(plan, args, name, bports[0], [bpids[0]], bpids, tmp, report.cells)
                continue
            try:
                m = start_contender(name, args, tmp, bports)
            except StartError as e:
                msg = str(e)
                if name.startswith("cclb-w") and "unrecognized arguments" in msg:
                    note = f"{name}: skipped, this cclb has no --workers option"
                else:
                    note = f"{name} failed to start: {msg}"[:400]
                report.notes.append(note)
                print("  " + note, flush=True)
                continue
            running.append(m)
            print(f"{name} on port {m.port} (pid {m.pid})", flush=True)
            try:
                measure(plan, args, name, m.port, [m.pid], bpids, tmp, report.cells)
                if not m.alive():
                    report.notes.append(f"{name} died during the run: {m.log_tail()}")
            finally:
                m.stop()
                running.remove(m)
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a 2nd Ctrl-C must not
        try:                                                     # interrupt the cleanup
            for m in reversed(running):
                m.stop()
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    plan = make_plan(args)
    est = estimate_seconds(plan, args)
    cell_names = ", ".join(f"{s.name}@{c}" for s, c in plan.cells)
    print(f"cclb bench: backends={plan.backends} tool={plan.tool} "
          f"contenders={','.join(plan.contenders)}\ncells: {cell_names}\n"
          f"{len(plan.cells) * len(plan.contenders)} runs x {args.duration:g}s "
          f"(+{args.warmup:g}s warm-up per contender): estimated {est:.0f} s", flush=True)
    for n in plan.notes:
        print("  note: " + n)
    report = Report(machine_info(args), {
        "backends": plan.backends, "tool": plan.tool, "contenders": plan.contenders,
        "cells": [[s.name, plan.route(s), c] for s, c in plan.cells],
        "duration_s": args.duration, "warmup_s": args.warmup,
        "peer_workers": args.peer_workers, "cclb": str(args.cclb)}, notes=list(plan.notes))
    t0 = time.monotonic()
    code = 0
    try:
        run(args, plan, report)
    except KeyboardInterrupt:
        print("\ninterrupted: all started processes stopped; partial results below")
        report.notes.append("run interrupted: partial results")
        code = 130
    except StartError as e:
        print(f"backend failed to start: {e}")
        report.notes.append(f"backend failed to start: {e}")
        code = 1
    report.config["elapsed_s"] = round(time.monotonic() - t0, 1)
    add_ratios(report.cells)
    print()
    print(table(report.cells) if report.cells else "(no results)")
    for n in report.notes:
        print("note: " + n)
    if plan.backends == "python":
        print("note: python backends: routes are the closest server.py ones (see 'route'); "
              "/users is ~280 B, just over the 256 B gzip minimum of nginx and cclb")
    print("note: CPU = contender's whole process tree; for 'direct' it is the one backend. "
          "'check' = probe of one request (gzip: was the answer compressed).")
    print(f"elapsed {report.config['elapsed_s']:.0f} s")
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        title = f"cclb vs nginx vs HAProxy ({plan.tool}, {plan.backends} backends)"
        args.plot.write_text(svg_chart(report.cells, title))
        print(f"wrote {args.plot}")
    return code


if __name__ == "__main__":
    sys.exit(main())

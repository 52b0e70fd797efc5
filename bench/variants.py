"""Compare cclb variants (options or checkouts) in one run, alternating, over several rounds.

``bench/run.py`` measures one cclb against nginx and HAProxy; this script asks
a narrower question: how much does an option (``--upstream-reuse safe`` vs
``always``) or a change (this checkout vs an older one) cost?  Each round runs
``bench/run.py`` once per variant (fresh backends, one cclb process, the
chosen scenarios at one concurrency), in an order that rotates every round so
that drift on a shared machine (other load, CPU frequency) spreads over all
variants; the summary gives each variant's median req/s, p50/p99 and CPU per
request over the rounds, and its ratio to the first variant.

A variant is ``NAME=PATH/cclb.py[ extra cclb args]``; a small wrapper script
adds the extra arguments.  Example (the upstream-reuse measurement of the
README)::

    python3 bench/variants.py --rounds 3 \\
        "safe=cclb.py --upstream-reuse safe" "always=cclb.py --upstream-reuse always"

Standard library only; the load generator and backends are run.py's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

WRAPPER = """import os, sys
os.execv(sys.executable, [sys.executable, {real!r}, *sys.argv[1:], *{extra!r}])
"""


def parse_variant(text: str, tmp: Path) -> tuple[str, Path]:
    """``NAME=PATH [ARGS...]`` -> (name, a cclb.py-like script that adds ARGS)."""
    name, _, rest = text.partition("=")
    words = shlex.split(rest)
    if not name or not words:
        raise SystemExit(f"bad variant {text!r}: want NAME=PATH/cclb.py [args]")
    real = Path(words[0]).resolve()
    if not real.is_file():
        raise SystemExit(f"{real} not found")
    wrapper_dir = tmp / name
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "cclb.py"
    wrapper.write_text(WRAPPER.format(real=str(real), extra=words[1:]))
    return name, wrapper


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="NAME=PATH/cclb.py [extra args] (quote it)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scenarios", default="small,close")
    ap.add_argument("--concurrency", default="50")
    ap.add_argument("--duration", default="4")
    ap.add_argument("--tool", default="python")
    ap.add_argument("--backends", default="python")
    ap.add_argument("--siege-duration", default="30")
    args = ap.parse_args(argv)
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="cclb-variants-") as tmpdir:
        tmp = Path(tmpdir)
        variants = [parse_variant(text, tmp) for text in args.variants]
        for round_ in range(args.rounds):
            shift = round_ % len(variants)
            for name, wrapper in variants[shift:] + variants[:shift]:
                out = tmp / f"{name}-{round_}.json"
                cmd = [sys.executable, str(HERE / "run.py"), "--tool", args.tool,
                       "--backends", args.backends, "--contenders", "cclb", "--cclb-workers", "1",
                       "--scenarios", args.scenarios, "--concurrency", args.concurrency,
                       "--duration", args.duration, "--siege-duration", args.siege_duration,
                       "--cclb", str(wrapper), "--json", str(out)]
                print(f"round {round_ + 1}/{args.rounds}: {name}", flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                for cell in json.loads(out.read_text())["results"]:
                    results.setdefault((cell["scenario"], name), []).append(cell)
    names = [name for name, _ in variants]
    scenarios = list(dict.fromkeys(scenario for scenario, _ in results))
    print(f"\nmedians over {args.rounds} rounds (concurrency {args.concurrency}, "
          f"{args.duration} s per cell); ratio = req/s / {names[0]}'s")
    print(f"{'scenario':9} {'variant':10} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'us/req':>7} {'errors':>6} {'ratio':>6}  rounds req/s")
    for scenario in scenarios:
        base = None
        for name in names:
            cells = results.get((scenario, name), [])
            if not cells:
                continue
            rps = statistics.median(c["rps"] for c in cells)
            base = base or rps
            p50 = statistics.median(c["p50_ms"] for c in cells)
            p99 = statistics.median(c["p99_ms"] for c in cells)
            us = statistics.median(c.get("cpu_us_per_req") or 0.0 for c in cells)
            errors = sum(c["errors"] for c in cells)
            each = " ".join(f"{c['rps']:.0f}" for c in cells)
            print(f"{scenario:9} {name:10} {rps:8.0f} {p50:7.2f} {p99:7.2f} {us:7.0f} "
                  f"{errors:6} {rps / base:6.2f}  {each}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

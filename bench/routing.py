#!/usr/bin/env python3
"""Micro-benchmark: ``routing.decide`` against a table of N routes (issue 10: < 20 µs for 100).

    python3 bench/routing.py              # 100 routes, the usual cases
    python3 bench/routing.py --routes 500 --repeat 20000

Each case is timed with ``timeit`` (best of 5 runs, per call).  The table
mixes what configurations do: exact hosts, wildcards, path prefixes, methods
and header matches.  "miss" is the worst case: a host-less request path that
no route takes (every host-less and wildcard route is tried).
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from http11 import Fields  # noqa: E402
from routing import decide, parse_routes  # noqa: E402


def build_table(count: int):  # type: ignore[no-untyped-def]
    routes = []
    for i in range(count):
        kind = i % 5
        if kind == 0:
            routes.append({"host": f"svc{i}.example.com", "pool": "api"})
        elif kind == 1:
            routes.append({"host": f"*.zone{i}.example.org", "path_prefix": f"/p{i}/", "pool": "api"})
        elif kind == 2:
            routes.append({"path_prefix": f"/app{i}/", "strip_prefix": True, "pool": "api"})
        elif kind == 3:
            routes.append({"path_prefix": f"/m{i}/", "methods": ["POST", "PUT"], "pool": "api"})
        else:
            routes.append({"path_prefix": f"/h{i}/", "headers": {"X-Canary": "1"}, "pool": "api"})
    return parse_routes(routes, ["default", "api"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=20000)
    args = parser.parse_args()
    table = build_table(args.routes)
    last = args.routes - 1 - (args.routes - 1) % 5 + 2  # the last path-prefix route
    fields = Fields([("Host", "www.example.net"), ("User-Agent", "bench"), ("Accept", "*/*"),
                     ("X-Canary", "0")])
    cases = {
        "exact host (first)": ("GET", "/x", "svc0.example.com"),
        "exact host (last)": ("GET", "/x", f"svc{args.routes - 5}.example.com"),
        "last path prefix": ("GET", f"/app{last}/users?id=3", "www.example.net"),
        "miss (default pool)": ("GET", "/nothing/here", "www.example.net"),
        "no routes at all": None,
    }
    empty = parse_routes([], ["default"])
    print(f"routing.decide, {args.routes} routes, best of 5 x {args.repeat} calls")
    for name, case in cases.items():
        if case is None:
            call = lambda: decide("GET", "/x", "www.example.net", fields, "10.0.0.1", empty)  # noqa: E731
        else:
            method, target, host = case
            call = lambda: decide(method, target, host, fields, "10.0.0.1", table)  # noqa: E731,B023
        best = min(timeit.repeat(call, number=args.repeat, repeat=5)) / args.repeat
        print(f"  {name:24} {best * 1e6:7.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

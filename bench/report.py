"""Result model and output: the printed table, the JSON file and the SVG bar chart."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path


@dataclass
class Cell:
    """One measured (scenario, concurrency, contender) combination."""

    scenario: str
    route: str
    concurrency: int
    contender: str
    tool: str
    requests: int = 0
    duration_s: float = 0.0
    rps: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    errors: int = 0
    cpu_s: float = 0.0
    backend_cpu_s: float = 0.0
    check: str = ""
    detail: str = ""
    vs_nginx: float | None = None
    vs_haproxy: float | None = None

    @property
    def cpu_per_10k(self) -> float:
        """Contender CPU seconds per 10,000 completed requests."""
        return self.cpu_s / self.requests * 1e4 if self.requests else float("nan")

    @property
    def us_per_req(self) -> float:
        """Contender CPU microseconds per completed request."""
        return self.cpu_s / self.requests * 1e6 if self.requests else float("nan")

    def as_json(self) -> dict:
        d = asdict(self)
        d["cpu_s_per_10k"] = _num(self.cpu_per_10k)
        d["cpu_us_per_req"] = _num(self.us_per_req)
        for k in ("p50_ms", "p99_ms", "cpu_s", "backend_cpu_s", "rps", "duration_s"):
            d[k] = _num(d[k])
        return d


@dataclass
class Report:
    """Everything one run produced."""

    machine: dict
    config: dict
    cells: list[Cell] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 4)


def is_cclb(name: str) -> bool:
    return name == "cclb" or name.startswith("cclb-")


def add_ratios(cells: list[Cell]) -> None:
    """Fill vs_nginx / vs_haproxy on cclb rows: cclb req/s over the peer's, same cell."""
    rps = {(c.scenario, c.concurrency, c.contender): c.rps for c in cells if c.requests}
    for c in cells:
        if not is_cclb(c.contender) or not c.requests:
            continue
        for peer, attr in (("nginx", "vs_nginx"), ("haproxy", "vs_haproxy")):
            other = rps.get((c.scenario, c.concurrency, peer))
            if other:
                setattr(c, attr, round(c.rps / other, 3))


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(cells: list[Cell]) -> str:
    """The result table as aligned plain text."""
    cols = ["scenario", "route", "conc", "contender", "req/s", "p50 ms", "p99 ms", "errors",
            "CPU s/10k", "us/req", "vs nginx", "vs haproxy", "check"]
    rows = [cols]
    for c in cells:
        ran = c.requests > 0
        rows.append([
            c.scenario, c.route, str(c.concurrency), c.contender,
            _f(c.rps, ".0f") if ran else "-",
            _f(c.p50_ms, ".2f") if ran else "-", _f(c.p99_ms, ".2f") if ran else "-",
            str(c.errors), _f(c.cpu_per_10k, ".3f"), _f(c.us_per_req, ".0f"),
            _f(c.vs_nginx, ".2f"), _f(c.vs_haproxy, ".2f"), c.check])
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    left = {0, 1, 3, 12}
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(v.ljust(w) if i in left else v.rjust(w)
                               for i, (v, w) in enumerate(zip(r, widths, strict=True))).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def write_json(report: Report, path: Path) -> None:
    data = {"machine": report.machine, "config": report.config,
            "results": [c.as_json() for c in report.cells], "notes": report.notes}
    path.write_text(json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------- SVG

COLORS = {"direct": "#9e9e9e", "cclb": "#1f77b4", "nginx": "#2ca02c", "haproxy": "#d62728"}
EXTRA = ["#17becf", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


def _color(name: str, index: int) -> str:
    """Fixed colour per contender; cclb variants get extra shades."""
    if name in COLORS:
        return COLORS[name]
    return "#6baed6" if name.startswith("cclb-") else EXTRA[index % len(EXTRA)]


def _nice_step(top: float, ticks: int = 5) -> float:
    raw = top / ticks
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def svg_chart(cells: list[Cell], title: str) -> str:
    """Grouped bar chart (req/s) per scenario@concurrency, one bar per contender."""
    groups: list[tuple[str, int]] = []
    contenders: list[str] = []
    for c in cells:
        if (c.scenario, c.concurrency) not in groups:
            groups.append((c.scenario, c.concurrency))
        if c.contender not in contenders:
            contenders.append(c.contender)
    val = {(c.scenario, c.concurrency, c.contender): c.rps for c in cells if c.requests}
    top = max(val.values(), default=1.0)
    step = _nice_step(top)
    ymax = step * math.ceil(top / step) if top > 0 else 1.0
    bar, gap = 16, 28
    gw = bar * len(contenders) + gap
    left, right, top_m, bottom = 80, 150, 50, 70
    ph = 320
    width = left + max(1, len(groups)) * gw + right
    height = top_m + ph + bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">'
           f'{escape(title)}</text>']
    y0 = top_m + ph
    # Y axis with grid lines and labels.
    tick = 0.0
    while tick <= ymax + 1e-9:
        y = y0 - tick / ymax * ph
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" '
                   f'stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:,.0f}</text>')
        tick += step
    out.append(f'<line x1="{left}" y1="{top_m}" x2="{left}" y2="{y0}" stroke="black"/>')
    out.append(f'<line x1="{left}" y1="{y0}" x2="{width - right}" y2="{y0}" stroke="black"/>')
    out.append(f'<text transform="translate(18,{top_m + ph / 2}) rotate(-90)" '
               f'text-anchor="middle" font-size="13">requests per second</text>')
    out.append(f'<text x="{left + len(groups) * gw / 2}" y="{height - 14}" '
               f'text-anchor="middle" font-size="13">scenario @ concurrency</text>')
    # Bars.
    for gi, (scen, conc) in enumerate(groups):
        gx = left + gap / 2 + gi * gw
        for ci, name in enumerate(contenders):
            v = val.get((scen, conc, name))
            if v is None:
                continue
            h = v / ymax * ph
            x = gx + ci * bar
            out.append(f'<rect x="{x:.1f}" y="{y0 - h:.1f}" width="{bar - 2}" height="{h:.1f}" '
                       f'fill="{_color(name, ci)}"><title>{escape(name)} '
                       f'{escape(scen)}@{conc}: {v:,.0f} req/s</title></rect>')
            out.append(f'<text transform="translate({x + bar / 2 + 3:.1f},{y0 - h - 3:.1f}) '
                       f'rotate(-90)" font-size="9">{v:,.0f}</text>')
        out.append(f'<text x="{gx + len(contenders) * bar / 2:.1f}" y="{y0 + 18}" '
                   f'text-anchor="middle">{escape(scen)}@{conc}</text>')
    # Legend.
    lx = width - right + 15
    for ci, name in enumerate(contenders):
        ly = top_m + ci * 18
        out.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" '
                   f'fill="{_color(name, ci)}"/>')
        out.append(f'<text x="{lx + 18}" y="{ly + 10}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"

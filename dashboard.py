"""The admin dashboard: one self-contained HTML page (no external assets).

It polls ``/status`` every second and redraws a table of the backends with
their state, traffic and last health check, plus requests per second
computed from successive polls.
"""

PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cclb dashboard</title>
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:2rem;color:#222;background:#fafafa}
 h1{font-size:1.3rem;margin:0 0 .2rem} .sub{color:#666;margin-bottom:1rem}
 table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 3px #0002}
 th,td{padding:.45rem .7rem;text-align:left;border-bottom:1px solid #eee;white-space:nowrap}
 th{background:#f0f0f0;font-weight:600} td.n{text-align:right;font-variant-numeric:tabular-nums}
 .state{display:inline-block;padding:.1rem .5rem;border-radius:1rem;color:#fff;font-weight:600}
 .up{background:#2a8f3c}.down{background:#c0392b}.drain{background:#d68910}.maint{background:#7f8c8d}
 .bar{height:.6rem;background:#3b7dd8;border-radius:.3rem;min-width:1px}
 #error{color:#c0392b;margin-top:1rem}
</style></head><body>
<h1>cclb</h1>
<div class="sub" id="summary">loading&hellip;</div>
<table><thead><tr><th>#</th><th>backend</th><th>state</th><th>for</th><th>weight</th>
<th>in flight</th><th>req/s</th><th></th><th>requests</th><th>2xx</th><th>4xx</th><th>5xx</th>
<th>failures</th><th>retries</th><th>last check</th></tr></thead>
<tbody id="rows"></tbody></table>
<div id="error"></div>
<script>
"use strict";
let previous = null;
function cell(text, cls) { const td = document.createElement("td");
  td.textContent = text; if (cls) td.className = cls; return td; }
function duration(s) { return s < 90 ? Math.round(s) + "s" : s < 5400 ? Math.round(s / 60) + "m"
  : Math.round(s / 3600) + "h"; }
async function refresh() {
  try {
    const response = await fetch("status", {cache: "no-store"});
    const status = await response.json();
    const rows = document.getElementById("rows");
    const rates = {};
    let maxRate = 1, total = 0;
    for (const b of status.backends) {
      const before = previous && previous.backends.find(p => p.id === b.id);
      const dt = previous ? status.time - previous.time : 0;
      rates[b.id] = before && dt > 0 ? Math.max(0, (b.requests - before.requests) / dt) : 0;
      maxRate = Math.max(maxRate, rates[b.id]); total += rates[b.id];
    }
    rows.replaceChildren(...status.backends.map(b => {
      const tr = document.createElement("tr");
      const state = cell(""); const badge = document.createElement("span");
      badge.className = "state " + b.state; badge.textContent = b.state; state.appendChild(badge);
      const bar = cell(""); const fill = document.createElement("div"); fill.className = "bar";
      fill.style.width = (100 * rates[b.id] / maxRate) + "px"; bar.appendChild(fill);
      const r = b.responses;
      const check = b.last_check ? b.last_check + (b.last_check_latency_ms != null
        ? " (" + b.last_check_latency_ms + " ms)" : "") : "-";
      tr.append(cell(b.id), cell(b.url), state, cell(duration(b.seconds_in_state)),
        cell(b.weight, "n"), cell(b.in_flight, "n"), cell(rates[b.id].toFixed(1), "n"), bar,
        cell(b.requests, "n"), cell(r["2xx"] || 0, "n"), cell(r["4xx"] || 0, "n"),
        cell(r["5xx"] || 0, "n"), cell(b.failures, "n"), cell(b.retries, "n"), cell(check));
      return tr;
    }));
    const up = status.backends.filter(b => b.state === "up").length;
    document.getElementById("summary").textContent = status.policy + " \\u00b7 " + up + "/" +
      status.backends.length + " backends up \\u00b7 " + total.toFixed(1) + " req/s \\u00b7 updated " +
      new Date(status.time * 1000).toLocaleTimeString();
    document.getElementById("error").textContent = "";
    previous = status;
  } catch (error) {
    document.getElementById("error").textContent = "cannot reach cclb: " + error;
  }
}
refresh();
setInterval(refresh, 1000);
</script></body></html>
"""

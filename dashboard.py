"""The admin dashboard: one self-contained HTML page (no external assets, no JS library).

It polls ``/status`` every second and draws (live rates are computed over the
polls of the last 5 seconds; before that, the server's last interval):

- a summary line and a frontend row: requests/s, latency and error rate of
  the last interval, answers given without a backend (``unrouted``, by
  status) and, when ``/status`` has the optional ``"frontend"`` key (the
  proxy's own numbers), its open connections and rejections by reason;
- the last 15 minutes as inline SVG charts (requests/s, p50 and p99
  latency, error rate), in total and per backend, from ``/status``
  ``"history"`` (kept by the server: the charts and rates are there from
  the first paint);
- a table of the backends with drain / maint / ready buttons.  The buttons
  POST ``backends/<id>/<action>`` from this origin with ``Content-Type:
  application/json`` (what the admin API's cross-site rules ask for); when
  a write answers 401 the page asks for the admin token once and keeps it
  in memory only (``Authorization: Bearer``).

The layout fits 1280 px without horizontal scrolling and turns the table
into cards on a phone.
"""

PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cclb dashboard</title>
<style>
 *{box-sizing:border-box}
 body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem 2rem;color:#222;background:#fafafa}
 h1{font-size:1.3rem;margin:0 0 .2rem} h2{font-size:1rem;margin:1.2rem 0 .5rem;color:#444}
 .sub{color:#666}
 .tiles{display:flex;flex-wrap:wrap;gap:.6rem}
 .tile{background:#fff;box-shadow:0 1px 3px #0002;border-radius:.4rem;padding:.45rem .8rem;min-width:8.5rem}
 .tile b{display:block;font-size:1.15rem;font-variant-numeric:tabular-nums} .tile span{color:#666;font-size:.8rem}
 .charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(270px,1fr));gap:.8rem}
 .chart{background:#fff;box-shadow:0 1px 3px #0002;border-radius:.4rem;padding:.4rem .5rem .2rem}
 .chart h3{font-size:.85rem;margin:0;font-weight:600;color:#444}
 .chart svg{display:block;width:100%;height:auto}
 .chart path{fill:none;stroke-width:1.4;stroke-linejoin:round;stroke-opacity:.85} .chart path.total{stroke:#222;stroke-width:2.2}
 .chart text{font-size:10px;fill:#777} .chart line{stroke:#eee}
 .legend{display:flex;flex-wrap:wrap;gap:.3rem 1rem;margin:.5rem 0 0;font-size:.85rem;color:#444}
 .legend i{display:inline-block;width:1.2rem;height:.25rem;vertical-align:middle;margin-right:.3rem;border-radius:.1rem}
 table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 3px #0002}
 th,td{padding:.4rem .5rem;text-align:left;border-bottom:1px solid #eee}
 th{background:#f0f0f0;font-weight:600;white-space:nowrap} td.n{text-align:right;font-variant-numeric:tabular-nums}
 td.url{white-space:nowrap} td.check{max-width:14rem;overflow-wrap:anywhere}
 .state{display:inline-block;padding:.1rem .5rem;border-radius:1rem;color:#fff;font-weight:600}
 .for{color:#666;font-size:.8rem;margin-left:.3rem;white-space:nowrap}
 .up{background:#2a8f3c}.down{background:#c0392b}.drain{background:#d68910}.maint{background:#7f8c8d}
 .bar{height:.35rem;background:#3b7dd8;border-radius:.2rem;min-width:1px;margin-top:.15rem;margin-left:auto}
 .actions{white-space:nowrap}
 button{font:inherit;font-size:.8rem;padding:.15rem .5rem;margin:0 .1rem;border:1px solid #bbb;
  border-radius:.3rem;background:#fff;cursor:pointer} button:disabled{opacity:.4;cursor:default}
 button:hover:not(:disabled){background:#eef3fb}
 #error,#note.bad{color:#c0392b} #error{margin-top:1rem} #note{color:#2a6f3c;margin-top:.4rem;min-height:1.2em}
 @media (max-width:760px){
  body{margin:.8rem} .tile{min-width:0;flex:1 1 40%}
  table,tbody,tr,td{display:block;width:100%} thead{display:none}
  table{box-shadow:none;background:none}
  tr{background:#fff;box-shadow:0 1px 3px #0002;border-radius:.4rem;margin-bottom:.7rem;padding:.3rem .2rem}
  td{display:flex;justify-content:space-between;gap:1rem;border:0;padding:.2rem .6rem;text-align:right}
  td.n{text-align:right} td.url,td.check{max-width:none;white-space:normal;overflow-wrap:anywhere}
  td::before{content:attr(data-label);color:#666;text-align:left;white-space:nowrap}
  .bar{display:none}
 }
</style></head><body>
<h1>cclb</h1>
<div class="sub" id="summary">loading&hellip;</div>
<h2>Frontend</h2>
<div class="tiles" id="frontend">
 <div class="tile"><b id="total-rps">-</b><span>requests/s (last interval)</span></div>
 <div class="tile"><b id="total-p50">-</b><span>p50 latency</span></div>
 <div class="tile"><b id="total-p99">-</b><span>p99 latency</span></div>
 <div class="tile"><b id="total-errors">-</b><span>error rate (5xx)</span></div>
 <div class="tile"><b id="unrouted">0</b><span>answered without a backend (503&hellip;), since start</span></div>
 <!-- Filled from the optional /status "frontend" key (the proxy's own numbers); hidden without it. -->
 <div class="tile" id="frontend-open" hidden><b id="open-connections">-</b><span>open connections</span></div>
 <div class="tile" id="frontend-rejected" hidden><b id="rejected">-</b><span>rejected, by reason</span></div>
</div>
<h2>Last 15 minutes</h2>
<div class="charts" id="charts"></div>
<div class="legend" id="legend"></div>
<h2>Backends</h2>
<table><thead><tr><th>#</th><th>pool</th><th>backend</th><th>state</th><th>weight</th><th>in flight</th>
<th>req/s</th><th>requests</th><th>2xx</th><th>4xx</th><th>5xx</th><th>failures</th><th>retries</th>
<th>last check</th><th>admin</th></tr></thead>
<tbody id="rows"></tbody></table>
<div id="note"></div>
<div id="routes-section" hidden>
<h2>Routes</h2>
<table><thead><tr><th>#</th><th>route</th><th>match</th><th>action</th><th>requests</th>
<th>403</th><th>429</th></tr></thead>
<tbody id="routes"></tbody></table>
</div>
<div id="error"></div>
<script>
"use strict";
const SVG_NS = "http" + "://www.w3.org/2000/svg";  // a namespace name, never fetched
const COLORS = ["#3b7dd8", "#e67e22", "#8e44ad", "#16a085", "#c0392b", "#b7950b", "#2e86c1",
  "#7f8c8d"];
const CHARTS = [["rps", "requests/s", 1], ["p50_ms", "p50 latency (ms)", 1],
  ["p99_ms", "p99 latency (ms)", 1], ["error_rate", "error rate (%)", 100]];
const ACTIONS = ["drain", "maint", "ready"];
const RATE_WINDOW = 5;  // seconds of polls the live req/s is computed over
const polls = [];  // the /status documents of the last RATE_WINDOW seconds, oldest first
let token = null;  // the admin token: asked for once, when a write answers 401; memory only
const colorOf = {};  // backend URL -> its line color, stable while the page is open

function cell(text, cls, label) { const td = document.createElement("td");
  td.textContent = text; if (cls) td.className = cls; if (label) td.dataset.label = label; return td; }
function duration(s) { return s < 90 ? Math.round(s) + "s" : s < 5400 ? Math.round(s / 60) + "m"
  : Math.round(s / 3600) + "h"; }
function last(values) { for (let i = values.length - 1; i >= 0; i--) if (values[i] != null) return values[i];
  return null; }
function ms(value) { return value == null ? "-" : value < 10 ? value.toFixed(2) + " ms"
  : value < 1000 ? value.toFixed(0) + " ms" : (value / 1000).toFixed(2) + " s"; }
function color(url) { if (!(url in colorOf)) colorOf[url] = COLORS[Object.keys(colorOf).length
  % COLORS.length]; return colorOf[url]; }
function svg(name, attributes) { const node = document.createElementNS(SVG_NS, name);
  for (const key in attributes) node.setAttribute(key, attributes[key]); return node; }
function nice(max) { if (!(max > 0)) return 1; const p = Math.pow(10, Math.floor(Math.log10(max)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= max) return m * p; return 10 * p; }
function label(value) { return Number.isInteger(value) ? String(value) : value >= 10
  ? value.toFixed(1) : +value.toPrecision(2) + ""; }

// One chart: the total (dark, thick) and one line per backend, over the history's window.
function chart(history, end, key, title, scale) {
  const W = 320, H = 130, L = 34, R = 6, T = 8, B = 18;
  const box = document.createElement("div"); box.className = "chart";
  const heading = document.createElement("h3"); heading.textContent = title; box.appendChild(heading);
  const root = svg("svg", {viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": title});
  root.dataset.series = key;
  const lines = [["total", history.total[key]]];
  for (const url in history.backends) lines.push([url, history.backends[url][key]]);
  let max = 0;
  for (const [, values] of lines) for (const v of values) if (v != null) max = Math.max(max, v * scale);
  const top = nice(max), span = history.size * history.interval, start = end - span;
  const x = t => L + (W - L - R) * Math.max(0, t - start) / span;
  const y = v => T + (H - T - B) * (1 - v * scale / top);
  for (const f of [0, 0.5, 1]) {
    const h = T + (H - T - B) * (1 - f);
    root.appendChild(svg("line", {x1: L, x2: W - R, y1: h, y2: h}));
    const t = svg("text", {x: L - 4, y: h + 3, "text-anchor": "end"}); t.textContent = label(top * f);
    root.appendChild(t);
  }
  for (const [text, at, anchor] of [["-15 min", L, "start"], ["now", W - R, "end"]]) {
    const t = svg("text", {x: at, y: H - 4, "text-anchor": anchor}); t.textContent = text;
    root.appendChild(t);
  }
  if (!history.time.length) {
    const t = svg("text", {x: (L + W) / 2, y: H / 2, "text-anchor": "middle"});
    t.textContent = "collecting: a point every " + history.interval + " s"; root.appendChild(t);
  }
  // Total last, so it is drawn on top.
  for (const [name, values] of lines.slice(1).concat(lines.slice(0, 1))) {
    let d = "", pen = "M";
    values.forEach((v, i) => {
      if (v == null) { pen = "M"; return; }
      d += pen + x(history.time[i]).toFixed(1) + " " + y(v).toFixed(1) + " "; pen = "L";
    });
    if (!d) continue;
    const path = svg("path", {d: d});
    if (name === "total") path.setAttribute("class", "total");
    else path.setAttribute("stroke", color(name));
    path.dataset.name = name;
    root.appendChild(path);
  }
  box.appendChild(root);
  return box;
}

function drawHistory(history, end) {
  document.getElementById("charts").replaceChildren(
    ...CHARTS.map(([key, title, scale]) => chart(history, end, key, title, scale)));
  const legend = [["total", "#222"]].concat(Object.keys(history.backends).map(u => [u, color(u)]));
  document.getElementById("legend").replaceChildren(...legend.map(([name, c]) => {
    const item = document.createElement("span"); const swatch = document.createElement("i");
    swatch.style.background = c; item.append(swatch, name); return item; }));
  const total = history.total;
  document.getElementById("total-rps").textContent =
    last(total.rps) == null ? "-" : last(total.rps).toFixed(1);
  document.getElementById("total-p50").textContent = ms(last(total.p50_ms));
  document.getElementById("total-p99").textContent = ms(last(total.p99_ms));
  const errors = last(total.error_rate);
  document.getElementById("total-errors").textContent = errors == null ? "-"
    : (100 * errors).toFixed(errors < 0.1 ? 2 : 1) + " %";
}

// The proxy's own numbers, only when /status has them (optional "frontend" key).
function drawFrontend(frontend, unrouted) {
  const codes = Object.keys(unrouted).sort();
  document.getElementById("unrouted").textContent = codes.length
    ? codes.map(code => code + ": " + unrouted[code]).join(", ") : "0";
  const open = document.getElementById("frontend-open");
  const rejected = document.getElementById("frontend-rejected");
  open.hidden = !(frontend && frontend.open_connections != null);
  rejected.hidden = !(frontend && frontend.rejected);
  if (!open.hidden) document.getElementById("open-connections").textContent = frontend.open_connections;
  if (!rejected.hidden) {
    const reasons = Object.keys(frontend.rejected).sort();
    document.getElementById("rejected").textContent = reasons.length
      ? reasons.map(reason => reason + ": " + frontend.rejected[reason]).join(", ") : "0";
  }
}

function post(target) {
  const headers = {"Content-Type": "application/json"};
  if (token) headers["Authorization"] = "Bearer " + token;
  return fetch(target, {method: "POST", headers: headers, body: "{}", mode: "same-origin",
    credentials: "same-origin", cache: "no-store"});
}

// drain / maint / ready: asks for the token when the admin API answers 401, then retries once.
async function act(id, action, url) {
  const target = "backends/" + id + "/" + action;
  const noteLine = document.getElementById("note");
  try {
    let response = await post(target);
    if (response.status === 401) {
      const given = window.prompt((token ? "That token was refused. " : "") +
        "Admin token, to set " + url + " to " + action + ":");
      if (given === null || !given.trim()) {
        noteLine.className = "bad"; noteLine.textContent = action + " cancelled: it needs the admin token";
        return;
      }
      token = given.trim();
      response = await post(target);
      if (response.status === 401) token = null;
    }
    const answer = await response.json();
    if (!response.ok) throw new Error(response.status + " " + (answer.error || ""));
    noteLine.className = ""; noteLine.textContent = url + " is now " + answer.state;
  } catch (error) {
    noteLine.className = "bad"; noteLine.textContent = action + " of " + url + " failed: " + error.message;
  }
  refresh();
}

function buttons(b) {
  const td = cell("", "actions", "admin");
  const current = b.state === "drain" || b.state === "maint" ? b.state : "ready";
  for (const action of ACTIONS) {
    const button = document.createElement("button");
    button.textContent = action; button.dataset.action = action; button.dataset.id = b.id;
    button.disabled = action === current;
    button.title = {drain: "no new requests; in-flight ones finish", maint: "out of rotation",
      ready: "back in rotation"}[action];
    button.addEventListener("click", () => act(b.id, action, b.url));
    td.appendChild(button);
  }
  return td;
}

// Every pool's backends, grouped by pool (in /status "pools" order); poolOf: id -> pool name.
const poolOf = {};
function allBackends(status) {
  if (!status.pools) { status.backends.forEach(x => { poolOf[x.id] = "default"; }); return status.backends; }
  status.pools.forEach(p => p.backends.forEach(x => { poolOf[x.id] = p.name; }));
  return status.pools.flatMap(p => p.backends);
}

function drawRoutes(routes, fallback) {
  const section = document.getElementById("routes-section");
  section.hidden = !(routes && routes.length);
  if (section.hidden) return;
  document.getElementById("routes").replaceChildren(...routes.map(r => {
    const tr = document.createElement("tr");
    const match = Object.entries(r.match).map(([k, v]) => k + " " + (typeof v === "object"
      ? JSON.stringify(v) : v)).join(", ") || "any request";
    const action = r.pool !== undefined ? "pool " + r.pool + (r.strip_prefix ? " (strip)" : "")
      : r.redirect !== undefined ? r.status + " \\u2192 " + r.redirect : "respond " + r.respond;
    tr.append(cell(r.index, "", "#"), cell(r.name, "", "route"), cell(match, "check", "match"),
      cell(action, "check", "action"), cell(r.requests, "n", "requests"),
      cell(r.denied, "n", "403"), cell(r.limited, "n", "429"));
    return tr;
  }), (() => { const tr = document.createElement("tr");
    tr.append(cell("", "", "#"), cell("(no match)", "", "route"), cell("anything else", "check", "match"),
      cell(fallback ? "pool " + fallback : "404", "check", "action"), cell("", "n", "requests"),
      cell("", "n", "403"), cell("", "n", "429"));
    return tr; })());
}

async function refresh() {
  try {
    const response = await fetch("status", {cache: "no-store"});
    const status = await response.json();
    status.backends = allBackends(status);
    const history = status.history;
    const rows = document.getElementById("rows");
    const rates = {};
    let maxRate = 1, total = 0;
    // Rates over the polls of the last few seconds (one poll apart is too noisy); until
    // they span RATE_WINDOW / 2, from the first paint: the server's last interval.
    if (polls.length && status.time < polls[polls.length - 1].time) polls.length = 0;  // clock set back
    polls.push(status);
    while (polls.length > 2 && status.time - polls[1].time >= RATE_WINDOW) polls.shift();
    const base = polls[0], dt = status.time - base.time;
    for (const b of status.backends) {
      const before = base.backends.find(p => p.id === b.id);
      const sampled = history.backends[b.url] ? last(history.backends[b.url].rps) : null;
      rates[b.id] = before && dt >= RATE_WINDOW / 2
        ? Math.max(0, (b.requests - before.requests) / dt) : sampled || 0;
      maxRate = Math.max(maxRate, rates[b.id]); total += rates[b.id];
    }
    rows.replaceChildren(...status.backends.map(b => {
      const tr = document.createElement("tr");
      const state = cell("", "", "state"); const badge = document.createElement("span");
      badge.className = "state " + b.state; badge.textContent = b.state; state.appendChild(badge);
      const since = document.createElement("span"); since.className = "for";
      since.textContent = "for " + duration(b.seconds_in_state); state.appendChild(since);
      const rate = cell(rates[b.id].toFixed(1), "n", "req/s");
      const fill = document.createElement("div"); fill.className = "bar";
      fill.style.width = (4 * rates[b.id] / maxRate) + "rem"; rate.appendChild(fill);
      const r = b.responses;
      const check = b.last_check ? b.last_check + (b.last_check_latency_ms != null
        ? " (" + b.last_check_latency_ms + "\\u00a0ms)" : "") : "-";
      const url = cell(b.url, "url", "backend"); url.style.borderLeft = "4px solid " + color(b.url);
      tr.append(cell(b.id, "", "#"), cell(poolOf[b.id], "", "pool"), url, state, cell(b.weight, "n", "weight"),
        cell(b.in_flight, "n", "in flight"), rate, cell(b.requests, "n", "requests"),
        cell(r["2xx"] || 0, "n", "2xx"), cell(r["4xx"] || 0, "n", "4xx"),
        cell(r["5xx"] || 0, "n", "5xx"), cell(b.failures, "n", "failures"),
        cell(b.retries, "n", "retries"), cell(check, "check", "last check"), buttons(b));
      return tr;
    }));
    drawHistory(history, status.time);
    drawFrontend(status.frontend, status.unrouted);
    drawRoutes(status.routes, status.default_route);
    const up = status.backends.filter(b => b.state === "up").length;
    const pools = status.pools && (status.pools.length > 1 || status.pools[0].name !== "default")
      ? status.pools.map(p => p.name + " (" + p.policy + ")").join(", ") : status.policy;
    document.getElementById("summary").textContent = pools + " \\u00b7 " + up + "/" +
      status.backends.length + " backends up \\u00b7 " + total.toFixed(1) + " req/s \\u00b7 updated " +
      new Date(status.time * 1000).toLocaleTimeString();
    document.getElementById("error").textContent = "";
  } catch (error) {
    document.getElementById("error").textContent = "cannot reach cclb: " + error;
  }
}
refresh();
setInterval(refresh, 1000);
</script></body></html>
"""

"""The live status page of the admin port (``GET /``): one self-contained HTML document.

No outside assets: the CSS and the script are inline, and a Content-Security-Policy with
their SHA-256 hashes lets the browser run those two and nothing else (no other script, no
request but to this same admin port). The script polls ``/stats``, ``/ready`` and
``/metrics`` once a second; rates are computed here, in the browser, from successive
samples of the cumulative ``messages_in`` and ``deliveries`` counters, and the heartbeat
RTT histogram is parsed from the Prometheus text of ``/metrics``.

It works on a single process's admin port (``gochat.admin``) and on the supervisor's of
``--workers N``: there ``/stats`` carries a ``workers`` list (missing totals are summed
from it) and every ``/metrics`` series has a ``worker`` label (histogram buckets are summed
over it). Either admin app serves it with :func:`app`.
"""
from __future__ import annotations

import base64
import hashlib
from typing import Callable, Iterable

STYLE = """
:root { --bg:#f4f6f8; --card:#fff; --ink:#18212b; --mute:#66717d; --line:#dde3e9; --acc:#1f6feb;
        --acc2:#d9480f; --ok:#1a7f37; --bad:#cf222e; --warn:#9a6700; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",sans-serif;
       background:var(--bg); color:var(--ink); }
header { display:flex; align-items:center; gap:14px; padding:12px 20px; background:var(--ink); color:#fff; }
header h1 { font-size:18px; margin:0; font-weight:600; }
header .meta { color:#b8c2cc; font-size:13px; }
header .right { margin-left:auto; text-align:right; }
.pill { display:inline-block; padding:2px 10px; border-radius:999px; font-weight:600; font-size:13px;
        background:#57606a; color:#fff; }
.pill.ok { background:var(--ok); } .pill.bad { background:var(--bad); } .pill.warn { background:var(--warn); }
#banner { display:none; margin:12px 20px 0; padding:8px 12px; border-radius:6px; background:#ffebe9;
          color:var(--bad); border:1px solid #ffcecb; }
#banner.show { display:block; }
main { padding:14px 20px 20px; }
.grid { display:grid; grid-template-columns:repeat(4, minmax(0, 1fr)); gap:12px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:10px 14px; }
.card h2 { margin:0; font-size:12px; font-weight:600; letter-spacing:.04em; text-transform:uppercase;
           color:var(--mute); }
.big { font-size:28px; font-weight:650; font-variant-numeric:tabular-nums; margin:2px 0; }
.big small { font-size:14px; color:var(--mute); font-weight:500; }
.sub { color:var(--mute); font-size:12.5px; font-variant-numeric:tabular-nums; min-height:18px; }
.bar { height:6px; background:var(--line); border-radius:3px; margin-top:6px; overflow:hidden; }
.bar > div { height:100%; width:0; background:var(--acc); transition:width .3s; }
.bar > div.hot { background:var(--bad); }
.row2 { display:grid; grid-template-columns:3fr 2fr; gap:12px; margin-top:12px; }
canvas { width:100%; height:150px; display:block; }
.legend { font-size:12px; color:var(--mute); margin-top:4px; }
.legend i { display:inline-block; width:10px; height:3px; vertical-align:middle; margin:0 4px 0 10px; }
.hist { display:grid; grid-template-columns:72px 1fr 70px; gap:3px 8px; align-items:center; margin-top:8px;
        font-size:12px; font-variant-numeric:tabular-nums; }
.hist .lbl { color:var(--mute); text-align:right; white-space:nowrap; }
.hist .track { background:var(--bg); height:12px; border-radius:2px; overflow:hidden; }
.hist .track > div { height:100%; width:0; background:var(--acc); }
.hist .n { text-align:right; }
table { border-collapse:collapse; width:100%; font-size:12.5px; font-variant-numeric:tabular-nums; }
th, td { text-align:right; padding:3px 8px; border-bottom:1px solid var(--line); }
th:first-child, td:first-child { text-align:left; }
#workers-card { display:none; margin-top:12px; }
#workers-card.show { display:block; }
footer { color:var(--mute); font-size:12px; padding:0 20px 16px; }
.legend .l-msg { background:#1f6feb; } .legend .l-dlv { background:#d9480f; }
h2.gap { margin-top:10px !important; }
canvas.small { height:80px; }
footer a { color:var(--acc); }
@media (max-width: 900px) {
  .grid { grid-template-columns:repeat(2, minmax(0, 1fr)); }
  .row2 { grid-template-columns:1fr; }
}
"""

SCRIPT = r"""
"use strict";
const HISTORY = 120;             // samples kept for the charts (one a second)
const INTERVAL_MS = 1000;
const RTT = "gochat_heartbeat_rtt_seconds";
const $ = (id) => document.getElementById(id);
const series = { conns: [], msgRate: [], dlvRate: [] };
const RATE_WINDOW_S = 5;         // seconds the rates average over
const window_ = [];              // recent samples of the cumulative counters
let samples = 0;

function set(id, text) { const el = $(id); if (el && el.textContent !== text) el.textContent = text; }
function fmtInt(n) { return Number.isFinite(n) ? Math.round(n).toLocaleString("en-US") : "–"; }
function fmtRate(n) {
  if (!Number.isFinite(n)) return "–";
  return n >= 100 ? fmtInt(n) : n.toFixed(1);
}
function fmtBytes(n) {
  if (!Number.isFinite(n) || n < 0) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}
function fmtSeconds(s) {
  if (!Number.isFinite(s)) return "–";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms";
  return s.toFixed(2) + " s";
}
function fmtUptime(s) {
  if (!Number.isFinite(s)) return "–";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
}
function bar(id, fraction) {
  const el = $(id);
  if (!el) return;
  const f = Number.isFinite(fraction) ? Math.max(0, Math.min(1, fraction)) : 0;
  el.style.width = (f * 100).toFixed(1) + "%";
  el.className = f >= 0.9 ? "hot" : "";
}

// A key of /stats; behind the supervisor a total it does not give is summed over its workers.
function stat(s, key) {
  if (typeof s[key] === "number") return s[key];
  if (Array.isArray(s.workers)) {
    let total = 0, seen = false;
    for (const w of s.workers) if (typeof w[key] === "number" && w[key] >= 0) { total += w[key]; seen = true; }
    if (seen) return total;
  }
  return NaN;
}

// The heartbeat RTT histogram from Prometheus text: buckets summed over every label set
// (the supervisor adds a worker label), returned per bucket (not cumulative).
function parseHistogram(text, name) {
  const cumulative = new Map();
  let count = 0, sum = 0;
  const labelRe = /le="([^"]*)"/;
  for (const line of text.split("\n")) {
    if (!line.startsWith(name)) continue;
    const m = /^(\S+?)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const value = parseFloat(m[3]);
    if (!Number.isFinite(value)) continue;
    if (m[1] === name + "_bucket") {
      const le = labelRe.exec(m[2] || "");
      if (!le) continue;
      const bound = le[1] === "+Inf" ? Infinity : parseFloat(le[1]);
      cumulative.set(bound, (cumulative.get(bound) || 0) + value);
    } else if (m[1] === name + "_count") {
      count += value;
    } else if (m[1] === name + "_sum") {
      sum += value;
    }
  }
  const bounds = [...cumulative.keys()].sort((a, b) => a - b);
  const buckets = [];
  let below = 0;
  for (const b of bounds) {
    const c = cumulative.get(b);
    buckets.push({ le: b, cumulative: c, n: Math.max(0, c - below) });
    below = c;
  }
  return { buckets, count, sum };
}

// histogram_quantile's estimate: linear interpolation inside the bucket holding the rank.
function quantile(q, h) {
  const total = h.buckets.length ? h.buckets[h.buckets.length - 1].cumulative : 0;
  if (!total) return NaN;
  const rank = q * total;
  let lower = 0, below = 0;
  for (const b of h.buckets) {
    if (b.cumulative >= rank) {
      if (b.le === Infinity) return lower;
      return lower + (b.le - lower) * (b.n ? (rank - below) / b.n : 0);
    }
    lower = b.le; below = b.cumulative;
  }
  return lower;
}

// A bucket bound as Prometheus writes it, in ms or s: 0.005 -> "5 ms", 2.5 -> "2.5 s".
function fmtBound(le) {
  if (!Number.isFinite(le)) return "–";
  return le < 1 ? +(le * 1000).toPrecision(3) + " ms" : +le.toPrecision(3) + " s";
}
function leLabel(le) {
  return le === Infinity ? "> " + fmtBound(prevBound) : "≤ " + fmtBound(le);
}
let prevBound = NaN;

function renderHistogram(h) {
  const box = $("rtt-hist");
  const max = Math.max(1, ...h.buckets.map((b) => b.n));
  if (box.childElementCount !== h.buckets.length * 3) {
    box.replaceChildren();
    for (const b of h.buckets) {
      if (b.le !== Infinity) prevBound = b.le;
      const lbl = document.createElement("div"); lbl.className = "lbl"; lbl.textContent = leLabel(b.le);
      const track = document.createElement("div"); track.className = "track";
      track.appendChild(document.createElement("div"));
      const n = document.createElement("div"); n.className = "n";
      box.append(lbl, track, n);
    }
  }
  h.buckets.forEach((b, i) => {
    box.children[i * 3 + 1].firstChild.style.width = (100 * b.n / max).toFixed(1) + "%";
    box.children[i * 3 + 2].textContent = fmtInt(b.n);
  });
  set("rtt-count", fmtInt(h.count));
  set("rtt-mean", h.count ? fmtSeconds(h.sum / h.count) : "–");
  set("rtt-p50", fmtSeconds(quantile(0.5, h)));
  set("rtt-p99", fmtSeconds(quantile(0.99, h)));
}

function chart(id, lines) {
  const canvas = $(id);
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  let max = 1;
  for (const l of lines) for (const v of l.values) if (Number.isFinite(v) && v > max) max = v;
  max *= 1.1;
  const top = 16, bottom = h - 4, left = 2, right = w - 2;
  ctx.strokeStyle = "#dde3e9"; ctx.lineWidth = 1;
  ctx.fillStyle = "#66717d"; ctx.font = "11px system-ui, sans-serif";
  for (const f of [0, 0.5, 1]) {
    const y = bottom - (bottom - top) * f;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(right, y); ctx.stroke();
    if (f) ctx.fillText(fmtRate(max * f), left + 2, y - 3);
  }
  for (const l of lines) {
    ctx.strokeStyle = l.color; ctx.lineWidth = 2; ctx.beginPath();
    let started = false;
    l.values.forEach((v, i) => {
      if (!Number.isFinite(v)) return;
      const x = left + (right - left) * (i + HISTORY - l.values.length) / (HISTORY - 1);
      const y = bottom - (bottom - top) * v / max;
      if (started) ctx.lineTo(x, y); else { ctx.moveTo(x, y); started = true; }
    });
    ctx.stroke();
  }
}

function push(key, value) {
  series[key].push(value);
  if (series[key].length > HISTORY) series[key].shift();
}

function renderWorkers(s) {
  const card = $("workers-card");
  if (!Array.isArray(s.workers)) { card.className = "card"; return; }
  card.className = "card show";
  const body = $("workers");
  body.replaceChildren();
  s.workers.forEach((w, i) => {
    const tr = document.createElement("tr");
    for (const text of [String(i), String(w.pid ?? "–"), fmtInt(w.connections), fmtInt(w.sessions),
                        fmtInt(w.greenlets), fmtInt(w.open_files), fmtBytes(w.rss_bytes)]) {
      const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
    }
    body.appendChild(tr);
  });
}

function render(s, ready, metricsText) {
  const conns = stat(s, "connections"), cap = stat(s, "max_connections");
  set("connections", fmtInt(conns));
  set("max-connections", fmtInt(cap));
  set("conn-pct", Number.isFinite(cap) && cap > 0 ? (100 * conns / cap).toFixed(1) + "%" : "–");
  bar("conn-bar", conns / cap);
  set("sessions", fmtInt(stat(s, "sessions")));
  set("awaiting", fmtInt(stat(s, "sessions_awaiting_resume")));
  set("rooms", fmtInt(stat(s, "rooms")));
  set("greenlets", fmtInt(stat(s, "greenlets")));
  set("handler-greenlets", fmtInt(stat(s, "handler_greenlets")));
  set("parked", fmtInt(stat(s, "parked_connections")));
  const files = stat(s, "open_files"), filesLimit = stat(s, "open_files_limit");
  set("open-files", fmtInt(files));
  set("open-files-limit", fmtInt(filesLimit));
  bar("files-bar", files / filesLimit);
  const rss = stat(s, "rss_bytes");
  set("rss", fmtBytes(rss));
  // Per connection only once connections outweigh the process's own base memory.
  set("rss-per-conn", conns >= 100 && rss > 0 ? "≈ " + fmtBytes(rss / conns) + " per connection" : "whole process");
  const msgs = stat(s, "messages_in"), dlv = stat(s, "deliveries");
  set("msg-total", fmtInt(msgs));
  set("dlv-total", fmtInt(dlv));
  set("fanout", msgs > 0 ? "×" + (dlv / msgs).toFixed(1) + " per message" : "");

  // Rates from successive samples: the counters' growth over the last RATE_WINDOW_S seconds
  // of the server's own clock (uptime_s; the browser's when it did not move), so that one
  // slow poll does not show as a dip. A counter that fell was reset: start over.
  const now = { msgs, dlv, uptime: stat(s, "uptime_s"), clock: performance.now() / 1000 };
  const last = window_.length ? window_[window_.length - 1] : null;
  if (last && (now.msgs < last.msgs || now.dlv < last.dlv || now.uptime < last.uptime)) window_.length = 0;
  window_.push(now);
  const elapsed = (a, b) => (b.uptime > a.uptime ? b.uptime - a.uptime : b.clock - a.clock);
  while (window_.length > 2 && elapsed(window_[1], now) >= RATE_WINDOW_S) window_.shift();
  let msgRate = NaN, dlvRate = NaN;
  if (window_.length >= 2) {
    const first = window_[0], dt = elapsed(first, now);
    if (dt > 0) {
      msgRate = (now.msgs - first.msgs) / dt;
      dlvRate = (now.dlv - first.dlv) / dt;
    }
  }
  set("msg-rate", fmtRate(msgRate));
  set("dlv-rate", fmtRate(dlvRate));
  push("conns", conns); push("msgRate", msgRate); push("dlvRate", dlvRate);
  chart("rate-chart", [{ values: series.msgRate, color: "#1f6feb" }, { values: series.dlvRate, color: "#d9480f" }]);
  chart("conn-chart", [{ values: series.conns, color: "#1a7f37" }]);

  const pill = $("ready");
  if (ready.ready) { pill.textContent = "ready"; pill.className = "pill ok"; }
  else {
    pill.textContent = "not ready: " + (ready.reason || "unknown");
    pill.className = ready.reason === "draining" ? "pill warn" : "pill bad";
  }
  set("uptime", fmtUptime(stat(s, "uptime_s")));
  set("pid", Array.isArray(s.workers) ? s.workers.length + " workers" : "pid " + (s.pid ?? "–"));
  set("broker", s.broker || (Array.isArray(s.workers) && s.workers[0] && s.workers[0].broker) || "–");
  if (metricsText !== null) renderHistogram(parseHistogram(metricsText, RTT));
  renderWorkers(s);
  samples++;
  set("samples", String(samples));
  set("updated", new Date().toLocaleTimeString("en-GB"));
}

async function get(path, asText) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), 2500);
  try {
    const r = await fetch(path, { cache: "no-store", signal: ctl.signal });
    if (asText) return r.ok ? await r.text() : null;
    const body = await r.json();
    if (!r.ok && path !== "/ready") throw new Error(path + ": HTTP " + r.status);
    return body;
  } finally {
    clearTimeout(timer);
  }
}

async function tick() {
  try {
    const [s, ready, metricsText] = await Promise.all([get("/stats"), get("/ready"), get("/metrics", true)]);
    render(s, ready, metricsText);
    $("banner").className = "";
  } catch (err) {
    $("banner").textContent =
      "cannot read the admin port (" + (err && err.message || err) + "); showing the last sample";
    $("banner").className = "show";
  }
  setTimeout(tick, INTERVAL_MS);
}

set("host", location.host);
tick();
"""

BODY = """<header>
  <h1>gochat</h1>
  <span class="meta" id="host"></span>
  <span class="pill" id="ready">…</span>
  <div class="right meta">up <span id="uptime">–</span> · <span id="pid">–</span>
    · broker <span id="broker">–</span><br>
    updated <span id="updated">–</span> · sample <span id="samples">0</span></div>
</header>
<div id="banner"></div>
<main>
  <div class="grid">
    <div class="card"><h2>Connections</h2>
      <div class="big" id="connections">–</div>
      <div class="sub">of <span id="max-connections">–</span> max (<span id="conn-pct">–</span>)</div>
      <div class="bar"><div id="conn-bar"></div></div></div>
    <div class="card"><h2>Sessions</h2>
      <div class="big" id="sessions">–</div>
      <div class="sub"><span id="awaiting">–</span> awaiting resume</div></div>
    <div class="card"><h2>Rooms</h2>
      <div class="big" id="rooms">–</div>
      <div class="sub">with members</div></div>
    <div class="card"><h2>Greenlets</h2>
      <div class="big" id="greenlets">–</div>
      <div class="sub"><span id="handler-greenlets">–</span> reading, <span id="parked">–</span> connections parked</div></div>
    <div class="card"><h2>Messages in</h2>
      <div class="big"><span id="msg-rate">–</span> <small>/s</small></div>
      <div class="sub"><span id="msg-total">–</span> since start</div></div>
    <div class="card"><h2>Deliveries</h2>
      <div class="big"><span id="dlv-rate">–</span> <small>/s</small></div>
      <div class="sub"><span id="dlv-total">–</span> since start · <span id="fanout"></span></div></div>
    <div class="card"><h2>Open files</h2>
      <div class="big" id="open-files">–</div>
      <div class="sub">limit <span id="open-files-limit">–</span></div>
      <div class="bar"><div id="files-bar"></div></div></div>
    <div class="card"><h2>Resident memory</h2>
      <div class="big" id="rss">–</div>
      <div class="sub" id="rss-per-conn"></div></div>
  </div>
  <div class="row2">
    <div class="card"><h2>Rates (5 s average), last two minutes</h2>
      <canvas id="rate-chart"></canvas>
      <div class="legend"><i class="l-msg"></i>messages in/s<i class="l-dlv"></i>deliveries/s</div>
      <h2 class="gap">Connections</h2>
      <canvas id="conn-chart" class="small"></canvas></div>
    <div class="card"><h2>Heartbeat round trip (since start)</h2>
      <div class="sub"><span id="rtt-count">–</span> pongs · mean <span id="rtt-mean">–</span>
        · p50 <span id="rtt-p50">–</span> · p99 <span id="rtt-p99">–</span></div>
      <div class="hist" id="rtt-hist"></div></div>
  </div>
  <div class="card" id="workers-card"><h2>Workers</h2>
    <table><thead><tr><th>worker</th><th>pid</th><th>connections</th><th>sessions</th><th>greenlets</th>
      <th>open files</th><th>memory</th></tr></thead><tbody id="workers"></tbody></table></div>
</main>
<footer>Polls /stats, /ready and /metrics every second. Rates are computed in this page from successive
  samples of the cumulative counters, averaged over 5 s.
  JSON: <a href="/stats">/stats</a> · <a href="/ready">/ready</a> · <a href="/metrics">/metrics</a></footer>
"""



def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


PAGE: bytes = (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    '<title>gochat status</title><link rel="icon" href="data:,">'
    f"<style>{STYLE}</style></head>\n<body>\n{BODY}<script>{SCRIPT}</script>\n</body></html>\n"
).encode()

# Only the two inline blocks above may run or apply; fetches go to this admin port only.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

HEADERS: list[tuple[str, str]] = [
    ("Content-Type", "text/html; charset=utf-8"),
    ("Content-Length", str(len(PAGE))),
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
]


def app(environ: dict, start_response: Callable[[str, list[tuple[str, str]]], object]) -> Iterable[bytes]:
    """A WSGI app answering any GET with the page: mount it on ``/`` of an admin app."""
    start_response("200 OK", list(HEADERS))
    return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [PAGE]

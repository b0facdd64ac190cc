// The mediator dashboard: hash-routed pages over the JSON API, refreshed every 2 s.
"use strict";

const REFRESH_MS = 2000;
const COLORS = { completed: "#3fb950", failed: "#f85149", running: "#58a6ff", retrying: "#d29922",
  parked: "#d29922", queued: "#d29922", waiting: "#d29922", skipped: "#6e7681", pending: "#2a3441", compensated: "#a371f7", compensation_failed: "#f85149" };
let timer = null;

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function badge(status) { return `<span class="status s-${esc(status)}">${esc(status)}</span>`; }
function when(ms) { return ms ? new Date(ms).toLocaleString() : ""; }
function whenMs(ms) {
  if (!ms) return "";
  const d = new Date(ms);
  return `${d.toLocaleDateString()} ${d.toLocaleTimeString([], { hour12: false })}.${String(d.getMilliseconds()).padStart(3, "0")}`;
}
function span(ms) { return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`; }
function pct(x) { return x == null ? "–" : (100 * x).toFixed(2) + "%"; }
function num(x, digits = 1) { return x == null ? "–" : Number(x).toFixed(digits); }

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}
async function post(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json", "X-Mediator-Action": "1" }, body: JSON.stringify(body || {}) });
}
function toast(text) {
  const el = document.getElementById("toast");
  el.textContent = text; el.hidden = false;
  setTimeout(() => { el.hidden = true; }, 3000);
}
// Send an action, then say what became of it (the replica records each control's outcome).
async function act(path, body, what) {
  let sent;
  try { sent = await post(path, body); } catch (e) { toast(`${what} failed: ${e.message}`); return; }
  toast(`${what}: sent`);
  const ids = sent.control_id ? [sent.control_id] : (sent.sent || []).map((s) => s.control_id);
  if (ids.length === 1) {
    for (let i = 0; i < 50; i++) {
      const outcome = await api(`/api/controls/${encodeURIComponent(ids[0])}`).catch(() => ({ pending: true }));
      if (!outcome.pending) {
        toast(outcome.applied ? `${what}: applied (${outcome.detail})` : `${what}: refused: ${outcome.detail}`);
        break;
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  refresh();
}

// -- pages ---------------------------------------------------------------------------------

async function overview() {
  const o = await api("/api/overview");
  const c = o.counts;
  return `<h2>Overview</h2><div class="cards">
    ${card("Running", c.running, "running")}${card("Completed", c.completed, "completed")}
    ${card("Failed", c.failed, "failed")}${card("Runs / s", num(o.runs_per_s, 2), "runs-per-s")}
    ${card("Commands / s", num(o.commands_per_s, 2), "commands-per-s")}
    ${card("Error rate", pct(o.error_rate), "error-rate")}${card("Alerts firing", o.alerts, "alerts")}
    ${card("Outbox pending", o.outbox_pending, "outbox")}${card("Dead letters", o.dead_letters, "dead-letters")}</div>
    <p class="muted">Rates over the last ${o.window_s >= 120 ? Math.round(o.window_s / 60) + " minutes" : o.window_s + " s"}.</p>
    <h2>Recently finished</h2>${runTable(o.recent.map((r) => ({ ...r, updated_ms: r.finished_ms })))}`;
}
function card(label, value, id) {
  return `<div class="card" data-testid="card-${id}"><div class="n">${esc(value)}</div><div class="l">${esc(label)}</div></div>`;
}

function runTable(runs, selectable) {
  if (!runs.length) return `<p class="muted" data-testid="no-runs">No runs.</p>`;
  return `<table data-testid="runs"><tr>${selectable ? "<th></th>" : ""}<th>Run</th><th>Request</th><th>Workflow</th><th>Status</th><th>Updated</th><th>Took</th><th>Error</th></tr>
    ${runs.map((r) => `<tr data-wid="${esc(r.workflow_id)}">${selectable ? `<td><input type="checkbox" value="${esc(r.workflow_id)}"></td>` : ""}
      <td class="mono"><a href="#/run/${esc(r.workflow_id)}">${esc(r.workflow_id)}</a></td><td class="mono">${esc(r.request_id || "")}</td><td>${esc(r.workflow)}</td>
      <td>${badge(r.status)}${r.paused_ms ? ' <span class="status s-paused">paused</span>' : ""}</td><td>${when(r.updated_ms)}</td><td>${took(r)}</td><td>${esc(r.error || "")}</td></tr>`).join("")}</table>`;
}
function took(r) {
  if (!r.created_ms || !r.finished_ms) return "";
  const ms = r.finished_ms - r.created_ms;
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
}

async function runs(params) {
  const q = new URLSearchParams(params);
  const data = await api("/api/runs?" + q.toString());
  const f = (name) => esc(params.get(name) || "");
  const statuses = ["", "running", "compensating", "completed", "failed", "cancelled", "compensation_failed"];
  return `<h2>Workflows</h2><form class="filters" id="filters">
    <select name="status" data-testid="filter-status">${statuses.map((s) => `<option ${s === params.get("status") ? "selected" : ""} value="${s}">${s || "any status"}</option>`).join("")}</select>
    <input name="workflow" placeholder="workflow name" value="${f("workflow")}">
    <input name="request_id" placeholder="request id" value="${f("request_id")}">
    <input name="since" placeholder="since (10m, 2h, 2026-12-04T10:00)" value="${f("since")}">
    <input name="until" placeholder="until (e.g. 5m)" value="${f("until")}">
    <button type="submit">Filter</button>
    <button type="button" id="retry-selected" data-testid="retry-selected">Retry selected</button>
    <button type="button" id="retry-all-failed" class="danger" data-testid="retry-all-failed">Retry all failed</button>
    <span class="bulk"><select id="bulk-action" data-testid="bulk-action">${["cancel", "retry", "pause", "resume"].map((a) => `<option value="${a}">${a}</option>`).join("")}</select>
    <button type="button" id="bulk-selected" data-testid="bulk-selected">… selected</button>
    <button type="button" id="bulk-matching" class="danger" data-testid="bulk-matching">… all matching</button></span>
  </form>${runTable(data.runs, true)}${pager(params, data.runs)}`;
}
// Newest first, a page at a time: "older" continues just before the last row shown.
function pager(params, shown) {
  const limit = Number(params.get("limit") || 50);
  const more = shown.length >= limit;
  const older = new URLSearchParams(params);
  if (more) older.set("until", String(shown[shown.length - 1].updated_ms - 1));
  return `<p class="muted" data-testid="runs-shown">${shown.length} run${shown.length === 1 ? "" : "s"} shown${more ? ` · <a href="#/runs?${older.toString()}" data-testid="older">older →</a>` : ""}</p>`;
}
function bindRuns() {
  const form = document.getElementById("filters");
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) q.set(k, v);
    location.hash = "#/runs?" + q.toString();
  });
  document.getElementById("retry-selected").onclick = () => {
    const ids = [...document.querySelectorAll("table input:checked")].map((i) => i.value);
    if (ids.length) act("/api/retry", { workflow_ids: ids }, `retry ${ids.length} runs`);
  };
  const bulkAction = () => document.getElementById("bulk-action").value;
  document.getElementById("bulk-selected").onclick = () => {
    const ids = [...document.querySelectorAll("table input:checked")].map((i) => i.value);
    const action = bulkAction();
    if (ids.length && confirm(`${action} ${ids.length} selected run${ids.length === 1 ? "" : "s"}?`)) {
      act(`/api/bulk/${action}`, { workflow_ids: ids }, `${action} ${ids.length} runs`);
    }
  };
  // Every run the filters choose that the action applies to: counted first, then confirmed.
  document.getElementById("bulk-matching").onclick = async () => {
    const action = bulkAction();
    const filters = Object.fromEntries([...new FormData(form)].filter(([k, v]) => v && k !== "request_id"));
    let count;
    try { ({ count } = await post(`/api/bulk/${action}`, { ...filters, dry_run: true })); } catch (e) { toast(`${action}: ${e.message}`); return; }
    if (!count) { toast(`no run matches that ${action} applies to`); return; }
    if (confirm(`${action} ${count} run${count === 1 ? "" : "s"} matching these filters?`)) {
      act(`/api/bulk/${action}`, filters, `${action} ${count} runs`);
    }
  };
  document.getElementById("retry-all-failed").onclick = async () => {
    const workflow = new FormData(form).get("workflow");
    const { count } = await post("/api/retry", { status: "failed", workflow, dry_run: true });
    if (!count) { toast("no failed runs to retry"); return; }
    if (confirm(`Retry ${count} failed run${count === 1 ? "" : "s"}${workflow ? ` of ${workflow}` : ""}?`)) {
      act("/api/retry", { status: "failed", workflow }, `retry ${count} failed runs`);
    }
  };
}

async function run(wid) {
  const r = await api("/api/runs/" + encodeURIComponent(wid));
  const steps = r.result.steps || {};
  const services = Object.fromEntries(r.definition.steps.map((d) => [d.id, d.service]));
  const live = r.status === "running" || r.status === "compensating";
  const hold = !live ? "" : r.paused_ms
    ? `<button data-action="resume" data-testid="resume">Resume</button>`
    : `<button data-action="pause" data-testid="pause">Pause</button>`;
  const actions = live
    ? `${hold} <button class="danger" data-action="cancel" data-testid="cancel">Cancel</button>`
    : ["failed", "cancelled"].includes(r.status) ? `<button data-action="retry" data-testid="retry">Retry</button>` : "";
  const paused = r.paused_ms ? ` <span class="status s-paused" data-testid="paused" title="nothing is sent until it is resumed">paused since ${whenMs(r.paused_ms)}</span>` : "";
  const waits = Object.fromEntries(r.definition.steps.map((d) => [d.id, d.wait]));
  const approve = (sid, s) => s.status === "waiting" && waits[sid]
    ? ` <button data-signal="${esc(waits[sid])}" data-approved="true" data-testid="approve-${esc(sid)}">Approve</button>
       <button class="danger" data-signal="${esc(waits[sid])}" data-approved="false" data-testid="reject-${esc(sid)}">Reject</button>` : "";
  // A `workflow` step's child runs (one per attempt, newest last), linked.
  const children = (sid) => (r.children || {})[sid]
    ? " " + r.children[sid].map((c) => `<a class="mono" href="#/run/${esc(c)}" data-testid="child-${esc(sid)}">${esc(c)}</a>`).join(", ") : "";
  const parent = r.parent
    ? `<p data-testid="parent">child run of <a class="mono" href="#/run/${esc(r.parent.workflow_id)}">${esc(r.parent.workflow_id)}</a> (step ${esc(r.parent.step)}, attempt ${esc(r.parent.attempt)})</p>` : "";
  const rows = Object.entries(steps).map(([sid, s]) => `<tr data-step="${esc(sid)}"><td>${esc(sid)}${children(sid)}</td><td>${badge(s.status)}${approve(sid, s)}</td>
    <td>${esc(s.attempts)}</td><td>${esc(s.service || services[sid] || "")}</td><td class="mono">${esc(s.instance || "")}</td>
    <td>${s.duration_ms ?? ""}</td><td>${esc(s.error ? s.error.message : "")}</td></tr>`).join("");
  const comp = Object.entries(r.result.compensations || {});
  return `<h2>Run <span class="mono" data-testid="run-id">${esc(r.workflow_id)}</span> ${badge(r.status)}${paused} ${actions}</h2>
    <p class="muted">${esc(r.workflow)} v${esc(r.version)} · request ${esc(r.request_id)} · started ${when(r.created_ms)}
      ${r.finished_ms ? "· finished " + when(r.finished_ms) : ""} ${r.trace_id ? "· trace " + esc(r.trace_id) : ""}</p>
    ${parent}
    ${dag(r.definition.steps, steps, r.result.compensations || {})}
    <h2>Steps</h2><table data-testid="steps"><tr><th>Step</th><th>Status</th><th>Attempts</th><th>Service</th><th>Instance</th><th>ms</th><th>Error</th></tr>${rows}</table>
    ${timeline(r, services)}
    ${comp.length ? `<h2>Compensations</h2><table>${comp.map(([sid, s]) => `<tr><td>${esc(sid)}</td><td>${badge(s.status)}</td><td>${esc(s.attempts)}</td></tr>`).join("")}</table>` : ""}
    <h2>Input</h2><pre>${esc(JSON.stringify(r.payload, null, 2))}</pre>
    ${r.output != null ? `<h2>Output</h2><pre>${esc(JSON.stringify(r.output, null, 2))}</pre>` : ""}
    ${r.error ? `<h2>Error</h2><pre>${esc(JSON.stringify(r.error, null, 2))}</pre>` : ""}
    <h2>Audit log</h2><table data-testid="audit"><tr><th>Time</th><th>Event</th><th>Step</th><th>Attempt</th><th>Instance</th><th>Status after</th><th>Sent</th><th>Replica</th></tr>
    ${r.audit.map((e) => `<tr><td>${whenMs(e.t)}</td><td>${esc(e.event)}</td><td>${esc(e.step || "")}</td><td>${esc(e.attempt || "")}</td>
      <td class="mono">${esc(e.instance || "")}</td><td>${e.status ? badge(e.status) : ""}</td>
      <td>${esc((e.sent || []).map((s) => s.step + "#" + s.attempt).join(", "))}</td><td class="mono">${esc(e.replica)}</td></tr>`).join("")}</table>`;
}
function bindRun(wid) {
  for (const b of document.querySelectorAll("button[data-action]")) {
    b.onclick = () => act(`/api/runs/${encodeURIComponent(wid)}/${b.dataset.action}`, {}, `${b.dataset.action} ${wid}`);
  }
  // A waiting step's Approve/Reject: its signal, with {approved: true|false, by: "dashboard"}.
  for (const b of document.querySelectorAll("button[data-signal]")) {
    b.onclick = () => act(`/api/runs/${encodeURIComponent(wid)}/signal`,
      { event: b.dataset.signal, payload: { approved: b.dataset.approved === "true", by: "dashboard" } },
      `signal ${b.dataset.signal} ${wid}`);
  }
}

function dag(defs, steps, comps) {
  if (!defs.length) return "";
  const depth = {};
  const byId = Object.fromEntries(defs.map((d) => [d.id, d]));
  const level = (id) => depth[id] ?? (depth[id] = Math.max(-1, ...byId[id].depends_on.map(level)) + 1);
  defs.forEach((d) => level(d.id));
  const columns = {};
  defs.forEach((d) => (columns[depth[d.id]] = columns[depth[d.id]] || []).push(d.id));
  const W = 150, H = 44, GX = 60, GY = 18, pos = {};
  Object.entries(columns).forEach(([c, ids]) => ids.forEach((id, i) => (pos[id] = { x: 10 + c * (W + GX), y: 10 + i * (H + GY) })));
  const width = 20 + Object.keys(columns).length * (W + GX), height = 20 + Math.max(...Object.values(columns).map((c) => c.length)) * (H + GY);
  const lines = defs.flatMap((d) => d.depends_on.map((p) => `<line x1="${pos[p].x + W}" y1="${pos[p].y + H / 2}" x2="${pos[d.id].x}" y2="${pos[d.id].y + H / 2}" stroke="#8a96a3"/>`));
  const boxes = defs.map((d) => {
    const undo = comps[d.id];  // a compensated step is drawn as undone, not as completed
    const s = undo ? (undo.status === "completed" ? "compensated" : "compensation_" + undo.status) : (steps[d.id] || {}).status || "pending";
    const label = d.id.length > 17 ? d.id.slice(0, 16) + "…" : d.id, what = `${s} · ${d.service}`;
    return `<g data-testid="dag-${esc(d.id)}" data-status="${esc(s)}"><rect x="${pos[d.id].x}" y="${pos[d.id].y}" width="${W}" height="${H}" rx="6" fill="#171e26" stroke="${COLORS[s] || "#8a96a3"}"/>
      <title>${esc(d.id)}: ${esc(what)}</title><text x="${pos[d.id].x + 8}" y="${pos[d.id].y + 18}">${esc(label)}</text><text x="${pos[d.id].x + 8}" y="${pos[d.id].y + 35}" style="fill:${COLORS[s] || "#8a96a3"}">${esc(what.length > 22 ? what.slice(0, 21) + "…" : what)}</text></g>`;
  });
  return `<svg class="dag" data-testid="dag" width="${width}" height="${height}">${lines.join("")}${boxes.join("")}</svg>`;
}

// Every attempt of every step and compensation as a bar on one time axis from the run's
// start: its duration beside it, a tooltip with its instance and error, operators'
// controls (cancel, retry) as marks.
function timeline(r, services) {
  const start = r.created_ms, bars = [];
  const add = (list, label, undo) => {
    for (const h of list) if (h.started_ms) bars.push({ label: `${label} #${h.attempt}`, from: h.started_ms,
      to: h.finished_ms || Date.now(), error: h.error, instance: h.instance, undo });
  };
  for (const [sid, list] of Object.entries(r.attempts || {})) add(list, sid, false);
  for (const [sid, list] of Object.entries(r.undo_attempts || {})) add(list, `undo ${sid}`, true);
  bars.sort((x, y) => x.from - y.from);
  if (!bars.length) return "";
  const marks = (r.audit || []).filter((e) => String(e.event).startsWith("control:"));
  const end = Math.max(...bars.map((b) => b.to), ...marks.map((m) => m.t)), total = Math.max(1, end - start);
  const W = 640, L = 150, top = 22, x = (t) => L + ((t - start) / total) * W;
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => `<line x1="${L + f * W}" y1="${top - 4}" x2="${L + f * W}" y2="${top + bars.length * 22}" stroke="#2a3441"/>
    <text x="${L + f * W}" y="12" text-anchor="middle" class="tick">+${esc(span(f * total))}</text>`);
  const rows = bars.map((b, i) => {
    const y = top + i * 22, took = b.to - b.from, color = b.error ? "#f85149" : b.undo ? "#a371f7" : "#3fb950";
    const tip = `${b.label}${b.instance ? " on " + b.instance : ""}: ${span(took)}${b.error ? " — " + (b.error.message || b.error) : ""}`;
    return `<g data-testid="bar" data-label="${esc(b.label)}"><title>${esc(tip)}</title><text x="0" y="${y + 11}">${esc(b.label)}</text>
      <rect x="${x(b.from)}" y="${y}" width="${Math.max(2, (took / total) * W)}" height="14" fill="${color}"/>
      <text x="${Math.min(x(b.to) + 4, L + W + 4)}" y="${y + 11}" class="tick">${esc(span(took))}</text></g>`;
  });
  const controls = marks.map((m) => `<g data-testid="mark"><title>${esc(m.event.slice(8))} at ${esc(whenMs(m.t))}</title>
    <line x1="${x(m.t)}" y1="${top - 4}" x2="${x(m.t)}" y2="${top + bars.length * 22}" stroke="#d29922" stroke-dasharray="4 3"/>
    <text x="${x(m.t) + 3}" y="${top + bars.length * 22 + 12}" class="tick">${esc(m.event.slice(8))}</text></g>`);
  return `<h2>Timeline</h2><svg data-testid="timeline" width="${L + W + 70}" height="${top + bars.length * 22 + 18}">${ticks.join("")}${rows.join("")}${controls.join("")}</svg>`;
}

async function services() {
  const [data, keys] = await Promise.all([api("/api/services"), api("/api/keys")]);
  const rows = Object.entries(data.services).map(([name, s]) => {
    const m = s.metrics;
    const inst = s.instances.map((i) => `<div class="mono">${esc(i.instance)} ${badge(i.status)} load ${esc(i.load)}/${esc(i.capacity)}
      <button data-drain="${esc(name)}/${esc(i.instance)}/${i.status === "draining" ? "undrain" : "drain"}">${i.status === "draining" ? "Undrain" : "Drain"}</button></div>`).join("");
    return `<tr data-service="${esc(name)}"><td><a href="#/service/${esc(name)}">${esc(name)}</a></td>
      <td data-testid="breaker-${esc(name)}">${badge(s.breaker.state)} ${s.breaker.state !== "closed" ? `<button data-reset="${esc(name)}">Reset</button>` : ""}</td>
      <td>${esc(s.parked)}${s.flow ? `<div class="muted" data-testid="flow-${esc(name)}">in flight ${esc(s.flow.in_flight)}/${esc(s.flow.max_in_flight ?? "-")}${s.flow.rate ? ` · ${esc(s.flow.rate)}/s` : ""} · queued ${esc(s.flow.queued)}</div>` : ""}</td><td>${num(m.throughput, 2)}</td><td>${num(m.p50_ms, 0)} / ${num(m.p95_ms, 0)} / ${num(m.p99_ms, 0)}</td>
      <td>${pct(m.error_rate)}</td><td>${pct(m.availability)}</td><td>${inst || '<span class="muted">no heartbeats</span>'}</td></tr>`;
  }).join("");
  return `<h2>Services</h2><table data-testid="services"><tr><th>Service</th><th>Breaker</th><th>Parked</th><th>Answers/s</th>
    <th>p50 / p95 / p99 ms</th><th>Errors</th><th>Availability</th><th>Instances</th></tr>${rows}</table>
    <p class="muted">Over the last ${data.window_s / 60} minutes.</p>${concurrencyKeys(keys)}`;
}
// Workflows' concurrency keys: totals per workflow, then the keys with the longest queues.
function concurrencyKeys(keys) {
  const wait = (ms) => (ms == null ? "" : `${num(ms / 1000, 1)} s`);
  const flows = Object.entries(keys.workflows);
  if (!flows.length) return "";
  return `<h2>Concurrency keys</h2><table data-testid="concurrency"><tr><th>Workflow</th><th>Key</th><th>Running</th><th>Queued</th><th>Oldest waiting</th></tr>
    ${flows.map(([name, w]) => `<tr data-testid="keys-${esc(name)}"><td>${esc(name)}</td><td class="muted">${esc(w.keys)} keys</td><td>${esc(w.running)}</td><td>${esc(w.queued)}</td><td>${wait(w.oldest_wait_ms)}</td></tr>`).join("")}
    ${keys.keys.map((k) => `<tr data-testid="key-${esc(k.workflow)}-${esc(k.key)}"><td class="muted">${esc(k.workflow)}</td><td class="mono">${esc(k.key)}</td><td>${esc(k.running)}/${esc(k.limit)}</td><td>${esc(k.queued)}</td><td>${wait(k.oldest_wait_ms)}</td></tr>`).join("")}</table>`;
}
function bindServices() {
  for (const b of document.querySelectorAll("button[data-reset]")) b.onclick = () => act(`/api/services/${encodeURIComponent(b.dataset.reset)}/reset`, {}, `reset breaker of ${b.dataset.reset}`);
  for (const b of document.querySelectorAll("button[data-drain]")) b.onclick = () => act(`/api/services/${b.dataset.drain.split("/").map(encodeURIComponent).join("/")}`, {}, b.dataset.drain);
}

async function service(name) {
  const data = await api(`/api/services/${encodeURIComponent(name)}/series?minutes=30`);
  const p = data.points;
  return `<h2>Service ${esc(name)}</h2>
    ${chart("Answers per second", p, "throughput")}${chart("p95 response time (ms)", p, "p95_ms")}
    ${chart("Error rate", p, "error_rate")}${chart("Parked backlog", p, "parked")}`;
}
function chart(title, points, key) {
  const values = points.filter((p) => p[key] != null);
  if (!values.length) return `<h2>${esc(title)}</h2><p class="muted">No data in the last 30 minutes.</p>`;
  const W = 720, H = 120, t0 = values[0].t, t1 = values[values.length - 1].t || t0 + 1;
  const top = Math.max(...values.map((p) => p[key])) || 1;
  const xy = values.map((p) => `${10 + ((p.t - t0) / Math.max(1, t1 - t0)) * (W - 20)},${H - 10 - (p[key] / top) * (H - 30)}`);
  return `<h2>${esc(title)}</h2><svg class="chart" width="${W}" height="${H}"><text x="10" y="14">max ${num(top, 2)}</text>
    <polyline fill="none" stroke="#58a6ff" stroke-width="1.5" points="${xy.join(" ")}"/></svg>`;
}

async function alerts() {
  const data = await api("/api/alerts");
  const row = (a) => `<tr><td>${badge(a.state)}</td><td>${esc(a.severity)}</td><td>${esc(a.service)}</td><td>${esc(a.metric)}</td>
    <td>${esc(a.message)}</td><td>${when(a.ts_ms)}</td></tr>`;
  return `<h2>Firing</h2>${data.active.length ? `<table data-testid="alerts-active">${data.active.map(row).join("")}</table>` : '<p class="muted">Nothing firing.</p>'}
    <h2>History</h2><table data-testid="alerts-history"><tr><th>State</th><th>Severity</th><th>Service</th><th>Metric</th><th>Message</th><th>When</th></tr>${data.history.map(row).join("")}</table>`;
}

async function schedules() {
  const data = await api("/api/schedules");
  const rows = data.schedules.map((s) => `<tr data-schedule="${esc(s.name)}"><td>${esc(s.name)}</td><td>${esc(s.workflow)}</td>
    <td class="mono">${esc(s.when)}</td><td data-testid="schedule-${esc(s.name)}">${badge(s.paused ? "paused" : "active")}</td>
    <td>${when(s.last_fired_ms)}</td><td>${when(s.next_ms)}</td><td>${esc(s.overlap)} / ${esc(s.catch_up)}</td>
    <td><button data-schedule-action="${s.paused ? "resume" : "pause"}" data-name="${esc(s.name)}">${s.paused ? "Resume" : "Pause"}</button>
      <button data-schedule-action="trigger" data-name="${esc(s.name)}" data-testid="trigger-${esc(s.name)}">Run now</button></td></tr>`).join("");
  return `<h2>Schedules</h2>${rows ? `<table data-testid="schedules"><tr><th>Name</th><th>Workflow</th><th>When</th><th>State</th>
    <th>Last fired</th><th>Next</th><th>Overlap / catch-up</th><th></th></tr>${rows}</table>` : '<p class="muted">No schedules: a replica records those it loads.</p>'}
    <p class="muted">Backfill a window from the command line: <span class="mono">mediator schedules backfill NAME --since 2d</span>.</p>`;
}
function bindSchedules() {
  for (const b of document.querySelectorAll("button[data-schedule-action]")) {
    b.onclick = () => act(`/api/schedules/${encodeURIComponent(b.dataset.name)}/${b.dataset.scheduleAction}`, {}, `${b.dataset.scheduleAction} ${b.dataset.name}`);
  }
}

async function dlq() {
  const data = await api("/api/dlq?limit=100");
  return `<h2>Dead letters</h2><table data-testid="dlq"><tr><th></th><th>Where</th><th>Code</th><th>From</th><th>Reason</th><th>When</th></tr>
    ${data.letters.map((l) => `<tr><td><button data-replay="${esc(l.coordinates)}">Replay</button></td><td class="mono">${esc(l.coordinates)}</td>
      <td>${esc(l.code || "")}</td><td>${esc(l.source_topic)}</td><td>${esc(l.reason)}</td><td>${when(l.rejected_ms)}</td></tr>`).join("")}</table>`;
}
function bindDlq() {
  for (const b of document.querySelectorAll("button[data-replay]")) b.onclick = () => act("/api/dlq/replay", { coordinates: [b.dataset.replay] }, `replay ${b.dataset.replay}`);
}

// -- routing -------------------------------------------------------------------------------

function route() {
  const [path, query] = (location.hash.slice(1) || "/overview").split("?");
  const parts = path.split("/").filter(Boolean);
  const params = new URLSearchParams(query || "");
  const pages = {
    overview: [overview, null], runs: [() => runs(params), bindRuns], run: [() => run(parts[1]), () => bindRun(parts[1])],
    services: [services, bindServices], service: [() => service(parts[1]), null], alerts: [alerts, null], dlq: [dlq, bindDlq],
    schedules: [schedules, bindSchedules],
  };
  const page = pages[parts[0]] || pages.overview;
  const nav = { run: "runs", service: "services" }[parts[0]] || parts[0];
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === nav);
  return { page, live: parts[0] !== "dlq" && parts[0] !== "runs" };
}

let rendering = false;
async function refresh() {
  if (rendering) return;
  rendering = true;
  const { page } = route();
  const main = document.getElementById("main");
  const live = document.getElementById("live");
  try {
    const html = await page[0]();
    const focused = document.activeElement && main.contains(document.activeElement) && document.activeElement.tagName === "INPUT";
    const checked = new Set([...main.querySelectorAll("input[type=checkbox]:checked")].map((i) => i.value));
    if (!focused) {
      main.innerHTML = html;
      for (const i of main.querySelectorAll("input[type=checkbox]")) i.checked = checked.has(i.value);
      if (page[1]) page[1]();
    }
    live.classList.remove("stale"); live.textContent = "live · " + new Date().toLocaleTimeString();
  } catch (e) {
    live.classList.add("stale"); live.textContent = "stale: " + e.message;
  } finally {
    rendering = false;
  }
}

function start() {
  clearInterval(timer);
  refresh();
  timer = setInterval(() => { if (route().live || true) refresh(); }, REFRESH_MS);
}
window.addEventListener("hashchange", start);
start();

// The analyst's page: only npcapserve's public API (docs/API.md), no framework, no build.
// State: the shown range [range.b, range.e) and the applied filter; every view (chart,
// tables, download links) is redrawn from them. Times are epoch seconds in the browser.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { range: null, filter: "", by: "conversation", sort: "bytes", limit: 25,
                local: null, extent: null, metric: "bytes", gen: 0 };
const POINTS = 600;  // chart steps across the range: finer as the range narrows
let chart = null;

class AuthError extends Error {}

// One API call: JSON back, or an Error carrying the server's one-line message.
// data-busy on <body> counts the calls in flight (0: the page shows the current state).
let inFlight = 0;
async function api(path, params, init) {
  const url = params ? `${path}?${new URLSearchParams(params)}` : path;
  document.body.dataset.busy = String(++inFlight);
  let r, body = null;
  try {
    r = await fetch(url, { credentials: "same-origin",
      ...init, headers: { "X-Requested-With": "pcapvault", ...(init && init.headers) } });
    try { body = await r.json(); } catch (e) { body = null; }
  } catch (e) {
    throw new Error("the server cannot be reached; try again");
  } finally {
    document.body.dataset.busy = String(--inFlight);
  }
  if (r.status === 401) throw new AuthError(body && body.error || "log in");
  if (!r.ok) throw new Error(body && body.error || `${r.status} ${r.statusText}`);
  return body;
}

// --- times: local in the page, UTC on hover ---------------------------------------------
function local(sec) {
  return new Date(sec * 1000).toLocaleString(undefined, { hour12: false });
}
function utc(sec) { return new Date(sec * 1000).toISOString(); }
// A time as the From/To boxes show it: the browser's local clock with its UTC offset, one of
// npcapextract's forms (2025-11-21 14:05:00.250+01:00), so a shown time can be edited and sent.
function typed(sec) {
  // rounded: seconds from ns in a double can fall a hair short of the millisecond they name
  const d = new Date(Math.round(sec * 1000)), p = (n, w = 2) => String(n).padStart(w, "0");
  const off = -d.getTimezoneOffset(), a = Math.abs(off);
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
    `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}` +
    (d.getMilliseconds() ? `.${p(d.getMilliseconds(), 3)}` : "") +
    `${off < 0 ? "-" : "+"}${p(Math.floor(a / 60))}:${p(a % 60)}`;
}
function timeSpan(sec) {
  const s = document.createElement("span");
  s.textContent = local(sec);
  s.title = utc(sec);
  return s;
}
function isoSec(text) { return text ? Date.parse(text) / 1000 : null; }
function human(n, unit) {
  const k = ["", "k", "M", "G", "T"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < k.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(n < 10 && i ? 2 : n < 100 && i ? 1 : 0)} ${k[i]}${unit}`;
}
function bytes(n) {
  const k = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < k.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${k[i]}`;
}

// --- login ------------------------------------------------------------------------------
function showLogin(message) {
  $("main").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("user").focus();
}

async function start() {
  let me, status;
  try {  // side by side: the first view waits for both
    [me, status] = await Promise.all([api("/session"), api("/api/v1/status")]);
  } catch (e) {
    showLogin(e instanceof AuthError ? "" : e.message);
    return;
  }
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = me.user;
  $("restricted").hidden = !me.restricted_to;
  $("restricted").textContent = me.restricted_to
    ? `You see only traffic matching: ${me.restricted_to}` : "";
  showStatus(status);
  if (!state.range) setRange("all");
  else refresh();
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("login-error").textContent = "Checking…";
  try {
    await api("/login", null, { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ user: $("user").value, password: $("password").value }) });
    $("password").value = "";
    $("login-error").textContent = "";
    start();
  } catch (e) {
    $("login-error").textContent = e.message;
  }
});

$("logout").addEventListener("click", async () => {
  try { await api("/logout", null, { method: "POST" }); } catch (e) { /* ended anyway */ }
  state.range = null;
  state.filter = "";
  $("filter").value = "";
  if (chart) { chart.destroy(); chart = null; }
  $("table").tBodies[0].replaceChildren();
  showLogin("Logged out.");
});

// --- health and the data's extent --------------------------------------------------------
function showStatus(st) {
  const body = $("health-table").tBodies[0];
  body.replaceChildren();
  let first = null, last = null;
  for (const d of st.dumpsets) {
    const tr = body.insertRow();
    const cell = (v, cls) => { const td = tr.insertCell(); if (cls) td.className = cls;
      if (v instanceof Node) td.append(v); else td.textContent = v; return td; };
    if (d.error) { cell(d.path); cell(d.error).colSpan = 6; continue; }
    cell(d.interface || d.path).title = d.path;
    const up = cell(d.recorder_up ? "up" : "down");
    if (!d.recorder_up) up.className = "down";
    cell(d.packets_received != null
      ? `${(d.packets_dropped || 0).toLocaleString()} of ${d.packets_received.toLocaleString()}`
      : "–", "n");
    cell(`${bytes(d.bytes_on_disk || 0)} / ${d.budget_bytes ? bytes(d.budget_bytes) : "–"}`, "n");
    const f = isoSec(d.first_packet), l = isoSec(d.last_packet);
    cell(f ? timeSpan(f) : "–");
    cell(l ? timeSpan(l) : "–");
    cell(`${d.files_pending_index || 0} files`, "n");
    if (f && (first === null || f < first)) first = f;
    if (l && (last === null || l > last)) last = l;
  }
  const sel = $("dumpsets"), chosen = sel.value;
  sel.replaceChildren(new Option("all", ""));
  for (const d of st.dumpsets) sel.append(new Option(d.interface || d.path, d.path));
  sel.value = [...sel.options].some((o) => o.value === chosen) ? chosen : "";
  $("dumpsets-label").hidden = st.dumpsets.length < 2;
  state.extent = first === null ? null : { b: first, e: last };
  const ext = $("extent");
  ext.replaceChildren();
  if (state.extent) ext.append("Data from ", timeSpan(first), " to ", timeSpan(last));
  else ext.textContent = "No recorded data yet.";
}

// The health panel stays current while the page is open (status is cheap: no index read).
setInterval(() => {
  if (!$("main").hidden) api("/api/v1/status").then(showStatus).catch(() => {});
}, 30000);

// --- the range ---------------------------------------------------------------------------
function setRange(what) {
  const now = Date.now() / 1000;
  if (what === "all") {
    const x = state.extent || { b: now - 3600, e: now };
    // end exclusive: one step past the newest packet so that it is counted
    const pad = Math.max((x.e - x.b) / POINTS, 0.001);
    state.range = { b: x.b, e: x.e + pad };
  } else {
    state.range = { b: now - Number(what), e: now };
  }
  refresh();
}

document.querySelectorAll("[data-range]").forEach((btn) =>
  btn.addEventListener("click", () => setRange(btn.dataset.range)));

// Typed times in npcapextract's forms: the server parses them (conversations gives the
// window back in ns), so the page accepts exactly what the command line does.
$("times").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const t = await api("/api/v1/conversations", { begin: $("begin").value || "-1h",
      end: $("end").value || "now", limit: 1, filter: state.filter });
    state.range = { b: t.begin_ns / 1e9, e: t.end_ns / 1e9 };
    $("chart-error").textContent = "";
    refresh();
  } catch (e) { failed(e, "chart-error"); }
});

// Zoom out: twice the range about its middle (the way back after drags).
$("zoom-out").addEventListener("click", () => {
  const w = state.range, half = w.e - w.b;
  state.range = { b: w.b - half / 2, e: w.e + half / 2 };
  refresh();
});

$("metric").addEventListener("change", () => { state.metric = $("metric").value; drawChart(); });
$("dumpsets").addEventListener("change", () => refresh());

// --- the filter: checked as typed, applied on Enter ---------------------------------------
let checkTimer = null, checkGen = 0;
$("filter").addEventListener("input", () => {
  clearTimeout(checkTimer);
  checkTimer = setTimeout(checkFilter, 250);
});
async function checkFilter() {
  const expr = $("filter").value, gen = ++checkGen;
  try {
    await api("/api/v1/filter", { expr });
    if (gen !== checkGen) return;
    $("filter-error").textContent = "";
    $("filter").classList.remove("bad");
    return true;
  } catch (e) {
    if (gen !== checkGen) return;
    if (e instanceof AuthError) { showLogin(e.message); return false; }
    $("filter-error").textContent = e.message;
    $("filter").classList.add("bad");
    return false;
  }
}
$("filter-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (await checkFilter()) { state.filter = $("filter").value.trim(); refresh(); }
});
$("clear-filter").addEventListener("click", () => {
  $("filter").value = "";
  $("filter-error").textContent = "";
  $("filter").classList.remove("bad");
  state.filter = "";
  refresh();
});
function narrow(expr) {
  const f = state.filter ? `(${state.filter}) and ${expr}` : expr;
  $("filter").value = f;
  $("filter-error").textContent = "";
  state.filter = f;
  refresh();
}

// --- everything from the state ----------------------------------------------------------
function windowParams() {
  const p = { begin: state.range.b.toFixed(6), end: state.range.e.toFixed(6),
              filter: state.filter };
  if ($("dumpsets").value) p.dumpset = $("dumpsets").value;  // one interface, else all
  return p;
}

function failed(e, where) {
  if (e instanceof AuthError) showLogin(e.message);
  else $(where).textContent = e.message;
}

async function refresh() {
  const gen = ++state.gen;
  const w = state.range;
  const win = $("window");
  win.replaceChildren("Window: ", timeSpan(w.b), " – ", timeSpan(w.e),
    " (drag across the chart to narrow it)");
  $("begin").value = typed(w.b);
  $("begin").title = utc(w.b);
  $("end").value = typed(w.e);
  $("end").title = utc(w.e);
  updateLinks(null);
  await Promise.all([loadVolume(gen), loadTable(gen)]);
}

async function loadVolume(gen) {
  const w = state.range;
  let stepMs = Math.max(1, Math.ceil((w.e - w.b) * 1000 / POINTS));
  let b = w.b;
  // Steps of whole seconds start on a whole second: the server then counts the files the
  // window holds whole from their indexes' time bins, not their packets.
  if (stepMs >= 1000) {
    stepMs = Math.ceil(stepMs / 1000) * 1000;
    b = Math.floor(b);
  }
  try {
    const v = await api("/api/v1/volume",
      { ...windowParams(), begin: b.toFixed(6), step: `${stepMs}ms` });
    if (gen !== state.gen) return;
    state.volume = v;
    $("chart-error").textContent = "";
    drawChart();
  } catch (e) { if (gen === state.gen) failed(e, "chart-error"); }
}

function drawChart() {
  const v = state.volume;
  if (!v) return;
  const step = v.step_ns / 1e9, b = v.begin_ns / 1e9;
  const xs = v.packets.map((_, i) => b + i * step);
  const ys = (state.metric === "bytes" ? v.bytes.map((n) => n * 8) : v.packets)
    .map((n) => n / step);
  const unit = state.metric === "bytes" ? "bit/s" : "packet/s";
  const el = $("chart");
  const opts = {
    width: el.clientWidth || 800, height: 260,
    scales: { x: { time: true } },
    series: [{ value: (u, x) => x == null ? "" : local(x) },
             { label: unit, stroke: "#1f6feb", fill: "rgba(31,111,235,.15)",
               value: (u, y) => y == null ? "" : human(y, unit), paths: uPlot.paths.stepped({ align: 1 }) }],
    axes: [{}, { values: (u, vals) => vals.map((y) => human(y, "")), size: 60 }],
    cursor: { drag: { x: true, y: false, setScale: false } },
    hooks: { setSelect: [(u) => {
      if (u.select.width < 2) return;
      const a = u.posToVal(u.select.left, "x"), z = u.posToVal(u.select.left + u.select.width, "x");
      u.setSelect({ left: 0, width: 0 }, false);
      state.range = { b: a, e: z };  // the selected window, asked again at finer steps
      refresh();
    }] },
  };
  if (chart) chart.destroy();
  chart = new uPlot(opts, [xs, ys], el);
  el.dataset.points = String(xs.length);
  performance.mark("pv-chart");  // bench/web.py: when the first view is filled
  el.dataset.total = String(v.packets.reduce((s, n) => s + n, 0));
}

// The chart follows its column's width: a window resized, or a scroll bar that appears once
// the tables are filled (no resize event for that).
new ResizeObserver(() => {
  const width = $("chart").clientWidth;
  if (chart && width && Math.abs(chart.width - width) > 1) chart.setSize({ width, height: 260 });
}).observe($("chart"));

// --- download links ----------------------------------------------------------------------
function updateLinks(table) {
  for (const fmt of ["pcap", "pcapng"]) {
    $(`dl-${fmt}`).href = state.range
      ? `/api/v1/pcap?${new URLSearchParams({ ...windowParams(), format: fmt })}` : "#";
  }
  $("dl-info").textContent = table
    ? `${table.packets.toLocaleString()} packets, ${bytes(table.bytes)} on the wire` : "";
}

// --- conversations, endpoints, ports -------------------------------------------------------
const COLUMNS = {
  conversation: [["address_a", "Address A"], ["port_a", "Port A"], ["address_b", "Address B"],
    ["port_b", "Port B"], ["protocol", "Protocol"], ["packets", "Packets", 1],
    ["bytes", "Bytes", 1], ["start_ns", "Start"], ["duration_s", "Duration s", 1]],
  endpoint: [["address", "Address"], ["packets", "Packets", 1], ["bytes", "Bytes", 1],
    ["tx_packets", "Tx packets", 1], ["tx_bytes", "Tx bytes", 1],
    ["rx_packets", "Rx packets", 1], ["rx_bytes", "Rx bytes", 1]],
  port: [["protocol", "Protocol"], ["port", "Port", 1], ["packets", "Packets", 1],
    ["bytes", "Bytes", 1], ["conversations", "Conversations", 1]],
};

// The filter that narrows to a row (tcpdump syntax).
function rowFilter(by, r) {
  if (by === "endpoint") return `host ${r.address}`;
  if (by === "port") return r.port != null ? `${r.protocol} port ${r.port}` : r.protocol;
  let f = `host ${r.address_a} and host ${r.address_b}`;
  if (r.port_a != null && r.port_b != null) {
    f += r.port_a === r.port_b ? ` and port ${r.port_a}`
      : ` and port ${r.port_a} and port ${r.port_b}`;
  }
  return f;
}

async function loadTable(gen) {
  const by = state.by;
  try {
    const t = await api("/api/v1/conversations",
      { ...windowParams(), by, sort: state.sort, limit: state.limit });
    if (gen !== state.gen) return;
    state.table = t;
    $("table-error").textContent = "";
    drawTable();
    updateLinks(t);
  } catch (e) { if (gen === state.gen) failed(e, "table-error"); }
}

function drawTable() {
  const t = state.table, cols = COLUMNS[t.by];
  const head = $("table").tHead;
  head.replaceChildren();
  const hr = head.insertRow();
  // bytes and packets: the server's top N by that; any other column sorts the rows shown
  const sorted = state.local ? state.local.key : state.sort;
  const dir = state.local ? state.local.dir : "descending";
  for (const [key, label, num] of cols) {
    const th = document.createElement("th");
    th.textContent = label + (key === sorted ? (dir === "descending" ? " ▼" : " ▲") : "");
    if (num) th.className = "n";
    th.dataset.key = key;
    th.tabIndex = 0;
    th.setAttribute("aria-sort", key === sorted ? dir : "none");
    hr.append(th);
  }
  const shown = [...t.rows];
  if (state.local) {
    const { key } = state.local, k = state.local.dir === "ascending" ? 1 : -1;
    shown.sort((a, b) => (a[key] > b[key] ? 1 : a[key] < b[key] ? -1 : 0) * k);
  }
  const body = $("table").tBodies[0];
  body.replaceChildren();
  for (const r of shown) {
    const tr = body.insertRow();
    tr.tabIndex = 0;
    tr.dataset.filter = rowFilter(t.by, r);
    tr.title = `Narrow the filter to: ${tr.dataset.filter}`;
    for (const [key, , num] of cols) {
      const td = tr.insertCell();
      const v = r[key];
      if (key === "start_ns") td.append(timeSpan(v / 1e9));
      else td.textContent = v == null ? "–" : num ? Number(v).toLocaleString() : v;
      if (num) td.className = "n";
    }
  }
  $("table-info").textContent =
    `${t.rows.length} of ${t.total_rows} rows` + (t.read_packets ? " (packets read)" : "");
  $("more").hidden = t.rows.length >= t.total_rows;
  performance.mark("pv-table");
}

$("table").addEventListener("click", (ev) => {
  const th = ev.target.closest("th[data-key]");
  if (th) { sortBy(th.dataset.key); return; }
  const tr = ev.target.closest("tbody tr");
  if (tr) narrow(tr.dataset.filter);
});
$("table").addEventListener("keydown", (ev) => {
  if (ev.key !== "Enter" && ev.key !== " ") return;
  const th = ev.target.closest("th[data-key]");
  const tr = ev.target.closest("tbody tr");
  if (th || tr) ev.preventDefault();
  if (th) sortBy(th.dataset.key);
  else if (tr) narrow(tr.dataset.filter);
});
function sortBy(key) {
  if (key === "bytes" || key === "packets") {
    state.sort = key;
    state.local = null;
    loadTable(state.gen);
  } else {
    const again = state.local && state.local.key === key && state.local.dir === "ascending";
    state.local = { key, dir: again ? "descending" : "ascending" };
    drawTable();
  }
}

document.querySelectorAll("[role=tab]").forEach((tab) => tab.addEventListener("click", () => {
  document.querySelectorAll("[role=tab]").forEach((t) =>
    t.setAttribute("aria-selected", String(t === tab)));
  state.by = tab.dataset.by;
  state.limit = 25;
  state.local = null;
  loadTable(state.gen);
}));
$("more").addEventListener("click", () => { state.limit *= 4; loadTable(state.gen); });

start();

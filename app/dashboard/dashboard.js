// The metrics dashboard: static page, data from the JSON API with the read token as Bearer.
// window.dashboard exposes state (fetch count, charts, last answer) for the browser tests.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const REFRESH_MS = 60000;
  const CLASS_COLORS = { "1xx": "#9aa", "2xx": "#3a7", "3xx": "#58c", "4xx": "#e90", "5xx": "#c33" };
  const PALETTE = ["#c33", "#e90", "#58c", "#93c", "#3a7", "#888", "#c6c", "#088"];
  const state = { fetches: 0, charts: {}, last: null, token: null, app: null, timer: null, seq: 0 };
  window.dashboard = state;

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }
  function clearError() { $("error").hidden = true; $("error").textContent = ""; }
  function setStatus(text) { $("status").textContent = text; }

  async function api(path) {
    state.fetches += 1;
    const resp = await fetch(path, { headers: { Authorization: "Bearer " + state.token } });
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) {
      const err = body && body.error ? body.error : { code: "http_" + resp.status, message: resp.statusText };
      const e = new Error(err.message);
      e.code = err.code; e.status = resp.status;
      throw e;
    }
    return body;
  }

  function explain(e) {
    if (e.status === 401) return "The token was refused: " + e.message;
    if (e.status === 404) return "No data: " + e.message;
    if (e.status === 400) return "Bad request: " + e.message;
    if (e.status === 503) return "The metrics store is unavailable; retrying on the next refresh. (" + e.message + ")";
    return "Request failed: " + e.message;
  }

  const pick = (points, f) => points.map((p) => { const v = f(p); return v === undefined ? null : v; });

  function chartSpecs(doc) {
    const pts = doc.points;
    const perMin = doc.resolution_s / 60;
    const xs = pts.map((p) => p.ts);
    const rt = (k) => pick(pts, (p) => p.response_ms && p.response_ms[k]);
    const mem = (k) => pick(pts, (p) => p.memory_mb && p.memory_mb[k]);
    const cls = (c) => pick(pts, (p) => p.status ? (p.status[c] || 0) / perMin : undefined);
    const codes = [...new Set(pts.flatMap((p) => Object.keys(p.errors || {})))].sort();
    return {
      response: { log: true, series: [["p50", "#3a7", rt("p50")], ["p95", "#e90", rt("p95")], ["p99", "#c33", rt("p99")],
                           ["max", "#999", rt("max"), { dash: [4, 4] }]] },
      throughput: { series: [
        ...["1xx", "2xx", "3xx", "4xx"].map((c) => [c, CLASS_COLORS[c], cls(c)]),
        ["5xx", CLASS_COLORS["5xx"], cls("5xx")],
        ["failed (≥500)", "#c00", pick(pts, (p) => p.failed === undefined ? undefined : p.failed / perMin),
         { width: 3, fill: "rgba(204,0,0,0.15)" }],
      ] },
      errors: { series: codes.map((c, i) => [c, PALETTE[i % PALETTE.length],
                                             pick(pts, (p) => (p.errors ? (p.errors[c] || 0) : (p.requests ? 0 : undefined)))]) },
      memory: { series: [["RSS mean", "#58c", mem("rss_mean")], ["RSS max", "#236", mem("rss_max")],
                         ["swap mean", "#e90", mem("swap_mean")], ["swap max", "#a50", mem("swap_max")],
                         ["quota", "#c33", mem("quota"), { dash: [8, 4], width: 2 }]] },
      load: { series: [["mean", "#58c", pick(pts, (p) => p.load && p.load.mean)],
                       ["max", "#236", pick(pts, (p) => p.load && p.load.max)]] },
      xs,
    };
  }

  function draw(name, xs, series, log) {
    const el = $("chart-" + name);
    if (state.charts[name]) { state.charts[name].destroy(); delete state.charts[name]; }
    el.textContent = "";
    const shown = series.filter((s) => s[2].some((v) => v !== null));
    if (!shown.length) {
      const p = document.createElement("p");
      p.className = "empty";
      p.textContent = "no data in this range";
      el.appendChild(p);
      return;
    }
    const opts = {
      width: Math.max(320, el.clientWidth || 900), height: 220,
      // Response times span 1 ms .. 30 s (router timeouts): a log axis keeps p50 readable next to max.
      scales: log ? { x: { time: true }, y: { distr: 3, log: 10 } } : { x: { time: true } },
      series: [{}, ...shown.map(([label, stroke, , extra]) => Object.assign(
        { label, stroke, width: 1.5, spanGaps: false, points: { show: xs.length < 200 } }, extra || {}))],
      axes: [{}, { size: 60 }],
    };
    state.charts[name] = new uPlot(opts, [xs, ...shown.map((s) => s[2])], el);
  }

  function render(doc) {
    const specs = chartSpecs(doc);
    for (const name of ["response", "throughput", "errors", "memory", "load"]) {
      draw(name, specs.xs, specs[name].series, specs[name].log);
    }
  }

  async function load() {
    if (!state.token || !state.app) return;
    const seq = ++state.seq;
    const span = parseInt($("range").value, 10);
    const until = Math.ceil(Date.now() / 60000) * 60 + 60;  // include the still-open minute
    const proc = $("proc").value.trim() || "web";
    const qs = new URLSearchParams({ process_type: proc, since: String(until - span), until: String(until) });
    setStatus("loading…");
    try {
      const doc = await api("/v1/apps/" + encodeURIComponent(state.app) + "/metrics?" + qs);
      if (seq !== state.seq) return;  // a newer request (range switch) superseded this one
      clearError();
      state.last = doc;
      render(doc);
      setStatus(`${doc.app} · ${doc.process_type} · ${doc.points.length} points at ${doc.resolution_s / 60} min ` +
                `resolution · updated ${new Date().toLocaleTimeString()} · refreshes every minute`);
    } catch (e) {
      if (seq !== state.seq) return;
      showError(explain(e));
      setStatus("");
    }
  }

  async function connect(ev) {
    if (ev) ev.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("minutely.token", state.token);
    try {
      const me = await api("/v1/whoami");
      state.app = me.app;
      $("app").value = me.app;
    } catch (e) {
      state.app = null;
      $("app").value = "";
      for (const name of Object.keys(state.charts)) { state.charts[name].destroy(); delete state.charts[name]; }
      showError(explain(e));
      setStatus("");
      return;
    }
    await load();
    if (state.timer) clearInterval(state.timer);
    state.timer = setInterval(load, REFRESH_MS);
  }

  $("controls").addEventListener("submit", connect);
  $("range").addEventListener("change", load);
  $("proc").addEventListener("change", load);
  if (typeof uPlot === "undefined") {
    showError("The charting library is missing: run `make install` (it fetches uPlot into .deps/uplot).");
  }
  const saved = sessionStorage.getItem("minutely.token");
  if (saved) { $("token").value = saved; connect(null); }
})();

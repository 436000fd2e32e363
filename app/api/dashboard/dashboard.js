// The metrics dashboard: static page, data from the JSON API with the read token as Bearer.
// window.dashboard exposes state (fetch count, charts, last answer) for the browser tests.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const REFRESH_MS = 60000;
  const CLASS_COLORS = { "1xx": "#9aa", "2xx": "#3a7", "3xx": "#58c", "4xx": "#e90", "5xx": "#c33" };
  const PALETTE = ["#c33", "#e90", "#58c", "#93c", "#3a7", "#888", "#c6c", "#088"];
  const ALERT_COLORS = { firing: "#c00", still_firing: "#e60", resolved: "#2a2" };
  const SCALE_COLORS = { up: "#06c", down: "#639" };
  const CHARTS = ["response", "throughput", "errors", "memory", "load"];
  // Platform events (point.platform counts): where each is drawn, and its colour.
  const PLATFORM_ON = { R14: ["memory"], R15: ["memory"], scale: ["load"], R10: ["throughput"], R12: ["throughput"],
                        R13: ["throughput"], R16: ["throughput"], R17: ["throughput"], R99: ["throughput"],
                        crash: CHARTS, restart: CHARTS, release: CHARTS };
  const PLATFORM_COLORS = { R14: "#c60", R15: "#900", crash: "#c00", restart: "#777", release: "#2a6", scale: "#06c" };
  const ADDON_GROUPS = [["sizes (MB)", (k) => k.endsWith("_mb")], ["load", (k) => k.startsWith("load_avg")],
                        ["connections", (k) => k.includes("connections")],
                        ["ratios", (k) => k.endsWith("_rate") || k.includes("percentage")], ["other", () => true]];
  // Language runtime metrics (Heroku's agents, OpenTelemetry runtime conventions): a custom metric whose name
  // starts with a language's prefix is charted with that language, grouped by kind (docs/dashboard.md).
  const LANGUAGES = [["Go", /^go\./], ["JVM", /^jvm[._]/], ["Node.js", /^(node|nodejs|v8js)\./],
                     ["Ruby", /^(ruby\.|Rack\.Server\.)/i], ["Python", /^(cpython|python)\./]];
  const inBytes = (k) => /\.bytes$/.test(k) || /_bytes_/.test(k) || /^(jvm|go|v8js)\.memory\..*(used|limit|committed)$/.test(k) ||
                         k === "go.gc.goal";
  const LANGUAGE_KINDS = [["memory (MB)", inBytes],
                          ["GC", (k) => /(gc|garbage)/i.test(k)],
                          ["goroutines and threads", (k) => /(routine|thread)/i.test(k)],
                          ["event-loop delay", (k) => /eventloop/i.test(k)], ["other", () => true]];
  const MB = 1024 * 1024;
  const EVENTS_MAX_SPAN_S = 7 * 86400;
  const state = { fetches: 0, charts: {}, last: null, events: [], markers: {}, drawn: {}, token: null, app: null,
                  timer: null, seq: 0, addons: [], languages: [], appDoc: null };
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

  // Markers: alert transitions on the response-time chart, scaling steps on the dyno-load chart. Each is a
  // vertical line at its minute with a short label; window.dashboard.markers lists what was drawn (tests).
  function markerSpecs(events) {
    const alerts = events.filter((e) => e.kind === "alert").map((e) => ({
      ts: e.ts, color: ALERT_COLORS[e.status] || "#c00",
      label: (e.status === "resolved" ? "▼ " : "▲ ") + (e.metric === "ERROR_RATE" ? "errors " : "p95 ") +
             e.status.replace("_", " "),
      title: `${e.status} ${e.metric} value ${e.value} threshold ${e.threshold} (${e.monitor_id})`,
    }));
    const scaling = events.filter((e) => e.kind === "autoscale").map((e) => ({
      ts: e.ts, color: SCALE_COLORS[e.action] || "#06c",
      label: `dynos ${e.from_dynos}→${e.to_dynos}`, title: `${e.action}: ${e.reason || ""}`,
    }));
    return { response: alerts, load: scaling };
  }

  // Platform events of this process type's points, plus the app-wide ones (releases) of the `app` series.
  function platformMarkers(doc, appDoc) {
    const out = Object.fromEntries(CHARTS.map((c) => [c, []]));
    const add = (points, only) => {
      for (const p of points || []) {
        for (const [name, n] of Object.entries(p.platform || {})) {
          if (only && !only.includes(name)) continue;
          for (const chart of PLATFORM_ON[name] || []) {
            out[chart].push({ ts: p.ts, color: PLATFORM_COLORS[name] || "#555", label: n > 1 ? `${name} ×${n}` : name,
                              title: `${n} × ${name} in this bucket` });
          }
        }
      }
    };
    add(doc.points, null);
    if (appDoc && appDoc !== doc) add(appDoc.points, ["release"]);
    return out;
  }

  // The extra charts (add-ons, language runtimes): destroyed and their box emptied before each render.
  function clearCharts(prefix, boxId) {
    for (const name of Object.keys(state.charts)) {
      if (name.startsWith(prefix)) { state.charts[name].destroy(); delete state.charts[name]; }
    }
    const box = $(boxId);
    box.textContent = "";
    return box;
  }

  function chartSection(box, name, title) {
    const section = document.createElement("div");
    const h = document.createElement("h3");
    h.textContent = title;
    const el = document.createElement("div");
    el.className = "chart";
    el.id = "chart-" + name;
    section.append(h, el);
    box.appendChild(section);
  }

  // Names into groups, each name in the first group whose test it passes; each(group, names, index) per
  // non-empty group.
  function grouped(names, groups, each) {
    const taken = new Set();
    groups.forEach(([group, test], gi) => {
      const mine = names.filter((k) => !taken.has(k) && test(k));
      mine.forEach((k) => taken.add(k));
      if (mine.length) each(group, mine, gi);
    });
  }

  function drawAddons(appDoc) {
    const box = clearCharts("addon-", "addon-charts");
    const pts = appDoc ? appDoc.points : [];
    const sources = [...new Set(pts.flatMap((p) => Object.keys(p.addons || {})))].sort();
    $("addons").hidden = !sources.length;
    state.addons = [];
    const xs = pts.map((p) => p.ts);
    sources.forEach((src, si) => {
      const samples = [...new Set(pts.flatMap((p) => Object.keys((p.addons || {})[src] || {})))].sort();
      grouped(samples, ADDON_GROUPS, (group, names, gi) => {
        const name = `addon-${si}-${gi}`;
        chartSection(box, name, `${src} · ${group}`);
        const series = names.map((k, i) => [k, PALETTE[i % PALETTE.length],
          pick(pts, (p) => { const g = ((p.addons || {})[src] || {})[k]; return g ? g.mean : undefined; })]);
        draw(name, xs, series, false, [], appDoc.resolution_s);
        state.addons.push(`${src} · ${group}`);
      });
    });
  }

  // One chart per language and kind: gauges by their mean per bucket, counters by their sum per bucket,
  // timers (histograms) by their p95; byte-valued names in MB.
  function drawLanguages(doc) {
    const box = clearCharts("lang-", "language-charts");
    const pts = doc ? doc.points : [];
    const names = [...new Set(pts.flatMap((p) => Object.keys(p.metrics || {})))].sort();
    state.languages = [];
    const xs = pts.map((p) => p.ts);
    LANGUAGES.forEach(([lang, prefix], li) => {
      grouped(names.filter((k) => prefix.test(k)), LANGUAGE_KINDS, (kind, group, ki) => {
        const name = `lang-${li}-${ki}`;
        chartSection(box, name, `${lang} · ${kind}`);
        const series = group.map((k, i) => [k, PALETTE[i % PALETTE.length],
          pick(pts, (p) => {
            const m = (p.metrics || {})[k];
            if (!m) return undefined;
            const v = m.type === "counter" ? m.sum : (m.type === "gauge" ? m.mean : m.p95);
            return v === null || v === undefined ? undefined : (inBytes(k) ? v / MB : v);
          })]);
        draw(name, xs, series, false, [], doc.resolution_s);
        state.languages.push(`${lang} · ${kind}`);
      });
    });
    $("languages").hidden = !state.languages.length;
  }

  function markerPlugin(name, markers) {
    return { hooks: { draw: [(u) => {
      const ctx = u.ctx;
      const [x0, x1] = [u.scales.x.min, u.scales.x.max];
      ctx.save();
      ctx.font = `${Math.round(11 * devicePixelRatio)}px system-ui, sans-serif`;
      ctx.textAlign = "left";  // uPlot's axes leave other alignments set on the shared context
      ctx.textBaseline = "alphabetic";
      let row = 0;
      state.drawn[name] = [];
      for (const m of markers) {
        if (m.ts < x0 || m.ts > x1) continue;
        const x = Math.round(u.valToPos(m.ts, "x", true));
        ctx.strokeStyle = m.color;
        ctx.fillStyle = m.color;
        ctx.lineWidth = 1.5 * devicePixelRatio;
        ctx.setLineDash([5 * devicePixelRatio, 3 * devicePixelRatio]);
        ctx.beginPath();
        ctx.moveTo(x, u.bbox.top);
        ctx.lineTo(x, u.bbox.top + u.bbox.height);
        ctx.stroke();
        ctx.setLineDash([]);
        ctx.fillText(m.label, x + 3 * devicePixelRatio, u.bbox.top + (12 + 12 * (row++ % 3)) * devicePixelRatio);
        state.drawn[name].push(m.label);
      }
      ctx.restore();
    }] } };
  }

  function draw(name, xs, series, log, markers, res) {
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
      // x runs to the end of the newest bucket, so a marker inside that bucket is still on the chart.
      scales: Object.assign({ x: { time: true, range: (u, mn, mx) => [mn, mx + res] } },
                            log ? { y: { distr: 3, log: 10 } } : {}),
      series: [{}, ...shown.map(([label, stroke, , extra]) => Object.assign(
        { label, stroke, width: 1.5, spanGaps: false, points: { show: xs.length < 200 } }, extra || {}))],
      axes: [{}, { size: 60 }],
      plugins: markers && markers.length ? [markerPlugin(name, markers)] : [],
    };
    state.markers[name] = markers || [];
    state.charts[name] = new uPlot(opts, [xs, ...shown.map((s) => s[2])], el);
  }

  function render(doc, events, appDoc) {
    const specs = chartSpecs(doc);
    const markers = markerSpecs(events);
    const platform = platformMarkers(doc, appDoc);
    state.markers = {};
    state.drawn = {};
    for (const name of CHARTS) {
      draw(name, specs.xs, specs[name].series, specs[name].log, [...(markers[name] || []), ...platform[name]],
           doc.resolution_s);
    }
    drawAddons(appDoc);
    drawLanguages(doc);
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
      const base = "/v1/apps/" + encodeURIComponent(state.app);
      const appQs = new URLSearchParams({ process_type: "app", since: String(until - span), until: String(until) });
      const [doc, ev, appWide] = await Promise.all([
        api(base + "/metrics?" + qs),
        // Markers are an extra: the charts still show when the events cannot be read.
        // The events API answers at most 7 days (METRICS_EVENTS_MAX_RANGE_DAYS): longer views get the newest week.
        api(base + "/events?" + new URLSearchParams({ process_type: proc,
                                                      since: String(until - Math.min(span, EVENTS_MAX_SPAN_S)),
                                                      until: String(until) })).catch(() => ({ events: [] })),
        // Add-on metrics and releases belong to the whole app (process type `app`): also an extra.
        proc === "app" ? Promise.resolve(null) : api(base + "/metrics?" + appQs).catch(() => null),
      ]);
      const appDoc = proc === "app" ? doc : appWide;
      if (seq !== state.seq) return;  // a newer request (range switch) superseded this one
      clearError();
      state.last = doc;
      state.events = ev.events;
      state.appDoc = appDoc;
      render(doc, ev.events, appDoc);
      setStatus(`${doc.app} · ${doc.process_type} · ${doc.points.length} points at ${doc.resolution_s / 60} min ` +
                `resolution · ${ev.events.length} alert/scaling events ` +
                `· updated ${new Date().toLocaleTimeString()} · refreshes every minute`);
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

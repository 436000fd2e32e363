// The operator's view of a store migration: GET /migration (app/migration/view.py) every 5 s, charted.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const charts = {};
  window.migration = { charts };  // for tests (tests/integration/test_migration.py)
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

  function draw(name, xs, series, yLabel) {
    const el = $(name);
    if (charts[name]) { charts[name].destroy(); delete charts[name]; }
    el.textContent = "";
    if (!xs.length) { el.innerHTML = '<div class="empty">no reads in the last hour</div>'; return; }
    const opts = {
      width: Math.max(400, el.clientWidth || 900), height: 240,
      series: [{}, ...series.map(([label, , dash], i) => ({
        label, stroke: COLORS[Math.floor(i / 2) % COLORS.length], width: 1.5, dash: dash ? [6, 4] : undefined,
        spanGaps: false,
      }))],
      axes: [{}, { size: 60, label: yLabel }],
    };
    charts[name] = new uPlot(opts, [xs, ...series.map((s) => s[1])], el);
  }

  function render(doc) {
    $("phase").textContent = doc.label + " (version " + doc.state.version + ")";
    const s = doc.summary;
    const parts = Object.entries(s.stores).map(([store, v]) =>
      store + ": p50 " + v.p50_ms.toFixed(1) + " ms, p99 " + v.p99_ms.toFixed(1) + " ms (" + v.n + " reads)");
    const rate = s.mismatch_rate === null ? "n/a" : (100 * s.mismatch_rate).toFixed(2) + " %";
    $("summary").textContent = "Last hour: " + parts.join("; ") + ". Shadow reads: " + s.shadows +
      ", differed " + s.mismatched + " (" + rate + "), failed or timed out " + s.failed + ".";
    const xs = doc.minutes.map((m) => m.ts);
    const stores = [...new Set(doc.minutes.flatMap((m) => Object.keys(m.stores)))].sort();
    const lat = [];
    for (const store of stores) {
      lat.push([store + " p50", doc.minutes.map((m) => (m.stores[store] ? m.stores[store].p50_ms : null)), false]);
      lat.push([store + " p99", doc.minutes.map((m) => (m.stores[store] ? m.stores[store].p99_ms : null)), true]);
    }
    draw("latency", xs, lat, "ms");
    draw("mismatch", xs, [["differed %", doc.minutes.map((m) => {
      const compared = m.shadows - m.failed;
      return compared > 0 ? (100 * m.mismatched) / compared : null;
    }), false]], "%");
    const body = $("recent").querySelector("tbody");
    body.textContent = "";
    for (const r of doc.recent_mismatches.slice(-50).reverse()) {
      const tr = document.createElement("tr");
      for (const v of [new Date(r.at_ms).toISOString(), r.app + " / " + r.process_type,
        new Date(r.ts * 1000).toISOString(), r.kind, r.field || "(point)",
        r.serving_store + ": " + JSON.stringify(r.serving), r.other_store + ": " + JSON.stringify(r.other)]) {
        const td = document.createElement("td");
        td.textContent = v;
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
  }

  async function load() {
    try {
      const r = await fetch("/migration", { cache: "no-store" });
      if (!r.ok) throw new Error("GET /migration answered " + r.status);
      render(await r.json());
      $("error").hidden = true;
      $("status").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      $("error").textContent = String(e.message || e);
      $("error").hidden = false;
    }
  }

  load();
  setInterval(load, 5000);
})();

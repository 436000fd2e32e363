// The OpenTelemetry JS SDK with its OTLP/HTTP JSON exporter, configured by the standard OTEL_* variables, records
// known values in ROUNDS rounds (a forceFlush after each, so one export each), then shuts down (one more export:
// the gauge again, and in cumulative mode every total again). It prints one line of JSON to stdout: the truth it
// recorded, for tests/integration/test_otlp.py to compare with the stored minutes. It exits 1 if any export
// failed (the reader swallows export errors, so the exporter is wrapped to see each result).
// Env: OTEL_EXPORTER_OTLP_ENDPOINT (base URL: the exporter appends /v1/metrics), OTEL_EXPORTER_OTLP_HEADERS
// (e.g. "Authorization=Bearer TOKEN"), OTEL_SERVICE_NAME, DYNO (service.instance.id), TEMPORALITY (delta, the
// default, or cumulative), SEED, ROUNDS (default 2), REQUESTS_PER_ROUND (default 300).
import { diag, DiagConsoleLogger, DiagLogLevel } from "@opentelemetry/api";
import { AggregationTemporalityPreference, OTLPMetricExporter } from "@opentelemetry/exporter-metrics-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { MeterProvider, PeriodicExportingMetricReader } from "@opentelemetry/sdk-metrics";

if (!process.env.OTEL_EXPORTER_OTLP_ENDPOINT && !process.env.OTEL_EXPORTER_OTLP_METRICS_ENDPOINT) {
  console.error("set OTEL_EXPORTER_OTLP_ENDPOINT (the exporter would otherwise send to localhost:4318)");
  process.exit(2);
}
// The SDK's own warnings (a partialSuccess answer, a retry) go to stderr; stdout keeps the one truth line.
diag.setLogger(new DiagConsoleLogger(), DiagLogLevel.WARN);

// http.server.request.duration's bucket bounds as the semantic conventions advise (seconds).
const BOUNDS_S = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10];
// 5 of 8 requests answer 200, 2 of 8 404, 1 of 8 500.
const STATUSES = [200, 200, 200, 200, 200, 404, 404, 500];
const cumulative = process.env.TEMPORALITY === "cumulative";
const intEnv = (name, dflt) => {
  const v = Number.parseInt(process.env[name] ?? "", 10);
  return Number.isInteger(v) && v > 0 ? v : dflt;
};
const ROUNDS = intEnv("ROUNDS", 2);
const PER_ROUND = intEnv("REQUESTS_PER_ROUND", 300);

// The exporter, wrapped: PeriodicExportingMetricReader.forceFlush() reports a failed export only to the global
// error handler (a no-op), so each export's result is kept here.
const otlp = new OTLPMetricExporter({
  temporalityPreference: cumulative ? AggregationTemporalityPreference.CUMULATIVE
                                    : AggregationTemporalityPreference.DELTA,
});
const exportErrors = [];
// An OTLPExporterError carries the HTTP status (code) and the answer's body (data).
const describe = (err) => (err?.code !== undefined ? `${err} (HTTP ${err.code}: ${err.data ?? ""})` : String(err?.stack ?? err));
let exportsDone = 0;
const exporter = {
  export(metrics, done) {
    otlp.export(metrics, (result) => {
      exportsDone += 1;
      if (result.code !== 0) exportErrors.push(describe(result.error)); // 0: ExportResultCode.SUCCESS
      done(result);
    });
  },
  forceFlush: () => otlp.forceFlush(),
  shutdown: () => otlp.shutdown(),
  selectAggregationTemporality: (kind) => otlp.selectAggregationTemporality(kind),
  selectAggregation: (kind) => otlp.selectAggregation(kind),
};
// An interval far past the run: exports happen only on forceFlush and shutdown.
const reader = new PeriodicExportingMetricReader({ exporter, exportIntervalMillis: 3600000 });
const provider = new MeterProvider({
  resource: resourceFromAttributes({ "service.name": process.env.OTEL_SERVICE_NAME || "app",
                                     "service.instance.id": process.env.DYNO || "web.1" }),
  readers: [reader],
});
const meter = provider.getMeter("minutely-test", "1.0.0");
const duration = meter.createHistogram("http.server.request.duration", {
  unit: "s", description: "Duration of HTTP server requests.", advice: { explicitBucketBoundaries: BOUNDS_S },
});
const jobs = meter.createCounter("jobs.processed", { description: "Jobs done." });
let depth = 0;
const observedDepths = [];
meter.createObservableGauge("queue.depth", { description: "Jobs waiting." }).addCallback((r) => {
  observedDepths.push(depth);
  r.observe(depth);
});

// A deterministic generator (mulberry32), so a run is reproducible.
let seed = intEnv("SEED", cumulative ? 7 : 3);
const rand = () => {
  seed = (seed + 0x6d2b79f5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};
// Durations are whole multiples of 1/1024 s (log-normal around 80 ms): exact in binary, so every sum, in any
// order or grouping (per status, per export, differenced), is exact and equals the truth's.
const duration_s = () => {
  const z = Math.sqrt(-2 * Math.log(1 - rand())) * Math.cos(2 * Math.PI * rand());
  return Math.max(1, Math.round(1024 * Math.exp(Math.log(0.08) + 0.9 * z))) / 1024;
};

const stats = () => ({ count: 0, sum: 0, min: null, max: null });
const add = (s, v) => {
  s.count += 1;
  s.sum += v;
  s.min = s.min === null ? v : Math.min(s.min, v);
  s.max = s.max === null ? v : Math.max(s.max, v);
};
const hist = { ...stats(), unit: "s", values: [], by_status: {}, by_status_stats: {}, bounds: BOUNDS_S,
               bucket_counts: new Array(BOUNDS_S.length + 1).fill(0), by_round: [] };
const counter = { ...stats(), values: [], by_round: [] };
const truth = {
  temporality: cumulative ? "cumulative" : "delta",
  resource: { "service.name": process.env.OTEL_SERVICE_NAME || "app", "service.instance.id": process.env.DYNO || "web.1" },
  rounds: ROUNDS,
  "http.server.request.duration": hist,
  "jobs.processed": counter,
  "queue.depth": { values: observedDepths, last: null, min: null, max: null },
};

try {
  for (let round = 0; round < ROUNDS; round++) {
    const r = { ...stats(), by_status: {} };
    for (let i = 0; i < PER_ROUND; i++) {
      const v = duration_s();
      const status = STATUSES[Math.floor(rand() * STATUSES.length)];
      duration.record(v, { "http.response.status_code": status, "http.request.method": "GET" });
      add(hist, v);
      add(r, v);
      hist.values.push(v);
      hist.by_status[status] = (hist.by_status[status] || 0) + 1;
      r.by_status[status] = (r.by_status[status] || 0) + 1;
      add((hist.by_status_stats[status] ??= stats()), v);
      let b = BOUNDS_S.findIndex((bound) => v <= bound); // OTel buckets are (previous bound, bound]
      hist.bucket_counts[b === -1 ? BOUNDS_S.length : b] += 1;
    }
    hist.by_round.push(r);
    const jobsNow = 1 + Math.floor(rand() * 9);
    jobs.add(jobsNow, { queue: "default" });
    add(counter, jobsNow);
    counter.values.push(jobsNow);
    counter.by_round.push(jobsNow);
    depth = 4 * (round + 1) + Math.floor(rand() * 4);
    await reader.forceFlush();
  }
  await provider.shutdown();
} catch (err) {
  exportErrors.push(describe(err));
}
const gauge = truth["queue.depth"];
if (observedDepths.length) {
  gauge.last = observedDepths[observedDepths.length - 1];
  gauge.min = Math.min(...observedDepths);
  gauge.max = Math.max(...observedDepths);
}
truth.exports = exportsDone;
truth.export_errors = exportErrors;
console.log(JSON.stringify(truth));
if (exportErrors.length) {
  for (const e of exportErrors) console.error("export failed:", e);
  process.exit(1);
}

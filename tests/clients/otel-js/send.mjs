// The OpenTelemetry JS SDK with its OTLP/HTTP JSON exporter, configured by the standard OTEL_* variables, records
// known values and exports them twice (a cumulative stream is then differenced once). It prints one line of
// JSON: the truth it recorded, for tests/integration/test_otlp.py to compare with the stored minutes.
// Env: OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_SERVICE_NAME, DYNO, TEMPORALITY.
import { OTLPMetricExporter } from "@opentelemetry/exporter-metrics-otlp-http";
import { AggregationTemporalityPreference } from "@opentelemetry/exporter-metrics-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { MeterProvider, PeriodicExportingMetricReader } from "@opentelemetry/sdk-metrics";

const BOUNDS_S = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10];
const cumulative = process.env.TEMPORALITY === "cumulative";
const exporter = new OTLPMetricExporter({
  temporalityPreference: cumulative ? AggregationTemporalityPreference.CUMULATIVE
                                    : AggregationTemporalityPreference.DELTA,
});
const reader = new PeriodicExportingMetricReader({ exporter, exportIntervalMillis: 3600000 });
const provider = new MeterProvider({
  resource: resourceFromAttributes({ "service.name": process.env.OTEL_SERVICE_NAME || "app",
                                     "service.instance.id": process.env.DYNO || "web.1" }),
  readers: [reader],
});
const meter = provider.getMeter("minutely-test");
const duration = meter.createHistogram("http.server.request.duration",
                                       { unit: "s", advice: { explicitBucketBoundaries: BOUNDS_S } });
const jobs = meter.createCounter("jobs.processed");
let depth = 0;
meter.createObservableGauge("queue.depth").addCallback((r) => r.observe(depth));

// A deterministic generator (mulberry32), so a run is reproducible.
let seed = cumulative ? 7 : 3;
const rand = () => {
  seed = (seed + 0x6d2b79f5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};
const truth = { "http.server.request.duration": { count: 0, values: [], by_status: {} },
                "jobs.processed": { sum: 0 }, "queue.depth": { last: 0 } };
const STATUSES = [200, 200, 200, 201, 304, 404, 500, 503];
try {
  for (let round = 0; round < 2; round++) {
    for (let i = 0; i < 300; i++) {
      const v = Math.exp(Math.log(0.08) + 0.9 * Math.sqrt(-2 * Math.log(1 - rand())) * Math.cos(2 * Math.PI * rand()));
      const status = STATUSES[Math.floor(rand() * STATUSES.length)];
      duration.record(v, { "http.response.status_code": status, "http.request.method": "GET" });
      const h = truth["http.server.request.duration"];
      h.count += 1;
      h.values.push(v);
      h.by_status[status] = (h.by_status[status] || 0) + 1;
    }
    jobs.add(round + 5, { queue: "default" });
    truth["jobs.processed"].sum += round + 5;
    depth = 4 * (round + 1);
    truth["queue.depth"].last = depth;
    await reader.forceFlush();
  }
  await provider.shutdown();
} catch (err) {
  console.error("export failed:", err && err.stack ? err.stack : err);
  process.exit(1);
}
console.log(JSON.stringify(truth));

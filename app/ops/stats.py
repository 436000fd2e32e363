"""Every counter the pipeline keeps, declared once with what to do when it moves.

Served at ``GET /v1/stats`` and, in Prometheus format, at ``GET /metrics`` (app/ops/health.py): counters unless
named in GAUGES or HISTOGRAMS below.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final, Literal

CounterName = Literal["observations_accepted", "observations_late", "observations_rejected",
    "observations_replayed", "input_gaps_refetched", "input_gaps_accepted", "limit_refused_process_types",
    "limit_refused_addon_sources", "limit_refused_metric_names", "minutes_degraded", "minute_names_dropped",
    "minutes_refused_too_large", "minutes_emitted", "minutes_resent", "windows_open", "table_records_written",
    "sink_items_written", "sink_retries", "drain_frames", "drain_frames_deduplicated", "drain_lines_ignored",
    "drain_lines_bad", "ingest_observations_produced", "ingest_requests_shed", "ingest_bytes_received",
    "ingest_refused_rate", "ingest_refused_inflight", "ingest_refused_queue", "ingest_refused_slow_body",
    "auth_lookups_refused", "ingest_refused_bad_body", "ingest_refused_too_large", "ingest_dead_letters_dropped",
    "ingest_records_rejected", "otlp_requests", "language_reports",
    "sink_dead_lettered", "sink_unprocessed_items", "sink_batch_seconds",
    "consumer_lag_observations", "consumer_lag_minutes", "policy_commands_applied", "policy_commands_rejected",
    "policy_minutes_invalid", "alerts_published", "alert_lag_seconds", "autoscale_decisions", "autoscale_steps",
    "notifications_sent", "notification_retries", "notifications_failed", "notifications_deferred",
    "notify_worker_restarts", "query_cache_hits", "query_cache_misses", "query_cache_bytes", "query_items_read",
    "query_cache_invalidations", "query_digest_fallbacks", "query_prefix_reused", "query_tail_points_reused",
    "events_stored", "events_invalid", "events_retries", "events_failed", "query_auth_refused",
    "query_refused_rate", "query_refused_busy", "prometheus_queries", "prometheus_queries_refused",
    "prometheus_cache_hits", "rollup_minutes_merged", "rollup_minutes_replayed",
    "rollup_items_written", "minutes_stored_late", "stored_through_lag_seconds", "query_watermark_lag_seconds",
    "shadow_reads", "shadow_matched", "shadow_mismatch_missing", "shadow_mismatch_extra", "shadow_mismatch_value",
    "shadow_mismatch_percentile", "shadow_points_compared", "shadow_incomparable", "shadow_failed",
    "shadow_timeouts", "shadow_skipped", "migration_state_version", "rollup_blocks_written", "rollup_store_reads",
    "rollup_retries", "rollup_failed", "rollup_minutes_invalid"]
"""Every counter name: a typo is a type error (mypy), not a KeyError on a hot path. Kept equal to the
CATALOGUE's keys by tests/ops/test_ops.py; a name built at run time needs a typed mapping to these."""

CATALOGUE: Final[dict[CounterName, str]] = {
    "observations_accepted": "Observations folded into a minute. Flat while producers send: check consumer lag "
                             "and the worker log.",
    "observations_late": "Observations for a minute already emitted (dead-lettered). Rising: producers buffer "
                         "too long or clocks lag; raise METRICS_GRACE_S if the delay is legitimate.",
    "observations_rejected": "Invalid observations or messages (dead-lettered with a reason). Rising: read "
                             "the reasons on the DLQ topic and fix the producer.",
    "observations_replayed": "Input skipped because its effects were already applied (after a restart or "
                             "rebalance). Non-zero only around restarts; steady growth means offsets do not commit.",
    "input_gaps_refetched": "Observations the consumer skipped (a gap in a partition's offsets, seen around "
                            "starts and rebalances) and read again. Informational; each one is in the log.",
    "input_gaps_accepted": "Offset gaps that held no records after a re-read: deleted by retention before "
                           "this worker read them (lost data: raise the topic's retention.ms and watch "
                           "consumer_lag_observations), or a transactional producer's markers.",
    "limit_refused_process_types": "Observations refused because their app already had max_process_types "
                                   "process types in that minute (dead-lettered with the app; the first 100 per "
                                   "app and minute). Rising: an app puts ids in dyno names; raise its limit in "
                                   "METRICS_LIMITS_FILE only if the process types are real.",
    "limit_refused_addon_sources": "Add-on samples refused because their app already had max_addon_sources "
                                   "sources in that minute (dead-lettered with the app). Raise the app's limit "
                                   "in METRICS_LIMITS_FILE if it has that many add-ons.",
    "limit_refused_metric_names": "Custom metric observations refused because their minute already had "
                                  "max_metric_names names (dead-lettered with the app). Rising: an app puts ids "
                                  "in metric names; read the DLQ reasons.",
    "minutes_degraded": "Minutes over METRICS_MINUTE_MAX_BYTES sent degraded to fit (digests compressed, then "
                        "the largest custom metric names dropped; the log names the minute). Non-zero: an app "
                        "has many high-cardinality timers; see minute_names_dropped and the DLQ reasons.",
    "minute_names_dropped": "Custom metric names (or add-on sources) left out of a minute to fit its byte "
                            "budget, each dead-lettered with its app and size. Non-zero: data was lost for "
                            "that app; lower its metric cardinality.",
    "minutes_refused_too_large": "Minutes the broker refused as too large, fitted to a smaller budget and sent "
                                 "again. Non-zero: METRICS_MINUTE_MAX_BYTES is above the metrics topic's (or "
                                 "the brokers') max.message.bytes; align them.",
    "minutes_emitted": "Closed (app, process type, minute) records sent to metrics-1m. Flat while "
                       "observations_accepted rises: minutes are not closing (see windows_open, the worker log).",
    "minutes_resent": "Minutes closed before a restart or rebalance and sent to metrics-1m again, identical, "
                      "in case the sinks had not stored them yet (only with METRICS_CLOSED_KEEP_S > 0; non-zero only "
                      "around restarts).",
    "windows_open": "Minutes currently open on this worker. Growing without bound: windows are not closing "
                    "(check METRICS_IDLE_TIMEOUT_S and the event timestamps).",
    "table_records_written": "Window-table (changelog) records written; about one per touched window per batch. "
                             "Informational: it sizes the changelog topic's traffic (plan its compaction for it).",
    "sink_items_written": "Minutes accepted by DynamoDB. Falling behind minutes_emitted for long: the sink lags; "
                          "see consumer_lag_minutes and sink_retries.",
    "sink_retries": "Sink batches retried after throttling/unavailability. Sustained: DynamoDB capacity or "
                    "network; the sink applies backpressure meanwhile.",
    "drain_frames": "Logplex frames delivered to Kafka. Flat while drains are configured: check drain tokens "
                    "(403s in the ingest log) and the drain URL.",
    "drain_frames_deduplicated": "Retried frames answered 2xx without producing (already delivered). Sustained "
                                 "growth: senders time out before we answer; check Kafka ack latency.",
    "drain_lines_ignored": "Drain lines that carry nothing we count (app output, other platform lines). "
                           "Informational.",
    "drain_lines_bad": "Router/runtime/l2met lines that did not parse (dead-lettered with the line). Rising: a "
                       "log format change upstream or an app logging malformed l2met; read the DLQ reasons.",
    "ingest_observations_produced": "Observations acknowledged by Kafka from the HTTP endpoints.",
    "ingest_requests_shed": "Requests refused (503 drain, 429 JSON API) because METRICS_INGEST_MAX_INFLIGHT_BYTES "
                            "were in flight and their app held more than its share of them (per app; senders "
                            "retry). Sustained: add ingest replicas, or check Kafka's ack latency.",
    "ingest_bytes_received": "Request body bytes read after the token was accepted, per app: what the rate "
                             "limits charge. Use it to size an app's METRICS_LIMIT_INGEST_RATE_BYTES_S override.",
    "ingest_refused_rate": "Requests refused because their app was over its ingest rate and burst (per app; "
                           "503 on the drain, 429 on the JSON API, with Retry-After). Sustained for one app: "
                           "raise its ingest_rate_bytes_s in METRICS_LIMITS_FILE if the traffic is legitimate.",
    "ingest_refused_inflight": "Requests refused because their token had inflight_bytes_per_token request "
                               "bytes in flight (per app). Sustained: the sender opens too many concurrent "
                               "requests, or Kafka acknowledges slowly.",
    "ingest_refused_queue": "Requests refused before their body was read because their app already had "
                            "METRICS_INGEST_MAX_WAITING_PER_APP requests waiting for a parse slot (per app). "
                            "Sustained: the ingest process is saturated; add replicas.",
    "ingest_refused_slow_body": "Requests whose body did not arrive within METRICS_INGEST_BODY_TIMEOUT_S (per "
                                "app; 503 on the drain, 408 on the JSON API). Sustained: slow senders or a "
                                "slowloris attempt from that app's token.",
    "auth_lookups_refused": "Token checks answered 503 without a store read because their client address had "
                            "tried METRICS_AUTH_FAILURES_BURST unknown tokens (tokens seen live are always "
                            "checked). Sustained: someone guesses tokens; behind proxies check "
                            "METRICS_FORWARDED_FOR_HOPS, or every client shares the proxy's budget.",
    "ingest_refused_bad_body": "Request bodies that could not be read (a compressed body that does not "
                               "decompress, or the sender gone half-way; per app; 400). Rising for one app: its "
                               "sender's encoding is broken.",
    "ingest_refused_too_large": "Request bodies over METRICS_INGEST_MAX_BODY_BYTES, or inflating past "
                                "METRICS_INGEST_MAX_DECOMPRESSED_RATIO times their compressed size (per app; 413).",
    "ingest_dead_letters_dropped": "Bad lines or records past METRICS_INGEST_MAX_DEAD_LETTERS_PER_REQUEST in one "
                                   "request: counted and refused, but not each sent to the DLQ. Rising: one sender "
                                   "sends mostly garbage; the DLQ holds a sample of its reasons.",
    "ingest_records_rejected": "JSON API records and OTLP points refused (reasons returned to the client, OTLP's "
                               "in partial_success). Rising: a producer sends bad or foreign-app records.",
    "otlp_requests": "OTLP/HTTP metrics requests taken (POST /v1/metrics), points refused or not.",
    "language_reports": "Language-metrics agent reports taken (POST /v1/language-metrics/<dyno>).",
    "sink_dead_lettered": "Minutes DynamoDB rejected for good (sent to metrics-1m-dlq). Non-zero: read the "
                          "reason; usually permissions or table schema.",
    "sink_unprocessed_items": "Items DynamoDB returned as UnprocessedItems and re-sent with backoff. Rising: the "
                              "table throttles; raise its capacity/on-demand limits or lower "
                              "METRICS_SINK_CONCURRENCY.",
    "sink_batch_seconds": "Time for one sink batch to be accepted by DynamoDB, retries included. p99 rising: "
                          "DynamoDB is slow or throttling (see sink_retries, sink_unprocessed_items); "
                          "minutes reach the API later meanwhile.",
    "consumer_lag_observations": "Messages on this worker's observations partitions not yet processed. Growing: "
                                 "aggregation cannot keep up; add workers (up to METRICS_PARTITIONS) or check "
                                 "CPU throttling.",
    "consumer_lag_minutes": "Messages on this worker's metrics-1m partitions not yet written to DynamoDB. "
                            "Growing: the sink is backing off; see sink_retries and the DynamoDB table's metrics.",
    # --- alerting and autoscaling (agents/alerts.py, agents/autoscale.py, app/notify/) ---
    "policy_commands_applied": "Monitor/autoscaling configuration changes applied by this worker.",
    "policy_commands_rejected": "Malformed messages on the policy-commands topic (skipped). Non-zero: something "
                                "other than the web API writes to that topic.",
    "policy_minutes_invalid": "metrics-1m records the alert/autoscale agents could not read (skipped). Non-zero: "
                              "a producer writes another format to metrics-1m.",
    "alerts_published": "Monitor events (firing, still_firing, resolved) sent to the alerts topic.",
    "alert_lag_seconds": "Seconds from a minute's record on metrics-1m to the publication of the monitor event "
                         "it caused. p99 above a few seconds: the alert agent lags (consumer lag, CPU).",
    "autoscale_decisions": "Autoscaling decisions (one per policy and minute) sent to the autoscale topic.",
    "autoscale_steps": "Decisions that changed the dyno count (sent to the formation API when configured).",
    "notifications_sent": "Webhook/e-mail/formation deliveries accepted by the receiver.",
    "notification_retries": "Delivery attempts that failed and were rescheduled with backoff. Sustained: a "
                            "receiver or the SMTP server is down or slow.",
    "notifications_failed": "Deliveries given up (refused, or retries exhausted); the log names the receiver and "
                            "the reason. Fix the URL/address/SMTP settings.",
    "notifications_deferred": "Deliveries not queued because the queue was full; the outbox sweep sends them "
                              "later. Rising: raise METRICS_NOTIFY_CONCURRENCY or fix slow receivers.",
    "notify_worker_restarts": "Notifier worker tasks that died of an unexpected error and were replaced. "
                              "Non-zero: a bug; read the traceback in the log.",
    # --- query API and rollups (app/api/query/, app/api/web.py, agents/rollup.py) ---
    "query_cache_hits": "Metric queries answered from the in-process cache (or joined to an identical request "
                        "in flight). Informational; a low hit rate with many viewers means ranges never repeat.",
    "query_cache_misses": "Metric queries computed (DynamoDB read for missing or non-final buckets). Rising "
                          "with latency: raise METRICS_QUERY_CACHE_MAX_BYTES or add web processes.",
    "query_cache_bytes": "Bytes held by the query caches (bounded by METRICS_QUERY_CACHE_MAX_BYTES).",
    "query_items_read": "DynamoDB items read by metric queries. Growing much faster than misses: queries "
                        "merge minutes at read time (check METRICS_QUERY_USE_ROLLUPS and the rollup agent).",
    "query_cache_invalidations": "Cached answers and series dropped because a late minute of their app was "
                                 "stored after its bucket was final (see minutes_stored_late on the workers).",
    "query_digest_fallbacks": "Ranges of final points read from digest items because no summary block covers "
                              "them (data from before summary blocks, idle spans of sparse series). Growing on "
                              "recent ranges: the rollup agent is not writing blocks.",
    "query_prefix_reused": "Live answers refreshed by re-rendering only their tail (the final part of the body "
                           "and its hash were reused). Low next to query_cache_misses with hot live ranges: "
                           "the series cache is too small (METRICS_QUERY_CACHE_MAX_BYTES).",
    "query_tail_points_reused": "Tail points whose stored inputs were unchanged, so no digest was decoded. "
                                "Informational.",
    "events_stored": "Alert and autoscaling events written to DynamoDB for the dashboard (agents/events.py).",
    "events_invalid": "Records on the alerts/autoscale topics the events job could not read (skipped). "
                      "Non-zero: a producer writes another format there.",
    "events_retries": "Event batches retried while DynamoDB throttled or was unreachable (the job stops "
                      "consuming meanwhile). Sustained: DynamoDB capacity or network.",
    "events_failed": "Event batches DynamoDB refused for good (permissions, schema); dropped, the log names "
                     "the cause. Non-zero: fix the table or IAM; the dashboard misses those markers.",
    "query_auth_refused": "Metric requests refused for a missing or invalid read token (401). Rising: a "
                          "dashboard or client uses a revoked token; issue a new read token.",
    "query_refused_rate": "Read API requests refused because their app was over its query rate and burst "
                          "(per app; 429 rate_limited with Retry-After; 304 revalidations count as requests). "
                          "Sustained for one app: a script polls too often, or raise its query_rate_per_s in "
                          "METRICS_LIMITS_FILE if the traffic is legitimate.",
    "query_refused_busy": "Queries refused because METRICS_QUERY_MAX_CONCURRENT were computing, or their app "
                          "held its METRICS_QUERY_MAX_CONCURRENT_PER_APP, for METRICS_QUERY_QUEUE_TIMEOUT_S "
                          "(per app; 503 overloaded with Retry-After). One app: it sends many slow queries at "
                          "once; many apps: the store is slow (see query_cache_misses) or add web processes.",
    "prometheus_queries": "Requests to the Prometheus API (/api/v1/*, docs/prometheus.md) with a valid read "
                          "token, per app.",
    "prometheus_queries_refused": "Prometheus API requests refused as bad_data or execution (an unsupported "
                                  "PromQL feature, a bad parameter, too many points), per app. Steady for one "
                                  "app: a dashboard panel uses what minutely's PromQL lacks; its answer names it.",
    "prometheus_cache_hits": "Prometheus API answers served as rendered before (the native answers they came "
                             "from had not changed).",
    "rollup_minutes_merged": "Minutes merged into 10 min / 1 h / 2 h rollup buckets (three per minute).",
    "rollup_minutes_replayed": "Minutes already in their rollup bucket (redelivery after a restart); skipped. "
                               "Non-zero only around restarts; steady growth means offsets do not commit.",
    "rollup_items_written": "Rollup items accepted by DynamoDB.",
    "minutes_stored_late": "Minutes stored after their partition's stored-through watermark had passed them (a "
                           "new app's old data, a re-sent minute): query caches drop that app's answers. "
                           "Steady growth: senders' clocks lag by more than the grace period.",
    "stored_through_lag_seconds": "Worker: how far the oldest stored-through watermark of its partitions is "
                                  "behind the wall clock. Normally grace + idle timeout + a few seconds; "
                                  "growing: this worker's sinks lag or the store is down, and those partitions' "
                                  "buckets stay live (uncached) until they catch up.",
    "query_watermark_lag_seconds": "Query processes: how far the oldest stored-through watermark of all "
                                   "partitions, as last read, is behind the wall clock (see "
                                   "stored_through_lag_seconds on the workers for which one lags).",
    "shadow_reads": "Migration: reads also run against the other store (shadow N %, app/migration/reads.py).",
    "shadow_matched": "Migration: shadow reads whose answer equalled the serving store's.",
    "shadow_mismatch_missing": "Migration: points the serving store has and the other lacks (per point). The "
                               "log line 'shadow mismatch' names the series; GET /migration lists the latest.",
    "shadow_mismatch_extra": "Migration: points the other store has and the serving store lacks (per point).",
    "shadow_mismatch_value": "Migration: counts, sums, maxima or other exact fields that differ (per field).",
    "shadow_mismatch_percentile": "Migration: percentiles differing beyond the digest tolerance (1 %, per field).",
    "shadow_points_compared": "Migration: points compared by shadow reads (within both stores' stored-through "
                              "watermarks and since both hold every minute).",
    "shadow_incomparable": "Migration: shadow reads with no point both stores vouch for yet (the new store's "
                           "writer has not published a watermark past the range): no verdict.",
    "shadow_failed": "Migration: shadow reads that failed (the other store down or refusing); users unaffected.",
    "shadow_timeouts": "Migration: shadow reads slower than METRICS_SHADOW_TIMEOUT_S, abandoned.",
    "shadow_skipped": "Migration: shadow reads not started because 16 were in flight (the other store is slow).",
    "migration_state_version": "Migration: the version of the state this process follows; equal on every "
                               "process once a command has propagated.",
    "rollup_blocks_written": "Summary blocks (the chart points of a series) accepted by the store; about four "
                             "per series and batch. Zero while rollup items are written: blocks are failing.",
    "rollup_store_reads": "Rollup buckets read back from DynamoDB because they were no longer in the worker's "
                          "table (late minutes, replays, first deployment). Sustained: lower replay volume "
                          "or raise METRICS_ROLLUP_EVICT_AFTER_S.",
    "rollup_retries": "Rollup batches retried while DynamoDB throttled or was unreachable (the agent stops "
                      "consuming meanwhile). Sustained: DynamoDB capacity or network.",
    "rollup_failed": "Rollup items and summary blocks the store refused for good (permissions, schema, size); "
                     "the log names each. "
                     "The bucket is written again with its next minute once fixed.",
    "rollup_minutes_invalid": "metrics-1m records the rollup agent could not read (skipped). Non-zero: a "
                              "producer writes another format to metrics-1m.",
}

GAUGES: Final[frozenset[CounterName]] = frozenset({"windows_open", "consumer_lag_observations", "consumer_lag_minutes",
                                           "query_cache_bytes", "stored_through_lag_seconds",
                                           "query_watermark_lag_seconds", "migration_state_version"})
"""Catalogue entries that are levels (set), not running totals (inc)."""

HISTOGRAMS: Final[dict[CounterName, tuple[float, ...]]] = {
    "sink_batch_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
    "alert_lag_seconds": (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
}
"""Catalogue entries recorded with ``observe(name, value)``, with their bucket upper bounds."""


class Histogram:
    """Bucket counts, sum and count of observed values (what Prometheus needs for quantiles)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(self.bounds, value)] += 1  # a bucket holds values <= its bound
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """``[(le, count of values <= le)]``, ending with ``+Inf``."""
        out, total = [], 0
        for le, n in zip([*(repr(b) for b in self.bounds), "+Inf"], self.buckets, strict=True):
            total += n
            out.append((le, float(total)))
        return out


PER_APP: Final[frozenset[CounterName]] = frozenset({
    "ingest_requests_shed", "ingest_bytes_received", "ingest_refused_rate", "ingest_refused_inflight",
    "ingest_refused_queue", "ingest_refused_too_large", "ingest_refused_slow_body", "ingest_refused_bad_body",
    "limit_refused_process_types", "limit_refused_addon_sources", "limit_refused_metric_names",
    "query_refused_rate", "query_refused_busy", "prometheus_queries", "prometheus_queries_refused",
})
"""Counters also kept per app (label ``app`` on ``/metrics``), so an operator sees which tenant a limit hit."""
MAX_APPS_PER_COUNTER = 10_000
OTHER_APPS = "_other"
"""Apps past MAX_APPS_PER_COUNTER are counted together under this label: the scrape stays bounded."""


class Counters:
    """Plain in-process counters (single event loop: no locking needed)."""

    def __init__(self) -> None:
        self.by_app: dict[CounterName, dict[str, int]] = {name: {} for name in PER_APP}
        self.values: dict[CounterName, int] = {name: 0 for name in CATALOGUE}
        """For a histogram, the number of observations (its full state is in ``histograms``)."""
        self.histograms: dict[CounterName, Histogram] = {name: Histogram(b) for name, b in HISTOGRAMS.items()}

    def inc(self, name: CounterName, n: int = 1) -> None:
        if name not in self.values:
            raise KeyError(f"counter {name!r} is not declared in app/ops/stats.py CATALOGUE")
        self.values[name] += n

    def inc_app(self, name: CounterName, app: str, n: int = 1) -> None:
        """The counter's total and its value for ``app``."""
        self.inc(name, n)
        per = self.by_app[name]
        if app not in per and len(per) >= MAX_APPS_PER_COUNTER:
            app = OTHER_APPS
        per[app] = per.get(app, 0) + n

    def set(self, name: CounterName, value: int) -> None:
        if name not in self.values:
            raise KeyError(f"counter {name!r} is not declared in app/ops/stats.py CATALOGUE")
        self.values[name] = value

    def observe(self, name: CounterName, value: float) -> None:
        h = self.histograms.get(name)
        if h is None:
            raise KeyError(f"histogram {name!r} is not declared in app/ops/stats.py HISTOGRAMS")
        h.observe(value)
        self.values[name] = h.count

    def snapshot(self) -> dict[CounterName, int]:
        return dict(self.values)


counters = Counters()

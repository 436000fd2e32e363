""""Final" means stored (agents/progress.py), on the real stack: the worker's store is cut off while traffic
flows (a TCP proxy in front of dynalite that stops forwarding), a separate web process reads dynalite
directly. Ranges older than the settle time stay live while the sink lags; once the store is back and the
sink caught up, the same web process (caches on) answers the generator's exact truth."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.cli import start_role, wait_http, worker_env
from app.local.embedded import DynamoServer, KafkaBroker, free_port
from app.local.traffic import Generator
from tests.integration.pipeline import CutProxy, LiveTraffic, Pipeline, ViaProxy, get
from tests.integration.test_query_api import create_tokens

pytestmark = pytest.mark.integration


def test_ranges_stay_live_while_the_sink_lags_and_equal_the_truth_once_stored(
        broker: KafkaBroker, dynamo: DynamoServer, tmp_path: Path) -> None:
    proxy = CutProxy(int(dynamo.endpoint.rsplit(":", 1)[1]))
    p = Pipeline(broker, ViaProxy(proxy.endpoint), tmp_path,  # type: ignore[arg-type]
                 METRICS_QUERY_SETTLE_S="10", METRICS_BACKOFF_MAX_MS="1000", METRICS_MAX_ATTEMPTS="1")
    p.settings = p.settings.replace(dynamodb_endpoint=dynamo.endpoint)  # the test's own reads: direct
    web = None
    traffic = None
    try:
        p.start(data_dir=tmp_path / "state")
        web_port, admin_port = free_port(), free_port()
        env = worker_env(broker.url, dynamo.endpoint, data_dir=str(tmp_path / "web"), web_port=web_port,
                         extra={**p.env_overrides, "METRICS_ADMIN_PORT": str(admin_port)})
        web = start_role("web", env, log_path=p.log_path.with_name(p.log_path.stem + "-web.log"))
        wait_http(f"http://127.0.0.1:{web_port}/healthz", 60, web)
        tokens = create_tokens(p, ["app-0"])
        base = f"http://127.0.0.1:{web_port}/v1/apps/app-0/metrics?process_type=web&resolution=1m"

        start_ms = int(time.time() * 1000) // 60_000 * 60_000
        gen = Generator(apps=1, dynos=2, seed=9, start_ms=start_ms, keep_truth=True)
        traffic = LiveTraffic(broker, p.settings.kafka.observations_topic, gen)

        def ask(since_s: int, until_s: int) -> tuple[dict[str, Any], Any]:
            return get(f"{base}&since={since_s}&until={until_s}", tokens["app-0"])

        def lag_s() -> list[float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:  # admin port
                return [float(line.split()[-1]) for line in r.read().decode().splitlines()
                        if line.startswith("minutely_query_watermark_lag_seconds")]

        # 1. Flowing: the worker publishes watermarks, and the web process reads them: the first minute is
        # final (points alone would not show it: the live edge serves minutes before any watermark is read).
        first_s = start_ms // 1000
        deadline = time.monotonic() + 120
        while ask(first_s, first_s + 60)[1]["X-Final"] != "true":
            assert time.monotonic() < deadline, "no watermark published past the first minute"
            time.sleep(0.5)
        # 2. The store goes away for the worker (the web process still reads it) while traffic flows on.
        cut_s = int(time.time())
        proxy.cut()
        p.wait_stats(lambda s: s.get("sink_retries", 0) >= 3, 120, "the sink retrying")
        # The minute the cut fell in, once older than the settle time: its end is past the watermark.
        lagging = cut_s - cut_s % 60, cut_s - cut_s % 60 + 60
        time.sleep(max(0.0, lagging[1] + 15 - time.time()))
        body, headers = ask(*lagging)
        assert headers["X-Final"] == "false", body  # older than the settle time, not stored: live
        deadline = time.monotonic() + 10  # the gauge follows the web process's next read of the watermarks
        while not ((lag := lag_s()) and lag[0] >= time.time() - cut_s - 5):  # the watermark stopped at the cut
            assert time.monotonic() < deadline, lag
            ask(*lagging)
            time.sleep(0.5)
        # 3. The store is back: the same process, caches on, serves every minute, equal to the truth.
        proxy.restore()
        deadline = time.monotonic() + 120
        while (answer := ask(first_s, lagging[1]))[1]["X-Final"] != "true":
            assert answer[1]["Cache-Control"] == "private, no-cache"
            assert time.monotonic() < deadline, f"not stored and final within 120 s: {answer[0]}"
            time.sleep(1)
        traffic.close()
        truth = gen.truth
        assert truth is not None
        points = answer[0]["points"]
        assert [pt["ts"] for pt in points] == list(range(first_s, lagging[1], 60))
        for point in points:
            raw = np.asarray(truth.service_ms[("app-0", "web", point["ts"] * 1000)])
            assert point["requests"] == len(raw) and point["response_ms"]["max"] == raw.max(), point
            for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                exact = float(np.quantile(raw, q))
                assert abs(point["response_ms"][name] - exact) <= 0.01 * exact, (point["ts"], name)
        assert ask(first_s, lagging[1])[0] == answer[0]
    finally:
        if traffic is not None:
            traffic.close()
        if web is not None and web.poll() is None:
            web.terminate()
            web.wait(timeout=20)
        p.stop()
        proxy.close()

"""heroku/x hmetrics, Heroku's Go language-metrics agent (built from the Go module proxy by `make clients`),
reporting from a small Go program to POST /v1/language-metrics/<dyno> on the real stack. The stored minute must
hold exactly what it sent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from app.local.embedded import DynamoServer, KafkaBroker
from tests.integration.test_otlp import merged, stack_for, wait_minutes

pytestmark = pytest.mark.integration
CLIENT = Path(__file__).resolve().parents[2] / ".deps" / "clients" / "hmetrics-client"


def test_hmetrics_reports_are_stored_as_the_dynos_language_metrics(broker: KafkaBroker, dynamo: DynamoServer,
                                                                  tmp_path: Path) -> None:
    assert CLIENT.exists(), "run `make clients` (part of `make install-test`)"
    app = "go-app"
    with stack_for(broker, dynamo, tmp_path, app) as (p, url, token, start_ms):
        host = url.removeprefix("http://")
        # Basic auth in the URL, as the docs tell: hmetrics sends no header of its own, Go's client sends it.
        env = {"HEROKU_METRICS_URL": f"http://x:{token}@{host}/v1/language-metrics/worker.3", "REPORTS": "1",
               "PATH": "/usr/bin:/bin"}
        run = subprocess.run([str(CLIENT)], env=env, capture_output=True, timeout=90, check=False)
        assert run.returncode == 0, run.stderr.decode()
        sent: list[dict[str, Any]] = json.loads(run.stdout.decode().strip().splitlines()[-1])["reports"]
        assert len(sent) == 1
        report = sent[0]
        assert set(report["gauges"]) == {"go.memory.heap.bytes", "go.memory.stack.bytes", "go.memory.heap.objects",
                                         "go.gc.goal", "go.routines"}
        assert report["gauges"]["go.routines"] >= 9  # the program's 8 goroutines and main

        def stored_all(stored: dict[tuple[str, str, int], Any]) -> bool:
            return bool(stored) and set(merged(stored, "worker").gauges) >= set(report["gauges"])

        stored = wait_minutes(p, app, ["worker"], start_ms, stored_all, "the hmetrics report stored")
        agg = merged(stored, "worker")
        for name, v in report["gauges"].items():
            g = agg.gauges[name]
            assert (g.stat.n, g.stat.max, g.last) == (1, float(v), float(v)), name
        for name, v in report["counters"].items():
            assert agg.counters.get(name, 0.0) == float(v), name
        points = p.get(f"/v1/apps/{app}/metrics?process_type=worker&resolution=60&since={start_ms // 1000 - 60}",
                       token=p.read_token(app))["points"]
        shown = {k for pt in points for k in pt.get("metrics", {})}
        assert shown >= set(report["gauges"]) | set(report["counters"])

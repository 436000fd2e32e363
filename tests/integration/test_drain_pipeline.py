"""Logplex drain -> ingest process -> Kafka -> worker -> DynamoDB, checked against the loadgen's ground truth."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import pytest

from app.local import loadgen
from app.local.embedded import DynamoServer, KafkaBroker
from app.storage.backends import token_table
from app.storage.tokens import TokenStore
from tests.integration.pipeline import Pipeline, check_against_truth

pytestmark = pytest.mark.integration


def ingest_counters(admin_url: str) -> dict[str, float]:
    """The ingest process's counters, from its Prometheus text on its admin port (it serves no /v1/stats)."""
    with urllib.request.urlopen(f"{admin_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("minutely_"):
            name, _, value = line.rpartition(" ")
            if name.endswith("_total"):
                out[name[len("minutely_"):-len("_total")]] = float(value)
    return out


def test_drain_traffic_is_stored_exactly(broker: KafkaBroker, dynamo: DynamoServer, tmp_path: Path) -> None:
    p = Pipeline(broker, dynamo, tmp_path)
    p.start(data_dir=tmp_path / "state")
    try:
        url = p.start_ingest()
        apps = ["app-0", "app-1"]

        async def make_tokens() -> dict[str, str]:
            store = TokenStore(p.settings.web, table=token_table(p.settings))
            await store.start()
            try:
                return {a: (await store.create(a, "drain"))[0] for a in apps}
            finally:
                await store.stop()

        tokens = asyncio.run(make_tokens())
        start_ms = (int(time.time() * 1000) // 60_000 - 6) * 60_000
        load = loadgen.Load(mode="drain", apps=2, dynos=2, rate=200, duration=180, seed=5, start_ms=start_ms,
                            url=url, frame_lines=150, concurrency=4, token=tuple(f"{a}={t}" for a, t in tokens.items()))
        truth = asyncio.run(loadgen.run(load))
        keys = truth.keys()
        procs = sorted({proc for _, proc, _ in keys})
        assert procs == ["app", "web", "worker"]  # add-on metrics and releases are kept app-wide
        # The lines the drain is meant to show end to end are all in the traffic.
        assert any(c in ("H10", "H14") for e in truth.errors.values() for c in e)
        assert any(truth.requests[k] > len(truth.service_ms.get(k, [])) for k in truth.requests)
        assert sum(n.get("R14", 0) for n in truth.platform.values()) >= 2  # web.1 of each app, 40 s in
        assert sum(n.get("release", 0) for n in truth.platform.values()) == 2
        assert truth.addons and truth.counters and truth.timers and truth.gauges
        ingest = ingest_counters(p.admin_url(url))
        assert ingest["drain_lines_bad"] == 0  # nothing the load generator renders is dead-lettered
        # Every line it renders is one the pipeline counts, but for the "Deploy ... by" line Heroku logs beside
        # each "Release vN created by" one: one marker per release (app/ingest/logplex.py), the other ignored.
        releases = sum(n.get("release", 0) for n in truth.platform.values())
        assert ingest["drain_lines_ignored"] == releases
        assert ingest["drain_frames"] > 0
        produced = ingest["ingest_observations_produced"]
        p.wait_stats(lambda s: s["sink_items_written"] >= len(keys) and s["observations_accepted"] >= produced,
                     120, "every drained minute in DynamoDB")
        stored = p.stored(apps, procs, start_ms // 1000, start_ms // 1000 + 3600)
        check_against_truth(stored, truth)
        stats = p.stats()
        assert stats["observations_accepted"] == produced  # all the drain produced, each once
        assert stats["observations_rejected"] == 0 and stats["observations_late"] == 0  # no dead letters
    finally:
        p.stop()

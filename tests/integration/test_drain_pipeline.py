"""Logplex drain -> ingest process -> Kafka -> worker -> DynamoDB, checked against the loadgen's ground truth."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import pytest

from app.local import loadgen
from app.local.embedded import DynamoServer, KafkaBroker
from app.storage.tokens import TokenStore
from tests.integration.pipeline import Pipeline, check_against_truth

pytestmark = pytest.mark.integration


def test_drain_traffic_is_stored_exactly(broker: KafkaBroker, dynamo: DynamoServer, tmp_path: Path) -> None:
    p = Pipeline(broker, dynamo, tmp_path)
    p.start(data_dir=tmp_path / "state")
    try:
        url = p.start_ingest()
        apps = ["app-0", "app-1"]

        async def make_tokens() -> dict[str, str]:
            store = TokenStore(p.settings)
            await store.start()
            try:
                return {a: (await store.create(a, "drain"))[0] for a in apps}
            finally:
                await store.stop()

        tokens = asyncio.run(make_tokens())
        start_ms = (int(time.time() * 1000) // 60_000 - 6) * 60_000
        args = argparse.Namespace(mode="drain", apps=2, dynos=2, rate=200, duration=180, realtime=False, seed=5,
                                  start_ms=start_ms, url=url, frame_lines=150, concurrency=4, truth=None,
                                  token=[f"{a}={t}" for a, t in tokens.items()], bootstrap="", topic="")
        truth = asyncio.run(loadgen.run(args))
        minutes = len(set(truth.service_ms) | set(truth.rss_max))
        p.wait_stats(lambda s: s["sink_items_written"] >= minutes, 120, "every drained minute in DynamoDB")
        stored = p.stored(apps, ["web", "worker"], start_ms // 1000, start_ms // 1000 + 3600)
        check_against_truth(stored, truth)
        assert p.stats()["observations_rejected"] == 0
    finally:
        p.stop()

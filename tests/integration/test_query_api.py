"""The read API on real parts: worker process (aggregate, sink, rollup agents) on Apache Kafka, dynalite,
real read tokens. Rollup points must equal the generator's exact truth (percentiles within 1 %)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.local.embedded import DynamoServer, KafkaBroker
from app.local.traffic import Generator, produce
from app.storage.backends import token_table
from app.storage.tokens import TokenStore
from tables.record import decode as decode_stored
from tests.integration.pipeline import Pipeline

pytestmark = pytest.mark.integration


@dataclass
class Served:
    pipeline: Pipeline
    gen: Generator
    start_s: int
    minutes: int
    tokens: dict[str, str]
    """app -> read token"""

    def get(self, path: str, token: str | None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.pipeline.url + path, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                return r.status, r.headers, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, e.headers, json.loads(raw) if raw else None


def create_tokens(p: Pipeline, apps: list[str]) -> dict[str, str]:
    async def go() -> dict[str, str]:
        store = TokenStore(p.settings.web, table=token_table(p.settings))
        await store.start()
        try:
            return {app: (await store.create(app, "read"))[0] for app in apps}
        finally:
            await store.stop()
    return asyncio.run(go())


def start_served(broker: KafkaBroker, dynamo: DynamoServer, tmp: Path, *, minutes: int = 20,
                 realistic: bool = False, **overrides: str) -> Served:
    """A worker with ``minutes`` of generated traffic for 2 apps, ending about two minutes ago, aligned so that
    the 10-minute buckets are final (settle 60 s) and come from the rollup items. ``realistic``: with the
    drain's other kinds (add-on metrics, platform events, l2met; app/local/traffic.py). ``overrides``: more
    worker environment (METRICS_*)."""
    p = Pipeline(broker, dynamo, tmp, **{"METRICS_QUERY_SETTLE_S": "60", **overrides})
    now_s = int(time.time())
    start_s = (now_s - 150) - (now_s - 150) % 600 - minutes * 60
    gen = Generator(apps=2, dynos=2, seed=5, start_ms=start_s * 1000, keep_truth=True, realistic=realistic)
    msgs = gen.messages(per_message=300, span_ms=10_000)
    batch = [next(msgs) for _ in range(2 * 6 * minutes)]
    p.start(data_dir=tmp / "state")
    asyncio.run(produce(broker.address, p.settings.kafka.observations_topic, batch))
    assert gen.truth is not None
    n_minutes = len(gen.truth.keys())
    p.wait_stats(lambda s: s["sink_items_written"] >= n_minutes and s["rollup_minutes_merged"] >= 3 * n_minutes,
                 180, "minutes stored and rolled up")
    return Served(p, gen, start_s, minutes, create_tokens(p, gen.apps))


@pytest.fixture(scope="module")
def served(broker: KafkaBroker, dynamo: DynamoServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = start_served(broker, dynamo, tmp_path_factory.mktemp("query-api"))
    try:
        yield s
    finally:
        s.pipeline.stop()


def test_rollup_points_equal_the_exact_truth(served: Served) -> None:
    truth = served.gen.truth
    assert truth is not None
    for app in served.gen.apps:
        # Stored is not yet final: the watermark follows Faust's next commit and the next progress write.
        final_path = (f"/v1/apps/{app}/metrics?process_type=web&since={served.start_s}"
                      f"&until={served.start_s + served.minutes * 60}&resolution=600")
        deadline = time.monotonic() + 60
        while served.get(final_path, served.tokens[app])[1]["X-Final"] != "true":
            assert time.monotonic() < deadline, "the stored range never became final"
            time.sleep(0.5)
        for res in (600, 3600):
            status, headers, body = served.get(
                f"/v1/apps/{app}/metrics?process_type=web&since={served.start_s}"
                f"&until={served.start_s + served.minutes * 60}&resolution={res}", served.tokens[app])
            assert status == 200 and body["resolution_s"] == res, body
            for point in body["points"]:
                b = point["ts"]
                raw = np.concatenate([np.asarray(v) for (a, proc, ms), v in truth.service_ms.items()
                                      if a == app and proc == "web" and b <= ms // 1000 < b + res])
                assert point["requests"] == len(raw), (app, res, b)
                assert point["response_ms"]["max"] == raw.max()
                assert abs(point["response_ms"]["mean"] - raw.mean()) <= 1e-6 * raw.mean()
                for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                    exact = float(np.quantile(raw, q))
                    assert abs(point["response_ms"][name] - exact) <= 0.01 * exact, (app, res, b, name)
                failed = sum(v for (a, proc, ms), v in truth.failed.items()
                             if a == app and proc == "web" and b <= ms // 1000 < b + res)
                assert point["failed"] == failed
            if res == 600:
                assert len(body["points"]) == served.minutes // 10
                # final (stored, settled), yet revalidated: a late minute could still change it
                assert headers["X-Final"] == "true" and headers["Cache-Control"] == "private, no-cache"


def test_rollup_items_are_in_dynamodb(served: Served) -> None:
    from app.storage.dynamodb import DynamoStore

    async def go() -> list[int]:
        """A rollup item is written once its bucket is final: the watermark publisher's next round after
        the bucket's minutes were committed."""
        store = DynamoStore(served.pipeline.settings.storage, served.pipeline.settings.dynamodb)
        await store.start()
        try:
            for _ in range(60):
                items = await store.query("app-0", "web", 600, served.start_s,
                                          served.start_s + served.minutes * 60)
                if len(items) == served.minutes // 10:
                    break
                await asyncio.sleep(0.5)
            return [decode_stored(i.payload)[0].resolution_s for i in items]
        finally:
            await store.stop()
    assert asyncio.run(go()) == [600] * (served.minutes // 10)


def test_tokens_isolate_apps_without_leaking_existence(served: Served) -> None:
    q = f"?since={served.start_s}&until={served.start_s + 600}"
    status, _, body = served.get(f"/v1/apps/app-0/metrics{q}", None)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    other = served.get(f"/v1/apps/app-0/metrics{q}", served.tokens["app-1"])
    ghost = served.get(f"/v1/apps/ghost/metrics{q}", served.tokens["app-1"])
    assert other[0] == ghost[0] == 404
    assert json.dumps(other[2]).replace("app-0", "X") == json.dumps(ghost[2]).replace("ghost", "X")
    assert served.get("/healthz", None)[0] == 200


def test_etag_revalidation_and_openapi(served: Served) -> None:
    path = f"/v1/apps/app-0/metrics?since={served.start_s}&until={served.start_s + 600}"
    status, headers, _ = served.get(path, served.tokens["app-0"])
    assert status == 200
    status, _, _ = served.get(path, served.tokens["app-0"], {"If-None-Match": headers["ETag"]})
    assert status == 304
    status, _, doc = served.get("/v1/openapi.json", None)
    assert status == 200 and "/v1/apps/{app}/metrics" in doc["paths"]

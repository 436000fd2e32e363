"""The ingest's in-flight budget (app/ingest/server.py LoadShedding): past METRICS_INGEST_MAX_INFLIGHT_BYTES a
request gets 503 overloaded with Retry-After at once, produces nothing, and is accepted once retried after
the load has passed. The whole-stack figure (2x capacity for 60 s) is tests/integration/test_overload.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from app.ingest.dedup import FrameDedup
from app.ingest.server import Ingest, make_ingest_app
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.tokens import TokenStore
from tests.storage.test_dynamodb import _moto_aio, aws  # noqa: F401  (fixtures)


def body(app: str, n: int, ts_ms: int = 1_700_000_000_000) -> bytes:
    return orjson.dumps([{"kind": "router", "app": app, "dyno": "web.1", "ts": ts_ms + i, "status": 200,
                          "service_ms": 5.0} for i in range(n)])


async def test_requests_past_the_budget_get_503_at_once_and_produce_nothing(aws: None,  # noqa: F811
                                                                          aiohttp_client: Any) -> None:
    one = len(body("shop", 100))
    settings = replace(Settings(), table_name=f"shed-{time.monotonic_ns()}", dynamodb_endpoint="",
                       ingest_max_inflight_bytes=int(2.5 * one))  # two such requests fit, a third does not
    tokens = TokenStore(settings)
    await tokens.start()
    dedup = FrameDedup(settings)
    await dedup.start()
    token = (await tokens.create("shop", "write"))[0]
    release = asyncio.Event()
    produced: list[int] = []
    waiting: list[str] = []

    async def slow_kafka(topic: str, records: Any) -> None:  # acknowledges only when the test says so
        waiting.append(topic)
        await release.wait()
        produced.extend(len(orjson.loads(v)) for _, v in records)

    counters = Counters()
    client: TestClient[Any, Any] = await aiohttp_client(make_ingest_app(
        Ingest(settings, tokens=tokens, dedup=dedup, produce=slow_kafka, counters=counters), settings))
    auth = {"Authorization": f"Bearer {token}"}
    try:
        held = [asyncio.create_task(client.post("/v1/observations", data=body("shop", 100), headers=auth))
                for _ in range(2)]
        while len(waiting) < 2:  # both admitted and waiting for Kafka
            await asyncio.sleep(0.01)
        # Answered at once, not queued behind the two (which wait for Kafka until released below).
        shed = await asyncio.wait_for(client.post("/v1/observations", data=body("shop", 100), headers=auth), 5)
        assert shed.status == 503 and shed.headers["Retry-After"] == "1"
        assert (await shed.json())["error"]["code"] == "overloaded"
        # A GET (health, metrics) is never shed.
        assert (await client.get("/healthz")).status == 200
        release.set()
        assert [(await t).status for t in held] == [200, 200]
        assert produced == [100, 100]  # the shed request produced nothing
        assert counters.snapshot()["ingest_requests_shed"] == 1
        retried = await client.post("/v1/observations", data=body("shop", 100), headers=auth)
        assert retried.status == 200 and produced == [100, 100, 100]
    finally:
        release.set()
        await dedup.stop()
        await tokens.stop()

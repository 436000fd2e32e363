"""The HTTP API (app/web.py) with an in-memory store and a live source."""

from __future__ import annotations

from typing import Any, Sequence

import orjson
import pytest
from aiohttp.test_utils import TestClient

from app.errors import StoreUnavailable
from app.query import MetricsQuery
from app.settings import Settings
from app.stats import Counters
from app.store import MetricItem
from app.web import make_web_app
from tables.aggregate import Aggregate, BucketKey

T0_S = 1_764_000_000 - 1_764_000_000 % 60


def agg(start_s: int, n: int) -> Aggregate:
    a = Aggregate(BucketKey("shop", "web", start_s * 1000), max_centroids=50)
    for i in range(n):
        a.add_request(200 if i % 10 else 503, float(i + 1), "H12" if i == 0 else None)
    a.add_runtime(100.0, 0.0, 110.0, 512.0, 0.5)
    return a


class MemoryStore:
    def __init__(self, aggs: list[Aggregate], fail: bool = False) -> None:
        self.aggs = aggs
        self.fail = fail

    async def put_many(self, items: Sequence[MetricItem]) -> None:
        raise NotImplementedError

    async def query(self, app: str, process_type: str, resolution_s: int, since_s: int,
                    until_s: int) -> list[MetricItem]:
        if self.fail:
            raise StoreUnavailable("DynamoDB unreachable", retry_after_s=2)
        return [MetricItem(a.key.app, a.key.process_type, 60, a.key.start_ms // 1000,
                           orjson.dumps(a.to_record()))
                for a in self.aggs if app == a.key.app and since_s <= a.key.start_ms // 1000 < until_s]


@pytest.fixture
async def client(aiohttp_client: Any) -> TestClient[Any, Any]:
    store = MemoryStore([agg(T0_S, 10), agg(T0_S + 60, 20)])
    live = agg(T0_S + 120, 5)
    query = MetricsQuery(store, live=lambda app, proc, s, u: [live] if app == "shop" and s <= live.key.start_ms < u
                         else [])
    c: TestClient[Any, Any] = await aiohttp_client(make_web_app(query, Settings(max_query_points=1440),
                                                                Counters()))
    return c


async def test_points_from_store_and_open_minute(client: TestClient[Any, Any]) -> None:
    r = await client.get(f"/v1/apps/shop/metrics?process_type=web&since={T0_S}&until={T0_S + 600}")
    assert r.status == 200
    body = await r.json()
    assert (body["app"], body["process_type"], body["resolution_s"]) == ("shop", "web", 60)
    assert [p["ts"] for p in body["points"]] == [T0_S, T0_S + 60, T0_S + 120]
    first = body["points"][0]
    assert first["requests"] == 10 and first["failed"] == 1 and first["errors"] == {"H12": 1}
    assert first["status"] == {"2xx": 9, "5xx": 1}
    assert first["response_ms"]["max"] == 10.0 and first["response_ms"]["mean"] == 5.5
    assert first["memory_mb"]["quota"] == 512.0 and first["load"] == {"mean": 0.5, "max": 0.5}
    assert body["points"][2]["requests"] == 5  # the still-open minute


@pytest.mark.parametrize("qs,code", [
    ("since=abc&until=1", "invalid_range"),
    (f"since={T0_S}&until={T0_S}", "invalid_range"),
    (f"since=0&until={T0_S}", "range_too_large"),
    ("process_type=we%7Cb", "invalid_process_type"),
])
async def test_bad_queries_get_400_with_reason(client: TestClient[Any, Any], qs: str, code: str) -> None:
    r = await client.get(f"/v1/apps/shop/metrics?{qs}")
    assert r.status == 400
    assert (await r.json())["error"]["code"] == code


async def test_unknown_app_is_empty_not_error(client: TestClient[Any, Any]) -> None:
    r = await client.get(f"/v1/apps/nobody/metrics?since={T0_S}&until={T0_S + 600}")
    assert r.status == 200 and (await r.json())["points"] == []


async def test_store_down_is_503_with_retry_after(aiohttp_client: Any) -> None:
    c = await aiohttp_client(make_web_app(MetricsQuery(MemoryStore([], fail=True)), Settings(), Counters()))
    r = await c.get(f"/v1/apps/shop/metrics?since={T0_S}&until={T0_S + 60}")
    assert r.status == 503 and r.headers["Retry-After"] == "2"
    assert (await r.json())["error"]["code"] == "unavailable"


async def test_stats_and_health(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/healthz")).status == 200
    body = await (await client.get("/v1/stats")).json()
    assert set(body["counters"]) == set(body["help"])

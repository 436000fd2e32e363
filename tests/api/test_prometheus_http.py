"""The Prometheus HTTP API (app/api/prometheus/http.py): Prometheus's envelope and errors, tenancy by token,
process types from the catalog, resolution by step, and the answers equal to the native API's points."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp.test_utils import TestClient

from app.api.prometheus.http import add_prometheus_routes
from app.api.query import MetricsQuery, merge_buckets
from app.api.web import COUNTERS_KEY, make_web_app
from app.clock import ManualClock
from app.ops.stats import Counters
from app.storage import catalog
from tables.aggregate import ROLLUP_RESOLUTIONS
from tests.api.test_query import SETTINGS, T0, MemoryStore, minute, put_minutes

NOW_S = T0 + 7200 + 600
TOKENS = {"tok-shop": "shop", "tok-other": "other"}


async def authorize(token: str) -> str | None:
    return TOKENS.get(token)


def auth(token: str = "tok-shop") -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def stocked(clock: ManualClock) -> MemoryStore:
    """Two hours of web and worker minutes for shop (web gets 10 + i requests in minute i), one hour of web for
    other, the rollups and the catalog, as the jobs write them."""
    s = MemoryStore(clock)
    for app, proc, n in (("shop", "web", 120), ("shop", "worker", 120), ("other", "web", 60)):
        minutes = [minute(T0 + 60 * i, np.arange(1.0, 11.0 + i) * (2 if proc == "worker" else 1), app=app,
                          proc=proc, mc=50) for i in range(n)]
        put_minutes(s, minutes)
        for res in ROLLUP_RESOLUTIONS:
            for b, agg in merge_buckets(minutes, res).items():
                s.items[(app, proc, res, b)] = orjson.dumps(agg.to_record())
    for app, procs in (("shop", ["web", "worker"]), ("other", ["web"])):
        it = catalog.catalog_item(app, catalog.day_of(T0), procs)
        s.blocks[(it.app, it.process_type, it.resolution_s, it.ts_s)] = it.payload
        s.spans[(it.app, it.process_type, it.resolution_s, it.ts_s)] = it.span_s
    return s


@pytest.fixture
async def client(aiohttp_client: Any) -> TestClient[Any, Any]:
    clock = ManualClock(NOW_S * 1000)
    store = stocked(clock)
    counters = Counters()
    query = MetricsQuery(store, settings=SETTINGS, clock=clock, counters=counters)
    webapp = make_web_app(query, SETTINGS, counters, authorize=authorize, clock=clock,
                          extra=add_prometheus_routes)
    c: TestClient[Any, Any] = await aiohttp_client(webapp)
    return c


async def get(c: TestClient[Any, Any], path: str, token: str = "tok-shop", **params: Any) -> tuple[int, Any]:
    r = await c.get(path, params=params, headers=auth(token))
    return r.status, await r.json()


async def test_grafanas_save_and_test_is_a_post_of_one_plus_one(client: TestClient[Any, Any]) -> None:
    r = await client.post("/api/v1/query", data={"query": "1+1", "time": "4"}, headers=auth())
    assert r.status == 200
    assert await r.json() == {"status": "success", "data": {"resultType": "scalar", "result": [4, "2"]}}
    r = await client.get("/api/v1/status/buildinfo")
    doc = await r.json()
    assert doc["status"] == "success" and doc["data"]["version"].startswith("2.")


async def test_query_range_answers_the_native_points_per_minute(client: TestClient[Any, Any]) -> None:
    status, doc = await get(client, "/api/v1/query_range", query='sum by (process_type) (minutely_requests)',
                            start=T0, end=T0 + 3540, step=60)
    assert status == 200 and doc["data"]["resultType"] == "matrix"
    rows = {r["metric"]["process_type"]: r["values"] for r in doc["data"]["result"]}
    assert set(rows) == {"web", "worker"}
    assert rows["web"] == [[T0 + 60 * i, str(10 + i)] for i in range(60)]
    native = await client.get(f"/v1/apps/shop/metrics?since={T0}&until={T0 + 3600}&resolution=60", headers=auth())
    points = (await native.json())["points"]
    assert [float(v) for _, v in rows["worker"]] == [float(p["requests"]) for p in points]


async def test_a_coarser_step_reads_the_rollups_as_a_mean_per_minute(client: TestClient[Any, Any]) -> None:
    _, doc = await get(client, "/api/v1/query_range", query='minutely_requests{process_type="web",status_class="2xx"}'
                       ' + on(process_type) minutely_requests{process_type="web",status_class="5xx"}',
                       start=T0, end=T0 + 7200 - 600, step=600)
    (row,) = doc["data"]["result"]
    # minute i has 10 + i requests: a 10 minute bucket starting at minute 10k holds 10 * (10 + 10k) + 45
    assert row["values"] == [[T0 + 600 * k, format(10 + 10 * k + 4.5)] for k in range(12)]


async def test_percentiles_memory_and_load_are_named_as_documented(client: TestClient[Any, Any]) -> None:
    _, doc = await get(client, "/api/v1/query", query='minutely_response_time_ms{process_type="web"}',
                       time=T0 + 59 * 60 + 30)
    got = {r["metric"]["quantile"]: float(r["value"][1]) for r in doc["data"]["result"]}
    assert set(got) == {"0.5", "0.95", "0.99", "1"} and got["1"] == 69.0  # minute 59 has 69 requests, 1..69 ms
    assert doc["data"]["result"][0]["metric"] == {"__name__": "minutely_response_time_ms", "app": "shop",
                                                  "process_type": "web", "quantile": "0.5"}
    _, doc = await get(client, "/api/v1/query", query='minutely_memory_mb{kind="rss",stat="max"}', time=T0)
    assert {r["metric"]["process_type"] for r in doc["data"]["result"]} == {"web", "worker"}
    _, doc = await get(client, "/api/v1/query", query="count(minutely_load)", time=T0)
    assert doc["data"]["result"][0]["value"][1] == "4"  # mean and max, of web and worker


async def test_a_token_reads_its_own_app_only(client: TestClient[Any, Any]) -> None:
    for q in ('minutely_requests{app="other"}', 'minutely_requests{app=~"other|shop", app!="shop"}'):
        _, doc = await get(client, "/api/v1/query", query=q, time=T0 + 30)
        assert doc["data"]["result"] == [], q
    _, doc = await get(client, "/api/v1/query", token="tok-other", query="sum(minutely_requests)", time=T0 + 30)
    assert doc["data"]["result"][0]["value"][1] == "10"  # other's own web minute, not shop's two process types
    _, doc = await get(client, "/api/v1/label/app/values", token="tok-other")
    assert doc["data"] == ["other"]
    r = await client.get("/api/v1/query", params={"query": "1"})
    assert r.status == 401 and (await r.json())["status"] == "error"
    r = await client.get("/api/v1/query", params={"query": "1"}, headers=auth("nope"))
    doc = await r.json()
    assert r.status == 401 and doc["errorType"] == "unauthorized" and "read token" in doc["error"]


async def test_labels_values_and_series_for_grafanas_variables(client: TestClient[Any, Any]) -> None:
    window: dict[str, Any] = {"start": T0, "end": T0 + 7200}
    _, doc = await get(client, "/api/v1/labels", **window)
    assert {"__name__", "app", "process_type", "status_class", "quantile", "kind", "stat"} <= set(doc["data"])
    _, doc = await get(client, "/api/v1/label/process_type/values", **window)
    assert doc["data"] == ["web", "worker"]
    _, doc = await get(client, "/api/v1/label/__name__/values", **window)
    assert "minutely_requests" in doc["data"] and "minutely_response_time_ms" in doc["data"]
    r = await client.post("/api/v1/series", data=[("match[]", 'minutely_requests{process_type="worker"}'),
                                                  ("start", str(T0)), ("end", str(T0 + 7200))], headers=auth())
    doc = await r.json()
    assert doc["data"] == [{"__name__": "minutely_requests", "app": "shop", "process_type": "worker",
                            "status_class": c} for c in ("2xx", "5xx")]
    # Nothing of worker after its last minute.
    _, doc = await get(client, "/api/v1/label/process_type/values", start=T0 + 7300, end=T0 + 7400)
    assert doc["data"] == []
    _, doc = await get(client, "/api/v1/label/status_class/values",
                       **{"match[]": 'minutely_requests{process_type="web"}'}, **window)
    assert doc["data"] == ["2xx", "5xx"]


async def test_metadata_names_every_metric(client: TestClient[Any, Any]) -> None:
    _, doc = await get(client, "/api/v1/metadata")
    assert doc["data"]["minutely_requests"][0]["type"] == "gauge"
    _, doc = await get(client, "/api/v1/metadata", metric="minutely_response_time_ms")
    assert list(doc["data"]) == ["minutely_response_time_ms"]


@pytest.mark.parametrize(("path", "params", "status", "kind", "says"), [
    ("/api/v1/query", {"query": "sum("}, 400, "bad_data", "invalid parameter \"query\""),
    ("/api/v1/query", {}, 400, "bad_data", "parameter is missing"),
    ("/api/v1/query", {"query": "rate(minutely_requests[5m])"}, 422, "execution", "rate()"),
    ("/api/v1/query", {"query": "1", "time": "yesterday"}, 400, "bad_data", "valid timestamp"),
    ("/api/v1/query_range", {"query": "1", "start": "10", "end": "5", "step": "1"}, 400, "bad_data", "before"),
    ("/api/v1/query_range", {"query": "1", "start": "0", "end": "100", "step": "0"}, 400, "bad_data", "positive"),
    ("/api/v1/query_range", {"query": "1", "start": "0", "end": "20000", "step": "1"}, 400, "bad_data", "11,000"),
    ("/api/v1/query_range", {"query": "minutely_requests[5m]", "start": "0", "end": "60", "step": "60"}, 400,
     "bad_data", "range vector"),
    ("/api/v1/query_range", {"query": "minutely_requests", "start": str(T0 - 86400 * 20), "end": str(T0),
                             "step": "180"}, 400, "bad_data", "METRICS_MAX_QUERY_POINTS"),
    ("/api/v1/series", {}, 400, "bad_data", "no match[]"),
    ("/api/v1/series", {"match[]": "sum(x)"}, 400, "bad_data", "series selector"),
    ("/api/v1/targets", {}, 404, "not_found", "not part of"),
])
async def test_errors_are_prometheus_shaped(client: TestClient[Any, Any], path: str, params: dict[str, str],
                                            status: int, kind: str, says: str) -> None:
    got, doc = await get(client, path, **params)
    assert (got, doc["status"], doc["errorType"]) == (status, "error", kind), doc
    assert says in doc["error"]


async def test_an_unchanged_answer_is_served_as_rendered(client: TestClient[Any, Any]) -> None:
    params: dict[str, Any] = {"query": "sum(minutely_requests)", "start": T0, "end": T0 + 3600, "step": 60}
    _, first = await get(client, "/api/v1/query_range", **params)
    _, again = await get(client, "/api/v1/query_range", **params)
    assert first == again and len(first["data"]["result"][0]["values"]) == 61
    assert client.app[COUNTERS_KEY].values["prometheus_cache_hits"] == 1


async def test_over_time_offset_and_rfc3339_times(client: TestClient[Any, Any]) -> None:
    iso = "2025-11-24T16:59:00Z"  # T0 + 59 min
    _, doc = await get(client, "/api/v1/query", query='sum_over_time(minutely_requests{process_type="web"}[5m])',
                       time=iso)
    assert sum(float(r["value"][1]) for r in doc["data"]["result"]) == sum(10 + i for i in range(55, 60))
    _, doc = await get(client, "/api/v1/query", query='sum(minutely_requests{process_type="web"} offset 10m)',
                       time=T0 + 59 * 60)
    assert doc["data"]["result"][0]["value"] == [T0 + 59 * 60, str(10 + 49)]

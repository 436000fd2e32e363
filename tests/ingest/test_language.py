"""Heroku language-metrics reports (app/ingest/language.py, ``POST /v1/language-metrics/<dyno>``), in the shape
heroku/x hmetrics posts them; the real Go client against the real stack is tests/integration/test_language.py."""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import orjson
import pytest

from app import models
from tests.ingest.test_admission import T0_MS, Stack, make_stack  # noqa: F401  (fixture)
from tests.storage.test_dynamodb import _moto_aio, aws  # noqa: F401  (fixtures)

HMETRICS = {"counters": {"go.gc.collections": 3, "go.gc.pause.ns": 120_000},
            "gauges": {"go.memory.heap.bytes": 4_200_000, "go.memory.stack.bytes": 65_536,
                       "go.memory.heap.objects": 9_000, "go.gc.goal": 8_000_000, "go.routines": 12}}


@pytest.fixture
def stack(make_stack: Any) -> Any:  # noqa: F811
    return make_stack


def basic(token: str) -> dict[str, str]:
    """What Go's and Node's HTTP clients send for ``https://x:TOKEN@host/...``."""
    return {"Authorization": "Basic " + base64.b64encode(f"x:{token}".encode()).decode()}


def produced(s: Stack) -> list[models.Metric]:
    dec = msgspec.json.Decoder(list[models.Metric])
    return [o for v in s.produced for o in dec.decode(v)]


async def test_an_hmetrics_report_becomes_counters_and_gauges_of_the_dyno(stack: Any) -> None:
    s: Stack = await stack()
    r = await s.client.post("/v1/language-metrics/web.2", data=orjson.dumps(HMETRICS),
                            headers={"Content-Type": "application/json", **basic(s.tokens["quiet-write"])})
    assert r.status == 200  # hmetrics counts anything but 200 as a failed report
    assert (await r.json()) == {"accepted": 7, "rejected": []}
    obs = produced(s)
    assert {(o.name, o.type, o.value) for o in obs} == {
        *((k, "counter", float(v)) for k, v in HMETRICS["counters"].items()),
        *((k, "gauge", float(v)) for k, v in HMETRICS["gauges"].items())}
    assert {(o.app, o.dyno, o.ts) for o in obs} == {("quiet", "web.2", T0_MS)}  # the arrival time


async def test_the_token_may_come_in_the_query_and_must_be_a_write_token(stack: Any) -> None:
    s: Stack = await stack()
    body = orjson.dumps(HMETRICS)
    r = await s.client.post(f"/v1/language-metrics/worker.1?token={s.tokens['quiet-write']}", data=body)
    assert r.status == 200 and {o.dyno for o in produced(s)} == {"worker.1"}
    r = await s.client.post("/v1/language-metrics/web.1", data=body)
    assert r.status == 401 and "HEROKU_METRICS_URL" in (await r.json())["error"]["message"]
    r = await s.client.post(f"/v1/language-metrics/web.1?token={s.tokens['quiet-drain']}", data=body)
    assert r.status == 403


async def test_bad_reports_and_entries(stack: Any) -> None:
    s: Stack = await stack()
    auth = basic(s.tokens["quiet-write"])
    r = await s.client.post("/v1/language-metrics/web.1", data=b"{not json", headers=auth)
    assert r.status == 400 and (await r.json())["error"]["code"] == "malformed_report"
    r = await s.client.post("/v1/language-metrics/web.1", data=b"[1, 2]", headers=auth)
    assert r.status == 400
    r = await s.client.post("/v1/language-metrics/%20bad", data=orjson.dumps(HMETRICS), headers=auth)
    assert r.status == 400 and (await r.json())["error"]["code"] == "bad_dyno"
    assert s.produced == []
    mixed = {"counters": {"ok.count": 2, "neg.count": -1}, "gauges": {"ok.gauge": 1.5, "text": "12",
                                                                      "bad name!": 3, "flag": True}}
    r = await s.client.post("/v1/language-metrics/web.1", data=orjson.dumps(mixed), headers=auth)
    got = await r.json()
    assert r.status == 200 and got["accepted"] == 2
    assert {e["name"]: e["reason"][:20] for e in got["rejected"]} == {
        "neg.count": "a counter (what happ", "text": "the value must be a ", "bad name!": "a metric name is 1..",
        "flag": "the value must be a "}
    assert sorted(o.name for o in produced(s)) == ["ok.count", "ok.gauge"]


async def test_measurements_time_dates_the_report_and_a_stale_one_is_refused(stack: Any) -> None:
    s: Stack = await stack()
    auth = basic(s.tokens["quiet-write"])
    body = orjson.dumps(HMETRICS)
    r = await s.client.post("/v1/language-metrics/web.1", data=body,
                            headers={**auth, "Measurements-Time": "2023-11-14T22:12:50Z"})  # T0 - 30 s
    assert r.status == 200 and {o.ts for o in produced(s)} == {T0_MS - 30_000}
    for stale in ("2023-11-14T22:00:00Z", "yesterday", "2023-11-14T22:12:50"):
        r = await s.client.post("/v1/language-metrics/web.1", data=body, headers={**auth, "Measurements-Time": stale})
        assert r.status == 400 and (await r.json())["error"]["code"] == "bad_measurements_time", stale

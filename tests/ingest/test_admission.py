"""Per-tenant admission at the ingest (app/ingest/admission.py): rate and burst per app, bytes in flight per
token, the process's budget shared fairly, parse slots app by app, compressed bodies, Idempotency-Key.

Every budget is charged on bytes as they arrive, after auth. The whole-stack figures (a flooding app beside a
quiet one; the ingest at twice its capacity) are tests/integration/test_noisy_neighbour.py and test_overload.py.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from app.clock import ManualClock
from app.ingest.admission import Admission
from app.ingest.dedup import FrameDedup
from app.ingest.server import Ingest, make_ingest_app
from app.limits import Limits
from app.local.loadgen import frame, logplex_headers
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.backends import frame_table, token_table
from app.storage.tokens import TokenStore
from tests.storage.test_dynamodb import _moto_aio, aws  # noqa: F401  (fixtures)

T0_MS = 1_700_000_000_000


def body(app: str, n: int, ts_ms: int = T0_MS) -> bytes:
    return orjson.dumps([{"kind": "router", "app": app, "dyno": "web.1", "ts": ts_ms + i, "status": 200,
                          "service_ms": 5.0} for i in range(n)])


def router_frame(n: int) -> bytes:
    return frame([b"<158>1 2023-11-14T22:13:20+00:00 host heroku router - at=info method=GET path=/ host=x "
                  b"request_id=r fwd=1.2.3.4 dyno=web.1 connect=0ms service=%dms status=200 bytes=10" % i
                  for i in range(n)])


@dataclass
class Stack:
    client: TestClient[Any, Any]
    ingest: Ingest
    tokens: dict[str, str]
    counters: Counters
    clock: ManualClock
    produced: list[bytes]
    hold: asyncio.Event
    waiting: list[str]


@pytest.fixture
async def make_stack(aws: None, aiohttp_client: Any) -> AsyncIterator[Any]:  # noqa: F811
    opened: list[tuple[TokenStore, FrameDedup]] = []

    async def make(**overrides: Any) -> Stack:
        settings = Settings.of(table_name=f"adm-{time.monotonic_ns()}", dynamodb_endpoint="", **overrides)
        tokens = TokenStore(settings.web, table=token_table(settings))
        await tokens.start()
        dedup = FrameDedup(settings.ingest, table=frame_table(settings))
        await dedup.start()
        opened.append((tokens, dedup))
        made = {f"{app}-{kind}": (await tokens.create(app, kind))[0]
                for app in ("flood", "quiet") for kind in ("write", "drain")}
        made["flood-write-2"] = (await tokens.create("flood", "write"))[0]
        hold = asyncio.Event()
        hold.set()
        produced: list[bytes] = []
        waiting: list[str] = []

        async def kafka(topic: str, records: Any) -> None:  # acknowledges when the test lets it
            waiting.append(topic)
            await hold.wait()
            waiting.remove(topic)
            produced.extend(v for _, v in records)

        counters = Counters()
        clock = ManualClock(T0_MS)
        limits = Limits(settings.limits)
        await limits.start()
        ingest = Ingest(settings.ingest, settings.kafka, settings.windows, tokens=tokens, dedup=dedup, produce=kafka,
                        counters=counters, limits=limits, clock=clock)
        client = await aiohttp_client(make_ingest_app(ingest, settings))
        return Stack(client, ingest, made, counters, clock, produced, hold, waiting)

    yield make
    for tokens, dedup in opened:
        await dedup.stop()
        await tokens.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_an_app_over_its_rate_is_refused_before_its_body_and_others_are_not(make_stack: Any) -> None:
    one = len(body("flood", 100))
    s: Stack = await make_stack(limit_ingest_rate_bytes_s=float(one), limit_ingest_burst_bytes=2 * one)
    auth = bearer(s.tokens["flood-write"])
    assert [(await s.client.post("/v1/observations", data=body("flood", 100), headers=auth)).status
            for _ in range(2)] == [200, 200]  # the burst
    r = await s.client.post("/v1/observations", data=body("flood", 100), headers=auth)
    assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limited"
    assert r.headers["Retry-After"] == "1"
    # The drain of the same app: 503 (Logplex drops 4xx), with Retry-After.
    d = await s.client.post("/v1/drains/logplex", data=router_frame(3),
                            headers=logplex_headers(s.tokens["flood-drain"], 3))
    assert d.status == 503 and (await d.json())["error"]["code"] == "rate_limited" and "Retry-After" in d.headers
    # Another app is untouched; the flooding one is back once the debt is repaid.
    assert (await s.client.post("/v1/observations", data=body("quiet", 100),
                                headers=bearer(s.tokens["quiet-write"]))).status == 200
    s.clock.advance(2_000)
    assert (await s.client.post("/v1/observations", data=body("flood", 100), headers=auth)).status == 200
    assert s.counters.by_app["ingest_refused_rate"] == {"flood": 2}
    assert s.ingest.admission.held_bytes == 0
    assert s.counters.by_app["ingest_bytes_received"]["quiet"] == one


async def test_overrides_change_an_apps_limit_without_a_restart(make_stack: Any, tmp_path: Path) -> None:
    one = len(body("flood", 100))
    path = tmp_path / "limits.yaml"
    path.write_text("overrides: {}\n")
    s: Stack = await make_stack(limit_ingest_rate_bytes_s=float(one), limit_ingest_burst_bytes=one,
                                limits_file=str(path))
    auth = bearer(s.tokens["flood-write"])
    statuses = [(await s.client.post("/v1/observations", data=body("flood", 100), headers=auth)).status
                for _ in range(3)]
    assert statuses == [200, 429, 429]
    path.write_text(f"overrides:\n  flood:\n    ingest_rate_bytes_s: {100 * one}\n"
                    f"    ingest_burst_bytes: {100 * one}\n")
    assert await s.ingest.limits.reload()
    s.clock.advance(3_000)  # repays the debt at the new rate, and fills the new burst
    statuses = [(await s.client.post("/v1/observations", data=body("flood", 100), headers=auth)).status
                for _ in range(5)]
    assert statuses == [200] * 5
    assert s.ingest.limits.of("quiet").ingest_rate_bytes_s == float(one)  # other apps keep the defaults
    path.write_text("overrides: {flood: {no_such_limit: 1}}\n")
    assert not await s.ingest.limits.reload()  # refused with a log line; the overrides in force stay
    assert s.ingest.limits.of("flood").ingest_rate_bytes_s == 100 * one


async def test_one_app_holding_the_process_budget_does_not_shut_others_out(make_stack: Any) -> None:
    one = len(body("flood", 100))
    s: Stack = await make_stack(ingest_max_inflight_bytes=int(2.5 * one))
    s.hold.clear()  # Kafka acknowledges only when the test says so
    held = [asyncio.create_task(s.client.post("/v1/observations", data=body("flood", 100),
                                              headers=bearer(s.tokens[t]))) for t in ("flood-write", "flood-write-2")]
    while len(s.waiting) < 2:
        await asyncio.sleep(0.01)
    # The flooding app is over the budget: refused at once, not queued.
    shed = await asyncio.wait_for(s.client.post("/v1/observations", data=body("flood", 100),
                                                headers=bearer(s.tokens["flood-write"])), 5)
    assert shed.status == 429 and (await shed.json())["error"]["code"] == "overloaded"
    # The quiet app holds nothing: its share is open to it although the process is past the budget.
    quiet = asyncio.create_task(s.client.post("/v1/observations", data=body("quiet", 100),
                                              headers=bearer(s.tokens["quiet-write"])))
    while len(s.waiting) < 3:
        await asyncio.sleep(0.01)
    s.hold.set()
    assert [(await t).status for t in held] == [200, 200] and (await quiet).status == 200
    assert s.counters.by_app["ingest_requests_shed"] == {"flood": 1}
    assert s.ingest.admission.held_bytes == 0


async def test_bytes_in_flight_are_bounded_per_token(make_stack: Any) -> None:
    one = len(body("flood", 100))
    s: Stack = await make_stack(limit_inflight_bytes_per_token=int(1.5 * one))
    s.hold.clear()
    first = asyncio.create_task(s.client.post("/v1/observations", data=body("flood", 100),
                                              headers=bearer(s.tokens["flood-write"])))
    while not s.waiting:
        await asyncio.sleep(0.01)
    r = await s.client.post("/v1/observations", data=body("flood", 100), headers=bearer(s.tokens["flood-write"]))
    assert r.status == 429 and (await r.json())["error"]["code"] == "inflight_limit"
    # The app's other token has its own budget.
    second = asyncio.create_task(s.client.post("/v1/observations", data=body("flood", 100),
                                               headers=bearer(s.tokens["flood-write-2"])))
    while len(s.waiting) < 2:
        await asyncio.sleep(0.01)
    s.hold.set()
    assert ((await first).status, (await second).status) == (200, 200)


async def test_a_declared_length_holds_nothing_until_the_bytes_arrive(make_stack: Any) -> None:
    """16 connections declaring 4 MB and sending nothing held the whole budget before (review H5)."""
    s: Stack = await make_stack(ingest_max_inflight_bytes=1_000_000, ingest_body_timeout_s=2.0)
    host, port = s.client.host, s.client.port
    writers = []
    for _ in range(16):
        _, w = await asyncio.open_connection(host, port)
        w.write(b"POST /v1/observations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + s.tokens["flood-write"].encode() + b"\r\n"
                b"Content-Length: 4000000\r\n\r\n[")
        await w.drain()
        writers.append(w)
    for _ in range(500):  # until the server has read every request's headers: all 16 in progress
        if s.ingest.admission.active_total == 16:
            break
        await asyncio.sleep(0.01)
    assert s.ingest.admission.active_total == 16
    assert s.ingest.admission.held_bytes <= 16  # one byte each, not 16 x 4 MB
    r = await s.client.post("/v1/observations", data=body("quiet", 100), headers=bearer(s.tokens["quiet-write"]))
    assert r.status == 200
    for w in writers:
        w.close()
        await w.wait_closed()


async def test_waiting_requests_are_served_app_by_app() -> None:
    """A quiet app's request waits for at most one request of each other app, not for a flood's backlog."""
    settings = Settings.of(ingest_work_slots=1, ingest_max_waiting_per_app=100)
    adm = Admission(settings.ingest, Limits(settings.limits), Counters())
    order: list[str] = []
    gate = asyncio.Event()

    async def job(app: str) -> None:
        async with adm.slot(app):
            order.append(app)
            await gate.wait()

    first = asyncio.create_task(job("flood"))
    await asyncio.sleep(0)
    flood = [asyncio.create_task(job("flood")) for _ in range(20)]
    await asyncio.sleep(0)
    quiet = asyncio.create_task(job("quiet"))
    await asyncio.sleep(0)
    assert adm.waiting == 21
    gate.set()
    await asyncio.gather(first, quiet, *flood)
    assert order.index("quiet") == 2  # after the running one and the flood's first waiting one
    assert adm.waiting == 0


async def test_an_app_with_a_full_queue_is_refused_before_its_body_is_read() -> None:
    settings = Settings.of(ingest_work_slots=1, ingest_max_waiting_per_app=2)
    adm = Admission(settings.ingest, Limits(settings.limits), Counters())
    gate = asyncio.Event()

    async def job(app: str) -> None:
        async with adm.slot(app):
            await gate.wait()

    tasks = [asyncio.create_task(job("flood")) for _ in range(3)]
    await asyncio.sleep(0)
    refused = adm.refuse_early("flood")
    assert refused is not None and refused.code == "queue_full"
    assert adm.refuse_early("quiet") is None
    tasks[1].cancel()  # a waiter that goes away leaves the queue
    gate.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert adm.waiting == 0 and adm.refuse_early("flood") is None


async def test_compressed_bodies_count_after_decompression_with_a_ratio_limit(make_stack: Any) -> None:
    s: Stack = await make_stack()
    auth = {**bearer(s.tokens["quiet-write"]), "Content-Encoding": "gzip", "Content-Type": "application/json"}
    ok = gzip.compress(body("quiet", 100))
    r = await s.client.post("/v1/observations", data=ok, headers=auth)
    assert r.status == 200 and (await r.json())["accepted"] == 100
    bomb = gzip.compress(b"[" + b" " * 3_000_000 + b"]")  # ~3 KB that inflate 1000x
    r = await s.client.post("/v1/observations", data=bomb, headers=auth)
    assert r.status == 413 and (await r.json())["error"]["code"] == "body_too_large"
    assert s.counters.by_app["ingest_refused_too_large"] == {"quiet": 1}
    r = await s.client.post("/v1/observations", data=b"\x1f\x8b\x08\x00not gzip at all" * 10, headers=auth)
    assert r.status == 400 and (await r.json())["error"]["code"] == "malformed_body"  # never a 500
    assert s.counters.by_app["ingest_refused_bad_body"] == {"quiet": 1}


async def test_idempotency_key_makes_a_retried_batch_count_once(make_stack: Any) -> None:
    s: Stack = await make_stack()
    headers = {**bearer(s.tokens["quiet-write"]), "Idempotency-Key": "batch-7"}
    first = await s.client.post("/v1/observations", data=body("quiet", 10), headers=headers)
    again = await s.client.post("/v1/observations", data=body("quiet", 10), headers=headers)
    assert (await first.json())["accepted"] == 10
    assert again.status == 200 and (await again.json())["duplicate"] is True
    assert again.headers["Idempotent-Replayed"] == "true"
    assert sum(len(orjson.loads(v)) for v in s.produced) == 10


async def test_a_million_bad_elements_stay_a_bounded_answer(make_stack: Any) -> None:
    s: Stack = await make_stack()
    r = await s.client.post("/v1/observations", data=b"[" + b"1," * 1_000_000 + b"1]",
                            headers=bearer(s.tokens["quiet-write"]))
    got = await r.json()
    assert r.status == 400 and len(got["rejected"]) == 1000 and got["rejected_not_listed"] == 1_000_001 - 1000


async def test_dead_letters_per_frame_are_capped(make_stack: Any) -> None:
    s: Stack = await make_stack(ingest_max_dead_letters_per_request=5)
    bad = [b"<158>1 2023-11-14T22:13:20+00:00 host heroku router - at=info status=999" for _ in range(50)]
    r = await s.client.post("/v1/drains/logplex", data=frame(bad), headers=logplex_headers(s.tokens["quiet-drain"], 50))
    assert r.status == 204
    dead = [orjson.loads(v) for v in s.produced]
    assert len(dead) == 5 and dead[0]["source"]["drain_id"].startswith("d.")
    assert s.counters.snapshot()["ingest_dead_letters_dropped"] == 45


def test_per_app_counters_are_labelled_on_metrics() -> None:
    from prometheus_client import generate_latest

    from app.ops.health import make_registry

    counters = Counters()
    counters.inc_app("ingest_refused_rate", "flood", 3)
    counters.inc_app("ingest_refused_rate", "other")
    text = generate_latest(make_registry(counters)).decode()
    assert 'minutely_ingest_refused_rate_total{app="flood"} 3.0' in text
    assert 'minutely_ingest_refused_rate_total{app="other"} 1.0' in text
    assert counters.snapshot()["ingest_refused_rate"] == 4


async def test_past_the_request_cap_only_the_heaviest_app_is_shed() -> None:
    """A flood that took every request slot before a quiet app arrived drains to its share; meanwhile the
    quiet app's requests pile up behind it (it waits in the flood's queue) and are still admitted."""
    from contextlib import AsyncExitStack

    settings = Settings.of(ingest_max_active_requests=4)
    adm = Admission(settings.ingest, Limits(settings.limits), Counters())
    async with AsyncExitStack() as held:
        for _ in range(4):  # alone, the flood's share is every slot
            assert await held.enter_async_context(adm.request("flood")) is None
        for _ in range(3):  # at and past its share of 2, but the flood holds more
            assert await held.enter_async_context(adm.request("quiet")) is None
        refused = await held.enter_async_context(adm.request("flood"))
        assert refused is not None and refused.code == "overloaded"
        # Even: both at the heaviest count, so both are shed until requests finish.
        assert await held.enter_async_context(adm.request("quiet")) is None
        assert adm.refuse_early("quiet") is not None and adm.refuse_early("flood") is not None
    assert adm.active_total == 0 and adm.refuse_early("quiet") is None

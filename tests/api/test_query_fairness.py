"""Fairness of the read API between tenants (app/api/web.py, security review M7): the per-app query rate
(with an injected clock), the cap on the /events range, and the cap on queries computing at once, fairly per
app (with fake slow queries)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from app.api.query import Answer, MetricsQuery
from app.api.web import GATE_KEY, make_web_app
from app.clock import ManualClock
from app.limits import AppLimits, Limits
from app.limits import FairSlots as QueryGate
from app.ops.stats import Counters
from app.settings import Settings
from tests.api.test_query import SETTINGS, T0, MemoryStore

NOW_S = T0 + 7200 + 30
TOKENS = {"tok-shop": "shop", "tok-shop-2": "shop", "tok-other": "other"}
METRICS = f"/v1/apps/{{app}}/metrics?since={T0}&until={T0 + 600}"


async def authorize(token: str) -> str | None:
    return TOKENS.get(token)


def auth(token: str = "tok-shop") -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def rate_client(aiohttp_client: Any, settings: Settings, clock: ManualClock, counters: Counters,
                      limits: Limits | None = None) -> TestClient[Any, Any]:
    store = MemoryStore(ManualClock(NOW_S * 1000))
    query = MetricsQuery(store, settings=settings, clock=store.clock, counters=Counters())
    c: TestClient[Any, Any] = await aiohttp_client(
        make_web_app(query, settings, counters, authorize=authorize, limits=limits, clock=clock))
    return c


# --- the rate limit -----------------------------------------------------------------------------------------

async def test_an_app_past_its_rate_and_burst_gets_429_with_retry_after_and_is_counted(aiohttp_client: Any) -> None:
    clock, counters = ManualClock(NOW_S * 1000), Counters()
    settings = SETTINGS.replace(limit_query_rate_per_s=2.0, limit_query_burst=3)
    c = await rate_client(aiohttp_client, settings, clock, counters)
    url = METRICS.format(app="shop")
    for _ in range(3):  # the burst
        assert (await c.get(url, headers=auth())).status == 200
    r = await c.get(url, headers=auth("tok-shop-2"))  # the app's other token shares its bucket
    assert r.status == 429 and r.headers["Retry-After"] == "1"
    err = (await r.json())["error"]
    assert err["code"] == "rate_limited" and "2 requests/s" in err["message"]
    assert counters.by_app["query_refused_rate"] == {"shop": 1}
    # Another app is not affected.
    assert (await c.get(METRICS.format(app="other"), headers=auth("tok-other"))).status == 200
    clock.advance(500)  # half a second at 2/s: one request
    assert (await c.get(url, headers=auth())).status == 200
    assert (await c.get(url, headers=auth())).status == 429
    clock.advance(10_000)  # refilled up to the burst, not beyond
    assert [(await c.get(url, headers=auth())).status for _ in range(4)] == [200, 200, 200, 429]
    assert counters.values["query_refused_rate"] == 3


async def test_events_whoami_and_304_revalidations_are_charged_too(aiohttp_client: Any) -> None:
    clock, counters = ManualClock(NOW_S * 1000), Counters()
    settings = SETTINGS.replace(limit_query_rate_per_s=1.0, limit_query_burst=4)
    c = await rate_client(aiohttp_client, settings, clock, counters)
    url = METRICS.format(app="shop")
    r = await c.get(url, headers=auth())
    assert r.status == 200
    r = await c.get(url, headers={**auth(), "If-None-Match": r.headers["ETag"]})
    assert r.status == 304  # cheap on the wire, but the answer was looked up: one request
    assert (await c.get("/v1/apps/shop/events", headers=auth())).status == 200
    assert (await c.get("/v1/whoami", headers=auth())).status == 200
    for path in (url, "/v1/apps/shop/events", "/v1/whoami"):
        r = await c.get(path, headers=auth())
        assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limited", path
    # Without a valid token there is no app to charge: 401 as before.
    assert (await c.get(url)).status == 401


async def test_a_429_tells_nothing_about_the_app_in_the_path(aiohttp_client: Any) -> None:
    """The caller's own bucket is charged before the path's app is compared: 'shop' (exists) and 'ghost'
    (never existed) get the same 429, as they get the same 404."""
    clock, counters = ManualClock(NOW_S * 1000), Counters()
    c = await rate_client(aiohttp_client, SETTINGS.replace(limit_query_burst=2), clock, counters)
    for app in ("shop", "ghost"):
        assert (await c.get(METRICS.format(app=app), headers=auth("tok-other"))).status == 404
    answers = []
    for app in ("shop", "ghost"):
        r = await c.get(METRICS.format(app=app), headers=auth("tok-other"))
        answers.append((r.status, r.headers["Retry-After"], await r.read()))
    assert answers[0] == answers[1] and answers[0][0] == 429
    assert counters.by_app["query_refused_rate"] == {"other": 2}


async def test_per_app_overrides_apply_and_a_slow_rate_says_how_long_to_wait(aiohttp_client: Any) -> None:
    clock, counters = ManualClock(NOW_S * 1000), Counters()
    defaults = AppLimits.defaults(SETTINGS.limits)
    limits = Limits(SETTINGS.limits, overrides={"shop": replace(defaults, query_rate_per_s=0.1, query_burst=1)})
    c = await rate_client(aiohttp_client, SETTINGS, clock, counters, limits)
    assert (await c.get(METRICS.format(app="shop"), headers=auth())).status == 200
    r = await c.get(METRICS.format(app="shop"), headers=auth())
    assert r.status == 429 and r.headers["Retry-After"] == "10"  # one request every 10 s
    for _ in range(5):  # the defaults (burst 60) for everyone else
        assert (await c.get(METRICS.format(app="other"), headers=auth("tok-other"))).status == 200


async def test_the_limits_file_sets_query_limits_and_is_followed_by_the_web_app(aiohttp_client: Any,
                                                                                tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text("overrides:\n  shop:\n    query_burst: 2\n    query_rate_per_s: 0.5\n")
    settings = SETTINGS.replace(limits_file=str(path))
    c = await rate_client(aiohttp_client, settings, ManualClock(NOW_S * 1000), Counters())  # its own Limits
    assert [(await c.get(METRICS.format(app="shop"), headers=auth())).status for _ in range(3)] == [200, 200, 429]
    r = await c.get(METRICS.format(app="shop"), headers=auth())
    assert r.headers["Retry-After"] == "2"
    assert (await c.get(METRICS.format(app="other"), headers=auth("tok-other"))).status == 200


# --- the /events range --------------------------------------------------------------------------------------

async def test_events_range_is_capped(aiohttp_client: Any) -> None:
    c = await rate_client(aiohttp_client, SETTINGS, ManualClock(NOW_S * 1000), Counters())
    week = 7 * 86400
    r = await c.get(f"/v1/apps/shop/events?since={NOW_S - week}&until={NOW_S}", headers=auth())
    assert r.status == 200
    r = await c.get(f"/v1/apps/shop/events?since={NOW_S - week - 60}&until={NOW_S}", headers=auth())
    assert r.status == 400
    err = (await r.json())["error"]
    assert err["code"] == "range_too_large" and "7 days" in err["message"]
    # /metrics keeps the retention as its bound.
    r = await c.get(f"/v1/apps/shop/metrics?since={NOW_S - 30 * 86400}&until={NOW_S}", headers=auth())
    assert r.status == 200
    c2 = await rate_client(aiohttp_client, SETTINGS.replace(events_max_range_days=1.0), ManualClock(0), Counters())
    r = await c2.get(f"/v1/apps/shop/events?since={NOW_S - 86400 - 60}&until={NOW_S}", headers=auth())
    assert r.status == 400 and (await r.json())["error"]["code"] == "range_too_large"


# --- concurrent queries -------------------------------------------------------------------------------------

class SlowEngine:
    """A QueryEngine whose queries run until released, per app; it records how many run at once."""

    def __init__(self) -> None:
        self.release: dict[str, asyncio.Event] = {}
        self.running: dict[str, int] = {}
        self.peak = 0

    def gate(self, app: str) -> asyncio.Event:
        return self.release.setdefault(app, asyncio.Event())

    async def _run(self, app: str) -> None:
        self.running[app] = self.running.get(app, 0) + 1
        self.peak = max(self.peak, sum(self.running.values()))
        try:
            await self.gate(app).wait()
        finally:
            self.running[app] -= 1

    async def answer(self, app: str, process_type: str, resolution_s: int, since_s: int, until_s: int) -> Answer:
        await self._run(app)
        body = orjson.dumps({"app": app, "process_type": process_type, "resolution_s": resolution_s,
                             "since": since_s, "until": until_s, "points": []})
        return Answer(body, '"e"', True, resolution_s, 0)

    async def events(self, app: str, process_type: str, since_s: int, until_s: int) -> bytes:
        await self._run(app)
        return orjson.dumps({"app": app, "process_type": process_type, "since": since_s, "until": until_s,
                             "events": []})

    async def process_types(self, app: str, since_s: int, until_s: int) -> list[str]:
        await self._run(app)
        return ["web"]


async def until(cond: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.005)


async def slow_client(aiohttp_client: Any, engine: SlowEngine, counters: Counters, **settings: Any
                      ) -> TestClient[Any, Any]:
    s = SETTINGS.replace(limit_query_burst=1000, **settings)
    c: TestClient[Any, Any] = await aiohttp_client(make_web_app(engine, s, counters, authorize=authorize))
    return c


async def test_one_app_cannot_take_every_query_slot(aiohttp_client: Any) -> None:
    engine, counters = SlowEngine(), Counters()
    c = await slow_client(aiohttp_client, engine, counters, query_max_concurrent=4,
                          query_max_concurrent_per_app=2, query_queue_timeout_s=1.0)
    paths = [METRICS.format(app="shop")] * 3 + ["/v1/apps/shop/events"]
    flood = [asyncio.create_task(c.get(p, headers=auth())) for p in paths]
    await until(lambda: engine.running.get("shop") == 2 and c.app[GATE_KEY].waiting == 2)
    quiet = asyncio.create_task(c.get(METRICS.format(app="other"), headers=auth("tok-other")))
    await until(lambda: engine.running.get("other") == 1)  # a free slot, though shop has queries waiting
    engine.gate("other").set()
    assert (await quiet).status == 200
    await until(lambda: sum(t.done() for t in flood) == 2)  # the two waiting past query_queue_timeout_s
    refused, running = [t for t in flood if t.done()], [t for t in flood if not t.done()]
    for t in refused:
        r = t.result()
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert (await r.json())["error"]["code"] == "overloaded"
    assert counters.by_app["query_refused_busy"] == {"shop": 2}
    assert engine.peak == 3 and engine.running["shop"] == 2
    engine.gate("shop").set()
    assert [(await t).status for t in running] == [200, 200]
    assert c.app[GATE_KEY].busy == 0 and c.app[GATE_KEY].held == {}


async def test_a_waiting_query_gets_the_slot_freed_within_the_wait(aiohttp_client: Any) -> None:
    engine, counters = SlowEngine(), Counters()
    c = await slow_client(aiohttp_client, engine, counters, query_max_concurrent=1,
                          query_max_concurrent_per_app=1, query_queue_timeout_s=5.0)
    first = asyncio.create_task(c.get(METRICS.format(app="shop"), headers=auth()))
    await until(lambda: engine.running.get("shop") == 1)
    second = asyncio.create_task(c.get(METRICS.format(app="other"), headers=auth("tok-other")))
    await until(lambda: c.app[GATE_KEY].waiting == 1)
    assert engine.running.get("other", 0) == 0  # the one slot is busy
    engine.gate("other").set()
    engine.gate("shop").set()
    assert (await first).status == 200 and (await second).status == 200
    assert engine.peak == 1 and counters.values["query_refused_busy"] == 0


async def test_a_slot_is_held_until_the_work_ends_even_past_the_query_timeout(aiohttp_client: Any) -> None:
    engine, counters = SlowEngine(), Counters()
    c = await slow_client(aiohttp_client, engine, counters, query_max_concurrent=2,
                          query_max_concurrent_per_app=1, query_queue_timeout_s=0.1, query_timeout_s=0.2)
    r = await c.get(METRICS.format(app="shop"), headers=auth())
    assert r.status == 503 and (await r.json())["error"]["code"] == "timeout"  # the store is slow
    assert engine.running["shop"] == 1 and c.app[GATE_KEY].held == {"shop": 1}  # its read goes on
    r = await c.get(METRICS.format(app="shop"), headers=auth())
    assert r.status == 503 and (await r.json())["error"]["code"] == "overloaded"
    engine.gate("shop").set()
    await until(lambda: c.app[GATE_KEY].busy == 0)
    engine.release["shop"] = asyncio.Event()
    engine.gate("shop").set()
    assert (await c.get(METRICS.format(app="shop"), headers=auth())).status == 200


async def test_no_cap_when_query_max_concurrent_is_zero(aiohttp_client: Any) -> None:
    engine, counters = SlowEngine(), Counters()
    c = await slow_client(aiohttp_client, engine, counters, query_max_concurrent=0, query_queue_timeout_s=0.05)
    tasks = [asyncio.create_task(c.get(METRICS.format(app="shop"), headers=auth())) for _ in range(20)]
    await until(lambda: engine.running.get("shop") == 20)
    engine.gate("shop").set()
    assert {(await t).status for t in tasks} == {200}


async def settle() -> None:
    for _ in range(5):  # a hand-over wakes the waiter through asyncio.wait: a few loop turns
        await asyncio.sleep(0)


async def test_gate_hands_freed_slots_to_waiting_apps_in_turn_skipping_apps_at_their_share() -> None:
    gate = QueryGate(slots=2, per_app=1, wait_s=5.0)
    order: list[str] = []

    async def take(app: str) -> None:
        assert await gate.acquire(app)
        order.append(app)

    assert await gate.acquire("a")
    a2 = asyncio.create_task(take("a"))  # "a" holds its share: waits though a slot is free
    await settle()
    assert await gate.acquire("b")  # "b" takes the free slot at once
    c1 = asyncio.create_task(take("c"))
    await settle()
    b2 = asyncio.create_task(take("b"))
    await settle()
    assert gate.waiting == 3 and gate.busy == 2
    gate.release("b")  # "a" is at its share: "c" is next
    await settle()
    assert order == ["c"]
    gate.release("a")
    await settle()
    assert order == ["c", "a"]
    gate.release("c")
    await settle()
    assert order == ["c", "a", "b"]
    await asyncio.gather(a2, c1, b2)
    assert gate.held == {"a": 1, "b": 1} and gate.waiting == 0


async def test_gate_forgets_waiters_that_time_out_or_are_cancelled() -> None:
    gate = QueryGate(slots=1, per_app=1, wait_s=0.05)
    assert await gate.acquire("a")
    assert not await gate.acquire("b")  # timed out
    waiter = asyncio.create_task(gate.acquire("c"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.waiting == 0
    gate.release("a")
    assert gate.busy == 0 and gate.held == {}
    assert await gate.acquire("b")

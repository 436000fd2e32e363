"""The monitors/autoscaling HTTP API (app/policies_api.py) through pytest-aiohttp.

Behind the routes are the real engines (agents/alerts.py, agents/autoscale.py) over dict tables. A produced
command is handed to them from the event loop after the send returned, as the worker's agents receive it
from the topic; the Kafka path itself is covered by tests/integration/test_alerting.py.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from agents.alerts import AlertEngine, Outbox, decode_command
from agents.autoscale import AutoscaleEngine
from app.errors import RetriableError, StoreUnavailable
from app.notify import Notifier
from app.policies_api import (LOCAL, REMOTE, UNKNOWN, CommandResults, PolicyBackend, add_policy_routes,
                              token_authorizer)
from app.settings import Settings
from app.stats import Counters
from tables.monitors import Decision

AClient = Callable[..., Awaitable[TestClient[Any, Any]]]

MONITOR = {"process_type": "web", "metric": "LATENCY", "threshold": 500, "sensitivity_min": 5,
           "notify_every_min": 60, "email": ["ops@example.com"],
           "webhooks": [{"url": "https://hooks.example.com/minutely", "secret": "whsec_0123456789abcdef"}]}
POLICY = {"min_dynos": 1, "max_dynos": 4, "p95_target_ms": 300, "current_dynos": 2}


class Worker:
    """The engines of one worker plus the command transport."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings(max_monitors_per_app=3)
        self.counters = Counters()
        self.results = CommandResults()
        notifier = Notifier(self.settings, self.counters, senders={})
        self.monitors_table: dict[bytes, bytes] = {}
        self.autoscale_table: dict[bytes, bytes] = {}

        async def publish_alerts(events: Any) -> None:
            return None

        async def publish_decision(d: Decision) -> None:
            return None

        self.alerts = AlertEngine(self.monitors_table, self.settings, self.counters, publish=publish_alerts,
                                  outbox=Outbox(self.monitors_table, notifier, context_topic="m", owns=lambda p: True),
                                  results=self.results)
        self.autoscale = AutoscaleEngine(self.autoscale_table, self.settings, self.counters,
                                         publish=publish_decision,
                                         outbox=Outbox(self.autoscale_table, notifier, context_topic="m",
                                                       owns=lambda p: True), results=self.results)
        self.ownership = LOCAL
        self.apply = True
        self.broker_down = False
        self.sent: list[tuple[str, bytes]] = []

    async def send(self, app: str, value: bytes) -> None:
        if self.broker_down:
            raise RetriableError("broker unavailable", retry_after_s=2.0)
        self.sent.append((app, value))
        if self.apply:
            asyncio.get_running_loop().call_soon(self.consume, value)

    def consume(self, value: bytes) -> None:
        cmd = decode_command(value, self.counters)
        assert cmd is not None
        self.alerts.on_command(0, cmd)
        self.autoscale.on_command(0, cmd)

    def backend(self, timeout_s: float = 2.0) -> PolicyBackend:
        return PolicyBackend(owner=lambda app: self.ownership, monitors=self.alerts.doc,
                             policies=self.autoscale.doc, send=self.send, results=self.results,
                             apply_timeout_s=timeout_s)


@pytest.fixture
def worker() -> Worker:
    return Worker()


async def client_for(aiohttp_client: AClient, worker: Worker, authorize: Any = None,
                     timeout_s: float = 2.0) -> TestClient[Any, Any]:
    webapp = web.Application()
    add_policy_routes(webapp, worker.backend(timeout_s), authorize=authorize)
    return await aiohttp_client(webapp)


# --- monitors ---------------------------------------------------------------------------------------------

async def test_monitor_lifecycle(aiohttp_client: AClient, worker: Worker) -> None:
    c = await client_for(aiohttp_client, worker)
    r = await c.post("/v1/apps/shop/monitors", json=MONITOR)
    assert r.status == 201
    created = await r.json()
    mid = created["id"]
    assert r.headers["Location"] == f"/v1/apps/shop/monitors/{mid}" and mid.startswith("mon_")
    assert created["webhooks"] == [{"url": "https://hooks.example.com/minutely", "secret_set": True}]
    assert "whsec" not in await r.text()
    assert created["state"]["status"] == "ok" and created["threshold"] == 500.0

    listed = await (await c.get("/v1/apps/shop/monitors")).json()
    assert listed == {"app": "shop", "monitors": [created]}
    assert await (await c.get(f"/v1/apps/shop/monitors/{mid}")).json() == created
    assert (await (await c.get("/v1/apps/blog/monitors")).json())["monitors"] == []

    r = await c.put(f"/v1/apps/shop/monitors/{mid}", json={**MONITOR, "threshold": 800, "sensitivity_min": 10})
    assert r.status == 200
    assert ((await r.json())["threshold"], (await r.json())["sensitivity_min"]) == (800.0, 10)
    r = await c.put(f"/v1/apps/shop/monitors/{mid}", json={**MONITOR, "metric": "ERROR_RATE", "threshold": 0.1})
    assert r.status == 400 and (await r.json())["error"]["code"] == "immutable_field"

    assert (await c.put("/v1/apps/shop/monitors/mon_0123456789ab", json=MONITOR)).status == 404
    assert (await c.delete(f"/v1/apps/shop/monitors/{mid}")).status == 204
    assert (await c.delete(f"/v1/apps/shop/monitors/{mid}")).status == 404
    assert (await c.get(f"/v1/apps/shop/monitors/{mid}")).status == 404
    assert (await c.get("/v1/apps/shop/monitors/not-an-id")).status == 404
    assert worker.counters.values["policy_commands_applied"] == 3


@pytest.mark.parametrize("change, field", [
    ({"metric": "CPU"}, "metric"),
    ({"threshold": 20}, "threshold"),
    ({"metric": "ERROR_RATE", "threshold": 2}, "threshold"),
    ({"sensitivity_min": 2}, "sensitivity_min"),
    ({"notify_every_min": 15}, "notify_every_min"),
    ({"email": ["nope"]}, "email"),
    ({"webhooks": [{"url": "https://x.example.com", "secret": "short"}]}, "webhooks.secret"),
    ({"extra": 1}, "extra"),
])
async def test_invalid_monitors_get_a_400_naming_the_field(aiohttp_client: AClient, worker: Worker,
                                                           change: dict[str, Any], field: str) -> None:
    c = await client_for(aiohttp_client, worker)
    r = await c.post("/v1/apps/shop/monitors", json={**MONITOR, **change})
    assert r.status == 400
    err = (await r.json())["error"]
    assert err["code"] == "invalid_field" and err["field"] == field and field in err["message"]
    assert worker.sent == []


async def test_malformed_requests(aiohttp_client: AClient, worker: Worker) -> None:
    c = await client_for(aiohttp_client, worker)
    r = await c.post("/v1/apps/shop/monitors", data=b"{not json")
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
    r = await c.post("/v1/apps/shop/monitors", json=[MONITOR])
    assert r.status == 400 and (await r.json())["error"]["field"] == "body"
    r = await c.get("/v1/apps/sh op/monitors")
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_app"


async def test_monitor_limit_per_app(aiohttp_client: AClient, worker: Worker) -> None:
    c = await client_for(aiohttp_client, worker)
    for _ in range(3):
        assert (await c.post("/v1/apps/shop/monitors", json=MONITOR)).status == 201
    r = await c.post("/v1/apps/shop/monitors", json=MONITOR)
    assert r.status == 409 and (await r.json())["error"]["code"] == "too_many_monitors"


# --- autoscaling policies ----------------------------------------------------------------------------------

async def test_policy_lifecycle(aiohttp_client: AClient, worker: Worker) -> None:
    c = await client_for(aiohttp_client, worker)
    r = await c.put("/v1/apps/shop/autoscaling/web", json=POLICY)
    assert r.status == 201 and r.headers["Location"] == "/v1/apps/shop/autoscaling/web"
    body = await r.json()
    assert (body["min_dynos"], body["max_dynos"], body["state"]["dynos"]) == (1, 4, 2)
    r = await c.put("/v1/apps/shop/autoscaling/web", json={**POLICY, "max_dynos": 6})
    assert r.status == 200 and (await r.json())["max_dynos"] == 6
    listed = await (await c.get("/v1/apps/shop/autoscaling")).json()
    assert [p["process_type"] for p in listed["policies"]] == ["web"]
    assert (await c.get("/v1/apps/shop/autoscaling/web")).status == 200
    r = await c.put("/v1/apps/shop/autoscaling/worker", json=POLICY)
    assert r.status == 400 and (await r.json())["error"]["field"] == "process_type"
    r = await c.put("/v1/apps/shop/autoscaling/web", json={**POLICY, "min_dynos": 0})
    assert r.status == 400 and (await r.json())["error"]["field"] == "min_dynos"
    assert (await c.delete("/v1/apps/shop/autoscaling/web")).status == 204
    assert (await c.delete("/v1/apps/shop/autoscaling/web")).status == 404
    assert (await c.get("/v1/apps/shop/autoscaling/web")).status == 404


# --- authorization ---------------------------------------------------------------------------------------------

async def test_authorize_hook_sync_and_async(aiohttp_client: AClient, worker: Worker) -> None:
    c = await client_for(aiohttp_client, worker, authorize=lambda request, app: False)
    r = await c.get("/v1/apps/shop/monitors")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = await c.post("/v1/apps/shop/monitors", json=MONITOR, headers={"Authorization": "Bearer x"})
    assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
    assert worker.sent == []

    async def per_app(request: web.Request, app: str) -> bool:
        await asyncio.sleep(0)
        return app == "shop" and request.headers.get("Authorization") == "Bearer good"

    c2 = await client_for(aiohttp_client, worker, authorize=per_app)
    ok = {"Authorization": "Bearer good"}
    assert (await c2.post("/v1/apps/shop/monitors", json=MONITOR, headers=ok)).status == 201
    assert (await c2.get("/v1/apps/blog/monitors", headers=ok)).status == 403
    assert (await c2.put("/v1/apps/blog/autoscaling/web", json=POLICY, headers=ok)).status == 403


class Tokens:
    """The TokenStore.verify contract over a dict: token -> (app, kind); ``down`` raises like DynamoDB."""

    def __init__(self) -> None:
        self.tokens = {"r-shop": ("shop", "read"), "w-shop": ("shop", "write"), "w-blog": ("blog", "write")}
        self.down = False

    async def verify(self, token: str | None, kind: str, app: str | None = None) -> object | None:
        if self.down:
            raise StoreUnavailable("DynamoDB unavailable", retry_after_s=3.0)
        got = self.tokens.get(token or "")
        return got if got is not None and got[1] == kind and (app is None or got[0] == app) else None


async def test_token_authorizer_reads_with_read_tokens_and_changes_with_write_tokens(
        aiohttp_client: AClient, worker: Worker) -> None:
    tokens = Tokens()
    c = await client_for(aiohttp_client, worker, authorize=token_authorizer(tokens))

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    assert (await c.post("/v1/apps/shop/monitors", json=MONITOR)).status == 401
    assert (await c.post("/v1/apps/shop/monitors", json=MONITOR, headers=bearer("r-shop"))).status == 403
    assert (await c.post("/v1/apps/shop/monitors", json=MONITOR, headers=bearer("w-blog"))).status == 403
    assert (await c.post("/v1/apps/shop/monitors", json=MONITOR, headers=bearer("w-shop"))).status == 201
    assert (await c.get("/v1/apps/shop/monitors", headers=bearer("r-shop"))).status == 200
    assert (await c.get("/v1/apps/shop/monitors", headers=bearer("w-shop"))).status == 403
    tokens.down = True
    r = await c.get("/v1/apps/shop/monitors", headers=bearer("r-shop"))
    assert r.status == 503 and r.headers["Retry-After"] == "3"


# --- ownership, broker and timeouts ----------------------------------------------------------------------------

async def test_another_workers_app(aiohttp_client: AClient, worker: Worker) -> None:
    worker.ownership = REMOTE
    worker.apply = False  # the owner is another process
    c = await client_for(aiohttp_client, worker)
    r = await c.get("/v1/apps/shop/monitors")
    assert r.status == 421 and (await r.json())["error"]["code"] == "not_owner"
    r = await c.post("/v1/apps/shop/monitors", json=MONITOR)
    assert r.status == 202
    body = await r.json()
    assert body["status"] == "accepted" and len(worker.sent) == 1
    assert orjson.loads(worker.sent[0][1])["id"] == body["command_id"]
    assert worker.sent[0][0] == "shop" and len(worker.results) == 0


async def test_while_partitions_move(aiohttp_client: AClient, worker: Worker) -> None:
    worker.ownership = UNKNOWN
    c = await client_for(aiohttp_client, worker)
    r = await c.get("/v1/apps/shop/autoscaling")
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    # A write is accepted; here the partition comes back to this worker and applies it in time.
    assert (await c.put("/v1/apps/shop/autoscaling/web", json=POLICY)).status == 201


async def test_broker_down_and_apply_timeout(aiohttp_client: AClient, worker: Worker) -> None:
    c = await client_for(aiohttp_client, worker, timeout_s=0.1)
    worker.broker_down = True
    r = await c.post("/v1/apps/shop/monitors", json=MONITOR)
    assert r.status == 503 and r.headers["Retry-After"] == "2" and len(worker.results) == 0
    worker.broker_down = False
    worker.apply = False  # sent, but the agent is slow to apply it
    r = await c.post("/v1/apps/shop/monitors", json=MONITOR)
    assert r.status == 202 and len(worker.results) == 0

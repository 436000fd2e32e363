"""The monitors/autoscaling HTTP API (app/api/policies.py) through pytest-aiohttp.

Behind the routes are the real engines (agents/alerts.py, agents/autoscale.py) over dict tables. A produced
command is handed to them from the event loop after the send returned, as the worker's agents receive it
from the topic; the Kafka path itself is covered by tests/integration/test_alerting.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.fernet import Fernet

from agents.alerts import (
    AlertEngine,
    Outbox,
    command_sender,
    decode_command,
    owner_locator,
    partition_for,
)
from agents.autoscale import AutoscaleEngine
from app.alerting.autoscale import Decision
from app.alerting.commands import Result
from app.api.policies import (
    FORWARDED_HEADER,
    LOCAL,
    OUTCOME_STATUS,
    REMOTE,
    UNKNOWN,
    CommandResults,
    Forwarder,
    ForwardTargets,
    Locate,
    PolicyBackend,
    add_policy_routes,
    same_origin,
    token_authorizer,
)
from app.errors import RetriableError, StoreUnavailable
from app.local.embedded import free_port
from app.notify.notifier import Notifier
from app.ops.stats import Counters
from app.sealing import SealedSecret, use_secrets_key
from app.settings import Settings

AClient = Callable[..., Awaitable[TestClient[Any, Any]]]
AServer = Callable[..., Awaitable[TestServer]]

MONITOR = {"process_type": "web", "metric": "LATENCY", "threshold": 500, "sensitivity_min": 5,
           "notify_every_min": 60, "email": ["ops@example.com"],
           "webhooks": [{"url": "https://hooks.example.com/minutely", "secret": "whsec_0123456789abcdef"}]}
POLICY = {"min_dynos": 1, "max_dynos": 4, "p95_target_ms": 300, "current_dynos": 2}


class Worker:
    """The engines of one worker plus the command transport."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.of(max_monitors_per_app=3)
        self.counters = Counters()
        self.results = CommandResults()
        notifier = Notifier(self.settings.alerting, self.counters, senders={})
        self.monitors_table: dict[bytes, bytes] = {}
        self.autoscale_table: dict[bytes, bytes] = {}

        async def publish_alerts(events: Any) -> None:
            return None

        async def publish_decision(d: Decision) -> None:
            return None

        self.alerts = AlertEngine(self.monitors_table, self.settings.alerting, self.counters, publish=publish_alerts,
                                  outbox=Outbox(self.monitors_table, notifier, context_topic="m", owns=lambda p: True),
                                  results=self.results)
        self.autoscale = AutoscaleEngine(self.autoscale_table, self.settings.alerting, self.counters,
                                         publish=publish_decision,
                                         outbox=Outbox(self.autoscale_table, notifier, context_topic="m",
                                                       owns=lambda p: True), results=self.results)
        self.ownership = LOCAL
        self.apply = True
        self.broker_down = False
        self.sent: list[tuple[str, bytes]] = []
        self.consuming: set[asyncio.Task[None]] = set()

    async def send(self, app: str, value: bytes) -> None:
        if self.broker_down:
            raise RetriableError("broker unavailable", retry_after_s=2.0)
        self.sent.append((app, value))
        if self.apply:
            task = asyncio.get_running_loop().create_task(self.consume(value))
            self.consuming.add(task)
            task.add_done_callback(self.consuming.discard)

    async def consume(self, value: bytes) -> None:
        cmd = decode_command(value, self.counters)
        assert cmd is not None
        await self.alerts.on_command(0, cmd)
        self.autoscale.on_command(0, cmd)

    def backend(self, timeout_s: float = 2.0, *, locate: Locate | None = None,
                forwarder: Forwarder | None = None) -> PolicyBackend:
        return PolicyBackend(owner=lambda app: self.ownership, monitors=self.alerts.doc,
                             policies=self.autoscale.doc, send=self.send, results=self.results,
                             apply_timeout_s=timeout_s, locate=locate, forwarder=forwarder)


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

    # Reads show the webhook URL (often itself a credential) by its origin only.
    shown = {**created, "webhooks": [{"url": "https://hooks.example.com/…", "secret_set": True}]}
    listed = await (await c.get("/v1/apps/shop/monitors")).json()
    assert listed == {"app": "shop", "monitors": [shown]}
    assert await (await c.get(f"/v1/apps/shop/monitors/{mid}")).json() == shown
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


async def test_read_tokens_see_webhook_urls_redacted_and_write_tokens_in_full(
        aiohttp_client: AClient, worker: Worker) -> None:
    c = await client_for(aiohttp_client, worker, authorize=token_authorizer(Tokens()))
    secret_url = "https://hooks.slack.com/services/T0001/B0002/XXXXsecretXXXX"
    hooks = [{"url": secret_url, "secret": "whsec_0123456789abcdef"}]
    write, read = {"Authorization": "Bearer w-shop"}, {"Authorization": "Bearer r-shop"}

    r = await c.post("/v1/apps/shop/monitors", json={**MONITOR, "webhooks": hooks}, headers=write)
    assert r.status == 201 and (await r.json())["webhooks"][0]["url"] == secret_url  # the writer set it
    mid = (await r.json())["id"]
    r = await c.put(f"/v1/apps/shop/monitors/{mid}", json={**MONITOR, "webhooks": hooks}, headers=write)
    assert r.status == 200 and (await r.json())["webhooks"][0]["url"] == secret_url
    r = await c.put("/v1/apps/shop/autoscaling/web", json={**POLICY, "webhooks": hooks}, headers=write)
    assert r.status == 201 and (await r.json())["webhooks"][0]["url"] == secret_url

    for path in ["/v1/apps/shop/monitors", f"/v1/apps/shop/monitors/{mid}", "/v1/apps/shop/autoscaling",
                 "/v1/apps/shop/autoscaling/web"]:
        r = await c.get(path, headers=read)
        assert r.status == 200, path
        text = await r.text()
        assert "XXXXsecretXXXX" not in text and "/services" not in text, path
        assert "https://hooks.slack.com/…" in text, path


async def test_with_a_secrets_key_the_hmac_secret_is_stored_sealed_and_never_answered(
        aiohttp_client: AClient, worker: Worker) -> None:
    """METRICS_SECRETS_KEY: the policy-commands topic, the monitors/policies table values and their
    answers never carry a webhook's HMAC secret (answers never did: ``secret_set``)."""
    box = use_secrets_key(Fernet.generate_key().decode())
    try:
        c = await client_for(aiohttp_client, worker)
        r = await c.post("/v1/apps/shop/monitors", json=MONITOR)
        assert r.status == 201 and "whsec" not in await r.text()
        mid = (await r.json())["id"]
        r = await c.put(f"/v1/apps/shop/monitors/{mid}", json=MONITOR)
        assert r.status == 200 and "whsec" not in await r.text()
        r = await c.put("/v1/apps/shop/autoscaling/web", json={**POLICY, "webhooks": MONITOR["webhooks"]})
        assert r.status == 201 and "whsec" not in await r.text()
        for path in ["/v1/apps/shop/monitors", f"/v1/apps/shop/monitors/{mid}", "/v1/apps/shop/autoscaling/web"]:
            assert "whsec" not in await (await c.get(path)).text(), path
        assert len(worker.sent) == 3 and all(b"whsec" not in v and b'"secret_enc"' in v for _, v in worker.sent)
        stored = [*worker.monitors_table.values(), *worker.autoscale_table.values()]
        assert stored and all(b"whsec" not in v for v in stored)
        doc = worker.alerts.doc("shop")
        assert doc is not None
        sealed = doc.monitors[mid].config.targets.webhooks[0].secret
        assert isinstance(sealed, SealedSecret) and box.open(sealed) == "whsec_0123456789abcdef"
    finally:
        use_secrets_key("")


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


class FakeCommandsTopic:
    """A Faust topic whose broker acknowledges (``ack``), fails, or never answers (``hang``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.futures: list[asyncio.Future[None]] = []

    async def send(self, *, key: bytes, value: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        if self.mode == "ack":
            fut.set_result(None)
        elif self.mode == "error":
            from aiokafka.errors import KafkaTimeoutError

            fut.set_exception(KafkaTimeoutError())
        return fut


@pytest.mark.parametrize("mode", ["hang", "error"])
async def test_a_broker_that_does_not_acknowledge_a_command_is_a_503_with_retry_after(
        aiohttp_client: AClient, worker: Worker, mode: str) -> None:
    """Security review L7: the produce is bounded by produce_timeout_s, so a POST during a broker outage
    gets a retriable answer instead of hanging."""
    topic = FakeCommandsTopic(mode)
    backend = worker.backend()
    backend.send = command_sender(topic, Settings.of(produce_timeout_s=0.2).kafka)
    webapp = web.Application()
    add_policy_routes(webapp, backend)
    c = await aiohttp_client(webapp)
    started = asyncio.get_running_loop().time()
    r = await c.post("/v1/apps/shop/monitors", json=MONITOR)
    assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
    assert (await r.json())["error"]["code"] == "unavailable" and len(worker.results) == 0
    assert asyncio.get_running_loop().time() - started < 2.0
    if mode == "hang":
        # The wait ended, Faust's own future did not: the producer can still settle it without an error.
        assert not topic.futures[0].cancelled()
        topic.futures[0].set_result(None)
    assert (await c.put("/v1/apps/shop/autoscaling/web", json=POLICY)).status == 503


async def test_an_acknowledged_command_is_sent_within_the_timeout() -> None:
    topic = FakeCommandsTopic("ack")
    await command_sender(topic, Settings.of(produce_timeout_s=0.2).kafka)("shop", b"{}")
    assert len(topic.futures) == 1 and topic.futures[0].done()


# --- reads of another worker's app: forwarded to its owner ------------------------------------------------------

SELF_URL = "http://worker-1.workers.test:6066"


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    # The owners below listen on loopback: allowed next to the workers' domain.
    f = Forwarder(self_url=SELF_URL, timeout_s=0.5, connect_timeout_s=0.5, allowed="workers.test,127.0.0.0/8")
    await f.start()
    yield f
    await f.stop()


def base_url(server: TestServer) -> str:
    return f"http://{server.host}:{server.port}"


def located_at(url: str | None, asked: list[str] | None = None) -> Locate:
    async def locate(app: str) -> str | None:
        if asked is not None:
            asked.append(app)
        return url
    return locate


async def non_owner_client(aiohttp_client: AClient, forwarder: Forwarder, locate: Locate,
                           authorize: Any = None) -> TestClient[Any, Any]:
    w = Worker()
    w.ownership = REMOTE
    w.apply = False
    webapp = web.Application()
    add_policy_routes(webapp, w.backend(locate=locate, forwarder=forwarder), authorize=authorize)
    return await aiohttp_client(webapp)


class FakeOwner:
    """An owner that records what reaches it and answers with headers a relay must pass (or must not)."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.requests: list[web.Request] = []
        self.delay_s = delay_s

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        await asyncio.sleep(self.delay_s)
        headers = {"ETag": '"v7"', "Cache-Control": "private, max-age=5", "X-Internal": "not for clients",
                   "Set-Cookie": "owner=1"}
        if request.headers.get("If-None-Match") == '"v7"':
            return web.Response(status=304, headers=headers)
        return web.Response(body=orjson.dumps({"app": "shop", "monitors": [], "query": request.query_string}),
                            content_type="application/json", headers=headers)

    async def serve(self, aiohttp_server: AServer) -> TestServer:
        app = web.Application()
        app.router.add_get("/v1/apps/{app}/{tail:.*}", self.handle)
        return await aiohttp_server(app)


async def test_reads_on_a_non_owner_return_the_owners_answers(aiohttp_client: AClient, aiohttp_server: AServer,
                                                              worker: Worker, forwarder: Forwarder) -> None:
    owner_app = web.Application()
    add_policy_routes(owner_app, worker.backend())
    owner_server = await aiohttp_server(owner_app)
    owner = await aiohttp_client(owner_server)
    mid = (await (await owner.post("/v1/apps/shop/monitors", json=MONITOR)).json())["id"]
    assert (await owner.put("/v1/apps/shop/autoscaling/web", json=POLICY)).status == 201

    asked: list[str] = []
    other = await non_owner_client(aiohttp_client, forwarder, located_at(base_url(owner_server), asked))
    for path in ["/v1/apps/shop/monitors", f"/v1/apps/shop/monitors/{mid}", "/v1/apps/shop/monitors/mon_0123456789ab",
                 "/v1/apps/shop/autoscaling", "/v1/apps/shop/autoscaling/web", "/v1/apps/blog/monitors"]:
        mine, theirs = await owner.get(path), await other.get(path)
        assert (theirs.status, await theirs.read()) == (mine.status, await mine.read()), path
        assert theirs.headers["Content-Type"] == mine.headers["Content-Type"] == "application/json", path
    assert asked == ["shop"] * 5 + ["blog"]
    assert [m["id"] for m in (await (await other.get("/v1/apps/shop/monitors")).json())["monitors"]] == [mid]


async def test_forwarding_relays_status_and_headers_and_passes_credentials(
        aiohttp_client: AClient, aiohttp_server: AServer, forwarder: Forwarder) -> None:
    fake = FakeOwner()
    server = await fake.serve(aiohttp_server)
    c = await non_owner_client(aiohttp_client, forwarder, located_at(base_url(server)),
                               authorize=lambda request, app: request.headers.get("Authorization") == "Bearer r")
    creds = {"Authorization": "Bearer r", "Cookie": "session=client", "X-Other": "1"}
    r = await c.get("/v1/apps/shop/monitors?since=5", headers=creds)
    assert r.status == 200 and (await r.json())["query"] == "since=5"
    assert (r.headers["ETag"], r.headers["Cache-Control"]) == ('"v7"', "private, max-age=5")
    assert r.content_type == "application/json"
    assert "X-Internal" not in r.headers and "Set-Cookie" not in r.headers
    sent = fake.requests[0].headers
    assert sent["Authorization"] == "Bearer r" and sent[FORWARDED_HEADER] == SELF_URL
    assert "Cookie" not in sent and "X-Other" not in sent

    r = await c.get("/v1/apps/shop/monitors", headers={**creds, "If-None-Match": '"v7"'})
    assert r.status == 304 and r.headers["ETag"] == '"v7"' and await r.read() == b""

    # Refused here first: a request without credentials never reaches the owner.
    r = await c.get("/v1/apps/shop/monitors")
    assert r.status == 401 and len(fake.requests) == 2


async def test_a_forwarded_read_is_never_forwarded_again(aiohttp_client: AClient, aiohttp_server: AServer,
                                                         forwarder: Forwarder) -> None:
    fake = FakeOwner()
    server = await fake.serve(aiohttp_server)
    c = await non_owner_client(aiohttp_client, forwarder, located_at(base_url(server)))
    # The sender thought this worker owns the app; this worker thinks not: stale views during a rebalance.
    r = await c.get("/v1/apps/shop/monitors", headers={FORWARDED_HEADER: "http://worker-0.workers.test:6066"})
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    assert (await r.json())["error"]["code"] == "rebalancing" and fake.requests == []


@pytest.mark.parametrize("located", [SELF_URL, "http://WORKER-1.workers.test:6066/", None])
async def test_never_forwards_to_itself_nor_without_an_owner(aiohttp_client: AClient, forwarder: Forwarder,
                                                             located: str | None) -> None:
    c = await non_owner_client(aiohttp_client, forwarder, located_at(located))
    r = await c.get("/v1/apps/shop/autoscaling/web")
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    assert (await r.json())["error"]["code"] == "rebalancing"


async def test_an_owner_that_does_not_answer_is_a_retriable_503(aiohttp_client: AClient, aiohttp_server: AServer,
                                                                forwarder: Forwarder) -> None:
    c = await non_owner_client(aiohttp_client, forwarder, located_at(f"http://127.0.0.1:{free_port()}"))
    r = await c.get("/v1/apps/shop/monitors")
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    assert (await r.json())["error"]["code"] == "owner_unavailable"

    slow = FakeOwner(delay_s=2.0)  # beyond the forwarder's 0.5 s
    server = await slow.serve(aiohttp_server)
    c = await non_owner_client(aiohttp_client, forwarder, located_at(base_url(server)))
    r = await c.get("/v1/apps/shop/monitors")
    assert r.status == 503 and (await r.json())["error"]["code"] == "owner_unavailable"


async def test_writes_are_not_forwarded(aiohttp_client: AClient, forwarder: Forwarder) -> None:
    asked: list[str] = []
    c = await non_owner_client(aiohttp_client, forwarder, located_at("http://127.0.0.1:1", asked))
    assert (await c.post("/v1/apps/shop/monitors", json=MONITOR)).status == 202
    assert (await c.put("/v1/apps/shop/autoscaling/web", json=POLICY)).status == 202
    assert asked == []


@pytest.mark.parametrize("owner_url", [
    "http://attacker.example:6066", "http://worker-0.workers.test.attacker.example:6066",
    "http://evilworkers.test:6066", "http://10.0.0.9:6066", "http://user:pw@worker-0.workers.test:6066",
    "ftp://worker-0.workers.test/",
])
async def test_reads_are_never_forwarded_outside_the_allowed_domain(
        aiohttp_client: AClient, aiohttp_server: AServer, owner_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Security review L10: the owner's URL comes from consumer-group metadata; a member advertising a host
    of its own must not receive the client's read token."""
    f = Forwarder(self_url=SELF_URL, timeout_s=0.5, connect_timeout_s=0.5)  # default: the workers' domain
    await f.start()
    try:
        c = await non_owner_client(aiohttp_client, f, located_at(owner_url))
        r = await c.get("/v1/apps/shop/monitors", headers={"Authorization": "Bearer mk_read_x"})
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert (await r.json())["error"]["code"] == "owner_unavailable"
        assert "outside the allowed forward targets workers.test" in caplog.text
    finally:
        await f.stop()


async def test_an_allowed_owner_gets_the_read_and_the_setting_replaces_the_default(
        aiohttp_client: AClient, aiohttp_server: AServer) -> None:
    fake = FakeOwner()
    server = await fake.serve(aiohttp_server)
    f = Forwarder(self_url="http://127.0.0.1:6066", timeout_s=0.5, connect_timeout_s=0.5)  # the local stack
    await f.start()
    try:
        c = await non_owner_client(aiohttp_client, f, located_at(base_url(server)))
        assert (await c.get("/v1/apps/shop/monitors")).status == 200 and len(fake.requests) == 1
        f.allow_only("workers.test")  # METRICS_FORWARD_ALLOWED_SUFFIX: loopback no longer allowed
        assert (await c.get("/v1/apps/shop/monitors")).status == 503 and len(fake.requests) == 1
        f.allow_only("")  # empty keeps what is allowed
        assert (await c.get("/v1/apps/shop/monitors")).status == 503
    finally:
        await f.stop()


def test_forward_targets() -> None:
    k8s = ForwardTargets("http://m-0.metrics-minutely-worker.observability.svc:6066")
    assert k8s.allows("http://m-3.metrics-minutely-worker.observability.svc:6066")
    assert k8s.allows("http://M-3.Metrics-Minutely-Worker.observability.svc.:6066/")
    for bad in ("http://m-3.other.observability.svc:6066", "http://observability.svc:6066", "http://127.0.0.1:6066",
                "http://metrics-minutely-worker.observability.svc.evil.example", "not a url", ""):
        assert not k8s.allows(bad), bad
    local = ForwardTargets("http://devbox:6066")  # the local stack: Faust's default http://{hostname}:{port}
    assert local.allows("http://devbox:6067") and local.allows("http://127.0.0.1:6067")
    assert local.allows("http://localhost:1") and local.allows("http://[::1]:6066")
    assert not local.allows("http://devbox.example.com:6066") and not local.allows("http://10.1.2.3:6066")
    configured = ForwardTargets("http://devbox:6066", ".workers.svc, 10.20.0.0/16")
    assert configured.allows("http://w-1.workers.svc:6066") and configured.allows("http://10.20.3.4:6066")
    assert not configured.allows("http://127.0.0.1:6066") and not configured.allows("http://devbox:6066")
    assert not configured.allows("http://[::1]:6066")


def test_same_origin() -> None:
    assert same_origin("http://a.example:80", "http://A.example/")
    assert same_origin("https://a.example", "https://a.example:443/x")
    assert not same_origin("http://a.example:6066", "http://a.example:6067")
    assert not same_origin("http://a.example", "https://a.example")


class FakeFaust:
    """What owner_locator uses of a Faust app: the table's changelog, the producer's partitioner, the router."""

    def __init__(self, *, partitions: int, metadata: bool, urls: dict[int, str]) -> None:
        from types import SimpleNamespace

        from aiokafka.partitioner import DefaultPartitioner
        from aiokafka.structs import TopicPartition

        self.partitions, self.metadata, self.urls = partitions, metadata, urls
        self.keys: list[tuple[str, bytes]] = []
        changelog = SimpleNamespace(get_topic_name=lambda: "t-monitors-changelog")
        self.tables = {"monitors": SimpleNamespace(changelog_topic=changelog)}
        fake = self

        class Producer:
            def key_partition(self, topic: str, key: bytes) -> TopicPartition:
                if not fake.metadata:
                    raise TypeError("'NoneType' object is not iterable")  # aiokafka without topic metadata
                parts = list(range(fake.partitions))
                return TopicPartition(topic, DefaultPartitioner()(key, parts, parts))

            def _ensure_producer(self) -> Any:
                async def partitions_for(topic: str) -> set[int]:
                    fake.metadata = True
                    return set(range(fake.partitions))
                return SimpleNamespace(partitions_for=partitions_for)

        class Router:
            def key_store(self, table_name: str, key: bytes) -> str:
                fake.keys.append((table_name, key))
                tp = Producer().key_partition("t-monitors-changelog", key)
                return fake.urls[tp.partition]

        self.producer, self.router = Producer(), Router()


async def test_owner_locator_asks_faust_for_the_apps_partition() -> None:
    settings = Settings.of(partitions=4)
    urls = {p: f"http://worker-{p % 2}.workers.test:6066" for p in range(4)}
    fake = FakeFaust(partitions=4, metadata=False, urls=urls)
    locate = owner_locator(fake, settings.kafka)
    for app in ["shop", "blog", "a", "a-much-longer-app-name.example"]:
        assert await locate(app) == urls[partition_for(app, 4)]
    # The key is the app (the partition of its minutes), not the table key m|{app}.
    assert fake.keys[0] == ("monitors", b"shop")
    # A partition count that differs from the topics': Faust would route elsewhere, so no owner is named.
    assert partition_for("blog", 3) != partition_for("blog", 4)
    mismatched = owner_locator(FakeFaust(partitions=4, metadata=True, urls=urls), Settings.of(partitions=3).kafka)
    assert await mismatched("blog") is None
    # No assignment yet for the partition.
    assert await owner_locator(FakeFaust(partitions=4, metadata=True, urls={}), settings.kafka)("shop") is None


# --- OpenAPI ------------------------------------------------------------------------------------------------

def test_openapi_document_describes_every_policy_route() -> None:
    from openapi_spec_validator import validate

    from app.api.openapi import document, with_policy_routes

    base = document(Settings())
    doc = with_policy_routes(base)
    validate(doc)
    assert set(base["paths"]) < set(doc["paths"]) and "/v1/apps/{app}/monitors" not in base["paths"]
    webapp = web.Application()
    add_policy_routes(webapp, Worker().backend())
    routed = {(r.resource.canonical, r.method.lower()) for r in webapp.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    documented = {(path, method) for path, item in doc["paths"].items() if path not in base["paths"]
                  for method in item if method != "parameters"}
    assert documented == routed
    for path, method in documented:
        op = doc["paths"][path][method]
        assert op["security"] == [{"bearer": []}] and {"400", "401", "403", "503"} <= set(op["responses"]), op
        if method == "get":
            assert "421" in op["responses"] and "forwarded" in op["description"]
        else:
            assert "202" in op["responses"]


def test_every_outcome_of_a_command_has_an_answer() -> None:
    assert set(OUTCOME_STATUS) == set(Result)

"""Tenant isolation, endpoint by endpoint: every HTTP endpoint that takes a token, against no token, the right
token, a token of the wrong kind, another app's token, a revoked token and a token in the query string, with
the real token store (moto). Each answer is the one docs/api.md promises, and nothing tells an existing app
from a nonexistent one. Also the body-size limit and slow bodies (slowloris) on the ingest."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from app.api import policies
from app.api.query import MetricsQuery
from app.api.web import make_web_app, token_authorizer
from app.cli import LINGERING_S
from app.clock import ManualClock
from app.ingest.dedup import FrameDedup
from app.ingest.server import Ingest, make_ingest_app
from app.limits import Limits
from app.local.loadgen import frame, logplex_headers
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.backends import frame_table, token_table
from app.storage.tokens import TokenStore
from tests.api.test_policies import MONITOR, POLICY, Worker
from tests.api.test_query import SETTINGS, T0, MemoryStore, minute, put_minutes
from tests.api.test_web import NOW_S
from tests.ingest.test_logplex import ROUTER_INFO
from tests.storage.test_dynamodb import _moto_aio, aws  # noqa: F401  (fixtures)


@dataclass
class Tenants:
    read: TestClient[Any, Any]
    ingest: TestClient[Any, Any]
    tokens: dict[str, str]
    produced: list[tuple[str, list[tuple[bytes, bytes]]]]


@pytest.fixture
async def tenants(aws: None, aiohttp_client: Any) -> AsyncIterator[Tenants]:  # noqa: F811
    settings = Settings.of(table_name=f"iso-{time.monotonic_ns()}", dynamodb_endpoint="",
                           ingest_max_body_bytes=64 * 1024, ingest_body_timeout_s=0.5)
    store = TokenStore(settings.web, table=token_table(settings))
    await store.start()
    dedup = FrameDedup(settings.ingest, table=frame_table(settings))
    await dedup.start()
    tokens: dict[str, str] = {}
    for app in ("shop", "other"):
        for kind in ("read", "write", "drain"):
            tokens[f"{app}-{kind}"] = (await store.create(app, kind))[0]
    for kind in ("read", "write", "drain"):
        tok, info = await store.create("shop", kind)
        assert await store.revoke(info.id)
        tokens[f"revoked-{kind}"] = tok

    data = MemoryStore(ManualClock(NOW_S * 1000))
    put_minutes(data, [minute(T0 + 60 * i, np.arange(1.0, 11.0)) for i in range(10)])
    worker = Worker()
    read_app = make_web_app(
        MetricsQuery(data, settings=SETTINGS, clock=data.clock), SETTINGS, Counters(),
        lambda w: policies.add_policy_routes(w, worker.backend(2.0), authorize=policies.token_authorizer(store)),
        authorize=token_authorizer(store))
    produced: list[tuple[str, list[tuple[bytes, bytes]]]] = []

    async def produce(topic: str, records: Any) -> None:
        produced.append((topic, list(records)))

    ingest_app = make_ingest_app(Ingest(settings.ingest, settings.kafka, settings.windows, tokens=store, dedup=dedup,
                                        produce=produce, counters=Counters(), limits=Limits(settings.limits)),
                                 settings)
    server = TestServer(ingest_app)
    await server.start_server(lingering_time=LINGERING_S)  # as app/cli.py serves it
    ingest = await aiohttp_client(server)
    yield Tenants(await aiohttp_client(read_app), ingest, tokens, produced)
    await dedup.stop()
    await store.stop()


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def answer(c: TestClient[Any, Any], method: str, path: str, token: str | None, *, query_token: bool = False,
                 body: Any = None) -> tuple[int, str | None]:
    if query_token and token:
        path += ("&" if "?" in path else "?") + f"token={token}"
        token = None
    r = await c.request(method, path, headers=bearer(token), data=orjson.dumps(body) if body is not None else None)
    doc = await r.json() if r.content_type == "application/json" else None
    return r.status, (doc or {}).get("error", {}).get("code") if isinstance(doc, dict) else None


RANGE = f"since={T0}&until={T0 + 600}"


@pytest.mark.parametrize("path", [f"/v1/apps/{{app}}/metrics?{RANGE}", f"/v1/apps/{{app}}/events?{RANGE}"])
async def test_read_api_matrix(tenants: Tenants, path: str) -> None:
    t, shop, ghost, other = tenants.tokens, path.format(app="shop"), path.format(app="ghost"), path.format(app="other")
    assert (await answer(tenants.read, "GET", shop, t["shop-read"]))[0] == 200
    assert await answer(tenants.read, "GET", shop, None) == (401, "unauthorized")
    for wrong in ("shop-write", "shop-drain", "revoked-read", "revoked-write"):
        assert await answer(tenants.read, "GET", shop, t[wrong]) == (401, "invalid_token"), wrong
    assert await answer(tenants.read, "GET", shop, t["shop-read"], query_token=True) == (401, "unauthorized")
    # Another app's token, an app that exists and one that does not: the same 404, byte for byte.
    foreign = await tenants.read.get(other, headers=bearer(t["shop-read"]))
    missing = await tenants.read.get(ghost, headers=bearer(t["shop-read"]))
    assert foreign.status == missing.status == 404
    assert (await foreign.read()).replace(b"other", b"X") == (await missing.read()).replace(b"ghost", b"X")
    assert await answer(tenants.read, "GET", shop, t["other-read"]) == (404, "not_found")


async def test_whoami_names_only_the_tokens_own_app(tenants: Tenants) -> None:
    r = await tenants.read.get("/v1/whoami", headers=bearer(tenants.tokens["shop-read"]))
    assert r.status == 200 and (await r.json())["app"] == "shop"
    for who in ("shop-write", "shop-drain", "revoked-read"):
        assert (await tenants.read.get("/v1/whoami", headers=bearer(tenants.tokens[who]))).status == 401, who
    assert (await tenants.read.get("/v1/whoami")).status == 401


POLICY_CALLS = [("GET", "/v1/apps/{app}/monitors", None), ("POST", "/v1/apps/{app}/monitors", MONITOR),
                ("GET", "/v1/apps/{app}/autoscaling", None), ("PUT", "/v1/apps/{app}/autoscaling/web", POLICY),
                ("GET", "/v1/apps/{app}/autoscaling/web", None), ("DELETE", "/v1/apps/{app}/monitors/mon_x", None)]


@pytest.mark.parametrize("method, path, body", POLICY_CALLS)
async def test_monitors_and_autoscaling_matrix(tenants: Tenants, method: str, path: str, body: Any) -> None:
    """Looking needs the app's read token, changing its write token (docs/alerting.md)."""
    t = tenants.tokens
    shop, other, ghost = (path.format(app=a) for a in ("shop", "other", "ghost"))
    changes = method != "GET"
    status, _ = await answer(tenants.read, method, shop, t["shop-write" if changes else "shop-read"], body=body)
    assert status in (200, 201, 202, 204, 404), status  # 404: the monitor to delete does not exist
    assert await answer(tenants.read, method, shop, None, body=body) == (401, "unauthorized")
    wrong_kind = ["shop-drain", "revoked-read", "revoked-write"] + (["shop-read"] if changes else ["shop-write"])
    for wrong in wrong_kind:
        assert await answer(tenants.read, method, shop, t[wrong], body=body) == (403, "forbidden"), wrong
    right = "write" if changes else "read"
    assert await answer(tenants.read, method, shop, t[f"shop-{right}"], query_token=True, body=body) == (
        401, "unauthorized")
    # Another app, existing or not: the same refusal.
    assert (await answer(tenants.read, method, other, t[f"shop-{right}"], body=body)
            == await answer(tenants.read, method, ghost, t[f"shop-{right}"], body=body) == (403, "forbidden"))


async def test_drain_and_json_api_matrix(tenants: Tenants) -> None:
    t, c = tenants.tokens, tenants.ingest
    body = frame([ROUTER_INFO])
    drain = "/v1/drains/logplex"

    async def post(path: str, token: str | None, data: bytes, *, query: bool = False) -> int:
        if query and token:
            path, token = f"{path}?token={token}", None
        return (await c.post(path, data=data, headers=bearer(token))).status

    async def logplex(token: str | None, *, in_url: str = "basic") -> int:
        """As Logplex sends it: the drain id in Logplex-Drain-Token, the token in the drain URL."""
        headers = logplex_headers(token or "none", 1, in_url=in_url if token else "none")
        path = f"{drain}?token={token}" if token and in_url == "query" else drain
        return (await c.post(path, data=body, headers=headers)).status

    assert await logplex(t["shop-drain"]) == 204
    assert await logplex(t["shop-drain"], in_url="query") == 204
    assert await post(drain, t["shop-drain"], body) == 204  # a sender other than Logplex: Bearer
    assert await logplex(None) == 401  # the drain id alone is no token
    for wrong in ("shop-read", "shop-write", "revoked-drain"):
        assert await logplex(t[wrong]) == 403, wrong
        assert await logplex(t[wrong], in_url="query") == 403, wrong
    obs = orjson.dumps([{"kind": "router", "app": "shop", "dyno": "web.1", "ts": T0 * 1000, "status": 200,
                         "service_ms": 3.0}, {"kind": "router", "app": "other", "dyno": "web.1", "ts": T0 * 1000,
                                              "status": 200, "service_ms": 3.0}])
    r = await c.post("/v1/observations", data=obs, headers=bearer(t["shop-write"]))
    doc = await r.json()
    assert r.status == 200 and doc["accepted"] == 1 and "other" in doc["rejected"][0]["reason"]
    assert await post("/v1/observations", None, obs) == 401
    assert await post("/v1/observations", t["shop-write"], obs, query=True) == 401  # would end up in access logs
    for wrong in ("shop-read", "shop-drain", "revoked-write", "other-read"):
        assert await post("/v1/observations", t[wrong], obs) == 403, wrong
    # Everything produced is the token's app's, and only from the accepted calls (three frames, one batch).
    assert [k for _, records in tenants.produced for k, _ in records] == [b"shop"] * 4


async def test_ingest_body_limits_and_slow_bodies(tenants: Tenants) -> None:
    t, c = tenants.tokens, tenants.ingest
    r = await c.post("/v1/observations", data=b"[" + b" " * 70_000 + b"]", headers=bearer(t["shop-write"]))
    assert r.status == 413 and (await r.json())["error"]["code"] == "body_too_large"
    # A body that trickles in: cut off after the timeout (0.5 s here) with 408, and the connection closed.
    server: TestServer = c.server  # type: ignore[assignment]
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"POST /v1/observations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + t["shop-write"].encode() + b"\r\nContent-Length: 1000\r\n\r\n[")
    await writer.drain()
    t0 = time.monotonic()
    for _ in range(3):  # a byte every 0.3 s: never idle long, never done
        await asyncio.sleep(0.3)
        writer.write(b" ")
        await writer.drain()
    raw = await asyncio.wait_for(reader.read(4096), 5)
    assert raw.startswith(b"HTTP/1.1 408") and b"body_timeout" in raw, raw[:200]
    while True:  # the client keeps trickling; the server closes once its lingering time is over
        writer.write(b" ")
        await writer.drain()
        if reader.at_eof() or await asyncio.wait_for(reader.read(4096), 2) == b"":
            break
        await asyncio.sleep(0.2)
    assert time.monotonic() - t0 < 0.5 + LINGERING_S + 1.0
    writer.close()
    # On the drain it is a 503 with Retry-After instead: Logplex drops a frame on a 4xx, retries a 5xx.
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"POST /v1/drains/logplex HTTP/1.1\r\nHost: x\r\nContent-Type: application/logplex-1\r\n"
                 b"Authorization: Bearer " + t["shop-drain"].encode() + b"\r\nContent-Length: 1000\r\n\r\n83 <")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(4096), 5)
    assert raw.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in raw and b"body_timeout" in raw, raw[:300]
    writer.close()


# --- operator endpoints: on the admin port only (security review M2) -----------------------------------

OPERATOR_PATHS = ("/metrics", "/v1/stats", "/migration", "/dashboard/migration.html", "/dashboard/migration.js")


@pytest.mark.parametrize("role", ["web", "ingest"])
async def test_operator_endpoints_are_on_the_admin_port_only(aws: None, aiohttp_client: Any,  # noqa: F811
                                                             role: str) -> None:
    """The real role compositions (app/cli.py, app/ingest/server.py), with Kafka unreachable: the tenant port
    answers 404 for every operator path and a bare /readyz; the admin port serves them, with the reasons."""
    import aiohttp

    from app.cli import build_web_role
    from app.ingest.server import build
    from app.ops.health import ADMIN_KEY

    settings = Settings.of(table_name=f"ops-{time.monotonic_ns()}", dynamodb_endpoint="", create_table=True,
                           broker_url="kafka://127.0.0.1:9", migration_wait_s=0.1, admin_port=0)
    webapp = build_web_role(settings, Counters()) if role == "web" else build(settings, Counters())
    tenant = await aiohttp_client(webapp)
    for path in OPERATOR_PATHS:
        assert (await tenant.get(path)).status == 404, path
    assert (await tenant.get("/healthz")).status == 200
    # The web role checks only its store; the ingest also Kafka, unreachable: not ready, and nothing more.
    r = await tenant.get("/readyz")
    text = await r.text()
    ready = role == "web"
    assert r.status == (200 if ready else 503) and orjson.loads(text) == {"status": "ready" if ready else "not_ready"}
    assert "127.0.0.1:9" not in text and settings.dynamodb.table_name not in text
    admin_url = webapp[ADMIN_KEY].url
    assert admin_url.startswith("http://127.0.0.1:") and not admin_url.endswith(f":{tenant.port}")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{admin_url}/readyz") as r:
            detail = await r.json()
            assert detail["checks"] and (ready or "127.0.0.1:9" in detail["checks"]["broker"])  # operators only
        async with s.get(f"{admin_url}/metrics") as r:
            assert r.status == 200 and "minutely_" in await r.text()
        async with s.get(f"{admin_url}/healthz") as r:
            assert r.status == 200
        if role == "web":
            for path in ("/v1/stats", "/migration", "/dashboard/migration.html", "/dashboard/migration.js"):
                async with s.get(f"{admin_url}{path}") as r:
                    assert r.status == 200, path
            async with s.get(f"{admin_url}/v1/apps/shop/metrics") as r:
                assert r.status == 404  # and no tenant API on the admin port

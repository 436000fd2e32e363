"""Ingestion protocol on real parts: the ingest app against Apache Kafka and dynalite."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from app.ingest.server import build
from app.local.embedded import DynamoServer, KafkaBroker
from app.local.loadgen import frame, logplex_headers
from app.ops.health import ADMIN_KEY
from app.ops.stats import Counters
from app.ops.topics import ensure_topics
from app.settings import Settings
from app.storage.backends import token_table
from app.storage.tokens import TokenStore
from tests.ingest.test_logplex import LOAD, MEMORY, ROUTER_ERROR, ROUTER_INFO

pytestmark = pytest.mark.integration


def make_settings(broker_url: str, endpoint: str, **kw: Any) -> Settings:
    uid = uuid.uuid4().hex[:8]
    kw.setdefault("admin_port", 0)  # several apps in one test (and xdist workers): each its own free admin port
    return Settings.of(broker_url=broker_url, dynamodb_endpoint=endpoint, table_name=f"ing-{uid}",
                    observations_topic=f"obs-{uid}", dlq_topic=f"dlq-{uid}", metrics_topic=f"m-{uid}",
                    sink_dlq_topic=f"sd-{uid}", partitions=2, app_id=f"ing{uid}", produce_timeout_s=3, **kw)


async def read_topic(broker: KafkaBroker, topic: str, *, wait_s: float = 2.0) -> list[tuple[bytes, bytes]]:
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(topic, bootstrap_servers=broker.address, auto_offset_reset="earliest",
                         group_id=None, enable_auto_commit=False)
    await c.start()
    try:
        out: list[tuple[bytes, bytes]] = []
        deadline = asyncio.get_running_loop().time() + wait_s
        while asyncio.get_running_loop().time() < deadline:
            for records in (await c.getmany(timeout_ms=200)).values():
                out.extend((r.key, r.value) for r in records)
        return out
    finally:
        await c.stop()


async def admin_get(client: TestClient[Any, Any], path: str) -> tuple[int, bytes]:
    """GET ``path`` on the admin port of the app ``client`` serves (/readyz with reasons, /metrics)."""
    async with aiohttp.ClientSession() as s, s.get(f"{client.app[ADMIN_KEY].url}{path}") as r:
        return r.status, await r.read()


class Env:
    def __init__(self, settings: Settings, client: TestClient[Any, Any], counters: Counters,
                 tokens: dict[str, str]) -> None:
        self.settings, self.client, self.counters, self.tokens = settings, client, counters, tokens


@pytest.fixture
async def env(broker: KafkaBroker, dynamo: DynamoServer, aiohttp_client: Any) -> AsyncIterator[Env]:
    s = make_settings(broker.url, dynamo.endpoint, ingest_max_body_bytes=64 * 1024)
    await ensure_topics(broker.address, s.kafka)
    store = TokenStore(s.web, table=token_table(s))
    await store.start()
    tokens = {kind: (await store.create("myapp", kind))[0] for kind in ("drain", "write", "read")}
    tokens["other-drain"] = (await store.create("other", "drain"))[0]
    await store.stop()
    counters = Counters()
    client = await aiohttp_client(build(s, counters))
    for _ in range(300):  # the producer connects in the background; an empty post would not touch it
        checks = orjson.loads((await admin_get(client, "/readyz"))[1])["checks"]
        if checks["producer"] == "ok":
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"the ingest producer never connected: {checks}")
    yield Env(s, client, counters, tokens)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def drain_headers(token: str, count: int, frame_id: str | None = None) -> dict[str, str]:
    """What Logplex sends for a drain added as ``https://user:TOKEN@host/v1/drains/logplex``."""
    return logplex_headers(token, count, frame_id=frame_id)


async def test_ingest_readiness_and_metrics(env: Env, dynamo: DynamoServer, aiohttp_client: Any) -> None:
    for _ in range(60):  # readiness is eventual: each check has a 2 s budget, slower on a loaded machine
        status, body = await admin_get(env.client, "/readyz")
        if status == 200:
            break
        await asyncio.sleep(0.5)
    assert status == 200, body
    assert set(orjson.loads(body)["checks"]) == {"broker", "producer", "tokens", "dedup"}
    r = await env.client.get("/readyz")  # the tenant port: the status alone
    assert r.status == 200 and await r.json() == {"status": "ready"}
    assert (await env.client.get("/metrics")).status == 404
    await env.client.post("/v1/drains/logplex", data=frame([ROUTER_INFO]),
                          headers=drain_headers(env.tokens["drain"], 1))
    text = (await admin_get(env.client, "/metrics"))[1].decode()
    assert "minutely_drain_frames_total 1.0" in text
    # DynamoDB unreachable (tokens/dedup tables): not ready, with the reason.
    down = make_settings(env.settings.kafka.broker_url, "http://127.0.0.1:9", connect_timeout_s=0.2, max_attempts=0)
    c = await aiohttp_client(build(down, Counters()))
    status, raw = await admin_get(c, "/readyz")
    body = orjson.loads(raw)
    assert status == 503 and body["status"] == "not_ready" and body["checks"]["tokens"] != "ok"
    r = await c.get("/readyz")
    assert r.status == 503 and await r.json() == {"status": "not_ready"}


async def test_drain_frame_is_produced_once_with_bad_lines_dead_lettered(env: Env, broker: KafkaBroker) -> None:
    body = frame([ROUTER_INFO, ROUTER_ERROR, MEMORY, LOAD, b"<40>1 2012-11-30T06:45:29+00:00 host app web.3 - hi",
                  b"<158>1 2012-11-30T06:45:29+00:00 host heroku router - at=info nonsense"])
    headers = drain_headers(env.tokens["drain"], 6, "frame-1")
    for _ in range(3):  # Logplex retries with the same Frame-Id
        r = await env.client.post("/v1/drains/logplex", data=body, headers=headers)
        assert r.status == 204
    records = await read_topic(broker, env.settings.kafka.observations_topic)
    assert len(records) == 1 and records[0][0] == b"myapp"
    obs = orjson.loads(records[0][1])
    assert [o["kind"] for o in obs] == ["router", "router", "runtime", "runtime"]
    assert {o["app"] for o in obs} == {"myapp"}  # the token's app; host=myapp.herokuapp.com is not trusted
    dead = await read_topic(broker, env.settings.kafka.dlq_topic, wait_s=1)
    assert len(dead) == 1 and "lacks" in orjson.loads(dead[0][1])["reason"]
    c = env.counters.values
    assert (c["drain_frames"], c["drain_frames_deduplicated"], c["drain_lines_ignored"]) == (1, 2, 1)


async def test_frame_dedup_survives_an_ingest_restart(env: Env, broker: KafkaBroker, aiohttp_client: Any) -> None:
    body = frame([ROUTER_INFO])
    assert (await env.client.post("/v1/drains/logplex", data=body,
                                  headers=drain_headers(env.tokens["drain"], 1, "f-restart"))).status == 204
    await env.client.close()
    restarted = await aiohttp_client(build(env.settings, Counters()))
    r = await restarted.post("/v1/drains/logplex", data=body,
                             headers=drain_headers(env.tokens["drain"], 1, "f-restart"))
    assert r.status == 204
    assert len(await read_topic(broker, env.settings.kafka.observations_topic)) == 1


async def test_protocol_errors_produce_nothing(env: Env, broker: KafkaBroker) -> None:
    body = frame([ROUTER_INFO, LOAD])
    cases = [
        (drain_headers(env.tokens["drain"], 3, "f-count"), body, 400, "msg_count_mismatch"),
        ({"Content-Type": "application/logplex-1"}, body, 401, "missing_token"),
        (drain_headers("mk_drain_not-a-token", 2), body, 403, "invalid_token"),
        (drain_headers(env.tokens["write"], 2), body, 403, "invalid_token"),  # a write token is not a drain token
        (drain_headers(env.tokens["drain"], 1), b"abc <40>1", 400, "malformed_frame"),
        (drain_headers(env.tokens["drain"], 1), b"x" * (65 * 1024), 413, "body_too_large"),
    ]
    for headers, data, status, code in cases:
        r = await env.client.post("/v1/drains/logplex", data=data, headers=headers)
        assert r.status == status, (code, await r.text())
        assert (await r.json())["error"]["code"] == code
    assert await read_topic(broker, env.settings.kafka.observations_topic, wait_s=1) == []


async def test_token_in_basic_auth_or_url(env: Env, broker: KafkaBroker) -> None:
    basic = base64.b64encode(f"drain:{env.tokens['drain']}".encode()).decode()
    r1 = await env.client.post("/v1/drains/logplex", data=frame([ROUTER_INFO]),
                               headers={"Authorization": f"Basic {basic}", "Logplex-Msg-Count": "1"})
    r2 = await env.client.post(f"/v1/drains/logplex?token={env.tokens['drain']}", data=frame([ROUTER_INFO]))
    # Real Logplex on a ?token= drain: its drain id in Logplex-Drain-Token, our token only in the URL.
    r3 = await env.client.post(f"/v1/drains/logplex?token={env.tokens['drain']}", data=frame([ROUTER_INFO]),
                               headers=logplex_headers(env.tokens["drain"], 1, in_url="query"))
    assert (r1.status, r2.status, r3.status) == (204, 204, 204)
    assert len(await read_topic(broker, env.settings.kafka.observations_topic)) == 3


async def test_the_drain_id_header_is_never_taken_for_a_token(env: Env, broker: KafkaBroker) -> None:
    """Logplex-Drain-Token carries the drain's id; our token there (as older tests sent it) is no token."""
    for value in (env.tokens["drain"], "d.01234567-89ab-cdef-0123-456789abcdef"):
        r = await env.client.post("/v1/drains/logplex", data=frame([ROUTER_INFO]),
                                  headers={"Logplex-Msg-Count": "1", "Logplex-Drain-Token": value})
        assert r.status == 401 and "drain URL" in (await r.json())["error"]["message"]
    assert await read_topic(broker, env.settings.kafka.observations_topic, wait_s=1) == []


async def test_json_api_array_and_ndjson_with_per_record_reasons(env: Env, broker: KafkaBroker) -> None:
    good = {"kind": "router", "app": "myapp", "dyno": "web.1", "ts": 1764000000000, "status": 200, "service_ms": 3}
    foreign = {**good, "app": "other"}
    broken = {**good, "status": "OK"}
    r = await env.client.post("/v1/observations", data=orjson.dumps([good, foreign, broken, good]),
                              headers=_bearer(env.tokens["write"]))
    body = await r.json()
    assert r.status == 200 and body["accepted"] == 2
    assert [x["index"] for x in body["rejected"]] == [1, 2]
    assert "token is for app 'myapp'" in body["rejected"][0]["reason"] and "status" in body["rejected"][1]["reason"]
    nd = b"\n".join(orjson.dumps(x) for x in (good, good, good)) + b"\n"
    r = await env.client.post("/v1/observations", data=nd, headers=_bearer(env.tokens["write"]))
    assert r.status == 200 and (await r.json())["accepted"] == 3
    r = await env.client.post("/v1/observations", data=b"{nope", headers=_bearer(env.tokens["write"]))
    assert r.status == 400 and (await r.json())["error"]["code"] == "malformed_body"
    r = await env.client.post("/v1/observations", data=orjson.dumps([foreign]), headers=_bearer(env.tokens["write"]))
    assert r.status == 400 and (await r.json())["error"]["code"] == "no_valid_records"
    r = await env.client.post("/v1/observations", data=orjson.dumps([good]), headers=_bearer(env.tokens["read"]))
    assert r.status == 403
    produced = [o for _, v in await read_topic(broker, env.settings.kafka.observations_topic) for o in orjson.loads(v)]
    assert len(produced) == 5 and {o["app"] for o in produced} == {"myapp"}


async def test_kafka_down_answers_503_and_the_retry_succeeds_later(dynamo: DynamoServer, aiohttp_client: Any,
                                                                   tmp_path: Path) -> None:
    own = KafkaBroker(data_dir=tmp_path / "kafka")
    await asyncio.to_thread(own.start)
    s = make_settings(own.url, dynamo.endpoint)
    await ensure_topics(own.address, s.kafka)
    store = TokenStore(s.web, table=token_table(s))
    await store.start()
    token = (await store.create("myapp", "drain"))[0]
    await store.stop()
    client = await aiohttp_client(build(s, Counters()))
    headers = drain_headers(token, 1, "f-down")
    for _ in range(100):
        r = await client.post("/v1/drains/logplex", data=frame([ROUTER_INFO]), headers=drain_headers(token, 1))
        if r.status == 204:
            break
        await asyncio.sleep(0.1)
    assert r.status == 204
    await asyncio.to_thread(own.stop)
    r = await client.post("/v1/drains/logplex", data=frame([ROUTER_INFO]), headers=headers)
    assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
    assert (await r.json())["error"]["code"] == "unavailable"
    # The same broker comes back on its log directory: what it acknowledged before is still there, and the
    # failed attempt released its claim on the frame id, so the retry is not refused as in flight.
    await asyncio.to_thread(own.start)
    try:
        for _ in range(60):
            r = await client.post("/v1/drains/logplex", data=frame([ROUTER_INFO]), headers=headers)
            if r.status == 204:
                break
            await asyncio.sleep(0.5)
        assert r.status == 204
        produced = await read_topic(own, s.kafka.observations_topic, wait_s=5.0)
        # The frame acknowledged before the outage survived it, and the retried one arrived. (A retry whose
        # answer timed out while the broker came back may have been stored too: at least once.)
        assert len(produced) >= 2
    finally:
        await asyncio.to_thread(own.stop)


async def test_tokens_cli_create_list_revoke_and_stored_hashed(broker: KafkaBroker, dynamo: DynamoServer) -> None:
    import os
    import subprocess
    import sys

    s = make_settings("kafka://127.0.0.1:1", dynamo.endpoint)
    # The CLI reads the store-migration state from Kafka: during a migration tokens change in both stores.
    env = {**os.environ, "METRICS_DYNAMODB_ENDPOINT": dynamo.endpoint, "METRICS_TABLE_NAME": s.dynamodb.table_name,
           "METRICS_BROKER_URL": broker.url, "METRICS_MIGRATION_TOPIC": f"mig-{uuid.uuid4().hex[:8]}"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app", "tokens", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    created = await asyncio.to_thread(cli, "create", "--app", "shop", "--kind", "read")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("mk_read_") and "not shown again" in created.stderr
    listed = await asyncio.to_thread(cli, "list", "--app", "shop")
    token_id = listed.stdout.split()[0]
    assert listed.returncode == 0 and "shop" in listed.stdout and token not in listed.stdout
    store = TokenStore(s.web, table=token_table(s))
    await store.start()
    try:
        assert (await store.verify(token, "read", "shop")) is not None
        assert (await store.verify(token, "read", "other")) is None  # usable for per-app read auth
        table: Any = store.table
        items = (await table.client.scan(TableName=table.table))["Items"]
        assert token not in orjson.dumps(items).decode()  # only the SHA-256 is stored
        revoked = await asyncio.to_thread(cli, "revoke", token_id)
        assert revoked.returncode == 0
        fresh = TokenStore(s.web, table=token_table(s))  # another process: no cache
        await fresh.start()
        assert (await fresh.verify(token, "read")) is None
        await fresh.stop()
        bad = await asyncio.to_thread(cli, "create", "--app", "bad|name", "--kind", "read")
        assert bad.returncode == 2
    finally:
        await store.stop()

"""Alerting and autoscaling on real parts: observations -> worker process (aggregation, alert and autoscale
agents) on Apache Kafka -> webhooks and e-mail to real receivers on loopback (aiohttp, aiosmtpd).

One scripted timeline of minutes, with the worker SIGKILLed mid-timeline and restarted on an empty state
directory (definitions and state come back from the changelog). It checks the exact deliveries, the exact
events on the alerts/autoscale topics, and measures the alert latency: from the minute's record on
metrics-1m (the moment the minute closed) to the webhook's arrival at the receiver.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from app.api.policies import FORWARDED_HEADER
from app.local.embedded import DynamoServer, KafkaBroker, free_port
from app.local.traffic import produce
from app.notify.webhook import verify_signature
from tests.integration.pipeline import Pipeline

pytestmark = pytest.mark.integration

SECRET = "whsec_integration_0123456789"
FORMATION_SECRET = "formation_secret_0123456789"


class Receiver:
    """An aiohttp server in its own thread and loop, recording every request with its arrival time."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.requests.append({"path": request.path, "method": request.method, "at_ms": time.time() * 1000,
                                  "headers": dict(request.headers), "body": body})
        return web.Response(text="ok")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def at(self, prefix: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["path"].startswith(prefix)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[float, Any]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append((time.time() * 1000, email.message_from_bytes(envelope.content,
                                                                           policy=email.policy.default)))
        return "250 OK"


def api(base: str, method: str, path: str, body: Any = None, timeout_s: float = 60, *,
        token: str | None = None) -> tuple[int, Any]:
    """One request; retried while the worker answers 503 (partitions not assigned yet)."""
    deadline = time.monotonic() + timeout_s
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    while True:
        req = urllib.request.Request(f"{base}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            if exc.code == 503 and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            return exc.code, json.loads(exc.read() or b"null")


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every record on the topic (all partitions, from the start), without a consumer group."""
    async def go() -> list[Any]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            # Without a group every partition is assigned once the topic's metadata arrived.
            deadline = asyncio.get_running_loop().time() + 10
            while not consumer.assignment():
                assert asyncio.get_running_loop().time() < deadline, f"no partitions of {topic}"
                await consumer.getmany(timeout_ms=100)
            parts = sorted(consumer.assignment())
            await consumer.seek_to_beginning(*parts)
            end = await consumer.end_offsets(parts)
            out: list[Any] = []
            while True:
                positions = [await consumer.position(tp) for tp in parts]
                if all(pos >= end[tp] for pos, tp in zip(positions, parts, strict=True)):
                    return out
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    out.extend(records)
        finally:
            await consumer.stop()
    return asyncio.run(go())


def latest(records: list[Any]) -> dict[bytes, bytes | None]:
    """A changelog's current content: last value per key (None = deleted)."""
    out: dict[bytes, bytes | None] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        out[r.key] = r.value
    return out


def router(ts: int, service_ms: float) -> dict[str, Any]:
    return {"kind": "router", "app": "shop", "dyno": "web.1", "ts": ts, "status": 200, "service_ms": service_ms,
            "connect_ms": 1.0, "bytes": 100, "code": None}


def minute_batch(start_ms: int, service_ms: float) -> tuple[bytes, bytes]:
    """60 requests between 3 s and 32.5 s into the minute: its arrival also closes the previous minute
    (app watermark >= previous end + 2 s grace)."""
    return b"shop", orjson.dumps([router(start_ms + 3000 + k * 500, service_ms) for k in range(60)])


def test_alerts_and_autoscaling_across_a_worker_restart(broker: KafkaBroker, dynamo: DynamoServer,
                                                        tmp_path: Path) -> None:
    uid = uuid.uuid4().hex[:8]
    receiver = Receiver()
    receiver.start()
    inbox = Inbox()
    smtp_port = free_port()
    smtp = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    p = Pipeline(
        broker, dynamo, tmp_path,
        METRICS_ALERTS_TOPIC=f"alerts-{uid}", METRICS_AUTOSCALE_TOPIC=f"autoscale-{uid}",
        METRICS_POLICY_COMMANDS_TOPIC=f"policy-{uid}",
        METRICS_SMTP_HOST="127.0.0.1", METRICS_SMTP_PORT=str(smtp_port), METRICS_SMTP_TLS="none",
        METRICS_FORMATION_URL=f"{receiver.url}/formation/{{app}}/{{process_type}}",
        METRICS_FORMATION_TOKEN="platform-token", METRICS_FORMATION_SECRET=FORMATION_SECRET,
        METRICS_OUTBOX_SWEEP_INTERVAL_S="2",
        METRICS_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",  # the receivers are on loopback
    )
    s = p.settings
    now_ms = int(time.time() * 1000)
    t0 = now_ms - now_ms % 60_000 - 40 * 60_000  # 40 minutes ago: every minute is in the past
    latency_ms = {i: 800.0 for i in range(10)} | {10: 100.0, 11: 100.0}

    def send_minute(i: int) -> None:
        asyncio.run(produce(broker.address, s.kafka.observations_topic, [minute_batch(t0 + i * 60_000, latency_ms[i])]))

    try:
        p.start(data_dir=tmp_path / "state-1")
        write, read = p.read_token("shop", "write"), p.read_token("shop", "read")
        assert api(p.url, "GET", "/v1/apps/shop/monitors")[0] == 401
        assert api(p.url, "POST", "/v1/apps/shop/monitors", {"metric": "LATENCY"}, token=read)[0] == 403
        status, mon = api(p.url, "POST", "/v1/apps/shop/monitors", {
            "metric": "LATENCY", "threshold": 500, "sensitivity_min": 5, "notify_every_min": 5,
            "email": ["ops@example.com"], "webhooks": [{"url": f"{receiver.url}/alerts", "secret": SECRET}]},
            token=write)
        assert status == 201, mon
        status, pol = api(p.url, "PUT", "/v1/apps/shop/autoscaling/web", {
            "min_dynos": 1, "max_dynos": 3, "p95_target_ms": 300, "current_dynos": 1,
            "webhooks": [{"url": f"{receiver.url}/pinned", "secret": SECRET}]}, token=write)
        assert status == 201, pol
        status, bad = api(p.url, "POST", "/v1/apps/shop/monitors", {"metric": "LATENCY", "threshold": 10,
                                                                    "sensitivity_min": 5, "notify_every_min": 5},
                          token=write)
        assert status == 400 and bad["error"]["field"] == "threshold"

        # Minutes 0..6 at 800 ms. Batch i closes minute i-1; the last one closes when the partition idles.
        for i in range(7):
            send_minute(i)
            p.wait_stats(lambda c, i=i: c["minutes_emitted"] >= i, 30, f"minute {i - 1} closed")
        p.wait_stats(lambda c: c["minutes_emitted"] >= 7, 30, "minute 6 closed (idle)")
        p.wait_stats(lambda c: c["autoscale_decisions"] >= 7 and c["notifications_sent"] >= 5, 30,
                     "minutes 0..6 evaluated and notified")

        # Before the crash, wait until the state (minute 6 applied) and the settled outbox are in the
        # changelogs: a SIGKILL loses nothing the changelog holds.
        deadline = time.monotonic() + 30
        while True:
            mon_log = latest(read_topic(broker.address, f"{s.kafka.app_id}-monitors-changelog"))
            as_log = latest(read_topic(broker.address, f"{s.kafka.app_id}-autoscale-changelog"))
            doc = orjson.loads(mon_log.get(b"m|shop") or b'{"monitors": []}')
            pdoc = orjson.loads(as_log.get(b"a|shop") or b'{"policies": []}')
            pending = [k for k, v in [*mon_log.items(), *as_log.items()] if k.startswith(b"o|") and v is not None]
            if (doc["monitors"] and doc["monitors"][0]["st"]["last_minute_ms"] == t0 + 6 * 60_000
                    and pdoc["policies"] and pdoc["policies"][0]["st"]["last_minute_ms"] == t0 + 6 * 60_000
                    and not pending):
                break
            assert time.monotonic() < deadline, (doc, pdoc, pending)
            time.sleep(0.5)
        assert doc["monitors"][0]["st"]["status"] == "firing"

        p.kill()
        p.start(data_dir=tmp_path / "state-2")
        # Definitions and state are back on a fresh machine.
        status, listed = api(p.url, "GET", "/v1/apps/shop/monitors", token=read)
        assert status == 200 and [m["state"]["status"] for m in listed["monitors"]] == ["firing"]
        assert listed["monitors"][0]["state"]["last_minute_ms"] == t0 + 6 * 60_000
        status, pol = api(p.url, "GET", "/v1/apps/shop/autoscaling/web", token=read)
        assert status == 200 and pol["state"]["dynos"] == 3

        # Minutes 7..9 still at 800 ms (reminder at 9 = firing minute 4 + 5), 10 and 11 at 100 ms.
        for i in range(7, 12):
            send_minute(i)
            p.wait_stats(lambda c, i=i: c["minutes_emitted"] >= i - 7, 60, f"minute {i - 1} closed")
        p.wait_stats(lambda c: c["minutes_emitted"] >= 5 and c["autoscale_decisions"] >= 5, 30, "minute 11 closed")
        deadline = time.monotonic() + 30
        while len(receiver.at("/alerts")) < 3 or len(inbox.messages) < 3:
            assert time.monotonic() < deadline, (receiver.at("/alerts"), inbox.messages)
            time.sleep(0.2)
        time.sleep(3)  # anything duplicated (a resent outbox entry) would arrive by now

        # --- exact deliveries --------------------------------------------------------------------------
        hooks = receiver.at("/alerts")
        bodies = [orjson.loads(r["body"]) for r in hooks]
        assert [(b["event"], (b["minute_start_ms"] - t0) // 60_000) for b in bodies] == [
            ("firing", 4), ("still_firing", 9), ("resolved", 10)]
        for r in hooks:
            assert verify_signature(SECRET, r["headers"]["X-Minutely-Signature"], r["body"], now_s=time.time())
        assert bodies[0]["value"] == pytest.approx(800.0) and bodies[2]["value"] == pytest.approx(100.0)
        assert bodies[0]["threshold"] == 500.0 and bodies[0]["monitor_id"] == mon["id"]
        subjects = [m["Subject"] for _, m in inbox.messages]
        assert subjects == ["FIRING shop/web: p95 response time 800 ms (threshold 500 ms)",
                            "STILL FIRING shop/web: p95 response time 800 ms (threshold 500 ms)",
                            "RESOLVED shop/web: p95 response time 100 ms (threshold 500 ms)"]
        formation = receiver.at("/formation/shop/web")
        assert [orjson.loads(r["body"])["quantity"] for r in formation] == [2, 3]
        assert all(r["method"] == "PATCH" and r["headers"]["Authorization"] == "Bearer platform-token"
                   and verify_signature(FORMATION_SECRET, r["headers"]["X-Minutely-Signature"], r["body"],
                                        now_s=time.time()) for r in formation)
        pinned = [orjson.loads(r["body"]) for r in receiver.at("/pinned")]
        assert [(b["type"], (b["minute_start_ms"] - t0) // 60_000, b["needed_dynos"]) for b in pinned] == [
            ("autoscale_pinned", 2, 4)]

        # --- exact topic contents ----------------------------------------------------------------------
        alerts = [orjson.loads(r.value) for r in read_topic(broker.address, s.kafka.alerts_topic)]
        assert [(a["event"], (a["minute_start_ms"] - t0) // 60_000) for a in alerts] == [
            ("firing", 4), ("still_firing", 9), ("resolved", 10)]
        decisions = [orjson.loads(r.value) for r in read_topic(broker.address, s.kafka.autoscale_topic)]
        assert [((d["minute_start_ms"] - t0) // 60_000, d["action"], d["to_dynos"]) for d in decisions] == [
            (0, "up", 2), (1, "up", 3)] + [(i, "hold", 3) for i in range(2, 12)]
        assert [d["pinned_at_max"] for d in decisions] == [False, False] + [True] * 8 + [False, False]

        # --- latency: minute closed (record on metrics-1m) -> webhook received / event published -----
        closed_ms = {orjson.loads(r.value)["start_ms"]: r.timestamp
                     for r in read_topic(broker.address, s.kafka.metrics_topic)}
        alert_records = read_topic(broker.address, s.kafka.alerts_topic)
        lines = []
        for b, hook_req, rec in zip(bodies, hooks, alert_records, strict=False):
            closed = closed_ms[b["minute_start_ms"]]
            lines.append(f"{b['event']:>13} minute {(b['minute_start_ms'] - t0) // 60_000:>2}: published "
                         f"{rec.timestamp - closed:6.0f} ms, webhook received {hook_req['at_ms'] - closed:6.0f} ms, "
                         f"e-mail received "
                         f"{inbox.messages[bodies.index(b)][0] - closed:6.0f} ms after the minute closed")
        print("\nalert latency after minute close (real broker, worker process):\n" + "\n".join(lines))
        stats = p.stats()
        assert stats["alerts_published"] == 2  # the restarted worker published the reminder and the resolve
        assert stats["notifications_failed"] == 0 and stats["policy_commands_rejected"] == 0
    finally:
        p.stop()
        smtp.stop()
        receiver.stop()


def get(base: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    """One GET, no retries: (status, headers, decoded JSON body)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{base}{path}", headers=headers), timeout=15) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


def test_reads_on_a_worker_that_does_not_own_the_app(broker: KafkaBroker, dynamo: DynamoServer,
                                                     tmp_path: Path) -> None:
    """Two workers, the app's partition on one of them: a GET on either returns the owner's answer."""
    uid = uuid.uuid4().hex[:8]
    p = Pipeline(broker, dynamo, tmp_path, METRICS_ALERTS_TOPIC=f"alerts-{uid}",
                 METRICS_AUTOSCALE_TOPIC=f"autoscale-{uid}", METRICS_POLICY_COMMANDS_TOPIC=f"policy-{uid}")
    try:
        p.start(data_dir=tmp_path / "state-1")
        write, read = p.read_token("shop", "write"), p.read_token("shop", "read")
        status, mon = api(p.url, "POST", "/v1/apps/shop/monitors", {
            "metric": "LATENCY", "threshold": 500, "sensitivity_min": 5, "notify_every_min": 5,
            "webhooks": [{"url": "https://hooks.example.com/minutely", "secret": SECRET}]}, token=write)
        assert status == 201, mon
        status, pol = api(p.url, "PUT", "/v1/apps/shop/autoscaling/web", {
            "min_dynos": 1, "max_dynos": 3, "p95_target_ms": 300, "current_dynos": 1}, token=write)
        assert status == 201, pol
        _, url2 = p.start_second_worker(data_dir=tmp_path / "state-2")

        # The owner is the worker that answers a request marked as already forwarded (it never forwards one);
        # the other answers it 503. Wait until the rebalance gave each worker its partitions.
        auth = {"Authorization": f"Bearer {read}"}
        deadline = time.monotonic() + 90
        while True:
            guarded = {base: get(base, "/v1/apps/shop/monitors", {**auth, FORWARDED_HEADER: "http://test"})[0]
                       for base in (p.url, url2)}
            if sorted(guarded.values()) == [200, 503]:
                break
            assert time.monotonic() < deadline, guarded
            time.sleep(0.5)
        owner = next(base for base, st in guarded.items() if st == 200)
        other = url2 if owner == p.url else p.url

        for path in ["/v1/apps/shop/monitors", f"/v1/apps/shop/monitors/{mon['id']}", "/v1/apps/shop/autoscaling",
                     "/v1/apps/shop/autoscaling/web", "/v1/apps/shop/monitors/mon_0123456789ab"]:
            status, body = api(other, "GET", path, token=read)  # retried while partitions settle
            o_status, o_headers, o_body = get(owner, path, auth)
            f_status, f_headers, f_body = get(other, path, auth)
            assert (status, body) == (o_status, o_body) == (f_status, f_body), path
            assert f_headers["Content-Type"] == o_headers["Content-Type"], path
        status, listed = api(other, "GET", "/v1/apps/shop/monitors", token=read)
        assert status == 200 and [m["id"] for m in listed["monitors"]] == [mon["id"]]
        # Credentials are checked as on the owner: none is a 401, a write token (not a read token) a 403.
        assert get(other, "/v1/apps/shop/monitors", {})[0] == 401
        assert get(other, "/v1/apps/shop/monitors", {"Authorization": f"Bearer {write}"})[0] == 403
        # Workers document the routes they serve.
        assert "/v1/apps/{app}/monitors" in get(other, "/v1/openapi.json", {})[2]["paths"]
    finally:
        p.stop()

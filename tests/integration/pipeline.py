"""Helpers to run real worker processes against the session's broker and DynamoDB server (dynalite)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from app.cli import start_role, start_worker, wait_http, worker_env
from app.local.embedded import DynamoServer, KafkaBroker, free_port
from app.local.traffic import Generator, Truth, produce
from app.ops.topics import ensure_topics
from app.settings import Settings
from app.storage.backends import metrics_store, token_table
from app.storage.tokens import TokenStore
from tables.record import decode as decode_stored

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
OPERATOR_PATHS = ("/readyz", "/metrics", "/migration", "/v1/stats")
"""Served on each process's admin port (METRICS_ADMIN_PORT), not on its tenants' port."""


class Pipeline:
    """One isolated deployment (own topics, group, table, state dir) on the shared real parts."""

    def __init__(self, broker: KafkaBroker, dynamo: DynamoServer, tmp: Path, **overrides: str) -> None:
        uid = uuid.uuid4().hex[:8]
        self.broker, self.dynamo, self.tmp = broker, dynamo, tmp
        self.env_overrides = {
            "METRICS_APP_ID": f"t{uid}",
            "METRICS_OBSERVATIONS_TOPIC": f"obs-{uid}",
            "METRICS_METRICS_TOPIC": f"m1-{uid}",
            "METRICS_DLQ_TOPIC": f"dlq-{uid}",
            "METRICS_SINK_DLQ_TOPIC": f"sdlq-{uid}",
            "METRICS_TABLE_NAME": f"metrics-{uid}",
            "METRICS_MIGRATION_TOPIC": f"mig-{uid}",
            "METRICS_CHECKPOINTS_TOPIC": f"cp-{uid}",
            # Every topic is the deployment's own: a shared one may have been created by another test with
            # another partition count (the store migration reads all METRICS_PARTITIONS of each).
            "METRICS_ALERTS_TOPIC": f"alerts-{uid}",
            "METRICS_AUTOSCALE_TOPIC": f"autoscale-{uid}",
            "METRICS_POLICY_COMMANDS_TOPIC": f"policy-{uid}",
            "METRICS_CASSANDRA_KEYSPACE": f"m{uid}",
            "METRICS_PARTITIONS": "4",
            "METRICS_GRACE_S": "2",
            "METRICS_IDLE_TIMEOUT_S": "3",
            "METRICS_CLOSE_INTERVAL_S": "0.5",
            "METRICS_SESSION_TIMEOUT_S": "6",
            "METRICS_REBALANCE_TIMEOUT_S": "4",
            "METRICS_SINK_WITHIN_S": "0.2",
            # Blocks flushed every minute boundary, so "final" follows within seconds, as tests wait for it.
            "METRICS_ROLLUP_FLUSH_S": "60",
            **overrides,
        }
        self.settings = Settings.from_env(
            {**self.env_overrides, "METRICS_DYNAMODB_ENDPOINT": dynamo.endpoint})
        self.web_port = free_port()
        self.admin_port = free_port()
        self.admin_urls: dict[str, str] = {self.url: f"http://127.0.0.1:{self.admin_port}"}
        """Each process's tenant URL -> its admin port's URL (/readyz with reasons, /metrics, /v1/stats)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.others: list[subprocess.Popen[bytes]] = []
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / f"worker-{uid}.log"
        asyncio.run(ensure_topics(broker.address, self.settings.kafka))

    def start(self, *, data_dir: Path) -> None:
        env = worker_env(self.broker.url, self.dynamo.endpoint, data_dir=str(data_dir), web_port=self.web_port,
                         extra={**self.env_overrides, "METRICS_ADMIN_PORT": str(self.admin_port)})
        self.proc = start_worker(env, log_path=self.log_path)
        wait_http(f"{self.url}/healthz", 120, self.proc)

    def start_second_worker(self, *, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
        """Another worker in the same consumer group (a rebalance splits the partitions)."""
        port, admin_port = free_port(), free_port()
        env = worker_env(self.broker.url, self.dynamo.endpoint, data_dir=str(data_dir), web_port=port,
                         extra={**self.env_overrides, "METRICS_ADMIN_PORT": str(admin_port)})
        proc = start_worker(env, log_path=self.log_path.with_name(self.log_path.stem + "-2.log"))
        self.others.append(proc)
        wait_http(f"http://127.0.0.1:{port}/healthz", 120, proc)
        self.admin_urls[f"http://127.0.0.1:{port}"] = f"http://127.0.0.1:{admin_port}"
        return proc, f"http://127.0.0.1:{port}"

    def start_ingest(self) -> str:
        """An ingest process (``python -m app ingest``) for this deployment; returns its base URL."""
        port, admin_port = free_port(), free_port()
        env = worker_env(self.broker.url, self.dynamo.endpoint, data_dir=str(self.tmp), web_port=port,
                         extra={**self.env_overrides, "METRICS_ADMIN_PORT": str(admin_port)})
        self.ingest_proc = start_role("ingest", env,
                                      log_path=self.log_path.with_name(self.log_path.stem + "-ingest.log"))
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, self.ingest_proc)
        self.admin_urls[f"http://127.0.0.1:{port}"] = f"http://127.0.0.1:{admin_port}"
        return f"http://127.0.0.1:{port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def admin_url(self, url: str | None = None) -> str:
        """The admin port (operator endpoints) of this deployment's worker, or of the process at ``url``."""
        return self.admin_urls[(url or self.url).rstrip("/")]

    def stats(self, url: str | None = None) -> dict[str, int]:
        """The counters of this deployment's worker, or of the one at ``url`` (a second worker): on its admin
        port, as the tenants' port has no /v1/stats."""
        with urllib.request.urlopen(f"{self.admin_url(url)}/v1/stats", timeout=5) as r:
            counters: dict[str, int] = json.load(r)["counters"]
            return counters

    def read_token(self, app: str, kind: str = "read") -> str:
        """A token for ``app`` (read: the metrics and policy reads; write: policy changes)."""
        async def go() -> str:
            store = TokenStore(self.settings.web, table=token_table(self.settings))
            await store.start()
            try:
                return (await store.create(app, kind))[0]
            finally:
                await store.stop()
        return asyncio.run(go())

    def get(self, path: str, *, token: str | None = None) -> Any:
        """JSON from the worker: operator paths (/readyz with reasons, /migration, /v1/stats) on its admin port."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        base = self.admin_url() if path.split("?")[0] in OPERATOR_PATHS else self.url
        with urllib.request.urlopen(urllib.request.Request(f"{base}{path}", headers=headers), timeout=10) as r:
            return json.load(r)

    def wait_stats(self, pred: Any, timeout_s: float, what: str) -> dict[str, int]:
        deadline = time.monotonic() + timeout_s
        last: dict[str, int] = {}
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"worker died; see {self.log_path}"
            last = self.stats()
            if pred(last):
                return last
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}; counters {last}; log {self.log_path}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        ingest = getattr(self, "ingest_proc", None)
        for proc in (*self.others, *([ingest] if ingest is not None else []), self.proc):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:  # a slow shutdown under load: reap it, never leave it running
                    proc.kill()
                    proc.wait(timeout=10)

    def stored(self, apps: list[str], procs: list[str], since_s: int, until_s: int) -> dict[tuple[str, str, int], Any]:
        """Every minute DynamoDB holds for these series, decoded."""
        async def go() -> dict[tuple[str, str, int], Any]:
            store = metrics_store(self.settings)  # METRICS_STORE's (DynamoDB unless the test says otherwise)
            await store.start()
            try:
                out = {}
                for app in apps:
                    for proc in procs:
                        for item in await store.query(app, proc, 60, since_s, until_s):
                            out[(app, proc, item.ts_s * 1000)] = decode_stored(item.payload)[0].to_record()
                return out
            finally:
                await store.stop()
        return asyncio.run(go())


def wait_stored(p: Pipeline, apps: list[str], start_ms: int, minutes: int, timeout_s: float = 120) -> dict[
        tuple[str, str, int], Any]:
    """Poll DynamoDB until it holds ``minutes`` minutes of these apps (or the timeout); returns them."""
    deadline = time.monotonic() + timeout_s
    while True:
        stored = p.stored(apps, ["web", "worker"], start_ms // 1000, start_ms // 1000 + 3600)
        if len(stored) >= minutes or time.monotonic() > deadline:
            return stored
        time.sleep(0.5)


def check_against_truth(stored: dict[tuple[str, str, int], Any], truth: Truth) -> float:
    """Every minute the truth has is stored, equal to it: request counts (served or not), failed and errors
    exact; response max exact, mean to 1e-6 and p50/p95/p99 within 1 % of numpy's exact percentiles over the
    served requests only (no section when the router answered every request itself); rss max, platform
    event counts, add-on gauges (max, last), custom counters (sum), timers (count, max) and gauges (max,
    last) exact. Returns the largest relative percentile error met."""
    from app.local.traffic import gauge_last
    from tables.aggregate import Aggregate

    keys = truth.keys()
    assert keys <= set(stored), sorted(keys - set(stored))[:5]
    wrong = {k: (Aggregate.from_record(stored[k]).summary().get("requests", 0), truth.requests[k])
             for k in sorted(truth.requests) if truth.requests[k]
             and Aggregate.from_record(stored[k]).summary().get("requests", 0) != truth.requests[k]}
    assert not wrong, f"requests (stored, truth) of {len(wrong)} of {len(keys)} minutes: {wrong}"
    worst = 0.0
    for key in sorted(keys):
        point = Aggregate.from_record(stored[key]).summary()
        requests = truth.requests.get(key, 0)
        if not requests:
            assert "requests" not in point and "response_ms" not in point, (key, point)
        else:
            assert point["requests"] == requests, key
            assert point["failed"] == truth.failed.get(key, 0), key
            assert point.get("errors", {}) == dict(truth.errors.get(key, {})), key
            served = truth.service_ms.get(key)
            if not served:
                assert "response_ms" not in point, (key, point)
            else:
                arr = np.asarray(served)
                assert point["response_ms"]["max"] == arr.max(), key
                assert abs(point["response_ms"]["mean"] - arr.mean()) <= 1e-6 * arr.mean(), key
                for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
                    exact = float(np.quantile(arr, q))
                    got = point["response_ms"][name]
                    assert abs(got - exact) <= 0.01 * exact, (key, name, got, exact)
                    worst = max(worst, abs(got - exact) / exact)
        if key in truth.rss_max:
            assert point["memory_mb"]["rss_max"] == truth.rss_max[key], key
        assert point.get("platform", {}) == dict(truth.platform.get(key, {})), key
        want_addons = truth.addons.get(key, {})
        got_addons = point.get("addons", {})
        assert set(got_addons) == set(want_addons), (key, got_addons)
        for source, samples in want_addons.items():
            assert set(got_addons[source]) == set(samples), (key, source, got_addons[source])
            for name, pts in samples.items():
                assert got_addons[source][name]["max"] == max(v for _, v in pts), (key, source, name)
                assert got_addons[source][name]["last"] == gauge_last(pts), (key, source, name)
        metrics = point.get("metrics", {})
        want = {**truth.counters.get(key, {}), **truth.timers.get(key, {}), **truth.gauges.get(key, {})}
        assert set(metrics) == set(want), (key, sorted(metrics), sorted(want))
        for name, total in truth.counters.get(key, {}).items():
            assert metrics[name] == {"type": "counter", "sum": total}, (key, name)
        for name, values in truth.timers.get(key, {}).items():
            m = metrics[name]
            assert (m["type"], m["count"], m["max"]) == ("timer", len(values), max(values)), (key, name, m)
        for name, gpts in truth.gauges.get(key, {}).items():
            m = metrics[name]
            assert (m["type"], m["max"], m["last"]) == ("gauge", max(v for _, v in gpts), gauge_last(gpts)), (key, name)
    return worst


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


class _LoopProxy:
    """A proxy on a loopback port, run by its own event loop in a thread; :meth:`_start`/:meth:`_stop`
    (coroutines of the subclass) open and close it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=20)

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        self._call(self._start())

    def close(self) -> None:
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=20)
        self.loop.close()  # else its self-pipe (a socket pair) leaks: a ResourceWarning under filterwarnings=error


class CutProxy(_LoopProxy):
    """Forwards TCP to ``target`` until :meth:`cut`: then every connection is closed and new ones are
    refused (the store is down for whoever talks through it) until :meth:`restore`. Meanwhile it can add
    latency to what the client sends (:attr:`delay_s`) and reset the connection as every
    :attr:`reset_every`-th request passes (in-flight requests fail, as on a node's bad day); :attr:`calls`
    counts them."""

    def __init__(self, target_port: int) -> None:
        super().__init__()
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.delay_s = 0.0
        self.reset_every = 0
        self.calls: dict[str, int] = {"forwarded": 0, "reset": 0}
        self.restore()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool = False
                    ) -> None:
        try:
            while data := await reader.read(65536):
                if upstream:
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    seen = self.calls["forwarded"] + self.calls["reset"] + 1
                    if self.reset_every and seen % self.reset_every == 0:
                        self.calls["reset"] += 1
                        writer.transport.abort()
                        break
                    self.calls["forwarded"] += 1
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer, upstream=True), self._pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for w in list(self.writers):
            w.close()
        self.writers.clear()

    def cut(self) -> None:
        self._call(self._stop())

    down = cut


class FaultProxy(_LoopProxy):
    """An HTTP proxy in front of the DynamoDB server that injects what a real DynamoDB does on a bad day:
    added latency (:attr:`delay_s`), a fraction of calls throttled (400
    ProvisionedThroughputExceededException, :attr:`throttle`) or failed (500, :attr:`errors`), or nothing at
    all (:meth:`down`: connections refused, until :meth:`restore`). :attr:`calls` counts what it did."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target.rstrip("/")
        self.delay_s = 0.0
        self.throttle = 0.0
        self.errors = 0.0
        self.deny_writes = False
        """Answer writes (BatchWriteItem, PutItem) 400 AccessDeniedException, as DynamoDB does for a role
        without the permission: not a bad item, not retriable by the client; the operator must fix it."""
        self.calls: dict[str, int] = {"forwarded": 0, "throttled": 0, "5xx": 0, "denied": 0}
        self.runner: Any = None
        self.session: Any = None
        self.restore()

    async def _handle(self, request: Any) -> Any:
        import random

        from aiohttp import web

        body = await request.read()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        target = request.headers.get("X-Amz-Target", "")
        if self.deny_writes and target.endswith((".BatchWriteItem", ".PutItem")):
            self.calls["denied"] += 1
            return web.Response(status=400, content_type="application/x-amz-json-1.0", body=json.dumps({
                "__type": "com.amazon.coral.service#AccessDeniedException",
                "message": f"User: arn:aws:sts::123456789012:assumed-role/minutely-worker is not authorized to "
                           f"perform: dynamodb:{target.rpartition('.')[2]}"}).encode())
        r = random.random()
        if r < self.throttle:
            self.calls["throttled"] += 1
            return web.Response(status=400, content_type="application/x-amz-json-1.0", body=json.dumps({
                "__type": "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
                "message": "injected throttling"}).encode())
        if r < self.throttle + self.errors:
            self.calls["5xx"] += 1
            return web.Response(status=500, content_type="application/x-amz-json-1.0",
                                body=b'{"__type":"com.amazonaws.dynamodb.v20120810#InternalServerError"}')
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")}
        async with self.session.request(request.method, self.target + request.path_qs, headers=headers,
                                        data=body) as up:
            data = await up.read()
            self.calls["forwarded"] += 1
            keep = {k: v for k, v in up.headers.items() if k.lower() in ("content-type", "x-amz-crc32",
                                                                          "x-amzn-requestid")}
            return web.Response(status=up.status, body=data, headers=keep)

    async def _start(self) -> None:
        import aiohttp
        from aiohttp import web

        if self.session is None:
            self.session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def _stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def down(self) -> None:
        self._call(self._stop())

    def close(self) -> None:
        if self.session is not None:
            self._call(self.session.close())
        super().close()


@dataclass
class ViaProxy:
    """What Pipeline needs of a DynamoDB server: the endpoint the worker is given."""

    endpoint: str


def get(url: str, token: str) -> tuple[dict[str, Any], Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read()), r.headers


class LiveTraffic:
    """Produces the generator's messages as wall time passes (event time = now), from a thread."""

    def __init__(self, broker: KafkaBroker, topic: str, gen: Generator) -> None:
        self.broker, self.topic, self.gen = broker, topic, gen
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        msgs = self.gen.messages(per_message=100, span_ms=5_000)
        while not self.stop.is_set():
            due = []
            while self.gen.now_ms + 5_000 <= time.time() * 1000:
                due += [next(msgs)]  # one message per app, then the generator's clock moves on
            if due:
                asyncio.run(produce(self.broker.address, self.topic, due))
            self.stop.wait(1.0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


class FastTraffic:
    """Generated traffic produced as wall time passes, ``speedup`` times faster than real time, from a thread:
    ``duration_s`` of wall time carry ``speedup * duration_s`` of event time, which ends two minutes before
    the wall clock (every minute is in the past, so only the data closes them). Each app sends a message a
    second; every other message is split into single-observation messages, so both message forms are in
    the stream. The generator's truth is what Kafka holds, whatever happens to the broker meanwhile."""

    def __init__(self, broker: KafkaBroker, topic: str, *, duration_s: float, speedup: float, apps: int = 3,
                 seed: int = 1, per_second: int = 100) -> None:
        self.broker, self.topic, self.duration_s, self.speedup = broker, topic, duration_s, speedup
        now_ms = int(time.time() * 1000)
        self.start_ms = (now_ms - int(duration_s * speedup * 1000) - 120_000) // 60_000 * 60_000
        self.gen = Generator(apps=apps, dynos=2, seed=seed, start_ms=self.start_ms, keep_truth=True,
                             realistic=True)
        self.per_message = max(1, int(per_second * speedup))
        self.span_ms = int(1000 * speedup)
        self.msgs = self.gen.messages(per_message=self.per_message, span_ms=self.span_ms)
        self.next_ms = self.start_ms
        self.messages = 0
        """Generated messages (arrays): every other one goes to Kafka as it is, the others as ``singles``."""
        self.singles = 0
        self.observations = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()
        self.thread.start()

    @property
    def truth(self) -> Truth:
        assert self.gen.truth is not None
        return self.gen.truth

    def _due(self) -> list[tuple[bytes, bytes]]:
        elapsed_s = min(time.monotonic() - self.t0, self.duration_s)
        due_ms = self.start_ms + int(elapsed_s * self.speedup * 1000)
        out: list[tuple[bytes, bytes]] = []
        while self.next_ms + self.span_ms <= due_ms:
            self.next_ms += self.span_ms
            for _ in self.gen.apps:  # one message per app, then the generator's clock moves on
                key, value = next(self.msgs)
                self.messages += 1
                if self.messages % 2:
                    out.append((key, value))
                else:
                    out += [(key, orjson.dumps(o)) for o in orjson.loads(value)]
        return out

    def _run(self) -> None:
        asyncio.run(self._produce_all())

    async def _produce_all(self) -> None:
        from aiokafka import AIOKafkaProducer

        # One idempotent producer for the whole run: while the broker is down it retries the same batches
        # (the broker drops what it already has), for up to request_timeout_ms, so nothing is doubled.
        producer = AIOKafkaProducer(bootstrap_servers=self.broker.address, acks="all", enable_idempotence=True,
                                    linger_ms=5, request_timeout_ms=180_000, max_request_size=8 * 1024 * 1024)
        await producer.start()
        try:
            while True:
                finished = time.monotonic() - self.t0 >= self.duration_s
                due = self._due()
                self.observations += sum(1 if v[:1] == b"{" else len(orjson.loads(v)) for _, v in due)
                self.singles += sum(v[:1] == b"{" for _, v in due)
                futs = [await producer.send(self.topic, value=v, key=k) for k, v in due]
                await asyncio.gather(*futs)  # raises when Kafka did not take them in time: the test fails
                if finished:
                    break
                await asyncio.sleep(0.5)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.done.set()
            await producer.stop()

    def wait(self, timeout_s: float) -> None:
        """Until everything due is in Kafka."""
        assert self.done.wait(timeout_s), "the traffic did not finish"
        assert self.error is None, f"the traffic's producer failed: {self.error!r}"


def wait_truth_stored(p: Pipeline, truth: Truth, start_ms: int, timeout_s: float) -> dict[tuple[str, str, int], Any]:
    """Poll the store until every minute of the truth is there (or fail naming how many are); returns all the
    stored minutes of the truth's apps (extra or doubled ones included, for the caller to compare)."""
    keys = truth.keys()
    apps = sorted({app for app, _, _ in keys})
    procs = sorted({proc for _, proc, _ in keys})
    deadline = time.monotonic() + timeout_s
    while True:
        stored = p.stored(apps, procs, start_ms // 1000, start_ms // 1000 + 6 * 3600)
        if keys <= set(stored):
            return stored
        assert time.monotonic() < deadline, f"{len(keys & set(stored))} of {len(keys)} minutes stored"
        time.sleep(1.0)


# --- helpers for the tenant-limit tests (tests/integration/test_tenant_limits.py) ----------------------------

async def produce_to_partition(bootstrap: str, topic: str, partition: int, messages: list[tuple[bytes, bytes]]
                               ) -> None:
    """Like app.local.traffic.produce, every message to one partition (apps that share it, whatever their keys)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_request_size=1024 * 1024)
    await producer.start()
    try:
        futs = [await producer.send(topic, value=v, key=k, partition=partition) for k, v in messages]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


def read_topic(bootstrap: str, topic: str, *, min_records: int = 1, timeout_s: float = 30) -> list[Any]:
    """Every record of ``topic`` from the beginning, JSON-decoded, once at least ``min_records`` are there (or the
    timeout)."""
    async def go() -> list[Any]:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                    enable_auto_commit=False, group_id=None)
        await consumer.start()
        out: list[Any] = []
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                out += [orjson.loads(r.value) for recs in batch.values() for r in recs]
                if len(out) >= min_records and not batch:
                    break
        finally:
            await consumer.stop()
        return out
    return asyncio.run(go())


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")

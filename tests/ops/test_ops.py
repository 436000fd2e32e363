"""Operational endpoints (app/ops/health.py): /readyz, /metrics from the catalogue, JSON logs without secrets,
and the sink/store metrics they expose."""

from __future__ import annotations

import asyncio
import io
import logging
from collections import namedtuple
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from agents.sink import Sink
from app.clock import ManualClock
from app.errors import RetriableError, StoreError, StoreUnavailable
from app.ops import health as ops
from app.ops import kafka, logs, topics
from app.ops.stats import CATALOGUE, GAUGES, HISTOGRAMS, Counters
from app.settings import KafkaSettings, Settings
from app.storage.dynamodb import DynamoStore
from app.storage.protocol import MetricItem
from tables.aggregate import Aggregate, BucketKey
from tests.api.test_query import MemoryStore

TP = namedtuple("TP", "topic partition")


async def make_client(aiohttp_client: Any, counters: Counters, checks: dict[str, ops.Check],
                      **kwargs: Any) -> TestClient[Any, Any]:
    webapp = web.Application()
    ops.add_ops_routes(webapp, counters=counters, checks=checks, **kwargs)
    client: TestClient[Any, Any] = await aiohttp_client(webapp)
    return client


async def ok() -> None:
    return None


# --- catalogue and /metrics -----------------------------------------------------------------------------


def test_catalogue_kinds_name_declared_metrics_with_actionable_help() -> None:
    assert set(CATALOGUE) >= GAUGES and set(HISTOGRAMS) <= set(CATALOGUE)
    assert not GAUGES & set(HISTOGRAMS)
    for name, text in CATALOGUE.items():
        assert len(text) > 20, f"{name}: help text must say what it counts and what to do when it moves"
    for bounds in HISTOGRAMS.values():
        assert list(bounds) == sorted(set(bounds))


def test_counter_names_are_the_catalogue() -> None:
    """CounterName (what mypy checks call sites against) and the catalogue (what is served) are one list."""
    from typing import get_args

    from app.migration.compare import KINDS
    from app.migration.reads import MISMATCH_COUNTERS
    from app.ops.stats import CounterName

    assert list(get_args(CounterName)) == list(CATALOGUE)
    assert set(MISMATCH_COUNTERS) == set(KINDS)  # a name built from data goes through a typed mapping


async def test_metrics_exports_every_catalogue_entry_once_with_its_help(aiohttp_client: Any) -> None:
    counters = Counters()
    counters.inc("observations_accepted", 7)
    counters.inc("observations_late", 2)
    counters.inc("sink_dead_lettered")
    counters.inc("drain_frames_deduplicated", 3)
    counters.set("windows_open", 12)
    counters.observe("sink_batch_seconds", 0.03)
    counters.observe("sink_batch_seconds", 0.3)
    counters.observe("sink_batch_seconds", 400.0)
    client = await make_client(aiohttp_client, counters, {})

    r = await client.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}

    ours = {n: f for n, f in families.items() if n.startswith(ops.METRIC_PREFIX)
            and not n.startswith(ops.METRIC_PREFIX + "process_")}
    assert set(ours) == {ops.METRIC_PREFIX + n for n in CATALOGUE}
    for name, help_text in CATALOGUE.items():
        fam = families[ops.METRIC_PREFIX + name]
        assert fam.documentation == help_text
        assert fam.type == ("histogram" if name in HISTOGRAMS else "gauge" if name in GAUGES else "counter")
    help_names = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(help_names) == len(set(help_names)), "a metric is declared twice"

    def value(sample_name: str, **labels: str) -> float:
        for fam in families.values():
            for s in fam.samples:
                if s.name == sample_name and s.labels == labels:
                    return float(s.value)
        raise AssertionError(f"{sample_name} {labels} not exported")

    assert value("minutely_observations_accepted_total") == 7
    assert value("minutely_observations_late_total") == 2
    assert value("minutely_sink_dead_lettered_total") == 1
    assert value("minutely_drain_frames_deduplicated_total") == 3
    assert value("minutely_windows_open") == 12
    assert value("minutely_sink_batch_seconds_count") == 3
    assert value("minutely_sink_batch_seconds_sum") == pytest.approx(400.33)
    assert value("minutely_sink_batch_seconds_bucket", le="0.025") == 0
    assert value("minutely_sink_batch_seconds_bucket", le="0.05") == 1
    assert value("minutely_sink_batch_seconds_bucket", le="0.5") == 2
    assert value("minutely_sink_batch_seconds_bucket", le="120.0") == 2
    assert value("minutely_sink_batch_seconds_bucket", le="+Inf") == 3
    assert value("minutely_process_resident_memory_bytes") > 0


async def test_metrics_speaks_openmetrics_when_asked(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client, Counters(), {})
    r = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/openmetrics-text")
    body = await r.text()
    assert "# TYPE minutely_observations_accepted counter" in body and body.rstrip().endswith("# EOF")


async def test_refresh_runs_per_scrape_and_a_failing_refresh_still_answers(
        aiohttp_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    counters = Counters()
    calls: list[int] = []

    def refresh() -> None:
        calls.append(1)
        if len(calls) == 1:
            counters.set("consumer_lag_observations", 42)
        else:
            raise RuntimeError("monitor gone")

    client = await make_client(aiohttp_client, counters, {}, refresh=refresh)
    assert "minutely_consumer_lag_observations 42.0" in await (await client.get("/metrics")).text()
    r = await client.get("/metrics")
    assert r.status == 200 and "minutely_consumer_lag_observations 42.0" in await r.text()
    assert len(calls) == 2
    assert "gauges may be stale" in caplog.text


def test_undeclared_names_are_refused() -> None:
    counters = Counters()
    with pytest.raises(KeyError, match="CATALOGUE"):
        counters.inc("not_declared")  # type: ignore[arg-type]  # the runtime check under test
    with pytest.raises(KeyError, match="HISTOGRAMS"):
        counters.observe("sink_retries", 1.0)


# --- /readyz --------------------------------------------------------------------------------------------


async def test_readyz_ready_when_every_check_passes(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client, Counters(), {"broker": ok, "recovery": ok, "dynamodb": ok})
    r = await client.get("/readyz")
    assert r.status == 200
    assert await r.json() == {"status": "ready", "checks": {"broker": "ok", "recovery": "ok", "dynamodb": "ok"}}


async def test_readyz_names_each_failure_and_what_to_do(aiohttp_client: Any) -> None:
    async def dynamo_down() -> None:
        raise StoreUnavailable("DescribeTable failed: could not connect",
                               action="check the endpoint and the IAM role")

    async def hangs() -> None:
        await asyncio.sleep(10)

    async def bug() -> None:
        raise ValueError("kafka://svc:hunter2@b1:9092 refused, password=hunter2")

    client = await make_client(aiohttp_client, Counters(),
                               {"broker": hangs, "recovery": ok, "dynamodb": dynamo_down, "other": bug},
                               check_timeout_s=0.05)
    r = await client.get("/readyz")
    assert r.status == 503
    body = await r.json()
    assert body["status"] == "not_ready"
    checks = body["checks"]
    assert checks["recovery"] == "ok"
    assert checks["dynamodb"] == "DescribeTable failed: could not connect -- check the endpoint and the IAM role"
    assert checks["broker"].startswith("no answer within 0.05 s")
    assert checks["other"].startswith("ValueError: ") and "hunter2" not in checks["other"]


async def test_readyz_shares_one_run_between_concurrent_and_recent_callers() -> None:
    runs: list[int] = []
    gate = asyncio.Event()
    now = [0.0]

    async def slow() -> None:
        runs.append(1)
        await gate.wait()

    readiness = ops.Readiness({"dynamodb": slow}, cache_s=1.0, monotonic=lambda: now[0])
    first = asyncio.create_task(readiness.run())
    second = asyncio.create_task(readiness.run())
    await asyncio.sleep(0)
    gate.set()
    assert await first == await second == {"dynamodb": "ok"}
    assert len(runs) == 1
    await readiness.run()  # within cache_s: answered from the last run
    assert len(runs) == 1
    now[0] = 2.0
    await readiness.run()
    assert len(runs) == 2


async def test_readiness_logs_transitions_once(caplog: pytest.LogCaptureFixture) -> None:
    healthy = [False]

    async def check() -> None:
        if not healthy[0]:
            raise RetriableError("broker down", action="start it")

    readiness = ops.Readiness({"broker": check}, cache_s=0)
    caplog.set_level(logging.INFO, logger="app.ops.health")
    await readiness.run()
    await readiness.run()
    healthy[0] = True
    await readiness.run()
    lines = [r.getMessage() for r in caplog.records if r.name == "app.ops.health"]
    assert lines == ["not ready: broker: broker down -- start it", "ready: broker"]


async def test_flag_check() -> None:
    done = [False]
    check = ops.flag_check(lambda: done[0], message="table recovery has not finished",
                           action="wait; a restarted worker replays its changelog")
    with pytest.raises(RetriableError, match="table recovery has not finished -- wait"):
        await check()
    done[0] = True
    await check()


def test_bootstrap_servers_parses_faust_urls_and_drops_credentials() -> None:
    assert kafka.bootstrap_servers("kafka://b1:9092;kafka://b2:9093") == ["b1:9092", "b2:9093"]
    assert kafka.bootstrap_servers("kafka://user:secret@b1,b2:19092") == ["b1:9092", "b2:19092"]
    assert kafka.bootstrap_servers("b1") == ["b1:9092"]
    assert kafka.bootstrap_servers("kafka://[::1]:9092") == ["[::1]:9092"]
    assert kafka.bootstrap_servers(" ; ") == []


async def test_broker_check_against_a_real_listener() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # the first server is closed, the second listens: one reachable bootstrap server is enough
        closed = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        closed_port = closed.sockets[0].getsockname()[1]
        closed.close()
        await closed.wait_closed()
        await ops.broker_check(f"kafka://127.0.0.1:{closed_port};kafka://127.0.0.1:{port}")()
        with pytest.raises(RetriableError, match=rf"127.0.0.1:{closed_port}.*check METRICS_BROKER_URL"):
            await ops.broker_check(f"kafka://127.0.0.1:{closed_port}")()
        with pytest.raises(RetriableError, match="set METRICS_BROKER_URL"):
            await ops.broker_check("")()
    finally:
        server.close()
        await server.wait_closed()


# --- consumer lag ---------------------------------------------------------------------------------------


class FakeMonitor:
    def __init__(self) -> None:
        self.tp_end_offsets: dict[Any, int] = {}
        self.tp_committed_offsets: dict[Any, int] = {}
        self.tp_read_offsets: dict[Any, int] = {}


def test_consumer_lag_from_faust_monitor_offsets() -> None:
    m = FakeMonitor()
    obs0, obs1, obs2, obs3, minutes0 = (TP("observations", 0), TP("observations", 1), TP("observations", 2),
                                        TP("observations", 3), TP("metrics-1m", 0))
    m.tp_end_offsets = {obs0: 100, obs1: 50, obs2: 10, minutes0: 7, TP("observations", 9): 1000}
    m.tp_committed_offsets = {obs0: 90, minutes0: 7}  # committed = next offset to process
    m.tp_read_offsets = {obs1: 44}  # not committed yet: last read offset stands in
    assigned = [obs0, obs1, obs2, obs3, minutes0]  # obs2 never read, obs3 never fetched; partition 9 not ours
    assert ops.consumer_lag(m, assigned, "observations") == 10 + 5
    assert ops.consumer_lag(m, assigned, "metrics-1m") == 0


def test_lag_refresher_sets_both_gauges() -> None:
    m = FakeMonitor()
    m.tp_end_offsets = {TP("observations", 0): 30, TP("metrics-1m", 0): 9}
    m.tp_committed_offsets = {TP("observations", 0): 10, TP("metrics-1m", 0): 4}

    class Assignor:
        def assigned_actives(self) -> set[Any]:
            return {TP("observations", 0), TP("metrics-1m", 0)}

    class App:
        monitor = m
        assignor = Assignor()

    counters = Counters()
    ops.lag_refresher(App(), counters, observations_topic="observations", metrics_topic="metrics-1m")()
    assert counters.values["consumer_lag_observations"] == 20
    assert counters.values["consumer_lag_minutes"] == 5


# --- sink and store metrics -----------------------------------------------------------------------------


async def test_sink_records_batch_latency_including_retries() -> None:
    class Flaky(MemoryStore):
        calls = 0

        async def put_many(self, items: Sequence[MetricItem]) -> None:
            self.calls += 1
            if self.calls == 1:
                raise StoreUnavailable("throttled", retry_after_s=0.01)

    async def no_dlq(bad: Sequence[tuple[bytes, str]]) -> None:
        raise AssertionError("nothing should be dead-lettered")

    async def sleep(s: float) -> None:
        await asyncio.sleep(0.02)

    counters = Counters()
    sink = Sink(Flaky(ManualClock()), Settings().storage, dead_letter=no_dlq, counters=counters, sleep=sleep)
    record = orjson.dumps(Aggregate(BucketKey("shop", "web", 1_764_000_000_000)).to_record())
    await sink.write([record])
    h = counters.histograms["sink_batch_seconds"]
    assert h.count == 1 and h.sum >= 0.02
    assert counters.values["sink_retries"] == 1 and counters.values["sink_batch_seconds"] == 1


async def test_sink_records_no_latency_for_a_batch_refused_for_good() -> None:
    class Refusing(MemoryStore):
        async def put_many(self, items: Sequence[MetricItem]) -> None:
            raise StoreError("AccessDeniedException")

    dead: list[tuple[bytes, str]] = []

    async def dlq(bad: Sequence[tuple[bytes, str]]) -> None:
        dead.extend(bad)

    counters = Counters()
    record = orjson.dumps(Aggregate(BucketKey("shop", "web", 1_764_000_000_000)).to_record())
    await Sink(Refusing(ManualClock()), Settings().storage, dead_letter=dlq, counters=counters).write([record])
    assert counters.histograms["sink_batch_seconds"].count == 0 and len(dead) == 1


async def test_store_counts_unprocessed_items() -> None:
    class Client:
        """BatchWriteItem that leaves two items unprocessed once, then accepts them."""

        def __init__(self) -> None:
            self.calls: list[int] = []

        async def batch_write_item(self, RequestItems: dict[str, list[Any]]) -> dict[str, Any]:
            (table, requests), = RequestItems.items()
            self.calls.append(len(requests))
            if len(self.calls) == 1:
                return {"UnprocessedItems": {table: requests[:2]}}
            return {"UnprocessedItems": {}}

    async def no_sleep(s: float) -> None:
        return None

    counters = Counters()
    store = DynamoStore(Settings().storage, Settings().dynamodb, sleep=no_sleep, jitter=lambda: 0.0, counters=counters)
    client = Client()
    store._client = client  # the transport is what this test replaces; put_many's own logic runs
    await store.put_many([MetricItem("shop", "web", 60, 1_764_000_000 + 60 * i, b"{}") for i in range(5)])
    assert client.calls == [5, 2]
    assert counters.values["sink_unprocessed_items"] == 2


# --- JSON logs ------------------------------------------------------------------------------------------


def emit(logger: logging.Logger, *args: Any, **kwargs: Any) -> dict[str, Any]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        logger.info(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue()
    assert line.count("\n") == 1
    doc: dict[str, Any] = orjson.loads(line)
    return doc


def test_json_log_line_fields() -> None:
    doc = emit(logging.getLogger("test.ops.fields"), "minute %s emitted", "shop#web",
               extra={"partition": 3, "app": "shop"})
    assert doc["level"] == "INFO" and doc["logger"] == "test.ops.fields"
    assert doc["msg"] == "minute shop#web emitted"
    assert doc["partition"] == 3 and doc["app"] == "shop"
    assert doc["ts"].endswith("+00:00")


@pytest.mark.parametrize("text, secret", [
    ("connecting to kafka://svc-user:s3cr3t-pw@b1:9092", "s3cr3t-pw"),
    ("retrying with password=s3cr3t-pw", "s3cr3t-pw"),
    ('config {"sasl_plain_password": "s3cr3t-pw", "x": 1}', "s3cr3t-pw"),
    ("aws_secret_access_key = wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"),
    ("key id AKIAIOSFODNN7EXAMPLE in use", "AKIAIOSFODNN7EXAMPLE"),
    ("Authorization: Bearer eyJhbGciOi.payload.sig", "eyJhbGciOi.payload.sig"),
    ("Logplex-Drain-Token: d.01234567-89ab-cdef-0123-456789abcdef", "d.01234567-89ab-cdef-0123-456789abcdef"),
    # Webhook URLs whose path is the credential.
    ("POST https://hooks.slack.com/services/T0001/B0002/XXXXsecretXXXX failed", "XXXXsecretXXXX"),
    ("to https://discord.com/api/webhooks/1234/XXXXsecretXXXX?wait=true", "XXXXsecretXXXX"),
    ("to https://acme.webhook.office.com/webhookb2/XXXXsecretXXXX/IncomingWebhook/1", "XXXXsecretXXXX"),
    ("url='https://example.com:8443/webhooks/XXXXsecretXXXX'", "XXXXsecretXXXX"),
])
def test_json_logs_carry_no_secrets(text: str, secret: str) -> None:
    doc = emit(logging.getLogger("test.logs.redact"), "%s", text)
    assert secret not in doc["msg"] and "***" in doc["msg"]


def test_json_logs_keep_what_is_not_secret() -> None:
    text = "table minutely-metrics ready; 12 tokens checked, token_id=tok_42, broker kafka://b1:9092"
    assert emit(logging.getLogger("test.ops.keep"), text)["msg"] == text
    text = "read GET /v1/apps/shop/monitors not forwarded to http://worker-1.workers:6066/v1/apps/shop"
    assert emit(logging.getLogger("test.ops.keep"), text)["msg"] == text


def test_webhook_urls_are_logged_by_origin() -> None:
    assert logs.redact("to https://hooks.slack.com/services/T/B/X.") == "to https://hooks.slack.com/***"
    assert logs.url_origin("https://Hooks.Slack.com/services/T/B/X?x=1#f") == "https://hooks.slack.com"
    assert logs.url_origin("http://u:pw@[2606:4700::1111]:8080/hook") == "http://[2606:4700::1111]:8080"
    assert logs.url_origin("http://127.0.0.1:9/hook") == "http://127.0.0.1:9"
    assert logs.url_origin("http://x.example.com:99999/a") == "<unparsable URL>"
    assert logs.url_origin("ops@example.com") == "ops@example.com"  # an e-mail target is kept


def test_json_logs_redact_exceptions_and_secret_named_extras() -> None:
    logger = logging.getLogger("test.ops.exc")
    try:
        raise ConnectionError("kafka://u:hunter2@b1:9092 refused")
    except ConnectionError:
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logs.JsonFormatter())
        logger.addHandler(handler)
        logger.propagate = False
        try:
            logger.exception("produce failed", extra={"drain_token": "d.abc", "attempt": 2})
        finally:
            logger.removeHandler(handler)
    doc = orjson.loads(stream.getvalue())
    assert "ConnectionError" in doc["exc"] and "hunter2" not in doc["exc"]
    assert doc["drain_token"] == "***" and doc["attempt"] == 2


def test_setup_json_logging_configures_the_root_logger(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logs.setup_json_logging("WARNING")
        logging.getLogger("test.ops.root").warning("disk %s full", "/var/lib/minutely")
        logging.getLogger("test.ops.root").info("not shown")
        out = capsys.readouterr().out.strip().splitlines()
        assert [orjson.loads(line)["msg"] for line in out] == ["disk /var/lib/minutely full"]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_ensure_topics_command_uses_the_bootstrap_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int]] = []

    async def fake_ensure_topics(bootstrap: str, kafka: KafkaSettings) -> list[str]:
        seen.append((bootstrap, kafka.partitions))
        return ["observations"]

    import app.ops.topics

    monkeypatch.setattr(app.ops.topics, "ensure_topics", fake_ensure_topics)
    monkeypatch.setenv("METRICS_BROKER_URL", "kafka://b1:9092;kafka://b2:9092")
    monkeypatch.setenv("METRICS_PARTITIONS", "16")
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        assert topics.main(["ensure-topics"]) == 0
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert seen == [("b1:9092,b2:9092", 16)]


# --- the admin port (security review M2) ----------------------------------------------------------------


async def test_tenant_readyz_says_only_ready_or_not_and_the_admin_port_says_why(aiohttp_client: Any) -> None:
    import aiohttp

    async def dynamo_down() -> None:
        raise StoreUnavailable("DescribeTable on minutely-metrics-tokens failed: http://10.0.0.5:8000",
                               action="check the endpoint")

    down = {"on": True}

    async def flaky() -> None:
        if down["on"]:
            await dynamo_down()

    def extra(a: web.Application) -> None:
        a.router.add_get("/extra", ops.healthz)

    tenant = web.Application()
    admin = ops.add_admin_port(tenant, Settings.of(admin_port=0).ops, counters=Counters(), checks={"dynamodb": flaky},
                               routes=extra)
    tenant[ops.READINESS_KEY].cache_s = 0
    client = await aiohttp_client(tenant)
    r = await client.get("/readyz")
    text = await r.text()
    assert r.status == 503 and orjson.loads(text) == {"status": "not_ready"}
    assert "minutely" not in text and "10.0.0.5" not in text
    for path in ("/metrics", "/extra"):
        assert (await client.get(path)).status == 404
    assert admin.url and admin.url != str(client.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{admin.url}/readyz") as r:
            assert r.status == 503 and "10.0.0.5" in (await r.json())["checks"]["dynamodb"]
        for path in ("/metrics", "/extra", "/healthz"):
            async with s.get(f"{admin.url}{path}") as r:
                assert r.status == 200, path
        down["on"] = False
        async with s.get(f"{admin.url}/readyz") as r:
            assert r.status == 200
    r = await client.get("/readyz")
    assert r.status == 200 and await r.json() == {"status": "ready"}
    await client.close()
    with pytest.raises(aiohttp.ClientConnectionError):  # stopped with the tenant app
        async with aiohttp.ClientSession() as s:
            await s.get(f"{admin.url}/healthz")


async def test_an_admin_port_in_use_is_a_config_error_naming_the_setting() -> None:
    import socket

    from app.errors import ConfigError

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        tenant = web.Application()
        ops.add_admin_port(tenant, Settings.of(admin_port=held.getsockname()[1]).ops, counters=Counters(), checks={})
        with pytest.raises(ConfigError, match="METRICS_ADMIN_PORT"):
            await web.AppRunner(tenant).setup()  # not aiohttp_client: its session would leak when startup fails


def test_an_operators_app_gets_healthz_once() -> None:
    app = web.Application()
    app.router.add_get("/healthz", ops.healthz)
    ops.add_ops_routes(app, counters=Counters(), checks={})  # no second /healthz route
    assert sum(r.canonical == "/healthz" for r in app.router.resources()) == 1

"""A whole store migration on the real stack (app/migration/), as an operator drives it, under live traffic:
Apache Cassandra only -> dual-write to DynamoDB (dynalite) -> shadow 10 %, 100 % -> a divergent item is
caught -> cutover 10 %, 100 % -> rollback to 0 -> cutover 100 % -> finish. Every query on the way answers
200 with the generator's truth; the new store's writer goes down for a while during dual-write and catches
up; a worker and the web process restart mid-way and keep the phase; ``verify`` finds no difference."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from app.cli import start_role, wait_http, worker_env
from app.local.embedded import CassandraServer, DynamoServer, KafkaBroker, free_port
from app.local.traffic import Generator
from app.migration.state import app_bucket
from app.storage.backends import metrics_store
from app.storage.protocol import SUMMARY, MetricItem
from tests.integration.pipeline import ARTIFACTS, CutProxy, LiveTraffic, Pipeline
from tests.integration.test_query_api import create_tokens

pytestmark = pytest.mark.integration

APPS = [f"app-{i}" for i in range(4)]  # app-3 falls in the first 10 % (shadowed and cut over first)
DYNAMO = "dynamodb"


class Stack:
    """The deployment under test: a worker (Cassandra), a web process, later the DynamoDB writer."""

    def __init__(self, broker: KafkaBroker, dynamo: DynamoServer, cassandra: CassandraServer, tmp: Path) -> None:
        self.p = Pipeline(broker, dynamo, tmp, METRICS_STORE="cassandra", METRICS_CASSANDRA_PORT=str(cassandra.port),
                          METRICS_QUERY_SETTLE_S="8", METRICS_QUERY_CACHE_MAX_AGE_S="2",
                          METRICS_BACKOFF_MAX_MS="1000", METRICS_MAX_ATTEMPTS="1")
        self.tmp = tmp
        self.env = worker_env(broker.url, dynamo.endpoint, data_dir=str(tmp / "web"), web_port=free_port(),
                              extra={**self.p.env_overrides, "METRICS_ADMIN_PORT": str(free_port())})
        self.web_port = int(self.env["METRICS_WEB_PORT"])
        self.admin_url = f"http://127.0.0.1:{self.env['METRICS_ADMIN_PORT']}"
        """The web process's operator endpoints (/migration, /v1/stats, the migration page)."""
        self.web: subprocess.Popen[bytes] | None = None
        self.writer: subprocess.Popen[bytes] | None = None
        self.proxy = CutProxy(int(dynamo.endpoint.rsplit(":", 1)[1]))  # the DynamoDB writer's way to dynalite
        self.queries = 0

    def start_web(self) -> None:
        log = ARTIFACTS / f"{self.p.env_overrides['METRICS_APP_ID']}-web.log"
        self.web = start_role("web", self.env, log_path=log)
        wait_http(f"http://127.0.0.1:{self.web_port}/healthz", 60, self.web)

    def stop_web(self) -> None:
        assert self.web is not None
        self.web.terminate()
        self.web.wait(timeout=30)

    def start_writer(self) -> None:
        env = {**self.env, "METRICS_WEB_PORT": str(free_port()), "METRICS_ADMIN_PORT": str(free_port()),
               "METRICS_DATA_DIR": str(self.tmp / "writers"),
               "METRICS_DYNAMODB_ENDPOINT": self.proxy.endpoint}
        log = ARTIFACTS / f"{self.p.env_overrides['METRICS_APP_ID']}-writer.log"
        self.writer = start_role("writer", env, log_path=log, args=("--store", DYNAMO, "-l", "info"))

    def migration(self, *args: str, ok: bool = True) -> str:
        r = subprocess.run([sys.executable, "-m", "app", "migration", *args], env=self.env, capture_output=True,
                           text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
        if (r.returncode == 0) != ok:
            (ARTIFACTS / f"{self.p.env_overrides['METRICS_APP_ID']}-migration-{args[0]}.out").write_text(
                r.stdout + r.stderr)
        assert (r.returncode == 0) == ok, (args, r.returncode, r.stdout[-3000:], r.stderr[-3000:])
        return r.stdout + r.stderr

    def report(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.admin_url}/migration", timeout=10) as r:
            doc: dict[str, Any] = json.load(r)
            return doc

    def counters(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.admin_url}/v1/stats", timeout=10) as r:
            doc: dict[str, int] = json.load(r)["counters"]
            return doc

    def wait_version(self, version: int) -> None:
        """Until the web process follows the state the last command wrote."""
        deadline = time.monotonic() + 15
        while self.report()["state"]["version"] < version:
            assert time.monotonic() < deadline, self.report()["state"]
            time.sleep(0.2)


def ask(s: Stack, tokens: dict[str, str], app: str, since_s: int, until_s: int) -> tuple[dict[str, Any], Any]:
    url = (f"http://127.0.0.1:{s.web_port}/v1/apps/{app}/metrics?process_type=web&resolution=1m"
           f"&since={since_s}&until={until_s}")
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {tokens[app]}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        s.queries += 1
        return json.loads(r.read()), r.headers


def assert_truth(gen: Generator, app: str, doc: dict[str, Any], final: bool) -> None:
    """Final answers equal the generator's truth; a live answer never holds more than happened."""
    truth = gen.truth
    assert truth is not None
    for point in doc["points"]:
        raw = truth.service_ms.get((app, "web", point["ts"] * 1000))
        if raw is None:
            assert not final, point
            continue
        values = np.asarray(raw)
        if not final:
            assert point.get("requests", 0) <= len(values), (app, point)
            continue
        assert point["requests"] == len(values) and point["response_ms"]["max"] == values.max(), (app, point)
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            exact = float(np.quantile(values, q))
            assert abs(point["response_ms"][name] - exact) <= 0.01 * exact, (app, point["ts"], name)


def until(pred: Callable[[], bool], timeout_s: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.5)


def test_a_whole_migration_from_cassandra_to_dynamodb_under_live_traffic(
        broker: KafkaBroker, dynamo: DynamoServer, cassandra: CassandraServer, tmp_path: Path) -> None:
    assert app_bucket("app-3") < 10 <= min(app_bucket(a) for a in APPS[:3])
    s = Stack(broker, dynamo, cassandra, tmp_path)
    p = s.p
    traffic = None
    try:
        # Traffic first: the current minute fills while the worker and the web process start.
        start_ms = int(time.time() * 1000) // 60_000 * 60_000
        gen = Generator(apps=len(APPS), dynos=2, seed=11, start_ms=start_ms, keep_truth=True)
        traffic = LiveTraffic(broker, p.settings.kafka.observations_topic, gen)
        first_s = start_ms // 1000
        p.start(data_dir=tmp_path / "worker")
        s.start_web()
        tokens = create_tokens(p, APPS)  # in Cassandra: `migration start` copies them

        def check_all() -> int:
            """Ask every app for everything so far; returns how many answers were final."""
            finals = 0
            now_s = int(time.time())
            for app in APPS:
                doc, headers = ask(s, tokens, app, first_s, now_s - now_s % 60 + 60)  # with the open minute
                assert_truth(gen, app, doc, headers["X-Final"] == "true")
                closed_s = (now_s - 30) // 60 * 60  # minutes closed and stored by now
                if closed_s <= first_s:
                    continue
                doc, headers = ask(s, tokens, app, first_s, closed_s)
                final = headers["X-Final"] == "true"
                assert_truth(gen, app, doc, final)
                if final:
                    finals += 1
                for lo in range(first_s, now_s - 80, 60):  # closed minutes one by one (final ones exact)
                    doc, headers = ask(s, tokens, app, lo, lo + 60)
                    assert_truth(gen, app, doc, headers["X-Final"] == "true")
            return finals

        # 1. Cassandra only: minutes flow and are final there.
        until(lambda: ask(s, tokens, "app-0", first_s, first_s + 60)[1]["X-Final"] == "true", 150,
              "the first minute final in Cassandra")
        check_all()
        out = s.migration("status")
        assert "single(cassandra:" in out, out

        # 2. Start the move: dual-write. The DynamoDB writer runs in its own consumer group.
        out = s.migration("start", "--to", DYNAMO)
        assert f"copied {len(APPS)} tokens" in out, out
        s.wait_version(1)
        both_since_s = s.report()["state"]["both_since_ms"] // 1000
        s.start_writer()
        # The new store goes down for a while: the Cassandra path goes on, the DynamoDB writer catches up.
        time.sleep(5)
        s.proxy.cut()
        stored_before = p.stats()["sink_items_written"]
        until(lambda: p.stats()["sink_items_written"] > stored_before, 90, "Cassandra written while DynamoDB is down")
        check_all()
        s.proxy.restore()

        # 3. Shadow reads, 10 % then 100 %: no differences on equal data.
        s.migration("shadow", "10")
        s.wait_version(2)
        until(lambda: (ask(s, tokens, "app-3", both_since_s, both_since_s + 120) and
                       s.counters()["shadow_reads"] > 0), 60, "a shadow read of app-3")
        assert s.counters()["shadow_reads"] >= 1
        s.migration("shadow", "100")
        s.wait_version(3)
        # Wait until DynamoDB holds (and has published) minutes past the start, so comparisons cover them.
        until(lambda: check_all() == len(APPS) and s.counters()["shadow_points_compared"] >= 20, 180,
              lambda: f"shadow reads matching: {s.counters()} {s.report()['recent_mismatches'][-5:]}")
        c = s.counters()
        assert sum(c[f"shadow_mismatch_{k}"] for k in ("missing", "extra", "value", "percentile")) == 0, \
            json.dumps(s.report()["recent_mismatches"])

        # 4. A divergent item written straight into DynamoDB is detected, logged and counted.
        detect_divergence(s, tokens, gen, both_since_s)
        check_operator_page(s)

        # 5. Cutover 10 %, then 100 %; a worker and the web process restart mid-way and keep the phase.
        s.migration("cutover", "10")
        s.wait_version(4)
        check_all()
        p.stop()
        p.start(data_dir=tmp_path / "worker")
        s.stop_web()
        s.start_web()
        assert s.report()["state"]["cutover_pct"] == 10 and s.report()["state"]["phase"] == "cutover"
        assert p.get("/migration")["state"]["version"] == 4  # the restarted worker follows the phase too
        check_all()
        s.migration("cutover", "100")
        s.wait_version(5)
        check_all()
        assert s.report()["summary"]["stores"].keys() >= {f"{DYNAMO}:{p.settings.dynamodb.table_name}"}

        # 6. Rollback to 0, then cutover 100 % again.
        s.migration("rollback")
        s.wait_version(6)
        assert s.report()["state"]["phase"] == "shadow"
        check_all()
        s.migration("cutover", "100")
        s.wait_version(7)
        check_all()

        # 7. Finish: refused before the retention has passed since both stores hold every minute; forced here.
        out = s.migration("finish", ok=False)
        assert "ages out at" in out, out
        out = s.migration("finish", "--force")
        assert f"tokens to {DYNAMO}:" in out and "copied " in out, out  # the copy repeated before reads move
        s.wait_version(8)
        assert s.report()["label"] == f"single({DYNAMO}:{p.settings.dynamodb.table_name})"
        until(lambda: check_all() == len(APPS), 60, "final answers from DynamoDB alone")
        out = s.migration("status")
        assert "phase:    single(dynamodb:" in out and "lag" in out, out

        # Both stores hold the same minutes from the start of the move on (the writer caught up).
        out = s.migration("verify", "--since", str(both_since_s), "--until", str(int(time.time())))
        assert f"verified {2 * len(APPS)} series" in out and " 0 differences" in out, out  # web and worker dynos
        assert s.queries > 100, s.queries
    finally:
        if traffic is not None:
            traffic.close()
        for proc in (s.web, s.writer):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
        p.stop()
        s.proxy.close()


def detect_divergence(s: Stack, tokens: dict[str, str], gen: Generator, both_since_s: int) -> None:
    """Raise one point's memory maximum in a block of app-0's worker dynos in DynamoDB, ask for it (a series
    no query read before, so neither store's engine holds it in its cache), and find the difference logged,
    counted and listed; then put the block back (unless the rollup writer rewrote it meanwhile)."""
    import asyncio

    settings = s.p.settings.replace(store=DYNAMO)
    minute_s = both_since_s + 60  # a minute both stores hold, long final

    async def bump() -> tuple[MetricItem, MetricItem]:
        store = metrics_store(settings)
        await store.start()
        try:
            block_start = minute_s - minute_s % 3600
            [item] = await store.query("app-0", "worker", 60, block_start, block_start + 1, SUMMARY)
            lines = item.payload.split(b"\n")
            for i, line in enumerate(lines[1:], 1):
                point = orjson.loads(line)
                if point["ts"] == minute_s:
                    point["memory_mb"]["rss_max"] += 1.0
                    lines[i] = orjson.dumps(point)
            bad = replace(item, payload=b"\n".join(lines), span_s=3600)
            await store.put_many([bad])
            return replace(item, span_s=3600), bad
        finally:
            await store.stop()

    async def restore(good: MetricItem, bad: MetricItem) -> None:
        store = metrics_store(settings)
        await store.start()
        try:
            [now] = await store.query("app-0", "worker", 60, good.ts_s, good.ts_s + 1, SUMMARY)
            if now.payload == bad.payload:
                await store.put_many([good])
        finally:
            await store.stop()

    async def read_point() -> Any:
        store = metrics_store(settings)
        await store.start()
        try:
            [now] = await store.query("app-0", "worker", 60, bad.ts_s, bad.ts_s + 1, SUMMARY)
            return [orjson.loads(x) for x in now.payload.split(b"\n")[1:] if orjson.loads(x)["ts"] == minute_s]
        finally:
            await store.stop()

    async def progress() -> Any:
        from app.ops.kafka import partition_of
        out: dict[str, Any] = {"app-0 partition": partition_of("app-0", settings.kafka.partitions)}
        for st in (settings, s.p.settings):
            store = metrics_store(st)
            await store.start()
            try:
                out[st.storage.backend] = [(pr.partition, pr.stored_through_ms // 1000)
                                           for pr in await store.progress()]
            finally:
                await store.stop()
        return out

    def stored_point() -> Any:
        return asyncio.run(read_point()), asyncio.run(progress()), minute_s

    def stored_in_both() -> bool:
        prog = asyncio.run(progress())
        part = prog["app-0 partition"]
        return all(any(p == part and through_s >= minute_s + 60 for p, through_s in prog[name])
                   for name in ("dynamodb", "cassandra"))

    until(stored_in_both, 120, lambda: f"minute {minute_s} not stored in both: {asyncio.run(progress())}")
    before = s.counters()["shadow_mismatch_value"]
    good, bad = asyncio.run(bump())
    try:
        def caught() -> bool:
            url = (f"http://127.0.0.1:{s.web_port}/v1/apps/app-0/metrics?process_type=worker&resolution=1m"
                   f"&since={minute_s}&until={minute_s + 60}")
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {tokens['app-0']}"})
            with urllib.request.urlopen(req, timeout=10) as r:  # the user's answer: Cassandra's
                served = json.loads(r.read())["points"][0]["memory_mb"]["rss_max"]
            assert served == orjson.loads(next(x for x in good.payload.split(b"\n")[1:]
                                               if orjson.loads(x)["ts"] == minute_s))["memory_mb"]["rss_max"]
            time.sleep(0.5)
            return s.counters()["shadow_mismatch_value"] > before
        until(caught, 60, lambda: f"the divergent point not detected: {s.counters()} {stored_point()} "
                                  f"{s.report()['minutes'][-3:]}")
        recent = [m for m in s.report()["recent_mismatches"] if m["ts"] == minute_s and m["app"] == "app-0"]
        assert recent and recent[0]["field"] == "memory_mb.rss_max", recent
        assert recent[0]["other"] == recent[0]["serving"] + 1.0 and recent[0]["process_type"] == "worker", recent
        assert recent[0]["other_store"].startswith("dynamodb:") and "other_ms" in recent[0]
        assert s.report()["summary"]["mismatched"] >= 1
    finally:
        asyncio.run(restore(good, bad))



def check_operator_page(s: Stack) -> None:
    """The operator page in a real headless Chromium: both stores' latency per minute, the mismatch share,
    and the difference just caught, listed."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from tests.integration.test_dashboard import FLAGS

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    assert chromium and chromedriver, "Debian chromium/chromium-driver missing: `make browser` installs them"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in FLAGS:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=chromedriver))
    try:
        driver.get(f"{s.admin_url}/dashboard/migration.html")  # the operator's page: on the admin port
        plotted = """const c = window.migration && window.migration.charts;
            if (!c || !c.latency || !c.mismatch) return null;
            return {labels: c.latency.series.slice(1).map((x) => x.label),
                    latency: c.latency.data.slice(1).map((ys) => ys.filter((v) => v !== null).length),
                    mismatch: c.mismatch.data[1].filter((v) => v !== null && v > 0).length,
                    rows: document.querySelectorAll('#recent tbody tr').length,
                    text: document.body.innerText};"""

        def ready() -> Any:
            got = driver.execute_script(plotted)
            return got if got and got["rows"] and got["mismatch"] else None
        deadline = time.monotonic() + 30
        got = ready()
        while got is None:
            assert time.monotonic() < deadline, driver.execute_script(plotted)
            time.sleep(0.3)
            got = ready()
        stores = {label.rsplit(" ", 1)[0] for label in got["labels"]}
        assert len(stores) == 2 and any(x.startswith("cassandra:") for x in stores), got["labels"]
        assert all(n > 0 for n in got["latency"]), got
        assert "memory_mb.rss_max" in got["text"] and "shadow" in got["text"].lower()
    finally:
        driver.quit()


def test_start_sets_the_new_writers_offsets_at_the_end_or_with_backfill_at_the_oldest_record(
        broker: KafkaBroker, tmp_path: Path) -> None:
    """What `start` does on Kafka: the new writer's consumer group points at the end of its topics, or with
    --backfill at their oldest records, and the backfill's sync horizon is the oldest minute Kafka holds
    in every partition."""
    import asyncio
    import uuid

    from aiokafka import AIOKafkaConsumer, TopicPartition

    from app.local.traffic import produce
    from app.migration.cli import set_writer_offsets
    from app.migration.state import writer_group
    from app.ops.topics import ensure_topics
    from app.settings import Settings

    uid = uuid.uuid4().hex[:8]
    settings = Settings.from_env({"METRICS_BROKER_URL": broker.url, "METRICS_APP_ID": f"o{uid}",
                                  "METRICS_METRICS_TOPIC": f"m1-{uid}", "METRICS_ALERTS_TOPIC": f"al-{uid}",
                                  "METRICS_AUTOSCALE_TOPIC": f"as-{uid}", "METRICS_PARTITIONS": "2"})
    asyncio.run(ensure_topics(broker.address, settings.kafka))
    minutes = [(f"app-{i}".encode(), orjson.dumps({"app": f"app-{i}", "start_ms": 1_800_000_000_000 + 60_000 * i}))
               for i in range(6)]
    asyncio.run(produce(broker.address, settings.kafka.metrics_topic, minutes))

    async def committed(spec: str) -> dict[int, int | None]:
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.address, group_id=writer_group(settings, spec),
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            return {p: await consumer.committed(TopicPartition(settings.kafka.metrics_topic, p)) for p in range(2)}
        finally:
            await consumer.stop()

    assert asyncio.run(set_writer_offsets(settings, "cassandra", backfill=False)) is None
    at_end = asyncio.run(committed("cassandra"))
    assert sum(o or 0 for o in at_end.values()) == len(minutes)  # nothing before `start` is re-read
    earliest = asyncio.run(set_writer_offsets(settings, "cassandra", backfill=True))
    assert asyncio.run(committed("cassandra")) == {0: 0, 1: 0}  # everything Kafka holds
    # Every minute from the newest of the partitions' first minutes on is in Kafka in both partitions.
    firsts: dict[int, int] = {}
    from app.ops.kafka import partition_of
    for key, value in minutes:
        p = partition_of(key.decode(), 2)
        firsts.setdefault(p, orjson.loads(value)["start_ms"])
    assert earliest == max(firsts.values())


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", "migration", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there


def _fresh_env(broker: KafkaBroker, dynamo: DynamoServer) -> dict[str, str]:
    import os
    import uuid

    uid = uuid.uuid4().hex[:8]
    return {**os.environ, "METRICS_BROKER_URL": broker.url, "METRICS_DYNAMODB_ENDPOINT": dynamo.endpoint,
            "METRICS_APP_ID": f"st{uid}", "METRICS_MIGRATION_TOPIC": f"mig-{uid}", "METRICS_PARTITIONS": "2",
            "METRICS_METRICS_TOPIC": f"m1-{uid}", "METRICS_ALERTS_TOPIC": f"al-{uid}",
            "METRICS_AUTOSCALE_TOPIC": f"as-{uid}", "METRICS_TABLE_NAME": f"st-{uid}",
            "METRICS_CASSANDRA_PORT": str(_closed_port()), "METRICS_ADMIN_PORT": str(_closed_port())}


def test_start_refuses_a_target_store_that_does_not_answer_and_publishes_nothing(
        broker: KafkaBroker, dynamo: DynamoServer) -> None:
    """`make run` on a fresh clone, then `start --to cassandra` with no Cassandra node: a plain refusal that
    says what to run, and the state stays single."""
    env = _fresh_env(broker, dynamo)
    t0 = time.monotonic()
    r = _cli(env, "start", "--to", "cassandra")
    assert r.returncode != 0, r.stdout + r.stderr
    port = env["METRICS_CASSANDRA_PORT"]
    assert f"Cassandra at 127.0.0.1:{port} is not reachable" in r.stderr, r.stderr
    assert "METRICS_LOCAL_CASSANDRA=1 make run" in r.stderr, r.stderr
    assert "nothing was published" in r.stderr and time.monotonic() - t0 < 60
    out = _cli(env, "status")
    assert out.returncode == 0 and "phase:    single(dynamodb:" in out.stdout, out.stdout + out.stderr


def test_status_reports_what_the_stores_hold_and_whether_the_writers_ran(
        broker: KafkaBroker, dynamo: DynamoServer) -> None:
    """No worker or writer runs here: status says so, instead of "lag 0" and "both stores hold every minute";
    then the stores' own watermarks (the target's behind the source's) are what it reports."""
    import asyncio

    from app.migration.control import publish, read_state
    from app.ops.topics import ensure_topics
    from app.settings import Settings
    from app.storage.protocol import Progress

    env = _fresh_env(broker, dynamo)
    settings = Settings.from_env(env)
    asyncio.run(ensure_topics(broker.address, settings.kafka))
    target = f"dynamodb:{settings.dynamodb.table_name}-v2"
    r = _cli(env, "start", "--to", target)
    assert r.returncode == 0, r.stdout + r.stderr
    out = _cli(env, "status").stdout
    writers = [line for line in out.splitlines() if line.startswith("writer:")]
    assert len(writers) == 2 and all("never ran" in w for w in writers), out
    assert "lag 0" not in out and "both stores hold" not in out and f"not yet: {target} holds no minute" in out, out
    assert out.count("holds nothing yet") == 2, out

    # The stores' own watermarks: the target stored through 3 minutes less than the source.
    st = asyncio.run(read_state(settings))
    since_ms = st.both_since_ms

    async def stored(spec: str, through_ms: int) -> None:
        from app.migration.state import store_settings

        store = metrics_store(store_settings(settings, spec))
        await store.start()
        try:
            await store.put_progress([Progress(p, through_ms, int(time.time() * 1000), {}) for p in range(2)])
        finally:
            await store.stop()

    asyncio.run(stored(st.source, since_ms + 300_000))
    asyncio.run(stored(target, since_ms + 120_000))
    out = _cli(env, "status").stdout
    assert "both stores hold every minute from" in out and f"{target} is 180 s behind {st.source}" in out, out
    assert out.count("stored through") == 2, out

    # A state naming a store nobody can reach (as `start` published before it probed): unreachable, not in sync.
    asyncio.run(publish(settings, replace(st, target="cassandra:minutely", version=st.version + 1)))
    out = _cli(env, "status").stdout
    port = env["METRICS_CASSANDRA_PORT"]
    assert f"unreachable: Cassandra at 127.0.0.1:{port} did not answer" in out, out
    assert "both stores hold" not in out and "cannot be read" in out, out
    cassandra_writer = next(line for line in out.splitlines() if line.startswith("writer:") and "cassandra" in line)
    assert "never ran" in cassandra_writer, out

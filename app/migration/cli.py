"""``python -m app migration status | start --to <store> [--backfill] | shadow N [--aa] | cutover N |
rollback | finish [--force] | verify --since S --until S [--app APP]``.

Each command reads the state from Kafka, checks the transition (app/migration/state.py), sets what the new
phase needs (the new writer's offsets, the token copy), and appends the next state; every process follows
within about a second. ``start`` first checks that the new store answers a write and a read, and publishes
nothing when it does not. ``status`` says what each store holds (its own stored-through watermark, read from
it) and whether each writer runs (its consumer group's members and lag in Kafka), and, from the processes that
answer queries (``--web``: their admin ports, default this machine's worker's), the last hour's mismatch rate
and both stores' read p50/p99.
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import click
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from app.clock import SystemClock
from app.errors import PipelineError, RetriableError
from app.migration import state as sm
from app.migration.compare import compare_bodies
from app.migration.control import publish, read_state
from app.ops import kafka
from app.settings import Settings
from app.storage.backends import backend, metrics_store, token_table
from app.storage.protocol import TokenInfo

START_MARK = "set by migration start"
"""The metadata ``start`` commits the new writer's offsets with. A writer commits its own (Faust: no
metadata), so offsets still carrying this mark mean the writer never consumed anything."""
PROBE_TIMEOUT_S = 15.0
"""How long ``start`` waits for the new store to answer its probe write and read."""
PROBE_KEY = "migration-probe"
"""The token key of the probe (not a hex SHA-256, so no token can ever verify against it)."""
GROUP_WAIT_S = 15.0
"""How long ``status`` retries Kafka's group coordinator (a fresh broker loads it for a few seconds)."""
STORE_TIMEOUT_S = 10.0
"""How long ``status`` waits for a store's watermark."""


def _writer_topics(settings: Settings) -> list[str]:
    """What a store's writer consumes (its progress follows checkpoints_topic, read from the start)."""
    return [settings.kafka.metrics_topic, settings.kafka.alerts_topic, settings.kafka.autoscale_topic]


def group_of(settings: Settings, spec: str) -> str:
    """The consumer group writing ``spec``: the aggregating workers' for their own store, else a writer's."""
    return settings.kafka.app_id if spec == sm.home_spec(settings) else sm.writer_group(settings, spec)


def _partitions(settings: Settings, topics: list[str]) -> list[TopicPartition]:
    """The pipeline's topics all have ``METRICS_PARTITIONS`` partitions (app/ops/topics.py)."""
    return [TopicPartition(t, p) for t in topics for p in range(settings.kafka.partitions)]


async def set_writer_offsets(settings: Settings, spec: str, *, backfill: bool) -> int | None:
    """Point the writer group of ``spec`` at the end of its topics (or, with ``backfill``, their oldest
    records). Returns, for a backfill, from when ``metrics-1m`` holds every minute (ms), else None."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap(settings.kafka),
                                group_id=sm.writer_group(settings, spec), enable_auto_commit=False,
                                **kafka.client_kwargs(settings.kafka))
    await consumer.start()
    try:
        tps = _partitions(settings, _writer_topics(settings))
        consumer.assign(tps)
        offsets = await (consumer.beginning_offsets(tps) if backfill else consumer.end_offsets(tps))
        await consumer.commit({tp: OffsetAndMetadata(o, START_MARK) for tp, o in offsets.items()})
        if not backfill:
            return None
        # Per partition, the first retained minute; every minute after the newest of those is in Kafka.
        earliest = 0
        for tp in (tp for tp in tps if tp.topic == settings.kafka.metrics_topic):
            consumer.seek(tp, offsets[tp])
            batch = await consumer.getmany(tp, timeout_ms=2000, max_records=1)
            for rec in batch.get(tp, []):
                earliest = max(earliest, int(orjson.loads(rec.value)["start_ms"]))
        return earliest or None
    finally:
        await consumer.stop()


@dataclass(frozen=True, slots=True)
class WriterView:
    """What Kafka says of the writer of one store: its consumer group's members and committed offsets."""

    spec: str
    group: str
    members: int
    """Processes in the group now (0: none runs)."""
    consumed: bool
    """Whether the group ever committed offsets of its own (not only the ones ``start`` set)."""
    lag: int | None
    """``metrics-1m`` records past its committed offsets; None: nothing committed."""


@dataclass(frozen=True, slots=True)
class StoreView:
    """What one store holds, from its own stored-through watermarks (agents/progress.py writes them)."""

    spec: str
    through_ms: int | None
    """The minutes of every partition with a watermark are stored up to here (the lowest one's); None: no
    watermark at all. A partition no minute was ever stored in has none: an app-less partition is idle."""
    partitions: int
    """Partitions with a watermark."""
    updated_ms: int = 0
    """Wall clock of the newest watermark write."""
    error: str = ""
    """Why the store could not be read ("" when it could)."""
    watermarks: dict[int, int] = field(default_factory=dict)
    """partition -> stored_through_ms, as read (status compares the stores partition by partition)."""


async def writer_view(settings: Settings, spec: str) -> WriterView:
    group = group_of(settings, spec)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap(settings.kafka),
                                **kafka.client_kwargs(settings.kafka))
    await admin.start()
    deadline = time.monotonic() + GROUP_WAIT_S
    try:
        while True:
            try:
                [response] = await admin.describe_consumer_groups([group])
                tps = _partitions(settings, [settings.kafka.metrics_topic])
                offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
                break
            except KafkaError as exc:  # a fresh broker's coordinator is still loading
                if not exc.retriable or time.monotonic() > deadline:
                    raise RetriableError(f"Kafka did not describe consumer group {group}: {exc!r}",
                                         action="check that Kafka is reachable and run the command again") from exc
                await asyncio.sleep(0.5)
    finally:
        await admin.close()
    # (error_code, group_id, state, protocol_type, protocol, members, ...): DescribeGroupsResponse
    members = sum(len(g[5]) for g in response.groups if g[1] == group)
    committed = {tp: om for tp, om in offsets.items() if om.offset >= 0}
    lag: int | None = None
    if committed:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap(settings.kafka), enable_auto_commit=False,
                                    **kafka.client_kwargs(settings.kafka))
        await consumer.start()
        try:
            ends = await consumer.end_offsets(list(committed))
        finally:
            await consumer.stop()
        lag = sum(max(0, ends[tp] - om.offset) for tp, om in committed.items())
    consumed = any(om.metadata != START_MARK for om in committed.values())
    return WriterView(spec, group, members, consumed, lag)


async def store_view(settings: Settings, spec: str, *, timeout_s: float = STORE_TIMEOUT_S) -> StoreView:
    """The store's own watermarks, read from it (never inferred from the state or from Kafka)."""
    store = metrics_store(sm.store_settings(settings, spec))
    try:
        async with asyncio.timeout(timeout_s):
            await store.start()
            progress = await store.progress()
    except (PipelineError, TimeoutError) as exc:
        target = sm.store_settings(settings, spec)
        where = backend(target.storage.backend).where(target)
        return StoreView(spec, None, 0, error=f"{where} did not answer: {exc or type(exc).__name__}")
    finally:
        await store.stop()
    covered = {p.partition: p for p in progress if p.partition < settings.kafka.partitions}
    through = min((p.stored_through_ms for p in covered.values()), default=None)
    return StoreView(spec, through, len(covered), max((p.updated_ms for p in covered.values()), default=0),
                     watermarks={n: p.stored_through_ms for n, p in covered.items()})


def _lacking(stores: dict[str, StoreView]) -> dict[str, list[int]]:
    """Per store, the partitions another store has minutes in but it has no watermark for: those minutes
    it cannot be said to hold (a partition no store has minutes in is idle, not missing)."""
    seen = {n for v in stores.values() if not v.error for n in v.watermarks}
    return {spec: sorted(seen - v.watermarks.keys()) for spec, v in stores.items()
            if not v.error and v.watermarks.keys() != seen and (v.watermarks or v.through_ms is None)}


def _ago(now_ms: int, ms: int) -> str:
    return f"{max(0, now_ms - ms) / 1000:.0f} s ago"


def describe(st: sm.MigrationState, settings: Settings, writers: list[WriterView], stores: dict[str, StoreView],
             *, now_ms: int) -> list[str]:
    """``status``'s lines on the writers, what each store holds, and the sync horizon: each from what Kafka
    and the stores report, never from the state alone (a writer that never ran has no lag, it never ran)."""
    out: list[str] = []
    for w in writers:
        if w.members:
            run = f"running ({w.members} member{'s' if w.members > 1 else ''}), lag " + (
                f"{w.lag} records" if w.lag is not None else "unknown (nothing committed yet)")
        elif not w.consumed:
            how = ("the aggregating workers, `python -m app worker`" if w.spec == sm.home_spec(settings) else
                   f"`python -m app writer --store {w.spec}`; `make run` starts it")
            run = f"never ran: no process has consumed in this group (run {how})"
        else:
            run = f"not running (no member in the group); {w.lag} records behind"
        out.append(f"writer:   {w.spec:<32} group {w.group:<40} {run}")
    lacking = _lacking(stores)
    # A store lacking a partition the other has minutes in cannot be said to hold anything through a time.
    shown = {spec: replace(v, through_ms=None) if lacking.get(spec) and v.through_ms is not None else v
             for spec, v in stores.items()}
    for spec, v in stores.items():
        if v.error:
            held = f"unreachable: {v.error}"
        elif v.through_ms is None:
            held = "holds nothing yet (no stored-through watermark)"
        elif lacking.get(spec):
            held = (f"watermarks in {v.partitions} of {settings.kafka.partitions} partitions only: none for "
                    f"partition {', '.join(map(str, lacking[spec]))}, which the other store has minutes in")
        else:
            idle = settings.kafka.partitions - v.partitions
            held = f"stored through {sm.iso(v.through_ms)} (updated {_ago(now_ms, v.updated_ms)})" + (
                f"; {idle} of {settings.kafka.partitions} partitions have had no minute yet" if idle else "")
        out.append(f"store:    {spec:<32} {held}")
    if st.phase == "single":
        return out
    source, target = shown.get(st.source), shown.get(st.target)
    in_sync = sm.in_sync_at_ms(st, settings)
    if target is None or target.through_ms is None or target.through_ms <= st.both_since_ms:
        why = "it cannot be read" if target is not None and target.error else "its writer must run and catch up"
        out.append(f"in sync:  not yet: {st.target} holds no minute since {sm.iso(st.both_since_ms)} ({why}); "
                   f"until it does, everything is only in {st.source}")
        return out
    both_ms = target.through_ms if source is None or source.through_ms is None else min(
        target.through_ms, source.through_ms)
    behind = ""
    if source is not None and source.through_ms is not None and source.through_ms > target.through_ms:
        behind = f"; {st.target} is {(source.through_ms - target.through_ms) / 1000:.0f} s behind {st.source}"
    out.append(f"in sync:  both stores hold every minute from {sm.iso(st.both_since_ms)} to {sm.iso(both_ms)}{behind}; "
               f"older data is only in {st.source} and ages out at {sm.iso(in_sync)}"
               + (" (reached: finish allowed)" if now_ms >= in_sync else " (finish refused before then)"))
    return out


async def probe(settings: Settings, spec: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """A write and a read through the protocols on the store ``spec`` names (a revoked token under a key no
    token hashes to, deleted again, and the watermarks), within ``timeout_s``; PipelineError saying where
    and what to do otherwise."""
    target = sm.store_settings(settings, spec)
    b = backend(target.storage.backend)
    store, tokens = b.store(target, None, None), b.tokens(target)
    try:
        async with asyncio.timeout(timeout_s):
            await store.start()
            await tokens.start()
            await store.ping()
            await store.progress()
            now_s = SystemClock().now_ms() // 1000
            await tokens.put_token(PROBE_KEY, TokenInfo(PROBE_KEY, "", "probe", now_s, revoked_s=now_s))
            if await tokens.get_token(PROBE_KEY) is None:
                raise PipelineError(f"{spec} did not return the probe it just stored",
                                    action="check the store's consistency settings")
            await tokens.delete_token(PROBE_KEY)
    except (PipelineError, TimeoutError) as exc:
        reason = str(exc) or f"no answer within {timeout_s:g} s"
        raise PipelineError(f"{b.where(target)} is not reachable or not writable ({spec}): {reason}; nothing "
                            "was published, the migration has not started", action=b.reach_action) from exc
    finally:
        await tokens.stop()
        await store.stop()


async def copy_tokens(settings: Settings, source: str, target: str) -> int:
    """Copy every token to the new store (idempotent); afterwards both are kept in step by the processes."""
    src = token_table(sm.store_settings(settings, source))
    dst = token_table(sm.store_settings(settings, target))
    await src.start()
    await dst.start()
    try:
        rows = await src.all_tokens()
        for key, info in rows:
            await dst.put_token(key, info)
        return len(rows)
    finally:
        await dst.stop()
        await src.stop()


async def copy_tokens_patiently(settings: Settings, st: sm.MigrationState, *, wait_s: float = 180.0) -> int:
    """:func:`copy_tokens`, retried while the new store is unreachable (it may be starting)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await copy_tokens(settings, st.source, st.target)
        except PipelineError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise PipelineError(f"tokens not copied to {st.target}: {exc}",
                                    action="when the store answers, run `python -m app migration copy-tokens`"
                                    ) from exc
            print(f"waiting for {st.target} to copy the tokens ({type(exc).__name__})", file=sys.stderr)
            await asyncio.sleep(5)


def _fetch_reports(urls: list[str]) -> list[dict[str, Any]]:
    out = []
    for url in urls:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/migration", timeout=5) as r:
                out.append(orjson.loads(r.read()))
        except OSError as exc:
            print(f"  (no report from {url}: {exc})")
    return out


def _ms(v: float) -> str:
    return f"{v:.1f} ms"


async def status(settings: Settings, web: list[str]) -> int:
    st = await read_state(settings)
    now_ms = SystemClock().now_ms()
    print(f"phase:    {st.label}  (version {st.version}"
          + (f", since {sm.iso(st.updated_ms)})" if st.updated_ms else ")"))
    specs = list(dict.fromkeys([*st.writes, *([st.target] if st.target else [])]))
    writers = [await writer_view(settings, spec) for spec in st.writes]
    stores = {spec: await store_view(settings, spec) for spec in specs}
    for line in describe(st, settings, writers, stores, now_ms=now_ms):
        print(line)
    reports = _fetch_reports(web)
    for rep in reports:
        s = rep["summary"]
        rate = "n/a" if s["mismatch_rate"] is None else f"{100 * s['mismatch_rate']:.2f} %"
        print(f"shadow:   last hour {s['shadows']} compared, {s['mismatched']} differed ({rate}), "
              f"{s['failed']} failed or timed out, {s['incomparable']} with nothing final in both stores yet "
              f"(minutes are final after METRICS_QUERY_SETTLE_S={settings.query.settle_s:g} s and both "
              f"watermarks)")
        for spec, v in s["stores"].items():
            print(f"reads:    {spec:<32} p50 {_ms(v['p50_ms'])}  p99 {_ms(v['p99_ms'])}  ({v['n']} reads)")
    return 0


async def verify(settings: Settings, since_s: int, until_s: int, app: str | None,
                 resolutions: list[int]) -> int:
    """Compare every series over ``[since_s, until_s)`` in both stores; exit 1 on any difference."""
    from app.api.query import MetricsQuery

    st = await read_state(settings)
    if not st.target:
        print(f"no second store to compare with ({st.label})", file=sys.stderr)
        return 2
    stores = [metrics_store(sm.store_settings(settings, spec)) for spec in (st.source, st.target)]
    for s in stores:
        await s.start()
    try:
        engines = [MetricsQuery(s, settings=settings) for s in stores]
        series = sorted(set(await stores[0].series()) | set(await stores[1].series()))
        if app is not None:
            series = [x for x in series if x[0] == app]
        differences = compared = 0
        for a, proc in series:
            for res in resolutions:
                answers = [await e.answer(a, proc, res, since_s, until_s) for e in engines]
                cutoff = min(until_s, *(ans.final_until_s for ans in answers))  # final in both stores
                # Buckets that start before ``since_s`` hold minutes outside the range: not compared.
                result = compare_bodies(answers[0].body, answers[1].body, resolution_s=res, cutoff_s=cutoff,
                                        since_s=since_s)
                compared += result.points
                for d in result.mismatches:
                    differences += 1
                    print(orjson.dumps({"app": a, "process_type": proc, "resolution_s": res, "ts": d.ts_s,
                                        "kind": d.kind, "field": d.field, st.source: d.serving,
                                        st.target: d.other}).decode())
        print(f"verified {len(series)} series x {len(resolutions)} resolutions over "
              f"{sm.iso(since_s * 1000)} .. {sm.iso(until_s * 1000)}: {compared} points compared, "
              f"{differences} differences ({st.source} vs {st.target})", file=sys.stderr)
        if not compared:
            print("nothing to compare: no minute of the range is final in both stores yet (the settle time, "
                  "METRICS_QUERY_SETTLE_S, and both stores' watermarks)", file=sys.stderr)
            return 1
        return 1 if differences else 0
    finally:
        for s in stores:
            await s.stop()


async def copy_tokens_again(settings: Settings) -> int:
    """``copy-tokens``: every token to the new store again (idempotent)."""
    st = await read_state(settings)
    if not st.target:
        print(f"no migration under way ({st.label})", file=sys.stderr)
        return 2
    print(f"copied {await copy_tokens_patiently(settings, st)} tokens to {st.target}")
    return 0


async def start(settings: Settings, to: str, *, backfill: bool) -> int:
    """``start --to <store>``: dual writes, once the new store answered a probe."""
    st = await read_state(settings)
    now_ms = SystemClock().now_ms()
    nxt = sm.start(st, settings, to, backfill=backfill, now_ms=now_ms)
    await probe(settings, nxt.target)  # before anything changes: no dual-write to a store that is not there
    earliest = await set_writer_offsets(settings, nxt.target, backfill=backfill)
    if backfill:
        nxt = sm.start(st, settings, to, backfill=True, now_ms=now_ms, earliest_ms=earliest)
    # Published first: from then on every process creates and revokes tokens in both stores, so the copy
    # below is complete (it retries for a while should the store, which answered the probe, fail now).
    await publish(settings, nxt)
    print(f"{st.label}  ->  {nxt.label}  (version {nxt.version}); the writer's group "
          f"{sm.writer_group(settings, nxt.target)} starts at the "
          + ("oldest retained records" if backfill else "current end"))
    print(f"copied {await copy_tokens_patiently(settings, nxt)} tokens to {nxt.target}")
    return 0


Transition = Callable[[sm.MigrationState, int], sm.MigrationState]
"""The next state from the current one and the time (ms); raises MigrationError when refused."""


async def step(settings: Settings, transition: Transition) -> int:
    """``shadow``, ``cutover``, ``rollback``: publish the state ``transition`` makes of the current one."""
    st = await read_state(settings)
    nxt = transition(st, SystemClock().now_ms())
    await publish(settings, nxt)
    print(f"{st.label}  ->  {nxt.label}  (version {nxt.version})")
    return 0


async def finish(settings: Settings, *, force: bool) -> int:
    """``finish``: single(new store), after copying the tokens again."""
    st = await read_state(settings)
    nxt = sm.finish(st, settings, now_ms=SystemClock().now_ms(), force=force)
    # Reads move to the new store alone with this state. A revocation that reached only the old one (its
    # tombstone written while the new store was unreachable: app/migration/tables.py) counts until now
    # because a tombstone in any store wins; after it, only the new store is read. So the copy runs
    # again first (idempotent; tombstones included, and a live copy never undoes one), and a failure
    # refuses the finish instead of publishing it.
    print(f"copied {await copy_tokens_patiently(settings, st)} tokens to {st.target} (tombstones included)")
    await publish(settings, nxt)
    print(f"{st.label}  ->  {nxt.label}  (version {nxt.version})")
    return 0


def _run(work: Callable[[Settings], Coroutine[Any, Any, int]]) -> NoReturn:
    """Exit with ``work``'s code; 2, with the reason, when the transition is refused or a part is missing."""
    settings = Settings.from_env()
    try:
        code = asyncio.run(work(settings))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    click.get_current_context().exit(code)


@click.group("migration")
def migration() -> None:
    """Move between stores without downtime (docs/operations/migration.md).

    Each command reads the state from Kafka, checks the transition, sets what the new phase needs and appends
    the next state; every process follows within about a second.
    """


@migration.command("status")
@click.option("--web", multiple=True, help="the admin port of a process answering queries (repeatable; "
                                           "/migration is served there only); default: this machine's worker's, "
                                           "METRICS_ADMIN_PORT")
def status_command(web: tuple[str, ...]) -> None:
    """Phase, writers' lag, sync horizon, mismatch rate, both stores' latency."""
    _run(lambda s: status(s, list(web) or [f"http://127.0.0.1:{s.ops.admin_port}"]))


@migration.command("start")
@click.option("--to", "to", required=True, help="dynamodb | cassandra, optionally :<table> / :<keyspace>")
@click.option("--backfill", is_flag=True, help="the new writer starts at the oldest retained records")
def start_command(to: str, backfill: bool) -> None:
    """Dual-write: start writing the new store."""
    _run(lambda s: start(s, to, backfill=backfill))


@migration.command("shadow")
@click.argument("pct", type=int)
@click.option("--aa", is_flag=True, help="A/A: compare with the serving store itself (noise floor)")
def shadow_command(pct: int, aa: bool) -> None:
    """Compare PCT % of apps' reads with the other store."""
    _run(lambda s: step(s, lambda st, now_ms: sm.shadow(st, pct, aa=aa, now_ms=now_ms)))


@migration.command("cutover")
@click.argument("pct", type=int)
def cutover_command(pct: int) -> None:
    """Serve PCT % of apps from the new store."""
    _run(lambda s: step(s, lambda st, now_ms: sm.cutover(st, pct, now_ms=now_ms)))


@migration.command("rollback")
def rollback_command() -> None:
    """One phase back."""
    _run(lambda s: step(s, lambda st, now_ms: sm.rollback(st, now_ms=now_ms)))


@migration.command("copy-tokens")
def copy_tokens_command() -> None:
    """Copy every token to the new store again (idempotent)."""
    _run(copy_tokens_again)


@migration.command("finish")
@click.option("--force", is_flag=True, help="before both stores hold the whole retention")
def finish_command(force: bool) -> None:
    """Single(new store), after copying the tokens (revocations included) again; refused before both hold the
    whole retention."""
    _run(lambda s: finish(s, force=force))


@migration.command("verify")
@click.option("--since", type=int, required=True, help="epoch seconds")
@click.option("--until", type=int, required=True, help="epoch seconds")
@click.option("--app", "app", default=None)
@click.option("--resolution", type=int, multiple=True, help="seconds (repeatable); default 60 and 3600")
def verify_command(since: int, until: int, app: str | None, resolution: tuple[int, ...]) -> None:
    """Compare every series over a range in both stores (exit 1 on differences)."""
    _run(lambda s: verify(s, since, until, app, list(resolution) or [60, 3600]))

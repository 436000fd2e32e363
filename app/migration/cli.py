"""``python -m app migration status | start --to <store> [--backfill] | shadow N [--aa] | cutover N |
rollback | finish [--force] | verify --since S --until S [--app APP]``.

Each command reads the state from Kafka, checks the transition (app/migration/state.py), sets what the new
phase needs (the new writer's offsets, the token copy), and appends the next state; every process follows
within about a second. ``status`` also shows both writers' lag, and, from the processes that answer queries
(``--web``: their admin ports, default this machine's worker's), the last hour's mismatch rate and both stores' read p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import urllib.request
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from app.clock import SystemClock
from app.errors import PipelineError
from app.migration import state as sm
from app.migration.compare import compare_bodies
from app.migration.control import publish, read_state
from app.ops import kafka
from app.settings import Settings


def _writer_topics(settings: Settings) -> list[str]:
    """What a store's writer consumes (its progress follows checkpoints_topic, read from the start)."""
    return [settings.metrics_topic, settings.alerts_topic, settings.autoscale_topic]


def group_of(settings: Settings, spec: str) -> str:
    """The consumer group writing ``spec``: the aggregating workers' for their own store, else a writer's."""
    return settings.app_id if spec == sm.home_spec(settings) else sm.writer_group(settings, spec)


def _partitions(settings: Settings, topics: list[str]) -> list[TopicPartition]:
    """The pipeline's topics all have ``METRICS_PARTITIONS`` partitions (app/ops/topics.py)."""
    return [TopicPartition(t, p) for t in topics for p in range(settings.partitions)]


async def set_writer_offsets(settings: Settings, spec: str, *, backfill: bool) -> int | None:
    """Point the writer group of ``spec`` at the end of its topics (or, with ``backfill``, their oldest
    records). Returns, for a backfill, from when ``metrics-1m`` holds every minute (ms), else None."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap(settings), group_id=sm.writer_group(settings, spec),
                                enable_auto_commit=False, **kafka.client_kwargs(settings))
    await consumer.start()
    try:
        tps = _partitions(settings, _writer_topics(settings))
        consumer.assign(tps)
        offsets = await (consumer.beginning_offsets(tps) if backfill else consumer.end_offsets(tps))
        await consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
        if not backfill:
            return None
        # Per partition, the first retained minute; every minute after the newest of those is in Kafka.
        earliest = 0
        for tp in (tp for tp in tps if tp.topic == settings.metrics_topic):
            consumer.seek(tp, offsets[tp])
            batch = await consumer.getmany(tp, timeout_ms=2000, max_records=1)
            for rec in batch.get(tp, []):
                earliest = max(earliest, int(orjson.loads(rec.value)["start_ms"]))
        return earliest or None
    finally:
        await consumer.stop()


async def writer_lag(settings: Settings, spec: str) -> int | None:
    """Records of ``metrics-1m`` the writer of ``spec`` has not committed; None when it never committed."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap(settings), group_id=group_of(settings, spec),
                                enable_auto_commit=False, **kafka.client_kwargs(settings))
    await consumer.start()
    try:
        tps = _partitions(settings, [settings.metrics_topic])
        ends = await consumer.end_offsets(tps)
        lag, known = 0, False
        for tp in tps:
            committed = await consumer.committed(tp)
            if committed is not None:
                known = True
                lag += max(0, ends[tp] - committed)
        return lag if known else None
    finally:
        await consumer.stop()


async def copy_tokens(settings: Settings, source: str, target: str) -> int:
    """Copy every token to the new store (idempotent); afterwards both are kept in step by the processes."""
    from app.storage.backends import token_table

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
    for spec in st.writes:
        lag = await writer_lag(settings, spec)
        print(f"writer:   {spec:<32} group {group_of(settings, spec):<40} lag "
              + ("never committed" if lag is None else f"{lag} records"))
    if st.phase != "single":
        in_sync = sm.in_sync_at_ms(st, settings)
        print(f"in sync:  both stores hold every minute since {sm.iso(st.both_since_ms)}; older data is only in "
              f"{st.source} and ages out at {sm.iso(in_sync)}"
              + (" (reached: finish allowed)" if now_ms >= in_sync else " (finish refused before then)"))
    reports = _fetch_reports(web)
    for rep in reports:
        s = rep["summary"]
        rate = "n/a" if s["mismatch_rate"] is None else f"{100 * s['mismatch_rate']:.2f} %"
        print(f"shadow:   last hour {s['shadows']} compared, {s['mismatched']} differed ({rate}), "
              f"{s['failed']} failed or timed out, {s['incomparable']} with nothing final in both stores yet "
              f"(minutes are final after METRICS_QUERY_SETTLE_S={settings.query_settle_s:g} s and both "
              f"watermarks)")
        for spec, v in s["stores"].items():
            print(f"reads:    {spec:<32} p50 {_ms(v['p50_ms'])}  p99 {_ms(v['p99_ms'])}  ({v['n']} reads)")
    return 0


async def verify(settings: Settings, since_s: int, until_s: int, app: str | None,
                 resolutions: list[int]) -> int:
    """Compare every series over ``[since_s, until_s)`` in both stores; exit 1 on any difference."""
    from app.api.query import MetricsQuery
    from app.storage.backends import metrics_store

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


async def change(settings: Settings, args: argparse.Namespace) -> int:
    st = await read_state(settings)
    now_ms = SystemClock().now_ms()
    if args.cmd == "copy-tokens":
        if not st.target:
            print(f"no migration under way ({st.label})", file=sys.stderr)
            return 2
        print(f"copied {await copy_tokens_patiently(settings, st)} tokens to {st.target}")
        return 0
    if args.cmd == "start":
        nxt = sm.start(st, settings, args.to, backfill=args.backfill, now_ms=now_ms)
        earliest = await set_writer_offsets(settings, nxt.target, backfill=args.backfill)
        if args.backfill:
            nxt = sm.start(st, settings, args.to, backfill=True, now_ms=now_ms, earliest_ms=earliest)
        # Published first: from then on every process creates and revokes tokens in both stores, so the copy
        # below (which may wait for the new store to come up: `make run` starts it on this state) is complete.
        await publish(settings, nxt)
        print(f"{st.label}  ->  {nxt.label}  (version {nxt.version}); the writer's group "
              f"{sm.writer_group(settings, nxt.target)} starts at the "
              + ("oldest retained records" if args.backfill else "current end"))
        print(f"copied {await copy_tokens_patiently(settings, nxt)} tokens to {nxt.target}")
        return 0
    elif args.cmd == "shadow":
        nxt = sm.shadow(st, args.pct, aa=args.aa, now_ms=now_ms)
    elif args.cmd == "cutover":
        nxt = sm.cutover(st, args.pct, now_ms=now_ms)
    elif args.cmd == "rollback":
        nxt = sm.rollback(st, now_ms=now_ms)
    else:
        nxt = sm.finish(st, settings, now_ms=now_ms, force=args.force)
        # Reads move to the new store alone with this state. A revocation that reached only the old one (its
        # tombstone written while the new store was unreachable: app/migration/tables.py) counts until now
        # because a tombstone in any store wins; after it, only the new store is read. So the copy runs
        # again first (idempotent; tombstones included, and a live copy never undoes one), and a failure
        # refuses the finish instead of publishing it.
        print(f"copied {await copy_tokens_patiently(settings, st)} tokens to {st.target} (tombstones included)")
    await publish(settings, nxt)
    print(f"{st.label}  ->  {nxt.label}  (version {nxt.version})")
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m app migration", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("status", help="phase, writers' lag, sync horizon, mismatch rate, both stores' latency")
    p.add_argument("--web", action="append", help="the admin port of a process answering queries (repeatable; "
                                                  "/migration is served there only); default: this machine's "
                                                  "worker's, METRICS_ADMIN_PORT")
    p = sub.add_parser("start", help="dual-write: start writing the new store")
    p.add_argument("--to", required=True, help="dynamodb | cassandra, optionally :<table> / :<keyspace>")
    p.add_argument("--backfill", action="store_true", help="the new writer starts at the oldest retained records")
    p = sub.add_parser("shadow", help="compare N %% of apps' reads with the other store")
    p.add_argument("pct", type=int)
    p.add_argument("--aa", action="store_true", help="A/A: compare with the serving store itself (noise floor)")
    p = sub.add_parser("cutover", help="serve N %% of apps from the new store")
    p.add_argument("pct", type=int)
    sub.add_parser("rollback", help="one phase back")
    sub.add_parser("copy-tokens", help="copy every token to the new store again (idempotent)")
    p = sub.add_parser("finish", help="single(new store), after copying the tokens (revocations included) again; "
                                      "refused before both hold the whole retention")
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("verify", help="compare every series over a range in both stores (exit 1 on differences)")
    p.add_argument("--since", type=int, required=True, help="epoch seconds")
    p.add_argument("--until", type=int, required=True, help="epoch seconds")
    p.add_argument("--app")
    p.add_argument("--resolution", action="append", type=int, help="seconds (repeatable); default 60 and 3600")
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    try:
        if args.cmd == "status":
            return asyncio.run(status(settings, args.web or [f"http://127.0.0.1:{settings.admin_port}"]))
        if args.cmd == "verify":
            return asyncio.run(verify(settings, args.since, args.until, args.app, args.resolution or [60, 3600]))
        return asyncio.run(change(settings, args))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

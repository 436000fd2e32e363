"""The ingest at twice its capacity (docs/reliability.md): an ingest process on the real stack is measured
(closed loop, Logplex frames), then sent frames at twice that rate, open loop, as a fleet of drains would.
It answers 2xx or a clean 503 with Retry-After, never anything else; its memory stays bounded; every frame
answered 2xx, and every 503'd frame retried afterwards with its Frame-Id (as Logplex does), is counted
exactly once in the stored minutes. ``MINUTELY_CHAOS=1`` (``make chaos``) holds the overload 60 s."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from app.local.embedded import DynamoServer, KafkaBroker
from app.local.loadgen import frame, logplex_headers, render
from tables.aggregate import Aggregate
from tests.integration.pipeline import Pipeline, env_flag

pytestmark = pytest.mark.integration

CHAOS = env_flag("MINUTELY_CHAOS")
OVERLOAD_S = 60.0 if CHAOS else 15.0
CAPACITY_S = 6.0
LINES = 400
"""Router lines per frame (~100 KB)."""
INFLIGHT_BYTES = 16 * 1024 * 1024
"""METRICS_INGEST_MAX_INFLIGHT_BYTES for this test (the default is 64 MB): shedding starts within seconds."""


@dataclass
class Frame:
    app: str
    body: bytes
    frame_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Tally:
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    refused: list[Frame] = field(default_factory=list)
    lines_acked: int = 0


class Rss:
    """Samples a process's resident memory every 0.2 s from a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples_mb = [self.now_mb()]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def now_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            self.samples_mb.append(self.now_mb())

    def close(self) -> float:
        self.stop.set()
        self.thread.join()
        return max(self.samples_mb)


def frames(apps: list[str], minute_ms: int, n: int) -> list[Frame]:
    """``n`` frames of LINES router lines each, all in one past minute (nothing can be late), round robin."""
    out = []
    for i in range(n):
        app = apps[i % len(apps)]
        lines = [line for j in range(LINES) for line in render(
            {"kind": "router", "app": app, "dyno": "web.1", "ts": minute_ms + (i * LINES + j) % 60_000,
             "status": 200, "service_ms": float(1 + j % 300)})]
        out.append(Frame(app, frame(lines)))
    return out


async def send(session: aiohttp.ClientSession, url: str, tokens: dict[str, str], f: Frame, tally: Tally) -> None:
    headers = logplex_headers(tokens[f.app], LINES, frame_id=f.frame_id)
    t0 = time.monotonic()
    try:
        async with session.post(url, data=f.body, headers=headers) as r:
            await r.read()
            tally.statuses[r.status] = tally.statuses.get(r.status, 0) + 1
            if r.status < 300:
                tally.lines_acked += LINES
                tally.latencies_s.append(time.monotonic() - t0)
            elif r.status == 503:
                assert int(r.headers["Retry-After"]) >= 1
                tally.refused.append(f)
            else:
                tally.errors.append(f"{r.status} {(await r.text())[:200]}")
    except aiohttp.ClientError as exc:
        tally.errors.append(repr(exc))
        tally.refused.append(f)


async def closed_loop(url: str, tokens: dict[str, str], pool: list[Frame], seconds: float) -> tuple[float, Tally]:
    """Frames a second with 8 senders each waiting for its answer: the capacity."""
    tally, it = Tally(), iter(pool)
    async with aiohttp.ClientSession() as session:
        t0 = time.monotonic()

        async def sender() -> None:
            while time.monotonic() - t0 < seconds:
                await send(session, url, tokens, next(it), tally)

        await asyncio.gather(*(sender() for _ in range(8)))
        return sum(tally.statuses.get(s, 0) for s in (200, 204)) / (time.monotonic() - t0), tally


async def open_loop(url: str, tokens: dict[str, str], pool: list[Frame], rate: float, seconds: float) -> Tally:
    """A frame every 1/rate s whatever the answers, for ``seconds``; then waits for every answer."""
    tally, tasks = Tally(), []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        t0 = time.monotonic()
        for i, f in enumerate(pool):
            due = t0 + i / rate
            if due - t0 >= seconds:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(send(session, url, tokens, f, tally)))
        await asyncio.gather(*tasks)
    return tally


async def retry_refused(url: str, tokens: dict[str, str], refused: list[Frame]) -> int:
    """Each refused frame again, same Frame-Id, until it is taken (Logplex's retries); returns the attempts."""
    attempts = 0
    async with aiohttp.ClientSession() as session:
        pending = refused
        for _ in range(30):
            if not pending:
                return attempts
            tally = Tally()
            sem = asyncio.Semaphore(4)

            async def one(f: Frame) -> None:  # awaited within this iteration: its sem and tally
                async with sem:  # noqa: B023
                    await send(session, url, tokens, f, tally)  # noqa: B023

            await asyncio.gather(*(one(f) for f in pending))
            attempts += len(pending)
            assert not [e for e in tally.errors if not e.startswith("503")], tally.errors
            pending = tally.refused
            await asyncio.sleep(1.0)
    raise AssertionError(f"{len(pending)} frames still refused after 30 rounds")


def test_ingest_at_twice_its_capacity_sheds_cleanly_and_counts_every_acknowledged_line(
        broker: KafkaBroker, dynamo: DynamoServer, tmp_path: Path) -> None:
    # The process's capacity, not the apps' own limits (tests/integration/test_noisy_neighbour.py): lifted.
    p = Pipeline(broker, dynamo, tmp_path, METRICS_IDLE_TIMEOUT_S="20",
                 METRICS_INGEST_MAX_INFLIGHT_BYTES=str(INFLIGHT_BYTES),
                 METRICS_LIMIT_INGEST_RATE_BYTES_S=str(10**9), METRICS_LIMIT_INGEST_BURST_BYTES=str(10**9),
                 METRICS_LIMIT_INFLIGHT_BYTES_PER_TOKEN=str(10**9))
    p.start(data_dir=tmp_path / "state")
    try:
        base = p.start_ingest()
        url = base + "/v1/drains/logplex"
        apps = ["app-0", "app-1"]
        tokens = {a: p.read_token(a, "drain") for a in apps}
        minute_ms = (int(time.time() * 1000) // 60_000 - 3) * 60_000
        # Enough distinct frames for both phases (each frame is sent once; retries reuse its id).
        pool = frames(apps, minute_ms, 64)
        capacity, warm = asyncio.run(closed_loop(url, tokens, [Frame(f.app, f.body) for f in pool * 200],
                                                 CAPACITY_S))
        assert not warm.errors and set(warm.statuses) <= {200, 204}, (warm.statuses, warm.errors)
        rss = Rss(p.ingest_proc.pid)
        rss_before_mb = rss.samples_mb[0]
        rate = 2 * capacity
        needed = int(rate * OVERLOAD_S) + 1
        load = asyncio.run(open_loop(url, tokens, [Frame(f.app, f.body) for f in (pool * (needed // 64 + 1))[:needed]],
                                     rate, OVERLOAD_S))
        rss_max_mb = rss.close()
        assert p.ingest_proc.poll() is None, "the ingest crashed"
        # Clean answers only: 2xx, or 503 with Retry-After (checked in send); no reset connection, no 500.
        assert not load.errors, load.errors[:5]
        assert set(load.statuses) <= {200, 204, 503}, load.statuses
        shed = load.statuses.get(503, 0)
        retries = asyncio.run(retry_refused(url, tokens, load.refused))

        # Every line of every frame is in the stored minute once: the 2xx'd ones and the retried ones.
        sent_lines = warm.lines_acked + sum(load.statuses.values()) * LINES
        deadline = time.monotonic() + 180
        while True:
            stored = p.stored(apps, ["web"], minute_ms // 1000, minute_ms // 1000 + 60)
            counted = sum(int(Aggregate.from_record(m).summary().get("requests", 0)) for m in stored.values())
            if counted >= sent_lines or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert counted == sent_lines, (counted, sent_lines)
        lat = sorted(load.latencies_s)
        p99_s = lat[int(0.99 * (len(lat) - 1))] if lat else 0.0
        # Bounded: the bodies in flight are capped; what the process holds besides is its working set.
        assert rss_max_mb < rss_before_mb + 4 * INFLIGHT_BYTES / 2**20 + 200, (rss_before_mb, rss_max_mb)
        acked = sum(load.statuses.get(s, 0) for s in (200, 204))
        print(f"\noverload: capacity {capacity:.0f} frames/s ({capacity * LINES:,.0f} lines/s, closed loop), then "
              f"{rate:.0f} frames/s for {OVERLOAD_S:.0f} s: {acked} x 2xx (p99 {1000 * p99_s:.0f} ms), {shed} x 503 "
              f"with Retry-After, 0 x other; ingest RSS {rss_before_mb:.0f} -> max {rss_max_mb:.0f} MB "
              f"(in-flight budget {INFLIGHT_BYTES >> 20} MB); {retries} retries later every line counted once "
              f"({counted:,} lines)")
    finally:
        p.stop()

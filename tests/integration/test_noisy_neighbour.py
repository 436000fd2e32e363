"""A noisy neighbour at the ingest (docs/reliability.md, per-tenant admission: app/ingest/admission.py): on the
real stack (an ingest process, Kafka, a worker, dynalite), app B sends Logplex frames at a steady rate, open
loop, first alone (the baseline), then while app A floods the same ingest process with many closed-loop
senders that retry every 503 after its Retry-After with the same Frame-Id, as Logplex does.

Asserted (nothing that is a timing): every one of B's frames is answered 2xx on its first attempt; A is
throttled (503s, each with Retry-After); no status but 2xx and 503 (and no connection error) is seen; every
acknowledged line of both apps is counted exactly once in the stored minute. B's latencies with and without
A, their ratio, A's answers and the ingest's refusal counters are printed, not asserted.
``MINUTELY_CHAOS=1`` (``make chaos``) floods 60 s instead of 15 s."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path

import aiohttp
import pytest
import yaml

from app.local.embedded import DynamoServer, KafkaBroker
from app.local.loadgen import frame, logplex_headers, render
from tables.aggregate import Aggregate
from tests.integration.pipeline import Pipeline, env_flag
from tests.integration.test_overload import Frame, Tally, frames

pytestmark = pytest.mark.integration

CHAOS = env_flag("MINUTELY_CHAOS")
FLOOD_S = 60.0 if CHAOS else 15.0
BASELINE_S = 20.0 if CHAOS else 8.0
B_RATE = 10.0
"""B's frames a second (open loop)."""
B_LINES = 100
"""Router lines per B frame (~25 KB, parsed on the event loop); A's frames have test_overload's 400 (~100 KB)."""
A_SENDERS = 48
"""A's concurrent closed-loop senders."""
A_RATE_BYTES_S = 3_000_000
A_BURST_BYTES = 6_000_000
"""A's ingest_rate_bytes_s and ingest_burst_bytes overrides (METRICS_LIMITS_FILE); B has the defaults (4 MB/s)."""
INFLIGHT_BYTES = 4 * 1024 * 1024
"""METRICS_INGEST_MAX_INFLIGHT_BYTES for this test (default 64 MB): A's senders alone hold more, so the
process is past its in-flight capacity and the fair share decides who is shed."""
APP_A, APP_B = "noisy-a", "quiet-b"


@dataclass
class Answers:
    """What one app was answered, beyond Tally's counts: refusals by error code, first-attempt answers."""

    tally: Tally = field(default_factory=Tally)
    codes: dict[str, int] = field(default_factory=dict)
    first: dict[int, int] = field(default_factory=dict)
    """Status of each frame's first attempt."""
    sent_frames: int = 0
    acked_frames: int = 0
    acked_lines: int = 0
    attempts: int = 0


def lines_of(f: Frame) -> int:
    return f.body.count(b"\n")  # octet-counted messages, one newline each; router lines have none inside


def b_frames(minute_ms: int, n: int) -> list[Frame]:
    """``n`` distinct frames of B_LINES router lines of B, in one past minute (nothing can be late)."""
    out = []
    for i in range(n):
        lines = [line for j in range(B_LINES) for line in render(
            {"kind": "router", "app": APP_B, "dyno": "web.1", "ts": minute_ms + (i * B_LINES + j) % 60_000,
             "status": 200, "service_ms": float(1 + j % 300)})]
        out.append(Frame(APP_B, frame(lines)))
    return out


async def post(session: aiohttp.ClientSession, url: str, token: str, f: Frame, ans: Answers, *, first: bool = False
               ) -> tuple[int, int]:
    """One attempt at ``f``: (status, Retry-After s), 0 for a connection error. Tallies the answer."""
    headers = logplex_headers(token, lines_of(f), frame_id=f.frame_id)
    tally = ans.tally
    ans.attempts += 1
    t0 = time.monotonic()
    try:
        async with session.post(url, data=f.body, headers=headers) as r:
            text = await r.text()
            elapsed_s = time.monotonic() - t0
            status = r.status
            retry_after = r.headers.get("Retry-After", "")
    except (TimeoutError, aiohttp.ClientError) as exc:
        tally.errors.append(repr(exc))
        if first:
            ans.first[0] = ans.first.get(0, 0) + 1
        return 0, 1
    tally.statuses[status] = tally.statuses.get(status, 0) + 1
    if first:
        ans.first[status] = ans.first.get(status, 0) + 1
    if status < 300:
        tally.latencies_s.append(elapsed_s)
        ans.acked_frames += 1
        ans.acked_lines += lines_of(f)
        tally.lines_acked = ans.acked_lines
        return status, 0
    m = re.search(r'"code"\s*:\s*"([^"]+)"', text)
    code = m.group(1) if m else "?"
    ans.codes[code] = ans.codes.get(code, 0) + 1
    if status != 503:
        tally.errors.append(f"{status} {text[:200]}")
        return status, 1
    if not (retry_after.isdigit() and int(retry_after) >= 1):
        tally.errors.append(f"503 {code} without a valid Retry-After ({retry_after!r})")
        return status, 1
    return status, int(retry_after)


async def steady(url: str, token: str, pool: Iterator[Frame], seconds: float, ans: Answers) -> list[Frame]:
    """B: a new frame every 1/B_RATE s whatever the answers, for ``seconds``; returns those not taken."""
    refused: list[Frame] = []

    async def one(f: Frame) -> None:
        status, _ = await post(session, url, token, f, ans, first=True)
        if not 200 <= status < 300:
            refused.append(f)

    tasks = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = time.monotonic()
        i = 0
        while (due := t0 + i / B_RATE) - t0 < seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            f = next(pool)
            ans.sent_frames += 1
            tasks.append(asyncio.create_task(one(Frame(f.app, f.body))))
            i += 1
        await asyncio.gather(*tasks)
    return refused


async def flood(url: str, token: str, pool: Iterator[Frame], seconds: float, ans: Answers) -> list[Frame]:
    """A: A_SENDERS senders, each sending a frame and, on a 503, the same frame (same Frame-Id) again after
    its Retry-After, as Logplex does, until ``seconds`` are over; returns the frames still not taken then."""
    left: list[Frame] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        deadline = time.monotonic() + seconds

        async def sender() -> None:
            while time.monotonic() < deadline:
                src = next(pool)
                f = Frame(src.app, src.body)
                ans.sent_frames += 1
                first = True
                while True:
                    status, wait_s = await post(session, url, token, f, ans, first=first)
                    first = False
                    if 200 <= status < 300:
                        break
                    if time.monotonic() + wait_s >= deadline:
                        left.append(f)
                        return
                    await asyncio.sleep(wait_s)

        await asyncio.gather(*(sender() for _ in range(A_SENDERS)))
    return left


async def both(url: str, tokens: dict[str, str], a_pool: Iterator[Frame], b_pool: Iterator[Frame],
               a: Answers, b: Answers) -> tuple[list[Frame], list[Frame]]:
    a_task = asyncio.create_task(flood(url, tokens[APP_A], a_pool, FLOOD_S, a))
    b_left = await steady(url, tokens[APP_B], b_pool, FLOOD_S, b)
    return await a_task, b_left


async def deliver(url: str, token: str, pending: list[Frame], ans: Answers) -> None:
    """Each frame again, same Frame-Id, after the Retry-After, until it is taken (Logplex's retries)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for _ in range(60):
            if not pending:
                return
            answers = await asyncio.gather(*(post(session, url, token, f, ans) for f in pending))
            waits = [w for f, (status, w) in zip(pending, answers, strict=True) if not 200 <= status < 300]
            pending = [f for f, (status, _) in zip(pending, answers, strict=True) if not 200 <= status < 300]
            if pending:
                await asyncio.sleep(max(waits))
    raise AssertionError(f"{len(pending)} frames still refused after 60 rounds")


def scrape(admin: str) -> dict[str, dict[str, float]]:
    """The ingest's counters from /metrics on its admin port: name -> {app label, or "*" for the total: value}."""
    with urllib.request.urlopen(f"{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith("minutely_ingest") or "_created" in line.split(" ")[0]:
            continue
        key, value = line.rsplit(" ", 1)
        name, _, labels = key.partition("{")
        app = re.search(r'app="([^"]*)"', labels)
        per = out.setdefault(name.removeprefix("minutely_").removesuffix("_total"), {})
        per[app.group(1) if app else "*"] = float(value)
    for per in out.values():  # a per-app counter has no unlabelled series: its total is the sum
        per.setdefault("*", sum(per.values()))
    return out


def pct(latencies_s: list[float], q: float) -> float:
    lat = sorted(latencies_s)
    return 1000 * lat[int(q * (len(lat) - 1))] if lat else float("nan")


MODES = {
    "rate_limited": {"ingest_rate_bytes_s": A_RATE_BYTES_S, "ingest_burst_bytes": A_BURST_BYTES},
    # A's own limits lifted: only the process's fair share (in-flight budget, parse slots app by app, the
    # per-app queue) stands between A's senders and B.
    "saturating": {"ingest_rate_bytes_s": 10**9, "ingest_burst_bytes": 10**9, "inflight_bytes_per_token": 10**9},
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_flooding_app_is_throttled_and_a_steady_app_beside_it_is_not(
        broker: KafkaBroker, dynamo: DynamoServer, tmp_path: Path, mode: str) -> None:
    limits = tmp_path / "limits.yaml"
    limits.write_text(yaml.safe_dump({"overrides": {APP_A: MODES[mode]}}))
    p = Pipeline(broker, dynamo, tmp_path, METRICS_IDLE_TIMEOUT_S="15", METRICS_LIMITS_FILE=str(limits),
                 METRICS_INGEST_MAX_INFLIGHT_BYTES=str(INFLIGHT_BYTES))
    p.start(data_dir=tmp_path / "state")
    try:
        base = p.start_ingest()
        url = base + "/v1/drains/logplex"
        tokens = {app: p.read_token(app, "drain") for app in (APP_A, APP_B)}
        minute_ms = (int(time.time() * 1000) // 60_000 - 3) * 60_000
        a_pool, b_pool = cycle(frames([APP_A], minute_ms, 32)), cycle(b_frames(minute_ms, 32))

        alone = Answers()
        left = asyncio.run(steady(url, tokens[APP_B], b_pool, BASELINE_S, alone))
        assert not left and not alone.tally.errors, (alone.first, alone.codes, alone.tally.errors[:5])
        before = scrape(p.admin_url(base))

        a, b = Answers(), Answers()
        a_left, b_left = asyncio.run(both(url, tokens, a_pool, b_pool, a, b))
        assert p.ingest_proc.poll() is None, "the ingest crashed"
        a_flood_503 = a.tally.statuses.get(503, 0)
        # Logplex goes on retrying what was refused: every frame sent is taken in the end.
        asyncio.run(deliver(url, tokens[APP_A], a_left, a))
        asyncio.run(deliver(url, tokens[APP_B], b_left, b))
        after = scrape(p.admin_url(base))

        # B beside the flood: every frame taken at once; A: throttled, with clean answers only.
        assert not b.tally.errors and not b_left and set(b.first) <= {200, 204}, (b.first, b.codes, b.tally.errors[:5])
        assert not a.tally.errors, a.tally.errors[:5]
        assert set(a.tally.statuses) <= {200, 204, 503}, a.tally.statuses
        assert a.tally.statuses.get(503, 0) > 0, f"A was never throttled: {a.tally.statuses}"
        assert a.acked_frames == a.sent_frames and b.acked_frames == b.sent_frames
        # The ingest counted each refusal against the app it refused, and never against B.
        names = {"rate_limited": "ingest_refused_rate", "queue_full": "ingest_refused_queue",
                 "overloaded": "ingest_requests_shed", "inflight_limit": "ingest_refused_inflight"}
        refusals = sorted(n for n in after if n.startswith(("ingest_refused", "ingest_requests_shed")))
        assert not {n: after[n][APP_B] for n in refusals if after[n].get(APP_B)}, after
        assert {names[c]: n for c, n in a.codes.items() if c in names} == {
            n: after[n][APP_A] - before.get(n, {}).get(APP_A, 0) for n in refusals if after[n].get(APP_A)}, (
            a.codes, after)

        # Every acknowledged line of both apps is in the stored minute once.
        want = {APP_A: a.acked_lines, APP_B: alone.acked_lines + b.acked_lines}
        deadline = time.monotonic() + 180
        while True:
            stored = p.stored([APP_A, APP_B], ["web"], minute_ms // 1000, minute_ms // 1000 + 60)
            counted = {app: sum(int(Aggregate.from_record(m).summary().get("requests", 0))
                                for (s_app, _, _), m in stored.items() if s_app == app) for app in want}
            if counted == want or any(counted[k] > want[k] for k in want) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert counted == want, (counted, want)

        b0_p50, b0_p99 = pct(alone.tally.latencies_s, 0.5), pct(alone.tally.latencies_s, 0.99)
        b1_p50, b1_p99 = pct(b.tally.latencies_s, 0.5), pct(b.tally.latencies_s, 0.99)
        first_ok = sum(b.first.get(s, 0) for s in (200, 204))
        a_2xx = sum(a.tally.statuses.get(s, 0) for s in (200, 204))

        def counter(snap: dict[str, dict[str, float]], name: str, app: str) -> str:
            v = snap.get(name, {}).get(app)
            return "-" if v is None else f"{v:,.0f}"

        shown = [*refusals, "ingest_bytes_received"]
        per_app = any(k != "*" for n in shown for k in after.get(n, {}))
        rows = [
            f"noisy neighbour ({mode}): B {B_RATE:.0f} frames/s x {B_LINES} lines (open loop), {BASELINE_S:.0f} s "
            f"alone, then {FLOOD_S:.0f} s beside A ({A_SENDERS} closed-loop senders x 400-line frames, A's limits "
            f"{MODES[mode]}; in-flight budget {INFLIGHT_BYTES >> 20} MB)",
            f"  B accepted on first attempt    {first_ok}/{b.sent_frames} "
            f"({100 * first_ok / max(1, b.sent_frames):.1f} %)"
            f"  refusals {b.codes or 'none'}",
            "  B latency       alone   beside A   ratio",
            f"    p50      {b0_p50:8.1f} ms {b1_p50:8.1f} ms {b1_p50 / b0_p50:7.2f}x",
            f"    p99      {b0_p99:8.1f} ms {b1_p99:8.1f} ms {b1_p99 / b0_p99:7.2f}x",
            f"  A frames {a.sent_frames} ({a.sent_frames * 400:,} lines), attempts {a.attempts}: {a_2xx} x 2xx, "
            f"{a.tally.statuses.get(429, 0)} x 429, {a.tally.statuses.get(503, 0)} x 503 {a.codes}; "
            f"{a_flood_503} of the 503s during the flood; {len(a_left)} frames still refused at its end, "
            f"delivered by retries after; A 2xx p50 "
            f"{pct(a.tally.latencies_s, 0.5):.0f} ms, p99 {pct(a.tally.latencies_s, 0.99):.0f} ms",
            f"  ingest counters at the end (/metrics on the admin port"
            f"{'' if per_app else '; no app label exported, totals only'}):",
            *(f"    {n:28s} total {counter(after, n, '*'):>12s} (after the baseline {counter(before, n, '*')})  "
              f"A {counter(after, n, APP_A):>12s}  B {counter(after, n, APP_B):>12s}" for n in shown),
            f"  stored lines: A {counted[APP_A]:,} = acked {want[APP_A]:,}; B {counted[APP_B]:,} = acked "
            f"{want[APP_B]:,}",
        ]
        print("\n" + "\n".join(rows))
    finally:
        p.stop()

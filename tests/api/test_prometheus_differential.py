"""minutely's PromQL against a real Prometheus server (Debian's 2.42, `make prometheus`), on the same samples.

The stored minutes are served by minutely's API, and the same samples (one per bucket, stamped with the bucket's
start, model.py) are written as OpenMetrics, turned into TSDB blocks by ``promtool tsdb create-blocks-from
openmetrics``, and served by a real Prometheus. Every query of the corpus, instant and range, at aligned and
unaligned steps, must answer the same series, timestamps and values (floats within 1e-9 relative).

minutely's windows are left-open, as Prometheus 3's are: an instant selector reads ``(t - resolution, t]``, a
range ``[r]`` reads ``(t - r, t]``. Prometheus 2.x closes them on the left, so it gets the same samples (all on
whole milliseconds) from a lookback of 59.999 s and ranges 1 ms shorter: the Prometheus side of each query is
rewritten so (docs/prometheus.md#steps-and-buckets).
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp.test_utils import TestClient

from app.api.prometheus import model
from app.api.prometheus.http import add_prometheus_routes
from app.api.query import MetricsQuery, merge_buckets
from app.api.web import make_web_app
from app.clock import ManualClock
from app.ops.stats import Counters
from app.storage import catalog
from tables.aggregate import ROLLUP_RESOLUTIONS
from tests.api.test_query import SETTINGS, T0, MemoryStore, minute, put_minutes

NOW_S = T0 + 3 * 3600
MINUTES = {"web": [i for i in range(120) if not 30 <= i < 35], "worker": list(range(60, 120)),
           "clock": [10, 11, 50, 90]}
"""Minutes with data per process type: web has a five-minute gap, clock is sparse."""

CORPUS = [
    # selectors
    "minutely_requests", 'minutely_requests{status_class="2xx"}', 'minutely_requests{process_type!="web"}',
    'minutely_requests{process_type=~"web|clock"}', 'minutely_requests{process_type!~"w.*"}',
    '{__name__=~"minutely_(failed_requests|load)"}', 'minutely_response_time_ms{quantile=~"0.99|1"}',
    "minutely_requests offset 5m", 'minutely_load{stat="max"} offset 90s', "minutely_memory_mb",
    # aggregations
    "sum(minutely_requests)", "sum by (process_type) (minutely_requests)", "avg without (status_class) "
    "(minutely_requests)", 'max by (quantile) (minutely_response_time_ms)', "min(minutely_load)",
    "count by (process_type) (minutely_memory_mb)", "topk(2, minutely_requests)",
    "bottomk(1, minutely_requests) by (process_type)", 'topk by (stat) (1, minutely_load)',
    # arithmetic and comparisons
    "minutely_requests * 2 + 1", "2 ^ minutely_load", "-minutely_failed_requests", "minutely_requests % 7",
    'minutely_failed_requests / on(process_type) sum by (process_type) (minutely_requests)',
    'minutely_requests{status_class="5xx"} / ignoring(status_class) minutely_requests{status_class="2xx"}',
    "minutely_requests > 40", "minutely_requests > bool 40", "50 < minutely_requests",
    'minutely_response_time_ms{quantile="1"} >= on(process_type) minutely_response_time_mean_ms',
    'minutely_load{stat="max"} == bool ignoring(stat) minutely_load{stat="mean"}',
    "(1 + 2) * 3 - 4 / 8", "1 > bool 2", "minutely_requests / 0",
    # functions
    "sum_over_time(minutely_requests[5m])", "avg_over_time(minutely_load[10m])",
    "max_over_time(minutely_response_time_ms[3m])", "min_over_time(minutely_load[2m] offset 1m)",
    "count_over_time(minutely_requests[7m])", "last_over_time(minutely_requests[4m])",
    'absent(minutely_requests{process_type="release"})', "absent(minutely_requests)", "time()",
    "time() - 1764000000", "abs(-minutely_load)", "ceil(minutely_load)", "floor(minutely_response_time_mean_ms)",
    'scalar(sum(minutely_failed_requests))', 'vector(1) + 2', 'minutely_requests * scalar(count(minutely_load))',
]

RANGES = [  # (start, end, step): aligned, unaligned, finer and coarser than the buckets, past the data's end
    (T0, T0 + 7200, 60), (T0 + 17, T0 + 7200 + 300, 60), (T0 + 1500, T0 + 2400, 30), (T0 + 3, T0 + 7203, 90),
    (T0, T0 + 7200, 300),
]
INSTANTS = [T0 + 60 * 40, T0 + 60 * 61 + 59, T0 + 60 * 32, T0 + 7200 + 30, T0 + 60 * 11]


def stock(clock: ManualClock) -> MemoryStore:
    s = MemoryStore(clock)
    for proc, mins in MINUTES.items():
        minutes = [minute(T0 + 60 * i, np.arange(1.0, 11.0 + i) * (1 + len(proc) % 3), proc=proc, mc=50)
                   for i in mins]
        put_minutes(s, minutes)
        for res in ROLLUP_RESOLUTIONS:
            for b, agg in merge_buckets(minutes, res).items():
                s.items[("shop", proc, res, b)] = orjson.dumps(agg.to_record())
    it = catalog.catalog_item("shop", catalog.day_of(T0), MINUTES)
    s.blocks[(it.app, it.process_type, it.resolution_s, it.ts_s)] = it.payload
    s.spans[(it.app, it.process_type, it.resolution_s, it.ts_s)] = it.span_s
    return s


def openmetrics(points: dict[str, list[dict[str, Any]]]) -> str:
    """The samples of the native points, grouped by family as OpenMetrics wants, oldest first per series."""
    families: dict[str, dict[tuple[tuple[str, str], ...], list[tuple[int, float]]]] = {}
    for proc, pts in points.items():
        for p in pts:
            for name, labels, v in model.samples(p, 60):
                key = tuple(sorted({"app": "shop", "process_type": proc, **labels}.items()))
                families.setdefault(name, {}).setdefault(key, []).append((p["ts"], v))
    lines = []
    for name, series in families.items():
        lines.append(f"# TYPE {name} gauge")
        for key, samples in series.items():
            text = ",".join(f'{k}="{v}"' for k, v in key)
            lines += [f"{name}{{{text}}} {v!r} {ts}" for ts, v in samples]
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, MemoryStore]]:
    """A real Prometheus serving the store's samples; yields its URL and the store."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        pytest.fail("prometheus and promtool are missing: `make prometheus` installs Debian's package")
    store = stock(ManualClock(NOW_S * 1000))
    query = MetricsQuery(store, settings=SETTINGS, clock=store.clock)

    async def native() -> dict[str, list[dict[str, Any]]]:
        out = {}
        for proc in MINUTES:
            ans = await query.answer("shop", proc, 60, T0 - 3600, T0 + 4 * 3600)
            out[proc] = orjson.loads(ans.body)["points"]
        return out

    root = tmp_path_factory.mktemp("prometheus")
    (root / "samples.om").write_text(openmetrics(asyncio.run(native())))
    subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", str(root / "samples.om"),
                    str(root / "data")], check=True, capture_output=True, timeout=120)
    (root / "prometheus.yml").write_text("global: {}\n")
    port = _free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         "--storage.tsdb.retention.time=100y", f"--web.listen-address=127.0.0.1:{port}",
         "--query.lookback-delta=59999ms"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(_ready(url))
        yield url, store
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def _ready(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            try:
                async with s.get(url + "/-/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("prometheus did not become ready")


@pytest.fixture
async def both(aiohttp_client: Any, prometheus: tuple[str, MemoryStore],
               ) -> AsyncIterator[tuple[TestClient[Any, Any], aiohttp.ClientSession, str]]:
    url, store = prometheus

    async def authorize(token: str) -> str | None:
        return "shop" if token == "tok" else None

    query = MetricsQuery(store, settings=SETTINGS, clock=store.clock)
    ours = await aiohttp_client(make_web_app(query, SETTINGS, Counters(), authorize=authorize, clock=store.clock,
                                             extra=add_prometheus_routes))
    async with aiohttp.ClientSession() as theirs:
        yield ours, theirs, url


UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def left_open(expr: str) -> str:
    """``expr`` for Prometheus 2.x with Prometheus 3's left-open ranges: each ``[r]`` 1 ms shorter."""
    def shorter(m: re.Match[str]) -> str:
        ms = sum(int(n) * UNITS_MS[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d)", m.group(1)))
        return f"[{ms - 1}ms]"
    return re.sub(r"\[((?:\d+(?:ms|s|m|h|d))+)\]", shorter, expr)


def _value(text: str) -> float:
    return float(text.replace("+Inf", "inf").replace("-Inf", "-inf"))


def _same(a: str, b: str) -> bool:
    x, y = _value(a), _value(b)
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return x == y or abs(x - y) <= 1e-9 * max(abs(x), abs(y))


def normalized(data: dict[str, Any]) -> tuple[str, Any]:
    kind, result = data["resultType"], data["result"]
    if kind in ("scalar", "string"):
        return kind, [(float(result[0]), result[1])]
    if kind == "vector":
        return kind, sorted((tuple(sorted(r["metric"].items())), float(r["value"][0]), r["value"][1])
                            for r in result)
    return kind, sorted((tuple(sorted(r["metric"].items())), [(float(t), v) for t, v in r["values"]])
                        for r in result)


def assert_equal(ours: dict[str, Any], theirs: dict[str, Any], what: str) -> int:
    """Equal answers, or an AssertionError naming the first difference; returns the samples compared."""
    assert theirs["status"] == "success", (what, theirs)
    assert ours["status"] == "success", (what, ours)
    (k1, r1), (k2, r2) = normalized(ours["data"]), normalized(theirs["data"])
    assert k1 == k2, what
    if k1 in ("scalar", "string"):
        assert r1[0][0] == r2[0][0] and (k1 == "string" or _same(r1[0][1], r2[0][1])), (what, r1, r2)
        return 1
    assert [m for m, *_ in r1] == [m for m, *_ in r2], (what, [m for m, *_ in r1], [m for m, *_ in r2])
    for (m, *a), (_, *b) in zip(r1, r2, strict=True):
        if k1 == "vector":
            assert a[0] == b[0] and _same(a[1], b[1]), (what, m, a, b)
        else:
            assert [t for t, _ in a[0]] == [t for t, _ in b[0]], (what, m)
            bad = [(t, x, y) for (t, x), (_, y) in zip(a[0], b[0], strict=True) if not _same(x, y)]
            assert not bad, (what, m, bad[:3])
    return sum(1 if k1 == "vector" else len(r[1]) for r in r1)


async def _both(both: tuple[TestClient[Any, Any], aiohttp.ClientSession, str], path: str,
                params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    ours, theirs, url = both
    r = await ours.post(path, data={k: str(v) for k, v in params.items()}, headers={"Authorization": "Bearer tok"})
    mine = await r.json()
    theirs_params = {k: left_open(v) if k == "query" else str(v) for k, v in params.items()}
    async with theirs.post(url + path, data=theirs_params) as r2:
        real = await r2.json()
    return mine, real


@pytest.mark.parametrize("expr", CORPUS)
async def test_range_queries_equal_prometheus(both: Any, expr: str) -> None:
    compared = 0
    for start, end, step in RANGES:
        mine, real = await _both(both, "/api/v1/query_range", {"query": expr, "start": start, "end": end,
                                                                "step": step})
        compared += assert_equal(mine, real, f"{expr} [{start - T0}, {end - T0}] step {step}")
    assert compared > 0  # every query answers samples somewhere: equal empty answers would prove nothing


@pytest.mark.parametrize("expr", CORPUS)
async def test_instant_queries_equal_prometheus(both: Any, expr: str) -> None:
    compared = 0
    for t in INSTANTS:
        mine, real = await _both(both, "/api/v1/query", {"query": expr, "time": t})
        compared += assert_equal(mine, real, f"{expr} at {t - T0}")
    assert compared > 0  # every query answers samples somewhere: equal empty answers would prove nothing


@pytest.mark.parametrize("expr", ["minutely_requests[5m]", 'minutely_load{stat="max"}[150s] offset 1m'])
async def test_a_bare_range_selector_answers_its_raw_samples_as_prometheus_does(both: Any, expr: str) -> None:
    compared = sum([assert_equal(*await _both(both, "/api/v1/query", {"query": expr, "time": t}), f"{expr} at {t}")
                    for t in INSTANTS])
    assert compared > 0


def test_the_corpus_covers_every_feature_of_the_subset() -> None:
    text = " ".join(CORPUS)
    for feature in ("!=", "=~", "!~", "offset", "sum", "avg", "min(", "max", "count", " by ", "without", "topk",
                    "bottomk", " on(", "ignoring(", " bool ", "_over_time", "absent", "time()", "scalar",
                    "vector", "abs", "ceil", "floor", "^", "%", ">", "<", ">=", "=="):
        assert feature in text, feature


def test_prometheus_2_gets_left_open_ranges_one_millisecond_shorter() -> None:
    assert left_open("x[5m] + y[1h30m] offset 5m") == "x[299999ms] + y[5399999ms] offset 5m"


def test_openmetrics_of_the_samples_is_what_promtool_reads(tmp_path: Path) -> None:
    text = openmetrics({"web": [{"ts": T0, "status": {"2xx": 3}, "failed": 0}]})
    assert text.splitlines()[:2] == ["# TYPE minutely_requests gauge",
                                     f'minutely_requests{{app="shop",process_type="web",status_class="2xx"}} 3.0 {T0}']

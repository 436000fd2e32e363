"""The observation contract's decode and its record checks (app/models.py), with explicit timestamps."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app import models

T0 = 1_764_000_000_000
NOW = T0 + 1_000
FUTURE_MS = 300_000


def router(ts: int = T0, **kw: Any) -> dict[str, Any]:
    return {"kind": "router", "app": "shop", "dyno": "web.1", "ts": ts, "status": 200, "service_ms": 1.0, **kw}


BAD = [  # (record, reason, app carried by the reject)
    (router(app="shop|x"), models.REASON_APP, None),
    (router(dyno="web 1"), models.REASON_DYNO, "shop"),
    (router(app="a" * 101, dyno="web 1"), models.REASON_APP, None),  # the app is judged first
    (router(ts=NOW + FUTURE_MS + 1), f"ts is more than {FUTURE_MS} ms ahead of the wall clock", "shop"),
    ({"kind": "runtime", "app": "shop", "dyno": "web.1", "ts": T0}, models.REASON_RUNTIME, "shop"),
    ({"kind": "metric", "app": "shop", "dyno": "web.1", "ts": T0, "name": "q", "type": "timer", "value": -1},
     models.REASON_TIMER, "shop"),
]


def checked(value: bytes) -> models.Decoded:
    d = models.decode(value, 1 << 20, now_ms=NOW, max_future_ms=FUTURE_MS)
    assert isinstance(d, models.Decoded)
    return d


@pytest.mark.parametrize("n_good", [0, 3, 40])  # one by one (_check_few) and column-wise (_check_many)
@pytest.mark.parametrize("bad,reason,app", BAD)
def test_each_rule_rejects_its_record_with_the_reason_and_keeps_the_rest(
        n_good: int, bad: dict[str, Any], reason: str, app: str | None) -> None:
    good = [router(T0 + i, dyno="router" if i % 2 else "worker.2") for i in range(n_good)]
    d = checked(orjson.dumps([*good[:1], bad, *good[1:]]))
    assert [(r.reason, r.index, r.app) for r in d.rejects] == [(reason, 1 if good else 0, app)]
    assert {k: d.rejects[0].record[k] for k in bad} == bad  # echoed (the struct, defaults included)
    assert len(d.observations) == n_good and d.indexes == [i for i in range(n_good + 1) if i != 1][:n_good]
    assert d.apps == ({"shop"} if good else set())
    assert d.process_types == ({"router": "web", "worker.2": "worker"} if n_good > 1
                               else {"worker.2": "worker"} if good else {})


def test_lenient_path_is_checked_too() -> None:
    """A NaN sends the message to the lenient parser: its own rejects and the record rules merge by index."""
    body = ("[" + ",".join([orjson.dumps(router(dyno="web 1")).decode(),
                            '{"kind":"router","app":"shop","dyno":"web.1","ts":%d,"status":200,"service_ms":NaN}' % T0,
                            orjson.dumps(router()).decode()]) + "]").encode()
    d = checked(body)
    assert [r.index for r in d.rejects] == [0, 1] and d.rejects[0].reason == models.REASON_DYNO
    assert d.indexes == [2] and d.process_types == {"web.1": "web"}


def test_valid_message_passes_whole_with_its_columns() -> None:
    obs = [router(T0 + i, dyno=f"web.{i % 3}") for i in range(20)]
    obs.insert(5, {"kind": "addon", "app": "shop", "ts": T0, "source": "DB", "samples": {"x": 1.0}})
    d = checked(orjson.dumps(obs))
    assert not d.rejects and d.indexes is None and len(d.observations) == 21
    assert d.apps == {"shop"} and d.process_types == {"web.0": "web", "web.1": "web", "web.2": "web"}
    assert list(d.router_mask) == [i != 5 for i in range(21)] and len(d.ts_ms) == 21


def test_unchecked_decode_is_the_contract_only() -> None:
    """The ingest API forwards what the contract parses; the worker judges names and clocks."""
    d = models.decode(orjson.dumps([router(dyno="web 1"), router(ts=T0 + 10**9)]), 1 << 20)
    assert isinstance(d, models.Decoded) and len(d.observations) == 2 and not d.rejects


def test_max_rejects_bounds_the_described_rejects() -> None:
    d = models.decode(orjson.dumps([router(dyno="x y")] * 30), 1 << 20, max_rejects=10, now_ms=NOW,
                      max_future_ms=FUTURE_MS)
    assert isinstance(d, models.Decoded) and len(d.rejects) == 10 and d.more_rejects == 20

"""Summary blocks (tables/summary.py): the stored form of chart points."""

from __future__ import annotations

import orjson
import pytest

from tables.aggregate import Aggregate, BucketKey
from tables.summary import BLOCK_SPAN_S, SummaryBlock, block_of, point_json

T0 = 1_764_000_000 - 1_764_000_000 % (7 * 86400)


def point(ts_s: int, n: int) -> bytes:
    a = Aggregate(BucketKey("shop", "web", ts_s * 1000))
    for i in range(n):
        a.add_request(200, float(i), None)
    a.add_metric("note", "gauge", 1.0, ts_s * 1000)
    return point_json(a)


def test_a_block_round_trips_its_points_byte_for_byte() -> None:
    block = SummaryBlock(60, T0, since_s=T0 - 600)
    assert block.put(T0 + 120, point(T0 + 120, 3)) and block.put(T0, point(T0, 5))
    assert not block.put(T0, point(T0, 5))  # unchanged
    back = SummaryBlock.decode(block.encode())
    assert back.points == block.points and back.since_s == T0 - 600 and not back.partial
    assert back.between(T0, T0 + 120) == [(T0, point(T0, 5))]
    assert [orjson.loads(p)["ts"] for _, p in back.between(0, T0 + 3600)] == [T0, T0 + 120]
    empty = SummaryBlock.decode(SummaryBlock(7200, T0).encode())
    assert empty.points == {} and empty.since_s is None


def test_points_with_newlines_in_names_stay_one_line() -> None:
    a = Aggregate(BucketKey("shop", "web", T0 * 1000))
    a.add_metric("multi\nline", "counter", 1.0, T0 * 1000)
    block = SummaryBlock(60, T0, {T0: point_json(a)})
    assert orjson.loads(SummaryBlock.decode(block.encode()).points[T0])["metrics"]["multi\nline"]["sum"] == 1.0


def test_buckets_outside_the_block_or_off_resolution_are_refused() -> None:
    block = SummaryBlock(600, block_of(T0, 600))
    with pytest.raises(ValueError):
        block.put(block.start_s + BLOCK_SPAN_S[600], b"{}")
    with pytest.raises(ValueError):
        block.put(block.start_s + 60, b"{}")
    with pytest.raises(ValueError):
        SummaryBlock(3600, T0 + 3600)  # not a day boundary


@pytest.mark.parametrize("payload", [b"", b"not json", b"[]", b'{"v": 1}',
                                     b'{"v": 2, "res_s": 60, "start_s": 0, "ts": []}',
                                     b'{"v": 1, "res_s": 60, "start_s": 0, "ts": [0, 60], "partial": false}\n{}'])
def test_an_unknown_or_damaged_block_is_a_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError):
        SummaryBlock.decode(payload)


def test_a_block_vouches_only_for_spans_between_its_since_and_itself() -> None:
    block = SummaryBlock(60, T0 + 5 * 3600, since_s=T0 + 1800)
    assert [block.vouches_empty(T0 + h * 3600) for h in range(-1, 7)] == [False, True, True, True, True, True,
                                                                          False, False]
    assert not SummaryBlock(60, T0 + 3600).vouches_empty(T0)

"""Digest.to_bytes / from_bytes (tables/digest.py) and the varints under them (tables/varint.py): every form
gives back the same ``to_dict()``, float for float."""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tables import varint
from tables.digest import (
    FORM_EXACT_DECIMAL,
    FORM_EXACT_FLOAT,
    FORM_EXACT_INT,
    FORM_TDIGEST,
    FORM_TDIGEST_FLOAT,
    SIGNED_COUNTS,
    Digest,
)


def digest_of(values: list[float], *, max_centroids: int = 200, exact_limit: int = 4096) -> Digest:
    d = Digest(max_centroids, exact_limit=exact_limit)
    d.add_many(values)
    d.flush()
    return d


def round_trip(d: Digest, max_centroids: int = 200) -> Digest:
    back = Digest.from_bytes(d.to_bytes(), max_centroids)
    assert back.exact == d.exact
    assert back.to_dict() == d.to_dict()
    assert orjson.dumps(back.to_dict()) == orjson.dumps(d.to_dict())  # -0.0 stays -0.0
    return back


@pytest.mark.parametrize("values, form", [
    ([], FORM_EXACT_INT),
    ([5.0, 1.0, 5.0, 300.0, 1e15, -7.0], FORM_EXACT_INT),
    ([12.34, 0.5, 99.99, 12.34], FORM_EXACT_DECIMAL),
    ([0.000001, 3.0], FORM_EXACT_DECIMAL),
    ([0.1 + 0.2], FORM_EXACT_FLOAT),  # 0.30000000000000004: no short decimal
    ([1.0, -0.0], FORM_EXACT_FLOAT),  # an integer form would read it back as 0.0
    ([2.0**53, 1.0], FORM_EXACT_FLOAT),
    ([math.inf, 1.0], FORM_EXACT_FLOAT),
    ([math.pi, math.e], FORM_EXACT_FLOAT),
])
def test_each_exact_form_gives_back_the_same_values_and_counts(values: list[float], form: int) -> None:
    d = digest_of(values)
    assert d.to_bytes()[0] == form
    round_trip(d)


def test_decimals_take_the_fewest_digits_that_round_trip() -> None:
    raw = digest_of([12.5, 3.25, 7.125]).to_bytes()
    assert raw[:2] == bytes([FORM_EXACT_DECIMAL, 3])


def test_negative_counts_are_kept_too() -> None:
    d = Digest(50, _exact=Counter({1.0: -2, 2.0: 3}))
    assert d.to_bytes()[0] == FORM_EXACT_INT | SIGNED_COUNTS
    assert Digest.from_bytes(d.to_bytes(), 50).to_dict() == d.to_dict()


def test_a_tdigest_keeps_its_own_centroid_count_and_scalars() -> None:
    rng = np.random.default_rng(3)
    d = digest_of(rng.lognormal(3.0, 0.8, 20_000).tolist(), max_centroids=100, exact_limit=500)
    assert not d.exact and d.to_bytes()[0] == FORM_TDIGEST
    back = round_trip(d, max_centroids=1000)  # the dict's max_centroids (100) wins, as in from_dict
    assert back.to_dict()["max_centroids"] == 100 and back.quantile(0.99) == d.quantile(0.99)


def test_fractional_weights_are_stored_as_float64() -> None:
    """The tdigest package's dicts carry fractional weights (from_dict reads them)."""
    d = Digest.from_dict({"centroids": [{"m": 1.5, "c": 0.25}, {"m": 9.0, "c": 2.5}]}, 50)
    assert d.to_bytes()[0] == FORM_TDIGEST_FLOAT
    round_trip(d, 50)


def test_integer_milliseconds_are_about_two_bytes_a_distinct_value() -> None:
    rng = np.random.default_rng(7)
    d = digest_of(np.round(rng.lognormal(3.0, 0.8, 6000)).tolist())
    raw = d.to_bytes()
    distinct = len(d.to_dict()["centroids"])
    assert 150 < distinct < 200 and len(raw) < 2.5 * distinct
    round_trip(d)


def test_a_large_exact_digest_is_a_fraction_of_its_json() -> None:
    rng = np.random.default_rng(1)
    d = digest_of(rng.lognormal(3.0, 0.8, 4000).tolist())  # 4000 distinct floats
    assert d.exact and len(d.to_bytes()) < 0.3 * len(orjson.dumps(d.to_dict()))


values = st.one_of(
    st.lists(st.integers(-(2**40), 2**40).map(float), max_size=200),
    st.integers(1, 6).flatmap(lambda k: st.lists(st.integers(-(10**9), 10**9).map(lambda i: i / 10**k),
                                                  max_size=200)),
    st.lists(st.floats(allow_nan=False, width=64, min_value=-1e12, max_value=1e12), max_size=200),
)


@given(values, st.integers(1, 64), st.booleans())
def test_any_values_round_trip_in_either_mode(vs: list[float], limit: int, tdigest: bool) -> None:
    d = digest_of(vs, max_centroids=50, exact_limit=limit if tdigest else 4096)
    round_trip(d, 50)


@given(st.binary(max_size=64))
def test_garbage_is_a_value_error_or_a_digest(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        Digest.from_bytes(data, 50)


@pytest.mark.parametrize("values, limit", [([1.0, 2.0, 300.0], 4096), ([0.5, 1.25], 4096), ([math.pi], 4096),
                                           ([float(i) for i in range(100)], 10)])
def test_truncated_or_padded_bytes_are_refused(values: list[float], limit: int) -> None:
    raw = digest_of(values, exact_limit=limit).to_bytes()
    for cut in range(len(raw)):
        with pytest.raises(ValueError):
            Digest.from_bytes(raw[:cut])
    with pytest.raises(ValueError, match="after the digest"):
        Digest.from_bytes(raw + b"\x00")
    with pytest.raises(ValueError, match="unknown digest form"):
        Digest.from_bytes(b"\x7f" + raw[1:])


@given(st.lists(st.integers(0, 2**64 - 1)))
def test_varints_round_trip(xs: list[int]) -> None:
    out = bytearray()
    varint.put_many(out, xs)
    assert varint.read_many(bytes(out), 0, len(xs)) == (xs, len(out))


@given(st.integers(-(2**63), 2**63))
def test_zigzag_round_trips_and_keeps_small_magnitudes_small(x: int) -> None:
    assert varint.unzigzag(varint.zigzag(x)) == x
    assert varint.zigzag(x) <= 2 * abs(x)


def test_varint_readers_refuse_what_is_not_one() -> None:
    with pytest.raises(ValueError, match="longer than 10 bytes"):
        varint.read(b"\xff" * 11, 0)
    with pytest.raises(ValueError, match="truncated"):
        varint.read(b"\x80", 0)
    with pytest.raises(ValueError, match="truncated"):
        varint.read_many(b"\x01\x80", 0, 2)
    with pytest.raises(ValueError, match="unsigned"):
        varint.put_many(bytearray(), [1, -1])

"""The drain parser stays linear and bounded whatever a tenant sends (review C1: one 16 KB l2met value took
11.7 s on the event loop).

Every field of every line kind (tests/ingest/hostile_lines.py) is grown to 64 KB with each filler shape that
makes backtracking patterns quadratic, and parsed with the line cap lifted, so every pattern meets the full
64 KB. A quadratic pattern makes this file take minutes instead of seconds; the rates and their growth from
16 to 64 KB are printed by ``make bench-parse`` (tests/bench/bench_parse.py), not asserted here.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.ingest.logplex import MAX_LINE_BYTES, MAX_METRICS_PER_LINE, FrameError, parse_frame
from app.local.loadgen import frame
from tests.ingest.hostile_lines import FILLERS, ROUTER, TS, line, templates

BIG = 64 * 1024
GOOD = b"<158>1 " + TS + b" host heroku router - " + ROUTER
TEMPLATES = templates()


def test_every_line_kind_and_field_is_covered() -> None:
    families = {f for f, _, _ in TEMPLATES}
    assert families == {"router", "router error", "runtime", "add-on", "l2met", "dyno event", "api event",
                        "syslog header"}
    assert len(TEMPLATES) > 60


@pytest.mark.parametrize("filler", sorted(FILLERS))
def test_every_field_grown_to_64_kb_parses_and_stays_bounded(filler: str) -> None:
    for family, field, template in TEMPLATES:
        hostile = line(template, filler, BIG)
        p = parse_frame(frame([hostile, GOOD]), "shop", max_line_bytes=2 * BIG)
        where = (family, field, filler)
        assert p.messages == 2, where
        # The valid line beside it is never lost, and one line never becomes more than a line's worth.
        assert p.encoded[-1].startswith(b'{"kind":"router"'), where
        assert len(p.encoded) <= 1 + MAX_METRICS_PER_LINE, where
        assert len(p.bad) <= 1 and all(len(b.line) <= 2048 and len(b.reason) <= 2000 for b in p.bad), where


def test_lines_over_the_cap_are_refused_unread_and_the_rest_counts() -> None:
    for family, field, template in TEMPLATES[::7]:
        p = parse_frame(frame([line(template, "digits", BIG), GOOD]), "shop")
        assert p.too_long == 1 and len(p.encoded) == 1, (family, field)
        assert p.bad[0].reason.endswith(f"bytes over the {MAX_LINE_BYTES}-byte limit (not parsed)")


def test_the_quadratic_number_of_the_review_is_refused_at_its_value_cap() -> None:
    text = b"count#x=" + b"1" * 16_384 + b"!"
    p = parse_frame(frame([b"<158>1 " + TS + b" host app web.1 - " + text]), "shop", max_line_bytes=2 * BIG)
    assert [b.reason[:40] for b in p.bad] == ["count#x=1111111111111111111111111111111111"[:40]]
    assert "is not a number with a unit" in p.bad[0].reason and not p.encoded


def test_a_line_with_too_many_metrics_keeps_the_first_ones() -> None:
    text = b" ".join(b"count#m%d=1" % i for i in range(200))
    p = parse_frame(frame([b"<158>1 " + TS + b" host app web.1 - " + text]), "shop")
    assert len(p.encoded) == MAX_METRICS_PER_LINE
    assert p.bad[0].reason == f"{200 - MAX_METRICS_PER_LINE} metrics past the first {MAX_METRICS_PER_LINE} of " \
                              "the line refused"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, len(TEMPLATES) - 1), filler=st.sampled_from(sorted(FILLERS)),
       size=st.integers(1, BIG), cap=st.sampled_from([MAX_LINE_BYTES, 2 * BIG]))
def test_any_field_any_size_any_cap(index: int, filler: str, size: int, cap: int) -> None:
    _, _, template = TEMPLATES[index]
    hostile = line(template, filler, size)
    try:
        p = parse_frame(frame([GOOD, hostile, GOOD]), "shop", max_line_bytes=cap)
    except FrameError:  # only a framing error (an octet count) may refuse the whole frame; never here
        raise AssertionError("well-framed lines never fail the frame") from None
    assert p.messages == 3 and p.encoded[0] == p.encoded[-1]
    assert (p.too_long == 1) == (len(hostile) > cap)

"""Hostile drain lines: parse rate per line family, and its growth from 16 to 64 KB (linear = 4x).

    make bench-parse    # or: python -m tests.bench.bench_parse [--repeat N]

Every field of every family (tests/ingest/hostile_lines.py) is grown with every filler shape, parsed with the
line cap lifted (so the patterns see all of it), and the slowest (field, filler) of each family is reported.
The baseline, measured in the same run, is a frame of ordinary router lines of the same size. Then the same
hostile lines at the default 10 KB cap, as the ingest parses them: refused unread.
"""

from __future__ import annotations

import argparse
import time

from app.ingest.logplex import parse_frame
from app.local.loadgen import frame
from tests.ingest.hostile_lines import FILLERS, ROUTER, TS, line, templates

SIZES = (1024, 4096, 16 * 1024, 64 * 1024)


def seconds(body: bytes, *, repeat: int, cap: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        parse_frame(body, "bench", max_line_bytes=cap)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3, help="best of N for every measurement")
    args = ap.parse_args()
    lift = 2 * SIZES[-1]
    normal_line = b"<158>1 " + TS + b" host heroku router - " + ROUTER
    normal = {n: frame([normal_line] * max(1, n // len(normal_line))) for n in SIZES}
    base = {n: len(normal[n]) / seconds(normal[n], repeat=args.repeat, cap=lift) for n in SIZES}
    worst: dict[str, tuple[float, float, str]] = {}  # family -> (16 KB s, 64 KB s, field/filler)
    for family, field, template in templates():
        for filler in FILLERS:
            t16, t64 = (seconds(frame([line(template, filler, n)]), repeat=args.repeat, cap=lift)
                        for n in SIZES[2:])
            if family not in worst or t64 > worst[family][1]:
                worst[family] = (t16, t64, f"{field} / {filler}")
    print(f"{'family':14} {'slowest field / filler':34} {'16 KB':>10} {'64 KB':>10} {'growth':>7} {'vs normal':>9}")
    rows = sorted(worst.items(), key=lambda kv: kv[1][1], reverse=True)
    for family, (t16, t64, what) in rows:
        rate16, rate64 = 16 * 1024 / t16, 64 * 1024 / t64
        print(f"{family:14} {what:34} {rate16 / 1e6:7.1f} MB/s {rate64 / 1e6:7.1f} MB/s {t64 / t16:6.1f}x "
              f"{rate64 / base[SIZES[-1]]:8.2f}x")
    print(f"{'normal router':14} {'(baseline, same run)':34} {base[SIZES[2]] / 1e6:7.1f} MB/s "
          f"{base[SIZES[-1]] / 1e6:7.1f} MB/s")
    family, (t16, t64, what) = rows[0]
    print(f"worst family: {family} ({what}): {64 * 1024 / t64 / 1e6:.1f} MB/s at 64 KB, "
          f"growth 16->64 KB {t64 / t16:.1f}x (linear = 4x)")
    capped = max(seconds(frame([line(t, "digits", SIZES[-1])]), repeat=args.repeat, cap=10_240)
                 for _, _, t in templates())
    print(f"at the default 10 KB cap, the slowest 64 KB hostile line: {64 * 1024 / capped / 1e6:.0f} MB/s "
          "(refused unread)")


if __name__ == "__main__":
    main()

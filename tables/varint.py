"""LEB128 varints (7 bits a byte, low groups first) for the stored record's integer arrays (tables/record.py).

Readers raise ValueError on truncated or over-long input, never IndexError.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_SHIFT = 63
"""A varint longer than 10 bytes is corrupt: the arrays hold counts and deltas far below 2**64."""


def zigzag(x: int) -> int:
    """A signed int as an unsigned one, small magnitudes small (0, -1, 1, -2 -> 0, 1, 2, 3)."""
    return x << 1 if x >= 0 else (-x << 1) - 1


def unzigzag(z: int) -> int:
    return (z >> 1) ^ -(z & 1)


def put(out: bytearray, x: int) -> None:
    """Append one unsigned varint."""
    if x < 0:
        raise ValueError(f"a varint is unsigned, got {x}")
    while x >= 0x80:
        out.append((x & 0x7F) | 0x80)
        x >>= 7
    out.append(x)


def put_many(out: bytearray, xs: Sequence[int]) -> None:
    """Append unsigned varints; one C call when all fit in 7 bits (counts and deltas mostly do)."""
    if not xs:
        return
    if min(xs) < 0:
        raise ValueError(f"a varint is unsigned, got {min(xs)}")
    if max(xs) < 0x80:
        out += bytes(xs)
        return
    append = out.append
    for x in xs:
        while x >= 0x80:
            append((x & 0x7F) | 0x80)
            x >>= 7
        append(x)


def read(data: bytes, pos: int) -> tuple[int, int]:
    """``(value, position after it)``."""
    x = shift = 0
    n = len(data)
    while True:
        if pos >= n:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        x |= (b & 0x7F) << shift
        if b < 0x80:
            return x, pos
        shift += 7
        if shift > MAX_SHIFT:
            raise ValueError("varint longer than 10 bytes")


def read_many(data: bytes, pos: int, count: int) -> tuple[list[int], int]:
    """``count`` unsigned varints from ``pos``: ``(values, position after them)``."""
    chunk = data[pos:pos + count]
    if len(chunk) < count:
        raise ValueError(f"truncated: {count} varints announced, {len(chunk)} bytes left")
    if not count or max(chunk) < 0x80:
        return list(chunk), pos + count
    out: list[int] = []
    append = out.append
    n = len(data)
    try:
        for _ in range(count):
            b = data[pos]
            pos += 1
            if b < 0x80:
                append(b)
                continue
            x, shift = b & 0x7F, 7
            while True:
                b = data[pos]
                pos += 1
                x |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
                if shift > MAX_SHIFT:
                    raise ValueError("varint longer than 10 bytes")
            append(x)
    except IndexError:
        raise ValueError(f"truncated varint array ({len(out)} of {count} read, {n} bytes)") from None
    return out, pos

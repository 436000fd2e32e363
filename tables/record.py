"""The stored digest item (minute and rollup items): what DynamoDB or Cassandra holds for one aggregate.

Version 1 is the ``metrics-1m`` JSON (``orjson`` of ``Aggregate.to_record()``, plus ``"mins"`` on rollup
items); it starts with ``{``. Version 2 is byte 0x02, then a raw deflate stream (zlib, wbits -15, level 6)
of the same record in msgpack, each digest dict replaced by ``Digest.to_bytes()`` and ``mins`` by
:func:`mins_bytes`: 4-8x smaller, so a minute fits one DynamoDB write unit. Both decode to the same
Aggregate: ``decode(encode(agg))[0].to_record() == agg.to_record()``, float for float.

Deterministic: the same aggregate gives the same bytes (every store of a dual write holds the same item),
with the same zlib build; a different zlib may deflate differently, and both read the same.
Reference: docs/design/storage.md
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

import msgspec
import orjson

from tables import varint
from tables.aggregate import Aggregate
from tables.digest import Digest

VERSIONS = (1, 2)
VERSION = 2
V2 = 0x02
"""The first byte of a version 2 payload (version 1 is JSON: ``{``)."""
LEVEL = 6
"""Deflate level: fixed, so that the bytes are."""
MAX_RECORD_BYTES = 64 * 1024 * 1024
"""A version 2 record inflating beyond this is refused as corrupt (a stored item is at most 400 KB)."""
MINUTE_S = 60

MINS_LIST = 0
"""``mins``: n, the first (zigzag varint, s), then the gaps to the next ones in minutes."""
MINS_BITMAP = 1
"""``mins``: the first (zigzag varint, s), the bitmap's length, then one bit per minute from the first (low
bit first): a full 2 h bucket is 15 bytes instead of 120. The smaller of the two is stored."""
MINS_SECONDS = 2
"""``mins`` that are not all whole minutes apart: n, the first, the gaps in seconds (never in practice)."""

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()
_MALFORMED = (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError, struct.error, zlib.error)


def encode(agg: Aggregate, *, mins: Iterable[int] | None = None, version: int = VERSION) -> bytes:
    """The stored item for ``agg`` in ``version`` (``StorageSettings.record_format``); ``mins``: the minute
    starts (s) a rollup bucket holds, stored as a set (sorted, once each)."""
    if version == 1:
        return encode_v1(agg, mins)
    if version != VERSION:
        raise ValueError(f"unknown record version {version!r}: one of {VERSIONS}")
    rec = agg.to_record(digest=Digest.to_bytes)
    if mins is not None:
        rec["mins"] = mins_bytes(mins)
    deflate = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
    return bytes([V2]) + deflate.compress(_ENCODER.encode(rec)) + deflate.flush()


def encode_v1(agg: Aggregate, mins: Iterable[int] | None = None) -> bytes:
    """Version 1, as the sink and the rollup job wrote it before version 2 (JSON)."""
    rec = agg.to_record()
    if mins is not None:
        rec["mins"] = sorted(set(mins))
    return orjson.dumps(rec)


def decode(payload: bytes) -> tuple[Aggregate, list[int] | None]:
    """A stored digest item of either version -> ``(aggregate, mins)``, ``mins`` None when the item has none
    (minute items). ValueError for anything else (truncated, corrupt, an unknown version)."""
    if not payload:
        raise ValueError("empty stored aggregate record")
    first = payload[0]
    if first == V2:
        try:
            return _decode_v2(payload)
        except _MALFORMED as exc:
            raise ValueError(f"unreadable stored aggregate record (version 2, {len(payload)} bytes): {exc}") from None
    if first == ord("{"):
        try:
            return _decode_v1(payload)
        except _MALFORMED as exc:
            raise ValueError(f"unreadable stored aggregate record (version 1, {len(payload)} bytes): {exc}") from None
    raise ValueError(f"not a stored aggregate record: it starts with byte 0x{first:02x} (version 1 is JSON, "
                     f"version 2 starts with 0x{V2:02x}; written by a newer release?)")


def _decode_v1(payload: bytes) -> tuple[Aggregate, list[int] | None]:
    rec = orjson.loads(payload)
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    mins = rec.get("mins")
    return Aggregate.from_record(rec), None if mins is None else [int(m) for m in mins]


def _decode_v2(payload: bytes) -> tuple[Aggregate, list[int] | None]:
    inflate = zlib.decompressobj(-15)
    raw = inflate.decompress(memoryview(payload)[1:], MAX_RECORD_BYTES)
    if inflate.unconsumed_tail:
        raise ValueError(f"inflates beyond {MAX_RECORD_BYTES} bytes")
    if not inflate.eof:
        raise ValueError("truncated deflate stream")
    if inflate.unused_data:
        raise ValueError(f"{len(inflate.unused_data)} bytes after the deflate stream")
    rec = _DECODER.decode(raw)
    if not isinstance(rec, dict):
        raise ValueError("not a msgpack map")
    mins = rec.pop("mins", None)
    return Aggregate.from_record(rec, digest=_digest_of), None if mins is None else mins_of(_bytes(mins))


def _digest_of(data: Any, max_centroids: int) -> Digest:
    return Digest.from_bytes(_bytes(data), max_centroids)


def _bytes(v: Any) -> bytes:
    if not isinstance(v, bytes):
        raise ValueError(f"expected msgpack bin, got {type(v).__name__}")
    return v


def mins_bytes(mins: Iterable[int]) -> bytes:
    """The minute starts (s) of a rollup bucket, as a set: the smaller of MINS_LIST and MINS_BITMAP."""
    ms = sorted(set(mins))
    out = bytearray()
    if not ms:
        out.append(MINS_LIST)
        varint.put(out, 0)
        return bytes(out)
    first = ms[0]
    gaps = [b - a for a, b in pairwise(ms)]
    if any(g % MINUTE_S for g in gaps):
        out.append(MINS_SECONDS)
        varint.put(out, len(ms))
        varint.put(out, varint.zigzag(first))
        varint.put_many(out, gaps)
        return bytes(out)
    out.append(MINS_LIST)
    varint.put(out, len(ms))
    varint.put(out, varint.zigzag(first))
    varint.put_many(out, [g // MINUTE_S for g in gaps])
    bits = 0
    for m in ms:
        bits |= 1 << ((m - first) // MINUTE_S)
    nbytes = (bits.bit_length() + 7) // 8
    bitmap = bytearray([MINS_BITMAP])
    varint.put(bitmap, varint.zigzag(first))
    varint.put(bitmap, nbytes)
    bitmap += bits.to_bytes(nbytes, "little")
    return bytes(bitmap if len(bitmap) < len(out) else out)


def mins_of(data: bytes) -> list[int]:
    """Reads :func:`mins_bytes`: the minute starts, sorted. ValueError when malformed."""
    if not data:
        raise ValueError("empty mins")
    tag = data[0]
    if tag == MINS_BITMAP:
        z, pos = varint.read(data, 1)
        nbytes, pos = varint.read(data, pos)
        if pos + nbytes != len(data):
            raise ValueError("malformed mins bitmap length")
        first, bits = varint.unzigzag(z), int.from_bytes(data[pos:], "little")
        out = []
        i = 0
        while bits:
            if bits & 1:
                out.append(first + i * MINUTE_S)
            bits >>= 1
            i += 1
        return out
    if tag in (MINS_LIST, MINS_SECONDS):
        n, pos = varint.read(data, 1)
        if not n:
            ms: list[int] = []
        else:
            z, pos = varint.read(data, pos)
            gaps, pos = varint.read_many(data, pos, n - 1)
            unit = MINUTE_S if tag == MINS_LIST else 1
            ms = [varint.unzigzag(z)]
            for g in gaps:
                ms.append(ms[-1] + g * unit)
        if pos != len(data):
            raise ValueError(f"{len(data) - pos} bytes after the mins")
        return ms
    raise ValueError(f"unknown mins form {tag}")

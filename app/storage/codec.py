"""Payload compression shared by the store backends: what every backend stores for a large payload is the
same gzip member, so items compare byte for byte across stores (the migration's shadow reads and verify)."""

from __future__ import annotations

import gzip

from app.errors import StoreError
from tables.record import V2

DEFLATED = bytes((V2,))
"""How a version 2 record starts: compressed already."""
OFFLOAD_BYTES = 256 * 1024
"""Compressing more than this in one call (or decompressing an eighth of it, which expands ~8x) runs in a
worker thread: zlib releases the GIL, and the event loop keeps serving heartbeats and other requests."""


def pack(payload: bytes, over_bytes: int) -> tuple[bytes, bool]:
    """``(bytes to store, compressed?)``: gzip when longer than ``over_bytes`` and it actually helps (never
    for a version 2 record, deflated already: tables/record.py)."""
    if len(payload) > over_bytes and payload[:1] != DEFLATED:
        # mtime=0: the same payload gives the same bytes, so replays write identical items.
        packed = gzip.compress(payload, compresslevel=6, mtime=0)
        if len(packed) < len(payload):
            return packed, True
    return payload, False


def unpack(data: bytes, zipped: bool, what: str) -> bytes:
    """The stored payload; a corrupt one is a StoreError naming ``what`` (the item)."""
    if not zipped:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise StoreError(f"item {what} has a corrupt compressed payload: {e}",
                         action="delete or rewrite the item (replay its minute)") from e


def packed_bytes(payloads: list[bytes], over_bytes: int) -> int:
    """Bytes that :func:`pack` would compress: above :data:`OFFLOAD_BYTES`, pack in a thread."""
    return sum(len(p) for p in payloads if len(p) > over_bytes and p[:1] != DEFLATED)

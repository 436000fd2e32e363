"""Plumbing both store backends share: concurrent requests where the first failure decides, and payload
work moved off the event loop when it is large (the compression itself: app/storage/codec.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from app.storage.codec import OFFLOAD_BYTES, packed_bytes
from app.storage.protocol import MetricItem

T = TypeVar("T")


async def fan_out(calls: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """The results of ``calls``, run concurrently, in order. The first failure cancels the others (none
    is left running unobserved) and is raised as itself, so callers still tell retriable from not."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0]  # noqa: B904 - its own cause (the driver's error) stays attached
    return [t.result() for t in tasks]


async def encode(items: Sequence[MetricItem], over_bytes: int, encode_all: Callable[[Sequence[MetricItem]], T]) -> T:
    """``encode_all(items)``, in a worker thread when it compresses more than OFFLOAD_BYTES (zlib releases
    the GIL: the loop keeps serving heartbeats and requests)."""
    if packed_bytes([i.payload for i in items], over_bytes) > OFFLOAD_BYTES:
        return await asyncio.to_thread(encode_all, items)
    return encode_all(items)


async def decode(build: Callable[[], T], zipped_bytes: int) -> T:
    """``build()``, in a worker thread when it decompresses more than an eighth of OFFLOAD_BYTES (which
    expands about 8x)."""
    return await asyncio.to_thread(build) if zipped_bytes > OFFLOAD_BYTES // 8 else build()

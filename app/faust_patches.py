"""A fix for Faust's consumer: records fetched while its flow is paused are lost when nothing was committed.

After Faust seeks to the committed offsets, a stream partition with no committed offset is sought to the
beginning (as ``auto_offset_reset=earliest`` did); changelog partitions are left to Faust's recovery.
Reference: docs/design/windows.md (a restarted consumer skipped uncommitted records)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

_APPLIED = False


def uncommitted_stream_partitions(committed: Mapping[Any, int | None], changelog_topics: set[str]) -> list[Any]:
    """The partitions of ``committed`` (aiokafka's answer: None when never committed) to reset by policy."""
    return sorted((tp for tp, offset in committed.items()
                   if (offset is None or offset < 0) and tp.topic not in changelog_topics),
                  key=lambda tp: (tp.topic, tp.partition))


async def reset_uncommitted(thread: Any, committed: Mapping[Any, int | None]) -> list[Any]:
    """Seek ``thread``'s (Faust's AIOKafkaConsumerThread) uncommitted stream partitions to the beginning, as
    ``auto_offset_reset=earliest`` (the pipeline's setting, app/app.py) does on first assignment."""
    if thread.app.conf.consumer_auto_offset_reset != "earliest":
        return []
    tps = uncommitted_stream_partitions(committed, set(thread.app.tables.changelog_topics))
    if tps:
        await thread.seek_to_beginning(*tps)
        log.info("no committed offset for %s: reading from the beginning",
                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in tps))
    return tps


def apply() -> None:
    """Patch Faust's aiokafka consumer thread once per process (the Faust app module calls this)."""
    global _APPLIED
    if _APPLIED:
        return
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    original = AIOKafkaConsumerThread.seek_to_committed

    async def seek_to_committed(self: Any) -> Mapping[Any, int]:
        committed: Mapping[Any, int] = await original(self)
        await reset_uncommitted(self, committed)
        return committed

    seek_to_committed.__doc__ = original.__doc__
    AIOKafkaConsumerThread.seek_to_committed = seek_to_committed  # type: ignore[method-assign]
    _APPLIED = True


FRESH_FETCH_MS = 5_000
"""A highwater older than this is stale: Faust's consumer fetches every partition at least every 1.5 s
(``fetch_max_wait_ms``) while the broker answers and the partition is not paused."""


def highwater(faust_app: Any, topic: str, partition: int, *, fresh_at_ms: int | None = None) -> int | None:
    """The broker's end offset of an assigned partition as of the consumer's last fetch (None: unknown).
    With ``fresh_at_ms`` (the wall clock now), also None when that fetch is older than FRESH_FETCH_MS: the
    broker is unreachable or the partition paused, and the last known end may long have moved on."""
    from faust.types import TP

    tp = TP(topic, partition)
    try:
        hw = faust_app.consumer.highwater(tp)
        if fresh_at_ms is not None:
            # aiokafka keeps the time of each partition's last fetch response; Faust has no accessor.
            polled_ms = faust_app.consumer._thread._ensure_consumer().last_poll_timestamp(tp)
            if polled_ms is None or fresh_at_ms - polled_ms > FRESH_FETCH_MS:
                return None
    except Exception:  # noqa: BLE001  not assigned, or not fetched yet
        return None
    return None if hw is None else int(hw)


def committed_offset(faust_app: Any, topic: str, partition: int) -> int | None:
    """The offset this worker last committed for an assigned partition: every agent reading the topic had
    finished every record below it. Faust keeps it in ``Consumer._committed_offset`` (set from the broker
    on assignment, then on each commit); it has no public accessor."""
    from faust.types import TP

    value = getattr(faust_app.consumer, "_committed_offset", {}).get(TP(topic, partition))
    return None if value is None else int(value)

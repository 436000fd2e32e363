"""app/faust_patches.py: a stream partition its group never committed is read from the beginning again when
Faust seeks back to committed offsets; committed and changelog partitions are left as they are."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition

from app import faust_patches


class FakeThread:
    def __init__(self, reset: str = "earliest") -> None:
        self.app = SimpleNamespace(conf=SimpleNamespace(consumer_auto_offset_reset=reset),
                                   tables=SimpleNamespace(changelog_topics={"t-windows-changelog"}))
        self.sought: list[Any] = []

    async def seek_to_beginning(self, *tps: Any) -> None:
        self.sought.extend(tps)


COMMITTED = {TopicPartition("metrics-1m", 1): None, TopicPartition("metrics-1m", 0): 17,
             TopicPartition("observations", 3): None, TopicPartition("t-windows-changelog", 1): None}


def test_uncommitted_stream_partitions_are_read_from_the_beginning() -> None:
    thread = FakeThread()
    asyncio.run(faust_patches.reset_uncommitted(thread, COMMITTED))
    assert thread.sought == [TopicPartition("metrics-1m", 1), TopicPartition("observations", 3)]


def test_nothing_moves_when_everything_was_committed_or_the_policy_is_not_earliest() -> None:
    thread = FakeThread()
    asyncio.run(faust_patches.reset_uncommitted(thread, {TopicPartition("metrics-1m", 0): 17}))
    other = FakeThread(reset="latest")
    asyncio.run(faust_patches.reset_uncommitted(other, COMMITTED))
    assert thread.sought == [] and other.sought == []


def test_the_faust_app_applies_the_patch() -> None:
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    from app.app import create_app
    from app.settings import Settings

    create_app(Settings())  # applies it, before the app is built

    assert AIOKafkaConsumerThread.seek_to_committed.__module__ == "app.faust_patches"

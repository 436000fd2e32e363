"""Persisting window state in the Faust table (RocksDB + changelog), one input partition at a time.

Keys start with the input partition, so a worker rebuilds exactly the partitions it owns;
:func:`partition_context` is the only place that touches Faust's private "current event".
Reference: docs/design/windows.md (state layout)
"""

from __future__ import annotations

import contextlib
import weakref
import zlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import orjson
from faust import streams as faust_streams

from tables.aggregate import Aggregate, BucketKey
from tables.streams import StreamPoint
from tables.windows import AppProgress, PartitionWindows


class _PartitionEvent:
    """Just enough of a faust Event for table routing: ``.message.partition`` and ``.message.topic``."""

    def __init__(self, topic: str, partition: int) -> None:
        self.message = SimpleNamespace(topic=topic, partition=partition)


@contextlib.contextmanager
def partition_context(topic: str, partition: int) -> Iterator[None]:
    event = _PartitionEvent(topic, partition)
    # Duck-typed stand-in for an Event (see module docstring); Faust reads only .message.partition/.topic.
    token = faust_streams._current_event.set(weakref.ref(event))  # type: ignore[arg-type]
    try:
        yield
    finally:
        faust_streams._current_event.reset(token)


def window_key(p: int, key: BucketKey) -> bytes:
    return f"{p}|w|{key.app}|{key.process_type}|{key.start_ms}".encode()


def app_key(p: int, app: str) -> bytes:
    return f"{p}|a|{app}".encode()


def stream_key(p: int, app: str, stream: str) -> bytes:
    return f"{p}|s|{app}|{stream}".encode()


def partition_key(p: int) -> bytes:
    return f"{p}|p".encode()


Stored = tuple[list[Aggregate], dict[str, AppProgress], int, dict[tuple[str, str], StreamPoint]]
"""One partition's state: open windows, app progress, offset, cumulative streams."""


class WindowTableState:
    """Reads and writes :class:`PartitionWindows` through a Faust table (any store: rocksdb, memory)."""

    def __init__(self, table: Any, source_topic: str) -> None:
        self.table = table
        self.source_topic = source_topic

    def persist(self, pw: PartitionWindows) -> int:
        """Write what changed since the last call: windows, then apps, then the partition offset.

        The order matters for idempotence (tables/windows.py): a later record never claims more than
        the earlier ones already hold. Returns the number of records written.
        """
        wins, apps = pw.take_dirty()
        streams, gone = pw.take_dirty_streams()
        p = pw.partition
        with partition_context(self.source_topic, p):
            for agg in wins:
                self.table[window_key(p, agg.key)] = zlib.compress(orjson.dumps(agg.to_record()), 1)
            for (app, stream), point in streams:  # after the windows their deltas went into
                self.table[stream_key(p, app, stream)] = orjson.dumps(point.to_record())
            for app, stream in gone:
                k = stream_key(p, app, stream)
                if k in self.table:
                    del self.table[k]
            for app, prog in apps:
                self.table[app_key(p, app)] = orjson.dumps(prog.to_record())
            self.table[partition_key(p)] = orjson.dumps(pw.offset)
        return len(wins) + len(streams) + len(gone) + len(apps) + 1

    def forget(self, pw: PartitionWindows, closed: list[Aggregate]) -> None:
        """Delete closed windows (after their app progress was persisted)."""
        p = pw.partition
        with partition_context(self.source_topic, p):
            for agg in closed:
                k = window_key(p, agg.key)
                if k in self.table:
                    del self.table[k]

    def load_all(self, partitions: set[int]) -> dict[int, Stored]:
        """Everything stored for the given partitions, grouped by partition (one scan of the table)."""
        out: dict[int, Stored] = {p: ([], {}, -1, {}) for p in partitions}
        for raw_key, raw in self.table.items():
            if raw is None:
                continue
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            head, _, rest = key.partition("|")
            try:
                p = int(head)
            except ValueError:
                continue
            if p not in out:
                continue
            wins, apps, _offset, streams = out[p]
            kind, _, name = rest.partition("|")
            if kind == "w":
                wins.append(Aggregate.from_record(orjson.loads(zlib.decompress(raw))))
                continue
            value = orjson.loads(raw)
            if kind == "s":
                app, _, stream = name.rpartition("|")
                streams[app, stream] = StreamPoint.from_record(value)
            elif kind == "a":
                apps[name] = AppProgress.from_record(value)
            elif kind == "p":
                out[p] = (wins, apps, int(value), streams)
        return out

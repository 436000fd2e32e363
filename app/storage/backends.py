"""Which store a process uses: ``METRICS_STORE`` picks the backend of every store protocol
(app/storage/protocol.py). Composition roots (worker, web, ingest, CLI) ask here, never a backend module."""

from __future__ import annotations

from app.clock import Clock
from app.ops.stats import Counters
from app.settings import Settings
from app.storage.protocol import Backend, FrameTable, TokenTable


def metrics_store(settings: Settings, *, store: str | None = None, counters: Counters | None = None,
                  clock: Clock | None = None) -> Backend:
    """The metrics store named ``store`` (default ``settings.store``)."""
    name = store or settings.store
    if name == "cassandra":
        from app.storage.cassandra import (
            CassandraStore,  # acsylla loads only where Cassandra is used
        )
        return CassandraStore(settings, clock=clock)
    from app.storage.dynamodb import DynamoStore
    return DynamoStore(settings, clock=clock, counters=counters)


def token_table(settings: Settings, *, store: str | None = None) -> TokenTable:
    if (store or settings.store) == "cassandra":
        from app.storage.cassandra import CassandraTokens
        return CassandraTokens(settings)
    from app.storage.dynamodb import DynamoTokens
    return DynamoTokens(settings)


def frame_table(settings: Settings, *, store: str | None = None) -> FrameTable:
    if (store or settings.store) == "cassandra":
        from app.storage.cassandra import CassandraFrames
        return CassandraFrames(settings)
    from app.storage.dynamodb import DynamoFrames
    return DynamoFrames(settings)

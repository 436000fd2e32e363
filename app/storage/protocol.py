"""The store protocols: what the sinks, rollups, events job and query engine need from any store.

Backends (app/storage/dynamodb.py, app/storage/cassandra.py) implement them and app/storage/backends.py makes
them; nothing above storage knows which one runs. A series holds ``DIGEST`` items (full aggregates, for
merging) and ``SUMMARY`` items (rendered chart points), kept apart so a read of one never pays for the other.
Reference: docs/design/storage.md
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Kind = Literal["digest", "summary"]
DIGEST: Kind = "digest"
SUMMARY: Kind = "summary"


@dataclass(frozen=True, slots=True)
class MetricItem:
    app: str
    process_type: str
    resolution_s: int
    """60 for minutes; rollups use 600, 3600, 7200."""
    ts_s: int
    """Bucket start, epoch seconds."""
    payload: bytes
    """Opaque bytes (an aggregate, tables/record.py, or a summary block); the store never parses them."""
    kind: Kind = DIGEST
    span_s: int = 0
    """How far past ``ts_s`` the item holds data (a summary block's span); retention counts from the end, so
    a block's newest point lives as long as the digest item it summarizes."""


@dataclass(frozen=True, slots=True)
class Progress:
    """How far the pipeline has stored one ``metrics-1m`` partition (agents/progress.py writes it)."""

    partition: int
    stored_through_ms: int
    """Event time: every minute of the partition's apps ending at or before it is stored (minute items,
    rollups, summary blocks), except late minutes, which are listed in ``changed``."""
    updated_ms: int
    """Wall clock of the write; its age is the lag operators watch."""
    changed: dict[str, int]
    """app -> wall clock (ms) of the latest minute stored after ``stored_through_ms`` had passed it (a late
    or re-sent minute): query caches drop that app's answers. Kept for the query cache's max age."""


class MetricsStore(Protocol):
    async def put_many(self, items: Sequence[MetricItem]) -> None:
        """Store all items (overwriting same keys); returns only when every item was accepted."""
        ...

    async def query(self, app: str, process_type: str, resolution_s: int, since_s: int,
                    until_s: int, kind: Kind = DIGEST) -> list[MetricItem]:
        """Items of ``kind`` with since_s <= ts_s < until_s, sorted by ts_s, expired ones omitted."""
        ...

    async def series(self) -> list[tuple[str, str]]:
        """``(app, process type)`` of every series with minute items, sorted. A full scan of the store:
        for operator commands (``migration verify``), never on a request path."""
        ...

    async def put_progress(self, progress: Sequence[Progress]) -> None:
        """Store these partitions' progress (overwriting)."""
        ...

    async def progress(self) -> list[Progress]:
        """Every partition's latest progress, in partition order."""
        ...


class Lifecycle(Protocol):
    async def start(self) -> None:
        """Connect (and create the schema when settings allow); kept for the process lifetime."""
        ...

    async def stop(self) -> None:
        ...

    async def ping(self) -> None:
        """Readiness: the store answers (StoreUnavailable / StoreError otherwise)."""
        ...


class MetricsBackend(MetricsStore, Lifecycle, Protocol):
    """A metrics store a process starts, stops and checks."""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A stored token's description (the token itself is never stored: only its SHA-256, the key)."""

    id: str
    app: str
    kind: str
    created_s: int
    revoked_s: int = 0
    """When the token was revoked (epoch seconds); 0: live. A revoked token stays in the table as a tombstone,
    so a store migration's copy, or a store that missed the revocation, cannot bring it back."""


class TokenTable(Lifecycle, Protocol):
    """Tokens by the hex SHA-256 of the token (app/storage/tokens.py holds the logic around it)."""

    async def put_token(self, key: str, info: TokenInfo) -> None:
        """Store ``info`` under ``key``. A revocation is never undone: a put with ``revoked_s == 0`` leaves the
        ``revoked_s`` already stored (a tombstone wins over any copy of the live token)."""
        ...

    async def get_token(self, key: str) -> TokenInfo | None:
        """Read with the store's strongest consistency: a revoked token must not verify again."""
        ...

    async def all_tokens(self) -> list[tuple[str, TokenInfo]]:
        """Every ``(key, info)``, tombstones included: a small table, read whole to list, copy and revoke by id."""
        ...

    async def delete_token(self, key: str) -> None:
        """Forget ``key``, tombstone included (revocation writes a tombstone instead: ``put_token``)."""
        ...


class FrameTable(Lifecycle, Protocol):
    """Logplex frame ids being or already delivered (app/ingest/dedup.py), each living ``expires_s``."""

    async def claim(self, key: str, *, now_ms: int, lease_until_ms: int, expires_s: int) -> bool:
        """Atomically: mark ``key`` pending until ``lease_until_ms`` when it is absent, expired, or pending
        with a lease older than ``now_ms`` (its producer died). True when this call claimed it."""
        ...

    async def is_done(self, key: str) -> bool:
        """Whether the frame was delivered (False: absent, or pending in another attempt)."""
        ...

    async def mark_done(self, key: str, *, expires_s: int) -> None:
        ...

    async def release(self, key: str) -> None:
        """Drop a pending claim after a failed delivery (a done one stays)."""
        ...

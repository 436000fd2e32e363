"""Tokens and frame ids during a migration. They are not time series, so they are not dual-written by
the writers: ``migration start`` copies the tokens to the new store, then every change is made in each
store the state writes, and reads go to the state's source (the new store after ``finish``), a revocation
tombstone in any written store winning (:class:`FollowingTokens`). Frame ids
live minutes (``dedup_window_s``): they follow the source, so a frame retried exactly across ``finish``
may be counted twice (docs/operations/migration.md)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from app.errors import PipelineError
from app.migration.state import MigrationState, store_settings
from app.settings import Settings
from app.storage.backends import frame_table, token_table
from app.storage.protocol import FrameTable, Lifecycle, TokenInfo, TokenTable

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Lifecycle)


class _PerStore(Generic[T]):
    def __init__(self, settings: Settings, state: Callable[[], MigrationState],
                 make: Callable[[Settings], T]) -> None:
        self.settings, self.state, self.make = settings, state, make
        self._tables: dict[str, T] = {}

    async def table(self, spec: str) -> T:
        t = self._tables.get(spec)
        if t is None:
            t = self.make(store_settings(self.settings, spec))
            await t.start()
            self._tables[spec] = t
        return t

    async def start(self) -> None:
        await self.table(self.state().source)

    async def stop(self) -> None:
        for t in self._tables.values():
            await t.stop()
        self._tables.clear()

    async def ping(self) -> None:
        await (await self.table(self.state().source)).ping()


class FollowingTokens(_PerStore[TokenTable]):
    """A TokenTable over every store the migration state names.

    Writes (creations, revocation tombstones) go to every store, the source first. Reads consult every store
    too and a tombstone in any of them wins: a revocation one store missed (made between ``migration
    start``'s copy and the state's publish, or failed half-way) does not come back when the other store is
    read; ``all_tokens`` merges them the same way, so a revocation is repeated in every store. A store other
    than the source that does not answer is skipped on ``get_token`` (logged): the source, written first,
    holds every tombstone, and no tenant's auth may depend on the store being moved to."""

    def __init__(self, settings: Settings, state: Callable[[], MigrationState]) -> None:
        super().__init__(settings, state, lambda s: token_table(s))

    async def put_token(self, key: str, info: TokenInfo) -> None:
        for spec in self.state().writes:
            await (await self.table(spec)).put_token(key, info)

    async def get_token(self, key: str) -> TokenInfo | None:
        state = self.state()
        source = await (await self.table(state.source)).get_token(key)
        others = [spec for spec in state.writes if spec != state.source]
        if not others or (source is not None and source.revoked_s):
            return source
        found = await asyncio.gather(*(self._get_other(spec, key) for spec in others))
        return next((info for info in found if info is not None and info.revoked_s), source)

    async def _get_other(self, spec: str, key: str) -> TokenInfo | None:
        try:
            return await (await self.table(spec)).get_token(key)
        except PipelineError as exc:
            log.warning("token table of %s unavailable, its revocations not consulted: %s", spec, exc)
            return None

    async def all_tokens(self) -> list[tuple[str, TokenInfo]]:
        """Every store's tokens by key, a tombstone over a live copy."""
        tables = [await self.table(spec) for spec in self.state().writes]
        parts = await asyncio.gather(*(t.all_tokens() for t in tables))
        merged: dict[str, TokenInfo] = {}
        for part in parts:
            for key, info in part:
                if key not in merged or (info.revoked_s and not merged[key].revoked_s):
                    merged[key] = info
        return list(merged.items())

    async def delete_token(self, key: str) -> None:
        for spec in self.state().writes:
            await (await self.table(spec)).delete_token(key)


class FollowingFrames(_PerStore[FrameTable]):
    """A FrameTable on the migration state's source store."""

    def __init__(self, settings: Settings, state: Callable[[], MigrationState]) -> None:
        super().__init__(settings, state, lambda s: frame_table(s))

    async def _source(self) -> FrameTable:
        return await self.table(self.state().source)

    async def claim(self, key: str, *, now_ms: int, lease_until_ms: int, expires_s: int) -> bool:
        return await (await self._source()).claim(key, now_ms=now_ms, lease_until_ms=lease_until_ms,
                                                  expires_s=expires_s)

    async def is_done(self, key: str) -> bool:
        return await (await self._source()).is_done(key)

    async def mark_done(self, key: str, *, expires_s: int) -> None:
        await (await self._source()).mark_done(key, expires_s=expires_s)

    async def release(self, key: str) -> None:
        await (await self._source()).release(key)

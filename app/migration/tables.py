"""Tokens and frame ids during a migration. They are not time series, so they are not dual-written by
the writers: ``migration start`` copies the tokens to the new store, then every change is made in each
store the state writes, and reads go to the state's source (the new store after ``finish``). Frame ids
live minutes (``dedup_window_s``): they follow the source, so a frame retried exactly across ``finish``
may be counted twice (README, "Moving stores")."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from app.migration.state import MigrationState, store_settings
from app.settings import Settings
from app.storage.backends import frame_table, token_table
from app.storage.protocol import FrameTable, Lifecycle, TokenInfo, TokenTable

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
    """A TokenTable over every store the migration state names."""

    def __init__(self, settings: Settings, state: Callable[[], MigrationState]) -> None:
        super().__init__(settings, state, lambda s: token_table(s))

    async def put_token(self, key: str, info: TokenInfo) -> None:
        for spec in self.state().writes:
            await (await self.table(spec)).put_token(key, info)

    async def get_token(self, key: str) -> TokenInfo | None:
        return await (await self.table(self.state().source)).get_token(key)

    async def all_tokens(self) -> list[tuple[str, TokenInfo]]:
        return await (await self.table(self.state().source)).all_tokens()

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

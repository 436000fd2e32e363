"""Logplex frame deduplication that survives restarts and is shared by every ingest process.

A frame id is claimed ``pending`` with a lease, marked ``done`` once Kafka acknowledged every record, and lives
``dedup_window_s``. Left open: a process dying between the ack and ``done`` lets the retry produce the frame
again once the lease expires.
Reference: docs/ingest.md#heroku-log-drains-post-v1drainslogplex-python-m-app-ingest
"""

from __future__ import annotations

import enum

from app.clock import Clock, SystemClock
from app.settings import IngestSettings
from app.storage.protocol import FrameTable


class Claim(enum.Enum):
    NEW = "new"  # produce it
    DONE = "done"  # already delivered: answer 2xx, produce nothing
    BUSY = "busy"  # another attempt is in flight: answer 503


class FrameDedup:
    """Claims, completes and releases frame ids on the store's frame table (``METRICS_STORE``)."""

    def __init__(self, ingest: IngestSettings, *, table: FrameTable, clock: Clock | None = None) -> None:
        """``table``: the store's (``frame_table(settings)``: METRICS_STORE's), or one following a migration."""
        self.table = table
        self.ingest = ingest
        self.clock = clock or SystemClock()

    async def start(self) -> None:
        await self.table.start()

    async def stop(self) -> None:
        await self.table.stop()

    async def ping(self) -> None:
        await self.table.ping()

    @staticmethod
    def _key(app: str, frame_id: str) -> str:
        return f"{app}#{frame_id}"

    async def claim(self, app: str, frame_id: str) -> Claim:
        now_ms = self.clock.now_ms()
        key = self._key(app, frame_id)
        if await self.table.claim(key, now_ms=now_ms, lease_until_ms=now_ms + int(self.ingest.dedup_lease_s * 1000),
                                  expires_s=now_ms // 1000 + int(self.ingest.dedup_window_s)):
            return Claim.NEW
        return Claim.DONE if await self.table.is_done(key) else Claim.BUSY

    async def complete(self, app: str, frame_id: str) -> None:
        expires_s = self.clock.now_ms() // 1000 + int(self.ingest.dedup_window_s)
        await self.table.mark_done(self._key(app, frame_id), expires_s=expires_s)

    async def release(self, app: str, frame_id: str) -> None:
        """Give the claim up after a failed delivery, so Logplex's retry is not answered BUSY."""
        await self.table.release(self._key(app, frame_id))

"""Per-tenant limits, Mimir-style: a default for every limit, per-app overrides changed without a restart, and
the two mechanisms that enforce them: token :class:`Buckets` (rates) and :class:`FairSlots` (fair shares).

A limits file that cannot be read keeps the overrides in force and is logged with the line to fix.
Reference: docs/ingest.md#per-tenant-limits-mimir-style
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

import yaml

from app.errors import ConfigError
from app.settings import LimitSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AppLimits:
    """One app's limits; see the settings of the same names (``limit_*``) for what each bounds."""

    ingest_rate_bytes_s: float
    ingest_burst_bytes: int
    inflight_bytes_per_token: int
    max_process_types: int
    max_addon_sources: int
    max_metric_names: int
    # Defaulted, so an AppLimits built by hand for the ingest side (tables/windows.py) need not name them.
    query_rate_per_s: float = LimitSettings.model_fields["query_rate_per_s"].default
    query_burst: int = LimitSettings.model_fields["query_burst"].default

    @classmethod
    def defaults(cls, limits: LimitSettings) -> AppLimits:
        return cls(ingest_rate_bytes_s=limits.ingest_rate_bytes_s,
                   ingest_burst_bytes=limits.ingest_burst_bytes,
                   inflight_bytes_per_token=limits.inflight_bytes_per_token,
                   max_process_types=limits.process_types,
                   max_addon_sources=limits.addon_sources,
                   max_metric_names=limits.max_metric_names,
                   query_rate_per_s=limits.query_rate_per_s,
                   query_burst=limits.query_burst)


LIMIT_NAMES = tuple(f.name for f in fields(AppLimits))


def parse_overrides(doc: Any, defaults: AppLimits) -> dict[str, AppLimits]:
    """``{"overrides": {app: {limit: value}}}`` -> each app's limits; ConfigError naming what is wrong."""
    if doc is None:
        return {}
    if not isinstance(doc, Mapping) or not isinstance(doc.get("overrides", {}), Mapping):
        raise ConfigError("the limits file must be a mapping with an 'overrides' mapping of app -> limits",
                          action="see docs: per-tenant limits")
    out: dict[str, AppLimits] = {}
    for app, given in (doc.get("overrides") or {}).items():
        if not isinstance(given, Mapping):
            raise ConfigError(f"overrides.{app} must be a mapping of limit -> value",
                              action="see docs: per-tenant limits")
        values: dict[str, Any] = {}
        for name, value in given.items():
            if name not in LIMIT_NAMES:
                raise ConfigError(f"overrides.{app}.{name} is not a limit; known: {', '.join(LIMIT_NAMES)}",
                                  action="fix the limits file")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"overrides.{app}.{name}={value!r} must be a number >= 0",
                                  action="fix the limits file")
            kind = type(getattr(defaults, name))
            try:
                values[name] = kind(value)
            except (ValueError, OverflowError):  # .inf or .nan for a count
                raise ConfigError(f"overrides.{app}.{name}={value!r} must be a finite number",
                                  action="fix the limits file") from None
        out[str(app)] = replace(defaults, **values)
    return out


MAX_RETRY_AFTER_S = 60


class Buckets:
    """Token buckets by key (an app, a client address), each refilled at its ``rate_per_s`` up to its
    ``burst``; the rate and burst are given on every call, so an override applies at once. At most
    ``max_keys`` are kept (least recently used dropped: a dropped bucket comes back full, which it nearly
    always is). One per process (a single event loop: no locks)."""

    def __init__(self, *, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._levels: OrderedDict[str, tuple[float, int]] = OrderedDict()
        """key -> (level, when it was last refilled, ms)"""

    def level(self, key: str, *, rate_per_s: float, burst: float, now_ms: int) -> float:
        """The key's level now (a new key's is ``burst``); below 0 while in debt."""
        got = self._levels.get(key)
        if got is None:
            level = float(burst)
        else:
            level, stamp_ms = got
            level = min(float(burst), level + max(0, now_ms - stamp_ms) / 1000 * rate_per_s)
        self._levels[key] = (level, now_ms)
        self._levels.move_to_end(key)
        if len(self._levels) > self.max_keys:
            self._levels.popitem(last=False)
        return level

    def charge(self, key: str, n: float, *, rate_per_s: float, burst: float, now_ms: int) -> None:
        """Take ``n`` from the key's bucket, into debt if need be."""
        self._levels[key] = (self.level(key, rate_per_s=rate_per_s, burst=burst, now_ms=now_ms) - n, now_ms)

    @staticmethod
    def retry_after_s(level: float, need: float, rate_per_s: float) -> int:
        """Whole seconds until a bucket at ``level`` holds ``need`` (1..MAX_RETRY_AFTER_S)."""
        wait_s = math.ceil((need - level) / rate_per_s) if rate_per_s > 0 else MAX_RETRY_AFTER_S
        return max(1, min(wait_s, MAX_RETRY_AFTER_S))


class FairSlots:
    """At most ``slots`` pieces of work at once, at most ``per_app`` of them one app's (the ingest's parse slots,
    the read API's query slots). Work without a slot waits up to ``wait_s`` (None: until it gets one); a freed
    slot goes to the waiting apps in turn (round robin, first come first served within an app), skipping apps
    that already hold their share, so a quiet app never waits behind a busy one's backlog. ``slots`` 0: no cap.
    One per process (a single event loop: no locks)."""

    def __init__(self, slots: int, per_app: int, wait_s: float | None) -> None:
        self.slots = max(0, slots)
        self.per_app = min(per_app, self.slots) if per_app > 0 else self.slots
        self.per_app = max(1, self.per_app)
        self.wait_s = wait_s
        self.busy = 0
        self.held: dict[str, int] = {}
        self._queues: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    def _free_for(self, app: str) -> bool:
        return self.busy < self.slots and self.held.get(app, 0) < self.per_app

    def _take(self, app: str) -> None:
        self.busy += 1
        self.held[app] = self.held.get(app, 0) + 1

    async def acquire(self, app: str) -> bool:
        """True: a slot is held (give it back with :meth:`release`); False: none freed within ``wait_s``."""
        if self.slots == 0:
            return True
        if app not in self._queues and self._free_for(app):
            self._take(app)
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(app, deque()).append(fut)
        try:
            await asyncio.wait((fut,), timeout=self.wait_s)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(app)  # handed a slot while being cancelled: pass it on
            else:
                self._forget(app, fut)
            raise
        if fut.done():
            return True  # handed over by _dispatch, already counted
        self._forget(app, fut)
        return False

    def release(self, app: str) -> None:
        if self.slots == 0:
            return
        self.busy -= 1
        left = self.held[app] - 1
        if left:
            self.held[app] = left
        else:
            del self.held[app]
        self._dispatch()

    def _forget(self, app: str, fut: asyncio.Future[None]) -> None:
        fut.cancel()
        q = self._queues.get(app)
        if q is not None and fut in q:
            q.remove(fut)
            if not q:
                del self._queues[app]

    def _dispatch(self) -> None:
        """Free slots to the first waiting apps, in turn, that hold less than their share."""
        while self.busy < self.slots:
            for app, q in self._queues.items():  # noqa: B007  q is the queue found, used after the break
                if self.held.get(app, 0) < self.per_app:
                    break
            else:
                return
            fut = q.popleft()
            if q:
                self._queues.move_to_end(app)  # its next query waits for every other app's turn
            else:
                del self._queues[app]
            if not fut.done():
                self._take(app)
                fut.set_result(None)

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def waiting_of(self, app: str) -> int:
        q = self._queues.get(app)
        return 0 if q is None else len(q)

    @asynccontextmanager
    async def slot(self, app: str) -> AsyncIterator[None]:
        """Holds a slot for the block (waiting for it as long as ``wait_s`` allows; TimeoutError past it)."""
        if not await self.acquire(app):
            raise TimeoutError(f"no slot freed within {self.wait_s} s")
        try:
            yield
        finally:
            self.release(app)



class Limits:
    """Looks up an app's limits; reloads the overrides file in the background when it changes."""

    def __init__(self, limits: LimitSettings, *, overrides: Mapping[str, AppLimits] | None = None) -> None:
        self.defaults = AppLimits.defaults(limits)
        self.path = limits.file
        self.reload_s = limits.reload_s
        self._overrides: dict[str, AppLimits] = dict(overrides or {})
        self._mtime_ns: int | None = None
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0

    def of(self, app: str) -> AppLimits:
        return self._overrides.get(app, self.defaults)

    async def start(self) -> None:
        """Load the file once (a broken file at start is the operator's error: raised), then follow it."""
        if not self.path:
            return
        if not await self.reload():
            raise ConfigError(f"cannot use the limits file {self.path}; see the log",
                              action="fix METRICS_LIMITS_FILE or the file")
        self._task = asyncio.create_task(self._follow(), name="limits-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.reload_s)
            await self.reload()

    async def reload(self) -> bool:
        """Re-read the file if it changed. False (and a log line) when it is unreadable or invalid; the
        overrides in force stay."""
        try:
            got = await asyncio.to_thread(self._read_if_changed)
        except (OSError, yaml.YAMLError, ConfigError) as exc:
            log.error("limits file %s not applied, the previous limits stay in force: %s", self.path, exc)
            return False
        if got is not None:
            self._overrides, self._mtime_ns = got
            self.reloads += 1
            log.info("limits file %s applied: overrides for %d apps", self.path, len(self._overrides))
        return True

    def _read_if_changed(self) -> tuple[dict[str, AppLimits], int] | None:
        mtime_ns = os.stat(self.path).st_mtime_ns
        if mtime_ns == self._mtime_ns:
            return None
        with open(self.path, "rb") as f:
            doc = yaml.safe_load(f)
        return parse_overrides(doc, self.defaults), mtime_ns

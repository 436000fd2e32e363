"""Who may send how much: per-app rate and burst, per-token bytes in flight, a fair share of the process.

Charged on body bytes as they arrive, after the token check, never on a declared ``Content-Length``; refused
as early as it can be (before the body, while it is read), and parse slots are served app by app.
Reference: docs/ingest.md#per-tenant-limits-mimir-style
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from app.clock import Clock, SystemClock
from app.limits import Buckets, FairSlots, Limits
from app.ops.stats import CounterName, Counters
from app.settings import IngestSettings

CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is not taken now; the sender should retry after ``retry_after_s``."""

    code: str
    message: str
    retry_after_s: int
    counter: CounterName
    status: int | None = None
    """A fixed status (413 for a body over its limit); None: 503 on the drain, ``api_status`` on the JSON API."""
    api_status: int = 429


class Admission:
    """One per ingest process (a single event loop: no locks)."""

    def __init__(self, ingest: IngestSettings, limits: Limits, counters: Counters, *, clock: Clock | None = None
                 ) -> None:
        self.limits = limits
        self.counters = counters
        self.clock = clock or SystemClock()
        self.budget_bytes = ingest.max_inflight_bytes
        self.max_body_bytes = ingest.max_body_bytes
        self.max_ratio = ingest.max_decompressed_ratio
        self.slots = FairSlots(ingest.work_slots, ingest.work_slots, None)
        self.max_waiting = ingest.max_waiting_per_app
        self.body_timeout_s = ingest.body_timeout_s
        self.max_active = ingest.max_active_requests
        self._active: dict[str, int] = {}
        self.active_total = 0
        self._buckets = Buckets()
        self.held_bytes = 0
        self._held_by_app: dict[str, int] = {}
        self._held_by_token: dict[str, int] = {}

    # --- rate ------------------------------------------------------------------------------------------
    def _rate(self, app: str) -> dict[str, Any]:
        lim = self.limits.of(app)
        return {"rate_per_s": lim.ingest_rate_bytes_s, "burst": lim.ingest_burst_bytes,
                "now_ms": self.clock.now_ms()}

    # --- before the body -------------------------------------------------------------------------------
    @asynccontextmanager
    async def request(self, app: str) -> AsyncIterator[Refusal | None]:
        """A request of ``app`` from its admission to its answer: the refusal decided before a byte of its
        body is read, or None (then it counts as in progress until the block ends)."""
        refusal = self.refuse_early(app)
        if refusal is not None:
            yield refusal
            return
        self._active[app] = self._active.get(app, 0) + 1
        self.active_total += 1
        try:
            yield None
        finally:
            self.active_total -= 1
            left = self._active[app] - 1
            if left:
                self._active[app] = left
            else:
                del self._active[app]

    def refuse_early(self, app: str) -> Refusal | None:
        rate = self._rate(app)
        level = self._buckets.level(app, **rate)
        if level <= 0:
            return Refusal("rate_limited", f"app {app!r} is over its ingest rate of {rate['rate_per_s']:,.0f} "
                                           "bytes/s; retry after the delay (the operator can raise the app's limit)",
                           Buckets.retry_after_s(level, 0, rate["rate_per_s"]), "ingest_refused_rate")
        waiting = self.slots.waiting_of(app)
        if waiting >= self.max_waiting:
            return Refusal("queue_full", f"app {app!r} already has {waiting} requests waiting at this ingest "
                                         "process; retry after the delay", 1, "ingest_refused_queue")
        active = self._active.get(app, 0)
        # Past the cap, only the heaviest apps are shed (max-min fairness): an app that took every request
        # slot before others arrived holds more than its share until its requests drain, and an app below
        # it must not be refused meanwhile because the queue it waits in is that app's.
        if (self.active_total >= self.max_active and active >= max(1, self.max_active // len(self._active))
                and active >= max(self._active.values())):
            return Refusal("overloaded", "the ingest is at capacity and this app has more than its share of the "
                                         "requests in progress; retry after the delay", 1, "ingest_requests_shed")
        return None

    # --- the body --------------------------------------------------------------------------------------
    @asynccontextmanager
    async def body(self, request: web.Request, app: str, token_id: str) -> AsyncIterator[bytes | Refusal]:
        """Reads the body, charging every chunk as it arrives; the bytes stay held (in flight) until the block
        ends. Yields the body or the refusal (the rest of the body then stays unread; the caller closes the
        connection)."""
        held = 0
        limit = self.max_body_bytes
        declared = request.content_length
        if declared is not None and request.headers.get("Content-Encoding", "identity").lower() != "identity":
            limit = min(limit, declared * self.max_ratio)  # aiohttp inflates as it reads: count what comes out
        parts: list[bytes] = []
        lim = self.limits.of(app)
        try:
            refusal: Refusal | None = None
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    async for chunk in request.content.iter_chunked(CHUNK_BYTES):
                        n = len(chunk)
                        if held + n > limit:
                            refusal = Refusal("body_too_large", f"request body over the {limit} byte limit (after "
                                                                "decompression); send smaller batches", 1,
                                              "ingest_refused_too_large", status=413)
                            break
                        refusal = self._charge(app, token_id, n, lim.inflight_bytes_per_token)
                        if refusal is not None:
                            break
                        held += n
                        parts.append(chunk)
            except (RequestPayloadError, ConnectionError) as exc:
                # A body that does not decompress, or a sender gone half-way: this request's fault only.
                refusal = Refusal("malformed_body", f"the request body cannot be read: {exc}", 1,
                                  "ingest_refused_bad_body", status=400)
            except TimeoutError:
                # A slow-body client must not hold a connection and a buffer for ever. Logplex drops a frame
                # on any 4xx but retries a 5xx, and a slow network is no reason to lose a frame: 503 there.
                refusal = Refusal("body_timeout", f"the request body did not arrive within "
                                                  f"{self.body_timeout_s:g} s; send it at once", 5,
                                  "ingest_refused_slow_body", api_status=408)
            yield refusal if refusal is not None else b"".join(parts)
        finally:
            self._release(app, token_id, held)

    def _charge(self, app: str, token_id: str, n: int, token_limit: int) -> Refusal | None:
        token_held = self._held_by_token.get(token_id, 0)
        if token_held + n > token_limit:
            return Refusal("inflight_limit", f"this token has {token_held + n:,} request bytes in flight, over its "
                                             f"{token_limit:,}; send fewer requests at once", 1,
                           "ingest_refused_inflight")
        app_held = self._held_by_app.get(app, 0)
        if self.held_bytes + n > self.budget_bytes and app_held:
            share = self.budget_bytes // max(1, len(self._held_by_app))
            if app_held + n > share:
                return Refusal("overloaded", "the ingest is at capacity and this app holds more than its share "
                                             "of it; retry after the delay", 1, "ingest_requests_shed")
        # The rate was checked before the body (refuse_early): an admitted body finishes, in debt if need be,
        # as refusing it half-way would charge the app for bytes it must send again.
        self._buckets.charge(app, n, **self._rate(app))
        self.held_bytes += n
        self._held_by_app[app] = app_held + n
        self._held_by_token[token_id] = token_held + n
        self.counters.inc_app("ingest_bytes_received", app, n)
        return None

    def _release(self, app: str, token_id: str, n: int) -> None:
        if not n:
            return
        self.held_bytes -= n
        for held, key in ((self._held_by_app, app), (self._held_by_token, token_id)):
            left = held[key] - n
            if left:
                held[key] = left
            else:
                del held[key]

    # --- parse slots, app by app -----------------------------------------------------------------------
    def slot(self, app: str) -> AbstractAsyncContextManager[None]:
        """One of the process's parse slots; when all are busy, apps take turns."""
        return self.slots.slot(app)

    @property
    def waiting(self) -> int:
        return self.slots.waiting

"""Who may send how much: per-app rate and burst, per-token bytes in flight, and a fair share of the process.

Every budget is charged on body bytes as they arrive, after the token was verified, never on a declared
``Content-Length``: a client that declares 4 MB and sends nothing holds nothing. Refusals happen as early as
they can, so a refused request costs little CPU:

1. before the body is read: the app's rate bucket is in debt, or the app already has
   ``ingest_max_waiting_per_app`` requests waiting for a parse slot, or the process has
   ``ingest_max_active_requests`` requests in progress and this app more than its share of them (the
   budget divided by the apps with requests in progress). That share bounds how much of the event loop's
   queue one app's requests fill, which is what a quiet app's request waits behind;
2. while it is read: the chunk would take the token past ``inflight_bytes_per_token``, or the process past
   ``ingest_max_inflight_bytes`` while this app holds more than its fair share of it (the budget divided by
   the apps with bytes in flight), or the body past its limit;
3. parsing waits for one of ``ingest_work_slots``; waiting requests are served app by app in turn, so a quiet
   app's request waits for at most one request of each other app, never behind a flooding app's backlog.

The rate is checked before a body is read; an admitted body is read to its end even if that takes the
bucket into debt (by at most one body per request in flight), and the next request's ``Retry-After`` is the
time the debt takes to repay. Refusing a body half-way would charge the app for bytes it must send again.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from app.clock import Clock, SystemClock
from app.limits import Limits
from app.ops.stats import Counters
from app.settings import Settings

CHUNK_BYTES = 64 * 1024
MAX_TRACKED_APPS = 100_000
"""Rate buckets kept (least recently used dropped: a dropped bucket is a full one, which it nearly always is)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is not taken now; the sender should retry after ``retry_after_s``."""

    code: str
    message: str
    retry_after_s: int
    counter: str
    status: int | None = None
    """A fixed status (413 for a body over its limit); None: 503 on the drain, ``api_status`` on the JSON API."""
    api_status: int = 429


class _Bucket:
    __slots__ = ("level", "stamp_ms")

    def __init__(self, level: float, stamp_ms: int) -> None:
        self.level = level
        self.stamp_ms = stamp_ms


class Admission:
    """One per ingest process (a single event loop: no locks)."""

    def __init__(self, settings: Settings, limits: Limits, counters: Counters, *, clock: Clock | None = None
                 ) -> None:
        self.limits = limits
        self.counters = counters
        self.clock = clock or SystemClock()
        self.budget_bytes = settings.ingest_max_inflight_bytes
        self.max_body_bytes = settings.ingest_max_body_bytes
        self.max_ratio = settings.ingest_max_decompressed_ratio
        self.slots = settings.ingest_work_slots
        self.max_waiting = settings.ingest_max_waiting_per_app
        self.body_timeout_s = settings.ingest_body_timeout_s
        self.max_active = settings.ingest_max_active_requests
        self._active: dict[str, int] = {}
        self.active_total = 0
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.held_bytes = 0
        self._held_by_app: dict[str, int] = {}
        self._held_by_token: dict[str, int] = {}
        self._busy = 0
        self._queues: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    # --- rate ------------------------------------------------------------------------------------------
    def _bucket(self, app: str) -> _Bucket:
        now_ms = self.clock.now_ms()
        lim = self.limits.of(app)
        b = self._buckets.get(app)
        if b is None:
            b = self._buckets[app] = _Bucket(float(lim.ingest_burst_bytes), now_ms)
            if len(self._buckets) > MAX_TRACKED_APPS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(app)
            b.level = min(float(lim.ingest_burst_bytes),
                          b.level + (now_ms - b.stamp_ms) / 1000 * lim.ingest_rate_bytes_s)
            b.stamp_ms = now_ms
        return b

    def _rate_refusal(self, app: str, b: _Bucket) -> Refusal:
        rate = self.limits.of(app).ingest_rate_bytes_s
        wait_s = math.ceil(-b.level / rate) if rate > 0 else 60
        return Refusal("rate_limited", f"app {app!r} is over its ingest rate of {rate:,.0f} bytes/s; retry after "
                                       "the delay (the operator can raise the app's limit)",
                       max(1, min(wait_s, 60)), "ingest_refused_rate")

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
        b = self._bucket(app)
        if b.level <= 0:
            return self._rate_refusal(app, b)
        q = self._queues.get(app)
        if q is not None and len(q) >= self.max_waiting:
            return Refusal("queue_full", f"app {app!r} already has {len(q)} requests waiting at this ingest "
                                         "process; retry after the delay", 1, "ingest_refused_queue")
        active = self._active.get(app, 0)
        if self.active_total >= self.max_active and active >= max(1, self.max_active // len(self._active)):
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
        self._bucket(app).level -= n
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
    @asynccontextmanager
    async def slot(self, app: str) -> AsyncIterator[None]:
        """One of the process's parse slots; when all are busy, apps take turns."""
        if self._busy < self.slots and not self._queues:
            self._busy += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queues.setdefault(app, deque()).append(fut)
            try:
                await fut  # the slot is handed over by _next() with _busy unchanged
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._next()  # handed a slot while being cancelled: pass it on
                else:
                    self._forget(app, fut)
                raise
        try:
            yield
        finally:
            self._next()

    def _forget(self, app: str, fut: asyncio.Future[None]) -> None:
        q = self._queues.get(app)
        if q is not None and fut in q:
            q.remove(fut)
            if not q:
                del self._queues[app]

    def _next(self) -> None:
        """Hand the freed slot to the next app in turn (round robin over apps with requests waiting)."""
        while self._queues:
            app, q = next(iter(self._queues.items()))
            fut = q.popleft()
            if q:
                self._queues.move_to_end(app)  # its next request waits for every other app's
            else:
                del self._queues[app]
            if not fut.done():
                fut.set_result(None)
                return
        self._busy -= 1

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

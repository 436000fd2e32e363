"""Per-app credentials: drain, write and read tokens, stored as their SHA-256 in the store's token table.

Verification is cached (valid 30 s, unknown 5 s), so a revoked token stops working within 30 s; a revocation is
a tombstone in every store the migration writes, so no migration brings a token back.
Reference: docs/ingest.md#credentials
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

from aiohttp import web

from app.clock import Clock, SystemClock
from app.errors import RetriableError
from app.limits import Buckets
from app.ops.stats import Counters
from app.settings import WebSettings
from app.storage.protocol import TokenInfo, TokenTable

log = logging.getLogger(__name__)

KINDS = ("drain", "write", "read")
POSITIVE_TTL_MS = 30_000
NEGATIVE_TTL_MS = 5_000
CACHE_ENTRIES = 10_000
"""Live tokens cached per process: far more than the drains one process serves."""
KNOWN_ENTRIES = 100_000
"""Digests of tokens seen live, kept after their cache entry expired (64 bytes each)."""
NEGATIVE_CACHE_ENTRIES = 2_000
"""Refused well-formed tokens cached per process (a client retrying a revoked token); a separate cache, so
however many are tried, the live entries stay."""
TOKEN_FORMAT = re.compile(r"mk_(drain|write|read)_[A-Za-z0-9_-]{43}\Z")
"""What :meth:`TokenStore.create` makes (``token_urlsafe(32)`` is 43 characters); nothing else is looked up."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Create, verify, list and revoke tokens, on the store's token table.

    Verification is what unauthenticated clients reach, so it is bounded: a token not of the form
    ``mk_<kind>_<43 urlsafe chars>`` (or of another kind than asked) is refused without a store read; live
    tokens are cached in an LRU of :data:`CACHE_ENTRIES`, refused ones in a separate, smaller LRU, so a flood
    of random well-formed tokens costs one read each but never evicts the tokens real drains use
    (security review M1)."""

    def __init__(self, web: WebSettings, *, table: TokenTable, clock: Clock | None = None,
                 counters: Counters | None = None) -> None:
        """``table``: the store's (``token_table(settings)``: METRICS_STORE's), or one following a migration."""
        self.table = table
        self.counters = counters
        self.web = web
        self.clock = clock or SystemClock()
        self._live: OrderedDict[str, tuple[int, TokenInfo]] = OrderedDict()
        """digest -> (valid until ms, info), least recently used first."""
        self._refused: OrderedDict[str, int] = OrderedDict()
        """digest -> valid until ms, of tokens the table does not know or holds revoked."""
        self._known: OrderedDict[str, None] = OrderedDict()
        """Digests seen live (least recently used first): never held to a client's failure budget."""
        self.failures = FailureBudget(web.auth_failures_per_s, web.auth_failures_burst)

    async def start(self) -> None:
        await self.table.start()

    async def stop(self) -> None:
        await self.table.stop()

    async def ping(self) -> None:
        await self.table.ping()

    async def create(self, app: str, kind: str) -> tuple[str, TokenInfo]:
        """Returns the token (shown once) and its stored description."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        token = f"mk_{kind}_{secrets.token_urlsafe(32)}"
        h = digest(token)
        info = TokenInfo(h[:12], app, kind, self.clock.now_ms() // 1000)
        await self.table.put_token(h, info)
        self._refused.pop(h, None)
        log.info("created %s token %s for app %s", kind, info.id, app)
        return token, info

    async def verify(self, token: str | None, kind: str, app: str | None = None) -> TokenInfo | None:
        """The token's description when it is a live token of this kind (and app, if given), else None.

        A client (:data:`CLIENT`) whose unknown tokens have used up its failure budget cannot make the store
        read a token this process has never seen live: guessing well-formed tokens costs the store nothing
        past the budget. Tokens seen live (:data:`KNOWN_ENTRIES` of them) are always checked, so clients that
        share an address with a guesser (behind one proxy, Logplex's egress) keep working; a new token from
        such an address meanwhile gets a retriable error (503 with Retry-After: Logplex retries), never a
        refusal a sender would drop data on."""
        m = TOKEN_FORMAT.match(token) if token else None
        if m is None or m.group(1) != kind:  # junk, or another kind: no store read
            return None
        h = digest(m.group(0))
        now_ms = self.clock.now_ms()
        hit = self._live.get(h)
        if hit is not None and hit[0] > now_ms:
            self._live.move_to_end(h)
            info: TokenInfo | None = hit[1]
        else:
            refused_until = self._refused.get(h)
            if refused_until is not None and refused_until > now_ms:
                return None
            client = CLIENT.get()
            if client is not None and h not in self._known and not self.failures.allows(client, now_ms):
                if self.counters is not None:
                    self.counters.inc("auth_lookups_refused")
                raise RetriableError("too many unknown tokens were tried from this address; retry after the delay",
                                     action="check for a sender guessing tokens; behind proxies set "
                                            "METRICS_FORWARDED_FOR_HOPS", retry_after_s=5)
            info = await self.table.get_token(h)
            if info is None and client is not None:
                self.failures.charge(client, now_ms)
            if info is not None and info.revoked_s:
                info = None
            self._remember(h, info, now_ms)
        if info is None or not hmac.compare_digest(info.kind, kind):
            return None
        if app is not None and info.app != app:
            return None
        return info

    def _remember(self, h: str, info: TokenInfo | None, now_ms: int) -> None:
        if info is None:
            self._live.pop(h, None)
            self._refused[h] = now_ms + NEGATIVE_TTL_MS
            self._refused.move_to_end(h)
            while len(self._refused) > NEGATIVE_CACHE_ENTRIES:
                self._refused.popitem(last=False)
        else:
            self._refused.pop(h, None)
            self._known[h] = None
            self._known.move_to_end(h)
            while len(self._known) > KNOWN_ENTRIES:
                self._known.popitem(last=False)
            self._live[h] = (now_ms + POSITIVE_TTL_MS, info)
            self._live.move_to_end(h)
            while len(self._live) > CACHE_ENTRIES:
                self._live.popitem(last=False)

    async def list(self, app: str | None = None) -> list[TokenInfo]:
        """Live tokens (revoked ones are tombstones, not listed)."""
        out = [info for _, info in await self.table.all_tokens()
               if not info.revoked_s and (app is None or info.app == app)]
        return sorted(out, key=lambda t: (t.app, t.created_s))

    async def revoke(self, token_id: str) -> bool:
        """Revoke the token with this id (from ``list``): a tombstone (``revoked_s``) in every store the table
        writes (both during a store migration), so no copy of the token verifies again. True when one was
        found, revoked already or not: running it again completes a revocation that failed half-way."""
        now_s = self.clock.now_ms() // 1000
        found = False
        for key, info in await self.table.all_tokens():
            if info.id == token_id:
                await self.table.put_token(key, replace(info, revoked_s=info.revoked_s or now_s))
                found = True
        self._live.clear()  # this process at once; the others within POSITIVE_TTL_MS
        if found:
            log.info("revoked token %s", token_id)
        return found


def bearer(headers: Any, query: Any) -> str | None:
    """A token from ``Authorization: Bearer``, HTTP basic auth (the password, as drain URLs
    ``https://user:TOKEN@host/...`` send it) or ``?token=`` (drain URLs ``https://host/...?token=TOKEN``).

    Never from ``Logplex-Drain-Token``: Logplex sends the drain's own id there (``d.<uuid>``) on every POST,
    which is no secret of ours (see :func:`drain_id`)."""
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return str(auth[7:].strip())
    if auth[:6].lower() == "basic ":
        try:
            user_pass = base64.b64decode(auth[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user_pass.partition(":")[2] or user_pass
    tok = query.get("token")
    return str(tok) if tok else None


CLIENT: ContextVar[str | None] = ContextVar("minutely_client", default=None)
"""The address of the client whose request is being served (set by :func:`client_middleware`)."""


class FailureBudget:
    """Unknown tokens a client may try: ``burst`` at once and ``per_s`` a second, a bucket per client address
    (app/limits.py :class:`~app.limits.Buckets`)."""

    def __init__(self, per_s: float, burst: int) -> None:
        self.per_s = per_s
        self.burst = float(burst)
        self._buckets = Buckets()
        self.refused = 0

    def allows(self, client: str, now_ms: int) -> bool:
        ok = self._buckets.level(client, rate_per_s=self.per_s, burst=self.burst, now_ms=now_ms) >= 1
        self.refused += not ok
        return ok

    def charge(self, client: str, now_ms: int) -> None:
        self._buckets.charge(client, 1, rate_per_s=self.per_s, burst=self.burst, now_ms=now_ms)


def client_address(request: web.BaseRequest, forwarded_hops: int) -> str | None:
    """The client's address: the TCP peer, or with ``forwarded_hops`` proxies in front (an ingress, a load
    balancer) the address the outermost of them appended to ``X-Forwarded-For`` (entries further left are the
    client's own claims, which anyone can forge)."""
    if forwarded_hops > 0:
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
        if len(hops) >= forwarded_hops:
            return hops[-forwarded_hops][:64]
    return request.remote


def client_middleware(forwarded_hops: int) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Sets :data:`CLIENT` for the request, so token checks charge failed guesses to whoever made them."""
    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        reset = CLIENT.set(client_address(request, forwarded_hops))
        try:
            return await handler(request)
        finally:
            CLIENT.reset(reset)
    return middleware


_DRAIN_ID = re.compile(r"d\.[0-9a-fA-F-]{1,64}\Z")


def drain_id(headers: Any) -> str | None:
    """Logplex's id of the drain that sent a frame (``Logplex-Drain-Token: d.<uuid>``), or None when absent or
    not of that form. Recorded with what the drain sends (dead letters, logs); never taken for a token."""
    raw = headers.get("Logplex-Drain-Token")
    return str(raw) if raw and _DRAIN_ID.match(raw) else None

"""Per-app credentials: drain tokens (Logplex drains), write tokens (JSON ingestion), read tokens (queries).

A token is 32 random bytes (``mk_<kind>_<urlsafe>``), shown once at creation. Only its SHA-256 is stored
(random tokens need no slow hash), in the store's token table (``METRICS_STORE``: DynamoDB table
``<table_name>-tokens`` or Cassandra table ``tokens``) so every ingest/web process and every restart sees the
same set: the hex digest, ``app``, ``kind``, ``id`` (first 12 hex chars, for listing and revoking),
``created_s``. Tokens are never logged; only ids are.

Verification is cached in-process (positive 30 s, negative 5 s) so a drain POST does not pay a store read:
a revoked token stops working within 30 s on every process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
from typing import Any

from app.clock import Clock, SystemClock
from app.settings import Settings
from app.storage.backends import token_table
from app.storage.protocol import TokenInfo, TokenTable

log = logging.getLogger(__name__)

KINDS = ("drain", "write", "read")
POSITIVE_TTL_MS = 30_000
NEGATIVE_TTL_MS = 5_000


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Create, verify, list and revoke tokens, on the store's token table."""

    def __init__(self, settings: Settings, *, table: TokenTable | None = None, clock: Clock | None = None) -> None:
        self.table = table if table is not None else token_table(settings)  # METRICS_STORE's, by default
        self.settings = settings
        self.clock = clock or SystemClock()
        self._cache: dict[str, tuple[int, TokenInfo | None]] = {}

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
        log.info("created %s token %s for app %s", kind, info.id, app)
        return token, info

    async def verify(self, token: str | None, kind: str, app: str | None = None) -> TokenInfo | None:
        """The token's description when it is a live token of this kind (and app, if given), else None."""
        if not token or len(token) > 200:
            return None
        h = digest(token)
        now_ms = self.clock.now_ms()
        hit = self._cache.get(h)
        if hit is not None and hit[0] > now_ms:
            info = hit[1]
        else:
            info = await self.table.get_token(h)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[h] = (now_ms + (POSITIVE_TTL_MS if info else NEGATIVE_TTL_MS), info)
        if info is None or not hmac.compare_digest(info.kind, kind):
            return None
        if app is not None and info.app != app:
            return None
        return info

    async def list(self, app: str | None = None) -> list[TokenInfo]:
        out = [info for _, info in await self.table.all_tokens() if app is None or info.app == app]
        return sorted(out, key=lambda t: (t.app, t.created_s))

    async def revoke(self, token_id: str) -> bool:
        """Delete the token with this id (from ``list``). True when one was found."""
        found = False
        for key, info in await self.table.all_tokens():
            if info.id == token_id:
                await self.table.delete_token(key)
                found = True
        self._cache.clear()
        if found:
            log.info("revoked token %s", token_id)
        return found


def bearer(headers: Any, query: Any) -> str | None:
    """A token from ``Authorization: Bearer``, HTTP basic auth (the password, as drain URLs
    ``https://user:TOKEN@host/...`` send it), a ``Logplex-Drain-Token`` header or ``?token=``."""
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return str(auth[7:].strip())
    if auth[:6].lower() == "basic ":
        try:
            user_pass = base64.b64decode(auth[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user_pass.partition(":")[2] or user_pass
    tok = headers.get("Logplex-Drain-Token") or query.get("token")
    return str(tok) if tok else None


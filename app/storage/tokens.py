"""Per-app credentials: drain tokens (Logplex drains), write tokens (JSON ingestion), read tokens (queries).

A token is 32 random bytes (``mk_<kind>_<urlsafe>``), shown once at creation. Only its SHA-256 is stored
(random tokens need no slow hash), in DynamoDB table ``<table_name>-tokens`` so every ingest/web process
and every restart sees the same set. Items: ``pk`` = hex digest, ``app``, ``kind``, ``id`` (first 12 hex
chars, for listing and revoking), ``created_s``. Tokens are never logged; only ids are.

Verification is cached in-process (positive 30 s, negative 5 s) so a drain POST does not pay a DynamoDB
read: a revoked token stops working within 30 s on every process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from app.clock import Clock, SystemClock
from app.errors import StoreError
from app.settings import Settings
from app.storage.dynamodb import DynamoTable

log = logging.getLogger(__name__)

KINDS = ("drain", "write", "read")
POSITIVE_TTL_MS = 30_000
NEGATIVE_TTL_MS = 5_000


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: str
    app: str
    kind: str
    created_s: int


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore(DynamoTable):
    """Create, verify, list and revoke tokens."""

    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        super().__init__(settings, f"{settings.table_name}-tokens")
        self.clock = clock or SystemClock()
        self._cache: dict[str, tuple[int, TokenInfo | None]] = {}

    async def create(self, app: str, kind: str) -> tuple[str, TokenInfo]:
        """Returns the token (shown once) and its stored description."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        token = f"mk_{kind}_{secrets.token_urlsafe(32)}"
        h = digest(token)
        info = TokenInfo(h[:12], app, kind, self.clock.now_ms() // 1000)
        try:
            await self.client.put_item(TableName=self.table, Item={
                "pk": {"S": h}, "app": {"S": app}, "kind": {"S": kind}, "id": {"S": info.id},
                "created_s": {"N": str(info.created_s)}})
        except Exception as exc:  # classified below: the caller gets retriable or not
            raise self.error(exc, "PutItem") from exc
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
            try:
                resp = await self.client.get_item(TableName=self.table, Key={"pk": {"S": h}}, ConsistentRead=True)
            except Exception as exc:
                raise self.error(exc, "GetItem") from exc
            item = resp.get("Item")
            info = None if item is None else TokenInfo(item["id"]["S"], item["app"]["S"], item["kind"]["S"],
                                                       int(item["created_s"]["N"]))
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[h] = (now_ms + (POSITIVE_TTL_MS if info else NEGATIVE_TTL_MS), info)
        if info is None or not hmac.compare_digest(info.kind, kind):
            return None
        if app is not None and info.app != app:
            return None
        return info

    async def list(self, app: str | None = None) -> list[TokenInfo]:
        out: list[TokenInfo] = []
        kwargs: dict[str, Any] = {"TableName": self.table}
        if app is not None:
            kwargs.update(FilterExpression="app = :a", ExpressionAttributeValues={":a": {"S": app}})
        try:
            while True:
                resp = await self.client.scan(**kwargs)
                out.extend(TokenInfo(i["id"]["S"], i["app"]["S"], i["kind"]["S"], int(i["created_s"]["N"]))
                           for i in resp.get("Items", []))
                if "LastEvaluatedKey" not in resp:
                    break
                kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]
        except StoreError:
            raise
        except Exception as exc:
            raise self.error(exc, "Scan") from exc
        return sorted(out, key=lambda t: (t.app, t.created_s))

    async def revoke(self, token_id: str) -> bool:
        """Delete the token with this id (from ``list``). True when one was found."""
        kwargs: dict[str, Any] = {"TableName": self.table, "FilterExpression": "id = :i",
                                  "ExpressionAttributeValues": {":i": {"S": token_id}}}
        try:
            found = False
            while True:
                resp = await self.client.scan(**kwargs)
                for item in resp.get("Items", []):
                    await self.client.delete_item(TableName=self.table, Key={"pk": item["pk"]})
                    found = True
                if "LastEvaluatedKey" not in resp:
                    break
                kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]
        except Exception as exc:
            raise self.error(exc, "DeleteItem") from exc
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


"""Webhooks: JSON ``POST``s (``PATCH`` for the formation API) signed like Stripe's, sent only to public
addresses unless an operator allows more.

Header ``X-Minutely-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``. Receivers check
the MAC and reject timestamps older than a few minutes (:func:`verify_signature`); ``X-Minutely-Event``
is the same on every retry and replay of an event, so receivers can drop duplicates.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from typing import Callable, Sequence

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from app.errors import ConfigError
from app.notify.delivery import (
    EVENT_HEADER,
    FORMATION,
    Delivery,
    DeliveryFailed,
    DeliveryUnavailable,
)
from app.settings import PREFIX, Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Minutely-Signature"
DELIVERY_HEADER = "X-Minutely-Delivery"
USER_AGENT = "minutely-notify/1"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_networks(s: Settings) -> list[Network]:
    try:
        return [ipaddress.ip_network(n.strip(), strict=False) for n in s.webhook_allowed_networks.split(",")
                if n.strip()]
    except ValueError as exc:
        raise ConfigError(f"webhook_allowed_networks: {exc}",
                          action=f"set {PREFIX}WEBHOOK_ALLOWED_NETWORKS to comma-separated CIDRs") from None


class ForbiddenTarget(OSError):
    """A webhook address that is not public and not allowed: never retried."""


def check_address(host: str, allowed: Sequence[Network]) -> None:
    """ForbiddenTarget unless ``host`` (an IP address) is public or inside an allowed network."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if ip.is_global and not ip.is_multicast:
        return
    if any(ip in net for net in allowed):
        return
    raise ForbiddenTarget(f"{ip} is not a public address; webhooks only reach a public address unless "
                          f"{PREFIX}WEBHOOK_ALLOWED_NETWORKS allows it")


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's resolver, minus the addresses a webhook may not reach. The connection goes to an address
    checked here, so a name that resolves differently a second later (DNS rebinding) gains nothing."""

    def __init__(self, allowed: Sequence[Network]) -> None:
        self.allowed = list(allowed)
        self._inner = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        ok = []
        for r in results:
            try:
                check_address(r["host"], self.allowed)
                ok.append(r)
            except ForbiddenTarget:
                pass
        if not ok:
            raise ForbiddenTarget(f"{host} resolves only to non-public addresses "
                                  f"({', '.join(sorted({r['host'] for r in results}))}); webhooks only reach "
                                  f"a public address unless {PREFIX}WEBHOOK_ALLOWED_NETWORKS allows it")
        return ok

    async def close(self) -> None:
        await self._inner.close()


# --- signing ----------------------------------------------------------------------------------------------

def sign(secret: str, body: bytes, timestamp_s: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp_s}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp_s},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, *, now_s: float, tolerance_s: float = 300.0) -> bool:
    """For receivers: the MAC matches and the timestamp is within ``tolerance_s`` (replay protection)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts = int(parts["t"])
        mac = parts["v1"]
    except (ValueError, KeyError):
        return False
    if abs(now_s - ts) > tolerance_s:
        return False
    expected = sign(secret, body, ts).split("v1=", 1)[1]
    return hmac.compare_digest(expected, mac)


# --- deliveries -------------------------------------------------------------------------------------------

def _retry_after_s(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0  # an HTTP date: ignore, our own backoff applies


class WebhookSender:
    """JSON over HTTP(S) with one long-lived aiohttp session. Redirects are not followed: a signed
    notification goes only where it was configured to go. With ``allowed_networks`` set (user webhooks),
    only public addresses and those networks are reached; None (the operator's formation API) is
    unrestricted."""

    def __init__(self, *, timeout_s: float, formation_method: str = "PATCH", formation_token: str = "",
                 formation_secret: str = "", clock_s: Callable[[], float] = time.time,
                 allowed_networks: Sequence[Network] | None = None) -> None:
        self.allowed = None if allowed_networks is None else list(allowed_networks)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.formation_method = formation_method
        self.formation_token = formation_token
        self.formation_secret = formation_secret
        self.clock_s = clock_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            connector = None if self.allowed is None else aiohttp.TCPConnector(
                resolver=PublicOnlyResolver(self.allowed))
            self._session = aiohttp.ClientSession(timeout=self.timeout, headers={"User-Agent": USER_AGENT},
                                                  connector=connector)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, d: Delivery) -> None:
        await self.start()
        assert self._session is not None
        body = d.body.encode()
        headers = {"Content-Type": "application/json", EVENT_HEADER: d.event_id, DELIVERY_HEADER: d.id}
        method, secret = "POST", d.secret
        if d.channel == FORMATION:
            method, secret = self.formation_method, self.formation_secret
            if self.formation_token:
                headers["Authorization"] = f"Bearer {self.formation_token}"
        if secret:
            headers[SIGNATURE_HEADER] = sign(secret, body, int(self.clock_s()))
        try:
            if self.allowed is not None:
                host = URL(d.target).host or ""
                try:
                    ipaddress.ip_address(host.split("%", 1)[0])
                except ValueError:
                    pass  # a name: PublicOnlyResolver checks what it resolves to
                else:
                    check_address(host, self.allowed)
            async with self._session.request(method, d.target, data=body, headers=headers,
                                             allow_redirects=False) as resp:
                await resp.read()
                status = resp.status
                retry_after = _retry_after_s(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            # ForbiddenTarget comes straight from the literal check, or wrapped by aiohttp from the resolver.
            forbidden = exc if isinstance(exc, ForbiddenTarget) else getattr(exc, "os_error", None)
            if isinstance(forbidden, ForbiddenTarget):
                raise DeliveryFailed(f"{method} {d.target}: {forbidden}",
                                     action="use a public receiver URL, or allow its network") from None
            raise DeliveryUnavailable(f"{method} {d.target}: {type(exc).__name__}: {exc}",
                                      action="check that the receiver is up and answers within "
                                             f"{self.timeout.total} s") from None
        if 200 <= status < 300:
            return
        if status in (408, 425, 429) or status >= 500:
            raise DeliveryUnavailable(f"{method} {d.target} answered {status}", retry_after_s=retry_after,
                                      action="the receiver is overloaded or failing; retrying with backoff")
        raise DeliveryFailed(f"{method} {d.target} answered {status}",
                             action="fix the webhook URL or the receiver (it refused the request)")

"""Webhooks: JSON ``POST``s (``PATCH`` for the formation API) signed like Stripe's, sent only to public
addresses unless an operator allows more.

Header ``X-Minutely-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``. Receivers check
the MAC and reject timestamps older than a few minutes (:func:`verify_signature`); ``X-Minutely-Event``
is the same on every retry and replay of an event, so receivers can drop duplicates.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Sequence

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
    SecretUnavailable,
)
from app.ops.logs import url_origin
from app.sealing import SecretBox, SecretUnreadable, secret_box
from app.settings import PREFIX, AlertingSettings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Minutely-Signature"
DELIVERY_HEADER = "X-Minutely-Delivery"
USER_AGENT = "minutely-notify/1"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_networks(alerting: AlertingSettings) -> list[Network]:
    try:
        return [ipaddress.ip_network(n.strip(), strict=False) for n in alerting.webhook_allowed_networks.split(",")
                if n.strip()]
    except ValueError as exc:
        raise ConfigError(f"webhook_allowed_networks: {exc}",
                          action=f"set {PREFIX}WEBHOOK_ALLOWED_NETWORKS to comma-separated CIDRs") from None


class ForbiddenTarget(OSError):
    """A webhook address that is not public and not allowed: never retried."""


def _nets(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Our own tables rather than ``ipaddress.is_global``: the interpreter's tables change between Python
# releases and, on 3.11, call NAT64/6to4/IPv4-compatible forms of private IPv4 addresses global.
DENIED_V4 = _nets(
    "0.0.0.0/8",        # "this network"
    "10.0.0.0/8",       # RFC 1918
    "100.64.0.0/10",    # CGNAT (RFC 6598)
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local, cloud metadata services
    "172.16.0.0/12",    # RFC 1918
    "192.0.0.0/24",     # IETF protocol assignments (incl. NAT64 discovery, DS-Lite)
    "192.0.2.0/24",     # TEST-NET-1
    "192.88.99.0/24",   # 6to4 relay anycast (deprecated)
    "192.168.0.0/16",   # RFC 1918
    "198.18.0.0/15",    # benchmarking
    "198.51.100.0/24",  # TEST-NET-2
    "203.0.113.0/24",   # TEST-NET-3
    "224.0.0.0/4",      # multicast
    "240.0.0.0/4",      # reserved, incl. 255.255.255.255 (broadcast)
)
DENIED_V6 = _nets(
    "::/128",           # unspecified
    "::1/128",          # loopback
    "64:ff9b:1::/48",   # local-use NAT64 (RFC 8215): its IPv4 position depends on the operator's prefix
    "100::/64",         # discard-only
    "2001::/23",        # IETF protocol assignments (Teredo, 2001::/32, is checked by its embedded IPv4)
    "2001:db8::/32",    # documentation
    "3fff::/20",        # documentation (RFC 9637)
    "5f00::/16",        # SRv6 SIDs
    "fc00::/7",         # unique local
    "fe80::/10",        # link-local
    "fec0::/10",        # site-local (deprecated)
    "ff00::/8",         # multicast
)
GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
"""Native IPv6 outside it is unassigned or special-purpose; the IPv4-embedding forms are checked apart."""
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_6TO4 = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")
WEBHOOK_PORTS = (80, 443)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses a packet to ``ip`` may really reach (IPv4-mapped and -compatible, NAT64, 6to4,
    Teredo server and client), or None when ``ip`` embeds none."""
    n = int(ip)
    if ip in _MAPPED or ip in _COMPATIBLE or ip in _NAT64:
        return [ipaddress.IPv4Address(n & 0xFFFFFFFF)]
    if ip in _6TO4:
        return [ipaddress.IPv4Address((n >> 80) & 0xFFFFFFFF)]
    if ip in _TEREDO:
        return [ipaddress.IPv4Address((n >> 64) & 0xFFFFFFFF), ipaddress.IPv4Address(~n & 0xFFFFFFFF)]
    return None


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a webhook may reach ``ip`` without an operator's allowlist: not in our denylists, and for an
    IPv6 form that embeds an IPv4 address, every embedded address public too."""
    if isinstance(ip, ipaddress.IPv4Address):
        return not any(ip in net for net in DENIED_V4)
    embedded = embedded_ipv4(ip)
    if embedded is not None:
        return all(is_public(v4) for v4 in embedded)
    return ip in GLOBAL_UNICAST_V6 and not any(ip in net for net in DENIED_V6)


def _allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allowed: Sequence[Network]) -> bool:
    same = [ip] if not isinstance(ip, ipaddress.IPv6Address) or ip.ipv4_mapped is None else [ip, ip.ipv4_mapped]
    return any(a in net for a in same for net in allowed)


def check_address(host: str, allowed: Sequence[Network], port: int | None = None) -> None:
    """ForbiddenTarget unless ``host`` (an IP address) is inside an allowed network, or is public and
    ``port`` (when given) is 80 or 443: a public host's other ports are its admin and database services."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if _allowed(ip, allowed):
        return
    if not is_public(ip):
        raise ForbiddenTarget(f"{ip} is not a public address; webhooks only reach a public address unless "
                              f"{PREFIX}WEBHOOK_ALLOWED_NETWORKS allows it")
    if port is not None and port not in WEBHOOK_PORTS:
        raise ForbiddenTarget(f"port {port} of {ip}: webhooks only reach ports 80 and 443 of a public address "
                              f"unless {PREFIX}WEBHOOK_ALLOWED_NETWORKS allows it")


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's resolver, minus the addresses a webhook may not reach. The connection goes to an address
    checked here, so a name that resolves differently a second later (DNS rebinding) gains nothing."""

    def __init__(self, allowed: Sequence[Network]) -> None:
        self.allowed = list(allowed)
        self._inner = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        ok, refused = [], []
        for r in results:
            try:
                check_address(r["host"], self.allowed, r["port"] or port)
                ok.append(r)
            except ForbiddenTarget as exc:
                refused.append(str(exc))
        if not ok:
            raise ForbiddenTarget(f"{host}: {'; '.join(sorted(set(refused)))}")
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


MAX_RESPONSE_BYTES = 4096
"""The most of a receiver's answer we read: only its status matters, and a receiver choosing its body
(gigabytes, a gzip bomb) must not choose how much memory a worker uses."""


async def _drain(resp: aiohttp.ClientResponse, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """Read at most ``limit`` bytes of the body, as sent (never decompressed): a short answer to its end, so
    the connection is reused. The caller releases the response, which closes a connection with more."""
    chunks: list[bytes] = []
    n = 0
    while n < limit:
        chunk = await resp.content.read(limit - n)
        if not chunk:
            break
        chunks.append(chunk)
        n += len(chunk)
    return b"".join(chunks)


class WebhookSender:
    """JSON over HTTP(S) with one long-lived aiohttp session. Redirects are not followed: a signed
    notification goes only where it was configured to go. With ``allowed_networks`` set (user webhooks),
    only public addresses and those networks are reached; None (the operator's formation API) is
    unrestricted. Bodies are never decompressed and at most :data:`MAX_RESPONSE_BYTES` of an answer is read.
    Errors and logs name the target's ``scheme://host[:port]`` only: a webhook URL is often a secret."""

    def __init__(self, *, timeout_s: float, formation_method: str = "PATCH", formation_token: str = "",
                 formation_secret: str = "", clock_s: Callable[[], float] = time.time,
                 allowed_networks: Sequence[Network] | None = None, box: SecretBox | None = None) -> None:
        self.allowed = None if allowed_networks is None else list(allowed_networks)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.formation_method = formation_method
        self.formation_token = formation_token
        self.formation_secret = formation_secret
        self.clock_s = clock_s
        self.box = box
        """Opens sealed secrets (None: the process's, :func:`app.notify.delivery.secret_box`)."""
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            connector = None if self.allowed is None else aiohttp.TCPConnector(
                resolver=PublicOnlyResolver(self.allowed))
            self._session = aiohttp.ClientSession(timeout=self.timeout, headers={"User-Agent": USER_AGENT},
                                                  connector=connector, auto_decompress=False)

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
            # The only place a stored secret is decrypted. One whose key is no longer configured fails this
            # delivery for good (SecretUnavailable, a DeliveryFailed), logged with the key to restore.
            try:
                plain = (self.box or secret_box()).open(secret)
            except SecretUnreadable as exc:
                raise SecretUnavailable(str(exc).removesuffix(f" -- {exc.action}"), action=exc.action) from None
            headers[SIGNATURE_HEADER] = sign(plain, body, int(self.clock_s()))
        where = f"{method} {url_origin(d.target)}"
        try:
            url = URL(d.target)
        except ValueError:
            raise DeliveryFailed(f"{where}: not a URL", action="fix the webhook URL") from None
        try:
            if self.allowed is not None:
                host = url.host or ""
                try:
                    ipaddress.ip_address(host.split("%", 1)[0])
                except ValueError:
                    pass  # a name: PublicOnlyResolver checks what it resolves to, and the port
                else:
                    check_address(host, self.allowed, url.port)
            async with self._session.request(method, url, data=body, headers=headers,
                                             allow_redirects=False) as resp:
                status = resp.status
                retry_after = _retry_after_s(resp.headers.get("Retry-After"))
                # the status is the answer; a body cut short or too slow does not change it
                with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError):
                    await _drain(resp)
                resp.release()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # ForbiddenTarget comes straight from the literal check, or wrapped by aiohttp from the resolver.
            forbidden = exc if isinstance(exc, ForbiddenTarget) else getattr(exc, "os_error", None)
            if isinstance(forbidden, ForbiddenTarget):
                raise DeliveryFailed(f"{where}: {forbidden}",
                                     action="use a public receiver URL, or allow its network") from None
            if isinstance(exc, aiohttp.InvalidURL):
                raise DeliveryFailed(f"{where}: invalid URL", action="fix the webhook URL") from None
            raise DeliveryUnavailable(f"{where}: {type(exc).__name__}: {_without_url(str(exc), d.target)}",
                                      action="check that the receiver is up and answers within "
                                             f"{self.timeout.total} s") from None
        if 200 <= status < 300:
            return
        if status in (408, 425, 429) or status >= 500:
            raise DeliveryUnavailable(f"{where} answered {status}", retry_after_s=retry_after,
                                      action="the receiver is overloaded or failing; retrying with backoff")
        raise DeliveryFailed(f"{where} answered {status}",
                             action="fix the webhook URL or the receiver (it refused the request)")


def _without_url(text: str, target: str) -> str:
    """An aiohttp error's text with the target URL (in either spelling) cut to its origin."""
    for spelling in {target, str(URL(target)), URL(target).human_repr()}:
        text = text.replace(spelling, url_origin(target))
    return text

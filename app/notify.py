"""Outgoing notifications: signed webhooks, e-mail over SMTP, and the background notifier that sends them.

The stream agents never wait on a receiver. They hand a :class:`Delivery` to :meth:`Notifier.submit`,
which only puts it on a bounded queue and returns. A few worker tasks send with a timeout per attempt;
a retriable failure (connection error, timeout, 408/425/429/5xx, SMTP 4xx) is re-queued after an
exponential backoff with full jitter (``Retry-After`` respected), up to ``notify_max_attempts``. A
permanent failure (other 4xx, SMTP 5xx, bad credentials) is given up at once. Each delivery ends with
its ``on_done`` callback: ``delivered``, ``failed`` (given up, logged) or ``abandoned`` (the notifier
stopped first: the agents keep such deliveries in their outbox and send them again after a restart).

Workers are watched by a done-callback: a worker that dies of an unexpected error is logged with its
traceback and replaced, so nothing stops silently.

Webhooks are JSON ``POST``s (``PATCH`` for the formation API) signed like Stripe's: header
``X-Minutely-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``. Receivers check
the MAC and reject timestamps older than a few minutes (:func:`verify_signature`); ``X-Minutely-Event``
is the same on every retry and replay of an event, so receivers can drop duplicates.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import random
import socket
import ssl
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Callable, Mapping, Protocol, Sequence

import aiohttp
import aiosmtplib
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from app.errors import ConfigError, PipelineError, RetriableError
from app.settings import PREFIX, Settings
from app.stats import Counters

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Minutely-Signature"
EVENT_HEADER = "X-Minutely-Event"
DELIVERY_HEADER = "X-Minutely-Delivery"
USER_AGENT = "minutely-notify/1"
SMTP_TLS_MODES = ("none", "starttls", "tls")

WEBHOOK = "webhook"
EMAIL = "email"
FORMATION = "formation"

DELIVERED = "delivered"
FAILED = "failed"
ABANDONED = "abandoned"
SUPERSEDED = "superseded"


class DeliveryFailed(PipelineError):
    """The receiver refused the notification; retrying the same request cannot succeed."""


class DeliveryUnavailable(RetriableError):
    """The receiver is unreachable, slow or asked us to come back later. ``retry_after_s`` is the receiver's
    Retry-After (0 when it sent none: our own backoff decides)."""

    def __init__(self, message: str, *, action: str = "", retry_after_s: float = 0.0) -> None:
        super().__init__(message, action=action, retry_after_s=retry_after_s)


def validate_settings(s: Settings) -> None:
    """ConfigError for settings of this module that make no sense (called when the worker binds)."""
    if s.smtp_tls not in SMTP_TLS_MODES:
        raise ConfigError(f"smtp_tls must be one of {SMTP_TLS_MODES}", action=f"set {PREFIX}SMTP_TLS")
    if s.notify_queue_max < 1 or s.notify_concurrency < 1 or s.notify_max_attempts < 1:
        raise ConfigError("notify_queue_max, notify_concurrency and notify_max_attempts must be >= 1",
                          action=f"set {PREFIX}NOTIFY_*")
    if s.notify_timeout_s <= 0 or s.notify_backoff_base_ms <= 0 or s.notify_backoff_max_ms < s.notify_backoff_base_ms:
        raise ConfigError("notify_timeout_s > 0 and 0 < notify_backoff_base_ms <= notify_backoff_max_ms required",
                          action=f"set {PREFIX}NOTIFY_TIMEOUT_S / {PREFIX}NOTIFY_BACKOFF_*")
    if s.max_monitors_per_app < 1 or s.policy_apply_timeout_s < 0 or s.outbox_sweep_interval_s <= 0:
        raise ConfigError("max_monitors_per_app >= 1, policy_apply_timeout_s >= 0 and outbox_sweep_interval_s > 0 "
                          "required", action=f"set {PREFIX}MAX_MONITORS_PER_APP / POLICY_APPLY_TIMEOUT_S / "
                                             "OUTBOX_SWEEP_INTERVAL_S")
    allowed_networks(s)
    if s.formation_url and "{app}" not in s.formation_url:
        raise ConfigError("formation_url must contain {app} (and may contain {process_type})",
                          action=f"set {PREFIX}FORMATION_URL, e.g. https://api.example.com/apps/{{app}}/formation/"
                                 "{process_type}")


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

@dataclass(frozen=True, slots=True)
class Delivery:
    """One message to one target. ``id`` is unique per (event, target) and stable across replays.

    ``supersedes``: deliveries sharing this key carry absolute state (a formation quantity); when a
    newer one (higher ``seq``) was submitted, an older one still waiting is dropped, never sent after it.
    """

    id: str
    event_id: str
    channel: str
    target: str
    body: str
    subject: str = ""
    secret: str = ""
    supersedes: str = ""
    seq: int = 0

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "event_id": self.event_id, "channel": self.channel, "target": self.target,
                "body": self.body, "subject": self.subject, "secret": self.secret,
                "supersedes": self.supersedes, "seq": self.seq}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Delivery":
        return cls(rec["id"], rec["event_id"], rec["channel"], rec["target"], rec["body"], rec.get("subject", ""),
                   rec.get("secret", ""), rec.get("supersedes", ""), int(rec.get("seq", 0)))


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    state: str
    """delivered | failed (given up) | superseded | abandoned (notifier stopped; send again later)."""
    attempts: int
    error: str = ""

    @property
    def final(self) -> bool:
        """True when the delivery is settled and may be forgotten (not ``abandoned``)."""
        return self.state != ABANDONED


DoneCallback = Callable[[Delivery, DeliveryResult], None]


class Sender(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, d: Delivery) -> None:
        """Deliver once; raise DeliveryUnavailable (retry) or DeliveryFailed (give up)."""
        ...


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


class EmailSender:
    """One message per delivery over SMTP (aiosmtplib): a connection per message, because alert mail is
    rare and SMTP servers drop idle connections. TLS: ``none``, ``starttls`` (port 587) or ``tls`` (465)."""

    def __init__(self, settings: Settings) -> None:
        s = settings
        self.host, self.port, self.mode = s.smtp_host, s.smtp_port, s.smtp_tls
        self.username, self.password = s.smtp_username or None, s.smtp_password or None
        self.sender = s.smtp_from
        self.timeout_s = s.notify_timeout_s
        self.tls_context: ssl.SSLContext | None = None
        if s.smtp_ca_file:
            self.tls_context = ssl.create_default_context(cafile=s.smtp_ca_file)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    @staticmethod
    def message_id(delivery_id: str) -> str:
        """Stable per delivery: a re-sent alert mail has the same Message-ID, so mail clients fold it."""
        return f"<{hashlib.sha256(delivery_id.encode()).hexdigest()[:32]}@minutely>"

    def build(self, d: Delivery) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = d.target
        msg["Subject"] = d.subject
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = self.message_id(d.id)
        msg[EVENT_HEADER] = d.event_id
        msg.set_content(d.body)
        return msg

    async def send(self, d: Delivery) -> None:
        if not self.host:
            raise DeliveryFailed("e-mail notifications need an SMTP server", action=f"set {PREFIX}SMTP_HOST")
        try:
            await aiosmtplib.send(self.build(d), hostname=self.host, port=self.port, username=self.username,
                                  password=self.password, use_tls=self.mode == "tls",
                                  start_tls=self.mode == "starttls", timeout=self.timeout_s,
                                  tls_context=self.tls_context)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            if codes and all(400 <= c < 500 for c in codes):
                raise DeliveryUnavailable(f"SMTP refused {d.target} for now: {exc}") from None
            raise DeliveryFailed(f"SMTP refused {d.target}: {exc}", action="fix the address") from None
        except aiosmtplib.SMTPResponseException as exc:
            if 400 <= exc.code < 500:
                raise DeliveryUnavailable(f"SMTP {exc.code}: {exc.message}") from None
            raise DeliveryFailed(f"SMTP {exc.code}: {exc.message}",
                                 action=f"check {PREFIX}SMTP_USERNAME/PASSWORD/FROM and the recipient") from None
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError,
                asyncio.TimeoutError, OSError) as exc:
            raise DeliveryUnavailable(f"SMTP {self.host}:{self.port}: {type(exc).__name__}: {exc}",
                                      action="check that the SMTP server is reachable") from None
        except aiosmtplib.SMTPException as exc:
            raise DeliveryFailed(f"SMTP {self.host}:{self.port}: {exc}",
                                 action=f"check {PREFIX}SMTP_TLS against what the server supports") from None


# --- the background notifier ----------------------------------------------------------------------------

@dataclass(slots=True)
class _Job:
    delivery: Delivery
    on_done: DoneCallback | None
    attempts: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class Notifier:
    """Bounded queue + worker tasks; :meth:`submit` never blocks and never raises."""

    def __init__(self, settings: Settings, counters: Counters, *, senders: Mapping[str, Sender] | None = None,
                 rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.counters = counters
        self.rand = rand
        if senders is None:
            webhook = WebhookSender(timeout_s=settings.notify_timeout_s,
                                    allowed_networks=allowed_networks(settings))
            formation = WebhookSender(timeout_s=settings.notify_timeout_s,
                                      formation_method=settings.formation_method,
                                      formation_token=settings.formation_token,
                                      formation_secret=settings.formation_secret)
            senders = {WEBHOOK: webhook, FORMATION: formation, EMAIL: EmailSender(settings)}
        self.senders = dict(senders)
        self._queue: asyncio.Queue[_Job] | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._jobs: dict[str, _Job] = {}
        self._latest: dict[str, int] = {}
        self._busy: set[str] = set()
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------------------
    def _ensure_started(self) -> asyncio.Queue[_Job]:
        # Started lazily from the event loop's first submit: agents may submit before the web runtime
        # service runs, and no queue or task may be created outside a running loop.
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=self.settings.notify_queue_max)
            for _ in range(self.settings.notify_concurrency):
                self._spawn()
        return self._queue

    def _spawn(self) -> None:
        task = asyncio.get_running_loop().create_task(self._work(), name="notifier-worker")
        self._workers.add(task)
        task.add_done_callback(self._worker_done)

    async def start(self) -> None:
        self._ensure_started()
        for s in {id(s): s for s in self.senders.values()}.values():
            await s.start()

    async def stop(self) -> None:
        """Stop sending. Deliveries not finished are reported ``abandoned`` (the outbox keeps them)."""
        self._closed = True
        workers = list(self._workers)
        for t in workers:
            t.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for job in list(self._jobs.values()):
            self._finish(job, DeliveryResult(ABANDONED, job.attempts, "notifier stopped"))
        for s in {id(s): s for s in self.senders.values()}.values():
            await s.stop()

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self._workers.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        log.error("notifier worker died; %s", "stopping" if self._closed else "starting a new one",
                  exc_info=exc)
        self.counters.inc("notify_worker_restarts")
        if not self._closed:
            self._spawn()
        else:
            for job in list(self._jobs.values()):
                self._finish(job, DeliveryResult(ABANDONED, job.attempts, f"notifier worker died: {exc!r}"))

    # --- submitting --------------------------------------------------------------------------------------
    @property
    def inflight(self) -> frozenset[str]:
        """Ids of deliveries queued, being sent or waiting for a retry."""
        return frozenset(self._jobs)

    def submit(self, delivery: Delivery, on_done: DoneCallback | None = None) -> bool:
        """Queue a delivery. False when it was not queued (queue full, notifier stopped): the caller's
        outbox keeps it and submits it again later."""
        if self._closed:
            return False
        if delivery.id in self._jobs:
            return True  # already on its way (an outbox sweep found it again)
        if delivery.supersedes:
            self._latest[delivery.supersedes] = max(self._latest.get(delivery.supersedes, -1), delivery.seq)
        job = _Job(delivery, on_done)
        try:
            self._ensure_started().put_nowait(job)
        except asyncio.QueueFull:
            self.counters.inc("notifications_deferred")
            log.warning("notification queue full (%d): %s deferred to the outbox sweep",
                        self.settings.notify_queue_max, delivery.id)
            return False
        self._jobs[delivery.id] = job
        return True

    async def join(self) -> None:
        """Wait until nothing is queued, sending or waiting for a retry (tests, shutdown)."""
        while self._jobs:
            await asyncio.sleep(0.01)

    # --- sending -----------------------------------------------------------------------------------------
    async def _work(self) -> None:
        queue = self._ensure_started()
        while True:
            job = await queue.get()
            try:
                try:
                    await self._attempt(job)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug in a sender must not cost the other deliveries
                    log.exception("notification %s: unexpected error", job.delivery.id)
                    self._finish(job, DeliveryResult(FAILED, job.attempts, f"internal error: {exc!r}"))
                    self.counters.inc("notifications_failed")
            except Exception as exc:
                # Our own bookkeeping failed: this worker dies (its done-callback logs it and starts
                # another); the delivery is abandoned, so the outbox keeps it for the next sweep.
                if job.timer is None and self._jobs.get(job.delivery.id) is job:
                    self._finish(job, DeliveryResult(ABANDONED, job.attempts, f"notifier error: {exc!r}"))
                raise
            finally:
                queue.task_done()

    def _superseded(self, d: Delivery) -> bool:
        return bool(d.supersedes) and self._latest.get(d.supersedes, -1) > d.seq

    async def _attempt(self, job: _Job) -> None:
        d = job.delivery
        if self._superseded(d):
            self._finish(job, DeliveryResult(SUPERSEDED, job.attempts))
            return
        sender = self.senders.get(d.channel)
        if sender is None:
            self.counters.inc("notifications_failed")
            self._finish(job, DeliveryResult(FAILED, job.attempts, f"no sender for channel {d.channel!r}"))
            return
        if d.supersedes:
            if d.supersedes in self._busy:
                # One send at a time per key, so an older state can never arrive after a newer one.
                job.timer = asyncio.get_running_loop().call_later(0.05, self._requeue, job)
                return
            self._busy.add(d.supersedes)
        job.attempts += 1
        try:
            # The senders have their own timeouts; this one bounds anything they do not cover.
            await asyncio.wait_for(sender.send(d), timeout=self.settings.notify_timeout_s * 2)
        except (DeliveryUnavailable, asyncio.TimeoutError) as exc:
            retry_after_s = exc.retry_after_s if isinstance(exc, DeliveryUnavailable) else 0.0
            if job.attempts >= self.settings.notify_max_attempts:
                self._give_up(job, f"{exc} (after {job.attempts} attempts)")
                return
            delay_s = self.backoff_s(job.attempts, retry_after_s)
            self.counters.inc("notification_retries")
            log.warning("notification %s attempt %d failed (%s); retry in %.2f s", d.id, job.attempts, exc,
                        delay_s)
            job.timer = asyncio.get_running_loop().call_later(delay_s, self._requeue, job)
        except DeliveryFailed as exc:
            self._give_up(job, str(exc))
        else:
            self.counters.inc("notifications_sent")
            self._finish(job, DeliveryResult(DELIVERED, job.attempts))
        finally:
            if d.supersedes:
                self._busy.discard(d.supersedes)

    def backoff_s(self, attempts: int, retry_after_s: float = 0.0) -> float:
        """Exponential backoff with full jitter, at least the receiver's Retry-After, at most the cap."""
        s = self.settings
        cap_s = s.notify_backoff_max_ms / 1000
        ceiling_s = min(cap_s, s.notify_backoff_base_ms / 1000 * 2 ** (attempts - 1))
        jittered_s: float = self.rand() * ceiling_s
        return min(cap_s, max(retry_after_s, jittered_s))

    def _requeue(self, job: _Job) -> None:
        job.timer = None
        if self._closed or job.delivery.id not in self._jobs:
            return
        assert self._queue is not None
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            job.timer = asyncio.get_running_loop().call_later(self.backoff_s(1), self._requeue, job)

    def _give_up(self, job: _Job, reason: str) -> None:
        self.counters.inc("notifications_failed")
        log.error("notification %s to %s given up: %s", job.delivery.id, job.delivery.target, reason)
        self._finish(job, DeliveryResult(FAILED, job.attempts, reason))

    def _finish(self, job: _Job, result: DeliveryResult) -> None:
        if self._jobs.get(job.delivery.id) is job:
            del self._jobs[job.delivery.id]
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if job.on_done is not None:
            try:
                job.on_done(job.delivery, result)
            except Exception:
                log.exception("notification %s: on_done callback failed", job.delivery.id)

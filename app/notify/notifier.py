"""Outgoing notifications: the background notifier that sends deliveries (webhooks, e-mail) off the stream.

:meth:`Notifier.submit` only queues; a retriable failure backs off (app/retry.py) up to
``notify_max_attempts``; every delivery ends in its ``on_done`` (delivered, failed or abandoned).
Reference: docs/alerting.md#notifications
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from app.errors import ConfigError
from app.notify.delivery import (
    ABANDONED,
    DELIVERED,
    EMAIL,
    FAILED,
    FORMATION,
    SUPERSEDED,
    WEBHOOK,
    Delivery,
    DeliveryFailed,
    DeliveryResult,
    DeliveryUnavailable,
    DoneCallback,
    Sender,
)
from app.notify.email import SMTP_TLS_MODES, EmailSender
from app.notify.webhook import WebhookSender, allowed_networks
from app.ops.logs import url_origin
from app.ops.stats import Counters
from app.retry import RetryPolicy
from app.settings import PREFIX, AlertingSettings

log = logging.getLogger(__name__)


def validate_settings(alerting: AlertingSettings) -> None:
    """ConfigError for settings of this module that make no sense (called when the worker binds)."""
    if alerting.smtp_tls not in SMTP_TLS_MODES:
        raise ConfigError(f"smtp_tls must be one of {SMTP_TLS_MODES}", action=f"set {PREFIX}SMTP_TLS")
    if alerting.notify_queue_max < 1 or alerting.notify_concurrency < 1 or alerting.notify_max_attempts < 1:
        raise ConfigError("notify_queue_max, notify_concurrency and notify_max_attempts must be >= 1",
                          action=f"set {PREFIX}NOTIFY_*")
    if (alerting.notify_timeout_s <= 0 or alerting.notify_backoff_base_ms <= 0
            or alerting.notify_backoff_max_ms < alerting.notify_backoff_base_ms):
        raise ConfigError("notify_timeout_s > 0 and 0 < notify_backoff_base_ms <= notify_backoff_max_ms required",
                          action=f"set {PREFIX}NOTIFY_TIMEOUT_S / {PREFIX}NOTIFY_BACKOFF_*")
    if (alerting.max_monitors_per_app < 1 or alerting.policy_apply_timeout_s < 0
            or alerting.outbox_sweep_interval_s <= 0):
        raise ConfigError("max_monitors_per_app >= 1, policy_apply_timeout_s >= 0 and outbox_sweep_interval_s > 0 "
                          "required", action=f"set {PREFIX}MAX_MONITORS_PER_APP / POLICY_APPLY_TIMEOUT_S / "
                                             "OUTBOX_SWEEP_INTERVAL_S")
    allowed_networks(alerting)
    if alerting.formation_url and "{app}" not in alerting.formation_url:
        raise ConfigError("formation_url must contain {app} (and may contain {process_type})",
                          action=f"set {PREFIX}FORMATION_URL, e.g. https://api.example.com/apps/{{app}}/formation/"
                                 "{process_type}")



@dataclass(slots=True)
class _Job:
    delivery: Delivery
    on_done: DoneCallback | None
    attempts: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class Notifier:
    """Bounded queue + worker tasks; :meth:`submit` never blocks and never raises."""

    def __init__(self, alerting: AlertingSettings, counters: Counters, *, senders: Mapping[str, Sender] | None = None,
                 rand: Callable[[], float] = random.random) -> None:
        self.alerting = alerting
        self.counters = counters
        self.rand = rand
        if senders is None:
            webhook = WebhookSender(timeout_s=alerting.notify_timeout_s,
                                    allowed_networks=allowed_networks(alerting))
            formation = WebhookSender(timeout_s=alerting.notify_timeout_s,
                                      formation_method=alerting.formation_method,
                                      formation_token=alerting.formation_token.get_secret_value(),
                                      formation_secret=alerting.formation_secret.get_secret_value())
            senders = {WEBHOOK: webhook, FORMATION: formation, EMAIL: EmailSender(alerting)}
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
            self._queue = asyncio.Queue(maxsize=self.alerting.notify_queue_max)
            for _ in range(self.alerting.notify_concurrency):
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
                        self.alerting.notify_queue_max, delivery.id)
            return False
        self._jobs[delivery.id] = job
        return True

    async def join(self) -> None:
        """Wait until nothing is queued, sending or waiting for a retry (tests, shutdown)."""
        while self._jobs:  # noqa: ASYNC110  a test and shutdown helper: polling is enough
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
            await asyncio.wait_for(sender.send(d), timeout=self.alerting.notify_timeout_s * 2)
        except (TimeoutError, DeliveryUnavailable) as exc:
            retry_after_s = exc.retry_after_s if isinstance(exc, DeliveryUnavailable) else 0.0
            if job.attempts >= self.alerting.notify_max_attempts:
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
        """The project's one backoff rule (app/retry.py): at least the receiver's Retry-After, at most the cap."""
        s = self.alerting
        policy = RetryPolicy.from_ms(s.notify_backoff_base_ms, s.notify_backoff_max_ms, jitter=self.rand)
        return policy.delay_s(attempts, retry_after_s)

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
        # The target's origin only: a webhook URL's path is often its credential (Slack, Discord).
        log.error("notification %s to %s given up: %s", job.delivery.id, url_origin(job.delivery.target), reason)
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

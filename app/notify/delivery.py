"""What the agents hand to the notifier: a :class:`Delivery` (webhook, e-mail or formation call) and its
:class:`DeliveryResult`, the kinds and outcomes, and the two errors a sender raises (permanent or retriable).

A webhook's secret is a :data:`app.sealing.Secret`: sealed at rest with ``METRICS_SECRETS_KEY`` (app/sealing.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.errors import PipelineError, RetriableError
from app.sealing import Secret, secret_from_record, secret_to_record

EVENT_HEADER = "X-Minutely-Event"
"""The event's id, the same on every retry and replay of it (webhooks and e-mail alike): receivers drop
duplicates by it."""

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


class SecretUnavailable(DeliveryFailed):
    """A stored secret cannot be decrypted (app/sealing.py :class:`SecretUnreadable`): the delivery cannot be
    signed, so it fails for good. The message names the key to restore, never a key."""


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
    secret: Secret = field(default="", repr=False)
    """The webhook's HMAC key, usually sealed (:class:`SealedSecret`): the sender opens it to sign."""
    supersedes: str = ""
    seq: int = 0

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "event_id": self.event_id, "channel": self.channel, "target": self.target,
                "body": self.body, "subject": self.subject, **secret_to_record(self.secret),
                "supersedes": self.supersedes, "seq": self.seq}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Delivery:
        return cls(rec["id"], rec["event_id"], rec["channel"], rec["target"], rec["body"], rec.get("subject", ""),
                   secret_from_record(rec), rec.get("supersedes", ""), int(rec.get("seq", 0)))


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




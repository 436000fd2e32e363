"""What the agents hand to the notifier: a :class:`Delivery` (webhook, e-mail or formation call) and its
:class:`DeliveryResult`, the kinds and outcomes, and the two errors a sender raises (permanent or retriable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from app.errors import PipelineError, RetriableError

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




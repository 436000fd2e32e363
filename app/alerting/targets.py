"""Who a monitor or policy notifies (e-mail addresses, signed webhooks), and what readers see of it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from app.sealing import Secret, secret_from_record, secret_to_record


def redact_url(url: str) -> str:
    """``scheme://host[:port]/…``: what a read-token holder sees of a webhook URL, which is often itself
    the credential (Slack, Discord). Only the write-token holder that set it got it back in full."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "?", parts.port
    except ValueError:
        return "…"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{'' if port is None else f':{port}'}/…"


def redacted(public: dict[str, Any]) -> dict[str, Any]:
    """A rendered monitor or policy (``public()``) with its webhook URLs cut by :func:`redact_url`."""
    hooks = public.get("webhooks")
    if not hooks:
        return public
    return {**public, "webhooks": [{**w, "url": redact_url(w["url"])} for w in hooks]}


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    secret: Secret = field(repr=False)
    """Plaintext from the API; sealed in records (``secret_enc``) when ``METRICS_SECRETS_KEY`` is set, and
    then also in memory once decoded: only the sender decrypts it, to sign (app/notify/delivery.py)."""

    def to_record(self) -> dict[str, Any]:
        return {"url": self.url, **secret_to_record(self.secret)}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Webhook:
        if "secret" not in rec and "secret_enc" not in rec:
            raise KeyError("secret")
        return cls(rec["url"], secret_from_record(rec))

    def public(self) -> dict[str, Any]:
        return {"url": self.url, "secret_set": True}  # the signing secret is never read back


@dataclass(frozen=True, slots=True)
class Targets:
    email: tuple[str, ...] = ()
    webhooks: tuple[Webhook, ...] = ()

    def to_record(self) -> dict[str, Any]:
        return {"email": list(self.email), "webhooks": [w.to_record() for w in self.webhooks]}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Targets:
        return cls(tuple(rec.get("email", ())), tuple(Webhook.from_record(w) for w in rec.get("webhooks", ())))

    def public(self) -> dict[str, Any]:
        return {"email": list(self.email), "webhooks": [w.public() for w in self.webhooks]}

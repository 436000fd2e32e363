"""Webhook HMAC secrets at rest: with ``METRICS_SECRETS_KEY`` set, every record holding one (policy commands,
the monitors/policies table values, the notification outbox) carries ``secret_enc``, a Fernet token
(:class:`SecretBox`), instead of ``secret``. Decoding never decrypts; records written before a key was set
(``secret``) still load. Only the webhook sender opens a secret, to compute the signature.

Shared by the monitors' state (tables/) and the notifier (app/notify/), so it sits below both."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from app.errors import PipelineError
from app.settings import PREFIX, secrets_keys


class SecretUnreadable(PipelineError):
    """A stored secret cannot be decrypted (its key is no longer configured, or the token is damaged). The
    message names the key to restore, never a key. The notifier gives that delivery up (``SecretUnavailable``)."""


@dataclass(frozen=True, slots=True)
class SealedSecret:
    """A webhook's HMAC secret as stored: a Fernet token under the key whose id is ``key_id``. It is opened
    (:meth:`SecretBox.open`) only to sign a delivery; records carry the token, never the secret."""

    token: str
    key_id: str = ""

    def __repr__(self) -> str:
        return f"SealedSecret(key_id={self.key_id!r})"


Secret = str | SealedSecret
"""A plaintext secret (no key configured, a record written before one was, or one just parsed from the
API) or a sealed one. ``""``: none."""


def key_id(key: str) -> str:
    """A Fernet key's id: the first 8 hex digits of SHA-256 of the key as written
    (``printf %s KEY | sha256sum | cut -c1-8``). Names a key in records and errors without revealing it."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class SecretBox:
    """Seals secrets for storage with the first key of ``secrets_key`` and opens them with any of its keys
    (MultiFernet: rotation). Without a key it seals nothing, and plaintext records stay plaintext."""

    def __init__(self, secrets_key: str = "") -> None:
        keys = secrets_keys(secrets_key) if secrets_key else []
        self.key_ids = [key_id(k) for k in keys]
        self._fernet = MultiFernet([Fernet(k) for k in keys]) if keys else None

    @property
    def enabled(self) -> bool:
        return self._fernet is not None

    def seal(self, secret: Secret) -> Secret:
        """``secret`` as it should be stored: sealed when a key is configured (already sealed: unchanged)."""
        if isinstance(secret, SealedSecret) or not secret or self._fernet is None:
            return secret
        return SealedSecret(self._fernet.encrypt(secret.encode()).decode(), self.key_ids[0])

    def open(self, secret: Secret) -> str:
        """The plaintext, to sign with; SecretUnreadable when this box holds no key that decrypts it."""
        if not isinstance(secret, SealedSecret):
            return secret
        kid = secret.key_id or "unknown"
        restore = ("(a key's id: printf %s KEY | sha256sum | cut -c1-8), or set the webhook again (PUT the "
                   "monitor or policy)")
        if self._fernet is None:
            raise SecretUnreadable(f"the webhook secret is encrypted (key id {kid}) and {PREFIX}SECRETS_KEY is "
                                    "empty", action=f"restore that key in {PREFIX}SECRETS_KEY {restore}")
        try:
            plain = self._fernet.decrypt(secret.token.encode())
        except (InvalidToken, ValueError, TypeError):
            why = ("is not one of the configured keys" if secret.key_id not in self.key_ids
                   else "is configured, but the token is damaged")
            raise SecretUnreadable(f"the webhook secret was encrypted with key id {kid}, which {why} "
                                    f"(configured: {', '.join(self.key_ids)})",
                                    action=f"add that key after the first one in {PREFIX}SECRETS_KEY {restore}"
                                    ) from None
        return plain.decode()


_box = SecretBox()


def secret_box() -> SecretBox:
    """The process's box (:func:`use_secrets_key`); records are sealed and opened with it."""
    return _box


def use_secrets_key(secrets_key: str) -> SecretBox:
    """Install the box of ``secrets_key`` (the worker does, from ``settings.alerting.secrets_key``)."""
    global _box
    _box = SecretBox(secrets_key)
    return _box


def secret_to_record(secret: Secret) -> dict[str, str]:
    """The record fields of a secret: ``secret_enc`` (and ``secret_key_id``) when sealed or sealable,
    ``secret`` in plaintext only while no key is configured."""
    stored = _box.seal(secret)
    if isinstance(stored, SealedSecret):
        return {"secret_enc": stored.token, "secret_key_id": stored.key_id}
    return {"secret": stored}


def secret_from_record(rec: Mapping[str, Any]) -> Secret:
    """Inverse of :func:`secret_to_record`, also for records written before encryption (``secret``). Never
    decrypts, so a record under a missing key still loads; a plaintext one is sealed when a key is set."""
    if "secret_enc" in rec:
        return SealedSecret(str(rec["secret_enc"]), str(rec.get("secret_key_id", "")))
    return _box.seal(str(rec.get("secret", "")))



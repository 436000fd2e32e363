"""Webhook secrets at rest (METRICS_SECRETS_KEY) for the alerting tests: two keys, a plaintext secret, a
webhook carrying it, and the ``keyed`` fixture (import it where it is used)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography.fernet import Fernet

from app.alerting.targets import Targets, Webhook
from app.sealing import SecretBox, use_secrets_key

KEY = Fernet.generate_key().decode()
OLD_KEY = Fernet.generate_key().decode()
PLAIN = "whsec_plaintext_0123456789"
HOOKS = Targets((), (Webhook("http://127.0.0.1:9/hook", PLAIN),))


@pytest.fixture
def keyed() -> Iterator[SecretBox]:
    """The process's secrets key set to KEY for one test, unset after."""
    box = use_secrets_key(KEY)
    yield box
    use_secrets_key("")

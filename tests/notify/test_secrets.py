"""Webhook HMAC secrets at rest (app/notify/delivery.py SecretBox, METRICS_SECRETS_KEY): sealed in records,
old plaintext records still read, opened only to sign, a missing key fails one delivery with its key id."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.fernet import Fernet

from app.errors import ConfigError, RetriableError
from app.notify.delivery import (
    DELIVERED,
    FAILED,
    WEBHOOK,
    Delivery,
    DeliveryResult,
)
from app.notify.notifier import Notifier
from app.notify.webhook import SIGNATURE_HEADER, WebhookSender, allowed_networks, verify_signature
from app.ops.stats import Counters
from app.sealing import SealedSecret, SecretBox, SecretUnreadable, key_id, secret_box, use_secrets_key
from app.settings import Settings

SECRET = "whsec_0123456789abcdef"
# Fixed keys (any 32 bytes, urlsafe base64): test ids must be the same in every pytest-xdist process.
KEY = base64.urlsafe_b64encode(b"k" * 32).decode()
OLD_KEY = base64.urlsafe_b64encode(b"o" * 32).decode()
OTHER_KEY = base64.urlsafe_b64encode(b"x" * 32).decode()


@pytest.fixture
def keyed() -> Iterator[SecretBox]:
    """The process's box holds KEY for the test (the worker installs settings.alerting.secrets_key at start)."""
    box = use_secrets_key(KEY)
    yield box
    use_secrets_key("")


def delivery(secret: Any = SECRET, target: str = "https://hooks.example.com/x", n: int = 0) -> Delivery:
    return Delivery(f"ev/webhook/{n}", "ev", WEBHOOK, target, '{"type":"alert"}', secret=secret)


# --- the box ------------------------------------------------------------------------------------------------

def test_seal_and_open_round_trip_and_reveal_nothing() -> None:
    box = SecretBox(KEY)
    sealed = box.seal(SECRET)
    assert isinstance(sealed, SealedSecret) and sealed.key_id == key_id(KEY) and len(sealed.key_id) == 8
    assert SECRET not in sealed.token and SECRET not in repr(sealed) and sealed.token not in repr(sealed)
    assert box.open(sealed) == SECRET
    assert box.seal(sealed) is sealed  # already sealed: not sealed twice
    assert box.seal("") == "" and box.open("") == ""
    assert box.open(SECRET) == SECRET  # a plaintext secret (an old record) signs as it is
    plain = SecretBox()
    assert not plain.enabled and plain.seal(SECRET) == SECRET  # no key: today's behaviour


def test_rotation_first_key_encrypts_all_keys_decrypt() -> None:
    old = SecretBox(OLD_KEY).seal(SECRET)
    rotated = SecretBox(f"{KEY}, {OLD_KEY}")  # spaces after commas are fine
    assert rotated.key_ids == [key_id(KEY), key_id(OLD_KEY)]
    assert isinstance(old, SealedSecret) and rotated.open(old) == SECRET
    new = rotated.seal(SECRET)
    assert isinstance(new, SealedSecret) and new.key_id == key_id(KEY)
    assert SecretBox(KEY).open(new) == SECRET


def test_a_key_no_longer_configured_names_the_key_to_restore() -> None:
    sealed = SecretBox(OLD_KEY).seal(SECRET)
    assert isinstance(sealed, SealedSecret)
    for box in (SecretBox(KEY), SecretBox("")):
        with pytest.raises(SecretUnreadable) as err:
            box.open(sealed)
        text = str(err.value)
        assert not isinstance(err.value, RetriableError)  # permanent: the sender gives that delivery up
        assert key_id(OLD_KEY) in text and "METRICS_SECRETS_KEY" in text and err.value.action
        assert SECRET not in text and KEY not in text and OLD_KEY not in text
    with pytest.raises(SecretUnreadable, match="damaged"):
        SecretBox(KEY).open(SealedSecret("gAAAAAnot-a-token", key_id(KEY)))


def test_key_id_is_what_the_error_tells_operators_to_compute() -> None:
    import hashlib

    assert key_id(KEY) == hashlib.sha256(KEY.encode()).hexdigest()[:8]


# --- delivery records (the outbox) ----------------------------------------------------------------------------

def test_delivery_records_carry_the_token_never_the_secret(keyed: SecretBox) -> None:
    rec = delivery().to_record()
    assert "secret" not in rec and rec["secret_key_id"] == key_id(KEY)
    raw = orjson.dumps({"p": 0, "app": "shop", "slot": "x", "d": rec})  # as the outbox stores it
    assert SECRET.encode() not in raw and b"whsec" not in raw
    back = Delivery.from_record(orjson.loads(raw)["d"])
    assert isinstance(back.secret, SealedSecret) and keyed.open(back.secret) == SECRET
    assert back.to_record() == rec  # a sealed secret is stored as it is (no re-encryption per write)
    assert SECRET not in repr(delivery()) and SECRET not in repr(back)


def test_old_plaintext_delivery_records_still_read(keyed: SecretBox) -> None:
    old = {"id": "ev/webhook/0", "event_id": "ev", "channel": WEBHOOK, "target": "https://h.example.com/",
           "body": "{}", "subject": "", "secret": SECRET, "supersedes": "", "seq": 0}
    d = Delivery.from_record(old)
    assert keyed.open(d.secret) == SECRET
    assert SECRET.encode() not in orjson.dumps(d.to_record())  # written back sealed
    use_secrets_key("")
    assert Delivery.from_record(old) == Delivery("ev/webhook/0", "ev", WEBHOOK, "https://h.example.com/", "{}",
                                                 secret=SECRET)


def test_without_a_key_records_keep_todays_shape() -> None:
    assert not secret_box().enabled
    rec = delivery().to_record()
    assert rec["secret"] == SECRET and "secret_enc" not in rec
    assert Delivery.from_record(rec) == delivery()
    assert Delivery("e/email/a", "e", "email", "a@example.com", "text").to_record()["secret"] == ""


def test_a_record_sealed_under_a_missing_key_still_loads(keyed: SecretBox) -> None:
    rec = delivery(SecretBox(OLD_KEY).seal(SECRET)).to_record()
    d = Delivery.from_record(rec)  # decoding never decrypts: the worker keeps running
    assert isinstance(d.secret, SealedSecret) and d.secret.key_id == key_id(OLD_KEY)
    assert d.to_record() == rec  # kept as it is, readable again once the key is restored


# --- signing at delivery --------------------------------------------------------------------------------------

@pytest.fixture
async def receiver() -> Any:
    got: list[tuple[dict[str, str], bytes]] = []

    async def handle(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.read()))
        return web.Response(text="ok")

    webapp = web.Application()
    webapp.router.add_post("/{tail:.*}", handle)
    server = TestServer(webapp, host="127.0.0.1")
    await server.start_server()
    server.got = got  # type: ignore[attr-defined]
    server.base = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    yield server
    await server.close()


def settings(**kw: Any) -> Settings:
    return Settings.of(**{**dict(notify_timeout_s=2.0, notify_backoff_base_ms=20, notify_backoff_max_ms=100,
                              notify_max_attempts=3, webhook_allowed_networks="127.0.0.0/8"), **kw})


async def test_a_sealed_secret_signs_exactly_like_the_plaintext(receiver: Any, keyed: SecretBox) -> None:
    now = 1_764_000_000
    sender = WebhookSender(timeout_s=2.0, clock_s=lambda: now, allowed_networks=allowed_networks(settings().alerting))
    try:
        stored = Delivery.from_record(delivery(target=f"{receiver.base}/hook").to_record())  # from the outbox
        assert isinstance(stored.secret, SealedSecret)
        await sender.send(stored)
        await sender.send(delivery(target=f"{receiver.base}/hook"))  # plaintext, as before
    finally:
        await sender.stop()
    (h1, b1), (h2, b2) = receiver.got
    assert h1[SIGNATURE_HEADER] == h2[SIGNATURE_HEADER] and b1 == b2
    assert verify_signature(SECRET, h1[SIGNATURE_HEADER], b1, now_s=now)
    assert all(SECRET not in v for v in h1.values())


async def test_a_missing_key_fails_that_delivery_only_and_logs_which_key(
        receiver: Any, keyed: SecretBox, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(settings().alerting, Counters())
    done: dict[str, DeliveryResult] = {}

    def on_done(d: Delivery, r: DeliveryResult) -> None:
        done[d.id] = r

    lost = Delivery.from_record(delivery(SecretBox(OLD_KEY).seal(SECRET), f"{receiver.base}/a", 0).to_record())
    fine = Delivery.from_record(delivery(SECRET, f"{receiver.base}/b", 1).to_record())
    with caplog.at_level(logging.ERROR, logger="app.notify.notifier"):
        n.submit(lost, on_done)
        n.submit(fine, on_done)
        await n.join()
    await n.stop()
    assert (done["ev/webhook/0"].state, done["ev/webhook/0"].attempts) == (FAILED, 1)  # not retried
    assert key_id(OLD_KEY) in done["ev/webhook/0"].error
    assert done["ev/webhook/1"].state == DELIVERED and len(receiver.got) == 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "given up" in logged and key_id(OLD_KEY) in logged and "METRICS_SECRETS_KEY" in logged
    assert SECRET not in logged and OLD_KEY not in logged and KEY not in logged


# --- settings -------------------------------------------------------------------------------------------------

def test_settings_accept_one_or_several_keys_and_hide_them() -> None:
    for value in (KEY, f"{KEY},{OLD_KEY}", f" {KEY} , {OLD_KEY} "):
        s = Settings.from_env({"METRICS_SECRETS_KEY": value})
        assert s.alerting.secrets_key.get_secret_value() == value and KEY not in repr(s)
    assert Settings.from_env({}).alerting.secrets_key.get_secret_value() == ""


@pytest.mark.parametrize("value, where", [
    ("not-a-key", "the key"),
    (KEY[:-4], "the key"),
    (f"{KEY},", "key 2 of 2"),
    (f"{KEY},{OLD_KEY},short", "key 3 of 3"),
    (f"nope,{KEY}", "key 1 of 2"),
])
def test_settings_reject_a_bad_key_with_the_action(value: str, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"METRICS_SECRETS_KEY": value})
    text = str(err.value)
    assert where in text and "Fernet" in text and "METRICS_SECRETS_KEY" in err.value.action
    assert "generate_key" in err.value.action
    assert KEY not in text and "not-a-key" not in text and "short" not in text
    with pytest.raises(ConfigError):
        Settings.of(secrets_key=value)


def test_keys_made_as_documented_are_valid() -> None:
    Settings.of(secrets_key=Fernet.generate_key().decode())  # what docs/alerting.md's command prints

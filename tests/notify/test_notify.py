"""Notifications (app/notify/) against real peers on loopback: an aiohttp receiver and aiosmtpd servers
(plain, STARTTLS with AUTH, implicit TLS; certificates from a throwaway trustme CA)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from app.errors import ConfigError
from app.local.embedded import free_port
from app.notify.delivery import (
    ABANDONED,
    DELIVERED,
    EMAIL,
    FAILED,
    FORMATION,
    SUPERSEDED,
    WEBHOOK,
    Delivery,
    DeliveryResult,
)
from app.notify.email import EmailSender
from app.notify.notifier import Notifier, validate_settings
from app.notify.webhook import sign, verify_signature
from app.ops.stats import CounterName, Counters
from app.settings import Settings

SECRET = "whsec_0123456789abcdef"


class Receiver:
    """Records every request; behaviour per path."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.calls: dict[str, int] = {}

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        n = self.calls[path] = self.calls.get(path, 0) + 1
        body = await request.read()
        self.requests.append({"path": path, "method": request.method, "headers": dict(request.headers),
                              "body": body, "at": time.monotonic()})
        if path == "/flaky" and n <= 2:
            return web.Response(status=503)
        if path == "/busy" and n == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        if path == "/gone":
            return web.Response(status=410)
        if path == "/redirect":
            raise web.HTTPFound("/ok")
        if path == "/slow":
            await asyncio.sleep(5)
        if path.startswith("/formation"):
            await asyncio.sleep(0.02)
        return web.Response(status=200, text="ok")

    def at(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]


@pytest.fixture
async def receiver() -> Any:
    rec = Receiver()
    webapp = web.Application()
    webapp.router.add_route("*", "/{tail:.*}", rec.handle)
    server = TestServer(webapp, host="127.0.0.1")
    await server.start_server()
    rec.url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    yield rec
    await server.close()


def settings(**kw: Any) -> Settings:
    base: dict[str, Any] = dict(notify_timeout_s=2.0, notify_backoff_base_ms=20, notify_backoff_max_ms=1000,
                                notify_max_attempts=4, notify_concurrency=4,
                                webhook_allowed_networks="127.0.0.0/8")  # the receivers here are on loopback
    return Settings.of(**{**base, **kw})


def hook(rec: Any, path: str, n: int = 0) -> Delivery:
    body = orjson.dumps({"type": "alert", "event": "firing", "n": n}).decode()
    return Delivery(f"ev-{n}/webhook/0", f"ev-{n}", WEBHOOK, f"{rec.url}{path}", body, secret=SECRET)


class Results:
    def __init__(self) -> None:
        self.done: dict[str, DeliveryResult] = {}

    def __call__(self, d: Delivery, r: DeliveryResult) -> None:
        self.done[d.id] = r


# --- webhooks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "169.254.169.254"])
async def test_webhooks_reach_only_public_or_allowed_addresses(receiver: Any, host: str) -> None:
    counters = Counters()
    n = Notifier(settings(webhook_allowed_networks="", notify_max_attempts=4).alerting, counters)
    res = Results()
    port = receiver.url.rsplit(":", 1)[1]
    n.submit(Delivery("x/webhook/0", "x", WEBHOOK, f"http://{host}:{port}/ok", "{}", secret=SECRET), res)
    await n.join()
    r = res.done["x/webhook/0"]
    assert (r.state, r.attempts) == (FAILED, 1)
    assert "public address" in r.error and "WEBHOOK_ALLOWED_NETWORKS" in r.error
    assert receiver.at("/ok") == [] and counters.values["notifications_failed"] == 1
    await n.stop()


async def test_an_allowed_network_and_the_formation_api_are_reached(receiver: Any) -> None:
    n = Notifier(settings(webhook_allowed_networks="10.0.0.0/8, 127.0.0.0/8").alerting, Counters())
    res = Results()
    n.submit(hook(receiver, "/ok"), res)
    await n.join()
    assert res.done["ev-0/webhook/0"].state == DELIVERED
    await n.stop()
    # The operator's formation API is trusted: no allow-list needed even on loopback.
    n = Notifier(settings(webhook_allowed_networks="").alerting, Counters())
    n.submit(Delivery("m/formation", "m", FORMATION, f"{receiver.url}/formation/shop", "{}"), res)
    await n.join()
    assert res.done["m/formation"].state == DELIVERED
    await n.stop()


def test_webhook_allowed_networks_must_be_cidrs() -> None:
    with pytest.raises(ConfigError, match="WEBHOOK_ALLOWED_NETWORKS"):
        validate_settings(Settings.of(webhook_allowed_networks="10.0.0.0/8,not-a-network").alerting)

async def test_webhook_is_signed_with_hmac_over_timestamp_and_body(receiver: Any) -> None:
    n = Notifier(settings().alerting, Counters())
    res = Results()
    assert n.submit(hook(receiver, "/ok"), res)
    await n.join()
    assert res.done["ev-0/webhook/0"] == DeliveryResult(DELIVERED, 1)
    (req,) = receiver.at("/ok")
    h = req["headers"]
    assert req["method"] == "POST" and h["Content-Type"] == "application/json"
    assert h["X-Minutely-Event"] == "ev-0" and h["X-Minutely-Delivery"] == "ev-0/webhook/0"
    assert orjson.loads(req["body"]) == {"type": "alert", "event": "firing", "n": 0}
    now = time.time()
    assert verify_signature(SECRET, h["X-Minutely-Signature"], req["body"], now_s=now)
    assert not verify_signature("another-secret-123", h["X-Minutely-Signature"], req["body"], now_s=now)
    assert not verify_signature(SECRET, h["X-Minutely-Signature"], req["body"] + b" ", now_s=now)
    assert not verify_signature(SECRET, h["X-Minutely-Signature"], req["body"], now_s=now + 600)  # replayed
    assert not verify_signature(SECRET, "garbage", req["body"], now_s=now)
    assert sign(SECRET, b"{}", 1700000000) == sign(SECRET, b"{}", 1700000000)
    await n.stop()


async def test_retries_with_exponential_backoff_then_delivers(receiver: Any) -> None:
    counters = Counters()
    # jitter pinned to the ceiling
    n = Notifier(settings(notify_backoff_base_ms=100).alerting, counters, rand=lambda: 1.0)
    res = Results()
    n.submit(hook(receiver, "/flaky"), res)
    await n.join()
    assert res.done["ev-0/webhook/0"] == DeliveryResult(DELIVERED, 3)
    t = [r["at"] for r in receiver.at("/flaky")]
    assert len(t) == 3
    assert t[1] - t[0] >= 0.1 and t[2] - t[1] >= 0.2  # 100 ms, then 200 ms
    assert counters.values["notification_retries"] == 2 and counters.values["notifications_sent"] == 1
    await n.stop()


def test_backoff_is_full_jitter_capped_and_respects_retry_after() -> None:
    n = Notifier(settings(notify_backoff_base_ms=1000, notify_backoff_max_ms=8000).alerting, Counters(),
                 rand=lambda: 0.5)
    assert [n.backoff_s(a) for a in (1, 2, 3, 4, 5, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert n.backoff_s(1, retry_after_s=3.0) == 3.0 and n.backoff_s(1, retry_after_s=60.0) == 8.0


async def test_retry_after_is_honoured(receiver: Any) -> None:
    n = Notifier(settings().alerting, Counters(), rand=lambda: 0.0)
    res = Results()
    n.submit(hook(receiver, "/busy"), res)
    await n.join()
    t = [r["at"] for r in receiver.at("/busy")]
    assert res.done["ev-0/webhook/0"].state == DELIVERED and t[1] - t[0] >= 0.95
    await n.stop()


@pytest.mark.parametrize("path", ["/gone", "/redirect"])
async def test_refusals_are_not_retried(receiver: Any, path: str) -> None:
    counters = Counters()
    n = Notifier(settings().alerting, counters)
    res = Results()
    n.submit(hook(receiver, path), res)
    await n.join()
    r = res.done["ev-0/webhook/0"]
    assert (r.state, r.attempts) == (FAILED, 1) and ("410" in r.error or "302" in r.error)
    assert len(receiver.at(path)) == 1 and counters.values["notifications_failed"] == 1
    await n.stop()


async def test_timeouts_are_retried_and_bounded(receiver: Any) -> None:
    n = Notifier(settings(notify_timeout_s=0.2, notify_max_attempts=2).alerting, Counters())
    res = Results()
    started = time.monotonic()
    n.submit(hook(receiver, "/slow"), res)
    await n.join()
    r = res.done["ev-0/webhook/0"]
    assert (r.state, r.attempts) == (FAILED, 2) and "after 2 attempts" in r.error
    assert time.monotonic() - started < 2.0
    await n.stop()


async def test_unreachable_receiver_is_retried_then_given_up() -> None:
    n = Notifier(settings(notify_max_attempts=3).alerting, Counters(), rand=lambda: 1.0)
    res = Results()
    d = Delivery("x/webhook/0", "x", WEBHOOK, f"http://127.0.0.1:{free_port()}/hook", "{}", secret=SECRET)
    started = time.monotonic()
    n.submit(d, res)
    await n.join()
    assert (res.done["x/webhook/0"].state, res.done["x/webhook/0"].attempts) == (FAILED, 3)
    # Our backoff alone (20 ms, 40 ms): no Retry-After was sent, so none is imposed.
    assert time.monotonic() - started < 0.5
    await n.stop()


async def test_submit_never_blocks_and_the_queue_is_bounded(receiver: Any) -> None:
    counters = Counters()
    n = Notifier(settings(notify_concurrency=1, notify_queue_max=2, notify_timeout_s=10).alerting, counters)
    res = Results()
    started = time.perf_counter()
    accepted = [n.submit(hook(receiver, "/slow", i), res) for i in range(5)]
    elapsed = time.perf_counter() - started
    # The queue holds 2; the single worker has not taken one yet (it runs when we yield).
    assert accepted == [True, True, False, False, False] and elapsed < 0.05
    assert counters.values["notifications_deferred"] == 3
    await asyncio.sleep(0.1)  # the worker takes one (now sending, stuck): one queue slot frees up
    assert n.submit(hook(receiver, "/slow", 5), res) and not n.submit(hook(receiver, "/slow", 6), res)
    assert n.submit(hook(receiver, "/slow", 0), res)  # already on its way: accepted without a duplicate
    assert n.inflight == {"ev-0/webhook/0", "ev-1/webhook/0", "ev-5/webhook/0"}
    await n.stop()
    assert {k: r.state for k, r in res.done.items()} == {k: ABANDONED for k in n_ids(0, 1, 5)}
    assert not n.submit(hook(receiver, "/ok", 9), res)  # stopped


def n_ids(*ns: int) -> list[str]:
    return [f"ev-{i}/webhook/0" for i in ns]


async def test_formation_calls_are_serialized_and_superseded(receiver: Any) -> None:
    n = Notifier(settings(notify_concurrency=4, formation_token="tok-123", formation_secret=SECRET).alerting,
                 Counters())
    res = Results()
    for q in (2, 3, 4, 5):
        body = orjson.dumps({"quantity": q}).decode()
        n.submit(Delivery(f"m{q}/formation", f"m{q}", FORMATION, f"{receiver.url}/formation/shop", body,
                          supersedes="shop/web", seq=q), res)
    await n.join()
    got = [orjson.loads(r["body"])["quantity"] for r in receiver.at("/formation/shop")]
    # Never an older quantity after a newer one, and the newest always arrives last.
    assert got == sorted(got) and got[-1] == 5 and len(got) < 4
    assert {r.state for r in res.done.values()} == {DELIVERED, SUPERSEDED}
    req = receiver.at("/formation/shop")[-1]
    assert req["method"] == "PATCH" and req["headers"]["Authorization"] == "Bearer tok-123"
    assert verify_signature(SECRET, req["headers"]["X-Minutely-Signature"], req["body"], now_s=time.time())
    await n.stop()


class BrokenBookkeeping(Counters):
    """Counters with a bug: the first failure count raises (an undeclared name would do the same)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    def inc(self, name: CounterName, n: int = 1) -> None:
        if name == "notifications_failed" and self.broken:
            self.broken = False
            raise RuntimeError("bookkeeping bug")
        super().inc(name, n)


class KeyErrorSender:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send(self, d: Delivery) -> None:
        if d.id == "a":
            raise KeyError("sender bug")
        self.sent.append(d.id)


async def test_a_dead_worker_is_logged_and_replaced(caplog: pytest.LogCaptureFixture) -> None:
    counters = BrokenBookkeeping()
    sender = KeyErrorSender()
    n = Notifier(settings(notify_concurrency=1).alerting, counters, senders={WEBHOOK: sender})
    res = Results()
    n.submit(Delivery("a", "a", WEBHOOK, "http://x/", "{}"), res)
    await asyncio.sleep(0.05)
    n.submit(Delivery("b", "b", WEBHOOK, "http://x/", "{}"), res)
    await n.join()
    # "a" had already failed when the bookkeeping broke: it is settled, and the worker was replaced.
    assert res.done["a"].state == FAILED and res.done["b"].state == DELIVERED
    assert counters.values["notify_worker_restarts"] == 1 and sender.sent == ["b"]
    assert "notifier worker died; starting a new one" in caplog.text and "bookkeeping bug" in caplog.text
    await n.stop()


async def test_a_failing_sender_costs_only_its_delivery() -> None:
    class Broken:
        async def start(self) -> None:
            return None

        async def stop(self) -> None:
            return None

        async def send(self, d: Delivery) -> None:
            if d.id == "bad":
                raise KeyError("bug")

    n = Notifier(settings().alerting, Counters(), senders={WEBHOOK: Broken()})
    res = Results()
    n.submit(Delivery("bad", "e", WEBHOOK, "http://x/", "{}"), res)
    n.submit(Delivery("good", "e", WEBHOOK, "http://x/", "{}"), res)
    await n.join()
    assert res.done["bad"].state == FAILED and "internal error" in res.done["bad"].error
    assert res.done["good"].state == DELIVERED
    await n.stop()


# --- e-mail ------------------------------------------------------------------------------------------------------

class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.refuse = {"nobody@example.com": "550 5.1.1 no such user", "later@example.com": "450 4.2.0 try later"}

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 Message accepted for delivery"


def authenticate(server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any) -> AuthResult:
    def text(v: str | bytes) -> str:
        return v.decode() if isinstance(v, bytes) else v
    ok = isinstance(auth_data, LoginPassword) and (text(auth_data.login), text(auth_data.password)) == ("alerts",
                                                                                                       "s3cret")
    return AuthResult(success=ok, handled=False)  # handled=False: the server answers 235/535 itself


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


def server_context(authority: trustme.CA) -> Any:
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
def smtp_starttls(ca: tuple[trustme.CA, Path]) -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    ctl = Controller(inbox, hostname="127.0.0.1", port=port, tls_context=server_context(ca[0]),
                     require_starttls=True, auth_required=True, auth_require_tls=True, authenticator=authenticate)
    ctl.start()
    yield inbox, port
    ctl.stop()


@pytest.fixture
def smtp_implicit_tls(ca: tuple[trustme.CA, Path]) -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    ctl = Controller(inbox, hostname="127.0.0.1", port=port, ssl_context=server_context(ca[0]))
    ctl.start()
    yield inbox, port
    ctl.stop()


def mail(to: str, n: int = 0) -> Delivery:
    return Delivery(f"ev-{n}/email/{to}", f"ev-{n}", EMAIL, to, "App: shop\nState: firing\n",
                    subject="FIRING shop/web: p95 response time 812 ms (threshold 500 ms)")


async def test_email_over_starttls_with_auth(smtp_starttls: tuple[Inbox, int], ca: tuple[trustme.CA, Path]) -> None:
    inbox, port = smtp_starttls
    s = settings(smtp_host="127.0.0.1", smtp_port=port, smtp_tls="starttls", smtp_username="alerts",
                 smtp_password="s3cret", smtp_ca_file=str(ca[1]), smtp_from="minutely <alerts@example.com>")
    n = Notifier(s.alerting, Counters())
    res = Results()
    n.submit(mail("ops@example.com"), res)
    await n.join()
    assert res.done["ev-0/email/ops@example.com"].state == DELIVERED
    (msg,) = inbox.messages
    assert msg["To"] == "ops@example.com" and msg["From"] == "minutely <alerts@example.com>"
    assert msg["Subject"] == "FIRING shop/web: p95 response time 812 ms (threshold 500 ms)"
    assert msg["Message-ID"] == EmailSender.message_id("ev-0/email/ops@example.com")
    assert msg["X-Minutely-Event"] == "ev-0" and "State: firing" in msg.get_payload()
    await n.stop()


async def test_email_bad_credentials_and_refused_recipients_are_not_retried(
        smtp_starttls: tuple[Inbox, int], ca: tuple[trustme.CA, Path]) -> None:
    inbox, port = smtp_starttls
    base = dict(smtp_host="127.0.0.1", smtp_port=port, smtp_tls="starttls", smtp_ca_file=str(ca[1]),
                smtp_username="alerts")
    res = Results()
    wrong = Notifier(settings(**base, smtp_password="wrong").alerting, Counters())
    wrong.submit(mail("ops@example.com"), res)
    await wrong.join()
    r = res.done["ev-0/email/ops@example.com"]
    assert (r.state, r.attempts) == (FAILED, 1) and "535" in r.error
    right = Notifier(settings(**base, smtp_password="s3cret").alerting, Counters())
    right.submit(mail("nobody@example.com", 1), res)
    right.submit(mail("later@example.com", 2), res)
    await right.join()
    assert (res.done["ev-1/email/nobody@example.com"].state, res.done["ev-1/email/nobody@example.com"].attempts) \
        == (FAILED, 1)
    assert (res.done["ev-2/email/later@example.com"].state, res.done["ev-2/email/later@example.com"].attempts) \
        == (FAILED, 4)  # 4xx: retried up to notify_max_attempts
    assert inbox.messages == []
    await wrong.stop()
    await right.stop()


async def test_email_over_implicit_tls_and_plaintext_refused_by_a_tls_server(
        smtp_implicit_tls: tuple[Inbox, int], ca: tuple[trustme.CA, Path]) -> None:
    inbox, port = smtp_implicit_tls
    n = Notifier(settings(smtp_host="127.0.0.1", smtp_port=port, smtp_tls="tls", smtp_ca_file=str(ca[1])).alerting,
                 Counters())
    res = Results()
    n.submit(mail("ops@example.com"), res)
    await n.join()
    assert res.done["ev-0/email/ops@example.com"].state == DELIVERED and len(inbox.messages) == 1
    await n.stop()
    # The wrong TLS mode is a connection failure (retriable), bounded by the attempts.
    plain = Notifier(settings(smtp_host="127.0.0.1", smtp_port=port, smtp_tls="none", notify_timeout_s=0.5,
                              notify_max_attempts=2).alerting, Counters())
    plain.submit(mail("ops@example.com", 1), res)
    await plain.join()
    assert res.done["ev-1/email/ops@example.com"].state == FAILED
    await plain.stop()


async def test_email_without_smtp_server_configured_fails_with_the_setting_named() -> None:
    n = Notifier(settings().alerting, Counters())
    res = Results()
    n.submit(mail("ops@example.com"), res)
    await n.join()
    r = res.done["ev-0/email/ops@example.com"]
    assert (r.state, r.attempts) == (FAILED, 1) and "METRICS_SMTP_HOST" in r.error
    await n.stop()


@pytest.mark.parametrize("change", [{"smtp_tls": "ssl"}, {"notify_concurrency": 0}, {"notify_backoff_max_ms": 10},
                                    {"formation_url": "https://api.example.com/formation"},
                                    {"max_monitors_per_app": 0}])
def test_nonsensical_settings_are_refused_at_start(change: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        validate_settings(settings(**change).alerting)
    validate_settings(settings().alerting)

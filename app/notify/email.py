"""E-mail notifications over SMTP (plain, STARTTLS or implicit TLS)."""

from __future__ import annotations

import hashlib
import logging
import ssl
from email.message import EmailMessage
from email.utils import formatdate

import aiosmtplib

from app.notify.delivery import (
    EVENT_HEADER,
    Delivery,
    DeliveryFailed,
    DeliveryUnavailable,
)
from app.settings import PREFIX, AlertingSettings

log = logging.getLogger(__name__)

SMTP_TLS_MODES = ("none", "starttls", "tls")


class EmailSender:
    """One message per delivery over SMTP (aiosmtplib): a connection per message, because alert mail is
    rare and SMTP servers drop idle connections. TLS: ``none``, ``starttls`` (port 587) or ``tls`` (465)."""

    def __init__(self, alerting: AlertingSettings) -> None:
        s = alerting
        self.host, self.port, self.mode = s.smtp_host, s.smtp_port, s.smtp_tls
        self.username, self.password = s.smtp_username or None, s.smtp_password.get_secret_value() or None
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
        except (TimeoutError, aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError,
                aiosmtplib.SMTPTimeoutError, OSError) as exc:
            raise DeliveryUnavailable(f"SMTP {self.host}:{self.port}: {type(exc).__name__}: {exc}",
                                      action="check that the SMTP server is reachable") from None
        except aiosmtplib.SMTPException as exc:
            raise DeliveryFailed(f"SMTP {self.host}:{self.port}: {exc}",
                                 action=f"check {PREFIX}SMTP_TLS against what the server supports") from None


# --- the background notifier ----------------------------------------------------------------------------

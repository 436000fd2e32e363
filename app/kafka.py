"""Connection settings shared by every Kafka client: Faust's, and the plain aiokafka ones (ingest producer,
topic creation, load generator). One place, so TLS configured once applies to all of them."""

from __future__ import annotations

import ssl
from typing import Any

from app.errors import ConfigError
from app.ops import bootstrap_servers
from app.settings import PREFIX, Settings


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for ``kafka_security_protocol=SSL`` (hostname checked), else None."""
    if settings.kafka_security_protocol != "SSL":
        return None
    try:
        ctx = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
        if settings.kafka_ssl_certfile:
            ctx.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the Kafka TLS files: {exc}",
                          action=f"check {PREFIX}KAFKA_SSL_CAFILE / _CERTFILE / _KEYFILE (readable PEM files)"
                          ) from None
    return ctx


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for aiokafka's producer, consumer and admin client."""
    ctx = ssl_context(settings)
    return {} if ctx is None else {"security_protocol": "SSL", "ssl_context": ctx}


def faust_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``faust.App``."""
    ctx = ssl_context(settings)
    return {} if ctx is None else {"broker_credentials": ctx}


def bootstrap(settings: Settings) -> str:
    """``host:port,host2:port`` from the Faust-style ``broker_url``."""
    return ",".join(bootstrap_servers(settings.broker_url))

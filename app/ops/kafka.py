"""Connection settings shared by every Kafka client: Faust's, and the plain aiokafka ones (ingest producer,
topic creation, load generator). One place, so TLS configured once applies to all of them."""

from __future__ import annotations

import functools
import re
import ssl
from typing import Any
from urllib.parse import urlsplit

from app.errors import ConfigError
from app.settings import PREFIX, KafkaSettings

DEFAULT_KAFKA_PORT = 9092


@functools.lru_cache(maxsize=65536)
def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2 of the key, as aiokafka and the Java client
    compute it) gives a record keyed ``key``: where an app's observations and minutes go."""
    from aiokafka.partitioner import murmur2

    return (int(murmur2(key.encode())) & 0x7FFFFFFF) % partitions


def bootstrap_servers(broker_url: str) -> list[str]:
    """``kafka://h1:9092;kafka://h2:9092`` (Faust's form; ``,`` also separates) -> ``["h1:9092", "h2:9092"]``.

    Credentials in a URL are dropped: the result is logged and shown in readiness answers.
    """
    servers: list[str] = []
    for part in re.split(r"[;,]", broker_url):
        part = part.strip()
        if not part:
            continue
        split = urlsplit(part if "://" in part else f"kafka://{part}")
        host = split.hostname
        if not host:
            continue
        try:
            port = split.port or DEFAULT_KAFKA_PORT
        except ValueError:
            port = DEFAULT_KAFKA_PORT
        servers.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return servers


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context for ``SSL`` and ``SASL_SSL`` (hostname checked), else None."""
    if kafka.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    try:
        ctx = ssl.create_default_context(cafile=kafka.ssl_cafile or None)
        if kafka.ssl_certfile:
            ctx.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the Kafka TLS files: {exc}",
                          action=f"check {PREFIX}KAFKA_SSL_CAFILE / _CERTFILE / _KEYFILE (readable PEM files)"
                          ) from None
    return ctx


def client_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for aiokafka's producer, consumer and admin client."""
    protocol = kafka.security_protocol
    kwargs: dict[str, Any] = {}
    ctx = ssl_context(kafka)
    if ctx is not None:
        kwargs.update(security_protocol=protocol, ssl_context=ctx)
    if protocol.startswith("SASL_"):
        kwargs.update(security_protocol=protocol, sasl_mechanism=kafka.sasl_mechanism,
                      sasl_plain_username=kafka.sasl_username,
                      sasl_plain_password=kafka.sasl_password.get_secret_value())
    return kwargs


def faust_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for ``faust.App``: the same protocol and credentials as :func:`client_kwargs`."""
    ctx = ssl_context(kafka)
    if kafka.security_protocol.startswith("SASL_"):
        from faust.auth import SASLCredentials

        return {"broker_credentials": SASLCredentials(
            username=kafka.sasl_username, password=kafka.sasl_password.get_secret_value(), ssl_context=ctx,
            mechanism=kafka.sasl_mechanism)}
    return {} if ctx is None else {"broker_credentials": ctx}


def bootstrap(kafka: KafkaSettings) -> str:
    """``host:port,host2:port`` from the Faust-style ``broker_url``."""
    return ",".join(bootstrap_servers(kafka.broker_url))

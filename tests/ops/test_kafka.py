"""Kafka client settings (app/ops/kafka.py): TLS applies to every client, misconfiguration is a ConfigError."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from app.errors import ConfigError
from app.ops import kafka
from app.settings import Settings


def test_plaintext_by_default() -> None:
    s = Settings()
    assert kafka.client_kwargs(s) == {} and kafka.faust_kwargs(s) == {}
    assert kafka.bootstrap(Settings(broker_url="kafka://a:9092;kafka://b:9093")) == "a:9092,b:9093"


def test_ssl_with_a_ca_and_a_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = ca.issue_cert("client.example")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    s = Settings.from_env({"METRICS_KAFKA_SECURITY_PROTOCOL": "SSL", "METRICS_KAFKA_SSL_CAFILE": str(tmp_path / "ca.pem"),
                           "METRICS_KAFKA_SSL_CERTFILE": str(tmp_path / "cert.pem"),
                           "METRICS_KAFKA_SSL_KEYFILE": str(tmp_path / "key.pem")})
    kw = kafka.client_kwargs(s)
    ctx = kw["ssl_context"]
    assert kw["security_protocol"] == "SSL" and isinstance(ctx, ssl.SSLContext)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert isinstance(kafka.faust_kwargs(s)["broker_credentials"], ssl.SSLContext)


@pytest.mark.parametrize("env, match", [
    ({"METRICS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "SASL is not supported"),
    ({"METRICS_KAFKA_SECURITY_PROTOCOL": "SSL", "METRICS_KAFKA_SSL_CERTFILE": "/x.pem"}, "go together"),
])
def test_invalid_settings_are_refused(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Settings.from_env(env)


def test_unreadable_tls_files_name_the_settings(tmp_path: Path) -> None:
    s = Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="KAFKA_SSL_CAFILE"):
        kafka.client_kwargs(s)

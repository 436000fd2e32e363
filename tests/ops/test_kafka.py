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
    assert kafka.client_kwargs(s.kafka) == {} and kafka.faust_kwargs(s.kafka) == {}
    assert kafka.bootstrap(Settings.of(broker_url="kafka://a:9092;kafka://b:9093").kafka) == "a:9092,b:9093"


def test_ssl_with_a_ca_and_a_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = ca.issue_cert("client.example")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    s = Settings.from_env({"METRICS_KAFKA_SECURITY_PROTOCOL": "SSL",
                           "METRICS_KAFKA_SSL_CAFILE": str(tmp_path / "ca.pem"),
                           "METRICS_KAFKA_SSL_CERTFILE": str(tmp_path / "cert.pem"),
                           "METRICS_KAFKA_SSL_KEYFILE": str(tmp_path / "key.pem")})
    kw = kafka.client_kwargs(s.kafka)
    ctx = kw["ssl_context"]
    assert kw["security_protocol"] == "SSL" and isinstance(ctx, ssl.SSLContext)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert isinstance(kafka.faust_kwargs(s.kafka)["broker_credentials"], ssl.SSLContext)


@pytest.mark.parametrize("env, match", [
    ({"METRICS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs a SASL username and password"),
    ({"METRICS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "METRICS_KAFKA_SASL_USERNAME": "u",
      "METRICS_KAFKA_SASL_PASSWORD": "p", "METRICS_KAFKA_SASL_MECHANISM": "GSSAPI"}, "kafka_sasl_mechanism must be"),
    ({"METRICS_KAFKA_SECURITY_PROTOCOL": "TLS"}, "kafka_security_protocol must be one of"),
    ({"METRICS_KAFKA_SECURITY_PROTOCOL": "SSL", "METRICS_KAFKA_SSL_CERTFILE": "/x.pem"}, "go together"),
])
def test_invalid_settings_are_refused(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Settings.from_env(env)


@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
def test_sasl_reaches_aiokafka_and_faust_alike(protocol: str, mechanism: str) -> None:
    from faust.auth import SASLCredentials

    s = Settings.from_env({"METRICS_KAFKA_SECURITY_PROTOCOL": protocol, "METRICS_KAFKA_SASL_MECHANISM": mechanism,
                           "METRICS_KAFKA_SASL_USERNAME": "svc", "METRICS_KAFKA_SASL_PASSWORD": "s3cret"})
    kw = kafka.client_kwargs(s.kafka)
    assert (kw["security_protocol"], kw["sasl_mechanism"]) == (protocol, mechanism)
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("svc", "s3cret")
    assert isinstance(kw.get("ssl_context"), ssl.SSLContext) == (protocol == "SASL_SSL")
    creds = kafka.faust_kwargs(s.kafka)["broker_credentials"]
    assert isinstance(creds, SASLCredentials) and creds.protocol.value == protocol
    assert (creds.username, creds.password, creds.mechanism.value) == ("svc", "s3cret", mechanism)
    assert "s3cret" not in repr(s)  # settings may be logged; the password is not in their repr


def test_unreadable_tls_files_name_the_settings(tmp_path: Path) -> None:
    s = Settings.of(kafka_security_protocol="SSL", kafka_ssl_cafile=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="KAFKA_SSL_CAFILE"):
        kafka.client_kwargs(s.kafka)

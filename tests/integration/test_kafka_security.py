"""Kafka security on a real broker: one Apache Kafka with a TLS listener and a SASL_SSL listener (SCRAM-SHA-512
and PLAIN), certificates from a test CA (trustme).

For each of TLS, SASL_SSL/SCRAM-SHA-512 and SASL_SSL/PLAIN, every client of every role connects through that
listener only: topic creation, the ingest producer and a worker (Faust's consumer, producer and changelogs),
and a minute reaches DynamoDB. The broker advertises each listener's own address, so a client that bootstrapped
on it never learns the plaintext one. A plaintext client and a wrong password are refused.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from app.local.embedded import DynamoServer, KafkaBroker, Listener, free_port
from app.ops import kafka
from app.settings import Settings
from tests.integration.pipeline import Pipeline

pytestmark = pytest.mark.integration

SCRAM_USER, SCRAM_PASSWORD = "svc-scram", "scram-secret"
PLAIN_USER, PLAIN_PASSWORD = "svc-plain", "plain-secret"


@dataclass
class Endpoint:
    """What Pipeline needs of a broker: the address of the listener it must use."""

    address: str

    @property
    def url(self) -> str:
        return f"kafka://{self.address}"


@dataclass
class SecureBroker:
    broker: KafkaBroker
    ca_file: Path
    ssl: Endpoint
    sasl_ssl: Endpoint


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    tmp = tmp_path_factory.mktemp("kafka-secure")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    cert = ca.issue_cert("127.0.0.1")
    # Kafka's PEM key store wants the key in PKCS#8 followed by the certificate chain.
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    (tmp / "server.pem").write_bytes(pkcs8 + b"".join(c.bytes() for c in cert.cert_chain_pems))
    ssl_port, sasl_port = free_port(), free_port()
    broker = KafkaBroker(
        data_dir=tmp / "data",
        listeners=[Listener("SSL", ssl_port), Listener("SASL_SSL", sasl_port)],
        properties={
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(tmp / "server.pem"),
            "sasl.enabled.mechanisms": "SCRAM-SHA-512,PLAIN",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "listener.name.sasl_ssl.plain.sasl.jaas.config":
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'user_{PLAIN_USER}="{PLAIN_PASSWORD}";',
        },
        scram_users={SCRAM_USER: SCRAM_PASSWORD},
    )
    broker.start()
    yield SecureBroker(broker, tmp / "ca.pem", Endpoint(f"127.0.0.1:{ssl_port}"), Endpoint(f"127.0.0.1:{sasl_port}"))
    broker.stop()


CASES = {
    "tls": ("ssl", {"METRICS_KAFKA_SECURITY_PROTOCOL": "SSL"}),
    "sasl-scram-sha-512": ("sasl_ssl", {"METRICS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                                        "METRICS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                                        "METRICS_KAFKA_SASL_USERNAME": SCRAM_USER,
                                        "METRICS_KAFKA_SASL_PASSWORD": SCRAM_PASSWORD}),
    "sasl-plain": ("sasl_ssl", {"METRICS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                                "METRICS_KAFKA_SASL_MECHANISM": "PLAIN",
                                "METRICS_KAFKA_SASL_USERNAME": PLAIN_USER,
                                "METRICS_KAFKA_SASL_PASSWORD": PLAIN_PASSWORD}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_worker_and_ingest_over_a_secure_listener(case: str, secure: SecureBroker, dynamo: DynamoServer,
                                                  tmp_path: Path) -> None:
    listener, env = CASES[case]
    endpoint: Endpoint = getattr(secure, listener)
    # Creating the topics (in Pipeline) is already the first client over this listener.
    p = Pipeline(endpoint, dynamo, tmp_path, METRICS_KAFKA_SSL_CAFILE=str(secure.ca_file),  # type: ignore[arg-type]
                 **env)
    p.start(data_dir=tmp_path / "state")
    try:
        ingest = p.start_ingest()
        token = p.read_token("shop", "write")
        ts_ms = (int(time.time()) // 60 - 2) * 60_000 + 1_000  # a minute that is already over
        body = orjson.dumps([{"kind": "router", "app": "shop", "dyno": "web.1", "ts": ts_ms + i, "status": 200,
                              "service_ms": 10.0 + i} for i in range(5)])
        deadline = time.monotonic() + 60
        while True:  # the ingest producer connects in the background
            req = urllib.request.Request(f"{ingest}/v1/observations", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    assert orjson.loads(r.read())["accepted"] == 5
                    break
            except urllib.error.HTTPError as exc:
                assert exc.code == 503 and time.monotonic() < deadline, exc.read()
                time.sleep(0.5)
        stats = p.wait_stats(lambda s: s["sink_items_written"] >= 1, 90, "the minute stored in DynamoDB")
        assert stats["observations_accepted"] == 5 and stats["minutes_emitted"] == 1
    finally:
        p.stop()


def test_a_plaintext_client_cannot_use_the_tls_listener(secure: SecureBroker) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaConnectionError

    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=secure.ssl.address, request_timeout_ms=3000)
        try:
            with pytest.raises((KafkaConnectionError, asyncio.TimeoutError)):
                await asyncio.wait_for(producer.start(), 10)
        finally:
            await producer.stop()

    asyncio.run(go())


@pytest.mark.parametrize("mechanism, user", [("SCRAM-SHA-512", SCRAM_USER), ("PLAIN", PLAIN_USER)])
def test_a_wrong_password_is_refused(secure: SecureBroker, mechanism: str, user: str) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    s = Settings.of(broker_url=secure.sasl_ssl.url, kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism=mechanism,
                 kafka_sasl_username=user, kafka_sasl_password="wrong", kafka_ssl_cafile=str(secure.ca_file))
    kwargs: dict[str, Any] = kafka.client_kwargs(s.kafka)

    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=secure.sasl_ssl.address, request_timeout_ms=3000, **kwargs)
        try:
            with pytest.raises((KafkaError, asyncio.TimeoutError)):
                await asyncio.wait_for(producer.start(), 10)
        finally:
            await producer.stop()

    asyncio.run(go())

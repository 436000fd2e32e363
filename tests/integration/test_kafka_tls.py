"""Kafka over TLS (METRICS_KAFKA_SECURITY_PROTOCOL=SSL): topic creation, the ingest producer and a worker
(Faust's consumer, producer and changelogs) all connect through a TLS endpoint, and a minute reaches
DynamoDB. tansu's own TLS listener does not work here, so a TLS terminator on loopback stands in front of
it and tansu advertises the terminator's port: every client connection crosses TLS, verified against a
test CA (trustme)."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest
import trustme

from app.local.embedded import EmbeddedBroker, EmbeddedDynamo, free_port
from tests.integration.pipeline import Pipeline

pytestmark = pytest.mark.integration


class TlsTerminator:
    """TLS on ``port``, plain TCP to ``target_port``; runs its own event loop in a thread."""

    def __init__(self, port: int, target_port: int, ctx: ssl.SSLContext) -> None:
        self.port, self.target_port, self.ctx = port, target_port, ctx
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self.ctx), self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class TlsBroker:
    """What Pipeline needs of a broker: the TLS endpoint's address."""

    def __init__(self, port: int) -> None:
        self.address = f"127.0.0.1:{port}"
        self.url = f"kafka://{self.address}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: Any) -> Iterator[tuple[TlsBroker, Path, TlsTerminator]]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls_port = free_port()
    broker = EmbeddedBroker(advertised_port=tls_port)
    broker.start()
    terminator = TlsTerminator(tls_port, broker.port, server_ctx)
    terminator.start()
    yield TlsBroker(tls_port), ca_file, terminator
    terminator.stop()
    broker.stop()


def test_worker_and_ingest_over_tls(tls: tuple[TlsBroker, Path, TlsTerminator], dynamo: EmbeddedDynamo,
                                    tmp_path: Path) -> None:
    broker, ca_file, terminator = tls
    p = Pipeline(broker, dynamo, tmp_path, METRICS_KAFKA_SECURITY_PROTOCOL="SSL",  # type: ignore[arg-type]
                 METRICS_KAFKA_SSL_CAFILE=str(ca_file))  # creating the topics already went over TLS
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
        assert terminator.connections >= 3  # topic creation, ingest, worker: nothing bypassed TLS
    finally:
        p.stop()


def test_a_plaintext_client_cannot_use_the_tls_endpoint(tls: tuple[TlsBroker, Path, TlsTerminator]) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaConnectionError

    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=tls[0].address, request_timeout_ms=3000)
        try:
            with pytest.raises((KafkaConnectionError, asyncio.TimeoutError)):
                await asyncio.wait_for(producer.start(), 10)
        finally:
            await producer.stop()

    asyncio.run(go())

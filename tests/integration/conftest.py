"""Session-wide real parts: Apache Kafka (KRaft, from Maven Central), dynalite and Apache Cassandra (from
Maven Central), each started once for all integration tests that ask for it, on free ports and with its
data in a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.local.embedded import CassandraServer, DynamoServer, KafkaBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    b = KafkaBroker(data_dir=tmp_path_factory.mktemp("kafka"))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def dynamo() -> Iterator[DynamoServer]:
    d = DynamoServer()
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def dynamodb_endpoint(dynamo: DynamoServer) -> str:
    return dynamo.endpoint


@pytest.fixture(scope="session")
def cassandra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CassandraServer]:
    node = CassandraServer(data_dir=tmp_path_factory.mktemp("cassandra"))
    node.start()
    yield node
    node.stop()

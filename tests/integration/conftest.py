"""Session-wide real parts: Apache Kafka (KRaft, from Maven Central) and dynalite, started once for all
integration tests, each on free ports and with its data in a temporary directory."""

from __future__ import annotations

from typing import Iterator

import pytest

from app.local.embedded import DynamoServer, KafkaBroker


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

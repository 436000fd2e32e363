"""Session-wide real parts: the tansu broker and DynamoDB Local, started once for all integration tests."""

from __future__ import annotations

from typing import Iterator

import pytest

from app.local.embedded import EmbeddedBroker, EmbeddedDynamo


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker()
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def dynamo() -> Iterator[EmbeddedDynamo]:
    d = EmbeddedDynamo()
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def dynamodb_endpoint(dynamo: EmbeddedDynamo) -> str:
    return dynamo.endpoint

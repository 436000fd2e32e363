"""CassandraStore's error classification and put_many's isolation of an oversize item, without a cluster
(a fake session stands in for the driver; the real cluster is in tests/integration/test_cassandra_server.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import acsylla
import pytest

from app.clock import ManualClock
from app.errors import ItemsRefused, StoreError, StoreFatal, StoreUnavailable
from app.settings import Settings
from app.storage import cassandra
from app.storage.cassandra import CassandraStore, classify
from app.storage.protocol import MetricItem

T0 = 1_700_000_040
E = acsylla.errors


@pytest.mark.parametrize(("exc", "kind"), [
    (E.CassErrorServerBadCredentials("bad password"), StoreFatal),
    (E.CassErrorServerUnauthorized("no MODIFY"), StoreFatal),
    (E.CassErrorServerInvalidQuery("unconfigured table items"), StoreFatal),
    (RuntimeError("something nobody classified"), StoreFatal),
    (E.CassErrorServerUnavailable("2 replicas needed"), StoreUnavailable),
    (TimeoutError(), StoreUnavailable),
])
def test_operator_errors_are_fatal(exc: BaseException, kind: type[Exception]) -> None:
    err = classify(exc, operation="INSERT items", cassandra=Settings().cassandra, storage=Settings().storage)
    assert type(err) is kind and err.action
    assert err.retriable is (kind is StoreUnavailable)


def test_grants_and_credentials_say_what_to_fix() -> None:
    s = Settings()
    assert "grant this role MODIFY" in classify(E.CassErrorServerUnauthorized("x"), operation="INSERT items",
                                                cassandra=s.cassandra, storage=s.storage).action
    assert "CASSANDRA_PASSWORD" in classify(E.CassErrorServerBadCredentials("x"), operation="connect",
                                            cassandra=s.cassandra, storage=s.storage).action


class FakeSession:
    def __init__(self) -> None:
        self.rows: list[list[Any]] = []

    async def rows_(self, cql: str, params: Sequence[Any], *, operation: str) -> list[Any]:
        self.rows.append(list(params))
        return []


async def test_an_oversize_item_is_refused_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cassandra, "MAX_VALUE_BYTES", 1000)
    store = CassandraStore(Settings().storage, Settings().cassandra, clock=ManualClock((T0 + 60) * 1000))
    fake = FakeSession()
    monkeypatch.setattr(store, "db", type("DB", (), {"rows": fake.rows_})())
    ok = MetricItem("shop", "web", 60, T0, b'{"ok":1}')
    big = MetricItem("shop", "web", 60, T0 + 60, os.urandom(5000))  # incompressible
    with pytest.raises(ItemsRefused) as err:
        await store.put_many([ok, big])
    assert [i for i, _ in err.value.refused] == [big]
    assert isinstance(err.value, StoreError) and not isinstance(err.value, StoreFatal)
    assert [r[5] for r in fake.rows] == [T0]  # the neighbour was written

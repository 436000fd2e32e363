"""Suite-wide pytest configuration: how ``make test`` spreads the tests over processes (pytest-xdist).

Most integration tests spend their time waiting for real parts (minutes closing, a broker restarting), so
the suite runs in a few processes, each with its own broker and DynamoDB server on free ports. Apache
Cassandra is the exception: a node takes a core for half a minute to start and a gigabyte to run, so every
test that uses one runs in the same process, one after the other."""

from __future__ import annotations

from typing import Any

import pytest

from tests.alerting.secrets import keyed  # noqa: F401  (a fixture: the alerting and agents tests use it)

CASSANDRA_MODULES = frozenset({
    "tests/integration/test_cassandra_server.py",
    "tests/integration/test_migration.py",
    "tests/integration/test_store_protocol.py",
    "tests/integration/test_store_faults.py",
})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Each test is its own unit of work, except that the Cassandra modules are one unit (pytest-xdist's
    ``--dist loadgroup`` would do this with marks, but its marks are lost under pytest 9)."""
    from xdist.scheduler import LoadScopeScheduling

    class OneCassandraProcess(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return "cassandra" if nodeid.split("::")[0] in CASSANDRA_MODULES else nodeid

    return OneCassandraProcess(config, log)

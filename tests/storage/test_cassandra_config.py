"""The Cassandra settings that are interpolated into CQL (keyspace, replication) are checked at start, so a
bad value is a ConfigError saying what to fix instead of a statement someone else wrote."""

from __future__ import annotations

import pytest

from app.errors import ConfigError
from app.settings import Settings
from app.storage import cassandra
from app.storage.cassandra import CassandraSession, check_keyspace, replication_cql, schema


@pytest.mark.parametrize("name", ["minutely", "m", "it_0123456789ab", "A" + "b" * 47])
def test_plain_keyspace_names_pass(name: str) -> None:
    assert check_keyspace(name) == name


@pytest.mark.parametrize("name", [
    "", "1minutely", "_minutely", "minutely;DROP KEYSPACE x", "ks WITH replication = {}", "a" * 49,
    "mi-nutely", '"Quoted"', "ks.items", "ks\n", "kś",
])
def test_other_keyspace_names_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_keyspace(name)
    assert "METRICS_CASSANDRA_KEYSPACE" in info.value.action


@pytest.mark.parametrize(("value", "cql"), [
    ("{'class': 'SimpleStrategy', 'replication_factor': 1}", "{'class': 'SimpleStrategy', 'replication_factor': 1}"),
    ("{'class':'NetworkTopologyStrategy','eu-west-1':3, 'us_east': '2'}",
     "{'class': 'NetworkTopologyStrategy', 'eu-west-1': 3, 'us_east': '2'}"),
    ("  { 'class' : 'org.apache.cassandra.locator.NetworkTopologyStrategy' , 'dc1' : '3/1' }  ",
     "{'class': 'org.apache.cassandra.locator.NetworkTopologyStrategy', 'dc1': '3/1'}"),
])
def test_replication_maps_are_written_back_from_what_was_parsed(value: str, cql: str) -> None:
    assert replication_cql(value) == cql


@pytest.mark.parametrize("value", [
    "", "SimpleStrategy", "{}", "{'replication_factor': 1}", "{'class': 1}",
    "{'class': 'SimpleStrategy', 'replication_factor': 1} AND durable_writes = false",
    "{'class': 'SimpleStrategy', 'replication_factor': 1}; DROP KEYSPACE minutely",
    "{'class': 'SimpleStrategy', 'replication_factor': 1, }",
    "{'class': 'Simple'' Strategy', 'replication_factor': 1}",
    "{'class': 'SimpleStrategy', 'replication_factor': 1.5}",
    "{'class': 'SimpleStrategy', 'replication_factor': -1}",
    "{'class': 'SimpleStrategy', 'class': 'NetworkTopologyStrategy'}",
    "{\"class\": \"SimpleStrategy\", \"replication_factor\": 1}",
    "{'class': 'SimpleStrategy', 'replication_factor': 1}}",
    "{'class': 'SimpleStrategy' 'replication_factor': 1}",
])
def test_anything_but_a_map_of_class_and_values_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        replication_cql(value)
    assert "METRICS_CASSANDRA_REPLICATION" in info.value.action


def test_schema_uses_only_checked_values() -> None:
    cql = schema(Settings().cassandra)
    assert cql[0] == ("CREATE KEYSPACE IF NOT EXISTS minutely WITH replication = "
                      "{'class': 'SimpleStrategy', 'replication_factor': 1}")
    with pytest.raises(ConfigError):
        schema(Settings.of(cassandra_keyspace="minutely.items; --").cassandra)
    with pytest.raises(ConfigError):
        schema(Settings.of(cassandra_replication="{'class': 'SimpleStrategy'} AND durable_writes = false").cassandra)


def test_a_session_is_refused_at_start_on_a_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CassandraSession, "_shared", {})
    with pytest.raises(ConfigError):
        bad = Settings.of(store="cassandra", cassandra_keyspace="x y")
        CassandraSession.of(bad.storage, bad.cassandra)
    with pytest.raises(ConfigError):
        bad = Settings.of(store="cassandra", cassandra_replication="{'class': x}")
        cassandra.CassandraStore(bad.storage, bad.cassandra)
    good = Settings.of(store="cassandra")
    assert CassandraSession.of(good.storage, good.cassandra).cassandra.keyspace == "minutely"

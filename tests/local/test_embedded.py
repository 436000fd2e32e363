"""The embedded stack's port rules (app/local/embedded.py, app/cli.py): fixed ports equal to the settings'
defaults, and a taken port stops ``make run`` at once with the port, its holder and the variable to change.
And what ``make run`` installs: the pinned Kafka, and Cassandra's jars whatever the store."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from app.cli import local_ports, run_local
from app.errors import ConfigError
from app.local.embedded import (
    CONF_DIR,
    ROOT,
    KafkaBroker,
    free_port,
    port_holder,
    require_free_port,
)
from app.settings import Settings


def test_local_ports_are_the_settings_defaults() -> None:
    assert [(port, variable) for port, _, variable in local_ports(Settings(), {})] == [
        (9092, "METRICS_BROKER_URL"), (9093, "METRICS_KAFKA_CONTROLLER_PORT"), (8000, "METRICS_DYNAMODB_ENDPOINT"),
        (6066, "METRICS_WEB_PORT"), (6067, "METRICS_INGEST_PORT")]
    moved = Settings.of(broker_url="kafka://127.0.0.1:19092", dynamodb_endpoint="http://localhost:18000",
                        web_port=16066)
    env = {"METRICS_KAFKA_CONTROLLER_PORT": "19093", "METRICS_INGEST_PORT": "16067"}
    assert [port for port, _, _ in local_ports(moved, env)] == [19092, 19093, 18000, 16066, 16067]


@pytest.mark.parametrize("settings, match", [
    (Settings.of(broker_url="kafka://b1.example:9092"), "METRICS_BROKER_URL"),
    (Settings.of(dynamodb_endpoint=""), "METRICS_DYNAMODB_ENDPOINT"),
])
def test_local_mode_refuses_remote_parts(settings: Settings, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        local_ports(settings, {})


def test_a_taken_port_names_itself_its_holder_and_the_variable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_holder(port) is not None and f"pid {os.getpid()} " in str(port_holder(port))
        with pytest.raises(ConfigError) as err:
            require_free_port(port, "query API and dashboard", "METRICS_WEB_PORT")
    text = str(err.value)
    assert f"port {port} (query API and dashboard) is already in use by pid {os.getpid()}" in text
    assert "set METRICS_WEB_PORT to a free port" in text and not err.value.retriable
    require_free_port(port, "query API and dashboard", "METRICS_WEB_PORT")  # released: free again


def test_make_run_stops_at_once_on_a_taken_port(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        monkeypatch.setenv("METRICS_WEB_PORT", str(port))
        for name, value in (("METRICS_BROKER_URL", f"kafka://127.0.0.1:{free_port()}"),
                            ("METRICS_KAFKA_CONTROLLER_PORT", str(free_port())),
                            ("METRICS_DYNAMODB_ENDPOINT", f"http://127.0.0.1:{free_port()}"),
                            ("METRICS_INGEST_PORT", str(free_port()))):
            monkeypatch.setenv(name, value)
        assert run_local(demo=False) == 2  # before anything was started
    err = capsys.readouterr().err
    assert f"error: port {port} (query API and dashboard) is already in use" in err and "METRICS_WEB_PORT" in err


def test_make_run_installs_cassandra_whatever_the_store(tmp_path: Path) -> None:
    """A migration started while `make run` serves needs a local Cassandra node, so `run` always resolves
    its jars (once; a stamp check after) instead of stopping with "jars are not in .deps/cassandra/lib"."""
    lib = tmp_path / "cassandra" / "lib"
    out = subprocess.run(["make", "-n", "run", f"CASSANDRA_LIB={lib}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "-f app/local/conf/cassandra-pom.xml dependency:copy-dependencies" in out and f"{lib}.new" in out


def test_the_broker_runs_the_kafka_the_pom_pins() -> None:
    """kafka-pom.xml is what `make install` resolves: a version bump there re-resolves .deps/kafka/lib."""
    pinned = re.search(r"<kafka\.version>(.+)</kafka\.version>", (CONF_DIR / "kafka-pom.xml").read_text())
    assert pinned and pinned.group(1).startswith("4.")
    broker = KafkaBroker(data_dir=Path("unused"))
    if broker.version != "unknown":  # installed: the jars are the pinned ones
        assert broker.version == pinned.group(1)
    assert (CONF_DIR / "kafka-log4j2.properties").exists()

"""The embedded stack's port rules (app/local/embedded.py, app/cli.py): fixed ports equal to the settings'
defaults, and a taken port stops ``make run`` at once with the port, its holder and the variable to change."""

from __future__ import annotations

import os
import socket

import pytest

from app.cli import local, local_ports
from app.errors import ConfigError
from app.local.embedded import free_port, port_holder, require_free_port
from app.settings import Settings


def test_local_ports_are_the_settings_defaults() -> None:
    assert [(port, variable) for port, _, variable in local_ports(Settings(), {})] == [
        (9092, "METRICS_BROKER_URL"), (9093, "METRICS_KAFKA_CONTROLLER_PORT"), (8000, "METRICS_DYNAMODB_ENDPOINT"),
        (6066, "METRICS_WEB_PORT"), (6067, "METRICS_INGEST_PORT")]
    moved = Settings(broker_url="kafka://127.0.0.1:19092", dynamodb_endpoint="http://localhost:18000", web_port=16066)
    env = {"METRICS_KAFKA_CONTROLLER_PORT": "19093", "METRICS_INGEST_PORT": "16067"}
    assert [port for port, _, _ in local_ports(moved, env)] == [19092, 19093, 18000, 16066, 16067]


@pytest.mark.parametrize("settings, match", [
    (Settings(broker_url="kafka://b1.example:9092"), "METRICS_BROKER_URL"),
    (Settings(dynamodb_endpoint=""), "METRICS_DYNAMODB_ENDPOINT"),
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
        assert local(["--no-demo"]) == 2  # before anything was started
    err = capsys.readouterr().err
    assert f"error: port {port} (query API and dashboard) is already in use" in err and "METRICS_WEB_PORT" in err

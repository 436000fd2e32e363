"""The one command line (app/cli.py): dispatch, options and exit codes, without starting anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from app import cli
from app.local import loadgen
from app.local.embedded import LOCAL_DATA_DIR
from app.ops import dlq

COMMANDS = ("dlq", "faust", "ingest", "loadgen", "local", "migration", "tokens", "web", "worker", "writer")


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.cli, list(args), prog_name="python -m app")


def test_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    listed = result.output.split("Commands:")[1]
    names = [line.split()[0] for line in listed.splitlines() if line.startswith("  ") and line[2] != " "]
    assert sorted(names) == list(COMMANDS)
    assert sorted(cli.cli.commands) == list(COMMANDS)


@pytest.mark.parametrize("args", [("nope",), ("tokens", "nope"), ("dlq", "nope"), ("worker", "--nope"),
                                  ("worker", "-l", "loud"), ("writer", "-l", "info"), ("local", "--rate", "x"),
                                  ("tokens", "create", "--app", "shop", "--kind", "admin"), ("tokens", "revoke"),
                                  ("dlq", "replay", "--until-offset", "x"), ("loadgen", "--mode", "smtp"),
                                  ("ingest", "extra")])
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    assert invoke(*args).exit_code == 2


def test_the_real_entry_point() -> None:
    """``python -m app`` (what the tests, the chart and ``make run`` start) reaches the group."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "app", "--help"], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0 and "Usage: python -m app" in done.stdout and "writer" in done.stdout
    done = subprocess.run([sys.executable, "-m", "app", "nope"], capture_output=True, text=True, cwd=root)
    assert done.returncode == 2 and "No such command 'nope'" in done.stderr


def test_local_options_and_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def run_local(**kwargs: Any) -> int:
        calls.append(kwargs)
        return 2

    monkeypatch.setattr(cli, "run_local", run_local)
    assert invoke("local", "--no-demo").exit_code == 2
    assert invoke("local", "--rate", "50", "--apps", "2", "--data-dir", "/tmp/x").exit_code == 2
    assert calls == [dict(demo=False, rate=2000, apps=3, data_dir=LOCAL_DATA_DIR),
                     dict(demo=True, rate=50, apps=2, data_dir=Path("/tmp/x"))]


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, cli.WorkerOptions]]:
    """Records the worker each command would run, and which Faust app it was given."""
    started: list[tuple[object, cli.WorkerOptions]] = []

    def run_worker(faust_app: object, options: cli.WorkerOptions) -> None:
        started.append((faust_app, options))

    monkeypatch.setattr(cli, "run_worker", run_worker)
    monkeypatch.setattr(cli, "compose_worker", lambda: "worker app")
    monkeypatch.setattr(cli, "compose_writer", lambda spec: f"writer app {spec}")
    return started


def test_worker_takes_faust_worker_options(workers: list[tuple[object, cli.WorkerOptions]]) -> None:
    assert invoke("worker", "-l", "info").exit_code == 0
    assert invoke("--quiet", "worker", "-l", "info").exit_code == 0  # the image's CMD (docker/Dockerfile)
    assert invoke("--debug", "worker", "--loglevel", "DEBUG", "-f", "w.log", "--blocking-timeout", "2",
                  "--console-port", "5000").exit_code == 0
    assert invoke("worker").exit_code == 0
    assert workers == [
        ("worker app", cli.WorkerOptions(loglevel="INFO")),
        ("worker app", cli.WorkerOptions(loglevel="INFO", quiet=True)),
        ("worker app", cli.WorkerOptions(loglevel="DEBUG", logfile="w.log", debug=True, blocking_timeout_s=2.0,
                                         console_port=5000)),
        ("worker app", cli.WorkerOptions()),
    ]


def test_writer_takes_its_store_and_the_worker_options(workers: list[tuple[object, cli.WorkerOptions]]) -> None:
    # The chart's writer args (helm/minutely/templates/_helpers.tpl), and the form `make run` starts.
    assert invoke("writer", "--store", "cassandra", "--quiet", "-l", "info").exit_code == 0
    assert invoke("writer", "--store", "dynamodb:other", "-l", "info").exit_code == 0
    assert invoke("-q", "writer", "-l", "info", "--store", "dynamodb").exit_code == 0
    assert workers == [("writer app cassandra", cli.WorkerOptions(loglevel="INFO", quiet=True)),
                       ("writer app dynamodb:other", cli.WorkerOptions(loglevel="INFO")),
                       ("writer app dynamodb", cli.WorkerOptions(loglevel="INFO", quiet=True))]


def test_ingest_and_web_serve_their_role(monkeypatch: pytest.MonkeyPatch) -> None:
    roles: list[str] = []
    def serve(role: str) -> int:
        roles.append(role)
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    assert invoke("ingest").exit_code == 0 and invoke("web").exit_code == 0
    assert roles == ["ingest", "web"]


def test_token_kinds_are_the_stores() -> None:
    from app.storage.tokens import KINDS

    assert cli.TOKEN_KINDS == KINDS


def test_tokens_commands_and_exit_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    class Store:
        async def create(self, app: str, kind: str) -> tuple[str, Any]:
            from types import SimpleNamespace

            return "tok-secret", SimpleNamespace(id="t1", app=app, kind=kind)

        async def list(self, app: str | None) -> list[Any]:
            from types import SimpleNamespace

            return [SimpleNamespace(id="t1", app=app or "shop", kind="read", created_s=0)]

        async def revoke(self, token_id: str) -> bool:
            return token_id == "t1"

    def with_tokens(use: Any) -> int:
        import asyncio

        code: int = asyncio.run(use(Store()))
        return code

    monkeypatch.setattr(cli, "_with_tokens", with_tokens)
    created = invoke("tokens", "create", "--app", "shop", "--kind", "read")
    assert created.exit_code == 0 and created.stdout.splitlines()[0] == "tok-secret"
    assert "id t1 app shop kind read" in created.stderr
    bad = invoke("tokens", "create", "--app", "no spaces", "--kind", "read")
    assert bad.exit_code == 2 and "app must be" in bad.stderr
    listed = invoke("tokens", "list", "--app", "shop")
    assert listed.exit_code == 0 and listed.stdout == "t1  shop  read  1970-01-01T00:00:00Z\n"
    assert invoke("tokens", "revoke", "t1").stdout == "revoked t1\n"
    missing = invoke("tokens", "revoke", "t2")
    assert missing.exit_code == 1 and "no token with id t2" in missing.stderr


def test_migration_commands_get_their_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatch (app/migration/cli.py; the transitions themselves: tests/migration/)."""
    import app.migration.cli as migration

    seen: list[tuple[Any, ...]] = []

    async def start(settings: Any, to: str, *, backfill: bool) -> int:
        seen.append(("start", to, backfill))
        return 0

    async def verify(settings: Any, since_s: int, until_s: int, app: str | None, resolutions: list[int]) -> int:
        seen.append(("verify", since_s, until_s, app, resolutions))
        return 1

    async def status(settings: Any, web: list[str]) -> int:
        seen.append(("status", web))
        return 0

    async def finish(settings: Any, *, force: bool) -> int:
        seen.append(("finish", force))
        return 0

    for name, fake in (("start", start), ("verify", verify), ("status", status), ("finish", finish)):
        monkeypatch.setattr(migration, name, fake)
    monkeypatch.setenv("METRICS_ADMIN_PORT", "7001")
    assert invoke("migration", "start", "--to", "cassandra", "--backfill").exit_code == 0
    assert invoke("migration", "verify", "--since", "1", "--until", "2").exit_code == 1  # its exit code
    assert invoke("migration", "verify", "--since", "1", "--until", "2", "--app", "shop", "--resolution", "600",
                  "--resolution", "60").exit_code == 1
    assert invoke("migration", "status").exit_code == 0
    assert invoke("migration", "status", "--web", "http://a:1", "--web", "http://b:2").exit_code == 0
    assert invoke("migration", "finish", "--force").exit_code == 0
    assert seen == [("start", "cassandra", True), ("verify", 1, 2, None, [60, 3600]),
                    ("verify", 1, 2, "shop", [600, 60]), ("status", ["http://127.0.0.1:7001"]),
                    ("status", ["http://a:1", "http://b:2"]), ("finish", True)]
    assert invoke("migration", "start").exit_code == 2  # --to is required
    assert invoke("migration", "verify", "--since", "1").exit_code == 2


def test_dlq_replay_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def replay(settings: Any, topic: str, **kwargs: Any) -> dlq.Summary:
        seen.append((topic, kwargs))
        from collections import Counter

        return dlq.Summary(Counter(), {})

    monkeypatch.setattr(dlq, "replay", replay)
    done = invoke("dlq", "replay", "--topic", "observations-dlq", "--dry-run", "--reason", "ahead",
                  "--until-offset", "7")
    assert done.exit_code == 0 and "dry run: 0 would be replayed" in done.stdout
    assert invoke("dlq", "replay").exit_code == 0
    assert seen == [("observations-dlq", dict(dry_run=True, reason="ahead", until_offset=7)),
                    ("metrics-1m-dlq", dict(dry_run=False, reason=None, until_offset=None))]


def test_loadgen_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[loadgen.Load] = []

    async def run(load: loadgen.Load) -> None:
        seen.append(load)

    monkeypatch.setattr(loadgen, "run", run)
    monkeypatch.setenv("METRICS_BROKER_URL", "kafka://127.0.0.1:19092")
    assert invoke("loadgen", "--apps", "20", "--dynos", "4", "--rate", "5000", "--duration", "300", "--seed", "7",
                  "--truth", "truth.json").exit_code == 0
    assert invoke("loadgen", "--mode", "drain", "--url", "http://127.0.0.1:6067", "--token", "app-0=a",
                  "--token", "app-1=b", "--apps", "2", "--realtime", "--quiet").exit_code == 0
    assert seen[0] == loadgen.Load(apps=20, dynos=4, rate=5000, duration=300, seed=7, truth="truth.json",
                                   bootstrap="127.0.0.1:19092", topic="observations", url="http://127.0.0.1:6066")
    assert seen[1] == loadgen.Load(mode="drain", apps=2, url="http://127.0.0.1:6067", token=("app-0=a", "app-1=b"),
                                   realtime=True, quiet=True, bootstrap="127.0.0.1:19092", topic="observations")


def test_the_factories_build_a_worker_and_a_writer_without_reading_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    from app.app import create_app
    from app.settings import Settings
    from app.worker import create_worker
    from app.writer import create_writer

    monkeypatch.setenv("METRICS_APP_ID", "not-read")  # the factories take their settings as given
    settings = Settings.of(app_id="cli-test", data_dir=str(tmp_path / "state"))
    wiring = create_app(settings)
    assert wiring.app.conf.id == "cli-test" and wiring.metrics_topic.get_topic_name() == settings.kafka.metrics_topic
    assert wiring.windows_table.name == "windows" and wiring.rollups_table.name == "rollups"

    worker = create_worker(settings)
    assert worker is not wiring.app  # a new app for each call: nothing is shared through the module
    assert {"aggregate", "sink", "rollup", "events", "alerts", "autoscale"} <= {a.name for a in worker.agents.values()}

    writer = create_writer(settings, "cassandra:ks2")
    assert writer.conf.id == "cli-test-writer-cassandra-ks2"
    assert Path(writer.conf.datadir) == tmp_path / "state" / "cli-test-writer-cassandra-ks2"
    assert (tmp_path / "state" / "cli-test-writer-cassandra-ks2").is_dir()
    assert {a.name for a in writer.agents.values()} == {"sink", "rollup", "events", "checkpoints"}

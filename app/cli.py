"""The one command line: ``python -m app <command>`` and the ``minutely`` script (a click group).

``python -m app local [--no-demo]`` runs the whole pipeline on one machine: Apache Kafka and dynalite
(app/local/embedded.py) on the settings' default ports, a worker (stream jobs + web API), an ingest process
and demo traffic, with their data in ``data/``. Ctrl-C stops all of it; the next run serves what was stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from app.errors import ConfigError, PipelineError
from app.local.embedded import (
    LOCAL_DATA_DIR,
    DynamoServer,
    KafkaBroker,
    free_port,
    require_free_port,
)
from app.local.loadgen import loadgen
from app.migration.cli import migration
from app.ops.dlq import dlq

if TYPE_CHECKING:
    import faust
    from aiohttp import web

    from app.local.stores import LocalStores
    from app.ops.stats import Counters
    from app.settings import Settings


def worker_env(broker_url: str, dynamodb_endpoint: str, *, data_dir: str, web_port: int,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "METRICS_BROKER_URL": broker_url,
        "METRICS_DYNAMODB_ENDPOINT": dynamodb_endpoint,
        "METRICS_DATA_DIR": data_dir,
        "METRICS_WEB_PORT": str(web_port),
    })
    env.update(extra or {})
    return env


def start_role(role: str, env: dict[str, str], *, log_path: Path | None = None,
               args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """Start ``python -m app <role> [args]`` (worker, ingest, web) as a child process."""
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed below, the child has its own copy
    try:
        return subprocess.Popen([sys.executable, "-m", "app", role, *args], env=env, stdout=out or None,
                                stderr=subprocess.STDOUT if out else None,
                                cwd=str(Path(__file__).resolve().parent.parent))
    finally:
        if out is not None:
            out.close()  # Popen gave the child a duplicate descriptor: ours would only leak


def start_worker(env: dict[str, str], *, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    return start_role("worker", env, log_path=log_path, args=("-l", "info"))


LINGERING_S = 1.0
"""See :func:`serve`: seconds an answered request's unread body is still drained before the connection closes."""


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"worker exited with code {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=1):  # closed: an open response leaks its socket
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


def local_ports(settings: Settings, env: Mapping[str, str]) -> list[tuple[int, str, str]]:
    """(port, what, the variable that moves it) of every part ``local`` starts; they equal the settings'
    defaults, so commands in another terminal find them with no environment variables."""
    from urllib.parse import urlsplit

    from app.ops.kafka import bootstrap_servers

    servers = bootstrap_servers(settings.kafka.broker_url)
    if len(servers) != 1 or not servers[0].startswith(("127.0.0.1:", "localhost:")):
        raise ConfigError(f"local mode runs its own broker, but METRICS_BROKER_URL names {servers}",
                          action="unset METRICS_BROKER_URL, or set it to kafka://127.0.0.1:<port>")
    endpoint = urlsplit(settings.dynamodb.endpoint)
    if endpoint.hostname not in ("127.0.0.1", "localhost") or endpoint.port is None:
        raise ConfigError(f"local mode runs its own DynamoDB server, but METRICS_DYNAMODB_ENDPOINT is "
                          f"{settings.dynamodb.endpoint!r}", action="unset METRICS_DYNAMODB_ENDPOINT, or set it to "
                          "http://127.0.0.1:<port>")
    return [
        (int(servers[0].rsplit(":", 1)[1]), "Kafka broker", "METRICS_BROKER_URL"),
        (int(env.get("METRICS_KAFKA_CONTROLLER_PORT", "9093")), "Kafka controller", "METRICS_KAFKA_CONTROLLER_PORT"),
        (endpoint.port, "DynamoDB server", "METRICS_DYNAMODB_ENDPOINT"),
        (settings.web.port, "query API and dashboard", "METRICS_WEB_PORT"),
        (int(env.get("METRICS_INGEST_PORT", "6067")), "ingest (drains, JSON API)", "METRICS_INGEST_PORT"),
    ]


def run_local(*, demo: bool = True, rate: int = 2000, apps: int = 3, data_dir: Path = LOCAL_DATA_DIR) -> int:
    """``python -m app local``; the exit code (2: a port is taken or the settings point elsewhere)."""
    from app.settings import Settings

    try:
        settings = Settings.from_env()
        ports = local_ports(settings, os.environ)
        for port, what, variable in ports:
            require_free_port(port, what, variable)
        # The roles' operator ports (/readyz with reasons, /metrics, /v1/stats, /migration): the worker's, the
        # ingest's beside it.
        ingest_admin_port = int(os.environ.get("METRICS_INGEST_ADMIN_PORT", "6069"))
        require_free_port(settings.ops.admin_port, "operator endpoints of the worker", "METRICS_ADMIN_PORT")
        require_free_port(ingest_admin_port, "operator endpoints of the ingest", "METRICS_INGEST_ADMIN_PORT")
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (kafka_port, _, _), (controller_port, _, _), (dynamo_port, _, _), (web_port, _, _), (ingest_port, _, _) = ports
    data_dir = data_dir.resolve()
    broker = KafkaBroker(data_dir=data_dir / "kafka", port=kafka_port, controller_port=controller_port)
    dynamo = DynamoServer(port=dynamo_port, data_dir=data_dir / "dynamodb")
    children: list[subprocess.Popen[bytes]] = []
    from app.local.stores import LocalStores

    stores: LocalStores | None = None
    try:
        broker.start()
        dynamo.start()
        from app.ops.topics import ensure_topics

        asyncio.run(ensure_topics(broker.address, settings.kafka))
        # The broker is durable and keeps the changelogs, so the worker's RocksDB state is kept with it.
        env = worker_env(broker.url, dynamo.endpoint, data_dir=str(data_dir / "worker"), web_port=web_port)
        stores = LocalStores(settings, env, data_dir, start_role)
        if settings.storage.backend == "cassandra" or os.environ.get("METRICS_LOCAL_CASSANDRA") == "1":
            stores.ensure_cassandra()  # the second: a node for `migration start --to cassandra` to find
        worker = start_worker(env)
        children.append(worker)
        ingest = start_role("ingest", {**env, "METRICS_WEB_PORT": str(ingest_port),
                                       "METRICS_ADMIN_PORT": str(ingest_admin_port)})
        children.append(ingest)
        wait_http(f"http://127.0.0.1:{web_port}/healthz", 120, worker)
        wait_http(f"http://127.0.0.1:{ingest_port}/healthz", 60, ingest)
        drain_tokens = asyncio.run(_demo_tokens([f"app-{i}" for i in range(apps)]))
        read_token = asyncio.run(_demo_tokens(["app-0"], kind="read"))["app-0"]
        print(f"\nbroker {broker.address} ({broker.kind} {broker.version})")
        print(f"dynamodb {dynamo.endpoint} ({dynamo.kind})")
        print(f"data {data_dir} (kept across runs; `make run FRESH=1` starts empty)")
        print(f"dashboard http://127.0.0.1:{web_port}/dashboard/ (app-0 read token: {read_token})")
        print(f"query curl -H 'Authorization: Bearer {read_token}' "
              f"'http://127.0.0.1:{web_port}/v1/apps/app-0/metrics?process_type=web'")
        print(f"counters http://127.0.0.1:{settings.ops.admin_port}/v1/stats (operators; also /readyz, /metrics, "
              f"/dashboard/migration.html; the ingest's on port {ingest_admin_port})")
        print(f"drain http://drain:{drain_tokens['app-0']}@127.0.0.1:{ingest_port}/v1/drains/logplex (app-0's drain "
              "URL: the token is its basic-auth password, as Logplex sends it)")
        print("demo " + (f"{rate} requests/s over {apps} apps, through the drain" if demo else "off"))
        print("Ctrl-C stops everything.\n", flush=True)
        asyncio.run(_serve(rate if demo else 0, apps, ingest_port, drain_tokens, children, stores))
    except KeyboardInterrupt:
        pass
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
        if stores is not None:
            stores.stop()
        dynamo.stop()
        broker.stop()
        print("stopped.", flush=True)
    return 0


async def _demo_tokens(apps: list[str], kind: str = "drain") -> dict[str, str]:
    from app.settings import Settings
    from app.storage.backends import token_table
    from app.storage.tokens import TokenStore

    settings = Settings.from_env()
    store = TokenStore(settings.web, table=token_table(settings))
    await store.start()
    try:
        return {app: (await store.create(app, kind))[0] for app in apps}
    finally:
        await store.stop()


async def _serve(demo_rate: int, apps: int, ingest_port: int, drain_tokens: dict[str, str],
                 children: list[subprocess.Popen[bytes]], stores: LocalStores) -> None:
    """Until Ctrl-C or a child exits; ``demo_rate`` router requests per second through the drain (0: none)."""
    from app.local import loadgen as gen

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    demo: asyncio.Task[object] | None = None
    if demo_rate:
        load = gen.Load(mode="drain", apps=apps, rate=demo_rate, duration=10**9, realtime=True,
                        url=f"http://127.0.0.1:{ingest_port}", concurrency=4,
                        token=tuple(f"{a}={t}" for a, t in drain_tokens.items()), quiet=True)
        demo = asyncio.create_task(gen.run(load))
    following = asyncio.create_task(stores.follow(stop))  # writers (and Cassandra) for a store migration
    while not stop.is_set() and all(c.poll() is None for c in children) and not following.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
    stop.set()
    await asyncio.gather(following, return_exceptions=True)
    if demo is not None:
        demo.cancel()
        await asyncio.gather(demo, return_exceptions=True)


def serve(role: str) -> int:
    """``python -m app ingest`` / ``python -m app web``: the HTTP-only roles."""
    import logging

    from aiohttp import web

    from app.ops.logs import setup_json_logging
    from app.ops.stats import counters
    from app.settings import Settings

    settings = Settings.from_env()
    if settings.ops.log_format == "json":
        setup_json_logging("INFO")
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if role == "ingest":
        from app.ingest.server import build

        webapp = build(settings, counters)
    else:
        webapp = build_web_role(settings, counters)
    # lingering_time: after an answer that left a body unread (413, 408 for a slow body), how long the
    # server keeps reading and dropping it before closing; aiohttp's 10 s would let a slow client keep
    # the connection.
    web.run_app(webapp, host=settings.web.host, port=settings.web.port, access_log=None, print=None,
                lingering_time=LINGERING_S)
    return 0


def build_web_role(settings: Settings, counters: Counters) -> web.Application:
    """Query API without stream jobs: closed minutes from the store (open ones are served by workers)."""
    from collections.abc import AsyncIterator

    from app.api.prometheus.http import add_prometheus_routes
    from app.api.web import add_admin_routes, make_web_app, token_authorizer
    from app.migration.control import MigrationControl
    from app.migration.reads import Engines, MigratingQuery, ReadStats
    from app.migration.tables import FollowingTokens
    from app.migration.view import add_migration_routes
    from app.ops.health import add_admin_port
    from app.storage.tokens import TokenStore

    control = MigrationControl(settings, counters=counters)
    stats = ReadStats()
    engines = Engines(settings, stats, counters=counters)
    query = MigratingQuery(settings, control.current, engines, stats=stats, counters=counters)
    tokens = TokenStore(settings.web, table=FollowingTokens(settings, control.current), counters=counters)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        import gc

        await control.start()  # which store serves each app (app/migration/)
        await engines(control.current().source, "serve")  # the serving store's client, before the first request
        await tokens.start()
        # Everything loaded so far (botocore's service models, aiohttp, ...) lives as long as the process:
        # leaving it out of the collector's generations keeps the occasional full collection short, which
        # would otherwise stall every request in flight (it shows in the query p99).
        gc.collect()
        gc.freeze()
        yield
        await tokens.stop()
        await query.drain()
        await engines.stop()
        await control.stop()

    def admin_routes(a: web.Application) -> None:
        add_admin_routes(a, settings, counters)
        add_migration_routes(a, query)

    def routes(w: web.Application) -> None:  # the operator's endpoints: on the admin port only
        add_prometheus_routes(w)
        add_admin_port(w, settings.ops, counters=counters,
                       checks={"store": lambda: engines.ping(control.current().source)}, routes=admin_routes)

    webapp = make_web_app(query, settings, counters, authorize=token_authorizer(tokens), extra=routes)
    webapp.cleanup_ctx.append(lifecycle)
    return webapp


LOGLEVELS = ("CRIT", "ERROR", "WARN", "INFO", "DEBUG")
"""Faust's choices (faust/cli/base.py), written out: importing them would load Faust for every command."""
FAUST_CONSOLE_PORT = 50101
"""Faust's default aiomonitor port (``--debug`` only)."""


@dataclass(frozen=True, slots=True)
class Root:
    """The group's own options, for the commands that run a Faust worker."""

    quiet: bool = False
    debug: bool = False


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """What ``faust worker`` takes, but its web flags: the HTTP server is ours (app/worker.py Runtime), on the
    settings' host and port."""

    loglevel: str = "WARN"
    logfile: str | None = None
    quiet: bool = False
    debug: bool = False
    blocking_timeout_s: float | None = None
    console_port: int = FAUST_CONSOLE_PORT


def _exit(code: int) -> NoReturn:
    click.get_current_context().exit(code)


@click.group(context_settings={"max_content_width": 110})
@click.option("--quiet/--no-quiet", "-q", default=False,
              help="workers: no startup output on stdout, only the logs (also taken after the command)")
@click.option("--debug/--no-debug", default=False, help="workers: debug output and Faust's blocking detector")
@click.pass_context
def cli(ctx: click.Context, quiet: bool, debug: bool) -> None:
    """minutely: per-minute metrics from Kafka to a store, served over HTTP (docs/)."""
    ctx.obj = Root(quiet=quiet, debug=debug)


def worker_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The Faust worker options ``worker`` and ``writer`` take, with Faust's names and defaults."""
    for option in reversed([
        click.option("--loglevel", "-l", type=click.Choice(LOGLEVELS, case_sensitive=False), default="WARN",
                     show_default=True, help="logging level"),
        click.option("--logfile", "-f", type=click.Path(dir_okay=False), default=None,
                     help="log to this file (default: stderr)"),
        click.option("--quiet", "-q", "quiet_here", is_flag=True, help="as the group's --quiet"),
        click.option("--blocking-timeout", type=float, default=None,
                     help="with --debug: seconds the event loop may block before the detector logs it"),
        click.option("--console-port", type=int, default=FAUST_CONSOLE_PORT, show_default=True,
                     help="with --debug: aiomonitor console port"),
    ]):
        command = option(command)
    return command


def _worker_options(root: Root, loglevel: str, logfile: str | None, quiet_here: bool,
                    blocking_timeout: float | None, console_port: int) -> WorkerOptions:
    return WorkerOptions(loglevel=loglevel, logfile=logfile, quiet=root.quiet or quiet_here, debug=root.debug,
                         blocking_timeout_s=blocking_timeout, console_port=console_port)


def run_worker(faust_app: faust.App, options: WorkerOptions) -> NoReturn:
    """Run ``faust_app`` in a Faust worker, as ``faust worker`` does (its exit code is the process's)."""
    import faust

    faust_app.finalize()
    faust_app.worker_init()
    faust_app.worker_init_post_autodiscover()
    worker = faust.Worker(
        faust_app, loglevel=options.loglevel, logfile=options.logfile, quiet=options.quiet, debug=options.debug,
        blocking_timeout=options.blocking_timeout_s, console_port=options.console_port,
        redirect_stdouts=True,  # print() in a job becomes a log line, as under `faust worker`
    )
    worker.execute_from_commandline()


def compose_worker() -> faust.App:
    """The worker's Faust app with its stream jobs and web server bound (app/worker.py)."""
    from app.settings import Settings
    from app.worker import create_worker

    return create_worker(Settings.from_env())


def compose_writer(spec: str) -> faust.App:
    """The Faust app of the writer for store ``spec`` (app/writer.py), in its own consumer group."""
    from app.settings import Settings
    from app.writer import create_writer

    return create_writer(Settings.from_env(), spec)


@cli.command("local")
@click.option("--no-demo", is_flag=True, help="start without demo traffic")
@click.option("--rate", type=int, default=2000, show_default=True, help="demo router requests per second")
@click.option("--apps", type=int, default=3, show_default=True, help="demo apps")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=LOCAL_DATA_DIR,
              help="Kafka's log, dynalite's tables and the worker's state (kept across runs; `make clean` or "
                   "`make run FRESH=1` empties it)")
def local_command(no_demo: bool, rate: int, apps: int, data_dir: Path) -> None:
    """The whole pipeline on this machine: broker, DynamoDB, worker, ingest and demo traffic (``make run``)."""
    _exit(run_local(demo=not no_demo, rate=rate, apps=apps, data_dir=data_dir))


@cli.command("worker")
@worker_options
@click.pass_obj
def worker_command(root: Root, /, **options: Any) -> None:
    """Stream jobs, the query API and the policies API: a Faust worker (app/worker.py)."""
    run_worker(compose_worker(), _worker_options(root, **options))


@cli.command("writer")
@click.option("--store", "spec", required=True, help="dynamodb | cassandra, optionally :<table> / :<keyspace>")
@worker_options
@click.pass_obj
def writer_command(root: Root, /, spec: str, **options: Any) -> None:
    """During a store migration: the jobs that store minutes into one store, in their own consumer group
    (app/writer.py)."""
    run_worker(compose_writer(spec), _worker_options(root, **options))


@cli.command("ingest")
def ingest_command() -> None:
    """Heroku log drains and the JSON ingest API, to Kafka (HTTP only; app/ingest/)."""
    serve("ingest")


@cli.command("web")
def web_command() -> None:
    """The query API without stream jobs: closed minutes from the store (HTTP only)."""
    serve("web")


@cli.group("tokens")
def tokens_group() -> None:
    """Drain, write and read tokens; stored hashed (both stores during a migration)."""


TOKEN_KINDS = ("drain", "write", "read")
"""app/storage/tokens.py KINDS, written out: importing the store would load aiohttp and boto for ``--help``."""


def _with_tokens(use: Callable[[Any], Any]) -> int:
    """``use(store)`` (a coroutine function returning the exit code) with a started TokenStore."""
    async def go() -> int:
        from app.migration.control import read_state
        from app.migration.tables import FollowingTokens
        from app.settings import Settings
        from app.storage.tokens import TokenStore

        settings = Settings.from_env()
        state = await read_state(settings)  # during a store migration, tokens change in both stores
        store = TokenStore(settings.web, table=FollowingTokens(settings, lambda: state))
        await store.start()
        try:
            code: int = await use(store)
            return code
        finally:
            await store.stop()

    return asyncio.run(go())


@tokens_group.command("create")
@click.option("--app", "app_name", required=True, help="1..100 characters of [A-Za-z0-9._-]")
@click.option("--kind", required=True, type=click.Choice(TOKEN_KINDS))
def tokens_create(app_name: str, kind: str) -> None:
    """Create a token; it is printed once and stored only hashed."""
    from app import models

    if not models.valid_app(app_name):
        print("app must be 1..100 characters of [A-Za-z0-9._-]", file=sys.stderr)
        _exit(2)

    async def create(store: Any) -> int:
        token, info = await store.create(app_name, kind)
        print(token)
        print(f"id {info.id} app {info.app} kind {info.kind} (store the token now; it is not shown again)",
              file=sys.stderr)
        return 0

    _exit(_with_tokens(create))


@tokens_group.command("list")
@click.option("--app", "app_name", default=None, help="only this app's")
def tokens_list(app_name: str | None) -> None:
    """List token ids (never the tokens)."""
    async def show(store: Any) -> int:
        for t in await store.list(app_name):
            print(f"{t.id}  {t.app}  {t.kind}  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(t.created_s))}")
        return 0

    _exit(_with_tokens(show))


@tokens_group.command("revoke")
@click.argument("token_id", metavar="ID")
def tokens_revoke(token_id: str) -> None:
    """Revoke a token by the id `list` shows."""
    async def revoke(store: Any) -> int:
        if not await store.revoke(token_id):
            print(f"no token with id {token_id}", file=sys.stderr)
            return 1
        print(f"revoked {token_id}")
        return 0

    _exit(_with_tokens(revoke))


@cli.command("faust", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                        "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def faust_command(args: tuple[str, ...]) -> None:
    """Faust's own commands (tables, agents, ...) on the worker's app: `faust --help` lists them."""
    from faust.cli.faust import cli as faust_cli

    faust_cli.main(args=list(args), prog_name=f"{click.get_current_context().find_root().info_name} faust",
                   app=compose_worker())


cli.add_command(dlq)
cli.add_command(loadgen)
cli.add_command(migration)


def main() -> None:
    """``python -m app`` and the ``minutely`` script (pyproject.toml): exits with the command's code."""
    cli.main()


__all__ = [
    "cli",
    "free_port",
    "main",
    "run_local",
    "serve",
    "start_role",
    "start_worker",
    "wait_http",
    "worker_env",
]

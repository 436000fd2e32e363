"""Command-line entry points besides Faust's own (``python -m app worker``).

``python -m app local [--no-demo]`` runs the whole pipeline on one machine: Apache Kafka and dynalite
(app/local/embedded.py) on the settings' default ports, a worker (stream jobs + web API), an ingest process
and demo traffic, with their data in ``data/``. Ctrl-C stops all of it; the next run serves what was stored.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from app.errors import ConfigError, PipelineError
from app.local.embedded import (
    LOCAL_DATA_DIR,
    DynamoServer,
    KafkaBroker,
    free_port,
    require_free_port,
)

if TYPE_CHECKING:
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
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen([sys.executable, "-m", "app", role, *args], env=env, stdout=out or None,
                            stderr=subprocess.STDOUT if out else None, cwd=str(Path(__file__).resolve().parent.parent))


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
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


def local_ports(settings: "Settings", env: Mapping[str, str]) -> list[tuple[int, str, str]]:
    """(port, what, the variable that moves it) of every part ``local`` starts; they equal the settings'
    defaults, so commands in another terminal find them with no environment variables."""
    from urllib.parse import urlsplit

    from app.ops.kafka import bootstrap_servers

    servers = bootstrap_servers(settings.broker_url)
    if len(servers) != 1 or not servers[0].startswith(("127.0.0.1:", "localhost:")):
        raise ConfigError(f"local mode runs its own broker, but METRICS_BROKER_URL names {servers}",
                          action="unset METRICS_BROKER_URL, or set it to kafka://127.0.0.1:<port>")
    endpoint = urlsplit(settings.dynamodb_endpoint)
    if endpoint.hostname not in ("127.0.0.1", "localhost") or endpoint.port is None:
        raise ConfigError(f"local mode runs its own DynamoDB server, but METRICS_DYNAMODB_ENDPOINT is "
                          f"{settings.dynamodb_endpoint!r}", action="unset METRICS_DYNAMODB_ENDPOINT, or set it to "
                          "http://127.0.0.1:<port>")
    return [
        (int(servers[0].rsplit(":", 1)[1]), "Kafka broker", "METRICS_BROKER_URL"),
        (int(env.get("METRICS_KAFKA_CONTROLLER_PORT", "9093")), "Kafka controller", "METRICS_KAFKA_CONTROLLER_PORT"),
        (endpoint.port, "DynamoDB server", "METRICS_DYNAMODB_ENDPOINT"),
        (settings.web_port, "query API and dashboard", "METRICS_WEB_PORT"),
        (int(env.get("METRICS_INGEST_PORT", "6067")), "ingest (drains, JSON API)", "METRICS_INGEST_PORT"),
    ]


def local(argv: list[str]) -> int:
    from app.settings import Settings

    ap = argparse.ArgumentParser(prog="python -m app local", description=__doc__)
    ap.add_argument("--no-demo", action="store_true", help="start without demo traffic")
    ap.add_argument("--rate", type=int, default=2000, help="demo router requests per second")
    ap.add_argument("--apps", type=int, default=3)
    ap.add_argument("--data-dir", type=Path, default=LOCAL_DATA_DIR,
                    help="Kafka's log, dynalite's tables and the worker's state (kept across runs; "
                         "`make clean` or `make run FRESH=1` empties it)")
    args = ap.parse_args(argv)

    try:
        settings = Settings.from_env()
        ports = local_ports(settings, os.environ)
        for port, what, variable in ports:
            require_free_port(port, what, variable)
        # The roles' operator ports (/readyz with reasons, /metrics, /v1/stats, /migration): the worker's, the
        # ingest's beside it.
        ingest_admin_port = int(os.environ.get("METRICS_INGEST_ADMIN_PORT", "6069"))
        require_free_port(settings.admin_port, "operator endpoints of the worker", "METRICS_ADMIN_PORT")
        require_free_port(ingest_admin_port, "operator endpoints of the ingest", "METRICS_INGEST_ADMIN_PORT")
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (kafka_port, _, _), (controller_port, _, _), (dynamo_port, _, _), (web_port, _, _), (ingest_port, _, _) = ports
    data_dir: Path = args.data_dir.resolve()
    broker = KafkaBroker(data_dir=data_dir / "kafka", port=kafka_port, controller_port=controller_port)
    dynamo = DynamoServer(port=dynamo_port, data_dir=data_dir / "dynamodb")
    children: list[subprocess.Popen[bytes]] = []
    from app.local.stores import LocalStores

    stores: LocalStores | None = None
    try:
        broker.start()
        dynamo.start()
        from app.ops.topics import ensure_topics

        asyncio.run(ensure_topics(broker.address, settings))
        # The broker is durable and keeps the changelogs, so the worker's RocksDB state is kept with it.
        env = worker_env(broker.url, dynamo.endpoint, data_dir=str(data_dir / "worker"), web_port=web_port)
        stores = LocalStores(settings, env, data_dir, start_role)
        if settings.store == "cassandra":
            stores.ensure_cassandra()
        worker = start_worker(env)
        children.append(worker)
        ingest = start_role("ingest", {**env, "METRICS_WEB_PORT": str(ingest_port),
                                       "METRICS_ADMIN_PORT": str(ingest_admin_port)})
        children.append(ingest)
        wait_http(f"http://127.0.0.1:{web_port}/healthz", 120, worker)
        wait_http(f"http://127.0.0.1:{ingest_port}/healthz", 60, ingest)
        drain_tokens = asyncio.run(_demo_tokens([f"app-{i}" for i in range(args.apps)]))
        read_token = asyncio.run(_demo_tokens(["app-0"], kind="read"))["app-0"]
        print(f"\nbroker {broker.address} ({broker.kind} {broker.version})")
        print(f"dynamodb {dynamo.endpoint} ({dynamo.kind})")
        print(f"data {data_dir} (kept across runs; `make run FRESH=1` starts empty)")
        print(f"dashboard http://127.0.0.1:{web_port}/dashboard/ (app-0 read token: {read_token})")
        print(f"query curl -H 'Authorization: Bearer {read_token}' "
              f"'http://127.0.0.1:{web_port}/v1/apps/app-0/metrics?process_type=web'")
        print(f"counters http://127.0.0.1:{settings.admin_port}/v1/stats (operators; also /readyz, /metrics, "
              f"/dashboard/migration.html; the ingest's on port {ingest_admin_port})")
        print(f"drain http://drain:{drain_tokens['app-0']}@127.0.0.1:{ingest_port}/v1/drains/logplex (app-0's drain "
              "URL: the token is its basic-auth password, as Logplex sends it)")
        print("demo " + ("off" if args.no_demo else f"{args.rate} requests/s over {args.apps} apps, through the drain"))
        print("Ctrl-C stops everything.\n", flush=True)
        asyncio.run(_serve(args, ingest_port, drain_tokens, children, stores))
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
    from app.storage.tokens import TokenStore

    store = TokenStore(Settings.from_env())
    await store.start()
    try:
        return {app: (await store.create(app, kind))[0] for app in apps}
    finally:
        await store.stop()


async def _serve(args: argparse.Namespace, ingest_port: int, drain_tokens: dict[str, str],
                 children: list[subprocess.Popen[bytes]], stores: "LocalStores") -> None:
    from app.local import loadgen

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    demo: asyncio.Task[object] | None = None
    if not args.no_demo:
        gen_args = argparse.Namespace(
            mode="drain", apps=args.apps, dynos=2, rate=args.rate, duration=10**9, realtime=True, seed=1,
            start_ms=None, url=f"http://127.0.0.1:{ingest_port}", frame_lines=200, concurrency=4, truth=None,
            token=[f"{a}={t}" for a, t in drain_tokens.items()], bootstrap="", topic="", quiet=True)
        demo = asyncio.create_task(loadgen.run(gen_args))
    following = asyncio.create_task(stores.follow(stop))  # writers (and Cassandra) for a store migration
    while not stop.is_set() and all(c.poll() is None for c in children) and not following.done():
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
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
    if settings.log_format == "json":
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
    web.run_app(webapp, host=settings.web_host, port=settings.web_port, access_log=None, print=None,
                lingering_time=LINGERING_S)
    return 0


def build_web_role(settings: "Settings", counters: "Counters") -> "web.Application":
    """Query API without stream jobs: closed minutes from the store (open ones are served by workers)."""
    from typing import AsyncIterator

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
    tokens = TokenStore(settings, table=FollowingTokens(settings, control.current), counters=counters)

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
        add_admin_port(w, settings, counters=counters, checks={"store": lambda: engines.ping(control.current().source)},
                       routes=admin_routes)

    webapp = make_web_app(query, settings, counters, authorize=token_authorizer(tokens), extra=routes)
    webapp.cleanup_ctx.append(lifecycle)
    return webapp


def tokens(argv: list[str]) -> int:
    """``python -m app tokens create|list|revoke``."""
    from app.settings import Settings
    from app.storage.tokens import KINDS, TokenStore

    ap = argparse.ArgumentParser(prog="python -m app tokens")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create a token; it is printed once and stored only hashed")
    c.add_argument("--app", required=True)
    c.add_argument("--kind", required=True, choices=KINDS)
    ls = sub.add_parser("list", help="list token ids (never the tokens)")
    ls.add_argument("--app")
    rv = sub.add_parser("revoke", help="revoke a token by the id `list` shows")
    rv.add_argument("id")
    args = ap.parse_args(argv)

    async def go() -> int:
        from app import models
        from app.migration.control import read_state
        from app.migration.tables import FollowingTokens

        settings = Settings.from_env()
        state = await read_state(settings)  # during a store migration, tokens change in both stores
        store = TokenStore(settings, table=FollowingTokens(settings, lambda: state))
        await store.start()
        try:
            if args.cmd == "create":
                if not models.valid_app(args.app):
                    print("app must be 1..100 characters of [A-Za-z0-9._-]", file=sys.stderr)
                    return 2
                token, info = await store.create(args.app, args.kind)
                print(token)
                print(f"id {info.id} app {info.app} kind {info.kind} (store the token now; it is not shown again)",
                      file=sys.stderr)
            elif args.cmd == "list":
                for t in await store.list(args.app):
                    print(f"{t.id}  {t.app}  {t.kind}  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(t.created_s))}")
            else:
                if not await store.revoke(args.id):
                    print(f"no token with id {args.id}", file=sys.stderr)
                    return 1
                print(f"revoked {args.id}")
            return 0
        finally:
            await store.stop()

    return asyncio.run(go())


def writer(argv: list[str]) -> int:
    """``python -m app writer --store <spec> [faust worker options]``: the jobs that store minutes, for one
    store, in their own consumer group (app/writer.py)."""
    from app.settings import Settings

    ap = argparse.ArgumentParser(prog="python -m app writer")
    ap.add_argument("--store", required=True, help="dynamodb | cassandra, optionally :<table> / :<keyspace>")
    args, rest = ap.parse_known_args(argv)
    from app.migration.writes import writer_env

    os.environ.update(writer_env(Settings.from_env(), args.store, os.environ))
    Path(os.environ["METRICS_DATA_DIR"]).mkdir(parents=True, exist_ok=True)
    # Faust's global options (--quiet) go before its command, the worker's own (-l info) after it.
    faust_globals = [a for a in rest if a in ("--quiet", "-q")]
    sys.argv = [sys.argv[0], *faust_globals, "worker", *(a for a in rest if a not in faust_globals)]
    import app.writer  # noqa: F401 - binds the writing jobs on the Faust app (settings read from the env above)
    from app.app import app as faust_app

    faust_app.main()
    return 0


def main() -> int:
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "local":
        return local(sys.argv[2:])
    if cmd in ("ingest", "web"):
        return serve(cmd)
    if cmd == "tokens":
        return tokens(sys.argv[2:])
    if cmd == "migration":
        from app.migration.cli import main as migration_main

        return migration_main(sys.argv[2:])
    if cmd == "writer":
        return writer(sys.argv[2:])
    if cmd == "dlq":  # python -m app dlq replay: dead-lettered records back to their topic (app/ops/dlq.py)
        from app.ops.dlq import main as dlq_main

        return dlq_main(sys.argv[2:])
    if cmd == "loadgen":
        from app.local.loadgen import main as loadgen_main

        return loadgen_main(sys.argv[2:])
    # Everything else is a Faust command (worker, tables, agents, ...).
    import app.worker  # noqa: F401 - registers the agents, timer and web service on the Faust app
    from app.app import app as faust_app

    faust_app.main()
    return 0


__all__ = ["main", "local", "serve", "tokens", "worker_env", "start_worker", "start_role", "wait_http", "free_port"]

"""What ``python -m app local`` adds for a store migration: Apache Cassandra when the configuration or the
migration state names it, and a writer process (app/writer.py) for each store the state writes besides the
worker's own, started and stopped as the operator moves the state (``python -m app migration ...`` in
another terminal). Production runs the writer as its own deployment (helm/, docs/operations/migration.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from app.errors import PipelineError
from app.local.embedded import CassandraServer, free_port, require_free_port
from app.migration.control import MigrationControl
from app.migration.state import MigrationState, home_spec, writer_group
from app.settings import Settings

StartRole = Callable[..., "subprocess.Popen[bytes]"]
"""``start_role(role, env, *, log_path, args)`` (app/cli.py): a child ``python -m app <role>``."""

log = logging.getLogger(__name__)


class LocalStores:
    def __init__(self, settings: Settings, env: dict[str, str], data_dir: Path, start_role: StartRole) -> None:
        self.settings = settings
        self.start_role = start_role
        self.env = env
        self.data_dir = data_dir
        self.cassandra: CassandraServer | None = None
        self.writers: dict[str, subprocess.Popen[bytes]] = {}
        self._refused: set[str] = set()

    def ensure_cassandra(self) -> None:
        """Start the local Cassandra node on ``cassandra_port`` (blocking, ~10 s) unless it runs."""
        if self.cassandra is not None:
            return
        require_free_port(self.settings.cassandra.port, "Apache Cassandra (CQL)", "METRICS_CASSANDRA_PORT")
        node = CassandraServer(data_dir=self.data_dir / "cassandra", port=self.settings.cassandra.port)
        node.start()
        self.cassandra = node
        print(f"cassandra {node.address} ({node.kind} {node.version}, data in {node.data_dir})", flush=True)

    async def follow(self, stop: asyncio.Event) -> None:
        """Keep the writers (and Cassandra) in line with the migration state until ``stop``."""
        control = MigrationControl(self.settings)
        await control.start()
        try:
            while not stop.is_set():
                await self.reconcile(control.current())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
        finally:
            await control.stop()

    async def reconcile(self, state: MigrationState) -> None:
        home = home_spec(self.settings)
        wanted = {spec for spec in state.writes if spec != home}
        for spec in [s for s in self.writers if s not in wanted or self.writers[s].poll() is not None]:
            self._stop_writer(spec)
        for spec in sorted(wanted - set(self.writers)):
            if spec.startswith("cassandra"):
                try:
                    await asyncio.to_thread(self.ensure_cassandra)
                except PipelineError as exc:  # e.g. the jars are missing: say so once, keep the stack up
                    if spec not in self._refused:
                        self._refused.add(spec)
                        print(f"error: cannot write {spec}: {exc}", flush=True)
                    continue
            self._refused.discard(spec)
            self.writers[spec] = self._start_writer(spec)

    def _start_writer(self, spec: str) -> subprocess.Popen[bytes]:
        # The writer serves only its admin port (/readyz, /metrics): a free one, never the worker's or the
        # ingest's. `writer --store` derives its group and store.
        port = free_port()
        env = {**self.env, "METRICS_ADMIN_PORT": str(port)}
        log_path = self.data_dir / f"{writer_group(self.settings, spec)}.log"
        proc = self.start_role("writer", env, log_path=log_path, args=("--store", spec, "-l", "info"))
        print(f"writer for {spec} started (ops http://127.0.0.1:{port}/metrics, log {log_path})", flush=True)
        return proc

    def _stop_writer(self, spec: str) -> None:
        proc = self.writers.pop(spec)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"writer for {spec} stopped", flush=True)

    def stop(self) -> None:
        for spec in list(self.writers):
            self._stop_writer(spec)
        if self.cassandra is not None:
            self.cassandra.stop()
            self.cassandra = None

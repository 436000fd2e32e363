"""The write side of a migration: a store's writers run only while the migration writes that store.

Every process that writes a store (the aggregating worker for its configured store, a writer process for
another one: app/writer.py) holds a :class:`WriteGate`. Its ``ready`` event is what the writing agents
(agents/sink.py, rollup.py, events.py, progress.py) wait on before each batch: set once the store's client is
started and while the store is among the state's ``writes``. A paused writer stops consuming; its consumer
group keeps its offsets, so resuming it (a rollback after ``finish``) catches up from where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path

from app.migration.state import MigrationState, store_settings, writer_group
from app.settings import Settings
from app.storage.backends import backend

log = logging.getLogger(__name__)


class WriteGate:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.ready = asyncio.Event()
        self._started = False
        self._writing = True

    def started(self) -> None:
        self._started = True
        self._update()

    def follow(self, state: MigrationState) -> None:
        writing = self.spec in state.writes
        if writing != self._writing:
            log.warning("migration (%s): %s writing %s", state.label, "resuming" if writing else "pausing",
                        self.spec)
        self._writing = writing
        self._update()

    @property
    def writing(self) -> bool:
        return self._writing

    def _update(self) -> None:
        if self._started and self._writing:
            self.ready.set()
        else:
            self.ready.clear()


def writer_env(settings: Settings, spec: str, env: Mapping[str, str]) -> dict[str, str]:
    """The environment of the writer process for store ``spec``: its own consumer group (the Faust app id),
    store, and state directory (RocksDB allows one process per directory)."""
    target = store_settings(settings, spec)
    group = writer_group(settings, spec)
    out = dict(env)
    out.update({"METRICS_APP_ID": group, **backend(target.store).env(target),
                "METRICS_DATA_DIR": str(Path(settings.data_dir) / group)})
    return out

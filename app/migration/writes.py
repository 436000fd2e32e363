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

from app.migration.state import MigrationState

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

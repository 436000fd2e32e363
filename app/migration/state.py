"""The migration between two stores as a state an operator moves step by step.

``single(A)`` -> ``dual-write`` -> ``shadow N%`` -> ``cutover N%`` -> ``single(B)``; a store is named by a spec
(``dynamodb[:<table>]``, ``cassandra[:<keyspace>]``). Every transition is checked here; the state travels on a
compacted topic (app/migration/control.py).
Reference: docs/operations/migration.md
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from app.errors import ConfigError
from app.settings import Settings
from app.storage.backends import BACKENDS

Phase = Literal["single", "dual_write", "shadow", "cutover"]
PHASES: tuple[Phase, ...] = ("single", "dual_write", "shadow", "cutover")


class MigrationError(ConfigError):
    """A command that does not apply to the current phase; the message says what would."""


class InvalidSpec(ConfigError, ValueError):
    """A store spec that names no store, or a keyspace that is not a plain CQL name (it is interpolated into
    CQL). A ValueError too, so a state record on the topic that carries one is ignored like any unreadable
    record (app/migration/control.py) instead of reaching a store."""


_SPEC_ACTION = (f"name one of {', '.join(BACKENDS)}, optionally with "
                + " or ".join(f":{b.namespace_hint} ({b.name})" for b in BACKENDS.values())
                + " (a keyspace: a letter, then up to 47 letters, digits or _)")


_RECORD_ACTION = ("the record is ignored: only `python -m app migration` writes that topic, so check who else can "
                  "(Kafka ACLs), then publish a valid state with the migration CLI")


def check_spec(spec: str, *, source: str = "--to / --store", action: str = _SPEC_ACTION) -> str:
    """``spec`` if it names a store (and a valid keyspace), else InvalidSpec saying where it came from."""
    if not isinstance(spec, str):
        raise InvalidSpec(f"store spec from {source} is not a string: {spec!r:.80}", action=action)
    name, _, namespace = spec.partition(":")
    found = BACKENDS.get(name)
    if found is None:
        raise InvalidSpec(f"unknown store {spec[:80]!r} (from {source})", action=action)
    if namespace and not found.valid_namespace(namespace):
        raise InvalidSpec(f"invalid {name} {found.namespace_hint} {namespace[:80]!r} in store spec (from {source})",
                          action=action)
    return spec


def store_settings(settings: Settings, spec: str) -> Settings:
    """Settings that point at the store ``spec`` names (``name`` or ``name:namespace``)."""
    check_spec(spec)
    name, _, namespace = spec.partition(":")
    return BACKENDS[name].settings_for(settings, namespace)


def home_spec(settings: Settings) -> str:
    """The spec of the store these settings name, with its namespace (so two tables stay apart)."""
    return f"{settings.storage.backend}:{BACKENDS[settings.storage.backend].namespace(settings)}"


def canonical(settings: Settings, spec: str) -> str:
    return home_spec(store_settings(settings, spec))


def writer_group(settings: Settings, spec: str) -> str:
    """The consumer group (Faust app id) of the writer process for store ``spec`` (app/writer.py)."""
    return f"{settings.kafka.app_id}-writer-{canonical(settings, spec).replace(':', '-')}"


def app_bucket(app: str) -> int:
    """0..99, fixed per app: which apps are shadowed / cut over at N % (the first N buckets)."""
    return int.from_bytes(hashlib.blake2b(app.encode(), digest_size=4).digest(), "big") % 100


@dataclass(frozen=True, slots=True)
class MigrationState:
    phase: Phase
    source: str
    """The store of ``single``, or the one being left."""
    target: str = ""
    """The store being moved to ("" in ``single``)."""
    shadow_pct: int = 0
    cutover_pct: int = 0
    aa: bool = False
    """A/A: shadow reads run against the serving store itself, measuring the comparison's own noise."""
    backfill: bool = False
    """The target's writer started at the earliest retained offset instead of the current end."""
    started_ms: int = 0
    both_since_ms: int = 0
    """From this event time on, both stores hold every minute (set by ``start``): older data exists only in
    the source, until it ages out at ``both_since_ms + retention``."""
    version: int = 0
    updated_ms: int = 0

    # --- what processes do in this state -------------------------------------------------------------

    @property
    def writes(self) -> tuple[str, ...]:
        """The stores whose writers run."""
        return (self.source,) if self.phase == "single" else (self.source, self.target)

    def serving(self, app: str, since_s: int | None = None) -> str:
        """The store ``app``'s reads of a range starting at ``since_s`` are served from. A cut-over app's
        range that starts before ``both_since`` stays on the source, the only store holding all of it."""
        if (self.phase == "cutover" and app_bucket(app) < self.cutover_pct
                and (since_s is None or since_s * 1000 >= self.both_since_ms)):
            return self.target
        return self.source

    def shadow(self, app: str, since_s: int | None = None) -> str | None:
        """The store that ``app``'s reads (of a range starting at ``since_s``) are compared with, if any."""
        if self.phase not in ("shadow", "cutover") or app_bucket(app) >= self.shadow_pct:
            return None
        serving = self.serving(app, since_s)
        if self.aa:
            return serving
        return self.source if serving == self.target else self.target

    @property
    def label(self) -> str:
        if self.phase == "single":
            return f"single({self.source})"
        if self.phase == "dual_write":
            return f"dual-write {self.source} -> {self.target}"
        aa = " A/A" if self.aa else ""
        if self.phase == "shadow":
            return f"shadow {self.shadow_pct}%{aa} {self.source} -> {self.target}"
        return f"cutover {self.cutover_pct}% (shadow {self.shadow_pct}%{aa}) {self.source} -> {self.target}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> MigrationState:
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        state = cls(**known)
        if state.phase not in PHASES:
            raise ValueError(f"unknown phase {state.phase!r}")
        check_spec(state.source, source="the migration state record's source", action=_RECORD_ACTION)
        if state.target or state.phase != "single":
            check_spec(state.target, source="the migration state record's target", action=_RECORD_ACTION)
        return state


def initial(settings: Settings) -> MigrationState:
    """Before any command: the configured store alone."""
    return MigrationState("single", home_spec(settings))


# --- transitions (each returns the next state, or raises MigrationError saying what to do) ---------------

def _next(state: MigrationState, now_ms: int, **changes: Any) -> MigrationState:
    return replace(state, version=state.version + 1, updated_ms=now_ms, **changes)


def start(state: MigrationState, settings: Settings, to: str, *, backfill: bool, now_ms: int,
          earliest_ms: int | None = None) -> MigrationState:
    """single(A) -> dual-write A -> ``to``. ``earliest_ms``: from when Kafka holds every minute (backfill)."""
    target = canonical(settings, to)
    if state.phase != "single":
        raise MigrationError(f"a migration is already under way ({state.label})",
                             action="finish or roll it back first (python -m app migration status)")
    if target == state.source:
        raise MigrationError(f"{target} is already the store", action="name the store to move to")
    # Every minute closed after the writer's offsets were set (the current end) reaches both stores: the
    # minute under way at ``now_ms`` included. With a backfill, from the oldest minute Kafka still holds.
    since_ms = earliest_ms if backfill and earliest_ms is not None else now_ms
    since_ms = since_ms // 60_000 * 60_000
    return _next(state, now_ms, phase="dual_write", target=target, backfill=backfill, started_ms=now_ms,
                 both_since_ms=since_ms, shadow_pct=0, cutover_pct=0, aa=False)


def _pct(n: int) -> int:
    if not 0 <= n <= 100:
        raise MigrationError(f"{n} is not a percentage", action="give 0..100")
    return n


def shadow(state: MigrationState, pct: int, *, aa: bool, now_ms: int) -> MigrationState:
    """Compare ``pct`` % of apps' reads with the other store (dual-write, shadow or cutover)."""
    if state.phase == "single":
        raise MigrationError("no migration under way", action="python -m app migration start --to <store> first")
    phase: Phase = "cutover" if state.phase == "cutover" else ("shadow" if _pct(pct) else "dual_write")
    return _next(state, now_ms, phase=phase, shadow_pct=pct, aa=aa)


def cutover(state: MigrationState, pct: int, *, now_ms: int) -> MigrationState:
    """Serve ``pct`` % of apps from the new store; 0 goes back to shadow."""
    if state.phase not in ("shadow", "cutover"):
        raise MigrationError(f"cutover needs shadow reads first ({state.label})",
                             action="run python -m app migration shadow N, and read the mismatch rate in status")
    if _pct(pct) == 0:
        return _next(state, now_ms, phase="shadow", cutover_pct=0)
    return _next(state, now_ms, phase="cutover", cutover_pct=pct)


def rollback(state: MigrationState, *, now_ms: int) -> MigrationState:
    """One phase back: cutover N -> shadow, shadow -> dual-write, dual-write -> single(source);
    single(B) after a finish -> cutover 100 % with both writers (A's resumes from its offsets)."""
    if state.phase == "cutover":
        return _next(state, now_ms, phase="shadow", cutover_pct=0)
    if state.phase == "shadow":
        return _next(state, now_ms, phase="dual_write", shadow_pct=0, aa=False)
    if state.phase == "dual_write":
        return _next(state, now_ms, phase="single", target="", started_ms=0, both_since_ms=0, backfill=False)
    if not state.target:
        raise MigrationError(f"nothing to roll back ({state.label})", action="nothing to do")
    return _next(state, now_ms, phase="cutover", source=state.target, target=state.source, cutover_pct=100,
                 shadow_pct=0)


def finish(state: MigrationState, settings: Settings, *, now_ms: int, force: bool = False) -> MigrationState:
    """cutover 100 % -> single(target). Refused while data older than ``both_since`` still matters (it is
    only in the source) unless ``force``. The old store is remembered in ``target`` for a rollback."""
    if state.phase != "cutover" or state.cutover_pct != 100:
        raise MigrationError(f"finish needs cutover 100 % ({state.label})",
                             action="python -m app migration cutover 100")
    in_sync_ms = in_sync_at_ms(state, settings)
    if now_ms < in_sync_ms and not force:
        raise MigrationError(
            f"data before {iso(state.both_since_ms)} is only in {state.source}; it ages out at {iso(in_sync_ms)}",
            action="wait until then (reads of older ranges would come back empty), or pass --force")
    return _next(state, now_ms, phase="single", source=state.target, target=state.source, shadow_pct=0,
                 cutover_pct=0, aa=False)


def in_sync_at_ms(state: MigrationState, settings: Settings) -> int:
    """When everything the source holds is also in the target: ``both_since`` plus the retention."""
    return state.both_since_ms + settings.storage.ttl_s * 1000


def iso(ms: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


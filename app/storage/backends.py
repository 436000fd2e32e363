"""Which store a process uses: the registry of backends. ``METRICS_STORE`` picks the backend of every store
protocol (app/storage/protocol.py). Composition roots (worker, web, ingest, CLI) and the migration ask here,
never a backend module: a backend's name, the setting that holds its namespace (a DynamoDB table, a
Cassandra keyspace), and its factories are all a caller may know of it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.clock import Clock
from app.errors import ConfigError
from app.ops.stats import Counters
from app.settings import PREFIX, STORES, Settings
from app.storage.protocol import FrameTable, MetricsBackend, TokenTable


@dataclass(frozen=True, slots=True)
class Backend:
    """One kind of store. The factories import their driver only when called (acsylla loads only where
    Cassandra is used)."""

    name: str
    namespace_field: str
    """The Settings field naming this backend's namespace: every one of its tables lives in it."""
    namespace_hint: str
    """What a namespace is, for messages (``<table>``, ``<keyspace>``)."""
    store: Callable[[Settings, Clock | None, Counters | None], MetricsBackend]
    tokens: Callable[[Settings], TokenTable]
    frames: Callable[[Settings], FrameTable]
    valid_namespace: Callable[[str], bool]
    where: Callable[[Settings], str]
    """Where the store is reached, for messages (``Cassandra at 127.0.0.1:9042``)."""
    reach_action: str
    """What an operator does when it cannot be reached."""

    @property
    def namespace_env(self) -> str:
        return PREFIX + self.namespace_field.upper()

    def namespace(self, settings: Settings) -> str:
        value: str = settings.get(self.namespace_field)
        return value

    def settings_for(self, settings: Settings, namespace: str = "") -> Settings:
        """``settings`` pointing at this backend (in ``namespace``, when given)."""
        if namespace and not self.valid_namespace(namespace):
            raise ConfigError(f"invalid {self.name} {self.namespace_hint} {namespace[:80]!r}",
                              action=f"fix the {self.namespace_hint} (or {self.namespace_env})")
        changes: dict[str, Any] = {self.namespace_field: namespace} if namespace else {}
        return settings.replace(store=self.name, **changes)


def _dynamo_store(settings: Settings, clock: Clock | None, counters: Counters | None) -> MetricsBackend:
    from app.storage.dynamodb import DynamoStore
    return DynamoStore(settings.storage, settings.dynamodb, clock=clock, counters=counters)


def _dynamo_tokens(settings: Settings) -> TokenTable:
    from app.storage.dynamodb import DynamoTokens
    return DynamoTokens(settings.storage, settings.dynamodb)


def _dynamo_frames(settings: Settings) -> FrameTable:
    from app.storage.dynamodb import DynamoFrames
    return DynamoFrames(settings.storage, settings.dynamodb)


def _cassandra_store(settings: Settings, clock: Clock | None, counters: Counters | None) -> MetricsBackend:
    from app.storage.cassandra import CassandraStore
    return CassandraStore(settings.storage, settings.cassandra, clock=clock)


def _cassandra_tokens(settings: Settings) -> TokenTable:
    from app.storage.cassandra import CassandraTokens
    return CassandraTokens(settings.storage, settings.cassandra)


def _cassandra_frames(settings: Settings) -> FrameTable:
    from app.storage.cassandra import CassandraFrames
    return CassandraFrames(settings.storage, settings.cassandra)


def _valid_keyspace(name: str) -> bool:
    from app.storage.cassandra import KEYSPACE_RE  # interpolated into CQL: a plain name only
    return KEYSPACE_RE.fullmatch(name) is not None


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("dynamodb", "table_name", "<table>", _dynamo_store, _dynamo_tokens, _dynamo_frames,
            valid_namespace=lambda name: bool(name),
            where=lambda s: f"DynamoDB at {s.dynamodb.endpoint or 'AWS ' + s.dynamodb.region}",
            reach_action=f"check {PREFIX}DYNAMODB_ENDPOINT / {PREFIX}AWS_REGION and the AWS credentials"),
    Backend("cassandra", "cassandra_keyspace", "<keyspace>", _cassandra_store, _cassandra_tokens,
            _cassandra_frames, valid_namespace=_valid_keyspace,
            where=lambda s: f"Cassandra at {s.cassandra.hosts}:{s.cassandra.port}",
            reach_action=(f"start a node there, or set {PREFIX}CASSANDRA_HOSTS / {PREFIX}CASSANDRA_PORT "
                          f"(locally: restart `make run` as `{PREFIX}LOCAL_CASSANDRA=1 make run`)")),
)}
assert tuple(BACKENDS) == STORES, "app/settings.py STORES names the registered backends"


def backend(name: str) -> Backend:
    """The backend called ``name`` (ConfigError naming the known ones otherwise)."""
    found = BACKENDS.get(name)
    if found is None:
        raise ConfigError(f"unknown store {name[:80]!r}", action=f"name one of {', '.join(BACKENDS)}")
    return found


def metrics_store(settings: Settings, *, store: str | None = None, counters: Counters | None = None,
                  clock: Clock | None = None) -> MetricsBackend:
    """The metrics store named ``store`` (default ``settings.storage.backend``)."""
    return backend(store or settings.storage.backend).store(settings, clock, counters)


def token_table(settings: Settings, *, store: str | None = None) -> TokenTable:
    return backend(store or settings.storage.backend).tokens(settings)


def frame_table(settings: Settings, *, store: str | None = None) -> FrameTable:
    return backend(store or settings.storage.backend).frames(settings)

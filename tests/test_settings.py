"""Settings in sections (app/settings.py): the variables' names never change, secrets stay out of reprs, each
section's checks are ConfigErrors naming the variable, and the flat names still work as overrides."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from app.errors import ConfigError
from app.settings import FLAT, SECTIONS, KafkaSettings, Settings, WindowSettings, env_names

# Every variable the settings read, as the Helm chart, the docs and deployments name them: a section may rename
# its field, never the variable.
ENV_NAMES = {
    "METRICS_ADMIN_HOST", "METRICS_ADMIN_PORT", "METRICS_ADVERTISED_URL", "METRICS_ALERTS_TOPIC", "METRICS_APP_ID",
    "METRICS_AUTH_FAILURES_BURST", "METRICS_AUTH_FAILURES_PER_S", "METRICS_AUTOSCALE_DOWN_COOLDOWN_MIN",
    "METRICS_AUTOSCALE_DOWN_HEADROOM", "METRICS_AUTOSCALE_DOWN_STABLE_MIN", "METRICS_AUTOSCALE_HISTORY_MIN",
    "METRICS_AUTOSCALE_MIN_REQUESTS", "METRICS_AUTOSCALE_PINNED_NOTIFY_EVERY_MIN", "METRICS_AUTOSCALE_TOPIC",
    "METRICS_AUTOSCALE_UP_COOLDOWN_MIN", "METRICS_AWS_REGION", "METRICS_BACKOFF_BASE_MS", "METRICS_BACKOFF_MAX_MS",
    "METRICS_BATCH_MAX", "METRICS_BATCH_MAX_BYTES", "METRICS_BATCH_WITHIN_S", "METRICS_BROKER_URL",
    "METRICS_CASSANDRA_CONSISTENCY", "METRICS_CASSANDRA_HOSTS", "METRICS_CASSANDRA_KEYSPACE",
    "METRICS_CASSANDRA_MAX_INFLIGHT", "METRICS_CASSANDRA_PASSWORD", "METRICS_CASSANDRA_PORT",
    "METRICS_CASSANDRA_REPLICATION", "METRICS_CASSANDRA_REQUEST_TIMEOUT_S", "METRICS_CASSANDRA_USERNAME",
    "METRICS_CHANGELOG_MAX_MESSAGE_BYTES", "METRICS_CHECKPOINTS_TOPIC", "METRICS_CLOSED_KEEP_S",
    "METRICS_CLOSE_INTERVAL_S", "METRICS_COMPRESS_OVER_BYTES", "METRICS_CONNECT_TIMEOUT_S", "METRICS_CREATE_TABLE",
    "METRICS_DASHBOARD_ASSETS_DIR", "METRICS_DATA_DIR", "METRICS_DEDUP_LEASE_S", "METRICS_DEDUP_WINDOW_S",
    "METRICS_DIGEST_MAX_CENTROIDS", "METRICS_DLQ_TOPIC", "METRICS_DYNAMODB_ENDPOINT",
    "METRICS_EVENTS_MAX_RANGE_DAYS", "METRICS_FETCH_MAX_PARTITION_BYTES", "METRICS_FORMATION_METHOD",
    "METRICS_FORMATION_SECRET", "METRICS_FORMATION_TOKEN", "METRICS_FORMATION_URL", "METRICS_FORWARDED_FOR_HOPS",
    "METRICS_FORWARD_ALLOWED_SUFFIX", "METRICS_GRACE_S", "METRICS_HEARTBEAT_INTERVAL_S", "METRICS_IDLE_TIMEOUT_S",
    "METRICS_INGEST_BODY_TIMEOUT_S", "METRICS_INGEST_CHUNK_OBSERVATIONS", "METRICS_INGEST_MAX_ACTIVE_REQUESTS",
    "METRICS_INGEST_MAX_BODY_BYTES", "METRICS_INGEST_MAX_DEAD_LETTERS_PER_REQUEST",
    "METRICS_INGEST_MAX_DECOMPRESSED_RATIO", "METRICS_INGEST_MAX_INFLIGHT_BYTES", "METRICS_INGEST_MAX_LINE_BYTES",
    "METRICS_INGEST_MAX_WAITING_PER_APP", "METRICS_INGEST_PARSE_INLINE_BYTES", "METRICS_INGEST_WORK_SLOTS",
    "METRICS_KAFKA_MAX_BATCH_BYTES", "METRICS_KAFKA_SASL_MECHANISM", "METRICS_KAFKA_SASL_PASSWORD",
    "METRICS_KAFKA_SASL_USERNAME", "METRICS_KAFKA_SECURITY_PROTOCOL", "METRICS_KAFKA_SSL_CAFILE",
    "METRICS_KAFKA_SSL_CERTFILE", "METRICS_KAFKA_SSL_KEYFILE", "METRICS_KEEPALIVE_TIMEOUT_S", "METRICS_LIMITS_FILE",
    "METRICS_LIMITS_RELOAD_S", "METRICS_LIMIT_ADDON_SOURCES", "METRICS_LIMIT_INFLIGHT_BYTES_PER_TOKEN",
    "METRICS_LIMIT_INGEST_BURST_BYTES", "METRICS_LIMIT_INGEST_RATE_BYTES_S", "METRICS_LIMIT_PROCESS_TYPES",
    "METRICS_LIMIT_QUERY_BURST", "METRICS_LIMIT_QUERY_RATE_PER_S", "METRICS_LOG_FORMAT", "METRICS_MAX_ATTEMPTS",
    "METRICS_MAX_FUTURE_S", "METRICS_MAX_MESSAGE_BYTES", "METRICS_MAX_METRIC_NAMES", "METRICS_MAX_MONITORS_PER_APP",
    "METRICS_MAX_POOL_CONNECTIONS", "METRICS_MAX_QUERY_POINTS", "METRICS_METRICS_TOPIC", "METRICS_MIGRATION_TOPIC",
    "METRICS_MIGRATION_WAIT_S", "METRICS_MINUTE_MAX_BYTES", "METRICS_NOTIFY_BACKOFF_BASE_MS",
    "METRICS_NOTIFY_BACKOFF_MAX_MS", "METRICS_NOTIFY_CONCURRENCY", "METRICS_NOTIFY_MAX_ATTEMPTS",
    "METRICS_NOTIFY_QUEUE_MAX", "METRICS_NOTIFY_TIMEOUT_S", "METRICS_OBSERVATIONS_TOPIC",
    "METRICS_OUTBOX_SWEEP_INTERVAL_S", "METRICS_PARTITIONS", "METRICS_POLICY_APPLY_TIMEOUT_S",
    "METRICS_POLICY_COMMANDS_TOPIC", "METRICS_PRODUCE_TIMEOUT_S", "METRICS_PROGRESS_INTERVAL_S",
    "METRICS_QUERY_CACHE_MAX_AGE_S", "METRICS_QUERY_CACHE_MAX_BYTES", "METRICS_QUERY_MAX_CONCURRENT",
    "METRICS_QUERY_MAX_CONCURRENT_PER_APP", "METRICS_QUERY_QUEUE_TIMEOUT_S", "METRICS_QUERY_SETTLE_S",
    "METRICS_QUERY_TAIL_READ_INTERVAL_S", "METRICS_QUERY_TAIL_TTL_S", "METRICS_QUERY_TIMEOUT_S",
    "METRICS_QUERY_USE_ROLLUPS", "METRICS_READ_TIMEOUT_S", "METRICS_REBALANCE_TIMEOUT_S",
    "METRICS_REPLICATION_FACTOR", "METRICS_ROLLUP_BATCH_MAX", "METRICS_ROLLUP_EVICT_AFTER_S",
    "METRICS_ROLLUP_WITHIN_S", "METRICS_ROLLUP_FLUSH_S", "METRICS_SECRETS_KEY", "METRICS_SESSION_TIMEOUT_S",
    "METRICS_SHADOW_TIMEOUT_S",
    "METRICS_SINK_BATCH_MAX", "METRICS_SINK_CONCURRENCY", "METRICS_SINK_DLQ_TOPIC", "METRICS_SINK_WITHIN_S",
    "METRICS_SMTP_CA_FILE", "METRICS_SMTP_FROM", "METRICS_SMTP_HOST", "METRICS_SMTP_PASSWORD", "METRICS_SMTP_PORT",
    "METRICS_SMTP_TLS", "METRICS_SMTP_USERNAME", "METRICS_STORE", "METRICS_STORE_FATAL_RETRY_S",
    "METRICS_STORE_RECORD_FORMAT", "METRICS_STORE_URL",
    "METRICS_TABLE_NAME", "METRICS_TOPIC_MAX_MESSAGE_BYTES", "METRICS_TTL_DAYS", "METRICS_WEBHOOK_ALLOWED_NETWORKS",
    "METRICS_WEB_HOST", "METRICS_WEB_PORT",
}

SECRETS = {"METRICS_KAFKA_SASL_PASSWORD": "kafka-pw", "METRICS_CASSANDRA_PASSWORD": "cassandra-pw",
           "METRICS_SMTP_PASSWORD": "smtp-pw", "METRICS_FORMATION_TOKEN": "formation-token",
           "METRICS_FORMATION_SECRET": "formation-secret",
           "METRICS_SECRETS_KEY": "qkMV5oXnL0pG3vGC5E3t0hK1u8v1bXc0m5yK3Jq8nYw="}


def test_the_variables_are_the_ones_always_read() -> None:
    assert env_names() == ENV_NAMES
    declared = [alias for cls in SECTIONS.values() for alias in cls.env_names().values()]
    assert len(declared) == len(set(declared)) == len(ENV_NAMES)  # each variable in exactly one section


def test_every_variable_reaches_its_field() -> None:
    for env, (section, name) in {f"METRICS_{flat.upper()}": where for flat, where in FLAT.items()}.items():
        field = SECTIONS[section].model_fields[name]
        assert field.validation_alias == env, env


def test_sections_are_frozen_and_the_defaults_need_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_PARTITIONS", "3")
    s = Settings()
    assert s.kafka.partitions == 8 and KafkaSettings().partitions == 8  # only from_env reads the environment
    assert Settings.from_env().kafka.partitions == 3
    with pytest.raises(ValidationError, match="frozen"):
        s.kafka.partitions = 2  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        s.kafka = KafkaSettings()  # type: ignore[misc]


def test_values_are_parsed_as_before() -> None:
    s = Settings.from_env({"METRICS_PARTITIONS": "4", "METRICS_GRACE_S": "12.5", "METRICS_CREATE_TABLE": "no",
                           "METRICS_QUERY_USE_ROLLUPS": "0", "METRICS_TABLE_NAME": "t",
                           "METRICS_KAFKA_SASL_USERNAME": "svc", "partitions": "5", "metrics_grace_s": "1"})
    assert (s.kafka.partitions, s.windows.grace_s, s.storage.create_table, s.query.use_rollups) == (4, 12.5, False,
                                                                                                     False)
    assert (s.dynamodb.table_name, s.kafka.sasl_username) == ("t", "svc")
    for raw, value in [("1", True), ("TRUE", True), ("yes", True), ("0", False), ("False", False), ("NO", False)]:
        assert Settings.from_env({"METRICS_CREATE_TABLE": raw}).storage.create_table is value


@pytest.mark.parametrize("env, kind", [
    ({"METRICS_PARTITIONS": "eight"}, "int"), ({"METRICS_PARTITIONS": "4.0"}, "int"),
    ({"METRICS_PARTITIONS": "4.5"}, "int"), ({"METRICS_GRACE_S": "soon"}, "float"),
    ({"METRICS_CREATE_TABLE": "on"}, "bool"), ({"METRICS_CREATE_TABLE": "2"}, "bool"),
])
def test_a_malformed_value_is_a_config_error_naming_the_variable(env: dict[str, str], kind: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    ((name, raw),) = env.items()
    assert str(err.value).startswith(f"{name}={raw!r} is not a valid {kind}")
    assert "fix the environment variable" in err.value.action


@pytest.mark.parametrize("env, match, action", [
    ({"METRICS_PARTITIONS": "0"}, "partitions must be >= 1", "METRICS_PARTITIONS"),
    ({"METRICS_KAFKA_SECURITY_PROTOCOL": "TLS"}, "kafka_security_protocol must be one of",
     "METRICS_KAFKA_SECURITY_PROTOCOL"),
    ({"METRICS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs a SASL username and password",
     "METRICS_KAFKA_SASL_PASSWORD"),
    ({"METRICS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "METRICS_KAFKA_SASL_USERNAME": "u",
      "METRICS_KAFKA_SASL_PASSWORD": "p", "METRICS_KAFKA_SASL_MECHANISM": "GSSAPI"}, "kafka_sasl_mechanism must be",
     "METRICS_KAFKA_SASL_MECHANISM"),
    ({"METRICS_KAFKA_SSL_CERTFILE": "/x.pem"}, "go together", "METRICS_KAFKA_SSL_KEYFILE"),
    ({"METRICS_GRACE_S": "-1"}, "grace_s must be >= 0", "METRICS_GRACE_S"),
    ({"METRICS_IDLE_TIMEOUT_S": "0"}, "idle_timeout_s > 0", "METRICS_IDLE_TIMEOUT_S"),
    ({"METRICS_CLOSED_KEEP_S": "-1"}, "closed_keep_s must be >= 0", "METRICS_CLOSED_KEEP_S"),
    ({"METRICS_DIGEST_MAX_CENTROIDS": "10"}, "within 20..2000", "METRICS_DIGEST_MAX_CENTROIDS"),
    ({"METRICS_STORE": "s3"}, "store must be one of dynamodb, cassandra", "METRICS_STORE=cassandra"),
    ({"METRICS_TTL_DAYS": "0"}, "ttl_days must be > 0", "METRICS_TTL_DAYS"),
    ({"METRICS_STORE_RECORD_FORMAT": "3"}, "record_format must be 1 or 2", "METRICS_STORE_RECORD_FORMAT"),
    ({"METRICS_CASSANDRA_MAX_INFLIGHT": "0"}, "cassandra_max_inflight must be >= 1", "METRICS_CASSANDRA_MAX_INFLIGHT"),
    ({"METRICS_INGEST_WORK_SLOTS": "0"}, "ingest_work_slots must be >= 1", "METRICS_INGEST_WORK_SLOTS"),
    ({"METRICS_INGEST_MAX_ACTIVE_REQUESTS": "0"}, "ingest_max_active_requests", "METRICS_INGEST_MAX_ACTIVE_REQUESTS"),
    ({"METRICS_INGEST_MAX_BODY_BYTES": "0"}, "ingest_max_body_bytes", "METRICS_INGEST_MAX_BODY_BYTES"),
    ({"METRICS_INGEST_MAX_LINE_BYTES": "0"}, "ingest_max_line_bytes", "METRICS_INGEST_MAX_LINE_BYTES"),
    ({"METRICS_INGEST_MAX_INFLIGHT_BYTES": "0"}, "ingest_max_inflight_bytes", "METRICS_INGEST_MAX_INFLIGHT_BYTES"),
    ({"METRICS_INGEST_MAX_WAITING_PER_APP": "-1"}, "ingest_max_waiting_per_app must be >= 0",
     "METRICS_INGEST_MAX_WAITING_PER_APP"),
    ({"METRICS_LIMITS_RELOAD_S": "0"}, "limits_reload_s must be > 0", "METRICS_LIMITS_RELOAD_S"),
    ({"METRICS_LOG_FORMAT": "xml"}, "log_format must be text or json", "METRICS_LOG_FORMAT"),
    ({"METRICS_SECRETS_KEY": "not-a-key"}, "is not a Fernet key", "METRICS_SECRETS_KEY"),
])
def test_each_check_is_a_config_error_with_the_operators_action(env: dict[str, str], match: str,
                                                                 action: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        Settings.from_env(env)
    assert action in err.value.action
    with pytest.raises(ConfigError, match=match):  # the same checks for values given in code
        Settings.of(**{k.removeprefix("METRICS_").lower(): v for k, v in env.items()})


def test_secrets_stay_out_of_reprs_and_dumps() -> None:
    s = Settings.from_env({**SECRETS, "METRICS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                           "METRICS_KAFKA_SASL_USERNAME": "svc"})
    shown = f"{s!r} {s} {s.model_dump()} {s.model_dump_json()} {s.kafka!r} {s.alerting!r} {s.cassandra!r}"
    for value in SECRETS.values():
        assert value not in shown
    assert s.kafka.sasl_password.get_secret_value() == "kafka-pw"
    assert s.cassandra.password.get_secret_value() == "cassandra-pw"
    assert s.alerting.smtp_password.get_secret_value() == "smtp-pw"
    assert s.alerting.formation_token.get_secret_value() == "formation-token"
    assert s.alerting.formation_secret.get_secret_value() == "formation-secret"
    assert s.alerting.secrets_key.get_secret_value() == SECRETS["METRICS_SECRETS_KEY"]
    secret_fields = {f"{section}.{name}" for section, cls in SECTIONS.items()
                     for name, f in cls.model_fields.items() if f.annotation is SecretStr}
    assert secret_fields == {"kafka.sasl_password", "cassandra.password", "alerting.smtp_password",
                             "alerting.formation_token", "alerting.formation_secret", "alerting.secrets_key"}


def test_flat_names_override_by_section() -> None:
    s = Settings.of(partitions=2, grace_s=10, store="cassandra", table_name="t", smtp_password="pw",
                    kafka_sasl_username="svc", limit_query_burst=5)
    assert (s.kafka.partitions, s.windows.grace_s, s.storage.backend, s.dynamodb.table_name) == (2, 10.0,
                                                                                                "cassandra", "t")
    assert (s.alerting.smtp_password.get_secret_value(), s.kafka.sasl_username, s.limits.query_burst) == (
        "pw", "svc", 5)
    assert Settings.of() == Settings()
    moved = s.replace(store="dynamodb", cassandra_keyspace="ks")
    assert (moved.storage.backend, moved.cassandra.keyspace, moved.kafka.partitions) == ("dynamodb", "ks", 2)
    assert s.storage.backend == "cassandra"  # the original is unchanged
    assert Settings.from_env({"METRICS_PARTITIONS": "3"}, grace_s=5).kafka.partitions == 3
    assert Settings.from_env({"METRICS_PARTITIONS": "3"}, partitions=4).kafka.partitions == 4  # overrides win
    with pytest.raises(TypeError, match="no setting named 'partition'"):
        Settings.of(partition=2)
    with pytest.raises(ConfigError, match="METRICS_PARTITIONS"):
        s.replace(partitions=0)
    assert WindowSettings(grace_s=5).replace(idle_timeout_s=7) == WindowSettings(grace_s=5, idle_timeout_s=7)


def test_derived_values_live_with_their_section() -> None:
    s = Settings.of(grace_s=1.5, idle_timeout_s=2, closed_keep_s=0.25, max_future_s=3, ttl_days=0.5)
    assert (s.windows.grace_ms, s.windows.idle_timeout_ms, s.windows.closed_keep_ms,
            s.windows.max_future_ms) == (1500, 2000, 250, 3000)
    assert s.storage.ttl_s == 43200
    assert Settings().storage.ttl_s == 30 * 86400

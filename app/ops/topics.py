"""Creating the pipeline's topics with the right partition counts before anything produces to them.

A producer that writes first makes the broker auto-create a topic with its default partition count, and
the window table's changelog must have exactly as many partitions as ``observations`` (Faust refuses to
run otherwise). ``python -m app local``, the tests and deployments run this first.
``python -m app.ops.health ensure-topics`` does it from the command line (the Helm chart's worker init container).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from app.ops.kafka import bootstrap_servers, client_kwargs
from app.ops.logs import setup_json_logging
from app.settings import KafkaSettings, Settings

log = logging.getLogger(__name__)

RECORD_OVERHEAD_BYTES = 1024
"""Kafka's record and batch headers plus the key, kept free below a topic's max.message.bytes by whatever
sizes a record to fit (a minute, a dead letter)."""


def topic_names(kafka: KafkaSettings) -> list[str]:
    return [kafka.observations_topic, kafka.metrics_topic, kafka.dlq_topic, kafka.sink_dlq_topic,
            f"{kafka.app_id}-windows-changelog",
            kafka.alerts_topic, kafka.autoscale_topic, kafka.policy_commands_topic,
            f"{kafka.app_id}-monitors-changelog", f"{kafka.app_id}-autoscale-changelog",
            f"{kafka.app_id}-rollups-changelog", kafka.checkpoints_topic]


def topic_configs(kafka: KafkaSettings, topic: str) -> dict[str, str]:
    """Explicit ``max.message.bytes``, so no broker default decides which minute is refused: a minute is kept
    below ``minute_max_bytes`` (agents/aggregate.py), under ``topic_max_message_bytes``; changelogs (window
    state, rollups) get ``changelog_max_message_bytes``, the producer's max_request_size (app/app.py). Changelogs
    and checkpoints keep only the latest value per key, so a new node recovers state, not the whole history."""
    if topic.endswith("-changelog"):
        return {"cleanup.policy": "compact", "max.message.bytes": str(kafka.changelog_max_message_bytes)}
    configs = {"max.message.bytes": str(kafka.topic_max_message_bytes)}
    if topic == kafka.checkpoints_topic:
        configs["cleanup.policy"] = "compact"
    return configs


async def ensure_topics(bootstrap: str, kafka: KafkaSettings) -> list[str]:
    """Create missing topics; returns the names created. Existing topics are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_kwargs(kafka))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topic_names(kafka) if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # created concurrently by another process
                await admin.create_topics([NewTopic(t, kafka.partitions, kafka.replication_factor,
                                                    topic_configs=topic_configs(kafka, t))
                                           for t in missing])
            log.info("created topics %s with %d partitions", missing, kafka.partitions)
        return missing
    finally:
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m app.ops.health ensure-topics``: create missing topics with METRICS_PARTITIONS partitions."""
    ap = argparse.ArgumentParser(prog="python -m app.ops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["ensure-topics"])
    ap.parse_args(argv)
    setup_json_logging()
    settings = Settings.from_env()
    servers = bootstrap_servers(settings.kafka.broker_url)
    created = asyncio.run(ensure_topics(",".join(servers), settings.kafka))
    log.info("topics ready on %s (created: %s)", ",".join(servers), ", ".join(created) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())

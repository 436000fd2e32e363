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

from app.ops import kafka
from app.ops.kafka import bootstrap_servers
from app.ops.logs import setup_json_logging
from app.settings import Settings

log = logging.getLogger(__name__)

RECORD_OVERHEAD_BYTES = 1024
"""Kafka's record and batch headers plus the key, kept free below a topic's max.message.bytes by whatever
sizes a record to fit (a minute, a dead letter)."""


def topic_names(settings: Settings) -> list[str]:
    return [settings.observations_topic, settings.metrics_topic, settings.dlq_topic, settings.sink_dlq_topic,
            f"{settings.app_id}-windows-changelog",
            settings.alerts_topic, settings.autoscale_topic, settings.policy_commands_topic,
            f"{settings.app_id}-monitors-changelog", f"{settings.app_id}-autoscale-changelog",
            f"{settings.app_id}-rollups-changelog", settings.checkpoints_topic]


def topic_configs(settings: Settings, topic: str) -> dict[str, str]:
    """Explicit ``max.message.bytes``, so no broker default decides which minute is refused: a minute is kept
    below ``minute_max_bytes`` (agents/aggregate.py), under ``topic_max_message_bytes``; changelogs (window
    state, rollups) get ``changelog_max_message_bytes``, the producer's max_request_size (app/app.py). Changelogs
    and checkpoints keep only the latest value per key, so a new node recovers state, not the whole history."""
    if topic.endswith("-changelog"):
        return {"cleanup.policy": "compact", "max.message.bytes": str(settings.changelog_max_message_bytes)}
    configs = {"max.message.bytes": str(settings.topic_max_message_bytes)}
    if topic == settings.checkpoints_topic:
        configs["cleanup.policy"] = "compact"
    return configs


async def ensure_topics(bootstrap: str, settings: Settings) -> list[str]:
    """Create missing topics; returns the names created. Existing topics are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka.client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topic_names(settings) if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # created concurrently by another process
                await admin.create_topics([NewTopic(t, settings.partitions, settings.replication_factor,
                                                    topic_configs=topic_configs(settings, t))
                                           for t in missing])
            log.info("created topics %s with %d partitions", missing, settings.partitions)
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
    servers = bootstrap_servers(settings.broker_url)
    created = asyncio.run(ensure_topics(",".join(servers), settings))
    log.info("topics ready on %s (created: %s)", ",".join(servers), ", ".join(created) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Creating the pipeline's topics with the right partition counts before anything produces to them.

A producer that writes first makes the broker auto-create a topic with its default partition count, and
the window table's changelog must have exactly as many partitions as ``observations`` (Faust refuses to
run otherwise). ``python -m app local``, the tests and deployments run this first.
"""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from app import kafka
from app.settings import Settings

log = logging.getLogger(__name__)


def topic_names(settings: Settings) -> list[str]:
    return [settings.observations_topic, settings.metrics_topic, settings.dlq_topic, settings.sink_dlq_topic,
            f"{settings.app_id}-windows-changelog",
            settings.alerts_topic, settings.autoscale_topic, settings.policy_commands_topic,
            f"{settings.app_id}-monitors-changelog", f"{settings.app_id}-autoscale-changelog",
            f"{settings.app_id}-rollups-changelog"]


async def ensure_topics(bootstrap: str, settings: Settings) -> list[str]:
    """Create missing topics; returns the names created. Existing topics are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka.client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topic_names(settings) if t not in existing]
        if missing:
            try:
                await admin.create_topics([NewTopic(t, settings.partitions, settings.replication_factor,
                                                    # changelogs keep only the latest value per key, so a
                                                    # new node recovers state, not the whole history
                                                    topic_configs={"cleanup.policy": "compact"}
                                                    if t.endswith("-changelog") else {})
                                           for t in missing])
            except TopicAlreadyExistsError:
                pass  # created concurrently by another process
            log.info("created topics %s with %d partitions", missing, settings.partitions)
        return missing
    finally:
        await admin.close()

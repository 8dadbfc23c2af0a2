"""Creating the Kafka topics feedret needs, idempotently."""

from __future__ import annotations

import structlog
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from feedret.config import KafkaConfig

log = structlog.get_logger(__name__)


def required_topics(kafka: KafkaConfig, num_shards: int) -> dict[str, int]:
    """Topic name -> partitions. The post-vector topic has exactly one partition per shard."""
    return {
        kafka.posts_topic: kafka.posts_partitions,
        kafka.vectors_topic: num_shards,
        kafka.dlq_topic: 1,
    }


def ensure_topics(kafka: KafkaConfig, num_shards: int, replication_factor: int = 1) -> None:
    """Create missing topics; refuse to run against a post-vector topic of the wrong width."""
    wanted = required_topics(kafka, num_shards)
    admin = KafkaAdminClient(**kafka.client_options(), client_id="feedret-topics")
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, partitions, replication_factor)
            for name, partitions in wanted.items()
            if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # raced with another process creating it: fine
            log.info("topics_created", topics={t.name: t.num_partitions for t in missing})
        described = {d.get("name", d.get("topic")): len(d["partitions"]) for d in admin.describe_topics([kafka.vectors_topic])}
        have = described.get(kafka.vectors_topic)
        if have is not None and have != num_shards:
            raise RuntimeError(
                f"topic {kafka.vectors_topic!r} has {have} partitions but there are {num_shards} shards"
            )
    finally:
        admin.close()

"""Creating the Kafka topics feedret needs, idempotently, and reading a consumer group's offsets."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from feedret.config import KafkaConfig

log = structlog.get_logger(__name__)


# How long Kafka keeps a post's tombstone after compaction has dropped the post's earlier
# records: a replica restoring a snapshot older than this could miss the tombstone and keep
# the deleted post, so shards ignore older snapshots (ShardConfig.snapshot_max_age_s: 6 days).
DELETE_RETENTION_MS = 7 * 24 * 3600 * 1000
# The post-vector topic: compacted (a post's newest record is its whole state; deletes are
# tombstones), never expiring by age. k8s/base/kafka-topics.yaml says the same for Strimzi.
VECTORS_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "retention.ms": "-1",
    "delete.retention.ms": str(DELETE_RETENTION_MS),
}


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
            NewTopic(name, partitions, replication_factor,
                     topic_configs=VECTORS_TOPIC_CONFIG if name == kafka.vectors_topic else {})
            for name, partitions in wanted.items()
            if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # raced with another process creating it: fine
            log.info("topics_created", topics={t.name: t.num_partitions for t in missing})
        have = _partitions(admin, kafka.vectors_topic)
        if have is not None and have != num_shards:
            raise RuntimeError(
                f"topic {kafka.vectors_topic!r} has {have} partitions but there are {num_shards} shards"
            )
    finally:
        admin.close()


def topic_partitions(kafka: KafkaConfig, topic: str) -> int | None:
    """How many partitions `topic` has; None when it does not exist (it is not created)."""
    admin = KafkaAdminClient(**kafka.client_options(), client_id="feedret-topics")
    try:
        return _partitions(admin, topic) if topic in set(admin.list_topics()) else None
    finally:
        admin.close()


def _partitions(admin: KafkaAdminClient, topic: str) -> int | None:
    described = {d.get("name", d.get("topic")): len(d["partitions"]) for d in admin.describe_topics([topic])}
    return described.get(topic)


def end_offsets(kafka: KafkaConfig, topic: str) -> dict[int, int]:
    """Each partition's end offset ({} when the topic does not exist). The embedded broker
    answers ListOffsets with where the last record batch starts, which can be short of the end."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**kafka.client_options(), group_id=None, enable_auto_commit=False,
                             client_id="feedret-offsets")
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in partitions]) if partitions else {}
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        consumer.close()


@dataclass(frozen=True)
class GroupOffset:
    """A consumer group's committed offset on one partition."""

    topic: str
    partition: int
    offset: int


def group_offsets(kafka: KafkaConfig, group: str | None = None, timeout_s: float = 3.0) -> list[GroupOffset]:
    """The committed offsets of `group` (default: the embedding consumer's), by topic and partition.

    For operators (`feedret stats`), not for the serving path: the root answers for
    the index only and never reads Kafka; the consumer exports its lag as a metric.
    An unreachable broker gives [] within about `timeout_s` (kafka-python >= 2.1
    would otherwise wait 30 s for it).
    """
    group = group or kafka.consumer_group
    timeout_ms = int(timeout_s * 1000)
    fast = {"bootstrap_timeout_ms": timeout_ms} if "bootstrap_timeout_ms" in KafkaAdminClient.DEFAULT_CONFIG else {}
    try:
        admin = KafkaAdminClient(**kafka.client_options(), client_id="feedret-offsets",
                                 request_timeout_ms=timeout_ms, **fast)
    except Exception as exc:  # noqa: BLE001 - offsets are informational: no broker, none to show
        log.warning("group_offsets_unavailable", group=group, error=str(exc))
        return []
    try:
        answer = admin.list_group_offsets(group)
    except Exception as exc:  # noqa: BLE001
        log.warning("group_offsets_unavailable", group=group, error=str(exc))
        return []
    finally:
        admin.close()
    # kafka-python >= 2.3 answers {group: {partition: offset}}; earlier ones, the inner dict.
    committed = answer.get(group, answer) if isinstance(answer, dict) else {}
    return sorted(
        (GroupOffset(tp.topic, tp.partition, om.offset) for tp, om in committed.items()),
        key=lambda o: (o.topic, o.partition),
    )

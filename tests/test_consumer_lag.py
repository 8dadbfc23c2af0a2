"""The consumer's lag gauge keeps moving while its batches fail, and says when it last committed.

Lag used to be set only after a commit, so a consumer failing the same batch over and
over (a broken GPU, a vector topic refusing writes) reported the lag of its last success
while the posts topic grew behind it.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from kafka import TopicPartition
from prometheus_client import REGISTRY

from feedret.clients.publish import publish_lines
from feedret.config import ConsumerConfig, KafkaConfig
from feedret.consumer import metrics
from feedret.consumer.service import EmbeddingConsumer, _ForgetRevokedLag
from feedret.topics import ensure_topics

from conftest import sample_lines, tansu_broker, wait_for


class SwitchableEncoder:
    """Embeds (random unit vectors: this test is about offsets, not quality) unless broken."""

    model_version = "test"

    def __init__(self) -> None:
        self.broken = threading.Event()
        self.calls = 0

    def embed_posts(self, posts) -> np.ndarray:
        self.calls += 1
        if self.broken.is_set():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        v = np.random.default_rng(len(posts)).standard_normal((len(posts), 8)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def lag_total() -> float:
    return sum(
        s.value
        for family in REGISTRY.collect() if family.name == "feedret_consumer_lag_records"
        for s in family.samples
    )


def last_commit() -> float:
    return REGISTRY.get_sample_value("feedret_consumer_last_commit_timestamp_seconds") or 0.0


@pytest.fixture()
def broker():
    with tansu_broker() as bootstrap:
        kafka = KafkaConfig(bootstrap_servers=bootstrap)
        ensure_topics(kafka, 2)
        yield kafka


def test_lag_grows_while_a_batch_keeps_failing_and_clears_once_it_commits(broker):
    encoder = SwitchableEncoder()
    encoder.broken.set()
    consumer = EmbeddingConsumer(broker, ConsumerConfig(num_shards=2, batch_max_wait_ms=20, metrics_port=0), encoder)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        metrics.CONSUMER_LAST_COMMIT.set(0)
        publish_lines(broker, sample_lines(5))
        assert wait_for(lambda: lag_total() == 5 and encoder.calls >= 2, timeout=60), lag_total()
        # More posts arrive behind the stuck batch: the gauge follows them, no commit needed.
        publish_lines(broker, sample_lines(9)[5:])
        assert wait_for(lambda: lag_total() == 9, timeout=60), lag_total()
        assert last_commit() == 0 and consumer.stats["batches"] == 0
        # The model failing on every post is nobody's record's fault: nothing is dead-lettered.
        assert consumer.stats["dead_letters"] == 0

        healed_at = time.time()
        encoder.broken.clear()
        assert wait_for(lambda: lag_total() == 0 and consumer.stats["embedded"] == 9, timeout=60), (
            lag_total(), consumer.stats)
        assert last_commit() >= healed_at - 1
        assert consumer.stats["dead_letters"] == 0
    finally:
        stop.set()
        thread.join(timeout=30)


def test_a_revoked_partition_stops_reporting_lag_here():
    metrics.CONSUMER_LAG.labels(partition="6").set(12)
    metrics.CONSUMER_LAG.labels(partition="7").set(3)
    _ForgetRevokedLag().on_partitions_revoked({TopicPartition("posts", 6)})
    assert REGISTRY.get_sample_value("feedret_consumer_lag_records", {"partition": "6"}) is None
    assert REGISTRY.get_sample_value("feedret_consumer_lag_records", {"partition": "7"}) == 3
    metrics.forget_consumer_partitions([7])


class GatedEncoder(SwitchableEncoder):
    """Embeds one batch per permit, so a test can look at the lag between batches."""

    def __init__(self) -> None:
        super().__init__()
        self.permits = threading.Semaphore(0)
        self.waiting = threading.Event()

    def embed_posts(self, posts) -> np.ndarray:
        self.waiting.set()
        self.permits.acquire()
        self.waiting.clear()
        return super().embed_posts(posts)


def broker_lag(kafka: KafkaConfig, ends: dict[int, int]) -> dict[int, int]:
    """End offsets (as the broker acknowledged the records) minus the group's committed offsets, per partition."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    try:
        offsets = admin.list_group_offsets(kafka.consumer_group)
        committed = offsets.get(kafka.consumer_group, offsets)  # kafka-python 3 nests them by group
    finally:
        admin.close()
    return {p: end - (committed[TopicPartition(kafka.posts_topic, p)].offset
                      if TopicPartition(kafka.posts_topic, p) in committed else 0)
            for p, end in ends.items()}


def gauge_lag() -> dict[int, int]:
    return {int(s.labels["partition"]): int(s.value)
            for family in REGISTRY.collect() if family.name == "feedret_consumer_lag_records"
            for s in family.samples}


def test_the_lag_gauge_equals_end_minus_committed_offsets_through_a_backlog(broker):
    """It read 448 against a true lag of 7,085 during a backlog, and 0 for a partition 590 behind:
    it came from high watermarks of old fetches, and only for partitions in the batch at hand."""
    from kafka import KafkaProducer

    encoder = GatedEncoder()
    config = ConsumerConfig(num_shards=2, batch_max_size=16, batch_max_wait_ms=20, metrics_port=0, lag_refresh_ms=0)
    consumer = EmbeddingConsumer(broker, config, encoder)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=0)
    ends: dict[int, int] = {}

    def produce(first: int, n: int) -> None:
        # One record per produce request: the embedded broker's ListOffsets reports where the
        # last record batch starts, not the partition's end as Kafka does, so only single-record
        # batches make its answer the true end (the gauge takes the larger of it and the fetch
        # answers' high watermark, which tansu reports right).
        for i in range(first, first + n):
            value = f'{{"post_id": {i}, "author_id": "a", "text": "t{i}", "created_at": 1}}'.encode()
            meta = producer.send(broker.posts_topic, key=str(i).encode(), value=value).get(timeout=30)
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)

    try:
        produce(0, 200)
        thread.start()
        for round_ in range(4):
            assert encoder.waiting.wait(60)  # a batch is in, blocked: nothing commits meanwhile
            if round_ == 2:
                produce(200, 150)  # the topic grows behind the backlog
                done = consumer.stats["batches"]
                encoder.permits.release()
                assert wait_for(lambda: consumer.stats["batches"] > done and encoder.waiting.is_set(), 60)
            expected = broker_lag(broker, ends)
            assert len(expected) == 4 and sum(expected.values()) > 0
            assert wait_for(lambda: gauge_lag() == expected, timeout=10), (gauge_lag(), expected)
            done = consumer.stats["batches"]
            encoder.permits.release()
            assert wait_for(lambda: consumer.stats["batches"] > done, 60)
    finally:
        stop.set()
        for _ in range(1000):
            encoder.permits.release()
        thread.join(timeout=30)
        producer.close()

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

from feedret import metrics
from feedret.clients.publish import publish_lines
from feedret.config import ConsumerConfig, KafkaConfig
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

        healed_at = time.time()
        encoder.broken.clear()
        assert wait_for(lambda: lag_total() == 0 and consumer.stats["embedded"] == 9, timeout=60), (
            lag_total(), consumer.stats)
        assert last_commit() >= healed_at - 1
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

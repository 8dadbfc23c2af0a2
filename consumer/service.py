"""The embedding consumer: `posts` -> embed in micro-batches -> post-vector topic, one partition per shard.

Delivery is at-least-once: the `posts` offsets of a batch are committed only
after every vector and dead letter it produced is acknowledged by the broker.
A crash in between replays the batch; shards apply upserts idempotently.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Protocol, Sequence

import numpy as np
import structlog
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from feedret.consumer import metrics
from feedret.config import ConsumerConfig, KafkaConfig
from feedret.consumer.batch import SourceRecord, dead_letter, embed_batch, first_offsets, next_offsets
from feedret.consumer.lag import PartitionLag
from feedret.events import PostEvent

log = structlog.get_logger(__name__)


class PostEmbedder(Protocol):
    model_version: str

    def embed_posts(self, posts: Sequence[PostEvent]) -> np.ndarray: ...


class TopicNotReady(Exception):
    """The post-vector topic does not exist (yet: it may be being created)."""


class _ForgetRevokedLag(ConsumerRebalanceListener):
    """A revoked partition's lag gauge would otherwise stay frozen at its last value here
    while its new owner reports it too, and a sum over consumers would count it twice."""

    def __init__(self, lag: PartitionLag | None = None) -> None:
        self.lag = lag

    def on_partitions_revoked(self, revoked) -> None:
        metrics.forget_consumer_partitions(tp.partition for tp in revoked)
        if self.lag is not None:
            self.lag.revoked(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        pass


class EmbeddingConsumer:
    def __init__(
        self,
        kafka: KafkaConfig,
        config: ConsumerConfig,
        encoder: PostEmbedder,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kafka = kafka
        self.config = config
        self.encoder = encoder
        self.clock = clock
        self.stats = {"batches": 0, "embedded": 0, "deletes": 0, "dead_letters": 0}
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._lag: PartitionLag | None = None

    # ------------------------------------------------------------ set-up

    # The broker or the topics may come up after us (a pod starting beside Kafka):
    # retry with backoff for a minute, then fail loudly.
    @retry(
        retry=retry_if_exception_type((KafkaError, TopicNotReady)),
        wait=wait_exponential(multiplier=0.2, max=5),
        stop=stop_after_delay(60),
        reraise=True,
        before_sleep=lambda state: log.warning("kafka_not_ready_retrying", error=str(state.outcome.exception())),
    )
    def _connect(self) -> None:
        self.close()
        k = self.kafka
        self._producer = KafkaProducer(
            **k.client_options(),
            acks="all",
            linger_ms=5,
            # One in flight keeps a post's events in order across retries.
            max_in_flight_requests_per_connection=1,
            retries=5,
            client_id="feedret-consumer",
            metrics_enabled=False,  # kafka-python's own sensors: never read, feedret exports its own
        )
        partitions = self._producer.partitions_for(k.vectors_topic)
        if partitions is None:
            raise TopicNotReady(f"topic {k.vectors_topic!r} does not exist")
        if len(partitions) != self.config.num_shards:
            raise RuntimeError(
                f"topic {k.vectors_topic!r} has {len(partitions or ())} partitions but "
                f"num_shards={self.config.num_shards}; they must be equal (one partition per shard)"
            )
        self._consumer = KafkaConsumer(
            **k.client_options(),
            group_id=k.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms,
            max_poll_records=self.config.batch_max_size,
            fetch_max_wait_ms=k.fetch_max_wait_ms,
            client_id="feedret-consumer",
            metrics_enabled=False,
        )
        self._lag = PartitionLag(self._consumer, self.config.lag_refresh_ms / 1000)
        self._consumer.subscribe([k.posts_topic], listener=_ForgetRevokedLag(self._lag))

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None

    # ------------------------------------------------------------ loop

    def _next_batch(self, stop: threading.Event) -> list[SourceRecord]:
        """Up to batch_max_size records, waiting at most batch_max_wait_ms after the first,
        and closing early when no record came for batch_linger_ms."""
        assert self._consumer is not None
        batch: list[SourceRecord] = []
        deadline: float | None = None
        max_size = self.config.batch_max_size
        while len(batch) < max_size and not stop.is_set():
            if deadline is None:
                timeout_ms = 200
            else:
                timeout_ms = int((deadline - time.monotonic()) * 1000)
                if timeout_ms <= 0:
                    break
                timeout_ms = min(timeout_ms, self.config.batch_linger_ms)
            polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_size - len(batch))
            got = [SourceRecord.of(r) for records in polled.values() for r in records]
            if not got and deadline is not None:
                break  # a quiet gap: more posts are not on their way
            batch.extend(got)
            if batch and deadline is None:
                deadline = time.monotonic() + self.config.batch_max_wait_ms / 1000
        return batch

    def process(self, batch: Sequence[SourceRecord]) -> None:
        """Embed, produce, wait for acks, then commit.

        A record the encoder cannot take is dead-lettered with the error and the rest
        of the batch goes on (`embed_isolating`). Raises, so that the batch is retried
        and nothing is committed, when a produce fails or the model fails on every
        post (EncoderFailure): neither is any record's fault.
        """
        assert self._producer is not None and self._consumer is not None
        out = embed_batch(batch, self.encoder.embed_posts, self.encoder.model_version, self.config.num_shards, self.clock)
        bad = out.bad
        futures = [self._producer.send(self.kafka.vectors_topic, key=key, value=value, partition=partition)
                   for partition, key, value in out.records]
        for b in bad:
            key, value, headers = dead_letter(b)
            futures.append(
                self._producer.send(self.kafka.dlq_topic, key=key, value=value, headers=headers)
            )
            log.warning(
                "dead_letter",
                reason=b.reason[:300],
                partition=b.source.partition,
                offset=b.source.offset,
                key=b.source.key[:64].decode("utf-8", "replace") if b.source.key else None,
            )
        self._producer.flush()
        for f in futures:
            f.get(timeout=30)  # raises on a failed delivery: the batch is not committed
        committed = next_offsets(batch)
        self._consumer.commit(
            {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in committed.items()}
        )
        metrics.observe_consumer_batch(
            records=len(batch),
            upserts=out.upserts,
            deletes=out.deletes,
            embed_seconds=out.embed_s if out.upserts else None,
            partitions=[partition for partition, _, _ in out.records],
            dead_letter_reasons=[b.kind for b in bad],
        )
        metrics.CONSUMER_LAST_COMMIT.set_to_current_time()
        if self._lag is not None:
            self._lag.committed(committed)
            self._lag.update()
        self.stats["batches"] += 1
        self.stats["embedded"] += out.upserts
        self.stats["deletes"] += out.deletes
        self.stats["dead_letters"] += len(bad)
        log.info(
            "batch_done",
            records=len(batch),
            embedded=out.upserts,
            deletes=out.deletes,
            dead_letters=len(bad),
            embed_ms=round(out.embed_s * 1000, 1),
            post_ids=out.post_ids[:8],
        )

    def _rewind(self, batch: Sequence[SourceRecord]) -> None:
        """Seek back to the first offset of the failed batch so it is processed again."""
        assert self._consumer is not None
        for (t, p), off in first_offsets(batch).items():
            try:
                self._consumer.seek(TopicPartition(t, p), off)
            except Exception as exc:  # noqa: BLE001
                # Revoked by a rebalance meanwhile: its new owner starts from the last
                # commit, which predates this batch, so nothing is lost.
                log.warning("rewind_skipped", topic=t, partition=p, offset=off, error=str(exc))

    def run(self, stop: threading.Event) -> None:
        self._connect()
        log.info(
            "consumer_started",
            topic=self.kafka.posts_topic,
            group=self.kafka.consumer_group,
            vectors_topic=self.kafka.vectors_topic,
            num_shards=self.config.num_shards,
            model_version=self.encoder.model_version,
        )
        backoff = 0.5
        try:
            while not stop.is_set():
                batch = self._next_batch(stop)
                if self._lag is not None:
                    self._lag.update()  # also while idle or failing: the end keeps moving
                if not batch:
                    continue
                try:
                    self.process(batch)
                    backoff = 0.5
                except Exception:
                    metrics.CONSUMER_BATCH_FAILURES.inc()
                    log.exception("batch_failed_retrying", records=len(batch), backoff_s=backoff)
                    self._rewind(batch)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
        finally:
            self.close()
            log.info("consumer_stopped", **self.stats)

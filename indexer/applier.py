"""The thread that feeds a replica: reads its shard's partition of the post-vector topic and applies it.

The partition is read by manual assignment (no consumer group): a shard owns
exactly one partition, and every replica of it reads the whole of it, from the
replica's applied offset (0, or a restored snapshot's) to the end and on.

Records are decoded by `decode(key, value)` (feedret.vector_events.decode_record, the
consumer's own format, tombstones as deletes, unless told otherwise) into a `VectorEvent`
(feedret.indexer.replica); one that raises `UndecodableRecord` is counted as rejected and
skipped, never retried.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import structlog
from kafka import KafkaConsumer, TopicPartition

from feedret.indexer import metrics
from feedret.config import KafkaConfig
from feedret.indexer.replica import ShardState, VectorEvent
from feedret.indexer.shard_index import IndexConfigError
from feedret.vector_events import UndecodableRecord, decode_record

log = structlog.get_logger(__name__)


class CatchUp:
    """When a replica has caught up with its partition: read up to the end it saw at start.

    The end is the larger of the broker's end offset asked at start (ListOffsets)
    and the high watermark of the first fetch answer. Either alone misleads: the
    embedded broker's ListOffsets reports where the last batch starts, not where
    it ends, and a first poll often returns nothing before any fetch has answered
    (no high watermark yet) however long the backlog is.
    """

    def __init__(self, listed_end: int) -> None:
        self.listed_end = listed_end
        self.target: int | None = None

    def observe(self, position: int, highwater: int | None) -> bool:
        """True once `position` (the next offset to read) has reached the end seen at start."""
        if self.target is None:
            if highwater is None:
                return False  # no fetch has answered yet: the end is not known
            self.target = max(highwater, self.listed_end)
        return position >= self.target


class PartitionApplier(threading.Thread):
    """Reads the shard's post-vector partition from the replica's applied offset and applies it.

    on_caught_up runs once, when everything on the partition at start is applied
    (CatchUp): the replica reports SERVING from then on. on_fatal runs when the
    configured index cannot take the partition's vectors (IndexConfigError); the
    thread then ends. Any other failure reconnects after a second.
    """

    def __init__(
        self,
        kafka: KafkaConfig,
        state: ShardState,
        on_caught_up: Callable[[], None],
        on_fatal: Callable[[str], None] = lambda reason: None,
        *,
        decode: Callable[[bytes | None, bytes | None], VectorEvent] = decode_record,
    ) -> None:
        super().__init__(name=f"applier-{state.config.shard_id}", daemon=True)
        self.kafka = kafka
        self.state = state
        self.decode = decode
        self.on_caught_up = on_caught_up
        self.on_fatal = on_fatal
        self.stop_event = threading.Event()
        self.caught_up = False

    def run(self) -> None:
        cfg = self.state.config
        tp = TopicPartition(self.kafka.vectors_topic, cfg.shard_id)
        while not self.stop_event.is_set():
            try:
                consumer = KafkaConsumer(
                    **self.kafka.client_options(),
                    group_id=None,
                    enable_auto_commit=False,
                    # An offset the topic's retention already dropped (an old snapshot's, or 0):
                    # replay what is left rather than jump to the end and miss it.
                    auto_offset_reset="earliest",
                    max_poll_records=cfg.apply_batch_max,
                    fetch_max_wait_ms=self.kafka.fetch_max_wait_ms,
                    client_id=f"feedret-shard-{cfg.shard_id}",
                    # kafka-python's own sensors (per fetch, per record batch) are never read:
                    # feedret exports its own. Off, an idle shard's fetch loop costs ~10% less CPU.
                    metrics_enabled=False,
                )
                consumer.assign([tp])
                if self.state.verify_position:
                    self.verify_snapshot_position(consumer, tp)
                consumer.seek(tp, self.state.applied_offset)
                log.info("applier_started", topic=tp.topic, partition=tp.partition, offset=self.state.applied_offset)
                try:
                    self._loop(consumer, tp)
                finally:
                    consumer.close()
            except IndexConfigError as exc:
                # The configured index cannot serve these vectors: retrying cannot help.
                log.error("index_config_invalid", error=str(exc))
                self.on_fatal(str(exc))
                return
            except Exception:  # noqa: BLE001 - reconnect rather than stop serving
                log.exception("applier_failed_reconnecting")
                self.stop_event.wait(1.0)

    def verify_snapshot_position(self, consumer: Any, tp: TopicPartition, timeout_s: float = 10.0) -> bool:
        """Check that the record a restored snapshot ended on is still on the partition.

        If the topic was deleted and recreated, the snapshot holds posts that are gone
        and its offset means nothing (seeking there could skip new posts): then the
        shard resets and replays from the start. End offsets cannot decide this (the
        embedded broker reports batch starts); the record itself can. False on reset.

        On a compacted topic that record may be gone for a good reason: its post was
        upserted or deleted again later, and compaction kept only the newer record. The
        next record then sits past the snapshot's offset, which a recreated topic (dense
        offsets from 0, shorter or holding another post there) does not show; so a record
        found after the expected offset counts as the same partition, compacted.
        """
        state = self.state
        state.verify_position = False
        offset, post_id = state.position
        if offset == 0 or post_id is None:
            return True  # nothing to compare with (the snapshot ended on an undecodable record)
        consumer.seek(tp, offset - 1)
        found: tuple[int, int | None] | None = None
        deadline = time.monotonic() + timeout_s
        while found is None and time.monotonic() < deadline and not self.stop_event.is_set():
            records = consumer.poll(timeout_ms=200).get(tp, [])
            if records:
                try:
                    found = (records[0].offset, self.decode(records[0].key, records[0].value).post_id)
                except UndecodableRecord:
                    found = (records[0].offset, None)
        if found == (offset - 1, post_id):
            log.info("snapshot_position_verified", offset=offset, post_id=post_id)
            return True
        if found is not None and found[0] > offset - 1:
            log.info("snapshot_position_compacted", offset=offset, post_id=post_id, next_offset=found[0])
            return True
        log.error("snapshot_not_on_partition", offset=offset, post_id=post_id, found=found)
        state.reset()
        return False

    def _loop(self, consumer: KafkaConsumer, tp: TopicPartition) -> None:
        catch_up = None
        if not self.caught_up:
            catch_up = CatchUp(consumer.end_offsets([tp]).get(tp) or 0)
            log.info("shard_catching_up", offset=self.state.applied_offset, listed_end=catch_up.listed_end)
        while not self.stop_event.is_set():
            polled = consumer.poll(timeout_ms=100)
            records = polled.get(tp, [])
            events: list[tuple[int, VectorEvent]] = []
            for rec in records:
                try:
                    ev = self.decode(rec.key, rec.value)
                except UndecodableRecord as exc:
                    self.state.count_rejected("undecodable")
                    log.error("vector_record_undecodable", offset=rec.offset, error=str(exc))
                    continue
                events.append((rec.offset, ev))
            self.state.end_offset = consumer.highwater(tp)
            if records:
                with metrics.timed_apply(self.state.config.shard_id, len(records)):
                    self.state.apply(events, time.time())
                # Undecodable records at the tail still advance the position.
                if records[-1].offset + 1 != self.state.applied_offset:  # the tail was undecodable
                    self.state.applied_offset = records[-1].offset + 1
                    self.state.position = (self.state.applied_offset, None)
                log.debug("applied", records=len(records), offset=self.state.applied_offset)
            if catch_up is not None and catch_up.observe(consumer.position(tp), self.state.end_offset):
                catch_up = None
                self.caught_up = True
                self.on_caught_up()

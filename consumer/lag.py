"""The consumer's lag per `posts` partition, as Kafka's own tools count it: end offset minus committed offset.

Asked of the broker, not read off fetch answers: during a backlog the consumer works
through records fetched a while ago, and the high watermark those answers carried
falls ever further behind the partition's real end (the gauge read 448 against a
true lag of 7,085). Partitions the consumer owns but had no record from in a batch
are counted too, so a partition left behind never reads 0.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping, Protocol

import structlog
from kafka import TopicPartition
from kafka.errors import KafkaError

from feedret.consumer import metrics

log = structlog.get_logger(__name__)


class OffsetSource(Protocol):
    """The parts of kafka-python's KafkaConsumer this needs."""

    def assignment(self) -> set[TopicPartition]: ...
    def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    def committed(self, partition: TopicPartition) -> int | None: ...
    def highwater(self, partition: TopicPartition) -> int | None: ...


class PartitionLag:
    """Keeps the lag gauge equal to end offset minus committed offset for every owned partition.

    `committed` is told of each commit this consumer makes; for a partition it has not
    committed yet, the group's committed offset is asked once (none: the partition's
    beginning, where the group starts reading). End offsets are asked at most every
    `refresh_s` (a ListOffsets request); in between the gauge follows commits against the
    last ends asked, which only ever raise. Runs on the consumer's own thread:
    KafkaConsumer is not thread-safe.
    """

    def __init__(self, source: OffsetSource, refresh_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.source = source
        self.refresh_s = refresh_s
        self.clock = clock
        self._ends: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._asked_at = float("-inf")

    def committed(self, offsets: Mapping[tuple[str, int], int]) -> None:
        for (topic, partition), offset in offsets.items():
            self._committed[TopicPartition(topic, partition)] = offset

    def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._committed.pop(tp, None)
            self._ends.pop(tp, None)

    def update(self, force: bool = False) -> dict[int, int]:
        """Set the gauge for every owned partition; returns {partition: lag} as set."""
        owned = sorted(self.source.assignment(), key=lambda tp: (tp.topic, tp.partition))
        if not owned:
            return {}
        try:
            if force or self.clock() - self._asked_at >= self.refresh_s:
                self._asked_at = self.clock()
                for tp, end in self.source.end_offsets(owned).items():
                    self._ends[tp] = max(end, self._ends.get(tp, 0))
            unknown = [tp for tp in owned if tp not in self._committed]
            if unknown:
                beginnings = self.source.beginning_offsets(unknown)
                for tp in unknown:
                    group = self.source.committed(tp)
                    self._committed[tp] = group if group is not None else beginnings.get(tp, 0)
        except KafkaError as exc:
            # The gauge keeps its last values; the next batch asks again.
            log.warning("lag_offsets_unavailable", error=str(exc))
            return {}
        lags = {}
        for tp in owned:
            # A fetch answer's high watermark can be newer than the ends last asked.
            end = max(self._ends.get(tp, 0), self.source.highwater(tp) or 0)
            self._ends[tp] = end
            lags[tp.partition] = max(end - self._committed[tp], 0)
        metrics.set_consumer_lag(lags)
        return lags

"""Pure steps of the embedding consumer: split a micro-batch, build the records it produces.

Kept free of Kafka clients and models so each step is testable on its own.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from feedret.events import InvalidEvent, PostEvent, parse_post_event
from feedret.routing import shard_of
from feedret.v1 import feedret_pb2 as pb


@dataclass(frozen=True)
class SourceRecord:
    """The parts of a Kafka record the consumer needs (kafka-python's ConsumerRecord has them)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @classmethod
    def of(cls, record: Any) -> "SourceRecord":
        return cls(record.topic, record.partition, record.offset, record.key, record.value)


@dataclass(frozen=True)
class Good:
    source: SourceRecord
    event: PostEvent


@dataclass(frozen=True)
class Bad:
    source: SourceRecord
    reason: str
    # The reason in a word from a fixed set (InvalidEvent.kind, tombstone, key_mismatch): a metric label.
    kind: str


def split_batch(records: Sequence[SourceRecord]) -> tuple[list[Good], list[Bad]]:
    """Parse every record; a bad one never stops the good ones around it."""
    good: list[Good] = []
    bad: list[Bad] = []
    for rec in records:
        if rec.value is None:
            bad.append(Bad(rec, "empty record value (tombstone); send an event with op=delete instead", "tombstone"))
            continue
        try:
            event = parse_post_event(rec.value)
        except InvalidEvent as exc:
            bad.append(Bad(rec, str(exc), exc.kind))
            continue
        if rec.key is not None and rec.key != str(event.post_id).encode():
            # Keys decide the `posts` partition and so the order of a post's events;
            # a mismatched key could reorder an upsert and its delete.
            bad.append(Bad(rec, f"record key {rec.key!r} does not match post_id {event.post_id}", "key_mismatch"))
            continue
        good.append(Good(rec, event))
    return good, bad


def dead_letter(bad: Bad) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) for the dead-letter topic: the reason plus the original bytes."""
    src = bad.source
    value = src.value or b""
    body = {
        "reason": bad.reason,
        "topic": src.topic,
        "partition": src.partition,
        "offset": src.offset,
        "key": src.key.decode("utf-8", "replace") if src.key is not None else None,
        "value": value.decode("utf-8", "replace"),
        # The text above is lossy for non-UTF-8 input; this is not.
        "value_b64": base64.b64encode(value).decode("ascii"),
        "failed_at": time.time(),
    }
    headers = [("feedret-reason", bad.reason.encode("utf-8"))]
    return src.key, json.dumps(body).encode("utf-8"), headers


def vector_event(
    good: Good, vector: np.ndarray | None, model_version: str, embedded_at: float
) -> pb.PostVectorEvent:
    ev = good.event
    msg = pb.PostVectorEvent(
        post_id=ev.post_id,
        op=pb.PostVectorEvent.UPSERT if ev.op == "upsert" else pb.PostVectorEvent.DELETE,
        created_at=ev.created_at,
        lang=ev.lang,
        model_version=model_version,
        source_partition=good.source.partition,
        source_offset=good.source.offset,
        embedded_at=embedded_at,
    )
    if vector is not None:
        msg.vector.extend(vector.astype(np.float32).tolist())
    return msg


def route(post_id: int, num_shards: int) -> int:
    """The post-vector partition of a post: its shard."""
    return shard_of(post_id, num_shards)


def first_offsets(records: Sequence[SourceRecord]) -> dict[tuple[str, int], int]:
    """The lowest offset per partition in a batch: where to seek back to, and until its
    commit, the first record of that partition not yet done."""
    out: dict[tuple[str, int], int] = {}
    for rec in records:
        tp = (rec.topic, rec.partition)
        out[tp] = min(out.get(tp, rec.offset), rec.offset)
    return out


def next_offsets(records: Sequence[SourceRecord]) -> dict[tuple[str, int], int]:
    """Offsets to commit after a batch: one past the highest offset seen per partition."""
    out: dict[tuple[str, int], int] = {}
    for rec in records:
        tp = (rec.topic, rec.partition)
        out[tp] = max(out.get(tp, 0), rec.offset + 1)
    return out

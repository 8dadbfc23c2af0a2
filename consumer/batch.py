"""Pure steps of the embedding consumer: split a micro-batch, build the records it produces.

Kept free of Kafka clients and models so each step is testable on its own.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from feedret.events import DEFAULT_LIMITS, EventLimits, InvalidEvent, PostEvent, parse_post_event
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
    # The reason in a word from a fixed set (InvalidEvent.kind, tombstone, no_key, key_mismatch,
    # unreadable, embed_failed): a metric label.
    kind: str


def split_batch(
    records: Sequence[SourceRecord], limits: EventLimits = DEFAULT_LIMITS
) -> tuple[list[Good], list[Bad]]:
    """Parse every record; a bad one never stops the good ones around it."""
    good: list[Good] = []
    bad: list[Bad] = []
    for rec in records:
        if rec.value is None:
            bad.append(Bad(rec, "empty record value (tombstone); send an event with op=delete instead", "tombstone"))
            continue
        try:
            event = parse_post_event(rec.value, limits)
        except InvalidEvent as exc:
            bad.append(Bad(rec, str(exc), exc.kind))
            continue
        except Exception as exc:  # noqa: BLE001 - no record may stop the batch, whatever it holds
            bad.append(Bad(rec, f"could not be read: {type(exc).__name__}: {exc}", "unreadable"))
            continue
        if rec.key is None:
            # Kafka spreads keyless records over partitions, so a post's delete could be read
            # before its upsert and lost; the key is what keeps one post's events in order.
            bad.append(Bad(rec, f"record has no key; the key must be the post id ({event.post_id}) as "
                                "decimal text, so all of a post's events stay in order", "no_key"))
            continue
        if rec.key != str(event.post_id).encode():
            # Keys decide the `posts` partition and so the order of a post's events;
            # a mismatched key could reorder an upsert and its delete.
            bad.append(Bad(rec, f"record key {rec.key!r} does not match post_id {event.post_id}", "key_mismatch"))
            continue
        good.append(Good(rec, event))
    return good, bad


# The original bytes a dead letter carries (twice: as text and base64). A larger record
# would make the dead letter itself too large for the broker, and a dead letter the
# broker refuses would stop the batch; its coordinates still find the original on `posts`.
DEAD_LETTER_MAX_VALUE_BYTES = 256 * 1024
DEAD_LETTER_MAX_REASON_CHARS = 1000


def dead_letter(bad: Bad) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) for the dead-letter topic: the reason plus the original bytes."""
    src = bad.source
    value = src.value or b""
    kept = value[:DEAD_LETTER_MAX_VALUE_BYTES]
    reason = bad.reason[:DEAD_LETTER_MAX_REASON_CHARS]
    key = src.key[:DEAD_LETTER_MAX_VALUE_BYTES] if src.key is not None else None
    body = {
        "reason": reason,
        "kind": bad.kind,
        "topic": src.topic,
        "partition": src.partition,
        "offset": src.offset,
        "key": key.decode("utf-8", "replace") if key is not None else None,
        "value": kept.decode("utf-8", "replace"),
        # The text above is lossy for non-UTF-8 input; this is not.
        "value_b64": base64.b64encode(kept).decode("ascii"),
        "value_bytes": len(value),
        "value_truncated": len(kept) < len(value),
        "failed_at": time.time(),
    }
    # backslashreplace: a reason may quote text that is not valid Unicode.
    headers = [("feedret-reason", reason.encode("utf-8", "backslashreplace"))]
    return key, json.dumps(body).encode("utf-8"), headers


class EncoderFailure(Exception):
    """The encoder failed even on a post known to be sound: the model's fault, not any record's."""


@dataclass(frozen=True)
class Embedded:
    """What `embed_isolating` made of a list of posts, by position in that list."""

    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # why each of these could not be embedded


# Embedded when no post of a batch could be: if this fails too, the model is broken.
CANARY = PostEvent(post_id=0, op="upsert", author_id="feedret", text="A sound post to check the encoder with.",
                   created_at=0.0, lang="en")


def unsound_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows no shard would index: not finite, or no direction (zero)."""
    finite = np.isfinite(vectors).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0.0), axis=1)
    return ~finite | ~(norms > 0) | ~np.isfinite(norms)


def embed_isolating(
    posts: Sequence[PostEvent],
    embed: Callable[[Sequence[PostEvent]], np.ndarray],
    canary: PostEvent = CANARY,
) -> Embedded:
    """Embed posts in one pass; when a pass fails, halve it until the posts at fault stand alone.

    A post is at fault when a pass over it alone raises, or yields a vector that is
    not finite or is zero. The posts beside it are embedded all the same: one bad
    post in n costs about 2·log2(n) smaller passes. When no post at all could be
    embedded, `canary` (a post known to be sound) is tried: if it fails too, the
    model is at fault, not the posts, and EncoderFailure is raised so that the
    caller retries the batch instead of dead-lettering every post in it.
    """
    out = Embedded()

    def attempt(rows: list[int]) -> None:
        try:
            vectors = np.asarray(embed([posts[r] for r in rows]), dtype=np.float32)
            if vectors.ndim != 2 or len(vectors) != len(rows):
                raise ValueError(f"the encoder returned {vectors.shape} for {len(rows)} posts")
            unsound = unsound_rows(vectors)
        except Exception as exc:  # noqa: BLE001 - whatever a record makes the model raise
            if len(rows) == 1:
                out.failed[rows[0]] = f"{type(exc).__name__}: {exc}"
            else:
                attempt(rows[: len(rows) // 2])
                attempt(rows[len(rows) // 2 :])
            return
        for r, vector, bad in zip(rows, vectors, unsound):
            if not bad:
                out.vectors[r] = vector
        redo = [r for r, bad in zip(rows, unsound) if bad]
        if len(rows) == 1 and redo:
            out.failed[rows[0]] = "the encoder produced a vector that is not finite or is zero"
        elif len(redo) == len(rows):
            attempt(rows[: len(rows) // 2])
            attempt(rows[len(rows) // 2 :])
        elif redo:
            attempt(redo)  # alone or in smaller company, they may embed soundly

    if posts:
        attempt(list(range(len(posts))))
    if out.failed and not out.vectors:
        try:
            check = np.asarray(embed([canary]), dtype=np.float32)
            sound = check.shape == (1, check.shape[-1]) and not unsound_rows(check).any()
        except Exception as exc:  # noqa: BLE001
            raise EncoderFailure(f"the encoder fails on a sound post too: {type(exc).__name__}: {exc}") from exc
        if not sound:
            raise EncoderFailure("the encoder yields unsound vectors for a sound post too")
    return out


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


@dataclass(frozen=True)
class Outgoing:
    """A micro-batch made into what the post-vector topic gets, and what could not be."""

    # (partition, key, value) in source order, so a post's upsert and delete keep their order;
    # a delete's value is None: a tombstone, which compaction then drops with the post.
    records: list[tuple[int, bytes, bytes | None]]
    bad: list[Bad]
    upserts: int
    post_ids: list[int]  # of the records, in order
    embed_s: float

    @property
    def deletes(self) -> int:
        return len(self.records) - self.upserts


def embed_batch(
    records: Sequence[SourceRecord],
    embed: Callable[[Sequence[PostEvent]], np.ndarray],
    model_version: str,
    num_shards: int,
    clock: Callable[[], float] = time.time,
) -> Outgoing:
    """The consumer's step from post events to vector records: parse (split_batch), embed the
    upserts isolating posts the model fails on (embed_isolating; those join `bad`), and build
    each record keyed by post id on its shard's partition. Raises EncoderFailure."""
    good, bad = split_batch(records)
    upserts = [g for g in good if g.event.op == "upsert"]
    started = time.perf_counter()
    embedded = embed_isolating([g.event for g in upserts], embed)
    embed_s = time.perf_counter() - started
    failed = {id(upserts[i]) for i in embedded.failed}
    bad += [Bad(upserts[i].source, f"the encoder failed on this post: {why}", "embed_failed")
            for i, why in embedded.failed.items()]
    vectors = {id(upserts[i]): v for i, v in embedded.vectors.items()}
    now = clock()
    out: list[tuple[int, bytes, bytes | None]] = []
    post_ids: list[int] = []
    for g in good:
        if id(g) in failed:
            continue
        value = vector_event(g, vectors[id(g)], model_version, now).SerializeToString() if id(g) in vectors else None
        out.append((route(g.event.post_id, num_shards), str(g.event.post_id).encode(), value))
        post_ids.append(g.event.post_id)
    return Outgoing(out, bad, len(vectors), post_ids, embed_s)


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

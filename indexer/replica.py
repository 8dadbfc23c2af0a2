"""One shard replica's state: its index, how far it has read its partition, and the apply of vector events.

A replica reads the whole of its shard's partition of the post-vector topic and
applies every event in order (`ShardState.apply`): upserts index a post's vector,
deletes drop it. Both are idempotent, so replaying events already applied is
harmless; that is what lets a snapshot (`capture`, `restore`) be taken while the
replica keeps applying. Only sound vectors are indexed (feedret.indexer.vectors);
the rest are counted by reason, logged at a bounded rate and skipped.

No Kafka and no wire format here: the events come decoded (`VectorEvent`, which
a PostVectorEvent message of feedret.proto satisfies), from the applier thread
(feedret.indexer.applier) or a test. The servers read this state; they do not
write it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol, Sequence

import numpy as np
import structlog

from feedret.config import ShardConfig
from feedret.indexer.shard_index import IndexConfigError, IndexOptions, ShardIndex
from feedret.indexer.vectors import UNIT_NORM_TOLERANCE, VectorProblem, check_vectors, norms_of
from feedret.logging import Throttle

log = structlog.get_logger(__name__)


class VectorOp(IntEnum):
    """What a vector event does: PostVectorEvent.Op's values in feedret.proto (tests/test_protos.py holds them equal)."""

    UNSPECIFIED = 0
    UPSERT = 1
    DELETE = 2


class VectorEvent(Protocol):
    """One decoded record of the post-vector topic: the fields of feedret.proto's PostVectorEvent the replica reads."""

    post_id: int
    op: int  # a VectorOp value
    vector: Sequence[float]  # L2-normalised, the model's full width; empty for deletes
    created_at: float  # Unix seconds
    lang: str
    model_version: str


@dataclass
class ShardState:
    """The index plus what the shard knows about how far it has read."""

    config: ShardConfig
    topic: str
    index: ShardIndex | None = None
    applied_offset: int = 0  # next offset to read
    end_offset: int | None = None  # the partition's high watermark as of the last fetch (for lag)
    # (applied_offset, post id of the record just before it), assigned as one tuple so a
    # snapshot reads a matching pair: on restore, that record must still be on the partition.
    position: tuple[int, int | None] = (0, None)
    # Set by restore: the applier checks the snapshot's last record before replaying.
    verify_position: bool = False
    upserts: int = 0
    deletes: int = 0
    rejected: int = 0
    # `rejected` by reason (a VectorProblem's value, "undecodable", "no_op", "other_model"), for logs and counters.
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    # At most 10 vector_rejected lines a second; the counters count every one.
    reject_log: Throttle = field(default_factory=lambda: Throttle(10.0))
    # The model of every vector in the index (config.model_version, or the first vector's):
    # one index never mixes two models' vector spaces. Each post also keeps its own, for Lookup.
    model_version: str = ""

    @property
    def dimension(self) -> int:
        """The width served (a Matryoshka prefix when serve_dimension is set)."""
        if self.index is not None:
            return self.index.dimension
        return (self.config.serve_dimension or self.config.dimension) if self.config.dimension else 0

    @property
    def vector_dimension(self) -> int:
        """The width of incoming vectors (the model's)."""
        return self.index.input_dimension if self.index is not None else self.config.dimension

    def ensure_index(self, dimension: int) -> ShardIndex:
        """The index, created for `dimension`-wide vectors if there is none yet.

        The first sound run of vectors creates it at their width; a shard configured
        with a dimension creates it at start, so that an index configuration that
        cannot work fails before serving. IndexConfigError in that case.
        """
        if self.index is None:
            self.index = ShardIndex(dimension, options=IndexOptions.from_config(self.config))
            log.info(
                "index_created",
                dimension=dimension,
                serve_dimension=self.index.dimension,
                index_factory=self.config.index_factory,
                index_type=self.index.index_type,
                state=self.index.state,
            )
        return self.index

    @property
    def serving_model(self) -> str:
        """The model whose vectors this shard indexes and answers with ("" until known)."""
        return self.config.model_version or self.model_version

    def count_rejected(self, reason: str) -> None:
        self.rejected += 1
        self.rejected_reasons[reason] = self.rejected_reasons.get(reason, 0) + 1

    def apply(self, events: Sequence[tuple[int, VectorEvent]], now: float) -> None:
        """Apply (offset, event) pairs in order. Runs of upserts go to faiss in one call.

        Only sound vectors are indexed (feedret.indexer.vectors): anything can write the
        topic, and one NaN, infinite or unnormalised vector would top every result list.
        Only the serving model's vectors are indexed: another model's vector space is not
        comparable (`other_model`; a vector that names no model is taken as the serving one's).
        The rest are counted as rejected, logged and skipped; a post keeps its earlier vector.
        """
        run: list[tuple[int, VectorEvent]] = []

        def flush() -> None:
            if not run:
                return
            # The index's width; before the first vector, the run's first one's.
            width = self.vector_dimension or next((len(e.vector) for _, e in run if len(e.vector)), 0)
            fits = [i for i, (_, e) in enumerate(run) if width and len(e.vector) == width]
            row_of = {i: row for row, i in enumerate(fits)}  # position in run -> row of `vectors`
            vectors = np.array([run[i][1].vector for i in fits], dtype=np.float32).reshape(len(fits), width)
            problems = check_vectors(vectors)
            sound: list[int] = []  # positions in run
            sound_ids: set[int] = set()  # posts given a sound vector earlier in this run
            for i, (offset, ev) in enumerate(run):
                problem = problems[row_of[i]] if i in row_of else VectorProblem.WRONG_WIDTH
                reason = problem.value if problem is not None else None
                if reason is None and ev.model_version:
                    if not self.serving_model:
                        self.model_version = ev.model_version  # the first vector pins the model
                    elif ev.model_version != self.serving_model:
                        reason = "other_model"
                if reason is None:
                    sound.append(i)
                    sound_ids.add(ev.post_id)
                    continue
                self.count_rejected(reason)
                held = self.reject_log.allow()
                if held is None:
                    continue  # counted; a broken writer at full rate must not flood the log too
                kept = ev.post_id in sound_ids or (self.index is not None and ev.post_id in self.index)
                detail: dict[str, object] = {}
                if problem is VectorProblem.WRONG_WIDTH:
                    detail = {"width": len(ev.vector), "expected": width}
                elif problem is VectorProblem.NOT_UNIT:  # (a NaN norm would not be valid JSON in the log)
                    detail = {"norm": float(norms_of(vectors[row_of[i]][None])[0]), "tolerance": UNIT_NORM_TOLERANCE}
                elif reason == "other_model":
                    detail = {"serving_model": self.serving_model}
                log.error(
                    "vector_rejected",
                    post_id=ev.post_id,
                    offset=offset,
                    reason=reason,
                    model_version=ev.model_version,
                    # A rejected upsert changes nothing: the post's earlier vector, if any, still serves.
                    earlier_vector="kept" if kept else "none",
                    # Rejections counted but not logged since the last line (Throttle).
                    not_logged_before=held,
                    **detail,
                )
            good = [run[i][1] for i in sound]
            rows = [row_of[i] for i in sound]
            run.clear()
            if not width:
                return
            index = self.ensure_index(width)  # even with nothing sound: a bad index config fails now
            if not good:
                return
            index.upsert(
                [e.post_id for e in good],
                vectors if len(rows) == len(vectors) else vectors[rows],
                [e.created_at for e in good],
                [e.lang for e in good],
                indexed_at=now,
                model_versions=[e.model_version for e in good],
            )
            self.upserts += len(good)

        for offset, ev in events:
            if ev.op == VectorOp.UPSERT:
                run.append((offset, ev))
            elif ev.op == VectorOp.DELETE:
                flush()
                if self.index is not None:
                    self.index.delete([ev.post_id])
                self.deletes += 1
            else:
                self.count_rejected("no_op")
                log.error("vector_event_without_op", post_id=ev.post_id, offset=offset)
        flush()
        if events:
            self.applied_offset = events[-1][0] + 1
            self.position = (self.applied_offset, events[-1][1].post_id)

    # ------------------------------------------------------------ snapshots

    def capture(self) -> tuple[int, dict, dict] | None:
        """(applied offset, header, sections) for a snapshot; None while there is no index.

        The offset is read before the index is copied, so the copy holds at least
        every event before it (maybe some after: replaying those again is harmless,
        upserts and deletes are idempotent and applied in order).
        """
        index = self.index
        if index is None:
            return None
        offset, last_post_id = self.position
        counters = {"upserts": self.upserts, "deletes": self.deletes, "rejected": self.rejected,
                    "rejected_reasons": dict(self.rejected_reasons)}
        model_version = self.serving_model
        meta, sections = index.export_state()
        cfg = self.config
        header = {
            "num_shards": cfg.num_shards,
            "topic": self.topic,
            "partition": cfg.shard_id,
            "model_version": model_version,
            "last_post_id": last_post_id,
            "counters": counters,
            "index": meta,
            "written_at": time.time(),
        }
        return offset, header, sections

    def reset(self) -> None:
        """Forget everything: the partition is replayed from its start."""
        self.index = None
        self.applied_offset = 0
        self.position = (0, None)
        self.upserts = self.deletes = self.rejected = 0
        self.rejected_reasons = {}
        self.model_version = ""

    def restore(self, header: dict, sections: dict) -> None:
        """Take over a snapshot's index and position. IndexConfigError when it does not fit this shard."""
        cfg = self.config
        made_for = (header["num_shards"], header["topic"], header["partition"])
        if made_for != (cfg.num_shards, self.topic, cfg.shard_id):
            raise IndexConfigError(f"snapshot of (num_shards, topic, partition) {made_for}")
        meta = header["index"]
        if cfg.model_version and header.get("model_version") and header["model_version"] != cfg.model_version:
            raise IndexConfigError(f"snapshot of model {header['model_version']!r}, this shard serves {cfg.model_version!r}")
        if cfg.dimension and cfg.dimension != meta["input_dimension"]:
            raise IndexConfigError(f"snapshot of {meta['input_dimension']}-d vectors, configured {cfg.dimension}")
        # A snapshot from before model versions were kept per post holds them all as its header's.
        self.index = ShardIndex.from_state(meta, sections, IndexOptions.from_config(cfg),
                                           model_version=header.get("model_version", ""))
        self.applied_offset = int(header["applied_offset"])
        self.position = (self.applied_offset, header.get("last_post_id"))
        self.verify_position = True
        self.model_version = header.get("model_version", "")
        counters = header.get("counters", {})
        self.upserts = counters.get("upserts", 0)
        self.deletes = counters.get("deletes", 0)
        self.rejected = counters.get("rejected", 0)
        self.rejected_reasons = dict(counters.get("rejected_reasons", {}))

"""Re-embedding a bulk file of posts into a generation's vectors topic (`feedret backfill`).

A new generation's consumer re-embeds what `posts` still holds; posts older than the
topic's retention exist only in the source of truth. Exported as a file of post events
(what `feedret publish` takes: one JSON event per line), they go through the consumer's
own steps (feedret.consumer.batch): each line parsed and checked as a `posts` record is,
embedded in micro-batches (a post the model cannot embed is isolated and reported, the
rest of its batch goes on), and written as the consumer writes it: keyed by post id on
its shard's partition, a delete as a tombstone. Bad lines are counted and reported with
their line number, never sent. Records carry source_partition -1 and the line number as
source_offset: they came from no `posts` partition.

Order: where a post is in the file and in `posts` too, the stream's event is the newer
one and must be written last. So the backfill runs before the generation's consumer
starts (`feedret rollout start --posts-file` does it in that order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from feedret.consumer.batch import SourceRecord, embed_batch
from feedret.events import PostEvent, record_key

# What `send` gets: the partition, the key (the post id as decimal text) and the value
# (None: a tombstone). It returns something with .get(timeout) (a kafka-python future).
Send = Callable[[int, bytes, bytes | None], object]


@dataclass
class BackfillReport:
    lines: int = 0  # non-blank lines read
    embedded: int = 0
    deletes: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)
    seconds: float = 0.0

    @property
    def posts_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def backfill(
    lines: Iterable[str],
    embed: Callable[[Sequence[PostEvent]], np.ndarray],
    model_version: str,
    num_shards: int,
    send: Send,
    batch_size: int = 64,
    source: str = "file",
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> BackfillReport:
    """Embed every post event of `lines` and send its vector record; returns what was done.

    Raises when a send fails (after the batch's other sends): the caller runs it again,
    which rewrites the same records. `progress` is called with each batch's line count.
    """
    report = BackfillReport()
    started = time.perf_counter()
    batch: list[SourceRecord] = []

    def flush() -> None:
        if not batch:
            return
        out = embed_batch(batch, embed, model_version, num_shards, clock)
        futures = [send(partition, key, value) for partition, key, value in out.records]
        for f in futures:
            f.get(timeout=60)  # raises on a failed delivery
        report.embedded += out.upserts
        report.deletes += out.deletes
        report.bad += [(b.source.offset, b.reason) for b in out.bad]
        if progress is not None:
            progress(len(batch))
        batch.clear()

    for line_no, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        report.lines += 1
        batch.append(SourceRecord(source, -1, line_no, record_key(line), line.encode("utf-8")))
        if len(batch) >= batch_size:
            flush()
    flush()
    report.bad.sort()
    report.seconds = time.perf_counter() - started
    return report

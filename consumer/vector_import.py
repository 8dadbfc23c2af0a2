"""Bulk import of post vectors embedded elsewhere (a GPU fleet, a batch job) into `post-vectors`.

The file is NumPy's `.npz` (`numpy.savez`, compressed or not) with one row per post:

    post_id     int64   [n]     >= 0
    vector      float   [n, d]  L2-normalised, the model's full width (float16/32/64)
    created_at  float   [n]     Unix seconds (retention and max_age filters read it)
    lang        str     [n]     optional; "" when absent
    model_version  str  []      optional; the model that embedded them (--model-version overrides)

Rows are checked as the shards check the stream (feedret.indexer.vectors: finite, not all
zero, unit length) and a bad row is reported and not sent; the shards check again, and also
refuse vectors of another model than the one they index (`other_model`) or of another width.
Every sent row is a PostVectorEvent upsert keyed by post id on its shard's partition, exactly
what the embedding consumer writes, so shards apply, snapshot and replay imports like any
other vector; a later upsert of the same post, from either, replaces it.
"""

from __future__ import annotations

import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import structlog

from feedret.indexer.vectors import check_vectors
from feedret.routing import shard_of
from feedret.v1 import feedret_pb2 as pb

log = structlog.get_logger(__name__)

REQUIRED = ("post_id", "vector", "created_at")


class ImportFileError(ValueError):
    """The file is not a vector import file; the message says what is wrong, in one line."""


@dataclass(frozen=True)
class VectorFile:
    """The rows of an import file, checked for shape and types (not yet for soundness)."""

    post_ids: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [n, d]
    created_at: np.ndarray  # float64 [n]
    langs: np.ndarray  # str [n]
    model_version: str  # "" when the file names none

    def __len__(self) -> int:
        return len(self.post_ids)

    @property
    def dimension(self) -> int:
        return self.vectors.shape[1]


@dataclass
class ImportReport:
    sent: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> rows not sent
    partitions: int = 0
    seconds: float = 0.0

    @property
    def posts_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def read_vector_file(path: Path) -> VectorFile:
    """The file's rows; ImportFileError when it is not a readable import file."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # np.load takes anything without an npy/npz header for a pickle, and says so.
        why = "" if "pickle" in str(exc) else f": {exc}"
        raise ImportFileError(f"{path} is not a NumPy .npz file{why}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ImportFileError(f"{path} holds one array, not an .npz of named arrays ({', '.join(REQUIRED)}, ...)")
    with data:
        missing = [name for name in REQUIRED if name not in data.files]
        if missing:
            raise ImportFileError(f"{path} lacks the array{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                  f"(has {', '.join(data.files) or 'none'})")
        try:
            post_ids, vectors, created_at = (data[name] for name in REQUIRED)
            langs = data["lang"] if "lang" in data.files else None
            model = data["model_version"] if "model_version" in data.files else None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # pickled, truncated, bad CRC
            raise ImportFileError(f"{path}: {exc}") from None
    n = len(post_ids) if post_ids.ndim == 1 else -1
    if n < 0 or not np.issubdtype(post_ids.dtype, np.integer):
        raise ImportFileError(f"post_id must be a 1-d integer array, got {post_ids.dtype} of shape {post_ids.shape}")
    if vectors.ndim != 2 or vectors.shape[0] != n or not np.issubdtype(vectors.dtype, np.floating):
        raise ImportFileError(f"vector must be a float array of shape ({n}, dimension), got {vectors.dtype} "
                              f"of shape {vectors.shape}")
    if vectors.shape[1] == 0:
        raise ImportFileError("vector has width 0")
    if created_at.shape != (n,) or not np.issubdtype(created_at.dtype, np.number):
        raise ImportFileError(f"created_at must be {n} numbers (Unix seconds), got {created_at.dtype} "
                              f"of shape {created_at.shape}")
    if langs is None:
        langs = np.full(n, "", dtype=str)
    elif langs.shape != (n,) or langs.dtype.kind not in "US":
        raise ImportFileError(f"lang must be {n} strings, got {langs.dtype} of shape {langs.shape}")
    if model is not None and (model.shape != () or model.dtype.kind not in "US"):
        raise ImportFileError("model_version must be one string (a 0-d array)")
    return VectorFile(
        post_ids=post_ids.astype(np.int64),
        vectors=np.ascontiguousarray(vectors, dtype=np.float32),
        created_at=created_at.astype(np.float64),
        langs=np.char.decode(langs, "utf-8") if langs.dtype.kind == "S" else langs.astype(str),
        model_version=_text(model.item()) if model is not None else "",
    )


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def checked_rows(f: VectorFile, chunk: int = 8192) -> Iterator[tuple[np.ndarray, Counter]]:
    """(indices of the rows fit to send, rejections by reason) per chunk of rows."""
    for start in range(0, len(f), chunk):
        stop = min(start + chunk, len(f))
        problems = check_vectors(f.vectors[start:stop])
        rejected: Counter = Counter()
        good = []
        for i, problem in enumerate(problems, start):
            if f.post_ids[i] < 0:
                rejected["post_id"] += 1
            elif not np.isfinite(f.created_at[i]):
                rejected["created_at"] += 1
            elif problem is not None:
                rejected[problem.value] += 1
            else:
                good.append(i)
        yield np.asarray(good, dtype=np.int64), rejected


def vector_record(f: VectorFile, i: int, model_version: str, imported_at: float) -> pb.PostVectorEvent:
    """Row i as the upsert the embedding consumer would write for it."""
    return pb.PostVectorEvent(
        post_id=int(f.post_ids[i]),
        op=pb.PostVectorEvent.UPSERT,
        vector=f.vectors[i].tolist(),
        created_at=float(f.created_at[i]),
        lang=str(f.langs[i]),
        model_version=model_version,
        embedded_at=imported_at,
    )


def import_vectors(
    f: VectorFile,
    model_version: str,
    producer,
    topic: str,
    partitions: int,
    progress: Callable[[int], None] = lambda n: None,
) -> ImportReport:
    """Send f's sound rows to `topic` (a kafka-python producer), each on its shard's partition.

    Returns once every record is acknowledged; raises the first send error.
    """
    if not model_version:
        raise ImportFileError("no model version: name the model that embedded the vectors (--model-version)")
    report = ImportReport(partitions=partitions)
    started = time.monotonic()
    now = time.time()
    for rows, rejected in checked_rows(f):
        report.rejected.update(rejected)
        futures = []
        for i in rows:
            msg = vector_record(f, int(i), model_version, now)
            futures.append(producer.send(topic, key=str(msg.post_id).encode(), value=msg.SerializeToString(),
                                         partition=shard_of(msg.post_id, partitions)))
        producer.flush()
        for fut in futures:
            fut.get(timeout=30)  # raises what the broker said
        report.sent += len(rows)
        progress(len(rows) + sum(rejected.values()))
    report.seconds = time.monotonic() - started
    log.info("vectors_imported", sent=report.sent, rejected=dict(report.rejected), topic=topic,
             model_version=model_version, seconds=round(report.seconds, 3))
    return report

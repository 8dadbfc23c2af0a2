"""Vector codecs: what a shard keeps of each post's vector, and so what a post costs.

A codec store is a slot-addressed store (the interface of `stores.FaissFlatStore`:
reserve, grown, write, read, search, search_batch, nbytes) that holds codes
instead of float32 rows, with nothing float32 beside them: a post costs its code.

- `float32`: `stores.FaissFlatStore`, 4 bytes a dimension, exact.
- `float16`: `faiss.IndexScalarQuantizer` QT_fp16, 2 bytes a dimension.
- `int8`: QT_8bit, 1 byte a dimension, each dimension's range learned from the
  first `train_size` vectors of the stream (a shard stages them as float32 until
  then, `Staged`, and converts in one step); later values outside it are clipped.
- `binary`: one sign bit a dimension, searched over the mask (the float query
  against the signs, Hamming distance between sign bits, or RaBitQ codes: the bits
  and two floats, scored with an 8-bit query by popcounts), then the `rescore`
  × k nearest rescored by inner product from a compact full-precision store:
  int8 in memory (1/8 + 1 byte a dimension) or float32 memory-mapped from disk
  (with `rescore_dir`: 1/8 byte a dimension in memory; the page cache holds what
  rescoring reads).

The torch backend (`TorchCodecStore`, on a GPU when there is one) keeps float16,
int8 (a symmetric scale per dimension) or binary (sign bits, rescored from int8)
rows as tensors and searches them exactly as its float32 store does, in chunks.

Scores are inner products of the query (float32) with the decoded vector, so an
int8 or float16 score is within the codec's rounding of the exact one. The shard
contract holds with every codec: rows are written in place, a mask says what a
search may return, and k come back whenever k rows pass it.
"""

from __future__ import annotations

import os
import tempfile

import faiss
import numpy as np

from feedret.indexer.stores import FaissFlatStore, TorchStore, _grown, bitmap_selector

CODECS = ("float32", "float16", "int8", "binary")
BINARY_SEARCHES = ("asymmetric", "hamming", "rabitq")


def _rescored(queries: np.ndarray, near: np.ndarray, k: int,
              score) -> tuple[np.ndarray, np.ndarray]:
    """Binary's last step: each query's candidates (`near`, -1 padded) rescored by
    `score(query, slots)` from the full-precision rows, top k kept: (B, k), -1 past the last."""
    out_scores = np.full((len(queries), max(k, 0)), -np.inf, np.float32)
    out_slots = np.full((len(queries), max(k, 0)), -1, np.int64)
    for row, (query, candidates) in enumerate(zip(queries, near)):
        candidates = candidates[candidates >= 0]
        if not len(candidates) or k < 1:
            continue
        scores = score(query, candidates)
        best = np.argsort(-scores, kind="stable")[:k]
        out_scores[row, : len(best)] = scores[best]
        out_slots[row, : len(best)] = candidates[best]
    return out_scores, out_slots


def _top(scores: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    valid = slots >= 0
    return scores[valid].astype(np.float32, copy=False), slots[valid]


class _CodeRows:
    """One faiss code vector (a flat index's storage) viewed as a (capacity, code_size) uint8
    matrix: writes land in the index, no copy. `vector` is `index.codes` or a binary index's `xb`."""

    def __init__(self, index, vector, code_size: int) -> None:
        self.index, self.vector, self.code_size = index, vector, code_size
        self.capacity = 0
        self.rows = np.zeros((0, code_size), np.uint8)

    def resize(self, rows: int) -> None:
        # Under the index's write lock (reserve) or on a store nobody searches yet (grown).
        self.vector.resize(rows * self.code_size)
        self.index.ntotal = rows
        self.capacity = rows
        self.rows = faiss.rev_swig_ptr(self.vector.data(), rows * self.code_size).reshape(rows, self.code_size)


class _Coded:
    """What the faiss code stores share: their codes for a snapshot, and back."""

    _codes: _CodeRows

    def codes(self, n: int) -> np.ndarray:
        return self._codes.rows[:n].copy()

    def load_codes(self, codes: np.ndarray) -> None:
        if codes.ndim != 2 or codes.shape[1] != self._codes.code_size:
            # Another code's snapshot (binary_search changed to or from rabitq): the shard
            # replays its partition instead, as for another codec.
            raise ValueError(f"the snapshot's codes are {codes.shape[-1]} bytes a post, this store's "
                             f"{self._codes.code_size}")
        self.reserve(len(codes))
        self._codes.rows[: len(codes)] = codes


class ScalarStore(_Coded):
    """float16 or int8 codes in a `faiss.IndexScalarQuantizer` (inner product), searched with a selector."""

    def __init__(self, dimension: int, codec: str, trained: bytes | np.ndarray | None = None) -> None:
        if codec not in ("float16", "int8"):
            raise ValueError(f"no scalar codec {codec!r}")
        self.dimension, self.codec = dimension, codec
        if trained is not None:
            self.index = faiss.deserialize_index(np.asarray(trained, np.uint8))
        else:
            qtype = faiss.ScalarQuantizer.QT_fp16 if codec == "float16" else faiss.ScalarQuantizer.QT_8bit
            self.index = faiss.IndexScalarQuantizer(dimension, qtype, faiss.METRIC_INNER_PRODUCT)
        self._codes = _CodeRows(self.index, self.index.codes, self.index.code_size)

    @classmethod
    def trained_on(cls, dimension: int, codec: str, sample: np.ndarray) -> "ScalarStore":
        store = cls(dimension, codec)
        if not store.index.is_trained:
            store.index.train(np.ascontiguousarray(sample, np.float32))
        return store

    @property
    def kind(self) -> str:
        return self.codec

    @property
    def capacity(self) -> int:
        return self._codes.capacity

    @property
    def bytes_per_row(self) -> int:
        return int(self.index.code_size)

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_row

    def trained_state(self) -> np.ndarray:
        """The quantiser's learned ranges (an empty index, serialised): a snapshot keeps it."""
        empty = faiss.IndexScalarQuantizer(self.dimension, self.index.sq.qtype, faiss.METRIC_INNER_PRODUCT)
        empty.sq = self.index.sq
        empty.is_trained = True
        return faiss.serialize_index(empty)

    def reserve(self, n: int) -> None:
        if n > self.capacity:
            self._codes.resize(_grown(self.capacity, n))

    def resize_to(self, rows: int) -> None:
        self._codes.resize(rows)

    def grown(self, capacity: int) -> "ScalarStore":
        bigger = ScalarStore(self.dimension, self.codec, self.trained_state())
        bigger._codes.resize(max(capacity, self.capacity))
        bigger._codes.rows[: self.capacity] = self._codes.rows
        return bigger

    def write(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        self._codes.rows[slots] = self.index.sa_encode(np.ascontiguousarray(vectors, np.float32))

    def read(self, slots: np.ndarray) -> np.ndarray:
        return self.index.sa_decode(np.ascontiguousarray(self._codes.rows[slots]))

    def export(self, n: int) -> dict[str, np.ndarray]:
        """Snapshot sections for rows [0, n): the codes and the learned ranges (see `restore`)."""
        return {"codes": self.codes(n), "codec_state": self.trained_state()}

    def score(self, query: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Inner products of one query with the decoded rows of `slots`."""
        return self.read(slots) @ np.asarray(query, np.float32).reshape(-1)

    def search(self, query: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, slots = self.search_batch(np.asarray(query, np.float32).reshape(1, -1), k, mask)
        return _top(scores[0], slots[0])

    def search_batch(self, queries: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) scores and slots among rows where mask is True, -1 slots past the last found."""
        n = len(mask)
        k = min(k, n)
        if k < 1:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        keep: list = []
        params = faiss.SearchParameters(sel=bitmap_selector(mask, keep))
        scores, slots = self.index.search(np.ascontiguousarray(queries, np.float32), k, params=params)
        return scores.astype(np.float32, copy=False), slots


class DiskStore:
    """float32 rows memory-mapped from an unlinked file in `directory`: the process's memory
    holds none of them (the page cache holds what is read), and the file goes with the process."""

    def __init__(self, dimension: int, directory: str) -> None:
        self.dimension, self.directory = dimension, directory
        os.makedirs(directory, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="feedret-rescore-", suffix=".f32", dir=directory)
        os.unlink(path)  # nothing to clean up after a crash
        self._file = os.fdopen(fd, "r+b")
        self.capacity = 0
        self._rows = np.zeros((0, dimension), np.float32)

    @property
    def bytes_per_row(self) -> int:
        return 0  # on disk

    def _remap(self, rows: int) -> None:
        self._file.truncate(rows * self.dimension * 4)
        self._rows = np.memmap(self._file, np.float32, "r+", shape=(rows, self.dimension))
        self.capacity = rows

    def reserve(self, n: int) -> None:
        if n > self.capacity:
            self._remap(_grown(self.capacity, n))

    def resize_to(self, rows: int) -> None:
        self._remap(rows)

    def grown(self, capacity: int) -> "DiskStore":
        # The same file, longer: rows already written stay where they are, nothing is copied;
        # this store's own map stays valid for the searches still using it.
        bigger = object.__new__(DiskStore)
        bigger.dimension, bigger.directory, bigger._file = self.dimension, self.directory, self._file
        bigger._remap(max(capacity, self.capacity))
        return bigger

    def write(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        self._rows[slots] = vectors

    def read(self, slots: np.ndarray) -> np.ndarray:
        return np.asarray(self._rows[slots], np.float32)

    def view(self, n: int) -> np.ndarray:
        """Rows [0, n) as they are in the mapped file (no copy)."""
        return self._rows[:n]

    def score(self, query: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return self.read(slots) @ np.asarray(query, np.float32).reshape(-1)


class BinaryStore(_Coded):
    """Sign bits (one per dimension, little-endian in each byte), searched over the mask for the
    `rescore` × k nearest, which are rescored by inner product from `full` (a trained int8
    `ScalarStore`, or a `DiskStore`).

    `search` "asymmetric" scores the float query against each post's ±1 signs (faiss's 1-bit
    scalar quantizer, QT_1bit_eden, whose codes are exactly these bits); "hamming" compares the
    query's own sign bits (`faiss.IndexBinaryFlat`, popcounts: faster, coarser). Measured on
    random 256-d vectors, 8 × k rescored: recall@2,000 0.93 asymmetric, 0.76 Hamming.
    "rabitq" keeps RaBitQ codes (`faiss.IndexRaBitQ`: the same sign bits, around a centre at the
    origin, plus two floats a post) and scores a query quantized to 8 bits with popcounts: the
    ranking of "asymmetric" at a sixth of its scan time, so a deep rescore is affordable (1M
    clustered 256-d vectors, k = 2,000: recall 0.741 at 8 × k, 0.948 at 32 × k, 0.989 at 64 × k;
    the scan 10-25 ms on 2 threads against 74-86 ms). 8 bytes a post more than the bits.
    """

    def __init__(self, dimension: int, full, rescore: int, search: str = "asymmetric") -> None:
        if search not in BINARY_SEARCHES:
            raise ValueError(f"unknown binary search {search!r}; one of {', '.join(BINARY_SEARCHES)}")
        self.dimension, self.full, self.rescore, self.search_kind = dimension, full, max(1, int(rescore)), search
        if search == "hamming":
            self.index = faiss.IndexBinaryFlat(((dimension + 7) // 8) * 8)
            vector = self.index.xb
        elif search == "rabitq":
            self.index = faiss.IndexRaBitQ(dimension, faiss.METRIC_INNER_PRODUCT)
            # Its training is the centre codes are taken around: the origin, from a symmetric
            # sample, so a code depends on its vector alone (as a sign bit does), not on the data.
            sample = np.random.default_rng(0).normal(size=(256, dimension)).astype(np.float32)
            self.index.train(np.concatenate([sample, -sample]))
            vector = self.index.codes
        else:
            self.index = faiss.IndexScalarQuantizer(dimension, faiss.ScalarQuantizer.QT_1bit_eden,
                                                    faiss.METRIC_INNER_PRODUCT)
            # Its "training" sets constants (each sign decodes to ±sqrt(2/pi)), not ranges of the data.
            self.index.train(np.random.default_rng(0).normal(size=(256, dimension)).astype(np.float32))
            vector = self.index.codes
        self._codes = _CodeRows(self.index, vector, int(self.index.code_size))

    @property
    def kind(self) -> str:
        return f"binary ({self.search_kind}, rescored from " + ("int8)" if isinstance(self.full, ScalarStore) else "disk)")

    @property
    def capacity(self) -> int:
        return self._codes.capacity

    @property
    def bytes_per_row(self) -> int:
        return int(self.index.code_size) + self.full.bytes_per_row

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_row

    def _bits(self, vectors: np.ndarray) -> np.ndarray:
        v = np.asarray(vectors, np.float32).reshape(-1, self.dimension)
        return np.packbits(v > 0, axis=1, bitorder="little")

    def _encode(self, vectors: np.ndarray) -> np.ndarray:
        """Each vector's code row: its sign bits, or its RaBitQ code (the bits and two floats)."""
        if self.search_kind == "rabitq":
            return self.index.sa_encode(np.ascontiguousarray(vectors, np.float32).reshape(-1, self.dimension))
        return self._bits(vectors)

    def reserve(self, n: int) -> None:
        if n > self.capacity:
            self._codes.resize(_grown(self.capacity, n))
            self.full.resize_to(self.capacity)  # row for row: no more full-precision rows than codes

    def grown(self, capacity: int) -> "BinaryStore":
        bigger = BinaryStore(self.dimension, self.full.grown(max(capacity, self.capacity)), self.rescore,
                             self.search_kind)
        bigger._codes.resize(max(capacity, self.capacity))
        bigger._codes.rows[: self.capacity] = self._codes.rows
        return bigger

    def write(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        self._codes.rows[slots] = self._encode(vectors)
        self.full.write(slots, vectors)

    def read(self, slots: np.ndarray) -> np.ndarray:
        return self.full.read(slots)

    def export(self, n: int) -> dict[str, np.ndarray]:
        """Snapshot sections for rows [0, n): the sign bits and the rescoring store's rows."""
        if isinstance(self.full, ScalarStore):
            full = {"full_codes": self.full.codes(n), "codec_state": self.full.trained_state()}
        else:
            # A view of the mapped file, not a copy into memory (a 10M x 256 shard's would be
            # 10 GB): it is read after the index lock is released, so a row rewritten
            # meanwhile may be newer than the slots captured with it; its post was written
            # after the snapshot's offset, so replaying from that offset rewrites it.
            full = {"rows": self.full.view(n)}
        return {"codes": self.codes(n), **full}

    def search(self, query: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, slots = self.search_batch(np.asarray(query, np.float32).reshape(1, -1), k, mask)
        return _top(scores[0], slots[0])

    def search_batch(self, queries: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) scores and slots among rows where mask is True, -1 slots past the last found."""
        queries = np.ascontiguousarray(queries, np.float32).reshape(-1, self.dimension)
        n = len(mask)
        k = min(k, n)
        if k < 1:
            return _rescored(queries, np.empty((len(queries), 0), np.int64), k, self.full.score)
        keep: list = []
        if self.search_kind == "rabitq":
            params = faiss.RaBitQSearchParameters()
            params.qb = 8  # query bits: at 4, recall fell ~0.005 for no measurable speed
            params.sel = bitmap_selector(mask, keep)
        else:
            params = faiss.SearchParameters(sel=bitmap_selector(mask, keep))
        probe = self._bits(queries) if self.search_kind == "hamming" else queries
        _, near = self.index.search(probe, min(k * self.rescore, n), params=params)
        return _rescored(queries, near, k, self.full.score)


class Staged(FaissFlatStore):
    """float32 rows held until a trained codec (int8, or binary rescored from int8) has seen
    `train_size` vectors; then `encoded` returns the codec's store holding the same rows."""

    def __init__(self, dimension: int, codec: str, train_size: int, make) -> None:
        super().__init__(dimension)
        self.codec, self.train_size, self._make = codec, train_size, make

    @property
    def kind(self) -> str:
        return f"{self.codec} (staged as float32 until {self.train_size} vectors)"

    def grown(self, capacity: int) -> "Staged":
        bigger = Staged(self.dimension, self.codec, self.train_size, self._make)
        bigger._resize(max(capacity, self.capacity))
        bigger._rows[: self.capacity] = self._rows
        return bigger

    def export(self, n: int) -> dict[str, np.ndarray]:
        return {"rows": self.read(np.arange(n, dtype=np.int64))}

    def encoded(self, live: np.ndarray):
        """The codec's store, trained on the live rows, holding every row of this one."""
        sample = live if len(live) <= 100_000 else np.random.default_rng(0).choice(live, 100_000, replace=False)
        store = self._make(self._rows[np.sort(sample)])
        store.reserve(self.capacity)
        for start in range(0, self.capacity, 65536):
            rows = np.arange(start, min(start + 65536, self.capacity))
            store.write(rows, self._rows[rows])
        return store


def int8_scale(sample: np.ndarray) -> np.ndarray:
    """Per-dimension scale of a symmetric int8 code: the largest magnitude seen maps to 127."""
    return np.maximum(np.abs(np.asarray(sample, np.float32)).max(axis=0), 1e-12) / 127.0


class TorchCodecStore(TorchStore):
    """The torch store over float16, int8 or binary rows (`TorchStore`'s chunked exact search).

    int8 keeps round(x / scale) per dimension and scores a chunk as rows @ (q * scale);
    binary keeps sign bits, scores a chunk as the query against ±1 (asymmetric), and
    rescores the best `rescore` × k from int8 rows. On a CPU a chunk is decoded 64k rows at
    a time (bounded temporary memory); on a GPU float16 and int8 rows are multiplied in
    float16.
    """

    _DTYPES = {"float16": "float16", "int8": "int8", "binary": "int8"}

    def __init__(self, dimension: int, device: str = "auto", chunk_rows: int = 1 << 20, codec: str = "float16",
                 scale: np.ndarray | None = None, rescore: int = 8) -> None:
        super().__init__(dimension, device, chunk_rows)
        torch = self._torch
        if codec not in self._DTYPES:
            raise ValueError(f"no torch codec {codec!r}")
        if codec != "float16" and scale is None:
            raise ValueError(f"a {codec} store needs the scale learned from the stream")
        self.codec, self.rescore = codec, max(1, int(rescore))
        self._dtype = getattr(torch, self._DTYPES[codec])
        self._scale = None if scale is None else torch.tensor(np.array(scale, np.float32), device=self.device)
        self._rows = torch.zeros((0, dimension), dtype=self._dtype, device=self.device)
        self._nbits = (dimension + 7) // 8
        self._bits = torch.zeros((0, self._nbits), dtype=torch.uint8, device=self.device) if codec == "binary" else None
        self._shifts = torch.arange(8, dtype=torch.uint8, device=self.device)

    @property
    def kind(self) -> str:
        return f"torch-exact({self.device}, {self.codec})"

    @property
    def bytes_per_row(self) -> int:
        return {"float16": 2 * self.dimension, "int8": self.dimension, "binary": self._nbits + self.dimension}[self.codec]

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_row

    def scale(self) -> np.ndarray | None:
        return None if self._scale is None else self._scale.cpu().numpy()

    def _alloc(self, rows: int) -> None:
        torch = self._torch
        grown = torch.zeros((rows, self.dimension), dtype=self._dtype, device=self.device)
        grown[: self.capacity] = self._rows
        self._rows = grown
        if self._bits is not None:
            bits = torch.zeros((rows, self._nbits), dtype=torch.uint8, device=self.device)
            bits[: self.capacity] = self._bits
            self._bits = bits
        self.capacity = rows

    def reserve(self, n: int) -> None:
        if n > self.capacity:
            self._alloc(_grown(self.capacity, n))

    def grown(self, capacity: int) -> "TorchCodecStore":
        bigger = TorchCodecStore(self.dimension, self.device, self.chunk_rows, self.codec, self.scale(), self.rescore)
        bigger._rows, bigger._bits, bigger.capacity = self._rows, self._bits, self.capacity
        bigger._alloc(max(capacity, self.capacity))  # copies into new tensors: this store is untouched
        return bigger

    def _encode(self, vectors: np.ndarray):
        torch = self._torch
        v = torch.from_numpy(np.require(vectors, np.float32, ["C", "W"])).to(self.device)
        if self.codec == "float16":
            return v.half()
        return torch.clamp(torch.round(v / self._scale), -127, 127).to(torch.int8)

    def write(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        torch = self._torch
        idx = torch.from_numpy(np.asarray(slots, np.int64)).to(self.device)
        self._rows[idx] = self._encode(vectors)
        if self._bits is not None:
            bits = np.packbits(np.asarray(vectors, np.float32).reshape(-1, self.dimension) > 0, axis=1, bitorder="little")
            self._bits[idx] = torch.from_numpy(bits).to(self.device)

    def _decode(self, rows):
        rows = rows.float()
        return rows if self._scale is None else rows * self._scale

    def read(self, slots: np.ndarray) -> np.ndarray:
        torch = self._torch
        idx = torch.from_numpy(np.asarray(slots, np.int64)).to(self.device)
        return self._decode(self._rows[idx]).cpu().numpy()

    def _blocks(self, start: int, stop: int):
        step = stop - start if self.device != "cpu" else 1 << 16
        return [(a, min(a + step, stop)) for a in range(start, stop, step)]

    def _scores(self, start: int, stop: int, q):
        torch = self._torch
        if self.codec == "binary":
            parts = []
            for a, b in self._blocks(start, stop):
                signs = ((self._bits[a:b].unsqueeze(-1) >> self._shifts) & 1).reshape(b - a, -1)[:, : self.dimension]
                parts.append((signs.float() * 2 - 1) @ q.T)
            return torch.cat(parts).T
        scaled = q if self._scale is None else q * self._scale
        if self.device != "cpu":
            return (self._rows[start:stop].half() @ scaled.half().T).float().T
        return torch.cat([self._rows[a:b].float() @ scaled.T for a, b in self._blocks(start, stop)]).T

    def search_batch(self, queries: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.codec != "binary":
            return super().search_batch(queries, k, mask)
        torch = self._torch
        queries = np.ascontiguousarray(queries, np.float32).reshape(-1, self.dimension)
        n = mask.shape[-1]
        k = min(k, n)
        _, near = super().search_batch(queries, min(k * self.rescore, n), mask)

        def score(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
            idx = torch.from_numpy(candidates).to(self.device)
            return (self._decode(self._rows[idx]) @ torch.from_numpy(query).to(self.device)).cpu().numpy()

        with torch.inference_mode():
            return _rescored(queries, near, k, score)

    def export(self, n: int) -> dict[str, np.ndarray]:
        out = {"codes": self._rows[:n].cpu().numpy()}
        if self._scale is not None:
            out["codec_state"] = self.scale()
        if self._bits is not None:
            out["bits"] = self._bits[:n].cpu().numpy()
        return out

    def load(self, sections: dict[str, np.ndarray]) -> None:
        torch = self._torch
        n = len(sections["codes"])
        self.reserve(n)
        for start in range(0, n, 1 << 20):  # a snapshot's mapped codes, copied a chunk at a time
            part = slice(start, min(start + (1 << 20), n))
            self._rows[part] = torch.from_numpy(np.array(sections["codes"][part])).to(self.device)
            if self._bits is not None:
                self._bits[part] = torch.from_numpy(np.array(sections["bits"][part])).to(self.device)


class TorchStaged(TorchStore):
    """The torch store's float32 rows held until an int8 (or binary) codec has seen
    `train_size` vectors; then `encoded` returns the `TorchCodecStore` holding the same rows."""

    def __init__(self, dimension: int, device: str, chunk_rows: int, codec: str, train_size: int, rescore: int) -> None:
        super().__init__(dimension, device, chunk_rows)
        self.codec, self.train_size, self.rescore = codec, train_size, rescore

    def grown(self, capacity: int) -> "TorchStaged":
        bigger = TorchStaged(self.dimension, self.device, self.chunk_rows, self.codec, self.train_size, self.rescore)
        bigger.reserve(max(capacity, self.capacity))
        bigger._rows[: self.capacity] = self._rows
        return bigger

    def export(self, n: int) -> dict[str, np.ndarray]:
        return {"rows": self.read(np.arange(n, dtype=np.int64))}

    def encoded(self, live: np.ndarray) -> TorchCodecStore:
        sample = live if len(live) <= 100_000 else np.random.default_rng(0).choice(live, 100_000, replace=False)
        store = TorchCodecStore(self.dimension, self.device, self.chunk_rows, self.codec,
                                int8_scale(self.read(np.sort(sample))), self.rescore)
        store.reserve(self.capacity)
        for start in range(0, self.capacity, 65536):
            rows = np.arange(start, min(start + 65536, self.capacity))
            store.write(rows, self.read(rows))
        return store


def new_torch_store(dimension: int, codec: str, device: str, chunk_rows: int, *, train_size: int = 10_000,
                    rescore: int = 8) -> TorchStore:
    """The empty torch store a shard starts with for `codec` (a `TorchStaged` one where the codec trains)."""
    if codec == "float32":
        return TorchStore(dimension, device, chunk_rows)
    if codec == "float16":
        return TorchCodecStore(dimension, device, chunk_rows, "float16")
    if codec in ("int8", "binary"):
        return TorchStaged(dimension, device, chunk_rows, codec, train_size, rescore)
    raise ValueError(f"unknown vector codec {codec!r}; one of {', '.join(CODECS)}")


def restore_torch(dimension: int, codec: str, saved: str, sections: dict[str, np.ndarray], device: str,
                  chunk_rows: int, **options) -> TorchStore:
    """`restore` for the torch backend: codes as they were, float32 rows into the configured codec."""
    n = len(sections["post_id"])
    if "codes" not in sections:
        store = new_torch_store(dimension, codec, device, chunk_rows, train_size=options.get("train_size", 10_000),
                                rescore=options.get("rescore", 8))
        store.reserve(n)
        for start in range(0, n, 1 << 20):  # the mapped rows a chunk at a time, not one copy of them all
            stop = min(start + (1 << 20), n)
            store.write(np.arange(start, stop, dtype=np.int64), sections["rows"][start:stop])
        return store
    if saved != codec:
        raise ValueError(f"the snapshot holds {saved} codes, the shard is configured for {codec}")
    store = TorchCodecStore(dimension, device, chunk_rows, codec, sections.get("codec_state"),
                            options.get("rescore", 8))
    store.load(sections)
    return store


def new_store(dimension: int, codec: str, *, train_size: int = 10_000, rescore: int = 8, rescore_dir: str = "",
              binary_search: str = "asymmetric"):
    """The empty store a shard starts with for `codec` (a `Staged` one where the codec trains)."""
    if codec == "float32":
        return FaissFlatStore(dimension)
    if codec == "float16":
        return ScalarStore(dimension, "float16")
    if codec == "int8":
        return Staged(dimension, codec, train_size, lambda sample: ScalarStore.trained_on(dimension, "int8", sample))
    if codec == "binary":
        if rescore_dir:
            return BinaryStore(dimension, DiskStore(dimension, rescore_dir), rescore, binary_search)
        return Staged(dimension, codec, train_size, lambda sample: BinaryStore(
            dimension, ScalarStore.trained_on(dimension, "int8", sample), rescore, binary_search))
    raise ValueError(f"unknown vector codec {codec!r}; one of {', '.join(CODECS)}")


def export(store, n: int) -> dict[str, np.ndarray]:
    """A store's snapshot sections for slots [0, n): float32 stores give `rows`, codec stores their codes."""
    if isinstance(store, (ScalarStore, BinaryStore, Staged, TorchCodecStore, TorchStaged)):
        return store.export(n)
    return {"rows": store.read(np.arange(n, dtype=np.int64))}


def restore(dimension: int, codec: str, saved: str, sections: dict[str, np.ndarray], **options):
    """The store `export` saved with codec `saved`, for a shard configured with `codec`
    (`options` as `new_store`'s).

    Codes restore as they were; float32 rows (a float32 snapshot, a staged one, or one
    from before codecs) are written into the configured codec's store, so changing the
    codec of a shard that snapshots float32 needs no replay. Codes of one codec are not
    converted to another: ValueError (the shard replays its partition instead).
    """
    n = len(sections["post_id"])
    if "codes" not in sections:
        store = new_store(dimension, codec, **options)
        store.reserve(n)
        store.write(np.arange(n, dtype=np.int64), sections["rows"])
        return store
    if saved != codec:
        raise ValueError(f"the snapshot holds {saved} codes, the shard is configured for {codec}")
    if codec in ("float16", "int8"):
        store = ScalarStore(dimension, codec, sections["codec_state"])
    elif "full_codes" in sections:  # binary, rescored from int8 in memory
        full = ScalarStore(dimension, "int8", sections["codec_state"])
        full.load_codes(sections["full_codes"])
        store = BinaryStore(dimension, full, options.get("rescore", 8), options.get("binary_search", "asymmetric"))
    else:  # binary, rescored from float32 on disk
        full = DiskStore(dimension, options.get("rescore_dir") or tempfile.gettempdir())
        full.reserve(n)
        full.write(np.arange(n, dtype=np.int64), sections["rows"])
        store = BinaryStore(dimension, full, options.get("rescore", 8), options.get("binary_search", "asymmetric"))
    store.load_codes(sections["codes"])
    return store


def codec_of(store) -> str:
    """The codec a store's rows are in: float32 for float32 rows (staged ones too)."""
    if isinstance(store, (ScalarStore, TorchCodecStore)):
        return store.codec
    if isinstance(store, BinaryStore):
        return "binary"
    return "float32"

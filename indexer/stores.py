"""Slot-addressed vector stores with exact, masked inner-product search.

A store holds one float32 row per slot (see `ShardIndex`): rows are written in
place, never moved, and a boolean mask over slots says which rows a search may
return (live posts that pass the filter). The store is the shard's source of
truth for vectors: the exact index itself for `Flat` and `torch`, and for
approximate indexes the buffer searched exactly until they are trained, the
fallback when a filter starves them, and what they are rebuilt from.

- `FaissFlatStore`: a faiss `IndexFlatIP` whose storage is the slot matrix
  (written through a numpy view), searched with an `IDSelectorBitmap`. No
  `remove_ids`: a delete clears a mask bit instead of compacting the matrix.
- `TorchStore`: a torch tensor on CUDA when available (else CPU); a search is
  chunked matmul + top-k per chunk, merged, so any k up to the store size works
  (unlike faiss-GPU, whose k is limited to 2048).
"""

from __future__ import annotations

import numpy as np

import faiss

_EMPTY = (np.empty(0, np.float32), np.empty(0, np.int64))


def bitmap_selector(mask: np.ndarray, keep: list):
    """A faiss selector of the slots `mask` allows; `keep` holds the bitmap it points to until
    the search returns."""
    bitmap = np.packbits(mask, bitorder="little")
    keep.append(bitmap)
    return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))  # n counts bytes


def _grown(capacity: int, needed: int) -> int:
    """Rows to grow to: double while small, then a quarter more at a time, so a large store
    carries at most 25% empty rows (doubling left up to half of a 10M-post store's memory unused)."""
    step = capacity if capacity < (1 << 20) else capacity // 4
    return max(1024, capacity + step, needed)


def release_free_memory() -> None:
    """Hand memory freed by a grown, encoded or exported store back to the OS (glibc's
    malloc_trim). Without it a process keeps the heap pages of every array it freed, and its
    resident memory is the high-water mark of every growth, not what it holds."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False  # not glibc: nothing to trim this way
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


# Queries from which FaissFlatStore.search_batch scores a batch with one matrix product.
BLAS_MIN_BATCH = 32


class FaissFlatStore:
    """Exact store and index in one: `IndexFlatIP` with one row per slot."""

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension
        self.index = faiss.IndexFlatIP(dimension)
        self.capacity = 0
        self._rows = np.zeros((0, dimension), np.float32)

    @property
    def kind(self) -> str:
        return "faiss-flat"

    @property
    def nbytes(self) -> int:
        return self.capacity * self.dimension * 4

    def reserve(self, n: int) -> None:
        """Room for slots [0, n). Reallocates: call under the index's write lock."""
        if n <= self.capacity:
            return
        new = _grown(self.capacity, n)
        # Zeros added in bounded chunks: on the benchmark machine this grew a 0.5 GB store
        # in place faster, and with a lower peak, than one resize of faiss's code vector.
        zeros = np.zeros((min(new - self.capacity, 65536), self.dimension), np.float32)
        for start in range(self.capacity, new, len(zeros)):
            self.index.add(zeros[: min(len(zeros), new - start)])
        self.capacity = new
        # A view into faiss's own storage: writes land in the index, no copy.
        self._rows = faiss.rev_swig_ptr(self.index.get_xb(), new * self.dimension).reshape(new, self.dimension)

    def _resize(self, rows: int) -> None:
        """An empty store to exactly `rows` zero rows, in one allocation (for `grown`)."""
        self.index.codes.resize(rows * self.dimension * 4)
        self.index.ntotal = rows
        self.capacity = rows
        # A view into faiss's own storage: writes land in the index, no copy.
        self._rows = faiss.rev_swig_ptr(self.index.get_xb(), rows * self.dimension).reshape(rows, self.dimension)

    def grown(self, capacity: int) -> "FaissFlatStore":
        """A new store of `capacity` rows holding a copy of these. Reads only: safe beside searches.

        Both stores are alive until the caller swaps: the peak is old + new rows.
        """
        bigger = FaissFlatStore(self.dimension)
        bigger._resize(max(capacity, self.capacity))
        bigger._rows[: self.capacity] = self._rows
        return bigger

    def write(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        self._rows[slots] = vectors

    def read(self, slots: np.ndarray) -> np.ndarray:
        return self._rows[slots].copy()

    def search(self, query: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, slots) among rows where mask is True, best first."""
        if k < 1 or not len(mask):
            return _EMPTY
        keep: list = []
        params = faiss.SearchParameters(sel=bitmap_selector(mask, keep))
        scores, slots = self.index.search(query.reshape(1, -1), k, params=params)
        valid = slots[0] >= 0
        return scores[0][valid].astype(np.float32, copy=False), slots[0][valid]

    def search_batch(self, queries: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, slots) of every query among rows where mask is True; -1 slots where
        fewer pass. From BLAS_MIN_BATCH queries on, one matrix product (BLAS) per block of
        queries: faiss with a selector scores query by query, which left a batch no cheaper
        than its queries alone. Smaller batches are searched query by query: the product's
        full score rows and their partition cost more than faiss's scan with a heap (500,000
        rows, in process: 0.5-1.2x the speed of one by one for 1-16 queries, 1.7x for 32-64)."""
        n, k = len(mask), min(k, len(mask))
        out_scores = np.full((len(queries), k), -np.inf, np.float32)
        out_slots = np.full((len(queries), k), -1, np.int64)
        if k < 1:
            return out_scores, out_slots
        if len(queries) < BLAS_MIN_BATCH:
            for row, query in enumerate(queries):
                scores, slots = self.search(np.ascontiguousarray(query, np.float32), k, mask)
                out_scores[row, : len(scores)], out_slots[row, : len(slots)] = scores, slots
            return out_scores, out_slots
        dead = ~mask
        block = max(1, (64 << 20) // (4 * n))  # a block's scores stay under 64 MiB
        for start in range(0, len(queries), block):
            scores = queries[start:start + block] @ self._rows[:n].T
            scores[:, dead] = -np.inf
            top = np.argpartition(scores, n - k, axis=1)[:, n - k:]  # the k largest, unordered
            top_scores = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            top, top_scores = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)
            passed = np.isfinite(top_scores)
            out_scores[start:start + block] = np.where(passed, top_scores, -np.inf)
            out_slots[start:start + block] = np.where(passed, top, -1)
        return out_scores, out_slots


def torch_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"index device {name!r} asked for, but torch sees no CUDA device")
    return name


class TorchStore:
    """Exact brute force in torch: chunked matmul, top-k per chunk, then a top-k of the survivors."""

    def __init__(self, dimension: int, device: str = "auto", chunk_rows: int = 1 << 20) -> None:
        import torch

        self._torch = torch
        self.dimension = dimension
        self.device = torch_device(device)
        self.chunk_rows = max(1, chunk_rows)
        self.capacity = 0
        self._rows = torch.zeros((0, dimension), dtype=torch.float32, device=self.device)

    @property
    def kind(self) -> str:
        return f"torch-exact({self.device})"

    @property
    def nbytes(self) -> int:
        return self.capacity * self.dimension * 4

    def reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        torch = self._torch
        new = _grown(self.capacity, n)
        rows = torch.zeros((new, self.dimension), dtype=torch.float32, device=self.device)
        rows[: self.capacity] = self._rows
        self._rows, self.capacity = rows, new

    def grown(self, capacity: int) -> "TorchStore":
        """A new store of `capacity` rows holding a copy of these. Reads only: safe beside searches."""
        bigger = TorchStore(self.dimension, self.device, self.chunk_rows)
        bigger.reserve(max(capacity, self.capacity))
        bigger._rows[: self.capacity] = self._rows
        return bigger

    def write(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        torch = self._torch
        # np.require copies a read-only array (a snapshot's mapped rows): torch wants writable memory.
        self._rows[torch.from_numpy(np.asarray(slots, np.int64)).to(self.device)] = torch.from_numpy(
            np.require(vectors, np.float32, ["C", "W"])
        ).to(self.device)

    def read(self, slots: np.ndarray) -> np.ndarray:
        torch = self._torch
        idx = torch.from_numpy(np.asarray(slots, np.int64)).to(self.device)
        return self._rows[idx].cpu().numpy()

    def search(self, query: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, slots = self.search_batch(np.asarray(query, np.float32).reshape(1, -1), k, mask)
        keep = slots[0] >= 0
        return scores[0][keep], slots[0][keep]

    def _scores(self, start: int, stop: int, q):
        """(B, stop - start) inner products of the queries with rows [start, stop)."""
        return (self._rows[start:stop] @ q.T).T

    def search_batch(self, queries: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each of B queries: (B, k) scores and slots, slot -1 past the last hit.

        `mask` is (n,), shared by every query, or (B, n), one row per query (each
        request's own filters). One (chunk × d) @ (d × B) matmul per chunk reads the
        rows once for all B queries, so on a GPU a batch costs little more than one
        query (searching is bound by memory bandwidth until B is in the hundreds).
        """
        torch = self._torch
        queries = np.ascontiguousarray(queries, np.float32).reshape(-1, self.dimension)
        n, b = mask.shape[-1], len(queries)
        if mask.ndim == 2 and len(mask) != b:
            raise ValueError(f"{len(mask)} masks for {b} queries")
        if k < 1 or not n or not b:
            return np.empty((b, 0), np.float32), np.empty((b, 0), np.int64)
        with torch.inference_mode():
            q = torch.from_numpy(queries).to(self.device)
            allowed = torch.from_numpy(np.ascontiguousarray(mask)).to(self.device)
            part_scores, part_slots = [], []
            for start in range(0, n, self.chunk_rows):
                stop = min(start + self.chunk_rows, n)
                scores = self._scores(start, stop, q)  # (B, chunk)
                scores = scores.masked_fill(~allowed[..., start:stop], float("-inf"))
                top = torch.topk(scores, min(k, stop - start), dim=1)
                part_scores.append(top.values)
                part_slots.append(top.indices + start)
            scores = torch.cat(part_scores, dim=1)
            slots = torch.cat(part_slots, dim=1)
            if len(part_scores) > 1:
                top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
                scores, slots = top.values, torch.gather(slots, 1, top.indices)
            slots = slots.masked_fill(~torch.isfinite(scores), -1)  # fewer than k rows allowed
            return scores.cpu().numpy().astype(np.float32), slots.cpu().numpy().astype(np.int64)

"""One shard's vector index: faiss keyed by 64-bit post ids, with upsert, delete and filters.

faiss never sees post ids. It sees *slots*: small dense integers this class
hands out and recycles. That keeps per-post attributes (creation time,
language) in flat numpy arrays indexed by slot, so a filter is a vectorised
mask turned into a faiss `IDSelectorBitmap` and applied inside the search,
not after it: when at least k posts pass the filter, k come back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import faiss
import numpy as np


@dataclass(frozen=True)
class SearchFilter:
    exclude_post_ids: Sequence[int] = ()
    min_created_at: float | None = None  # Unix seconds; older posts are skipped
    languages: Sequence[str] = ()  # empty: any

    @property
    def is_empty(self) -> bool:
        return not self.exclude_post_ids and self.min_created_at is None and not self.languages


@dataclass(frozen=True)
class PostRecord:
    post_id: int
    created_at: float
    lang: str
    indexed_at: float
    vector: np.ndarray | None = None


@dataclass
class _Slots:
    """Per-slot attributes; grown by doubling."""

    post_id: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    created_at: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    indexed_at: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    lang: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    alive: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def grow(self, capacity: int) -> None:
        for name in ("post_id", "created_at", "indexed_at", "lang", "alive"):
            old = getattr(self, name)
            new = np.zeros(capacity, old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)


class ShardIndex:
    """Thread-safe: one writer or one searcher at a time."""

    def __init__(self, dimension: int, index_factory: str = "Flat") -> None:
        if dimension < 1:
            raise ValueError("dimension must be >= 1")
        self.dimension = dimension
        self.index_factory = index_factory
        inner = faiss.index_factory(dimension, index_factory, faiss.METRIC_INNER_PRODUCT)
        if not inner.is_trained:
            raise ValueError(
                f"index {index_factory!r} needs training; the spine serves untrained factories only"
            )
        # IDMap2 (not IDMap) so a post's vector can be reconstructed for Lookup.
        self._index = faiss.IndexIDMap2(inner)
        self._slots = _Slots()
        self._next_slot = 0
        self._free: list[int] = []
        self._slot_of: dict[int, int] = {}
        self._lang_code: dict[str, int] = {"": 0}
        self._lang_name: list[str] = [""]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, post_id: int) -> bool:
        return post_id in self._slot_of

    # ------------------------------------------------------------ writes

    def _lang(self, lang: str) -> int:
        code = self._lang_code.get(lang)
        if code is None:
            code = self._lang_code[lang] = len(self._lang_name)
            self._lang_name.append(lang)
        return code

    def _take_slots(self, n: int) -> np.ndarray:
        reuse = [self._free.pop() for _ in range(min(n, len(self._free)))]
        fresh = list(range(self._next_slot, self._next_slot + n - len(reuse)))
        self._next_slot += len(fresh)
        if self._next_slot > len(self._slots.alive):
            self._slots.grow(max(1024, 2 * self._next_slot))
        return np.array(reuse + fresh, dtype=np.int64)

    def _release(self, slots: Iterable[int]) -> None:
        slots = np.fromiter(slots, dtype=np.int64)
        if not len(slots):
            return
        self._index.remove_ids(faiss.IDSelectorBatch(slots))
        self._slots.alive[slots] = False
        self._free.extend(int(s) for s in slots)

    def upsert(
        self,
        post_ids: Sequence[int],
        vectors: np.ndarray,
        created_at: Sequence[float],
        langs: Sequence[str],
        indexed_at: float,
    ) -> None:
        """Insert or replace. Within one call the last occurrence of an id wins."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dimension)
        if len(vectors) != len(post_ids):
            raise ValueError("post_ids and vectors differ in length")
        last: dict[int, int] = {}
        for row, pid in enumerate(post_ids):
            last[int(pid)] = row
        rows = np.fromiter(last.values(), dtype=np.int64)
        ids = list(last.keys())
        with self._lock:
            self._release(self._slot_of.pop(pid) for pid in ids if pid in self._slot_of)
            slots = self._take_slots(len(ids))
            self._index.add_with_ids(vectors[rows], slots)
            s = self._slots
            s.post_id[slots] = ids
            s.created_at[slots] = np.asarray(created_at, np.float64)[rows]
            s.indexed_at[slots] = indexed_at
            s.lang[slots] = [self._lang(langs[r]) for r in rows]
            s.alive[slots] = True
            self._slot_of.update(zip(ids, slots.tolist()))

    def delete(self, post_ids: Iterable[int]) -> int:
        """Remove posts; unknown ids are ignored. Returns how many were removed."""
        with self._lock:
            slots = [self._slot_of.pop(int(pid)) for pid in post_ids if int(pid) in self._slot_of]
            self._release(slots)
            return len(slots)

    # ------------------------------------------------------------ reads

    def _allowed(self, filt: SearchFilter) -> np.ndarray:
        n = self._next_slot
        s = self._slots
        mask = s.alive[:n].copy()
        if filt.min_created_at is not None:
            mask &= s.created_at[:n] >= filt.min_created_at
        if filt.languages:
            codes = [self._lang_code[l] for l in filt.languages if l in self._lang_code]
            mask &= np.isin(s.lang[:n], np.array(codes, dtype=np.int32))
        excluded = [self._slot_of[p] for p in filt.exclude_post_ids if p in self._slot_of]
        if excluded:
            mask[excluded] = False
        return mask

    def search(
        self, query: np.ndarray, k: int, filt: SearchFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k post ids and inner-product scores, best first."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dimension)
        with self._lock:
            if not self._slot_of:
                return np.empty(0, np.int64), np.empty(0, np.float32)
            params = None
            available = len(self._slot_of)
            if filt is not None and not filt.is_empty:
                mask = self._allowed(filt)
                available = int(mask.sum())
                if available == 0:
                    return np.empty(0, np.int64), np.empty(0, np.float32)
                bitmap = np.packbits(mask, bitorder="little")
                params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap)))
            k_eff = min(k, available)
            scores, slots = self._index.search(query, k_eff, params=params)
            slots, scores = slots[0], scores[0]
            valid = slots >= 0
            slots, scores = slots[valid], scores[valid]
            return self._slots.post_id[slots].copy(), scores.astype(np.float32)

    def lookup(self, post_id: int, include_vector: bool = False) -> PostRecord | None:
        with self._lock:
            slot = self._slot_of.get(int(post_id))
            if slot is None:
                return None
            s = self._slots
            vector = self._index.reconstruct(slot) if include_vector else None
            return PostRecord(
                post_id=int(post_id),
                created_at=float(s.created_at[slot]),
                lang=self._lang_name[int(s.lang[slot])],
                indexed_at=float(s.indexed_at[slot]),
                vector=vector,
            )

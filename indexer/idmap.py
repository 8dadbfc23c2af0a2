"""Post id -> slot for a shard's tens of millions of posts, in flat numpy arrays.

A Python dict of ints costs ~110 bytes a post (two int objects and an entry): at
10M posts that is more than binary codes and every post attribute together. `IdMap`
is an open-addressing hash table (linear probing, multiplicative hashing) over two
arrays, an int64 key and an int32 value a bucket (12 bytes), at most 3/4 full: 16 to 32
bytes a post. Values are slots, so never negative: a bucket's value says whether it is
empty (-1) or deleted (-2), and no state array is needed. At 256 int8 dimensions this
map is a tenth of a post's memory; a byte a bucket less is 1-2 bytes a post. Every operation
takes a batch of ids and works on all of them at once (one numpy pass per probe
step), which is how the shard's applier, its filters and its restore use it; single
lookups (Lookup, `in`) go through the same code with a batch of one.

Not thread-safe: the shard calls it under its lock (reads under the read lock,
writes under the write lock), as it did the dict.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

_EMPTY, _DELETED = -1, -2  # bucket values that are not slots
MAX_VALUE = np.iinfo(np.int32).max
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class IdMap:
    def __init__(self, capacity: int = 1024) -> None:
        size = 1024
        while size * 3 < capacity * 4:
            size *= 2
        self._alloc(size)
        self._len = 0
        self._deleted = 0

    def _alloc(self, size: int) -> None:
        self._keys = np.zeros(size, np.int64)
        self._vals = np.full(size, _EMPTY, np.int32)
        self._shift = np.uint64(64 - (size.bit_length() - 1))
        self._mask = size - 1

    @classmethod
    def from_arrays(cls, keys: np.ndarray, values: np.ndarray) -> "IdMap":
        """A map of distinct `keys` to `values`."""
        m = cls(len(keys))
        m.insert_many(keys, values)
        return m

    @property
    def buckets(self) -> int:
        return self._mask + 1

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._vals.nbytes

    def __len__(self) -> int:
        return self._len

    def __contains__(self, key: int) -> bool:
        return self.get(key) is not None

    def get(self, key: int, default=None):
        slot = self.get_many(np.array([key], np.int64))[0]
        return default if slot < 0 else int(slot)

    def _home(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((keys.astype(np.uint64) * _GOLDEN) >> self._shift).astype(np.int64)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """Bucket of each key, -1 where absent."""
        keys = np.asarray(keys, np.int64)
        out = np.full(len(keys), -1, np.int64)
        todo = np.arange(len(keys))
        pos = self._home(keys)
        while len(todo):
            vals = self._vals[pos]
            hit = (vals >= 0) & (self._keys[pos] == keys[todo])
            out[todo[hit]] = pos[hit]
            go = ~hit & (vals != _EMPTY)  # a deleted bucket does not end a probe sequence
            todo, pos = todo[go], (pos[go] + 1) & self._mask
        return out

    def get_many(self, keys: np.ndarray) -> np.ndarray:
        """The value of each key, -1 where absent."""
        where = self._find(keys)
        return np.where(where >= 0, self._vals[np.maximum(where, 0)].astype(np.int64), -1)

    def insert_many(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Set key -> value; keys must be distinct within the call."""
        keys = np.asarray(keys, np.int64)
        values = np.asarray(values, np.int64)
        if len(values) and (values.min() < 0 or values.max() > MAX_VALUE):
            raise ValueError(f"IdMap values are slots in [0, {MAX_VALUE}]")
        where = self._find(keys)
        known = where >= 0
        self._vals[where[known]] = values[known]
        keys, values = keys[~known], values[~known]
        if not len(keys):
            return
        if self.needs_room(len(keys)):
            self._rehash(self._len + len(keys))
        self._place(keys, values)
        self._len += len(keys)

    def _place(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Put keys known to be absent into free buckets (empty or deleted)."""
        todo = np.arange(len(keys))
        pos = self._home(keys)
        while len(todo):
            free = self._vals[pos] < 0
            # Of several keys probing the same free bucket, the first takes it.
            candidates = np.flatnonzero(free)
            _, first = np.unique(pos[candidates], return_index=True)
            won = candidates[first]
            b = pos[won]
            self._deleted -= int(np.count_nonzero(self._vals[b] == _DELETED))
            self._keys[b], self._vals[b] = keys[todo[won]], values[todo[won]]
            go = np.ones(len(todo), bool)
            go[won] = False
            todo, pos = todo[go], (pos[go] + 1) & self._mask

    def pop_many(self, keys: Iterable[int] | np.ndarray) -> np.ndarray:
        """Remove the keys present; their values, each once, in no particular order."""
        keys = np.unique(np.fromiter(keys, np.int64) if not isinstance(keys, np.ndarray) else keys.astype(np.int64))
        where = self._find(keys)
        where = where[where >= 0]
        values = self._vals[where].astype(np.int64)
        self._vals[where] = _DELETED
        self._len -= len(where)
        self._deleted += len(where)
        if self._deleted * 4 > (self._mask + 1):  # long probe chains through deleted buckets
            self._rehash(self._len)
        return values

    def needs_room(self, n: int) -> bool:
        """Whether inserting `n` new keys would rehash (copy) the whole table."""
        return (self._len + self._deleted + n) * 4 > (self._mask + 1) * 3

    def grown(self, n: int) -> "IdMap":
        """A copy with the same entries and room for `n` more keys without a rehash; this map
        is only read. The shard builds it beside its searches and swaps it in under its
        write lock, as it does its vector store: a rehash of a 6M-post map under that lock
        held every search for ~0.5 s."""
        bigger = IdMap.__new__(IdMap)
        bigger._rehash_from(self, self._len + n)
        return bigger

    def _rehash(self, wanted: int) -> None:
        self._rehash_from(self, wanted)

    def _rehash_from(self, source: "IdMap", wanted: int) -> None:
        live = source._vals >= 0
        keys, values = source._keys[live], source._vals[live]
        size = 1024
        while size < 2 * max(wanted, 1):  # half full at most after a rehash (then 3/4 at most: 16-32 B a post)
            size *= 2
        self._alloc(size)
        self._len, self._deleted = len(keys), 0
        self._place(keys, values)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, values) of every entry, in no particular order."""
        live = self._vals >= 0
        return self._keys[live].copy(), self._vals[live].astype(np.int64)

"""Dynamic batching of a shard's concurrent searches.

An exact search reads every row once per call. With the torch store a batch of B
queries reads them once for all B (one matmul), so on a GPU, and on a CPU too, B
concurrent queries cost little more than one. The gRPC handlers hand their query
to a `SearchBatcher` (a `feedret.microbatch.MicroBatcher`); one worker searches
whatever has queued since its last batch, up to `max_batch`, in one `search_batch`
call per index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from feedret.microbatch import MicroBatcher


class BatchSearchable(Protocol):
    def search_batch(
        self, queries: np.ndarray, ks: Sequence[int], filts: Sequence[Any]
    ) -> list[tuple[np.ndarray, np.ndarray]]: ...


@dataclass
class _Pending:
    index: BatchSearchable
    query: np.ndarray
    k: int
    filt: Any


def _search(items: list[_Pending]) -> list[tuple[np.ndarray, np.ndarray]]:
    return items[0].index.search_batch(np.stack([i.query for i in items]), [i.k for i in items],
                                       [i.filt for i in items])


def _same_call(item: _Pending) -> tuple[int, int]:
    # One call per index (the shard's index object can be replaced while queries wait)
    # and query width (full-width and served-width queries are both accepted).
    return id(item.index), len(item.query)


class SearchBatcher:
    """Coalesces concurrent searches into batched ones. Thread-safe; one worker thread.

    A lone search (nothing queued or in flight) runs on the caller's thread, as the root's
    coalescer does: handing it to the worker and back cost a lone query 1-2 ms here
    (benchmarks/shard_batching.py, 1 client: 0.68-0.84x the QPS of no batcher). Searches
    arriving meanwhile queue behind it and run together. A search running inline is not cut
    short by `timeout` (a search bounds itself); a queued one still is.
    """

    def __init__(self, max_batch: int = 32, name: str = "search-batcher", inline: bool = True) -> None:
        self._batcher: MicroBatcher[_Pending, tuple[np.ndarray, np.ndarray]] = MicroBatcher(
            _search, max_batch, name, group=_same_call, inline=inline
        )

    @property
    def max_batch(self) -> int:
        return self._batcher.max_batch

    @property
    def batches(self) -> int:
        return self._batcher.batches

    @property
    def queries(self) -> int:
        return self._batcher.items

    @property
    def pending(self) -> int:
        return self._batcher.pending

    @property
    def in_flight(self) -> int:
        return self._batcher.in_flight

    def search(self, index: BatchSearchable, query: np.ndarray, k: int, filt: Any = None,
               timeout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (post ids, scores) of one query, as `index.search` would answer it.

        Raises what the batched search raised, or TimeoutError after `timeout` seconds.
        """
        item = _Pending(index, np.asarray(query, np.float32).reshape(-1), int(k), filt)
        return self._batcher.call(item, timeout)

    def close(self) -> None:
        self._batcher.close()

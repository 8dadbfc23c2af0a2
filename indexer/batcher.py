"""Dynamic batching of a shard's concurrent searches.

An exact search reads every row once per call. With the torch store a batch of B
queries reads them once for all B (one matmul), so on a GPU, and on a CPU too, B
concurrent queries cost little more than one. The gRPC handlers hand their query
to a `SearchBatcher`; one worker searches whatever has queued since its last
batch, up to `max_batch`, in one `search_batch` call. Nothing waits for a batch
to fill: an idle shard searches a lone query at once, and batches form only when
queries arrive faster than searches finish, i.e. exactly under load.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np


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
    future: Future = field(default_factory=Future)


class SearchBatcher:
    """Coalesces concurrent searches into batched ones. Thread-safe; one worker thread."""

    def __init__(self, max_batch: int = 32, name: str = "search-batcher") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.batches = 0  # searches run (for tests and logs)
        self.queries = 0
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def search(self, index: BatchSearchable, query: np.ndarray, k: int, filt: Any = None,
               timeout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (post ids, scores) of one query, as `index.search` would answer it.

        Raises what the batched search raised, or TimeoutError after `timeout` seconds.
        """
        item = _Pending(index, np.asarray(query, np.float32).reshape(-1), int(k), filt)
        with self._cond:
            if self._closed:
                raise RuntimeError("the search batcher is closed")
            self._queue.append(item)
            self._cond.notify()
        try:
            return item.future.result(timeout=timeout)
        except TimeoutError:
            item.future.cancel()  # still queued: the worker skips it
            raise

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(5)

    def _take(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            batch = []
            while self._queue and len(batch) < self.max_batch:
                batch.append(self._queue.popleft())
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            # One call per index (the shard's index object can be replaced while queries wait)
            # and query width (full-width and served-width queries are both accepted).
            by_index: dict[tuple[int, int], list[_Pending]] = {}
            for item in batch:
                by_index.setdefault((id(item.index), len(item.query)), []).append(item)
            for items in by_index.values():
                live = [i for i in items if i.future.set_running_or_notify_cancel()]
                if not live:
                    continue
                try:
                    results = live[0].index.search_batch(
                        np.stack([i.query for i in live]), [i.k for i in live], [i.filt for i in live]
                    )
                except BaseException as exc:  # noqa: BLE001 - every caller gets the error, the worker lives on
                    for i in live:
                        i.future.set_exception(exc)
                    continue
                self.batches += 1
                self.queries += len(live)
                for i, result in zip(live, results):
                    i.future.set_result(result)

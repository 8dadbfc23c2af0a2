"""Dynamic micro-batching: concurrent callers' items, run together as one batch.

A model's forward pass or an exact search costs little more for B items than for
one (on a GPU nearly nothing more), so a server whose handlers each hand their item
to a `MicroBatcher` serves B concurrent requests for about the price of one. One
worker takes whatever has queued since its last batch, up to `max_batch`, and
calls `run` on it. Nothing waits for a batch to fill: a lone item runs at once,
and batches form only when items arrive faster than batches finish, i.e. exactly
under load. Used by the shards' searches and the member service's forward passes.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable, Generic, Hashable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class NotStarted(Exception):
    """An item `MicroBatcher.call` withdrew, unrun, because no batch took it within `start_within`."""


class MicroBatcher(Generic[T, R]):
    """Coalesces concurrent items into calls of `run(items) -> results` (same order). Thread-safe.

    `group`, when given, splits a batch into one `run` call per key (items `run` cannot
    take together, such as queries for different indexes); an error in one call fails
    only that call's items, and the worker goes on.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        max_batch: int = 32,
        name: str = "micro-batcher",
        group: Callable[[T], Hashable] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.batches = 0  # run calls that succeeded (for metrics, tests and logs)
        self.items = 0  # items those calls answered
        self._run = run
        self._group = group
        self._queue: deque[tuple[T, Future]] = deque()
        self._taken = 0  # items the worker holds: taken from the queue, not yet answered
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    @property
    def pending(self) -> int:
        """Items queued and not yet taken by the worker."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Items the worker has taken and not yet answered (the batch it is running)."""
        return self._taken

    def submit(self, item: T) -> Future:
        """Queue one item; its future gets the item's result or the batch's error.

        Cancelling the future before the worker takes it drops the item unrun.
        """
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append((item, future))
            self._cond.notify()
        return future

    def call(self, item: T, timeout: float | None = None, start_within: float | None = None) -> R:
        """`submit` and wait: the item's result, the batch's error, or TimeoutError after `timeout` s.

        With `start_within`, an item the worker has not taken into a batch by then (the batch
        in flight is slow) is withdrawn unrun: NotStarted, so the caller can go another way.
        """
        future = self.submit(item)
        if start_within is not None:
            with self._cond:
                taken = self._cond.wait_for(lambda: future.running() or future.done(), start_within)
            if not taken and future.cancel():
                raise NotStarted(f"not taken into a batch within {start_within:g} s")
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()  # still queued: the worker skips it
            raise

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(5)

    def _take(self) -> list[tuple[T, Future]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            batch = []
            while self._queue and len(batch) < self.max_batch:
                batch.append(self._queue.popleft())
            self._taken = len(batch)
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            # Every taken item is running from now (not cancelled by a caller's start_within).
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            with self._cond:
                self._cond.notify_all()
            groups: dict[Hashable, list[tuple[T, Future]]] = {}
            for entry in live:
                groups.setdefault(self._group(entry[0]) if self._group else None, []).append(entry)
            for entries in groups.values():
                self._answer(entries)
            self._taken = 0

    def _answer(self, live: list[tuple[T, Future]]) -> None:
        try:
            results = self._run([item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"a batch of {len(live)} items got {len(results)} results")
        except BaseException as exc:  # noqa: BLE001 - every caller gets the error, the worker lives on
            for _, fut in live:
                fut.set_exception(exc)
            return
        self.batches += 1
        self.items += len(live)
        for (_, fut), result in zip(live, results):
            fut.set_result(result)

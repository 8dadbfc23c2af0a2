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
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable, Generic, Hashable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


# A batch running this many times longer than the recent mean is stuck, not slow (MicroBatcher.call).
STALL_FACTOR = 4.0


class NotStarted(Exception):
    """An item `MicroBatcher.call` withdrew, unrun, because no batch took it within `start_within`."""


class MicroBatcher(Generic[T, R]):
    """Coalesces concurrent items into calls of `run(items) -> results` (same order). Thread-safe.

    `group`, when given, splits a batch into one `run` call per key (items `run` cannot
    take together, such as queries for different indexes); an error in one call fails
    only that call's items, and the worker goes on. `inline`: `call` runs a lone item (nothing
    queued or in flight) on the caller's thread, sparing the hand-off to the worker and back;
    items arriving meanwhile queue as they would behind the worker's batch (`run` never runs
    twice at once). Such a run is not cut short by `timeout`: `run` must bound itself.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        max_batch: int = 32,
        name: str = "micro-batcher",
        group: Callable[[T], Hashable] | None = None,
        inline: bool = False,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.batches = 0  # run calls that succeeded (for metrics, tests and logs)
        self.items = 0  # items those calls answered
        self._run = run
        self._group = group
        self._inline = inline
        # Per item: its future, and the event set when a batch takes it (callers with start_within wait on it).
        self._queue: deque[tuple[T, Future, threading.Event | None]] = deque()
        self._taken = 0  # items the worker holds: taken from the queue, not yet answered
        self._batch_started: float | None = None  # monotonic start of the batch in flight, None between batches
        self._mean_batch_s = 0.0  # moving mean of recent batches' durations
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
        return self._submit(item, None)

    def _submit(self, item: T, taken: threading.Event | None) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append((item, future, taken))
            if not self._taken:  # else the batch in flight notifies when it ends (_finished)
                self._cond.notify()
        return future

    def call(self, item: T, timeout: float | None = None, start_within: float | None = None,
             stalled_after: float | None = None) -> R:
        """`submit` and wait: the item's result, the batch's error, or TimeoutError after `timeout` s.

        With `start_within`, an item the worker has not taken into a batch by then is withdrawn
        unrun: NotStarted, so the caller can go another way. With `stalled_after` as well, it is
        withdrawn sooner once the batch in flight has run longer than `stalled_after` and than
        STALL_FACTOR times the recent batches' mean: the worker is stuck (a call hanging), not
        busy. A queue of healthy batches is waited out: under load the items queue behind
        several batches, and sending them on their own would add the load batching saves.
        """
        # Each caller waits on its own event, not on the worker's condition: a condition's
        # notify_all per batch woke every queued caller (64 clients, batches of 16: 48 woke
        # for nothing), which cost the root more CPU per query than the batching saved.
        if self._inline and self._claim_inline():
            return self._run_inline(item)
        taken = threading.Event() if start_within is not None else None
        future = self._submit(item, taken)
        if taken is not None and not self._wait_taken(taken, start_within, stalled_after) and future.cancel():
            # cancel() fails once the worker has marked it running: then it is in a batch.
            raise NotStarted(f"not taken into a batch within {start_within:g} s")
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()  # still queued: the worker skips it
            raise

    def _claim_inline(self) -> bool:
        with self._cond:
            if self._queue or self._taken or self._closed:
                return False
            self._taken, self._batch_started = 1, time.monotonic()
            return True

    def _run_inline(self, item: T) -> R:
        started = self._batch_started
        try:
            results = self._run([item])
            if len(results) != 1:
                raise RuntimeError(f"a batch of 1 item got {len(results)} results")
            self.batches += 1
            self.items += 1
        finally:
            self._finished(started)
        return results[0]

    def _finished(self, started: float) -> None:
        """A batch (the worker's or an inline run) ended: the next may start."""
        took = time.monotonic() - started
        with self._cond:
            if self._mean_batch_s:  # a stalled batch moves the mean by no more than a slow one would
                took = min(took, STALL_FACTOR * self._mean_batch_s)
                self._mean_batch_s = 0.8 * self._mean_batch_s + 0.2 * took
            else:
                self._mean_batch_s = took
            self._batch_started = None
            self._taken = 0
            if self._queue:  # items queued behind this run: the worker's turn. Otherwise it
                self._cond.notify()  # would wake for nothing, once per query at low load

    def _wait_taken(self, taken: threading.Event, start_within: float, stalled_after: float | None) -> bool:
        """Whether a batch took the item before `start_within`, or before the batch in flight stalled."""
        give_up = time.monotonic() + start_within
        while True:
            now = time.monotonic()
            wake = give_up
            if stalled_after is not None:
                started = self._batch_started  # read once: the worker sets it
                if started is None:  # between batches: look again once the next is under way
                    wake = min(wake, now + stalled_after)
                else:
                    stalled_at = started + max(stalled_after, STALL_FACTOR * self._mean_batch_s)
                    if now >= stalled_at:
                        return taken.is_set()
                    wake = min(wake, stalled_at)
            if taken.wait(max(wake - now, 0.0)):
                return True
            if time.monotonic() >= give_up:
                return False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(5)

    def _take(self) -> list[tuple[T, Future, threading.Event | None]] | None:
        with self._cond:
            # Nothing queued, or an inline run in flight: batches form behind it.
            while (not self._queue or self._taken) and not self._closed:
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
            started = self._batch_started = time.monotonic()
            # Every taken item is running from now (not cancelled by a caller's start_within).
            live = [(item, fut) for item, fut, _ in batch if fut.set_running_or_notify_cancel()]
            for _, _, taken in batch:
                if taken is not None:
                    taken.set()
            groups: dict[Hashable, list[tuple[T, Future]]] = {}
            for entry in live:
                groups.setdefault(self._group(entry[0]) if self._group else None, []).append(entry)
            for entries in groups.values():
                self._answer(entries)
            self._finished(started)

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

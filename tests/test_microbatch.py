"""The micro-batcher behind the shards' searches and the member service's forward passes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from feedret.microbatch import MicroBatcher, NotStarted


class Gated:
    """A batch function that blocks on its first call until released, recording every batch."""

    def __init__(self, answer=lambda items: [x * 10 for x in items]) -> None:
        self.calls: list[list] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.answer = answer

    def __call__(self, items):
        self.calls.append(list(items))
        self.started.set()
        self.release.wait(10)
        return self.answer(items)


def wait_pending(batcher: MicroBatcher, n: int) -> None:
    for _ in range(2000):
        if batcher.pending == n:
            return
        threading.Event().wait(0.005)
    raise AssertionError(f"pending stayed {batcher.pending}, wanted {n}")


def test_items_queued_behind_a_batch_run_together_and_each_caller_gets_its_own_result():
    run = Gated()
    batcher = MicroBatcher(run, max_batch=4)
    try:
        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(batcher.call, 0)
            run.started.wait(5)
            rest = [pool.submit(batcher.call, i) for i in range(1, 7)]
            wait_pending(batcher, 6)
            run.release.set()
            assert first.result(5) == 0 and [f.result(5) for f in rest] == [10 * i for i in range(1, 7)]
        # In arrival order, at most max_batch per call.
        assert run.calls[0] == [0] and sorted(x for c in run.calls[1:] for x in c) == list(range(1, 7))
        assert all(len(c) <= 4 for c in run.calls) and len(run.calls) == 3
        assert batcher.batches == 3 and batcher.items == 7
    finally:
        run.release.set()
        batcher.close()


def test_groups_go_to_separate_calls_and_one_groups_failure_spares_the_other():
    def answer(items):
        if items[0] % 2:
            raise ValueError("odd batch")
        return items

    run = Gated(answer)
    batcher = MicroBatcher(run, max_batch=8, group=lambda x: x % 2)
    try:
        blocker = batcher.submit(0)
        run.started.wait(5)
        futures = [batcher.submit(i) for i in range(1, 6)]
        run.release.set()
        assert blocker.result(5) == 0
        assert [futures[i].result(5) for i in (1, 3)] == [2, 4]
        for i in (0, 2, 4):
            with pytest.raises(ValueError, match="odd batch"):
                futures[i].result(5)
        assert sorted(map(sorted, run.calls[1:])) == [[1, 3, 5], [2, 4]]
        assert batcher.call(6, timeout=5) == 6  # the worker lives on
    finally:
        batcher.close()


def test_a_batch_function_that_answers_the_wrong_number_of_items_fails_those_callers_clearly():
    batcher = MicroBatcher(lambda items: items[:-1], max_batch=4)
    try:
        with pytest.raises(RuntimeError, match="a batch of 1 items got 0 results"):
            batcher.call("x", timeout=5)
    finally:
        batcher.close()


def test_an_item_cancelled_while_queued_is_never_run_and_a_timed_out_call_is_dropped():
    run = Gated()
    batcher = MicroBatcher(run, max_batch=4)
    try:
        busy = batcher.submit(1)
        run.started.wait(5)
        dropped = batcher.submit(2)
        assert dropped.cancel()
        with pytest.raises(TimeoutError):
            batcher.call(3, timeout=0.05)
        kept = batcher.submit(4)
        run.release.set()
        assert busy.result(5) == 10 and kept.result(5) == 40
        assert run.calls == [[1], [4]]
    finally:
        batcher.close()


def test_an_item_no_batch_takes_within_start_within_is_withdrawn_and_one_taken_is_answered():
    run = Gated()
    batcher = MicroBatcher(run, max_batch=4)
    try:
        busy = batcher.submit(1)  # the worker is held in this batch
        run.started.wait(5)
        with pytest.raises(NotStarted):
            batcher.call(2, timeout=5, start_within=0.05)
        run.release.set()
        assert busy.result(5) == 10 and batcher.call(3, timeout=5, start_within=1) == 30
        assert [c for c in run.calls if 2 in c] == []  # withdrawn, never run
    finally:
        run.release.set()
        batcher.close()


def test_a_closed_batcher_refuses_work_and_max_batch_must_be_positive():
    batcher = MicroBatcher(lambda items: items)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)
    with pytest.raises(ValueError, match="at least 1"):
        MicroBatcher(lambda items: items, max_batch=0)


def test_items_queued_behind_healthy_batches_wait_them_out_instead_of_going_alone():
    # Under load items queue behind several batches; withdrawing them after a fixed time sent
    # them on their own and added the very load batching saves (issue #18).
    def run(items):
        threading.Event().wait(0.2)  # every batch as slow as the last: busy, not stuck
        return [x * 10 for x in items]

    batcher = MicroBatcher(run, max_batch=1)
    try:
        assert batcher.call(0, timeout=5) == 0  # the batches' usual time is known from here on
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda x: batcher.call(x, timeout=30, start_within=30, stalled_after=0.05),
                                    [1, 2, 3, 4]))
        assert answers == [10, 20, 30, 40]  # each waited up to three batches of 0.2 s, none withdrawn
    finally:
        batcher.close()


def test_an_item_behind_a_stalled_batch_is_withdrawn_long_before_start_within():
    run = Gated()
    run.release.set()
    batcher = MicroBatcher(run, max_batch=4)
    try:
        assert batcher.call(1, timeout=5) == 10  # batches take next to nothing
        run.release.clear()
        run.started.clear()
        stuck = batcher.submit(2)
        run.started.wait(5)
        started = time.monotonic()
        with pytest.raises(NotStarted):
            batcher.call(3, timeout=60, start_within=30, stalled_after=0.05)
        assert time.monotonic() - started < 10  # the stall, not start_within's 30 s
        run.release.set()
        assert stuck.result(5) == 20 and [c for c in run.calls if 3 in c] == []
    finally:
        run.release.set()
        batcher.close()


def test_inline_a_lone_item_runs_on_the_callers_thread_and_items_meanwhile_batch_behind_it():
    ran_on: list[str] = []

    def answer(items):
        ran_on.append(threading.current_thread().name)
        return [x * 10 for x in items]

    run = Gated(answer)
    batcher = MicroBatcher(run, max_batch=8, name="the-worker", inline=True)
    try:
        with ThreadPoolExecutor(4, thread_name_prefix="caller") as pool:
            first = pool.submit(batcher.call, 1, 5)
            run.started.wait(5)
            later = [pool.submit(batcher.call, x, 5) for x in (2, 3, 4)]
            wait_pending(batcher, 3)  # queued behind the inline run, not run beside it
            run.release.set()
            assert first.result(5) == 10 and [f.result(5) for f in later] == [20, 30, 40]
        assert run.calls == [[1], [2, 3, 4]]
        assert ran_on[0].startswith("caller") and ran_on[1] == "the-worker"
        assert batcher.batches == 2 and batcher.items == 4
    finally:
        run.release.set()
        batcher.close()

"""The replica policy (feedret.server.replicas) with fake replicas of controlled latency: no servers.

Each fake replica answers after a set delay, fails, or hangs; calls go through
concurrent.futures.Future exactly as the root's go through grpc futures.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, InvalidStateError

import grpc
import pytest

from feedret.server.replicas import Fatal, HedgeBudget, ReplicaSet, call_replicas

HUNG = float("inf")


class StatusError(Exception):
    """What a grpc future's exception() returns: an error with a status code."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class FakeReplica:
    def __init__(self, name: str, latency: float = 0.0, error: grpc.StatusCode | None = None) -> None:
        self.name, self.latency, self.error = name, latency, error
        self.calls: list[float] = []  # timeouts it was called with
        self.futures: list[Future] = []

    @property
    def cancelled(self) -> int:
        return sum(f.cancelled() for f in self.futures)

    def call(self, timeout: float) -> Future:
        self.calls.append(timeout)
        fut: Future = Future()  # left pending, so cancel() works as on a grpc call in flight
        self.futures.append(fut)
        if self.latency == HUNG:
            return fut  # never answers; only cancel() ends it

        def finish() -> None:
            try:
                if self.error is not None:
                    fut.set_exception(StatusError(self.error))
                else:
                    fut.set_result(self.name)
            except InvalidStateError:
                pass  # cancelled meanwhile

        if self.latency <= 0:
            finish()
        else:
            threading.Timer(self.latency, finish).start()
        return fut


class Cluster:
    """Shards of fake replicas, addressed as the root addresses real ones."""

    def __init__(self, shards: list[list[FakeReplica]], cooldown_s: float = 1.0, targets: list[list[str]] | None = None):
        self.replicas = shards
        targets = targets or [[f"host-{s}-{r}:1" for r in range(len(rs))] for s, rs in enumerate(shards)]
        self.sets = [ReplicaSet(s, t, cooldown_s=cooldown_s) for s, t in enumerate(targets)]

    def start(self, shard: int, replica: int, timeout: float) -> Future:
        return self.replicas[shard][replica].call(timeout)

    def query(self, timeout: float = 1.0, hedge_after_s: float = 0.05, **kwargs):
        started = time.monotonic()
        outcomes = call_replicas(self.sets, self.start, started + timeout, hedge_after_s, **kwargs)
        return outcomes, time.monotonic() - started


def invalid(exc: BaseException) -> bool:
    return exc.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_queries_are_spread_round_robin_over_every_replica_of_every_shard():
    cluster = Cluster([[FakeReplica("0a"), FakeReplica("0b")], [FakeReplica("1a"), FakeReplica("1b"), FakeReplica("1c")]])
    for _ in range(12):
        outcomes, _ = cluster.query()
        assert all(o.ok for o in outcomes)
    assert [len(r.calls) for r in cluster.replicas[0]] == [6, 6]
    assert [len(r.calls) for r in cluster.replicas[1]] == [4, 4, 4]


def test_a_down_replica_is_skipped_within_the_same_request_and_then_tried_last():
    dead, live = FakeReplica("dead", error=grpc.StatusCode.UNAVAILABLE), FakeReplica("live")
    cluster = Cluster([[dead, live]], cooldown_s=60)
    answers = []
    for _ in range(6):
        (outcome,), elapsed = cluster.query(timeout=1.0)
        answers.append(outcome.reply)
        assert outcome.ok and not outcome.timed_out and elapsed < 0.5
    assert answers == ["live"] * 6
    # Tried once (failing over to "live" in that request), then only after the healthy one.
    assert len(dead.calls) == 1 and len(live.calls) == 6


def test_without_a_cooldown_a_down_replica_costs_a_failover_every_other_request():
    dead, live = FakeReplica("dead", error=grpc.StatusCode.UNAVAILABLE), FakeReplica("live")
    cluster = Cluster([[dead, live]], cooldown_s=0)
    outcomes = [cluster.query()[0][0] for _ in range(4)]
    assert all(o.reply == "live" for o in outcomes)
    assert [o.failed_over for o in outcomes].count(True) == 2 and len(dead.calls) == 2


def test_a_hung_replica_is_hedged_to_the_next_one_and_cancelled():
    hung, live = FakeReplica("hung", latency=HUNG), FakeReplica("live", latency=0.005)
    cluster = Cluster([[hung, live]], cooldown_s=0)
    for _ in range(4):
        (outcome,), elapsed = cluster.query(timeout=1.0, hedge_after_s=0.05)
        assert outcome.reply == "live" and not outcome.timed_out
        assert elapsed < 0.5
    # Every other request went to the hung replica first and was hedged after ~50 ms.
    assert len(hung.calls) == 2 and hung.cancelled == 2
    assert len(live.calls) == 4


def test_without_hedging_a_hung_replica_fails_its_shard_at_the_deadline():
    hung, live = FakeReplica("hung", latency=HUNG), FakeReplica("live")
    cluster = Cluster([[hung, live], [FakeReplica("other")]], cooldown_s=0)
    (shard0, shard1), elapsed = cluster.query(timeout=0.3, hedge_after_s=0)
    assert not shard0.ok and shard0.timed_out and shard1.reply == "other"
    assert 0.28 < elapsed < 0.6
    assert hung.cancelled == 1 and not live.calls


def test_a_slow_first_replica_loses_to_the_hedge_and_goes_last_for_the_cooldown():
    slow, fast = FakeReplica("slow", latency=0.4), FakeReplica("fast", latency=0.01)
    cluster = Cluster([[slow, fast]], cooldown_s=60)
    (outcome,), elapsed = cluster.query(timeout=2.0, hedge_after_s=0.05)
    assert outcome.reply == "fast" and outcome.hedged and elapsed < 0.35
    assert slow.cancelled == 1
    assert cluster.sets[0].suspects(time.monotonic()) == [0]
    # The next requests start on the fast replica, though rotation would pick the slow one next.
    for _ in range(3):
        (outcome,), _ = cluster.query(timeout=2.0, hedge_after_s=0.05)
        assert outcome.reply == "fast" and not outcome.hedged
    assert len(slow.calls) == 1


def test_the_first_answer_wins_even_when_it_is_the_replica_asked_first():
    first, hedge = FakeReplica("first", latency=0.12), FakeReplica("hedge", latency=1.0)
    cluster = Cluster([[first, hedge]], cooldown_s=60)
    (outcome,), elapsed = cluster.query(timeout=2.0, hedge_after_s=0.05)
    assert outcome.reply == "first" and outcome.hedged and elapsed < 0.6
    assert hedge.cancelled == 1
    assert cluster.sets[0].suspects(time.monotonic()) == []  # the hedge was not slow, only late to start


def test_a_shard_fails_only_when_no_replica_answers_in_time():
    a, b = FakeReplica("a", latency=HUNG), FakeReplica("b", latency=HUNG)
    cluster = Cluster([[a, b]])
    (outcome,), elapsed = cluster.query(timeout=0.3, hedge_after_s=0.05)
    assert not outcome.ok and outcome.timed_out
    assert 0.28 < elapsed < 0.6
    assert a.cancelled == b.cancelled == 1
    assert sorted(cluster.sets[0].suspects(time.monotonic())) == [0, 1]


def test_when_every_replica_fails_the_shard_fails_at_once_with_the_last_error():
    cluster = Cluster([[FakeReplica("a", error=grpc.StatusCode.UNAVAILABLE),
                        FakeReplica("b", error=grpc.StatusCode.RESOURCE_EXHAUSTED)]])
    (outcome,), elapsed = cluster.query(timeout=5.0)
    assert not outcome.ok and not outcome.timed_out and elapsed < 1.0
    assert outcome.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [(r, kind) for r, kind, _ in outcome.attempts] == [(0, "first"), (1, "failover")]


def test_a_fatal_error_stops_the_whole_fan_out_and_cancels_the_rest():
    bad = FakeReplica("bad", error=grpc.StatusCode.INVALID_ARGUMENT)
    other = FakeReplica("other", latency=HUNG)
    cluster = Cluster([[bad, FakeReplica("never")], [other]])
    started = time.monotonic()
    with pytest.raises(Fatal) as err:
        cluster.query(timeout=5.0, fatal=invalid)
    assert time.monotonic() - started < 1.0
    assert err.value.shard == 0 and err.value.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert other.cancelled == 1 and not cluster.replicas[0][1].calls  # no failover for the caller's mistake


def test_a_single_replica_is_neither_hedged_nor_retried():
    only = FakeReplica("only", latency=HUNG)
    cluster = Cluster([[only]])
    (outcome,), elapsed = cluster.query(timeout=0.3, hedge_after_s=0.02)
    assert not outcome.ok and outcome.timed_out and len(only.calls) == 1


def test_a_dns_pool_target_gets_a_second_call_which_its_channel_sends_to_another_replica():
    pool = FakeReplica("pool", latency=HUNG)
    cluster = Cluster([[pool]], targets=[["dns:///feedret-shard-0:50061"]])
    (outcome,), _ = cluster.query(timeout=0.3, hedge_after_s=0.05)
    assert [(r, kind) for r, kind, _ in outcome.attempts] == [(0, "first"), (0, "hedge")]
    assert len(pool.calls) == 2


def test_each_attempt_gets_what_is_left_of_the_deadline():
    hung, live = FakeReplica("hung", latency=HUNG), FakeReplica("live")
    cluster = Cluster([[hung, live]], cooldown_s=0)
    cluster.query(timeout=1.0, hedge_after_s=0.2)
    assert 0.95 < hung.calls[0] <= 1.0
    assert 0.7 < live.calls[0] < 0.81


def test_a_call_that_cannot_start_counts_as_a_failed_attempt():
    live = FakeReplica("live")
    cluster = Cluster([[FakeReplica("x"), live]], cooldown_s=0)

    def start(shard, replica, timeout):
        if replica == 0:
            raise RuntimeError("channel closed")
        return live.call(timeout)

    outcome = call_replicas(cluster.sets, start, time.monotonic() + 1, 0.05)[0]
    assert outcome.reply == "live" and outcome.attempts[0] == (0, "first", "RuntimeError")


# ------------------------------------------------------------ hedge budget


def test_the_hedge_budget_allows_a_burst_then_one_hedge_per_ratio_of_first_calls():
    budget = HedgeBudget(ratio=0.1, burst=3)
    assert [budget.spend() for _ in range(4)] == [True, True, True, False]  # the burst
    for _ in range(9):
        budget.earn()
    assert not budget.spend()  # 0.9 of a token
    budget.earn()
    assert budget.spend() and not budget.spend()  # 10 first calls bought one hedge
    for _ in range(1000):
        budget.earn()
    assert budget.tokens == 3  # capped at the burst
    assert not HedgeBudget(ratio=0).spend()
    with pytest.raises(ValueError):
        HedgeBudget(ratio=-1)


def test_when_every_replica_is_slow_hedging_stops_at_the_budget_instead_of_doubling_the_load():
    # A fleet-wide slowdown: every replica answers after 40 ms, past the 10 ms hedge delay.
    # Without a budget each request would make two calls; with ratio 0.1 and a burst of 2,
    # 40 requests make at most 2 + 40 * 0.1 = 6 hedges, and every request is still answered.
    slow = [FakeReplica("a", latency=0.04), FakeReplica("b", latency=0.04)]
    cluster = Cluster([slow], cooldown_s=0)
    budget = HedgeBudget(ratio=0.1, burst=2)
    outcomes = [cluster.query(timeout=1.0, hedge_after_s=0.01, budget=budget)[0][0] for _ in range(40)]
    assert all(o.ok for o in outcomes)
    hedged = sum(o.hedged for o in outcomes)
    assert 2 <= hedged <= 6, hedged
    assert sum(o.hedge_denied for o in outcomes) == 40 - hedged
    assert sum(len(r.calls) for r in slow) == 40 + hedged

    unlimited = Cluster([[FakeReplica("a", latency=0.04), FakeReplica("b", latency=0.04)]], cooldown_s=0)
    assert sum(unlimited.query(timeout=1.0, hedge_after_s=0.01)[0][0].hedged for _ in range(10)) == 10


def test_a_hung_replica_is_still_hedged_within_the_budget():
    # The case hedging is for (one bad replica) costs ~1 hedge per 2 requests; a 50% budget covers it.
    hung, live = FakeReplica("hung", latency=HUNG), FakeReplica("live")
    cluster = Cluster([[hung, live]], cooldown_s=0)
    budget = HedgeBudget(ratio=0.5, burst=2)
    outcomes = [cluster.query(timeout=1.0, hedge_after_s=0.02, budget=budget)[0][0] for _ in range(10)]
    assert all(o.reply == "live" for o in outcomes) and not any(o.hedge_denied for o in outcomes)


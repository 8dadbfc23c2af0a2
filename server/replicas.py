"""Which replica of a shard answers a query: spread, fail over, hedge.

The policy, with no gRPC in it: a call is started through a callable that
returns a future (a grpc.Future in the root, a concurrent.futures.Future in the
tests), so it can be tested with fakes of controlled latency.

Per request and shard:
- replicas are tried in round-robin order, so load spreads; a replica that
  recently failed, missed a deadline or was overtaken by a hedge goes last for
  `cooldown_s`, so a dead or hung replica stops costing every query;
- a failed attempt (any error but a fatal one, e.g. INVALID_ARGUMENT) is
  followed at once by the next replica while the deadline leaves time;
- when the attempt in flight has not answered after `hedge_after_s`, the same
  request goes to the next replica too (at most two in flight); the first answer
  wins and the other is cancelled;
- hedges draw on a shared budget (`HedgeBudget`): at most a set fraction of extra
  calls over first attempts, so when every replica slows down at once, hedging
  cannot double the load on a fleet that is already struggling;
- the shard counts as failed only when no replica answered before the deadline.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from feedret.shard_targets import is_pool

# A pool target (dns:) is one channel over many replicas; its round_robin picks
# another replica for each call, so a second call to it is a retry elsewhere.
POOL_ATTEMPTS = 2
MAX_IN_FLIGHT = 2  # the attempt and one hedge


class CallFuture(Protocol):
    def add_done_callback(self, fn: Callable[[Any], None]) -> None: ...
    def cancel(self) -> bool: ...
    def cancelled(self) -> bool: ...
    def exception(self, timeout: float | None = None) -> BaseException | None: ...
    def result(self, timeout: float | None = None) -> Any: ...


class ReplicaSet:
    """One shard's replicas and what the root has lately seen of them. Thread-safe."""

    def __init__(self, shard: int, targets: Sequence[str], cooldown_s: float = 1.0) -> None:
        if not targets:
            raise ValueError(f"shard {shard} has no replica")
        self.shard = shard
        self.targets = list(targets)
        self.cooldown_s = cooldown_s
        self._next = itertools.count()
        self._suspect_until = [0.0] * len(self.targets)
        self._lock = threading.Lock()

    def plan(self, now: float) -> list[int]:
        """Replica indices in the order this request tries them.

        Round robin from a rotating start; replicas in cooldown after the others;
        a pool target appears POOL_ATTEMPTS times (its channel picks a different
        replica each time).
        """
        n = len(self.targets)
        start = next(self._next) % n
        order = [(start + i) % n for i in range(n)]
        with self._lock:
            order.sort(key=lambda i: self._suspect_until[i] > now)  # stable: rotation kept within each group
        out = list(order)
        for i in order:
            if is_pool(self.targets[i]):
                out.extend([i] * (POOL_ATTEMPTS - 1))
        return out

    def suspect(self, replica: int, now: float) -> None:
        with self._lock:
            self._suspect_until[replica] = now + self.cooldown_s

    def healthy(self, replica: int) -> None:
        with self._lock:
            self._suspect_until[replica] = 0.0

    def suspects(self, now: float) -> list[int]:
        with self._lock:
            return [i for i, until in enumerate(self._suspect_until) if until > now]


class HedgeBudget:
    """Token bucket for hedges, as gRPC throttles retries. Thread-safe; shared by all requests.

    Every first call earns `ratio` of a token, up to `burst` tokens; a hedge spends one.
    Over time hedges add at most `ratio` extra calls per first call (0.1: 10%), while a
    burst of slow replies can still be hedged at once. ratio 0: never hedge.
    """

    def __init__(self, ratio: float = 0.1, burst: float = 10.0) -> None:
        if ratio < 0 or burst < 1:
            raise ValueError(f"hedge budget needs ratio >= 0 and burst >= 1, got {ratio}, {burst}")
        self.ratio = ratio
        self.burst = burst
        self._tokens = burst if ratio > 0 else 0.0
        self._lock = threading.Lock()

    def earn(self) -> None:
        with self._lock:
            self._tokens = min(self.burst, self._tokens + self.ratio)

    def spend(self) -> bool:
        with self._lock:
            if self._tokens >= 1.0 - 1e-9:  # ten earnings of 0.1 make a token despite rounding
                self._tokens = max(self._tokens - 1.0, 0.0)
                return True
            return False

    @property
    def tokens(self) -> float:
        with self._lock:
            return self._tokens


@dataclass
class Attempt:
    replica: int
    started: float
    future: CallFuture
    kind: str  # "first"; "failover": after a failure; "hedge": beside a slow attempt


@dataclass
class Outcome:
    """How one shard's part of a request ended."""

    shard: int
    reply: Any = None  # the winning reply; None when the shard failed
    replica: int | None = None  # which replica answered
    error: BaseException | None = None  # the last error, when no replica answered
    timed_out: bool = False  # the deadline passed with attempts still in flight
    # (replica, kind, how it ended: "ok", a status code name, "overtaken", "late", "cancelled"), for logs.
    attempts: list[tuple[int, str, str]] = field(default_factory=list)
    hedge_denied: bool = False  # a hedge was due but the budget was spent

    @property
    def ok(self) -> bool:
        return self.reply is not None

    @property
    def hedged(self) -> bool:
        return any(kind == "hedge" for _, kind, _ in self.attempts)

    @property
    def failed_over(self) -> bool:
        return any(kind == "failover" for _, kind, _ in self.attempts)


class Fatal(Exception):
    """A replica's error that no other replica would answer differently (the request is wrong)."""

    def __init__(self, shard: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.shard = shard
        self.error = error


class _Shard:
    def __init__(self, replicas: ReplicaSet, now: float) -> None:
        self.replicas = replicas
        self.plan = replicas.plan(now)
        self.next = 0
        self.in_flight: dict[int, Attempt] = {}
        self.hedge_at = float("inf")
        self.outcome = Outcome(replicas.shard)
        self.done = False

    def can_start(self) -> bool:
        return self.next < len(self.plan) and len(self.in_flight) < MAX_IN_FLIGHT


def call_replicas(
    shards: Sequence[ReplicaSet],
    start: Callable[[int, int, float], CallFuture],
    deadline: float,
    hedge_after_s: float,
    fatal: Callable[[BaseException], bool] = lambda exc: False,
    clock: Callable[[], float] = time.monotonic,
    budget: HedgeBudget | None = None,
) -> list[Outcome]:
    """Ask every shard, each through its replicas, until each answered or the deadline passed.

    `start(shard, replica, timeout_s)` begins one call and returns its future.
    Returns one Outcome per shard, in order. Raises Fatal (after cancelling every
    call in flight) when a replica's error is fatal(error). `budget`: hedges are
    made only while it has tokens (None: always).
    """
    events: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    now = clock()
    states = [_Shard(rs, now) for rs in shards]
    ids = itertools.count()

    def launch(s: int, kind: str) -> None:
        st = states[s]
        replica = st.plan[st.next]
        st.next += 1
        t = clock()
        try:
            fut = start(st.replicas.shard, replica, max(deadline - t, 0.001))
        except Exception as exc:  # noqa: BLE001 - a call that cannot even start is a failed attempt
            fut = _failed(exc)
        aid = next(ids)
        st.in_flight[aid] = Attempt(replica, t, fut, kind)
        st.hedge_at = t + hedge_after_s if hedge_after_s > 0 else float("inf")
        fut.add_done_callback(lambda _f, s=s, aid=aid: events.put((s, aid)))

    for s in range(len(states)):
        launch(s, "first")
        if budget is not None:
            budget.earn()

    try:
        while not all(st.done for st in states):
            now = clock()
            if now >= deadline:
                break
            wake = min([deadline] + [st.hedge_at for st in states if not st.done and st.can_start()])
            try:
                s, aid = events.get(timeout=max(wake - now, 0.0))
            except queue.Empty:
                s = aid = None
            if s is not None:
                st = states[s]
                attempt = st.in_flight.pop(aid, None)
                if attempt is not None and not st.done:
                    _settle(st, attempt, clock(), fatal)
                    if not st.done and not st.in_flight and st.next < len(st.plan) and clock() < deadline:
                        launch(s, "failover")  # the next replica, now
                    elif not st.done and not st.in_flight:
                        st.done = True  # every replica tried and failed
            now = clock()
            for s, st in enumerate(states):
                if not st.done and st.in_flight and now >= st.hedge_at and st.can_start() and now < deadline:
                    if budget is None or budget.spend():
                        launch(s, "hedge")
                    else:
                        st.hedge_at = float("inf")  # wait for this attempt (or fail over if it fails)
                        st.outcome.hedge_denied = True
    except Fatal:
        for st in states:
            _cancel_all(st, "cancelled")
        raise
    now = clock()
    for st in states:
        if not st.done:
            # Out of time: whatever is still in flight was too slow.
            for attempt in st.in_flight.values():
                st.replicas.suspect(attempt.replica, now)
            st.outcome.timed_out = bool(st.in_flight)
            _cancel_all(st, "late")
            st.done = True
    return [st.outcome for st in states]


def _cancel_all(st: _Shard, how: str) -> None:
    for attempt in st.in_flight.values():
        attempt.future.cancel()
        st.outcome.attempts.append((attempt.replica, attempt.kind, how))
    st.in_flight.clear()


def _settle(st: _Shard, attempt: Attempt, now: float, fatal: Callable[[BaseException], bool]) -> None:
    """One attempt ended: a win ends the shard, a failure marks the replica."""
    fut = attempt.future
    error = None if not fut.cancelled() else _Cancelled()
    if error is None:
        error = fut.exception()
    if error is None:
        st.outcome.reply = fut.result()
        st.outcome.replica = attempt.replica
        st.outcome.attempts.append((attempt.replica, attempt.kind, "ok"))
        st.replicas.healthy(attempt.replica)
        # Attempts started before the winner were overtaken: slow, so tried last for a while.
        for other in st.in_flight.values():
            if other.started < attempt.started:
                st.replicas.suspect(other.replica, now)
        _cancel_all(st, "overtaken")
        st.done = True
        return
    st.outcome.attempts.append((attempt.replica, attempt.kind, _code_name(error)))
    if fatal(error):
        raise Fatal(st.replicas.shard, error)
    st.outcome.error = error
    st.replicas.suspect(attempt.replica, now)


class _Cancelled(Exception):
    pass


def _code_name(error: BaseException) -> str:
    code = getattr(error, "code", None)
    if callable(code):
        try:
            return code().name
        except Exception:  # noqa: BLE001 - only a label for logs
            pass
    return type(error).__name__


def _failed(exc: BaseException) -> CallFuture:
    from concurrent.futures import Future

    fut: Future = Future()
    fut.set_exception(exc)
    return fut

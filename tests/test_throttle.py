"""Throttle: log lines a flood would multiply pass at a bounded rate and say what they stand for."""

from __future__ import annotations

import numpy as np
from structlog.testing import capture_logs

from feedret.config import ShardConfig
from feedret.indexer.replica import ShardState
from feedret.logging import Throttle
from feedret.v1 import feedret_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_up_to_the_rate_then_the_next_line_counts_what_was_held_back():
    clock = Clock()
    throttle = Throttle(3.0, clock=clock)
    assert [throttle.allow() for _ in range(5)] == [0, 0, 0, None, None]
    clock.now += 0.34  # one more token
    assert throttle.allow() == 2 and throttle.allow() is None
    clock.now += 10  # a quiet spell refills to the burst, not beyond
    assert [throttle.allow() for _ in range(4)] == [1, 0, 0, None]


def test_a_writer_of_nan_vectors_at_full_rate_is_counted_in_full_and_logged_at_a_bounded_rate():
    state = ShardState(config=ShardConfig(shard_id=0, num_shards=1), topic="post-vectors")
    nan = [float("nan")] * 8
    events = [(i, pb.PostVectorEvent(post_id=i, op=pb.PostVectorEvent.UPSERT, vector=nan, model_version="broken"))
              for i in range(500)]
    with capture_logs() as logs:
        state.apply(events, now=1e9)
    lines = [e for e in logs if e["event"] == "vector_rejected"]
    assert state.rejected == 500 and state.rejected_reasons == {"non_finite": 500}
    assert 1 <= len(lines) <= 20, len(lines)
    assert lines[0]["not_logged_before"] == 0 and lines[0]["offset"] == 0

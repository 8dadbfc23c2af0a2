"""A shard dies under a running stack: the root keeps answering, flagged partial, inside the deadline."""

from __future__ import annotations

import json
import signal
import time

import grpc
import pytest

from feedret.members import MemberProfile
from feedret.routing import shard_of

from conftest import SAMPLE_MEMBERS, start_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack_losing_a_shard(tmp_path_factory):
    yield from start_stack(tmp_path_factory.mktemp("failures"), n_posts=200)


def test_a_hung_shard_is_cut_off_at_the_deadline_and_flagged(stack_losing_a_shard):
    running = stack_losing_a_shard
    shard_1 = running.stack.procs["shard-1"]
    shard_1.send_signal(signal.SIGSTOP)  # alive, port open, never answers
    try:
        for timeout in (0.2, 0.5):
            started = time.monotonic()
            # Succeeding at all proves the answer beat the gRPC deadline (else DEADLINE_EXCEEDED);
            # the wall-clock bound adds the client's own unmarshalling.
            result = running.client.retrieve(vector=[0.1] * 128, k=20, timeout=timeout)
            assert time.monotonic() - started < timeout + 0.05
            assert result.partial and list(result.failed_shards) == [1]
            assert len(result.candidates) == 20
    finally:
        shard_1.send_signal(signal.SIGCONT)
    assert wait_for_full(running.client)


def wait_for_full(client) -> bool:
    from conftest import wait_for

    def full() -> bool:
        try:
            return not client.retrieve(vector=[0.1] * 128, k=5, timeout=1).partial
        except grpc.RpcError:
            return False

    return wait_for(full, timeout=10)


def test_with_a_shard_killed_queries_answer_partial_within_their_deadline(stack_losing_a_shard):
    running = stack_losing_a_shard
    client = running.client
    member = MemberProfile.from_json(json.loads(SAMPLE_MEMBERS.read_text().splitlines()[0]))
    before = client.retrieve(member=member, k=50, timeout=2)
    assert not before.partial and {c.shard for c in before.candidates} == {0, 1}

    running.stack.kill("shard-1", signal.SIGKILL)
    for timeout in (0.5, 2.0):
        started = time.monotonic()
        after = client.retrieve(member=member, k=50, timeout=timeout)
        assert time.monotonic() - started < timeout + 0.05
        assert after.partial and list(after.failed_shards) == [1]
        # What shard 0 holds still comes back, in the same order, topped up to k from shard 0.
        from_shard_0 = [c.post_id for c in before.candidates if c.shard == 0]
        assert after.post_ids[: len(from_shard_0)] == from_shard_0
        assert len(after.candidates) == 50 and {c.shard for c in after.candidates} == {0}

    # Admin calls say which shard is down instead of failing.
    stats = client.stats()
    assert [s.reachable for s in stats.shards] == [True, False]
    on_dead_shard = next(c.post_id for c in before.candidates if c.shard == 1)
    assert shard_of(on_dead_shard, 2) == 1
    with pytest.raises(grpc.RpcError) as err:
        client.lookup(on_dead_shard)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_with_the_member_service_down_member_queries_fail_as_unavailable_and_vector_queries_work(
    stack_losing_a_shard,
):
    running = stack_losing_a_shard
    running.stack.kill("member", signal.SIGKILL)
    member = MemberProfile(member_id="m-1", session_id="s")
    with pytest.raises(grpc.RpcError) as err:
        running.client.retrieve(member=member, k=5, timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "member embedding service" in err.value.details()
    assert len(running.client.retrieve(vector=[0.1] * 128, k=5, timeout=2).candidates) == 5


def test_a_query_with_all_shards_down_fails_as_unavailable(stack_losing_a_shard):
    stack_losing_a_shard.stack.kill("shard-0", signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        stack_losing_a_shard.client.retrieve(vector=[0.1] * 128, k=5, timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

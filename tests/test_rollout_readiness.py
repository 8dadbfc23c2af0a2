"""When the next generation may be promoted: checked from its shards' own Stats and its consumer
group's offsets, every reason it may not be said (feedret.clients.rollout, no servers)."""

from __future__ import annotations

from feedret.clients.rollout import posts_left, readiness
from feedret.v1 import feedret_pb2 as pb


def shard(model="m2", indexed=100, applied=50, end=50, reachable=True, ready=True) -> pb.ShardStats:
    s = pb.ShardStats(model_version=model, indexed=indexed, end_offset=end, reachable=reachable, ready=ready)
    s.applied.add(topic="post-vectors-b", partition=0, offset=applied)
    return s


SERVING = [shard("m1", 100), shard("m1", 100)]


def test_a_next_generation_holding_every_post_of_one_model_is_ready():
    verdict = readiness(SERVING, [shard(indexed=70), shard(indexed=130)], {0: 10, 1: 20}, {0: 10, 1: 20})
    assert verdict.ready and verdict.reasons == () and verdict.next.model == "m2" and verdict.to_embed == 0


def test_every_reason_it_is_not_ready_is_named():
    verdict = readiness(SERVING, [shard(indexed=40, applied=30, end=45, ready=False), shard(reachable=False),
                                  shard("m3", indexed=20)], {0: 4}, {0: 10, 1: 3})
    assert not verdict.ready
    assert verdict.to_embed == 9  # 6 on partition 0, and all 3 of partition 1, where nothing is committed
    text = " | ".join(verdict.reasons)
    for says in ("1 of its 3 shards do not answer", "serve 2 models (m2, m3)", "9 posts events left",
                 "1 of its shards are still replaying", "15 vector records left", "indexes 60 posts, the serving generation 200"):
        assert says in text, text


def test_unknown_offsets_are_not_taken_for_caught_up():
    verdict = readiness(SERVING, [shard(), shard()], None, {0: 5})
    assert not verdict.ready and "committed no offsets" in verdict.reasons[0]
    assert posts_left({}, {0: 5, 1: 7}) == 12

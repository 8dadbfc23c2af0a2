"""A real stack whose shards serve like production: IVF trained in the background, a Matryoshka
prefix of the model's vectors kept as int8 codes, and retention. Each role is its own process, as in `feedret up`."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest

from feedret.members import MemberProfile
from feedret.server.launcher import Stack
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import SAMPLE_MEMBERS, RunningStack, post_line, sample_lines, stack_config, wait_for

pytestmark = pytest.mark.e2e

RETENTION_S = 40 * 365 * 86_400  # keeps the sample posts (1996-2018)
SERVE_DIMENSION = 64  # of the default model's 128
N_POSTS = 300


@pytest.fixture(scope="module")
def production_like(tmp_path_factory):
    config = stack_config(tmp_path_factory.mktemp("index-options"))
    config.env.update(
        FEEDRET_INDEX_FACTORY="IVF4,Flat",
        FEEDRET_TRAIN_SIZE="100",  # each of the 2 shards gets ~150 of the 300 posts
        FEEDRET_VECTOR_CODEC="int8",
        FEEDRET_CODEC_TRAIN_SIZE="50",  # int8 ranges from each shard's first 50 posts
        FEEDRET_SERVE_DIMENSION=str(SERVE_DIMENSION),
        FEEDRET_RETENTION_S=str(RETENTION_S),
        FEEDRET_SWEEP_INTERVAL_S="0.5",
    )
    with Stack(config) as stack:
        running = RunningStack(stack)
        running.publish(sample_lines(N_POSTS))
        assert wait_for(lambda: running.indexed() >= N_POSTS, timeout=120, interval=0.2), stack.log_tail("shard-0")
        yield running
        running.client.close()


def test_stats_report_the_trained_index_its_widths_and_retention(production_like):
    client = production_like.client
    assert wait_for(lambda: all(s.index_state == "ready" for s in client.stats().shards), timeout=30)
    for s in client.stats().shards:
        assert s.index_type == "IVF4,Flat" and s.rebuilds == 1 and s.buffered == 0
        assert s.index_device == "cpu"  # faiss-cpu here: no GPU copy
        assert (s.dimension, s.vector_dimension) == (SERVE_DIMENSION, 128)
        assert s.retention_s == RETENTION_S
        # One byte a served dimension per row of the store (at least 1,024 rows, grown ahead of
        # the posts): no float32 copy beside the codes.
        rows, rest = divmod(s.vector_bytes, SERVE_DIMENSION)
        assert s.vector_codec == "int8" and rest == 0 and s.indexed <= rows <= max(1024, 2 * s.indexed)


def test_the_root_takes_the_served_width_and_the_full_width_and_refuses_others(production_like):
    client = production_like.client
    served = client.lookup(356, include_vector=True).vector
    assert len(served) == SERVE_DIMENSION
    assert client.retrieve(vector=served, k=5).candidates[0].post_id == 356
    # A full-width vector is truncated to its prefix: what follows the prefix does not matter.
    padded = list(served) + list(np.random.default_rng(0).normal(size=128 - SERVE_DIMENSION))
    assert client.retrieve(vector=padded, k=5).candidates[0].post_id == 356
    # Member vectors come at the model's full width.
    member = MemberProfile.from_json(json.loads(SAMPLE_MEMBERS.read_text().splitlines()[0]))
    assert len(client.retrieve(member=member, k=20).candidates) == 20

    with grpc.insecure_channel(production_like.stack.config.root_address) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        for width in (7, 100, 129):
            with pytest.raises(grpc.RpcError) as err:
                stub.Retrieve(pb.RetrieveRequest(k=5, vector=pb.QueryVector(values=[0.1] * width)), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"has {width} dimensions, the index serves {SERVE_DIMENSION}" in err.value.details()


def test_posts_past_retention_are_not_indexed_and_the_sweep_evicts_posts_as_they_age(production_like):
    running = production_like
    now = time.time()
    expired, ageing, fresh = 9_300_000_001, 9_300_000_002, 9_300_000_003
    running.publish([
        post_line(expired, "a post from before the retention window", created_at=now - RETENTION_S - 60),
        post_line(ageing, "a post about to leave the retention window", created_at=now - RETENTION_S + 4),
        post_line(fresh, "a post well inside the retention window", created_at=now),
    ])
    assert wait_for(lambda: running.found(fresh) and running.found(ageing), timeout=10)
    assert not running.found(expired)
    evicted_before = sum(s.evicted for s in running.client.stats().shards)
    assert wait_for(lambda: not running.found(ageing), timeout=15)
    assert time.time() >= now + 4  # not before it aged out
    assert running.found(fresh)
    assert sum(s.evicted for s in running.client.stats().shards) == evicted_before + 1

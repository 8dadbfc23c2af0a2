"""The shard's gRPC handlers in-process (no broker): events applied, then Search, Lookup and Stats."""

from __future__ import annotations

import numpy as np
import pytest

from feedret.config import ShardConfig
from feedret.indexer.replica import ShardState
from feedret.server.shard import ShardServicer
from feedret.v1 import feedret_pb2 as pb


class Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class Context:
    def abort(self, code, details):
        raise Aborted(code, details)

    def time_remaining(self):
        return None  # no deadline, as grpc reports it


def unit(rng, n, d):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def shard(n=1200, d=32, seed=0, **config):
    state = ShardState(config=ShardConfig(**config), topic="post-vectors")
    rng = np.random.default_rng(seed)
    vecs = unit(rng, n, d)
    events = [
        (i, pb.PostVectorEvent(post_id=100 + i, op=pb.PostVectorEvent.UPSERT, vector=v.tolist(),
                               created_at=1e9 + i, lang="en", model_version="m1"))
        for i, v in enumerate(vecs)
    ]
    for start in range(0, n, 300):
        state.apply(events[start : start + 300], now=2e9)
    return state, ShardServicer(state, "test:0"), vecs


def search(servicer, vector, k=10, **filters):
    return servicer.Search(pb.SearchRequest(vector=list(map(float, vector)), k=k, filters=pb.Filters(**filters)), Context())


@pytest.mark.parametrize(
    "config, index_type, state",
    [
        ({}, "Flat", "exact"),
        ({"index_factory": "HNSW16"}, "HNSW16", "ready"),
        ({"index_factory": "IVF16,Flat", "train_size": 1000}, "IVF16,Flat", "ready"),
        ({"index_factory": "IVF16,Flat", "train_size": 5000}, "IVF16,Flat", "buffering"),
        ({"index_backend": "torch", "index_device": "cpu"}, "torch-exact(cpu)", "exact"),
    ],
    ids=["flat", "hnsw", "ivf-trained", "ivf-buffering", "torch"],
)
def test_stats_report_the_index_type_and_state_and_search_serves_it(config, index_type, state):
    st, servicer, vecs = shard(**config)
    assert st.index.wait_idle(60)
    stats = servicer.Stats(pb.StatsRequest(), Context()).shards[0]
    assert (stats.index_type, stats.index_state, stats.index_device) == (index_type, state, "cpu")
    assert stats.indexed == 1200 and stats.dimension == stats.vector_dimension == 32
    assert stats.buffered == (1200 if state == "buffering" else 0)
    reply = search(servicer, vecs[7], k=5)
    assert reply.candidates.post_ids[0] == 107 and len(reply.candidates.post_ids) == 5
    assert (reply.dimension, reply.vector_dimension, reply.indexed) == (32, 32, 1200)


def test_a_bad_index_factory_is_fatal_not_retried():
    from feedret.indexer.shard_index import IndexConfigError

    state = ShardState(config=ShardConfig(index_factory="IVF16,Nonsense"), topic="t")
    with pytest.raises(IndexConfigError, match="IVF16,Nonsense"):
        state.apply([(0, pb.PostVectorEvent(post_id=1, op=pb.PostVectorEvent.UPSERT, vector=[1.0, 0.0]))], now=0)

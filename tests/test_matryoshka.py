"""FEEDRET_SERVE_DIMENSION: a shard serves a Matryoshka prefix of the model's vectors, re-normalised."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from feedret.indexer.shard_index import IndexOptions, ShardIndex
from feedret.v1 import feedret_pb2 as pb

from test_shard_server import Aborted, search, shard


def unit(rng, n, d):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def prefix(v, d):
    p = v[..., :d]
    return p / np.linalg.norm(p, axis=-1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "torch"])
def test_the_index_stores_and_searches_the_renormalised_prefix(factory):
    rng = np.random.default_rng(0)
    full = unit(rng, 500, 32)
    opts = IndexOptions(serve_dimension=8, backend="torch", device="cpu") if factory == "torch" else \
        IndexOptions(serve_dimension=8, index_factory=factory, background=False)
    ix = ShardIndex(32, options=opts)
    assert (ix.dimension, ix.input_dimension) == (8, 32)
    ix.upsert(list(range(500)), full, [0.0] * 500, ["en"] * 500, 0, model_versions=["m1"] * 500)
    stored = ix.lookup(3, include_vector=True).vector
    assert stored.shape == (8,)
    np.testing.assert_allclose(stored, prefix(full[3], 8), atol=1e-6)

    q = unit(rng, 1, 32)[0]
    by_full, s_full = ix.search(q, 20)
    by_prefix, s_prefix = ix.search(q[:8], 20)  # not normalised by the caller: the index does it
    assert by_full.tolist() == by_prefix.tolist()
    np.testing.assert_allclose(s_full, s_prefix, atol=1e-6)
    if factory != "HNSW16":
        exact = np.argsort(-(prefix(full, 8) @ prefix(q, 8)))[:20]
        assert by_full.tolist() == exact.tolist()
    with pytest.raises(ValueError, match="takes 32 or 8"):
        ix.search(q[:12], 5)


def test_full_width_serving_leaves_vectors_as_they_are():
    ix = ShardIndex(4)
    ix.upsert([1], np.array([[2.0, 0, 0, 0]]), [0.0], ["en"], 0, model_versions=["m1"])
    np.testing.assert_allclose(ix.lookup(1, include_vector=True).vector, [2.0, 0, 0, 0])
    assert ix.search(np.array([0.5, 0, 0, 0]), 1)[1].tolist() == [1.0]


def test_the_shard_accepts_its_width_and_the_full_width_and_refuses_others():
    state, servicer, vecs = shard(n=400, d=32, serve_dimension=16)
    stats = servicer.Stats(pb.StatsRequest(), None).shards[0]
    assert (stats.dimension, stats.vector_dimension) == (16, 32)
    full = search(servicer, vecs[9], k=3)
    short = search(servicer, vecs[9][:16], k=3)
    assert full.candidates.post_ids[0] == short.candidates.post_ids[0] == 109
    assert list(full.candidates.post_ids) == list(short.candidates.post_ids)
    assert (full.dimension, full.vector_dimension) == (16, 32)
    for width in (8, 24, 33):
        with pytest.raises(Aborted) as err:
            search(servicer, vecs[9][:width] if width < 32 else np.ones(width), k=3)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "serves 16 (or the model's full 32, truncated)" in err.value.details
    # Lookup hands back the served vector.
    looked = servicer.Lookup(pb.LookupRequest(post_id=109, include_vector=True), None)
    np.testing.assert_allclose(looked.vector, prefix(vecs[9], 16), atol=1e-6)


def test_vectors_of_another_width_on_the_topic_are_rejected_not_truncated():
    state, servicer, _ = shard(n=10, d=32, serve_dimension=16)
    state.apply([(99, pb.PostVectorEvent(post_id=5, op=pb.PostVectorEvent.UPSERT, vector=[0.1] * 16))], now=0)
    assert state.rejected == 1 and len(state.index) == 10


def test_a_serve_dimension_wider_than_the_vectors_is_fatal():
    from feedret.config import ShardConfig
    from feedret.indexer.replica import ShardState
    from feedret.indexer.shard_index import IndexConfigError

    state = ShardState(config=ShardConfig(serve_dimension=64), topic="t")
    with pytest.raises(IndexConfigError, match="serve_dimension 64"):
        state.apply([(0, pb.PostVectorEvent(post_id=1, op=pb.PostVectorEvent.UPSERT, vector=[0.5] * 32))], now=0)
    with pytest.raises(ValueError, match="exceeds dimension"):
        ShardConfig(serve_dimension=64, dimension=32)

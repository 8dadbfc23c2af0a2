"""The torch brute-force backend: exact, any k up to the index size (no faiss-GPU k<=2048 limit), chunked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feedret.indexer.shard_index import IndexOptions, SearchFilter, ShardIndex
from feedret.indexer.stores import TorchStore, torch_device


def unit(rng, n, d):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk_rows", [1000, 1 << 20], ids=["chunked", "one-chunk"])
def test_k_of_10000_is_exact_and_best_first(chunk_rows):
    rng = np.random.default_rng(0)
    n, d = 12_000, 16
    vecs = unit(rng, n, d)
    ix = ShardIndex(d, options=IndexOptions(backend="torch", device="cpu", torch_chunk_rows=chunk_rows))
    ids = np.arange(n, dtype=np.int64) * 3
    ix.upsert(ids, vecs, created_at=np.arange(n, dtype=float), langs=["en"] * n, indexed_at=0,
              model_versions=["m1"] * n)
    q = unit(rng, 1, d)[0]
    got, scores = ix.search(q, 10_000)
    exact = np.sort(vecs @ q)[::-1][:10_000]
    assert len(got) == 10_000 and len(set(got.tolist())) == 10_000
    np.testing.assert_allclose(scores, exact, atol=1e-5)
    np.testing.assert_allclose(vecs[got // 3] @ q, scores, atol=1e-5)  # each id carries its own score

    # Filtered, still chunked: exactly the matching posts, best first.
    filt = SearchFilter(min_created_at=9_000.0, exclude_post_ids=ids[9_000:9_100].tolist())
    got, scores = ix.search(q, 10_000, filt)
    assert len(got) == 2_900 and set(got.tolist()) == set(ids[9_100:].tolist())
    assert np.all(np.diff(scores) <= 0)


def test_deletes_free_rows_for_reuse_and_never_come_back():
    rng = np.random.default_rng(1)
    vecs = unit(rng, 300, 8)
    ix = ShardIndex(8, options=IndexOptions(backend="torch", device="cpu", torch_chunk_rows=64))
    ix.upsert(list(range(300)), vecs, [0.0] * 300, ["en"] * 300, 0, model_versions=["m1"] * 300)
    ix.delete(range(0, 300, 2))
    got, _ = ix.search(vecs[0], 300)
    assert sorted(got.tolist()) == list(range(1, 300, 2))
    ix.upsert(list(range(1000, 1150)), unit(rng, 150, 8), [0.0] * 150, ["en"] * 150, 0, model_versions=["m1"] * 150)
    assert ix.info().slots == 300  # deleted rows were reused
    assert ix.info().index_type == "torch-exact(cpu)" and ix.state == "exact"


def test_device_auto_picks_cuda_only_when_there_is_one():
    assert torch_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            TorchStore(8, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_results_match_cpu():
    rng = np.random.default_rng(2)
    vecs = unit(rng, 50_000, 64)
    q = unit(rng, 1, 64)[0]
    results = []
    for device in ("cpu", "cuda"):
        ix = ShardIndex(64, options=IndexOptions(backend="torch", device=device, torch_chunk_rows=8192))
        ix.upsert(np.arange(50_000), vecs, np.zeros(50_000), ["en"] * 50_000, 0, model_versions=["m1"] * 50_000)
        results.append(ix.search(q, 5000))
    np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-4)
    assert len(set(results[0][0][:4000].tolist()) ^ set(results[1][0][:4000].tolist())) <= 10  # ties at the edge


@pytest.mark.parametrize("chunk_rows", [700, 1 << 20], ids=["chunked", "one-chunk"])
def test_a_batch_of_queries_gets_each_query_its_own_exact_top_k(chunk_rows):
    rng = np.random.default_rng(3)
    n, d, b, k = 3_000, 16, 7, 250
    vecs = unit(rng, n, d)
    store = TorchStore(d, device="cpu", chunk_rows=chunk_rows)
    store.reserve(n)
    store.write(np.arange(n), vecs)
    mask = rng.random(n) < 0.5
    queries = unit(rng, b, d)
    scores, slots = store.search_batch(queries, k, mask)
    assert scores.shape == slots.shape == (b, k)
    for row in range(b):
        masked = np.where(mask, vecs @ queries[row], -np.inf)
        np.testing.assert_allclose(scores[row], np.sort(masked)[::-1][:k], atol=1e-5)
        assert mask[slots[row]].all()
        one_scores, one_slots = store.search(queries[row], k, mask)  # the single-query path agrees
        np.testing.assert_allclose(one_scores, scores[row], atol=1e-6)

    # Fewer allowed rows than k: the tail is marked with slot -1, never a masked row.
    few = np.zeros(n, bool)
    few[[5, 50, 500]] = True
    scores, slots = store.search_batch(queries, 10, few)
    assert (np.sort(slots[:, :3], axis=1) == [5, 50, 500]).all() and (slots[:, 3:] == -1).all()

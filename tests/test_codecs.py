"""Vector codecs: a post costs what its codec says, recall stays near exact, k up to 10,000 works.

The index behaviour every codec shares (upserts, deletes, filters, snapshots, retention,
concurrency) is checked in test_index_types, test_index_filters, test_snapshots and
test_retention, which run every codec among their index kinds.
"""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

from feedret.config import ShardConfig
from feedret.indexer import codecs
from feedret.indexer.shard_index import IndexConfigError, IndexOptions, SearchFilter, ShardIndex

D = 256


def clustered(rng, n, d=D, centres=200):
    """Unit vectors around a few hundred directions: neighbours that are really near, as
    embeddings of posts on one topic are (uniform random vectors have none)."""
    c = rng.normal(size=(centres, d)).astype(np.float32)
    v = c[rng.integers(0, centres, n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def filled(options: IndexOptions, vecs: np.ndarray) -> ShardIndex:
    ix = ShardIndex(D, options=options)
    n = len(vecs)
    for start in range(0, n, 5000):
        ids = np.arange(start, min(start + 5000, n))
        ix.upsert(ids, vecs[ids], [float(i) for i in ids], ["en" if i % 4 else "de" for i in ids], 0.0,
                  model_versions=["m1"] * len(ids))
    return ix


def faiss_bytes(store) -> int:
    """Bytes the store's faiss indexes (or torch tensors) hold: what a post really costs in memory."""
    if isinstance(store, codecs.TorchStore):
        tensors = [store._rows] + ([store._bits] if getattr(store, "_bits", None) is not None else [])
        return sum(t.element_size() * t.numel() for t in tensors)
    inner = [store] + ([store.full] if isinstance(store, codecs.BinaryStore) else [])
    total = 0
    for s in inner:
        if isinstance(s, codecs.DiskStore):
            continue
        index = s.index
        total += index.codes.size() if hasattr(index, "codes") else index.xb.size()
    return total


CODECS = {
    "float32": (IndexOptions(), 4 * D),
    "float16": (IndexOptions(vector_codec="float16"), 2 * D),
    "int8": (IndexOptions(vector_codec="int8", codec_train_size=2000), D),
    "binary": (IndexOptions(vector_codec="binary", codec_train_size=2000), D // 8 + D),
    "binary-hamming": (IndexOptions(vector_codec="binary", binary_search="hamming", codec_train_size=2000), D // 8 + D),
    # RaBitQ: the sign bits and two floats a post (faiss.IndexRaBitQ), rescored from int8.
    "binary-rabitq": (IndexOptions(vector_codec="binary", binary_search="rabitq", codec_train_size=2000),
                      D // 8 + 8 + D),
    "torch-float16": (IndexOptions(backend="torch", device="cpu", vector_codec="float16"), 2 * D),
    "torch-int8": (IndexOptions(backend="torch", device="cpu", vector_codec="int8", codec_train_size=2000), D),
    "torch-binary": (IndexOptions(backend="torch", device="cpu", vector_codec="binary", codec_train_size=2000),
                     D // 8 + D),
}


@pytest.fixture(scope="module")
def corpus():
    both = clustered(np.random.default_rng(0), 12_020)  # queries from the same topics as the posts
    return both[:12_000], both[12_000:]


@pytest.mark.parametrize("codec", list(CODECS))
def test_a_post_costs_its_codes_and_recall_stays_near_exact(codec, corpus, tmp_path):
    vecs, queries = corpus
    options, per_post = CODECS[codec]
    ix = filled(options, vecs)
    info = ix.info()
    assert info.vector_codec == codec.removeprefix("torch-").split("-")[0]
    assert info.store_bytes == info.store_rows * per_post
    # No float32 copy beside the codes: faiss holds exactly the codes.
    assert faiss_bytes(ix._store) == info.store_bytes
    exact = filled(IndexOptions(), vecs)
    least = {"float32": 1.0, "float16": 0.999, "int8": 0.98, "binary": 0.9, "binary-hamming": 0.8, "binary-rabitq": 0.9}[
        codec.removeprefix("torch-")]
    for k in (100, 2000):
        recall = np.mean([len(set(ix.search(q, k)[0].tolist()) & set(exact.search(q, k)[0].tolist())) / k
                          for q in queries])
        assert recall >= least, (k, recall)


def test_binary_rescored_from_disk_keeps_only_its_bits_in_memory(corpus, tmp_path):
    vecs, queries = corpus
    ix = filled(IndexOptions(vector_codec="binary", rescore_dir=str(tmp_path)), vecs)
    info = ix.info()
    assert info.vector_codec == "binary" and info.store_bytes == info.store_rows * D // 8
    assert faiss_bytes(ix._store) == info.store_bytes
    exact = filled(IndexOptions(), vecs)
    recall = np.mean([len(set(ix.search(q, 100)[0].tolist()) & set(exact.search(q, 100)[0].tolist())) / 100
                      for q in queries])
    assert recall >= 0.9
    # Rescoring reads float32 from disk: scores are the exact inner products.
    got, scores = ix.search(queries[0], 10)
    np.testing.assert_allclose(scores, vecs[got] @ queries[0], rtol=1e-5, atol=1e-6)
    assert list(tmp_path.iterdir()) == []  # the file is unlinked: nothing is left behind


@pytest.mark.parametrize("codec", ["float16", "int8", "binary", "binary-rabitq", "torch-float16", "torch-int8",
                                   "torch-binary"])
def test_k_up_to_ten_thousand_comes_back_best_first_with_filters(codec, corpus):
    vecs, queries = corpus
    ix = filled(CODECS[codec][0], vecs)
    ix.delete(list(range(0, 12_000, 10)))  # 10,800 left
    got, scores = ix.search(queries[0], 10_000)
    assert len(got) == 10_000 == len(set(got.tolist())) and np.all(np.diff(scores) <= 1e-6)
    assert not set(range(0, 12_000, 10)) & set(got.tolist())
    de = SearchFilter(languages=["de"], exclude_post_ids=tuple(range(4, 400, 4)))
    got, _ = ix.search(queries[1], 10_000, de)
    # Every "de" post left: ids divisible by 4 and not deleted (not by 20), 2,400, less the 80
    # excluded ones not deleted already.
    assert len(got) == 2400 - 80
    assert all(i % 4 == 0 and i % 10 and i >= 400 for i in got.tolist())


def test_an_int8_shard_holds_float32_until_its_ranges_are_learned():
    rng = np.random.default_rng(3)
    vecs = clustered(rng, 3000)
    ix = ShardIndex(D, options=IndexOptions(vector_codec="int8", codec_train_size=2000))
    ix.upsert(np.arange(1999), vecs[:1999], [0.0] * 1999, ["en"] * 1999, 0.0, model_versions=["m1"] * 1999)
    assert ix.info().vector_codec == "float32"
    assert ix.search(vecs[5], 1)[0].tolist() == [5]
    ix.upsert(np.arange(1999, 3000), vecs[1999:], [0.0] * 1001, ["en"] * 1001, 0.0, model_versions=["m1"] * 1001)
    info = ix.info()
    assert info.vector_codec == "int8" and info.store_bytes == info.store_rows * D
    assert [ix.search(vecs[i], 1)[0][0] for i in (5, 2500)] == [5, 2500]


@pytest.mark.parametrize("settings, message", [
    ({"vector_codec": "int4"}, "unknown vector_codec 'int4'"),
    ({"vector_codec": "binary", "rescore_dir": "/tmp/x", "index_backend": "torch"}, "faiss backend's"),
    ({"rescore_dir": "/tmp/x"}, "set vector_codec binary"),
    ({"vector_codec": "binary", "binary_search": "cosine"}, "unknown binary_search"),
    ({"vector_codec": "binary", "binary_search": "rabitq", "index_backend": "torch"}, "rabitq is the faiss backend's"),
])
def test_a_codec_configuration_that_cannot_work_is_refused_with_the_reason(settings, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        ShardConfig(**settings)


@pytest.mark.parametrize("options, message", [
    (IndexOptions(vector_codec="int4"), "unknown vector codec"),
    (IndexOptions(vector_codec="binary", rescore_dir="/tmp/x", backend="torch", device="cpu"), "faiss backend's"),
    (IndexOptions(vector_codec="binary", binary_search="rabitq", backend="torch", device="cpu"), "rabitq is the faiss"),
])
def test_an_index_refuses_a_codec_it_cannot_keep(options, message):
    with pytest.raises(IndexConfigError, match=message):
        ShardIndex(D, options=options)


def test_shard_config_carries_the_codec_to_the_index():
    config = ShardConfig(vector_codec="binary", binary_rescore=4, binary_search="hamming", codec_train_size=100)
    ix = ShardIndex(D, options=IndexOptions.from_config(config))
    assert ix.options.vector_codec == "binary" and ix.options.binary_rescore == 4
    ix.upsert(np.arange(100), clustered(np.random.default_rng(4), 100), [0.0] * 100, ["en"] * 100, 0.0,
              model_versions=["m1"] * 100)
    assert ix._store.rescore == 4 and ix._store.search_kind == "hamming"

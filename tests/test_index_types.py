"""ShardIndex with every kind of index: any faiss factory string, and the torch brute-force backend.

Each test checks the index against a plain dict of the posts that should be
live: upserts replace, deletes never come back, k come back when k exist.
"""

from __future__ import annotations

import tempfile
import threading
import time

import faiss
import numpy as np
import pytest

from feedret.config import ShardConfig
from feedret.indexer import faiss_ann
from feedret.indexer.shard_index import IndexConfigError, IndexOptions, SearchFilter, ShardIndex

D = 32

# (id, options): the approximate ones train on 1,000 vectors (IVF16: >39 per list).
KINDS = {
    "flat": IndexOptions(),
    "ivf-flat": IndexOptions(index_factory="IVF16,Flat", train_size=1000),
    "ivf-pq": IndexOptions(index_factory="IVF16,PQ8x4np", train_size=1000),
    "ivf-sq8": IndexOptions(index_factory="IVF16,SQ8", train_size=1000),
    "pca-ivf": IndexOptions(index_factory="PCA16,IVF16,Flat", train_size=1000),
    "ivf-refine": IndexOptions(index_factory="IVF16,Flat,RFlat", train_size=1000),
    "hnsw": IndexOptions(index_factory="HNSW16"),
    "sq8": IndexOptions(index_factory="SQ8", train_size=1000),
    "torch": IndexOptions(backend="torch", device="cpu", torch_chunk_rows=700),
    # Vector codecs (feedret.indexer.codecs): the int8 ranges learn from the first 500 vectors.
    "fp16": IndexOptions(vector_codec="float16"),
    "int8": IndexOptions(vector_codec="int8", codec_train_size=500),
    "binary": IndexOptions(vector_codec="binary", codec_train_size=500),
    "binary-disk": IndexOptions(vector_codec="binary", rescore_dir=tempfile.mkdtemp(prefix="feedret-test-")),
    "binary-hamming": IndexOptions(vector_codec="binary", binary_search="hamming", codec_train_size=500),
    "binary-rabitq": IndexOptions(vector_codec="binary", binary_search="rabitq", codec_train_size=500),
    "ivf-int8": IndexOptions(index_factory="IVF16,Flat", train_size=1000, vector_codec="int8", codec_train_size=500),
    "torch-fp16": IndexOptions(backend="torch", device="cpu", torch_chunk_rows=700, vector_codec="float16"),
    "torch-int8": IndexOptions(backend="torch", device="cpu", torch_chunk_rows=700, vector_codec="int8",
                               codec_train_size=500),
    "torch-binary": IndexOptions(backend="torch", device="cpu", torch_chunk_rows=700, vector_codec="binary",
                                 codec_train_size=500),
}


# Least recall@k against exact search. Random 32-d vectors are the hard case for
# quantisation and projection: 4-bit PQ and PCA to 16 dimensions keep little.
# 32 sign bits say little of a random 32-d vector: binary codes are for wide vectors, and
# test_codecs checks their recall at 256 dimensions.
RECALL = {"flat": 1.0, "torch": 1.0, "ivf-pq": 0.2, "pca-ivf": 0.2, "fp16": 0.95, "int8": 0.8, "binary": 0.25,
          "binary-disk": 0.25, "binary-hamming": 0.25, "binary-rabitq": 0.25, "torch-fp16": 0.95, "torch-int8": 0.8, "torch-binary": 0.25}
# How far a stored vector read back (Lookup) may be from the one written: a codec keeps codes.
VECTOR_ATOL = {"fp16": 1e-3, "int8": 0.02, "binary": 0.02, "binary-hamming": 0.02, "binary-rabitq": 0.02, "ivf-int8": 0.02,
               "torch-fp16": 1e-3, "torch-int8": 0.02, "torch-binary": 0.02}


def unit(rng, n, d=D):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Reference:
    """What the index should hold: post id -> (vector, created_at, lang)."""

    def __init__(self) -> None:
        self.posts: dict[int, tuple[np.ndarray, float, str]] = {}

    def upsert(self, ix: ShardIndex, ids, vecs, created, langs, now=0.0) -> None:
        ix.upsert(list(ids), vecs, created_at=list(created), langs=list(langs), indexed_at=now,
                  model_versions=["m1"] * len(ids))
        for pid, v, c, l in zip(ids, vecs, created, langs):
            self.posts[int(pid)] = (v, float(c), l)

    def delete(self, ix: ShardIndex, ids) -> None:
        ix.delete(list(ids))
        for pid in ids:
            self.posts.pop(int(pid), None)

    def matching(self, filt: SearchFilter | None) -> dict[int, np.ndarray]:
        out = {}
        for pid, (v, created, lang) in self.posts.items():
            if filt is not None:
                if pid in set(filt.exclude_post_ids):
                    continue
                if filt.min_created_at is not None and created < filt.min_created_at:
                    continue
                if filt.languages and lang not in filt.languages:
                    continue
            out[pid] = v
        return out

    def exact(self, query: np.ndarray, k: int, filt: SearchFilter | None = None) -> list[int]:
        m = self.matching(filt)
        ids = np.array(list(m), np.int64)
        if not len(ids):
            return []
        scores = np.stack(list(m.values())) @ query
        return ids[np.argsort(-scores, kind="stable")[:k]].tolist()


def check(ix: ShardIndex, ref: Reference, query, k, filt=None, min_recall=0.0):
    got, scores = ix.search(query, k, filt)
    matching = ref.matching(filt)
    assert len(set(got.tolist())) == len(got), "a post came back twice"
    assert set(got.tolist()) <= set(matching), "a deleted, replaced or filtered-out post came back"
    assert len(got) == min(k, len(matching)), f"{len(got)} came back, {len(matching)} match, k={k}"
    assert np.all(np.diff(scores) <= 1e-6), "not best first"
    if min_recall:
        exact = ref.exact(query, k, filt)
        recall = len(set(exact) & set(got.tolist())) / max(len(exact), 1)
        assert recall >= min_recall, f"recall {recall:.2f}"
    return got


def fill(kind: str, n=2000, seed=0, **changes):
    from dataclasses import replace

    rng = np.random.default_rng(seed)
    ix = ShardIndex(D, options=replace(KINDS[kind], background=False, **changes))
    ref = Reference()
    vecs = unit(rng, n)
    ids = np.arange(n, dtype=np.int64) + 7_000_000_000_000
    for start in range(0, n, 400):
        sl = slice(start, start + 400)
        ref.upsert(ix, ids[sl], vecs[sl], np.arange(n)[sl].astype(float), ["en" if i % 10 else "de" for i in range(n)][sl])
    return ix, ref, ids, vecs, rng


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_index_kind_upserts_deletes_and_fills_k(kind):
    ix, ref, ids, vecs, rng = fill(kind)
    assert ix.state in ("exact", "ready")
    recall = RECALL.get(kind, 0.5)
    for q in unit(rng, 5):
        check(ix, ref, q, 50, min_recall=recall)
    # Its own vector finds a post first (every kind here scores near-exactly at d=32).
    if kind != "ivf-pq":
        assert ix.search(vecs[17], 1)[0].tolist() == [ids[17]]

    # Delete a third, replace another third with new vectors.
    ref.delete(ix, ids[::3])
    new = unit(rng, len(ids[1::3]))
    ref.upsert(ix, ids[1::3], new, [5000.0] * len(new), ["en"] * len(new))
    assert len(ix) == len(ref.posts)
    for q in [*unit(rng, 5), *vecs[:30:3]]:  # including the deleted posts' own vectors
        check(ix, ref, q, 50, min_recall=recall)
    # Replaced posts are found by their new vector, not their old one.
    if kind != "ivf-pq":
        assert ix.search(new[4], 1)[0].tolist() == [ids[1::3][4]]
    for pid in ids[::3][:20]:
        assert ix.lookup(int(pid)) is None
    np.testing.assert_allclose(ix.lookup(int(ids[1::3][4]), include_vector=True).vector, new[4],
                               atol=VECTOR_ATOL.get(kind, 1e-6))

    # k larger than what is left: everything comes back, best first.
    check(ix, ref, vecs[0], 5000)


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-pq", "sq8"])
def test_an_index_that_needs_training_serves_exactly_until_trained_and_searches_never_wait(kind, monkeypatch):
    from dataclasses import replace

    release = threading.Event()
    training = threading.Event()
    real_train = ShardIndex._train

    def slow_train(self, index, vectors):
        training.set()
        assert release.wait(30)
        real_train(self, index, vectors)

    monkeypatch.setattr(ShardIndex, "_train", slow_train)
    rng = np.random.default_rng(1)
    ix = ShardIndex(D, options=replace(KINDS[kind], background=True))
    ref = Reference()
    vecs = unit(rng, 1600)
    ids = np.arange(1600, dtype=np.int64)
    try:
        ref.upsert(ix, ids[:999], vecs[:999], [0.0] * 999, ["en"] * 999)
        assert ix.state == "buffering" and ix.info().buffered == 999
        q = unit(rng, 1)[0]
        assert check(ix, ref, q, 20).tolist() == ref.exact(q, 20)  # exact while buffering

        ref.upsert(ix, ids[999:1000], vecs[999:1000], [0.0], ["en"])  # the 1,000th: training starts
        assert training.wait(10)
        assert ix.state == "training"
        # While it trains: writes land and searches answer at once, exactly.
        started = time.monotonic()
        ref.upsert(ix, ids[1000:1300], vecs[1000:1300], [0.0] * 300, ["en"] * 300)
        ref.delete(ix, ids[:100])
        ref.upsert(ix, ids[200:250], unit(rng, 50), [0.0] * 50, ["en"] * 50)
        for q in unit(rng, 5):
            assert check(ix, ref, q, 20).tolist() == ref.exact(q, 20)
        assert time.monotonic() - started < 5
        assert ix.state == "training"
    finally:
        release.set()
    assert ix.wait_idle(60)
    info = ix.info()
    assert info.state == "ready" and info.buffered == 0 and info.rebuilds == 1
    assert info.ann_entries == len(ref.posts) == len(ix)
    ref.upsert(ix, ids[1300:], vecs[1300:], [0.0] * 300, ["en"] * 300)  # added to the trained index directly
    assert ix.info().buffered == 0
    for q in [*unit(rng, 5), *vecs[:100:10]]:
        check(ix, ref, q, 30, min_recall=RECALL.get(kind, 0.5))


def test_hnsw_deletes_are_tombstones_that_never_come_back_until_a_rebuild_drops_them():
    ix, ref, ids, vecs, rng = fill("hnsw", rebuild_fraction=0.22)
    ref.delete(ix, ids[:400])
    assert ix.tombstones == 400
    ix.maintain()
    assert ix.tombstones == 400, "400 < 0.22 * 2000 entries: no rebuild yet"
    for q in vecs[:400:20]:
        check(ix, ref, q, 50, min_recall=0.8)
    # Replacing a post tombstones its old entry too.
    ref.upsert(ix, ids[400:500], unit(rng, 100), [1.0] * 100, ["en"] * 100)
    assert ix.tombstones == 500
    slots_before = ix.info().slots
    assert slots_before == 2100, "tombstoned slots are not reused before a rebuild"
    ix.maintain()  # 500 tombstones >= 0.22 * 2100 entries: rebuild (inline here)
    info = ix.info()
    assert info.tombstones == 0 and info.rebuilds == 1 and info.ann_entries == len(ref.posts) == 1600
    for q in [*vecs[:500:20], *unit(rng, 5)]:
        check(ix, ref, q, 50, min_recall=0.8)
    # The freed slots are reused.
    ref.upsert(ix, ids[:400], vecs[:400], [2.0] * 400, ["en"] * 400)
    assert ix.info().slots == slots_before


def test_writes_during_a_background_rebuild_are_kept(monkeypatch):
    from dataclasses import replace

    ix, ref, ids, vecs, rng = fill("hnsw", rebuild_fraction=0.1)
    ix.options = replace(ix.options, background=True)
    release, building = threading.Event(), threading.Event()
    real_build_ann = faiss_ann.build_ann

    def slow_build_ann(template, **kw):
        building.set()
        assert release.wait(30)
        return real_build_ann(template, **kw)

    monkeypatch.setattr(faiss_ann, "build_ann", slow_build_ann)
    ref.delete(ix, ids[:300])
    ix.maintain()
    assert building.wait(10) and ix.state == "rebuilding"
    try:
        # Meanwhile: new posts, deletes of old and of brand-new posts, replacements.
        extra_ids = np.arange(100, dtype=np.int64) + 9_000_000
        ref.upsert(ix, extra_ids, unit(rng, 100), [3.0] * 100, ["en"] * 100)
        ref.delete(ix, [*ids[300:350], *extra_ids[:10]])
        ref.upsert(ix, ids[350:400], unit(rng, 50), [3.0] * 50, ["en"] * 50)
        for q in unit(rng, 3):
            check(ix, ref, q, 40, min_recall=0.8)
    finally:
        release.set()
    assert ix.wait_idle(60) and ix.state == "ready"
    info = ix.info()
    # What was deleted or replaced during the build is a tombstone of the new index.
    assert info.ann_entries - info.tombstones == len(ref.posts) == len(ix)
    for q in [*unit(rng, 5), *vecs[300:400:10]]:
        check(ix, ref, q, 40, min_recall=0.8)
    for pid in extra_ids[10:20]:
        assert ix.lookup(int(pid)) is not None


def test_nprobe_and_ef_search_come_from_the_options():

    rng = np.random.default_rng(3)
    vecs = unit(rng, 4000)
    queries = unit(rng, 20)
    recalls = {}
    for nprobe in (1, 64):
        ix = ShardIndex(D, options=IndexOptions(index_factory="IVF64,Flat", train_size=4000, nprobe=nprobe, background=False))
        ix.upsert(list(range(4000)), vecs, [0.0] * 4000, ["en"] * 4000, 0.0, model_versions=["m1"] * 4000)
        hits = 0
        for q in queries:
            exact = np.argsort(-(vecs @ q))[:10]
            hits += len(set(exact.tolist()) & set(ix.search(q, 10)[0].tolist()))
        recalls[nprobe] = hits / 200
    assert recalls[64] == 1.0 and recalls[1] < 0.9  # all lists probed is exact; one is not

    seen = []
    real = faiss_ann.search_params

    def spy(index, sel, nprobe, ef_search, keep):
        if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
            seen.append(ef_search)
        return real(index, sel, nprobe, ef_search, keep)

    ix = ShardIndex(D, options=IndexOptions(index_factory="HNSW8", ef_search=123, background=False))
    ix.upsert(list(range(4000)), vecs, [0.0] * 4000, ["en"] * 4000, 0.0, model_versions=["m1"] * 4000)
    import unittest.mock as mock

    with mock.patch.object(faiss_ann, "search_params", spy):
        ix.search(queries[0], 10)
        ix.search(queries[0], 500)
    assert seen == [123, 500]  # raised to k when k is larger


def test_a_search_runs_faiss_on_the_configured_threads_and_leaves_other_threads_alone():
    # A shard serves concurrent queries on its gRPC workers, one query each: a second
    # OpenMP thread on one HNSW query doubled its CPU (benchmarks/results/grpc_floor_1m.md).
    # The count is per thread, so builds and rebuilds elsewhere keep every core.
    rng = np.random.default_rng(4)
    vecs = unit(rng, 500)
    before = faiss.omp_get_max_threads()
    for threads in (1, 3):
        ix = ShardIndex(D, options=IndexOptions(index_factory="HNSW8", search_threads=threads, background=False))
        ix.upsert(list(range(500)), vecs, [0.0] * 500, ["en"] * 500, 0.0, model_versions=["m1"] * 500)
        seen = []

        def search():
            ix.search(vecs[0], 10)
            seen.append(faiss.omp_get_max_threads())

        worker = threading.Thread(target=search)
        worker.start()
        worker.join()
        assert seen == [threads]
    assert faiss.omp_get_max_threads() == before


@pytest.mark.parametrize(
    "options, dimension, message",
    [
        (IndexOptions(index_factory="IVF16,Bogus"), D, "cannot build"),
        (IndexOptions(index_factory="IDMap,Flat"), D, "IDMap"),
        (IndexOptions(index_factory="PQ8"), D, "cannot filter"),
        (IndexOptions(index_factory="PQ5"), D, "cannot build"),  # 5 does not divide 32
        (IndexOptions(index_factory="IVF256,Flat", train_size=100), D, "train_size"),
        (IndexOptions(backend="torch", index_factory="HNSW32"), D, "must be Flat"),
        (IndexOptions(backend="annoy"), D, "backend"),
        (IndexOptions(serve_dimension=64), D, "serve_dimension"),
    ],
)
def test_unusable_index_configurations_fail_with_the_reason(options, dimension, message):
    with pytest.raises(IndexConfigError, match=message):
        ShardIndex(dimension, options=options)


def test_shard_config_maps_onto_index_options(monkeypatch):
    env = {
        "FEEDRET_INDEX_FACTORY": "IVF1024,PQ32",
        "FEEDRET_TRAIN_SIZE": "50000",
        "FEEDRET_NPROBE": "32",
        "FEEDRET_EF_SEARCH": "200",
        "FEEDRET_SERVE_DIMENSION": "64",
        "FEEDRET_RETENTION_S": "604800",
        "FEEDRET_REBUILD_FRACTION": "0.3",
        "FEEDRET_SEARCH_THREADS": "2",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    opts = IndexOptions.from_config(ShardConfig())
    assert (opts.index_factory, opts.train_size, opts.nprobe, opts.ef_search) == ("IVF1024,PQ32", 50000, 32, 200)
    assert (opts.serve_dimension, opts.retention_s, opts.rebuild_fraction, opts.backend) == (64, 604800, 0.3, "faiss")
    assert opts.search_threads == 2
    monkeypatch.setenv("FEEDRET_INDEX_BACKEND", "torch")
    with pytest.raises(ValueError, match="must be Flat"):
        ShardConfig()
    monkeypatch.setenv("FEEDRET_INDEX_FACTORY", "Flat")
    assert ShardConfig().index_backend == "torch"
    monkeypatch.setenv("FEEDRET_INDEX_BACKEND", "gpu-magic")
    with pytest.raises(ValueError, match="unknown index backend"):
        ShardConfig()
    monkeypatch.setenv("FEEDRET_INDEX_BACKEND", "faiss")
    monkeypatch.setenv("FEEDRET_INDEX_DEVICE", "cpu")
    assert ShardConfig().index_device == "cpu"


def test_default_train_size_is_40_per_centroid():
    assert faiss_ann.default_train_size(faiss_ann.new_index("IVF1024,Flat", 64)) == 40 * 1024
    assert faiss_ann.default_train_size(faiss_ann.new_index("IVF16,PQ8", 64)) == 40 * 256
    assert faiss_ann.default_train_size(faiss_ann.new_index("SQ8", 64)) == 1000


def churn_while_searching(ix: ShardIndex, n: int = 6000, pause: float = 0.0) -> set[int]:
    """One writer upserts n posts in batches, deletes every 7th and calls maintain (so builds
    start and swap in), while 3 threads search; each search checks that no post deleted before
    it started comes back. Returns the deleted ids; raises the first error of any thread."""
    rng = np.random.default_rng(8)
    vecs = unit(rng, n)
    gone: set[int] = set()  # deleted for good before the search that checks them started
    gone_lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer():
        try:
            for start in range(0, n, 200):
                ix.upsert(np.arange(start, start + 200), vecs[start : start + 200], [0.0] * 200, ["en"] * 200, 0.0,
                          model_versions=["m1"] * 200)
                doomed = list(range(start, start + 200, 7))
                ix.delete(doomed)
                with gone_lock:
                    gone.update(doomed)
                ix.maintain()
                time.sleep(pause)  # let searches in between the batches
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            stop.set()

    def searcher(seed):
        local = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                with gone_lock:
                    dead = set(gone)
                got, _ = ix.search(unit(local, 1)[0], 50, SearchFilter(exclude_post_ids=[1, 2, 3]))
                assert not dead & set(got.tolist()) and not {1, 2, 3} & set(got.tolist())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=searcher, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return gone


@pytest.mark.parametrize("kind", ["ivf-flat", "hnsw", "flat", "int8", "binary", "torch-int8"])
def test_concurrent_searches_writes_and_background_builds(kind):
    """Searches run while the applier writes and builds swap in: no errors, no deleted post comes back."""
    from dataclasses import replace

    ix = ShardIndex(D, options=replace(KINDS[kind], background=True, rebuild_fraction=0.05))
    gone = churn_while_searching(ix)
    assert ix.wait_idle(60)
    assert len(ix) == 6000 - len(gone)
    if kind not in ("flat", "int8", "binary", "torch-int8"):  # exact stores: nothing to rebuild
        assert ix.rebuilds >= 1
    if kind in ("int8", "binary", "torch-int8"):  # encoded mid-churn, with searches and writes going on
        assert ix.info().vector_codec == ix.options.vector_codec

"""Dynamic batching: concurrent searches on the torch backend answered in one pass, each exactly as alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from feedret.config import ShardConfig
from feedret.indexer.batcher import SearchBatcher
from feedret.indexer.replica import ShardState
from feedret.indexer.shard_index import IndexOptions, SearchFilter, ShardIndex
from feedret.server import shard as shard_server
from feedret.server.grpc_common import build_server
from feedret.server.shard import ShardServicer
from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

D = 32


def unit(rng, n, d=D):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def torch_index():
    rng = np.random.default_rng(0)
    ix = ShardIndex(D, options=IndexOptions(backend="torch", device="cpu", torch_chunk_rows=700))  # several chunks
    n = 3000
    ix.upsert(list(range(n)), unit(rng, n), created_at=[float(i) for i in range(n)],
              langs=["en" if i % 3 else "de" for i in range(n)], indexed_at=float(n), model_versions=["m1"] * n)
    ix.delete([5, 6, 7])
    return ix


FILTERS = [
    None,
    SearchFilter(),
    SearchFilter(exclude_post_ids=(0, 1, 2, 3, 4, 8, 9)),
    SearchFilter(languages=("de",)),
    SearchFilter(min_created_at=2500.0),
    SearchFilter(min_created_at=2990.0, languages=("en",)),  # fewer posts pass than k
    # 7 pass the age and language filter; 2991 is "de" anyway, so excluding it costs nothing.
    SearchFilter(min_created_at=2990.0, languages=("en",), exclude_post_ids=(2990, 2991, 17)),
]


def test_a_batch_answers_each_query_as_it_would_be_answered_alone(torch_index):
    assert torch_index.batches_searches
    rng = np.random.default_rng(1)
    queries = unit(rng, len(FILTERS))
    ks = [10, 50, 20, 100, 5, 30, 6]
    batched = torch_index.search_batch(queries, ks, FILTERS)
    for q, k, f, (ids, scores) in zip(queries, ks, FILTERS, batched):
        alone_ids, alone_scores = torch_index.search(q, k, f)
        assert list(ids) == list(alone_ids)
        np.testing.assert_allclose(scores, alone_scores, rtol=1e-5, atol=1e-6)
    assert len(batched[5][0]) == 7  # only 2990..2999 pass, of which 7 are "en": fewer than k=30
    assert not {5, 6, 7} & set(batched[0][0].tolist() + batched[1][0].tolist())
    assert len(batched[6][0]) == 6 and 2990 not in batched[6][0]  # exactly k when k pass


def test_full_width_and_served_width_queries_are_batched_apart():
    ix = ShardIndex(D, options=IndexOptions(backend="torch", device="cpu", serve_dimension=16))
    rng = np.random.default_rng(2)
    vecs = unit(rng, 200)
    ix.upsert(list(range(200)), vecs, created_at=[1.0] * 200, langs=["en"] * 200, indexed_at=1.0,
              model_versions=["m1"] * 200)
    batcher = SearchBatcher(8)
    try:
        with ThreadPoolExecutor(8) as pool:
            full = [pool.submit(batcher.search, ix, vecs[i], 1) for i in range(8)]
            served = [pool.submit(batcher.search, ix, vecs[i, :16], 1) for i in range(8)]
            assert [f.result()[0][0] for f in full] == list(range(8))
            assert [f.result()[0][0] for f in served] == list(range(8))
    finally:
        batcher.close()


class SlowIndex:
    """Records each batch; takes 50 ms per call, so queries arriving meanwhile queue up."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.fail = fail

    def search_batch(self, queries, ks, filts):
        self.batches.append(len(queries))
        time.sleep(0.05)
        if self.fail:
            raise RuntimeError("the index broke")
        return [(np.array([int(q[0])]), np.array([1.0], np.float32)) for q in queries]


def test_queries_arriving_during_a_search_are_answered_together_and_a_lone_one_at_once():
    index, batcher = SlowIndex(), SearchBatcher(max_batch=16)
    try:
        started = time.monotonic()
        assert batcher.search(index, np.array([7.0]), 1)[0][0] == 7
        assert time.monotonic() - started < 0.2 and index.batches == [1]  # no waiting for company
        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(batcher.search, index, np.array([float(i)]), 1) for i in range(24)]
            assert [f.result(5)[0][0] for f in futures] == list(range(24))  # each gets its own answer
        assert sum(index.batches) == 25 and max(index.batches) <= 16
        assert len(index.batches) <= 6, index.batches  # 24 queries in a handful of passes, not 24
    finally:
        batcher.close()


def test_an_error_reaches_every_query_of_the_batch_and_the_batcher_goes_on():
    index, batcher = SlowIndex(fail=True), SearchBatcher(max_batch=8)
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(batcher.search, index, np.array([1.0]), 1) for _ in range(4)]
            for f in futures:
                with pytest.raises(RuntimeError, match="the index broke"):
                    f.result(5)
        index.fail = False
        assert batcher.search(index, np.array([3.0]), 1)[0][0] == 3
    finally:
        batcher.close()


def test_a_query_past_its_deadline_is_dropped_from_the_queue():
    index, batcher = SlowIndex(), SearchBatcher(max_batch=1)
    try:
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(batcher.search, index, np.array([1.0]), 1)
            time.sleep(0.01)
            with pytest.raises(TimeoutError):
                batcher.search(index, np.array([2.0]), 1, timeout=0.01)
            busy.result(5)
        time.sleep(0.1)
        assert index.batches == [1]  # the timed-out query was never searched
    finally:
        batcher.close()


def test_the_shard_server_batches_concurrent_searches_and_answers_each_right():
    rng = np.random.default_rng(3)
    config = ShardConfig(index_backend="torch", index_device="cpu", search_batch_max=16)
    state = ShardState(config=config, topic="post-vectors")
    state.ensure_index(D)
    vecs = unit(rng, 2000)
    state.index.upsert(list(range(2000)), vecs, created_at=[1.0] * 2000, langs=["en"] * 2000, indexed_at=1.0,
                       model_versions=["m1"] * 2000)
    servicer = ShardServicer(state, "in-process")
    server, _, port = build_server("127.0.0.1", 0, 16, [lambda s: pb_grpc.add_ShardServiceServicer_to_server(servicer, s)],
                                   shard_server.SERVICE_NAMES)
    server.start()
    try:
        stub = pb_grpc.ShardServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

        def search(i):
            req = pb.SearchRequest(k=5, request_id=f"q{i}")
            req.vector.extend(vecs[i].tolist())
            if i % 2:
                req.filters.exclude_post_ids.append(i)  # its own post excluded: the answer differs
            return stub.Search(req, timeout=10)

        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(search, range(64)))
        for i, reply in enumerate(replies):
            assert (reply.candidates.post_ids[0] == i) is (i % 2 == 0), i
        assert servicer.batcher.queries == 64 and servicer.batcher.batches < 64
    finally:
        server.stop(0)
        servicer.batcher.close()


def test_a_flat_faiss_batch_is_one_search_and_answers_each_query_as_alone():
    rng = np.random.default_rng(4)
    ix = ShardIndex(D)  # Flat, faiss
    n = 3000
    ix.upsert(list(range(n)), unit(rng, n), created_at=[float(i) for i in range(n)],
              langs=["en" if i % 3 else "de" for i in range(n)], indexed_at=float(n), model_versions=["m1"] * n)
    ix.delete([5, 6, 7])
    queries = unit(rng, len(FILTERS))
    ks = [10, 50, 20, 100, 5, 30, 6]
    calls = []
    original = ix._store.search_batch
    ix._store.search_batch = lambda *a: (calls.append(len(a[0])), original(*a))[1]
    batched = ix.search_batch(queries, ks, FILTERS)
    assert calls == [3]  # no filter, an empty one, and the "seen" list share one faiss search
    for q, k, f, (ids, scores) in zip(queries, ks, FILTERS, batched):
        alone_ids, alone_scores = ix.search(q, k, f)
        np.testing.assert_allclose(scores, alone_scores, rtol=1e-5, atol=1e-6)
        # The same ranking; two BLAS kernels may order posts whose scores tie to the last bit apart.
        differ = np.flatnonzero(ids != alone_ids)
        assert np.allclose(scores[differ], alone_scores[differ], atol=1e-6), (ids[differ], alone_ids[differ])
    assert not {0, 1, 2, 3, 4, 8, 9} & set(batched[2][0].tolist()) and len(batched[2][0]) == 20
    assert len(batched[5][0]) == 7 and len(batched[6][0]) == 6
    empty = ShardIndex(D)
    assert [len(ids) for ids, _ in empty.search_batch(queries[:2], [5, 5], [None, None])] == [0, 0]


@pytest.mark.parametrize("factory", ["IVF16,Flat", "HNSW16"])
def test_an_approximate_faiss_batch_is_one_search_and_answers_each_query_as_alone(factory):
    rng = np.random.default_rng(5)
    # nprobe 16 of 16 lists and a wide HNSW search: the approximate answers are the exact
    # ones, so "as alone" can be checked post for post.
    ix = ShardIndex(D, options=IndexOptions(index_factory=factory, train_size=1000, nprobe=16,
                                            ef_search=512, background=False))
    n = 3000
    vecs = unit(rng, n)
    ix.upsert(list(range(n)), vecs, created_at=[float(i) for i in range(n)],
              langs=["en" if i % 3 else "de" for i in range(n)], indexed_at=float(n), model_versions=["m1"] * n)
    ix.delete([5, 6, 7])  # IVF removes them; HNSW cannot and keeps tombstones
    assert ix._ann is not None and (ix.tombstones == 3) is (factory == "HNSW16")
    if factory == "IVF16,Flat":
        # Posts published while a rebuild runs are live but not in the approximate index yet:
        # a batch must find them as a search alone does (exactly, beside the index).
        pending = np.arange(100, 140)
        ix._ann.remove(pending)
        ix._slots.in_ann[pending] = False
        ix._version += 1
    queries = unit(rng, len(FILTERS))
    queries[0] = vecs[120]  # its best match is a post the index does not hold yet
    ks = [10, 50, 20, 100, 5, 30, 6]
    calls = []
    original = ix._ann.search_batch
    ix._ann.search_batch = lambda *a: (calls.append(len(a[0])), original(*a))[1]
    batched = ix.search_batch(queries, ks, FILTERS)
    assert calls[0] == 3  # no filter, an empty one, and the "seen" list share one search
    for q, k, f, (ids, scores) in zip(queries, ks, FILTERS, batched):
        alone_ids, alone_scores = ix.search(q, k, f)
        assert ids.tolist() == alone_ids.tolist()
        np.testing.assert_allclose(scores, alone_scores, rtol=1e-5, atol=1e-6)
    assert batched[0][0][0] == 120
    assert not {5, 6, 7} & set(batched[0][0].tolist() + batched[1][0].tolist())
    assert not {0, 1, 2, 3, 4, 8, 9} & set(batched[2][0].tolist()) and len(batched[2][0]) == 20
    assert len(batched[5][0]) == 7 and len(batched[6][0]) == 6


def test_the_flat_store_answers_small_and_blas_sized_batches_as_each_query_alone():
    from feedret.indexer.stores import BLAS_MIN_BATCH, FaissFlatStore

    rng = np.random.default_rng(9)
    store = FaissFlatStore(D)
    store.reserve(2000)
    store.write(np.arange(1500), unit(rng, 1500))
    mask = np.zeros(store.capacity, bool)
    mask[:1500] = True
    mask[::7] = False  # deleted posts and never-written rows are never found
    for size in (3, BLAS_MIN_BATCH + 8):
        queries = unit(rng, size)
        scores, slots = store.search_batch(queries, 40, mask)
        for q, row_scores, row_slots in zip(queries, scores, slots):
            alone_scores, alone_slots = store.search(q, 40, mask)
            np.testing.assert_allclose(row_scores, alone_scores, rtol=1e-5, atol=1e-6)
            assert mask[row_slots].all() and len(set(row_slots.tolist()) ^ set(alone_slots.tolist())) <= 2


def test_a_lone_search_runs_on_the_callers_thread_and_company_still_batches():
    """No hand-off to the worker and back for a query alone (1-2 ms of a shard's latency at
    low load); queries arriving while it runs are answered together behind it."""

    class ThreadRecordingIndex(SlowIndex):
        def __init__(self) -> None:
            super().__init__()
            self.threads: list[str] = []

        def search_batch(self, queries, ks, filts):
            self.threads.append(threading.current_thread().name)
            return super().search_batch(queries, ks, filts)

    index, batcher = ThreadRecordingIndex(), SearchBatcher(max_batch=16, name="the-worker")
    try:
        assert batcher.search(index, np.array([3.0]), 1)[0][0] == 3
        assert index.threads == [threading.current_thread().name]
        with ThreadPoolExecutor(9) as pool:
            futures = [pool.submit(batcher.search, index, np.array([float(i)]), 1) for i in range(9)]
            assert [f.result(5)[0][0] for f in futures] == list(range(9))
        assert "the-worker" in index.threads[1:] and len(index.batches) < 1 + 9  # some ran together
    finally:
        batcher.close()

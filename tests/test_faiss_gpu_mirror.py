"""IVF indexes searched through a GPU copy (faiss-gpu), with the CPU index as the source of truth.

This machine has no GPU, so the copy here is a CPU clone searched exactly the
way `Mirror` searches a faiss GPU index: no IDSelector (faiss GPU indexes
ignore one), never a removal (they cannot), at most `max_k` results (2,048 on
a GPU). What is checked is the shard's contract on top of such a copy: deleted,
replaced and filtered-out posts never come back, k come back whenever k match,
and whatever the copy cannot answer the CPU index does.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import faiss
import numpy as np
import pytest

from feedret.config import ShardConfig
from feedret.indexer import faiss_ann
from feedret.indexer.shard_index import IndexConfigError, IndexOptions, SearchFilter, ShardIndex
from tests.test_index_types import D, Reference, check, churn_while_searching, unit

IVF = IndexOptions(index_factory="IVF16,Flat", train_size=1000, device="cuda:0", background=False)


class OneGpuShard(ShardIndex):
    """A shard on a machine where faiss sees one GPU; its GPU copies are CPU clones."""

    max_k = faiss_ann.GPU_MAX_K

    def _gpus(self) -> int:
        return 1

    def _mirror_of(self, index):
        return faiss_ann.Mirror(faiss.clone_index(index), threading.Lock(), f"cuda:{self._gpu}",
                                faiss_ann.nlist_of(index), max_k=self.max_k)


def filled(options=IVF, n=2000, seed=0, cls=OneGpuShard):
    rng = np.random.default_rng(seed)
    ix = cls(D, options=options)
    ref = Reference()
    vecs = unit(rng, n)
    ids = np.arange(n, dtype=np.int64) + 5_000_000
    langs = ["en" if i % 10 else "de" for i in range(n)]
    for start in range(0, n, 400):
        sl = slice(start, start + 400)
        ref.upsert(ix, ids[sl], vecs[sl], np.arange(n)[sl].astype(float), langs[sl])
    return ix, ref, ids, vecs, rng


def mirror(ix: ShardIndex) -> faiss_ann.Mirror:
    return ix._ann.mirror


def test_the_gpu_copy_answers_and_deletes_replacements_and_filters_still_hold():
    ix, ref, ids, vecs, rng = filled()
    assert ix.state == "ready" and ix.device == ix.info().index_device == "cuda:0"
    m = ix.gpu_searches
    assert mirror(ix).index.ntotal == ix._ann.ntotal == 2000, "the copy got every add"
    for q in unit(rng, 5):
        check(ix, ref, q, 50, min_recall=0.5)
    assert m.answered == 5 and m.declined == 0

    # Deletes and replacements: a GPU copy cannot remove, so both become tombstones.
    ref.delete(ix, ids[2::5])
    new = unit(rng, len(ids[1::5]))
    ref.upsert(ix, ids[1::5], new, [9000.0] * len(new), ["en"] * len(new))
    assert ix.tombstones == 800 and mirror(ix).index.ntotal == ix._ann.ntotal == 2400
    for q in [*unit(rng, 5), *vecs[1:50:5], *vecs[2:50:5]]:  # including the replaced and deleted posts' old vectors
        check(ix, ref, q, 50, min_recall=0.5)
    assert ix.search(new[3], 1)[0].tolist() == [ids[1::5][3]]

    # Filters: seen posts, age, language, applied to the copy's results.
    seen = ref.exact(vecs[2], 30)
    for filt in (SearchFilter(exclude_post_ids=seen), SearchFilter(min_created_at=1000.0),
                 SearchFilter(languages=["en"]), SearchFilter(languages=["de"], exclude_post_ids=seen[:5])):
        got = check(ix, ref, vecs[2], 40, filt, min_recall=0.5)
        assert not set(got.tolist()) & set(filt.exclude_post_ids)
    assert m.answered >= 18, (m.answered, m.declined)


def test_the_copy_and_the_cpu_index_give_the_same_results_when_every_list_is_probed():
    gpu, ref, ids, vecs, rng = filled(replace(IVF, nprobe=16))
    cpu, _, _, _, _ = filled(replace(IVF, nprobe=16, device="cpu"), cls=ShardIndex)
    assert cpu.device == "cpu" and cpu._ann.mirror is None
    ref.delete(gpu, ids[:300])
    cpu.delete(ids[:300].tolist())
    filt = SearchFilter(languages=["en"], exclude_post_ids=ids[300:320].tolist())
    for q in unit(rng, 4):
        for f in (None, filt):
            a, sa = gpu.search(q, 64, f)
            b, sb = cpu.search(q, 64, f)
            assert a.tolist() == b.tolist() == ref.exact(q, 64, f)
            np.testing.assert_allclose(sa, sb, atol=1e-5)
    assert gpu.gpu_searches.answered == 8


def test_what_the_copy_cannot_answer_the_cpu_index_does():
    class SmallGpu(OneGpuShard):
        max_k = 64  # a GPU's k limit (2,048) scaled down to this index

    ix, ref, ids, vecs, rng = filled(cls=SmallGpu)
    m = ix.gpu_searches
    q = unit(rng, 1)[0]
    check(ix, ref, q, 60, min_recall=0.5)
    assert (m.answered, m.declined) == (1, 0)
    # k above the GPU's limit.
    check(ix, ref, q, 100, min_recall=0.5)
    assert m.declined == 1
    # A filter passing 10%: the depth that would leave k after it is far beyond the limit.
    got = check(ix, ref, q, 30, SearchFilter(languages=["de"]), min_recall=0.5)
    assert m.declined == 2 and len(got) == 30
    # A few seen posts: the depth wanted is a little over the limit, the limit still leaves k.
    seen = ref.exact(q, 3)
    got = check(ix, ref, q, 60, SearchFilter(exclude_post_ids=seen), min_recall=0.5)
    assert (m.answered, m.declined) == (2, 2) and not set(got.tolist()) & set(seen)
    # Too many excluded near the top for the limit: the GPU's 64 leave fewer than k, the CPU answers.
    seen = ref.exact(q, 20)
    got = check(ix, ref, q, 60, SearchFilter(exclude_post_ids=seen), min_recall=0.5)
    assert (m.answered, m.declined) == (2, 3) and len(got) == 60 and not set(got.tolist()) & set(seen)
    # k larger than what is left: everything comes back.
    check(ix, ref, q, 5000)


def test_a_failing_gpu_copy_is_dropped_and_the_cpu_index_serves():
    ix, ref, ids, vecs, rng = filled()

    class Broken:
        ntotal = 2000

        def search(self, *a, **kw):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        def add_with_ids(self, *a):
            raise AssertionError("a failed copy gets no more writes")

    mirror(ix).index = Broken()
    for q in unit(rng, 3):
        check(ix, ref, q, 50, min_recall=0.5)
    assert "illegal memory access" in mirror(ix).failed
    assert ix.info().index_device == "cpu"
    ref.upsert(ix, [1, 2], unit(rng, 2), [0.0, 0.0], ["en", "en"])
    check(ix, ref, unit(rng, 1)[0], 50, min_recall=0.5)


def test_a_rebuild_drops_the_tombstones_from_both_and_reuses_their_slots():
    ix, ref, ids, vecs, rng = filled(replace(IVF, rebuild_fraction=0.2))
    old = mirror(ix)
    ref.delete(ix, ids[:500])
    assert ix.tombstones == 500 and ix.info().slots == 2000
    ix.maintain()  # 500 >= 0.2 * 2000: rebuilt inline
    info = ix.info()
    assert info.tombstones == 0 and info.rebuilds == 2 and info.ann_entries == 1500
    assert mirror(ix) is not old and mirror(ix).index.ntotal == 1500
    ref.upsert(ix, ids[:500], vecs[:500], [1.0] * 500, ["en"] * 500)
    assert ix.info().slots == 2000, "freed slots are reused after the rebuild"
    for q in [*unit(rng, 4), *vecs[:500:100]]:
        check(ix, ref, q, 50, min_recall=0.5)
    assert ix.gpu_searches.answered >= 9 and mirror(ix).counts is ix.gpu_searches, "counted across rebuilds"
    assert ix.info().gpu_searches == ix.gpu_searches.answered


def test_a_restored_snapshot_gets_a_gpu_copy_of_what_it_loaded():
    cpu, ref, ids, vecs, rng = filled(replace(IVF, device="cpu"), cls=ShardIndex)
    ref.delete(cpu, ids[:100])
    meta, sections = cpu.export_state()
    ix = OneGpuShard.from_state(meta, sections, IVF)
    assert ix.device == "cuda:0" and mirror(ix).index.ntotal == ix._ann.ntotal == 1900
    assert not ix._ann.removable, "with a copy that cannot remove, deletes become tombstones"
    ref.delete(ix, ids[100:200])
    assert ix.tombstones == 100
    for q in [*unit(rng, 4), *vecs[:200:40]]:
        check(ix, ref, q, 50, min_recall=0.5)
    assert ix.gpu_searches.answered >= 9


@pytest.mark.parametrize(
    "factory, device, gpus, message",
    [
        ("HNSW16", "cuda", 1, "no GPU version of IndexHNSWFlat"),
        ("PCA16,IVF16,Flat", "cuda:0", 1, "no GPU version of IndexPreTransform"),
        ("IVF16,Flat", "cuda:1", 1, r"faiss sees 1 GPU\(s\)"),
        ("IVF16,Flat", "cuda", 0, r"faiss sees 0 GPU\(s\) \(the `gpu` extra installs faiss-gpu\)"),
    ],
)
def test_a_gpu_the_index_cannot_use_refuses_to_start_with_the_reason(factory, device, gpus, message):
    class Shard(OneGpuShard):
        def _gpus(self) -> int:
            return gpus

    with pytest.raises(IndexConfigError, match=message):
        Shard(D, options=replace(IVF, index_factory=factory, device=device))


def test_auto_uses_the_gpu_where_faiss_has_one_and_the_cpu_elsewhere():
    assert OneGpuShard(D, options=replace(IVF, device="auto"))._gpu == 0
    hnsw = OneGpuShard(D, options=IndexOptions(index_factory="HNSW16", device="auto"))
    assert hnsw._gpu is None and hnsw.device == "cpu"
    assert OneGpuShard(D, options=replace(IVF, device="cpu"))._gpu is None
    # faiss-cpu, as installed here, sees no GPU.
    assert faiss_ann.gpu_count() == 0
    assert ShardIndex(D, options=replace(IVF, device="auto"))._gpu is None


def test_a_gpu_asked_for_a_flat_index_is_the_torch_store_on_it():
    # No CUDA here: torch says so, where faiss would have searched on the CPU unannounced.
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        ShardIndex(D, options=IndexOptions(device="cuda"))
    assert ShardIndex(D, options=IndexOptions(device="auto")).device == "cpu"


def test_shard_config_takes_a_gpu_for_faiss_and_rejects_unknown_devices(monkeypatch):
    monkeypatch.setenv("FEEDRET_INDEX_FACTORY", "IVF4096,Flat")
    monkeypatch.setenv("FEEDRET_INDEX_DEVICE", "cuda:1")
    assert IndexOptions.from_config(ShardConfig()).device == "cuda:1"
    monkeypatch.setenv("FEEDRET_INDEX_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="one of auto, cpu, cuda, cuda:N"):
        ShardConfig()


def test_a_cpu_shard_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys; from feedret.indexer.shard_index import ShardIndex, IndexOptions; "
            "ShardIndex(8, options=IndexOptions()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "a Flat shard with device auto imported torch on a machine faiss sees no GPU on"


def test_metrics_say_where_a_shard_searches_and_what_its_gpu_copy_answered():
    from types import SimpleNamespace

    from feedret.indexer.metrics import _ShardCollector

    ix, ref, ids, vecs, rng = filled()
    ix.search(vecs[0], 10)
    mirror(ix).max_k = 8
    ix.search(vecs[0], 10)  # above the GPU's k: declined
    state = SimpleNamespace(config=SimpleNamespace(shard_id=3), index=ix, dimension=D, vector_dimension=D,
                            applied_offset=0, end_offset=None, upserts=0, deletes=0, rejected=0, rejected_reasons={},
                            model_version="m", serving_model="m")
    collector = _ShardCollector()
    collector.watch(state)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in collector.collect() for s in f.samples}
    info = ("feedret_shard_index_info", (("device", "cuda:0"), ("index_type", "IVF16,Flat"), ("model_version", "m"),
                                         ("shard", "3"), ("state", "ready")))
    assert samples[info] == 1
    assert samples[("feedret_shard_gpu_copy_searches_total", (("outcome", "answered"), ("shard", "3")))] == 1
    assert samples[("feedret_shard_gpu_copy_searches_total", (("outcome", "declined"), ("shard", "3")))] == 1


def test_searches_writes_and_background_rebuilds_run_together_on_the_gpu_copy():
    """The applier writes and deletes, rebuilds swap in new copies, searches go on: no error,
    no deleted post back, and the copy holds exactly what its CPU index holds at the end."""
    ix = OneGpuShard(D, options=replace(IVF, background=True, rebuild_fraction=0.05))
    gone = churn_while_searching(ix, pause=0.005)
    assert ix.wait_idle(60)
    info = ix.info()
    assert len(ix) == 6000 - len(gone) == info.ann_entries - info.tombstones and info.buffered == 0
    assert ix.device == "cuda:0" and mirror(ix).index.ntotal == ix._ann.ntotal
    # On a loaded machine every search of the churn may have run before the first build
    # finished; after it, the copy answers (the rebuilt one, not a stale one).
    answered = ix.gpu_searches.answered
    got, _ = ix.search(unit(np.random.default_rng(9), 1)[0], 50)
    assert ix.gpu_searches.answered == answered + 1 and not gone & set(got.tolist())


class CountingIndex:
    """Wraps a copy's faiss index, recording how many queries each search call carried."""

    def __init__(self, index) -> None:
        self.index = index
        self.calls: list[int] = []

    def __getattr__(self, name):
        return getattr(self.index, name)

    def search(self, queries, k, params=None):
        self.calls.append(len(queries))
        return self.index.search(queries, k, params=params)


def mixed_batch(ix, ref, ids, rng):
    """Queries with every kind of answer: plain, each filter, one too narrow for the copy, k above its limit."""
    seen = ref.exact(unit(rng, 1)[0], 20)
    queries = unit(rng, 8)
    ks = [10, 50, 40, 30, 60, 100, 30, 2000]
    filts = [None, SearchFilter(languages=["en"]), SearchFilter(exclude_post_ids=seen),
             SearchFilter(min_created_at=500.0), None, None, SearchFilter(languages=["de"]), None]
    return queries, ks, filts


def test_concurrent_searches_reach_the_gpu_copy_as_one_search_with_the_answers_each_would_get_alone():
    class SmallGpu(OneGpuShard):
        max_k = 64

    ix, ref, ids, vecs, rng = filled(replace(IVF, nprobe=16), cls=SmallGpu)  # every list probed: exact
    ref.delete(ix, ids[:200])  # tombstones in the copy
    assert ix.batches_searches
    queries, ks, filts = mixed_batch(ix, ref, ids, rng)
    alone = [ix.search(q, k, f) for q, k, f in zip(queries, ks, filts)]
    counting = mirror(ix).index = CountingIndex(mirror(ix).index)
    m = ix.gpu_searches
    answered, declined = m.answered, m.declined
    batched = ix.search_batch(queries, ks, filts)
    for (a, sa), (b, sb), q, k, f in zip(alone, batched, queries, ks, filts):
        assert a.tolist() == b.tolist() == ref.exact(q, k, f)
        np.testing.assert_allclose(sa, sb, atol=1e-5)
    # One GPU search for five of them. k=100 is above the copy's limit and the 10% filter
    # would need a depth far beyond it: the CPU index answers those two; k=2,000 is more
    # than the shard holds, searched exactly without asking the copy.
    assert counting.calls == [5]
    assert (m.answered - answered, m.declined - declined) == (5, 2)


def test_a_gpu_batch_that_fails_is_answered_by_the_cpu_index_and_the_copy_dropped():
    ix, ref, ids, vecs, rng = filled()
    queries, ks, filts = mixed_batch(ix, ref, ids, rng)

    class Broken:
        ntotal = 2000

        def search(self, *a, **kw):
            raise RuntimeError("CUDA error: out of memory")

    mirror(ix).index = Broken()
    for (got, scores), q, k, f in zip(ix.search_batch(queries, ks, filts), queries, ks, filts):
        matching = ref.matching(f)
        assert len(got) == min(k, len(matching)) and set(got.tolist()) <= set(matching)
    assert "out of memory" in mirror(ix).failed and not ix.batches_searches
    assert ix.search_batch(queries[:1], ks[:1], filts[:1])[0][0].tolist() == ix.search(queries[0], ks[0])[0].tolist()


def test_a_shard_without_a_gpu_copy_does_not_batch_its_faiss_searches():
    cpu, _, _, _, _ = filled(replace(IVF, device="cpu"), cls=ShardIndex)
    assert not cpu.batches_searches
    hnsw = OneGpuShard(D, options=IndexOptions(index_factory="HNSW16", device="auto"))
    assert not hnsw.batches_searches


def test_the_shard_batcher_coalesces_searches_waiting_on_the_gpu():
    from feedret.indexer.batcher import SearchBatcher

    ix, ref, ids, vecs, rng = filled()
    counting = mirror(ix).index = CountingIndex(mirror(ix).index)
    batcher = SearchBatcher(max_batch=16)
    queries = unit(rng, 8)
    results: dict[int, np.ndarray] = {}
    try:
        with mirror(ix).lock:  # the GPU busy: the first query waits, the rest queue behind it
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, batcher.search(ix, queries[i], 20)[0]))
                       for i in range(8)]
            for t in threads:
                t.start()
            # The worker's first batch waits on the lock with the one (or few) that came first;
            # wait until every other query is queued behind it.
            deadline = time.monotonic() + 60
            while batcher.pending + batcher.in_flight < 8 and time.monotonic() < deadline:
                time.sleep(0.005)
            first = batcher.in_flight
        for t in threads:
            t.join(10)
    finally:
        batcher.close()
    assert counting.calls == [first, 8 - first], "the ones that queued went to the GPU together"
    for i, q in enumerate(queries):
        assert results[i].tolist() == ix.search(q, 20)[0].tolist()

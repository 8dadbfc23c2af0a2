import numpy as np
import pytest

from feedret.indexer.shard_index import SearchFilter, ShardIndex


def unit(rng, n, d):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def filled():
    rng = np.random.default_rng(0)
    vecs = unit(rng, 500, 16)
    ix = ShardIndex(16)
    ids = [1000 + i for i in range(500)]
    ix.upsert(ids, vecs, created_at=[float(i) for i in range(500)],
              langs=["en" if i % 2 else "de" for i in range(500)], indexed_at=1.0, model_versions=["m1"] * 500)
    return ix, ids, vecs


def test_exact_search_finds_the_post_itself_first(filled):
    ix, ids, vecs = filled
    got, scores = ix.search(vecs[17], 10)
    assert got[0] == ids[17] and scores[0] == pytest.approx(1.0, abs=1e-5)
    brute = np.argsort(-(vecs @ vecs[17]))[:10]
    assert got.tolist() == [ids[i] for i in brute]


def test_upsert_replaces_the_old_vector(filled):
    ix, ids, vecs = filled
    ix.upsert([ids[3]], vecs[4:5], created_at=[0.0], langs=["en"], indexed_at=2.0, model_versions=["m1"])
    assert len(ix) == 500
    top2 = ix.search(vecs[4], 2)[0].tolist()
    assert set(top2) == {ids[3], ids[4]}
    assert ids[3] not in ix.search(vecs[3], 3)[0].tolist()
    assert ix.lookup(ids[3]).indexed_at == 2.0


def test_last_write_wins_within_one_batch():
    ix = ShardIndex(4)
    v = np.eye(4, dtype=np.float32)
    ix.upsert([7, 7], v[:2], created_at=[0, 0], langs=["en", "en"], indexed_at=0, model_versions=["m1", "m1"])
    assert len(ix) == 1
    np.testing.assert_allclose(ix.lookup(7, include_vector=True).vector, v[1])


def test_delete_removes_and_ignores_unknown(filled):
    ix, ids, vecs = filled
    assert ix.delete([ids[0], 999_999]) == 1
    assert ids[0] not in ix and len(ix) == 499
    assert ids[0] not in ix.search(vecs[0], 20)[0].tolist()


def test_slots_are_recycled_after_delete(filled):
    ix, ids, vecs = filled
    for _ in range(5):
        ix.delete(ids[:100])
        ix.upsert(ids[:100], vecs[:100], created_at=[0.0] * 100, langs=["en"] * 100, indexed_at=0,
                  model_versions=["m1"] * 100)
    assert ix._next_slot == 500


@pytest.mark.parametrize(
    "filt, check",
    [
        (SearchFilter(exclude_post_ids=[1005]), lambda ids, ts, langs: 1005 not in ids),
        (SearchFilter(min_created_at=400.0), lambda ids, ts, langs: all(t >= 400 for t in ts)),
        (SearchFilter(languages=["de"]), lambda ids, ts, langs: set(langs) == {"de"}),
    ],
)
def test_filters_apply_inside_the_search_and_still_fill_k(filled, filt, check):
    ix, ids, vecs = filled
    got, _ = ix.search(vecs[5], 50, filt)
    assert len(got) == 50  # k come back when at least k match
    recs = [ix.lookup(int(p)) for p in got]
    assert check(got.tolist(), [r.created_at for r in recs], [r.lang for r in recs])


def test_filter_matching_fewer_than_k_returns_what_matches(filled):
    ix, ids, vecs = filled
    got, _ = ix.search(vecs[0], 100, SearchFilter(min_created_at=490.0))
    assert sorted(got.tolist()) == ids[490:]
    assert len(ix.search(vecs[0], 5, SearchFilter(languages=["fr"]))[0]) == 0


def test_empty_index_and_k_larger_than_index():
    ix = ShardIndex(4)
    assert len(ix.search(np.ones(4), 5)[0]) == 0
    ix.upsert([1], np.ones((1, 4)), created_at=[0], langs=[""], indexed_at=0, model_versions=["m1"])
    assert ix.search(np.ones(4), 10_000)[0].tolist() == [1]


def test_a_fresh_posts_indexed_time_keeps_its_milliseconds_at_a_quarter_of_the_bytes():
    # indexed_at is kept as float32 seconds after created_at: exact enough to measure freshness.
    ix = ShardIndex(4)
    created = 1_765_000_000.123
    ix.upsert([7], np.ones((1, 4)), created_at=[created], langs=["en"], indexed_at=created + 0.0375,
              model_versions=["m1"])
    got = ix.lookup(7)
    assert got.created_at == created and got.indexed_at - got.created_at == pytest.approx(0.0375, abs=1e-6)
    s = ix._slots
    assert sum(getattr(s, name).itemsize for name in s.NAMES) == 26  # bytes a post beside its vector


def test_a_snapshot_from_before_the_narrow_attributes_restores(filled):
    # Older snapshots kept indexed_at itself (float64) and int32 language/model codes.
    ix, ids, vecs = filled
    meta, sections = ix.export_state()
    old = dict(sections)
    old["indexed_at"] = old.pop("indexed_after").astype(np.float64) + old["created_at"]
    old["lang"], old["model"] = old["lang"].astype(np.int32), old["model"].astype(np.int32)
    back = ShardIndex.from_state(meta, old, ix.options)
    for pid in (ids[0], ids[3], ids[499]):
        a, b = ix.lookup(pid), back.lookup(pid)
        assert (b.indexed_at, b.created_at, b.lang, b.model_version) == (a.indexed_at, a.created_at, a.lang, "m1")
    assert back.search(vecs[3], 5, SearchFilter(languages=("en",)))[0].tolist() == \
        ix.search(vecs[3], 5, SearchFilter(languages=("en",)))[0].tolist()


def test_past_the_language_tables_size_a_post_is_kept_without_a_language(monkeypatch):
    from feedret.indexer import shard_index

    monkeypatch.setattr(shard_index._Interned, "LIMIT", 3)  # "", "en", "de"
    ix = ShardIndex(4)
    v = np.eye(4, dtype=np.float32)
    ix.upsert([1, 2, 3], v[:3], created_at=[1.0] * 3, langs=["en", "de", "fr"], indexed_at=1.0,
              model_versions=["m1"] * 3)
    assert len(ix) == 3 and ix.lookup(3).lang == ""
    assert ix.search(v[2], 3, SearchFilter(languages=("fr",)))[0].tolist() == []
    assert ix.search(v[2], 1)[0].tolist() == [3]

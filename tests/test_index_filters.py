"""Filters run inside the search, and when at least k posts match, k come back: for every index kind.

IVF and HNSW lose recall under a selector (the probed lists or the graph
neighbourhood hold few matching posts); the index widens the search, then falls
back to an exact search of the matching posts, so the count never falls short.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from feedret.indexer.shard_index import SearchFilter, ShardIndex

from test_index_types import D, KINDS, RECALL, Reference, check, unit

N = 3000
# Least recall@k under a filter; exact kinds stay exact, lossy ones lose more on the leftovers.
FILTERED_RECALL = {**RECALL, "ivf-pq": 0.1, "pca-ivf": 0.1}


def filled(kind: str, **changes):
    """3,000 posts: 'fr' marks the 150 least similar to the probe query, 'de' ~10%, the rest 'en'."""
    rng = np.random.default_rng(11)
    vecs = unit(rng, N)
    probe = unit(rng, 1)[0]
    langs = np.where(rng.random(N) < 0.1, "de", "en").astype(object)
    langs[np.argsort(vecs @ probe)[:150]] = "fr"
    ix = ShardIndex(D, options=replace(KINDS[kind], background=False, **changes))
    ref = Reference()
    ids = np.arange(N, dtype=np.int64) + 1_000_000
    created = rng.uniform(0, 1000, N)
    for s in range(0, N, 500):
        ref.upsert(ix, ids[s : s + 500], vecs[s : s + 500], created[s : s + 500], list(langs[s : s + 500]))
    ref.delete(ix, ids[::7])  # tombstones for HNSW
    return ix, ref, vecs, probe, rng


# (filter, k). With more than 4k matches the approximate index is searched (with the
# filter as its selector); with fewer, or under exact_filter_fraction, the store exactly.
FILTERS = {
    "rare-language-far-away": (SearchFilter(languages=["fr"]), 20),
    "rare-language-k-above-matches": (SearchFilter(languages=["fr"]), 500),
    "tenth": (SearchFilter(languages=["de"]), 50),
    "newest-3%": (SearchFilter(min_created_at=970.0), 15),
    "exclude-the-best-300": (None, 50),  # exclusions filled in per query
    "combined": (SearchFilter(languages=["de", "fr"], min_created_at=500.0), 60),
}


@pytest.mark.parametrize("forced_ann", [False, True], ids=["default", "no-exact-shortcut"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_k_come_back_whenever_k_match(kind, forced_ann):
    # no-exact-shortcut: never pick the exact path for selective filters up front, and search
    # narrowly, so the approximate index's own shortfall (and the widening/fallback) is what is tested.
    changes = {"exact_filter_fraction": 0.0, "nprobe": 1, "ef_search": 8} if forced_ann else {}
    ix, ref, vecs, probe, rng = filled(kind, **changes)
    for name, (filt, k) in FILTERS.items():
        for q in [probe, *unit(rng, 3)]:
            f = filt
            if f is None:
                f = SearchFilter(exclude_post_ids=ref.exact(q, 300))
            got = check(ix, ref, q, k, f, min_recall=0.0 if forced_ann else FILTERED_RECALL.get(kind, 0.5))
            assert len(got) == min(k, len(ref.matching(f))), name


def test_a_filter_that_matches_nothing_or_unknown_languages_returns_nothing():
    ix, ref, vecs, probe, rng = filled("hnsw")
    assert len(ix.search(probe, 10, SearchFilter(languages=["xx"]))[0]) == 0
    assert len(ix.search(probe, 10, SearchFilter(min_created_at=2000.0))[0]) == 0
    everything = [int(p) for p in ref.posts]
    assert len(ix.search(probe, 10, SearchFilter(exclude_post_ids=everything))[0]) == 0


@pytest.mark.parametrize("kind", ["ivf-flat", "hnsw"])
def test_the_approximate_index_alone_falls_short_and_the_index_still_fills_k(kind):
    ix, ref, vecs, probe, rng = filled(kind, exact_filter_fraction=0.0, nprobe=1, ef_search=8)
    filt = SearchFilter(languages=["fr"])  # the posts least similar to the probe: far from its lists/graph region
    mask = ix._allowed(filt)
    alone = ix._ann.search(ix.prepare(probe)[0], 20, mask, 1, 20)[1]
    assert len(alone) < 20  # what a selector-only search returns
    got = check(ix, ref, probe, 20, filt)
    assert len(got) == 20


def test_search_breadth_grows_with_k_and_with_the_filters_selectivity():
    ix, ref, vecs, probe, rng = filled("ivf-flat", nprobe=2, ef_search=32)
    ann = ix._ann
    entries = ann.ntotal  # 16 lists over ~2,600 posts
    assert ix.search_breadth(ann, 10, 1.0) == (2, 32)  # the configured floors
    assert ix.search_breadth(ann, 1000, 1.0)[0] == int(np.ceil(4 * 1000 * 16 / entries))  # ~4k candidates
    assert ix.search_breadth(ann, 10, 0.1) == (20, 320)  # a 10% filter: 10x wider
    assert ix.search_breadth(ann, 10, 0.001) == (40, 640)  # at most 20x

"""FEEDRET_RETENTION_S: posts older than the window are evicted by the sweep, so memory stays flat."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from feedret.indexer.shard_index import IndexOptions, SearchFilter, ShardIndex

from test_index_types import D, KINDS, unit

RETENTION = 50.0
PER_TICK = 20  # posts created per simulated second: ~1,000 live at a time


@pytest.mark.parametrize("background", [False, True], ids=["inline-builds", "background-builds"])
@pytest.mark.parametrize("kind", ["flat", "ivf-flat", "hnsw", "torch", "int8", "binary", "torch-binary"])
def test_index_size_stays_flat_under_a_stream_of_inserts(kind, background):
    if kind in ("flat", "torch") and background:
        pytest.skip("exact kinds never build")
    rng = np.random.default_rng(5)
    opts = replace(KINDS[kind], retention_s=RETENTION, background=background, train_size=500, rebuild_fraction=0.2)
    ix = ShardIndex(D, options=opts)
    next_id = 0
    sizes = []
    for tick in range(400):  # one tick is a simulated second
        now = 1_000_000.0 + tick
        ids = np.arange(next_id, next_id + PER_TICK)
        next_id += PER_TICK
        ix.upsert(ids, unit(rng, PER_TICK), created_at=[now] * PER_TICK, langs=["en"] * PER_TICK, indexed_at=now,
                  model_versions=["m1"] * PER_TICK)
        ix.maintain(now)
        if tick % 5 == 4:
            # A background build of ~1,000 vectors takes well under a second; let one
            # span up to 5 ticks of writes (slots it may hold are reused only after it swaps in).
            assert ix.wait_idle(60)
        if tick % 25 == 24:
            got, _ = ix.search(unit(rng, 1)[0], 2000)
            oldest_live = next_id - int(RETENTION + 1) * PER_TICK
            assert got.min() >= oldest_live, "an expired post came back"
            info = ix.info()
            sizes.append((info.indexed, info.slots, info.store_rows, info.ann_entries))
    window = int(RETENTION + 1) * PER_TICK
    indexed, slots, rows, entries = (np.array(c) for c in zip(*sizes))
    assert indexed.max() <= window and indexed[-1] >= window - PER_TICK
    # Slots in use: the live window, HNSW tombstones up to rebuild_fraction of the index
    # (live / (1 - 0.2)), and what a running build holds back (5 ticks of releases).
    bound = window / 0.8 + 5 * PER_TICK + PER_TICK
    assert slots.max() <= bound and entries.max() <= bound, (slots.tolist(), entries.tolist())
    half = len(sizes) // 2
    assert rows[half:].max() == rows[half], "the slot store kept growing"
    assert slots[half:].max() <= slots[:half].max(), "slots kept growing"
    assert ix.evicted == next_id - len(ix)
    if kind == "ivf-flat":
        assert ix.state == "ready" and ix.rebuilds == 1  # IVF removes ids: trained once, never rebuilt
    if kind == "hnsw":
        assert ix.rebuilds > 5  # tombstones of evicted posts are dropped over and over


def test_an_upsert_already_past_retention_is_not_indexed_and_removes_the_old_version():
    ix = ShardIndex(4, options=IndexOptions(retention_s=100.0))
    v = np.eye(4, dtype=np.float32)
    ix.upsert([1, 2], v[:2], created_at=[950.0, 950.0], langs=["en", "en"], indexed_at=1000.0,
              model_versions=["m1"] * 2)
    assert len(ix) == 2
    ix.upsert([1, 3], v[2:4], created_at=[850.0, 850.0], langs=["en", "en"], indexed_at=1000.0,
              model_versions=["m1"] * 2)
    assert 1 not in ix and 3 not in ix and len(ix) == 1
    assert ix.maintain(1049.0) == 0 and ix.maintain(1051.0) == 1 and len(ix) == 0
    assert ix.evicted == 1


def test_without_retention_nothing_is_evicted():
    ix = ShardIndex(4)
    ix.upsert([1], np.ones((1, 4)), created_at=[0.0], langs=[""], indexed_at=1e9, model_versions=["m1"])
    assert ix.maintain(2e9) == 0 and len(ix) == 1
    assert len(ix.search(np.ones(4), 5, SearchFilter(min_created_at=None))[0]) == 1

"""IdMap: the shard's post id -> slot map behaves as a dict under any mix of batched operations."""

from __future__ import annotations

import numpy as np
import pytest

from feedret.indexer.idmap import IdMap


def test_batched_inserts_updates_pops_and_lookups_match_a_dict():
    rng = np.random.default_rng(0)
    m, ref = IdMap(), {}
    universe = np.concatenate([rng.integers(-2**63, 2**63 - 1, 3000, dtype=np.int64),
                               np.arange(5000, dtype=np.int64) * 1024])  # ids that share low bits
    for step in range(300):
        op = rng.integers(0, 3)
        keys = np.unique(rng.choice(universe, rng.integers(1, 400)))
        if op < 2:
            values = rng.integers(0, 10**9, len(keys))
            m.insert_many(keys, values)
            ref.update(zip(keys.tolist(), values.tolist()))
        else:
            popped = m.pop_many(np.concatenate([keys, keys[:3]]))  # a repeated id is popped once
            expected = sorted(ref.pop(k) for k in keys.tolist() if k in ref)
            assert sorted(popped.tolist()) == expected
        assert len(m) == len(ref)
        probe = rng.choice(universe, 200)
        got = m.get_many(probe)
        assert got.tolist() == [ref.get(k, -1) for k in probe.tolist()]
    keys, values = m.items()
    assert dict(zip(keys.tolist(), values.tolist())) == ref
    k = next(iter(ref))
    assert k in m and m.get(k) == ref[k] and m.get(-12345678, "none") == "none"
    assert m.nbytes < 64 * max(len(ref), 1024)


def test_a_full_map_costs_tens_of_bytes_a_post_not_a_dicts_hundred():
    n = 1_000_000
    m = IdMap.from_arrays(np.arange(n, dtype=np.int64) * 7919 + 10**12, np.arange(n))
    assert len(m) == n and m.get(10**12 + 7919 * 123) == 123
    assert m.nbytes / n <= 32  # 12 bytes a bucket, at least 3/8 full


def test_values_are_slots_and_a_negative_or_oversized_one_is_refused():
    m = IdMap()
    for bad in (-1, 2**31):
        with pytest.raises(ValueError, match="slots"):
            m.insert_many(np.array([5]), np.array([bad]))
    assert len(m) == 0 and m.get(5) is None
    m.insert_many(np.array([5, -7]), np.array([0, 2**31 - 1]))  # post ids may be negative; slots may not
    assert m.get(5) == 0 and m.get(-7) == 2**31 - 1


def test_a_map_grown_batch_by_batch_stays_between_three_eighths_and_three_quarters_full():
    # As a shard's applier fills it. Growth once jumped to 3/16 full (4x the buckets): 34 B a post.
    m = IdMap()
    for start in range(0, 400_000, 2_000):
        m.insert_many(np.arange(start, start + 2_000, dtype=np.int64) * 31, np.arange(start, start + 2_000))
        if len(m) >= 20_000:
            assert 16 <= m.nbytes / len(m) <= 32, (len(m), m.nbytes / len(m))


def test_a_grown_copy_holds_every_entry_and_takes_the_promised_keys_without_a_rehash():
    m = IdMap()
    keys = np.arange(0, 3000 * 7, 7, dtype=np.int64)
    m.insert_many(keys, np.arange(3000))
    m.pop_many(keys[:500])  # deleted buckets are not carried over
    before = (m.buckets, m.items())
    bigger = m.grown(5000)
    assert (m.buckets, len(m)) == (before[0], 2500)  # the original is only read
    assert np.array_equal(m.get_many(keys[500:]), np.arange(500, 3000))
    assert len(bigger) == 2500 and np.array_equal(bigger.get_many(keys), np.r_[np.full(500, -1), np.arange(500, 3000)])
    assert not bigger.needs_room(5000)
    size = bigger.buckets
    bigger.insert_many(np.arange(10**6, 10**6 + 5000), np.arange(5000))
    assert bigger.buckets == size and len(bigger) == 7500

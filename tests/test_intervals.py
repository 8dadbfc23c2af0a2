"""The member bootstrap behind `feedret eval`'s intervals: members are the unit, pairs share resamples."""

import numpy as np
import pytest

from feedret.evaluation.intervals import Interval, MemberBootstrap

MEMBERS = ["m1"] * 5 + ["m2"] * 3 + ["m3"] * 2 + ["m4"] * 6 + ["m5"] * 4


def test_each_resample_draws_members_with_replacement():
    boot = MemberBootstrap.draw(MEMBERS, resamples=300, seed=1)
    assert boot.weights.shape == (300, 5) and (boot.weights.sum(axis=1) == 5).all()
    assert sorted(set(boot.groups.tolist())) == [0, 1, 2, 3, 4]
    # A member's queries move together: constant per member, a resample's mean is a weighted mean of those.
    per_member = {"m1": 0.1, "m2": 0.2, "m3": 0.3, "m4": 0.4, "m5": 0.5}
    values = np.array([per_member[m] for m in MEMBERS])
    means = boot.means(values)
    counts = np.array([5, 3, 2, 6, 4])
    expected = (boot.weights * counts * np.array([0.1, 0.2, 0.3, 0.4, 0.5])).sum(axis=1) / (boot.weights * counts).sum(axis=1)
    np.testing.assert_allclose(means, expected)
    # Drawing every member once gives the plain mean over queries.
    once = MemberBootstrap(boot.groups, np.ones((1, 5)))
    assert once.means(values)[0] == pytest.approx(values.mean())


def test_the_interval_holds_the_estimate_is_zero_for_identical_systems_and_is_seeded():
    rng = np.random.default_rng(0)
    a = rng.random(len(MEMBERS))
    b = a - 0.05 + 0.1 * rng.random(len(MEMBERS))
    boot = MemberBootstrap.draw(MEMBERS, seed=7)
    d = boot.difference(a, b)
    assert isinstance(d, Interval) and d.estimate == pytest.approx(a.mean() - b.mean())
    assert d.low < d.estimate < d.high
    assert boot.difference(a, a) == Interval(0.0, 0.0, 0.0)
    assert MemberBootstrap.draw(MEMBERS, seed=7).difference(a, b) == d
    assert MemberBootstrap.draw(MEMBERS, seed=8).difference(a, b) != d
    # Swapping the systems mirrors the interval.
    flipped = boot.difference(b, a)
    assert (flipped.estimate, flipped.low, flipped.high) == pytest.approx((-d.estimate, -d.high, -d.low))
    assert d.to_json() == {"diff": d.estimate, "low": d.low, "high": d.high}


def test_one_member_carrying_the_difference_gives_a_wide_interval():
    # The systems differ only on m4's 6 queries (of 20): resampling members, the difference is
    # 0 whenever m4 is not drawn, so the interval reaches down to 0 (resampling queries would not).
    a = np.array([1.0 if m == "m4" else 0.0 for m in MEMBERS])
    d = MemberBootstrap.draw(MEMBERS, resamples=2000, seed=0).difference(a, np.zeros_like(a))
    assert d.estimate == pytest.approx(0.3)
    assert d.low == 0.0 and d.high > 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="resamples"):
        MemberBootstrap.draw(MEMBERS, resamples=0)
    with pytest.raises(ValueError, match="query rows"):
        MemberBootstrap.draw(MEMBERS).means(np.zeros(3))

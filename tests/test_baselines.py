"""The CF baselines of `feedret eval` on a tiny dataset whose right answers are known by hand.

Two disjoint taste clusters (A: items 1-5, liked by 3 members; B: items 11-15,
liked by 5, so more popular), 20 filler items nobody liked, and a fresh item
(99) created after the split. A member new since the split who liked A1 and A2
must get A3-A5 first from item-kNN, EASE and ALS, while popularity puts B first;
a member with no history gets popularity's list from all of them; the fresh
item has no signal, so every ID-based baseline ranks it last.
"""

import dataclasses
import json

import numpy as np
import pytest

scipy = pytest.importorskip("scipy")  # the eval extra (implicit brings it)

from click.testing import CliRunner  # noqa: E402

from feedret.clients.cli import cli  # noqa: E402
from feedret.dataprep.format import Interaction, Item, read_dataset, write_dataset  # noqa: E402
from feedret.evaluation.baselines import (  # noqa: E402
    BASELINES,
    NO_SIGNAL,
    fit_als,
    fit_cold_start_popularity,
    fit_ease,
    fit_item_knn,
    history_likes,
    tie_break,
    training,
)
from feedret.evaluation.metrics import topk  # noqa: E402
from feedret.evaluation.evaluate import (  # noqa: E402
    EvalConfig,
    add_differences,
    evaluate_baselines,
    evaluate_popularity,
    popularity_scores,
    prepare,
    prepare_validation,
    rank,
    score_ranking,
)

A, B, FILLER, FRESH = [1, 2, 3, 4, 5], [11, 12, 13, 14, 15], list(range(21, 41)), 99
FRESH_AT = 1000.0


def I(member, item, t, w=5.0):  # noqa: E743
    return Interaction(member, item, float(t), float(w))


TRAIN = [
    # cluster A: a1, a2 like A1-A5, a3 likes A1-A4 (A1-A4: 3 likes, A5: 2)
    *[I(m, item, 10 * n + k) for n, m in enumerate(["a1", "a2"]) for k, item in enumerate(A)],
    *[I("a3", item, 30 + k) for k, item in enumerate(A[:4])],
    # cluster B: five members like all of B (5 likes each): more popular than any A item
    *[I(m, item, 40 + 10 * n + k) for n, m in enumerate(["b1", "b2", "b3", "b4", "b5"]) for k, item in enumerate(B)],
    I("a1", 21, 95, 1.0),  # a rating below the like threshold: not a like
]
TEST = [
    I("n", 1, 500), I("n", 2, 500),  # n is new since the split: no row in any fit
    I("n", 3, 600),  # query: history {1, 2}, positive {3}
    I("c", 12, 700),  # query: no history at all, positive {12}
    I("n", FRESH, 1100),  # query: positive {99}, the fresh item
    I("b1", FRESH, 1200), I("b1", 1, 1200),  # query: positives {1, 99}
]
INTERACTIONS = TRAIN + TEST
# The cutoff falls on the first test interaction (t=500).
TEST_FRACTION = (len(TEST) - 0.5) / len(INTERACTIONS)


def items() -> list[Item]:
    return [Item(i, f"Item {i}", FRESH_AT if i == FRESH else 0.0) for i in A + B + FILLER + [FRESH]]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clusters")
    write_dataset(d, items(), INTERACTIONS, meta={"name": "clusters"})
    return d


@pytest.fixture(scope="module")
def config(dataset_dir):
    return EvalConfig(dataset=dataset_dir, test_fraction=TEST_FRACTION, max_queries=None, ks=(1, 3, 10, 100),
                      ndcg_k=10, bootstrap_resamples=200)


@pytest.fixture(scope="module")
def data(config):
    return prepare(config)


@pytest.fixture(scope="module")
def train(data):
    return training(data.train, data.item_ids, data.config.like_threshold)


@pytest.fixture(scope="module")
def history(data):
    return history_likes([m.history for m in data.queries], data.item_ids, data.config.like_threshold)


def query(data, member, t):
    return next(r for r, m in enumerate(data.queries) if m.member_id == member and m.timestamp == t)


def ranked_ids(data, model, history, row, k=None):
    """One query's ranking of its candidates, as `feedret eval` ranks it (ties and no signal by popularity)."""
    scores = tie_break(model.scores(history[[row]]), popularity_scores(data))
    top = topk(scores, data.candidates[[row]], k or len(data.item_ids))
    return [int(data.item_ids[c]) for c in top[0] if c >= 0]


def fitted(train):
    return {
        "item-kNN": fit_item_knn(train, neighbours=10),
        "EASE": fit_ease(train, lam=1.0),
        "ALS": fit_als(train, factors=4, regularization=0.1, alpha=1.0, seed=0, threads=1),
    }


def test_the_protocol_here(data, train):
    assert data.cutoff == 500.0
    assert [(m.member_id, m.timestamp, m.positives) for m in data.queries] == [
        ("b1", 1200.0, (1, FRESH)), ("c", 700.0, (12,)), ("n", 500.0, (1, 2)), ("n", 600.0, (3,)),
        ("n", 1100.0, (FRESH,)),
    ]
    # Only the training period's likes: 2 x 5 + 4 for A, 5 x 5 for B; a1's rating of 1 is not one.
    assert train.likes.shape == (8, 31) and train.likes.nnz == 14 + 25
    assert train.known.tolist() == [True] * 10 + [False] * 21
    assert train.popularity[:10].tolist() == [3, 3, 3, 3, 2, 5, 5, 5, 5, 5]


@pytest.mark.parametrize("name", ["item-kNN", "EASE", "ALS"])
def test_a_new_member_gets_their_cluster_first_from_history_alone(name, data, train, history):
    pytest.importorskip("implicit")
    model = fitted(train)[name]
    row = query(data, "n", 600.0)  # n: no training row, history A1 and A2 since the split
    top = ranked_ids(data, model, history, row, k=10)
    assert set(top[:3]) == {3, 4, 5}, top
    assert set(top[3:8]) == set(B)  # then by popularity: B before the never-liked fillers
    # Popularity, for contrast, puts all of B first.
    assert ranked_ids(data, _Popularity(), history, row, k=5) == B


class _Popularity:
    def scores(self, history):
        return np.zeros(history.shape)  # every item tied: tie_break falls back on popularity


@pytest.mark.parametrize("name", ["item-kNN", "EASE", "ALS"])
def test_no_history_means_popularity_and_no_training_likes_means_last(name, data, train, history):
    pytest.importorskip("implicit")
    model = fitted(train)[name]
    row = query(data, "c", 700.0)
    expected = ranked_ids(data, _Popularity(), history, row)
    assert ranked_ids(data, model, history, row) == expected
    assert expected[:10] == B + [1, 2, 3, 4, 5]  # popularity, ties by item id
    # No signal for the fillers and the fresh item: they come last, by item id (FRESH=99 last of all).
    s = model.scores(history[[query(data, "n", 1100.0)]])
    assert np.isneginf(s[0, ~train.known]).all() and np.isfinite(s[0, train.known]).all()
    assert ranked_ids(data, model, history, query(data, "n", 1100.0))[-21:] == FILLER + [FRESH]


def test_tie_break_orders_by_primary_then_secondary_and_stays_finite():
    primary = np.array([[1.0, 2.0, 1.0, NO_SIGNAL, NO_SIGNAL]])
    secondary = np.array([5.0, 1.0, 4.0, 3.0, 2.0])
    out = tie_break(primary, secondary)
    assert np.isfinite(out).all()
    assert np.argsort(-out[0]).tolist() == [1, 0, 2, 3, 4]


def test_cold_start_popularity_counts_likes_given_while_the_member_was_new():
    ids = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    x = [I("x", item, item) for item in range(1, 8)]  # 7 likes, one per timestamp: priors 0..6
    y = [I("y", 1, 1), I("y", 2, 1), I("y", 8, 2, 2.0), I("y", 3, 3)]  # a burst (priors 0, 0), a non-like, prior 3
    t = training(x + y, ids, 4.0)
    assert fit_cold_start_popularity(t, 5).counts.tolist() == [2, 2, 2, 1, 1, 1, 0, 0]  # x's 7th has prior 6
    assert fit_cold_start_popularity(t, 0).counts.tolist() == [2, 1, 0, 0, 0, 0, 0, 0]  # first bursts only
    assert fit_cold_start_popularity(t, 100).counts.tolist() == t.popularity.tolist()


def test_fitting_uses_only_the_training_period(config, dataset_dir, tmp_path, train):
    pytest.importorskip("implicit")
    # b1 liking A2 after the split would link the clusters, were it used.
    late = I("b1", 2, 1300)
    d = tmp_path / "late"
    write_dataset(d, items(), INTERACTIONS + [late])
    fraction = (len(TEST) + 1 - 0.5) / (len(INTERACTIONS) + 1)
    with_late = prepare(dataclasses.replace(config, dataset=d, test_fraction=fraction))
    assert with_late.cutoff == 500.0 and with_late.train == prepare(config).train
    again = training(with_late.train, with_late.item_ids, 4.0)
    assert (again.likes != train.likes).nnz == 0
    for name, model in fitted(again).items():
        h = history_likes([[I("q", 1, 0)]], again.item_ids, 4.0)
        np.testing.assert_array_equal(model.scores(h), fitted(train)[name].scores(h), err_msg=name)
    # The check can fail: with the late like in the fit, item-kNN links A2 to B.
    leaky = fit_item_knn(training(list(train.interactions) + [late], train.item_ids, 4.0), 10)
    assert leaky.similarity[1, 5] > 0 and fit_item_knn(train, 10).similarity[1, 5] == 0


def test_the_fresh_segment_counts_only_fresh_positives(data):
    rows = data.segment_rows()["fresh"]
    # Queries with a positive created after the split: b1 at 1200 ({1, 99}) and n at 1100 ({99}).
    assert [(data.queries[r].member_id, data.queries[r].timestamp) for r in np.flatnonzero(rows)] == [
        ("b1", 1200.0), ("n", 1100.0),
    ]
    fresh_col = int(np.flatnonzero(data.item_ids == FRESH)[0])
    assert data.fresh_positives.sum() == 2 and data.fresh_positives[:, fresh_col].sum() == 2
    assert data.stats["segments"]["fresh"] == 2 and data.stats["fresh_items"] == 1
    assert data.stats["fresh_positive_share"] == pytest.approx(2 / 7)
    seg = evaluate_popularity(data)["widths"][0]["segments"]
    # Popularity ranks 99 last of its ~30 candidates: nothing in the top 10, found by 100.
    assert seg["fresh"]["recall@10"] == 0.0 and seg["fresh"]["recall@100"] == 1.0
    # b1's other positive, item 1, is not fresh: it counts in "all", not in "fresh".
    # A scorer with item 1 first, 99 last (and the fillers, never positives, in between): in "all",
    # a hit at 1 for b1 (1 of 2 positives) and n at 500 (1 of 2): (0.5 + 0.5) / 5.
    scores = np.broadcast_to(np.arange(len(data.item_ids), dtype=np.float64), data.positives.shape).copy()
    scores[:, data.item_ids == 1], scores[:, data.item_ids == FRESH] = 1e6, -1.0
    only_item_1 = score_ranking(data, rank(data, lambda idx: scores[idx]))["segments"]
    assert only_item_1["fresh"]["recall@1"] == 0.0 and only_item_1["all"]["recall@1"] == pytest.approx(1 / 5)


def test_the_fresh_segment_can_also_count_posts_younger_than_an_age(config):
    # Every item but 99 is created at 0, so at a query at t it is t seconds old: n's at 500 and 600
    # and c's at 700 have positives that young; b1's at 1200 and n's at 1100 have 99 anyway.
    def fresh(max_age):
        d = prepare(dataclasses.replace(config, fresh_max_age=max_age))
        return [(d.queries[r].member_id, d.queries[r].timestamp) for r in np.flatnonzero(d.segment_rows()["fresh"])]

    assert fresh(499.0) == fresh(None) == [("b1", 1200.0), ("n", 1100.0)]
    assert fresh(600.0) == [("b1", 1200.0), ("n", 500.0), ("n", 600.0), ("n", 1100.0)]
    assert len(fresh(700.0)) == 5


def test_evaluate_baselines_tunes_on_validation_refits_and_compares_with_intervals(dataset_dir, config, data):
    pytest.importorskip("implicit")
    validation = prepare_validation(config, read_dataset(dataset_dir), data)
    # The validation split lies inside the training period.
    assert validation.cutoff < data.cutoff and max(i.timestamp for i in validation.train) < validation.cutoff
    assert all(m.timestamp < data.cutoff for m in validation.queries)
    systems = [evaluate_popularity(data)] + evaluate_baselines(data, validation)
    assert [s["name"] for s in systems] == ["popularity", *(b.name for b in BASELINES)]
    for s, b in zip(systems[1:], BASELINES):
        assert [g["params"] for g in s["tuning"]["grid"]] == [dict(p) for p in b.grid]
        assert s["tuning"]["chosen"] in [g["params"] for g in s["tuning"]["grid"]]
        assert s["model"]["params"] == s["tuning"]["chosen"]
    by_name = {s["name"]: s["widths"][0]["segments"] for s in systems}
    # n at 600 finds A3 in the top 3 from every item-based baseline, never from popularity.
    for name in ("item-kNN", "EASE", "ALS"):
        assert by_name[name]["fresh"]["recall@10"] == 0.0  # no signal for the fresh item
        assert by_name[name]["all"]["recall@3"] > by_name["popularity"]["all"]["recall@3"], name
    info = add_differences(systems, data)
    non_empty = {seg for seg, rows in data.segment_rows().items() if rows.any()}
    assert info["resamples"] == 200 and set(info["best_baseline"]) == non_empty and "fresh" in non_empty
    for seg, metrics in info["best_baseline"].items():
        for metric, best in metrics.items():
            ref = next(s for s in systems if s["name"] == best)["widths"][0]
            assert ref["vs_best_baseline"][seg][metric] == {"baseline": best, "diff": 0.0, "low": 0.0, "high": 0.0}
    for s in systems:
        w = s["widths"][0]
        assert "per_query" not in w
        for seg, metrics in w["vs_best_baseline"].items():
            for metric, d in metrics.items():
                assert d["low"] <= d["diff"] <= d["high"] or d["low"] == d["high"]
                assert d["diff"] == pytest.approx(w["segments"][seg][metric] - next(
                    x for x in systems if x["name"] == d["baseline"])["widths"][0]["segments"][seg][metric], abs=1e-6)
                assert d["diff"] <= 1e-9  # nothing beats the best baseline by construction here


def test_feedret_eval_runs_every_baseline_by_default(dataset_dir, tmp_path):
    pytest.importorskip("implicit")
    out = tmp_path / "report"
    args = ["eval", "--dataset", str(dataset_dir), "--no-minilm", "--test-fraction", str(TEST_FRACTION),
            "--max-queries", "0", "--k", "10", "--k", "100", "--ndcg-k", "10", "--bootstrap-resamples", "100",
            "--out", str(out), "--json"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in results["systems"]] == ["popularity", *(b.name for b in BASELINES)]
    assert results["config"]["bootstrap_resamples"] == 100 and results["intervals"]["resamples"] == 100
    assert results["validation"]["cutoff"] < results["dataset"]["cutoff"]
    assert "vs_best_baseline" in results["systems"][3]["widths"][0]
    md = (out / "results.md").read_text()
    assert "## Fresh posts (positives created after the split): 2 queries" in md
    assert "## Members known only by profile (no history): 0 queries" in md
    assert "the dataset has no member profiles" in md
    assert "## Baselines: tuned on a validation split" in md
    assert "| EASE | lam=500 |" in md
    assert "best baseline" in md and " [" in md  # the interval column

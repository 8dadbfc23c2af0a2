"""`feedret eval` on a small synthetic dataset whose right answers are known by hand."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from feedret.clients.cli import cli
from feedret.dataprep.format import Interaction, Item, write_dataset
from feedret.evaluation.evaluate import (
    EvalConfig,
    evaluate_encoder,
    evaluate_popularity,
    evaluate_vectors,
    popularity_scores,
    prepare,
    rank,
    score_ranking,
    truncate,
    width_dims,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "feedret-tiny-llama"
# 18 interactions; at 0.35 the cutoff falls on the first test one (t=200).
TEST_FRACTION = 0.35


def I(member, item, t, w):  # noqa: E743
    return Interaction(member, item, float(t), float(w))


INTERACTIONS = [
    # training period (t < 200)
    *[I("w", item, item, w) for item, w in zip(range(1, 8), [5, 5, 5, 4, 4, 2, 2])],
    I("a", 1, 10, 5), I("a", 2, 11, 4),
    I("b", 1, 12, 5), I("b", 3, 13, 1),
    # test period: one moment per (member, time)
    I("w", 8, 200, 5), I("w", 9, 200, 4),  # warm (7 prior): positives {8, 9}
    I("a", 3, 300, 5), I("a", 4, 300, 2),  # positive {3}; 4 is not a like
    I("b", 2, 400, 4.5),  # positive {2}
    I("d", 1, 500, 5),  # no history at all
    I("a", 10, 1500, 5),  # item 10 exists only from t=1000
]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ds")
    items = [
        Item(i, f"Movie {i} ({1990 + i}). Genres: {'Comedy' if i % 2 else 'Drama'}", 1000.0 if i == 10 else 0.0,
             author_id=f"genre:{'comedy' if i % 2 else 'drama'}", lang="en", features={"release_year": 1990.0 + i})
        for i in range(1, 11)
    ]
    write_dataset(d, items, INTERACTIONS, meta={"name": "synthetic"})
    return d


@pytest.fixture(scope="module")
def config(dataset_dir) -> EvalConfig:
    return EvalConfig(dataset=dataset_dir, test_fraction=TEST_FRACTION, max_queries=None, ks=(1, 5, 10), ndcg_k=10)


@pytest.fixture(scope="module")
def data(config):
    return prepare(config)


def test_the_protocol_finds_each_test_moment_with_its_state_candidates_and_positives(data):
    assert data.cutoff == 200.0
    assert [(m.member_id, m.timestamp, m.positives) for m in data.queries] == [
        ("a", 300.0, (3,)), ("a", 1500.0, (10,)), ("b", 400.0, (2,)), ("d", 500.0, (1,)), ("w", 200.0, (8, 9)),
    ]
    assert data.cold_start.tolist() == [True, True, True, True, False]
    # Item 10 is created after the split (t=1000): a's positive at t=1500 is the one fresh positive.
    assert data.stats["segments"] == {"all": 5, "cold_start": 4, "warm": 1, "fresh": 1, "profile_only": 0}
    ids = data.item_ids.tolist()
    # a at t=1500: items 1-4 seen; 10 exists by now.
    assert [ids[c] for c in np.flatnonzero(data.candidates[1])] == [5, 6, 7, 8, 9, 10]
    # a at t=300: 10 did not exist yet.
    assert [ids[c] for c in np.flatnonzero(data.candidates[0])] == [3, 4, 5, 6, 7, 8, 9]
    # The member state holds only the past: a's likes before t=1500 (4 was rated 2), newest first.
    state = data.members[1]
    assert [a.post_id for a in state.recent_activity] == [3, 2, 1]
    assert state.features["prior_engagements"] == 4.0
    # Item features count the training period only (item 1: w, a, b; d's test rating not).
    assert data.posts[0].features["engagements"] == 3.0
    assert data.popularity.tolist() == [3, 2, 1, 1, 1, 0, 0, 0, 0, 0]


def test_popularity_ranks_by_training_likes_then_item_id(data):
    scores = popularity_scores(data)
    assert [int(data.item_ids[c]) for c in np.argsort(-scores)] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    ranked = rank(data, lambda idx: np.broadcast_to(scores, (len(idx), len(scores))), k=10)
    top = [[int(data.item_ids[c]) for c in row if c >= 0] for row in ranked]
    assert top == [
        [3, 4, 5, 6, 7, 8, 9],
        [5, 6, 7, 8, 9, 10],
        [2, 4, 5, 6, 7, 8, 9],
        [1, 2, 3, 4, 5, 6, 7, 8, 9],
        [8, 9],
    ]


def test_popularity_metrics_by_hand(data):
    seg = evaluate_popularity(data)["widths"][0]["segments"]
    # Ranks of the positives: a@300 1, a@1500 6, b 1, d 1, w {1, 2}.
    assert seg["all"]["recall@1"] == pytest.approx((1 + 0 + 1 + 1 + 0.5) / 5)
    assert seg["all"]["recall@5"] == pytest.approx(0.8)
    assert seg["all"]["recall@10"] == pytest.approx(1.0)
    assert seg["all"]["ndcg@10"] == pytest.approx((4 + 1 / math.log2(7)) / 5)
    assert seg["cold_start"] == pytest.approx(
        {"queries": 4, "recall@1": 0.75, "recall@5": 0.75, "recall@10": 1.0, "ndcg@10": (3 + 1 / math.log2(7)) / 4}
    )
    assert seg["warm"] == pytest.approx({"queries": 1, "recall@1": 0.5, "recall@5": 1.0, "recall@10": 1.0, "ndcg@10": 1.0})


def test_a_scorer_that_knows_the_future_gets_everything_and_its_negation_nothing(data):
    oracle = data.positives.astype(np.float64)
    best = score_ranking(data, rank(data, lambda idx: oracle[idx]))["segments"]
    for seg in ("all", "cold_start", "warm"):
        assert best[seg]["recall@5"] == best[seg]["ndcg@10"] == pytest.approx(1.0)
    # Only w has two positives, so at K=1 it can get half.
    assert (best["all"]["recall@1"], best["cold_start"]["recall@1"], best["warm"]["recall@1"]) == pytest.approx((0.9, 1.0, 0.5))
    worst = score_ranking(data, rank(data, lambda idx: -oracle[idx]))["segments"]
    assert worst["cold_start"]["recall@1"] == 0.0  # each positive ranked last among its candidates
    assert worst["warm"]["recall@1"] == 0.5  # w's only candidates are its two positives


class FutureEncoder:
    """Encoder-like (embed_posts/embed_members only): a post is its one-hot, a member the sum of their positives."""

    def __init__(self, data):
        self.data, self.dim, self.model_version = data, len(data.item_ids), "oracle-v1"
        self.calls = 0

    def embed_posts(self, posts):
        assert [p.post_id for p in posts] == self.data.item_ids.tolist()
        return np.eye(len(posts), dtype=np.float32)

    def embed_members(self, members):
        assert len(members) == len(self.data.queries)
        return self.data.positives.astype(np.float32)


def test_any_encoder_like_object_is_evaluated_at_every_matryoshka_width(data):
    result = evaluate_encoder(FutureEncoder(data), data)
    assert result["name"] == "oracle-v1" and result["kind"] == "encoder"
    assert [w["width"] for w in result["widths"]] == width_dims(10, (1, 0.5, 0.25, 0.125)) == [10, 5, 2, 1]
    assert result["widths"][0]["segments"]["all"]["recall@5"] == pytest.approx(1.0)
    assert result["widths"][0]["fraction"] == 1.0
    assert {"embed_posts_s", "embed_members_s", "rank_s"} <= set(result["timings"])


def test_prefix_widths_truncate_both_sides_and_renormalise(data):
    v = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    np.testing.assert_allclose(truncate(v, 2), [[0.6, 0.8]])
    np.testing.assert_array_equal(truncate(np.zeros((1, 4)), 2), [[0.0, 0.0]])  # no NaN from a zero prefix
    rng = np.random.default_rng(0)
    posts, members = rng.standard_normal((10, 8)), rng.standard_normal((5, 8))
    at4 = evaluate_vectors(data, posts, members, widths=[4])[0]
    cut = evaluate_vectors(data, truncate(posts, 4), truncate(members, 4), widths=[4])[0]
    assert at4["segments"] == cut["segments"] and at4["width"] == 4 and at4["fraction"] == 0.5
    # The ranking at width 4 is by the cosine of the 4-dimensional prefixes.
    p4, m4 = posts[:, :4], members[:, :4]
    cos = (m4 / np.linalg.norm(m4, axis=1, keepdims=True)) @ (p4 / np.linalg.norm(p4, axis=1, keepdims=True)).T
    assert at4["segments"] == score_ranking(data, rank(data, lambda idx: cos[idx]))["segments"]


def test_the_real_encoder_runs_through_the_same_path(data):
    from feedret.encoder.model import Encoder

    result = evaluate_encoder(Encoder.from_pretrained(TINY, batch_size=8), data)
    assert result["name"] == "feedret-tiny-llama-v0"
    assert [w["width"] for w in result["widths"]] == [128, 64, 32, 16]
    for w in result["widths"]:
        for seg in w["segments"].values():
            if seg["queries"]:  # profile_only is empty here: no member profiles
                assert 0.0 <= seg["recall@1"] <= seg["recall@5"] <= seg["recall@10"] <= 1.0
    assert result["timings"]["distinct_post_prompts"] == 10


def test_the_report_says_how_many_prompts_the_token_limit_cut(data):
    # A member history longer than max_length loses its oldest items silently; the report says how often.
    from feedret.encoder.model import Encoder

    roomy = evaluate_encoder(Encoder.from_pretrained(TINY, batch_size=8), data)["timings"]
    assert roomy["member_prompts_truncated"] == 0.0 and roomy["post_prompts_truncated"] == 0.0
    cramped = evaluate_encoder(Encoder.from_pretrained(TINY, batch_size=8, max_length=12), data)["timings"]
    assert cramped["member_prompts_truncated"] == 1.0 and cramped["post_prompts_truncated"] == 1.0


def test_feedret_eval_writes_the_report(dataset_dir, tmp_path):
    out = tmp_path / "report"
    args = [
        "eval", "--dataset", str(dataset_dir), "--model", str(TINY), "--no-minilm", "--no-baselines", "--test-fraction",
        str(TEST_FRACTION), "--max-queries", "0", "--k", "1", "--k", "5", "--ndcg-k", "5", "--out", str(out), "--json",
    ]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    results = json.loads((out / "results.json").read_text())
    assert printed == results
    assert [s["name"] for s in results["systems"]] == ["popularity", "feedret-tiny-llama-v0"]
    assert results["config"]["ks"] == [1, 5] and results["config"]["max_queries"] is None
    assert results["dataset"]["segments"] == {"all": 5, "cold_start": 4, "warm": 1, "fresh": 1, "profile_only": 0}
    assert results["systems"][1]["model"]["model_version"] == "feedret-tiny-llama-v0"
    assert results["versions"]["torch"] and "total_s" in results["timings"]
    assert results["systems"][0]["widths"][0]["segments"]["all"]["recall@5"] == pytest.approx(0.8)
    md = (out / "results.md").read_text()
    assert results["command"].startswith("feedret eval --dataset ") and "--no-minilm" in results["command"]
    assert results["command"] in md
    assert "| popularity | – | 0.7000 | 0.8000 |" in md
    assert "## Cold start (at most 5 prior engagements): 4 queries" in md
    assert "| feedret-tiny-llama-v0 | 16 (1/8) |" in md
    assert "| 128 | 0.0% / 0.0% |" in md  # the model's own token limit, and no prompt cut by it
    pytest.importorskip("matplotlib")
    for png in ("recall_at_100.png", "recall_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_is_validated(dataset_dir):
    with pytest.raises(ValueError, match="widths"):
        EvalConfig(dataset=dataset_dir, widths=(1.0, 2.0))
    with pytest.raises(ValueError, match="ks"):
        EvalConfig(dataset=dataset_dir, ks=(0,))
    assert EvalConfig(dataset=dataset_dir, ks=(100, 10, 10)).ks == (10, 100)

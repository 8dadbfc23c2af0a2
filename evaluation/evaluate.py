"""`feedret eval`: held-out retrieval quality of dual encoders against baselines, with a report.

The protocol is training's (feedret.dataprep.protocol), applied to the period
after the time split:

- the last `test_fraction` of interactions (by time) evaluate, the rest train;
- item features (engagement counts, mean weight) come from the training period
  only, and so do the popularity baseline's counts;
- a query is one test moment (a member and a timestamp); the member's state is
  everything they did strictly before it; the positives are the items they
  liked (weight >= like_threshold) then and had not seen before;
- the candidates are every item that existed at that moment and that the member
  had not engaged with: the whole catalogue, ranked by each system.

Systems: any number of `Encoder`s (at full width and at Matryoshka prefixes:
both sides cut to the first w dimensions and re-normalised), popularity
(training-period likes, ties by item id), the collaborative-filtering
baselines of feedret.evaluation.baselines (cold-start popularity, item-kNN,
EASE, ALS: fitted on the training period, their hyperparameters chosen on a
validation split that applies this same protocol inside the training period),
and zero-shot all-MiniLM-L6-v2.
Metrics: recall@K = |top K ∩ positives| / |positives| and binary NDCG@K,
averaged over queries, overall and by segment: cold-start members (at most 5
prior engagements) and the rest; fresh posts (only the positives created after
the split, or within `fresh_max_age` seconds before the moment, over the
queries that have one); members known only by a profile (no history).
Each system's difference from the best baseline (the one with the highest
point estimate of that metric in that segment) gets a 95% member-bootstrap
interval (feedret.evaluation.intervals).

Use from code (e.g. the trainer, once per epoch):

    data = prepare(EvalConfig(dataset="var/datasets/movielens", max_queries=500))
    result = evaluate_encoder(encoder, data)          # a system's dict, see below
    result["widths"][0]["segments"]["all"]["recall@100"]

`run_eval` does a whole report run (what the CLI calls); `write_report` writes
results.json, results.md and the plots from its dict.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import structlog

from feedret.dataprep.format import Dataset, Interaction, read_dataset
from feedret.evaluation.intervals import LEVEL, MemberBootstrap
from feedret.evaluation.metrics import ndcg_matrix, recall_curve, recall_matrix, relevance, topk
from feedret.members import MemberProfile
from feedret.dataprep.protocol import (
    Moment,
    candidate_mask,
    item_features,
    member_state,
    moments,
    popularity,
    post_events,
    sample,
    time_split,
)

log = structlog.get_logger(__name__)

SEGMENTS = ("all", "cold_start", "warm", "fresh", "profile_only")
SEGMENT_TITLES = {
    "all": "All queries",
    "cold_start": "Cold start (at most 5 prior engagements)",
    "warm": "Warm (more than 5 prior engagements)",
    "fresh": "Fresh posts (positives created after the split)",
    "profile_only": "Members known only by profile (no history)",
}
POPULARITY = "popularity"
BASELINE_KINDS = ("popularity", "baseline")  # what "the best baseline" is chosen among
TUNE_K = 100  # baselines' hyperparameters are chosen by validation recall@100
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_WIDTHS = "recall_at_100.png"
PLOT_CURVES = "recall_curves.png"
LEGEND_WIDTH = 2.2  # inches right of the plots' panels
CHUNK = 256  # queries scored at once: [CHUNK, items] float64 stays small


class BaselinesMissing(RuntimeError):
    """The CF baselines' packages (scipy, implicit: the `eval` extra) are not installed."""


# ------------------------------------------------------------------ config and data


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides the numbers (it goes into results.json)."""

    dataset: str | Path
    test_fraction: float = 0.2
    like_threshold: float = 4.0
    max_queries: int | None = 3000  # a deterministic sample of the test moments; None: all
    seed: int = 0
    ks: tuple[int, ...] = (10, 100, 1000)
    ndcg_k: int = 100
    widths: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)  # fractions of each model's dimension
    max_recent: int = 10  # liked items in a member's state (the prompt may show fewer)
    # Fresh-post segment: positives created after the split, and also (if set) those
    # created at most this many seconds before the query's moment.
    fresh_max_age: float | None = None
    bootstrap_resamples: int = 1000  # member resamples for the intervals (seeded by `seed`)

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive, got {self.ks}")
        if self.ndcg_k < 1:
            raise ValueError(f"ndcg_k must be >= 1, got {self.ndcg_k}")
        if not self.widths or any(not 0 < w <= 1 for w in self.widths):
            raise ValueError(f"widths are fractions of the model dimension in (0, 1], got {self.widths}")
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1 (or None for all), got {self.max_queries}")
        if self.fresh_max_age is not None and not self.fresh_max_age >= 0:
            raise ValueError(f"fresh_max_age must be >= 0 seconds (or None), got {self.fresh_max_age}")
        if self.bootstrap_resamples < 1:
            raise ValueError(f"bootstrap_resamples must be >= 1, got {self.bootstrap_resamples}")
        object.__setattr__(self, "ks", tuple(sorted({int(k) for k in self.ks})))
        object.__setattr__(self, "widths", tuple(sorted({float(w) for w in self.widths}, reverse=True)))

    @property
    def max_k(self) -> int:
        return max(max(self.ks), self.ndcg_k)

    def metric_names(self) -> list[str]:
        return [f"recall@{k}" for k in self.ks] + [f"ndcg@{self.ndcg_k}"]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dataset"] = str(self.dataset)
        out["ks"] = list(self.ks)
        out["widths"] = list(self.widths)
        return out


@dataclass
class EvalData:
    """The prepared test set: items, queries and their member states, candidates, positives.

    Arrays over items follow `item_ids` (ascending); arrays over queries follow `queries`.
    """

    config: EvalConfig
    item_ids: np.ndarray  # [N] int64
    created_at: np.ndarray  # [N]
    posts: list  # [N] PostEvent, features as of the cutoff
    queries: list[Moment]  # [Q]
    members: list[MemberProfile]  # [Q] the member's state at the query
    candidates: np.ndarray  # [Q, N] bool: may be recommended
    positives: np.ndarray  # [Q, N] bool
    popularity: np.ndarray  # [N] training-period likes
    cutoff: float
    fresh_positives: np.ndarray  # [Q, N] bool: the positives the fresh segment counts
    profile_only: np.ndarray  # [Q] bool: the member has a profile and no history
    stats: dict[str, Any] = field(default_factory=dict)
    train: tuple[Interaction, ...] = ()  # the training period: what baselines are fitted on

    @property
    def n_positives(self) -> np.ndarray:
        return self.positives.sum(axis=1)

    @property
    def cold_start(self) -> np.ndarray:
        return np.fromiter((m.cold_start for m in self.queries), dtype=bool, count=len(self.queries))

    @property
    def member_ids(self) -> list[str]:
        return [m.member_id for m in self.queries]

    def segment_rows(self) -> dict[str, np.ndarray]:
        """Each segment's queries [Q] bool, in SEGMENTS order."""
        cold = self.cold_start
        return {
            "all": np.ones_like(cold), "cold_start": cold, "warm": ~cold,
            "fresh": self.fresh_positives.any(axis=1), "profile_only": self.profile_only.copy(),
        }

    def segment_positives(self, segment: str) -> np.ndarray:
        """The positives a segment's metrics count [Q, N]: the fresh ones for `fresh`, all of them elsewhere."""
        return self.fresh_positives if segment == "fresh" else self.positives


def fresh_mask(created_at: np.ndarray, cutoff: float, moments_at: np.ndarray, max_age: float | None) -> np.ndarray:
    """[Q, N] bool: items that are fresh at each query: created at or after the cutoff (never in
    training), or, with max_age, created at most max_age seconds before the query's moment."""
    fresh = np.broadcast_to(created_at >= cutoff, (len(moments_at), len(created_at)))
    if max_age is None:
        return fresh.copy()
    return fresh | ((moments_at[:, None] - created_at[None, :]) <= max_age)


def prepare(config: EvalConfig, dataset: Dataset | None = None) -> EvalData:
    """Split, features, queries, member states and candidate masks; pass `dataset` if already read."""
    started = time.perf_counter()
    ds = dataset if dataset is not None else read_dataset(config.dataset)
    split = time_split(ds.interactions, config.test_fraction)
    feats = item_features(ds.items, split.train)
    events = post_events(ds.items, feats)
    item_ids = np.array(sorted(ds.items), dtype=np.int64)
    created_at = np.array([ds.items[int(i)].created_at for i in item_ids], dtype=np.float64)
    column = {int(i): c for c, i in enumerate(item_ids)}

    all_moments = moments(ds.interactions, since=split.cutoff, like_threshold=config.like_threshold)
    queries = sample(all_moments, config.max_queries, config.seed)
    members = [
        member_state(
            m.member_id, m.history, ds.items, ds.members.get(m.member_id), config.max_recent, config.like_threshold
        )
        for m in queries
    ]
    candidates = np.zeros((len(queries), len(item_ids)), dtype=bool)
    positives = np.zeros_like(candidates)
    for row, m in enumerate(queries):
        candidates[row] = candidate_mask(item_ids, created_at, m)
        positives[row, [column[i] for i in m.positives]] = True

    counts = popularity(split.train, config.like_threshold)
    pop = np.array([counts.get(int(i), 0.0) for i in item_ids], dtype=np.float64)
    cold = np.fromiter((m.cold_start for m in queries), dtype=bool, count=len(queries))
    n_pos = positives.sum(axis=1)
    times = np.array([m.timestamp for m in queries], dtype=np.float64)
    fresh_positives = positives & fresh_mask(created_at, split.cutoff, times, config.fresh_max_age)
    with_profile = {k for k, v in ds.members.items() if any(str(x).strip() for x in v.profile.values())}
    profile_only = np.array([m.prior == 0 and m.member_id in with_profile for m in queries], dtype=bool)
    stats = {
        "name": ds.meta.get("name") or Path(config.dataset).name,
        "source": ds.meta.get("source", ""),
        "items": len(item_ids),
        "interactions": len(ds.interactions),
        "train_interactions": len(split.train),
        "test_interactions": len(split.test),
        "cutoff": split.cutoff,
        "test_moments": len(all_moments),
        "queries": len(queries),
        "query_members": len({m.member_id for m in queries}),
        "segments": {"all": len(queries), "cold_start": int(cold.sum()), "warm": int((~cold).sum()),
                     "fresh": int(fresh_positives.any(axis=1).sum()), "profile_only": int(profile_only.sum())},
        "mean_positives": float(n_pos.mean()) if len(queries) else 0.0,
        "fresh_items": int((created_at >= split.cutoff).sum()),
        "fresh_positive_share": float(fresh_positives.sum() / max(positives.sum(), 1)),
        "members_with_profile": len(with_profile),
        "no_history_queries": sum(m.prior == 0 for m in queries),
        "mean_candidates": float(candidates.sum(axis=1).mean()) if len(queries) else 0.0,
        # Positives the protocol says did not exist yet at the moment: no system can retrieve them.
        "unreachable_positives": int((positives & ~candidates).sum()),
        "prepare_s": round(time.perf_counter() - started, 3),
    }
    log.info("eval_data_ready", **{k: v for k, v in stats.items() if k not in ("source", "segments")})
    return EvalData(
        config=config, item_ids=item_ids, created_at=created_at, posts=[events[int(i)] for i in item_ids],
        queries=queries, members=members, candidates=candidates, positives=positives, popularity=pop,
        cutoff=split.cutoff, fresh_positives=fresh_positives, profile_only=profile_only, stats=stats,
        train=tuple(split.train),
    )


def prepare_validation(config: EvalConfig, dataset: Dataset, data: EvalData) -> EvalData:
    """The same protocol inside the training period: its last test_fraction validates, the rest fits.

    Nothing from the test period is in it (queries, histories, counts), so a
    hyperparameter chosen on it has not seen the test.
    """
    return prepare(config, dataclasses.replace(dataset, interactions=list(data.train)))


# ------------------------------------------------------------------ ranking and metrics


def rank(data: EvalData, score_rows: Callable[[np.ndarray], np.ndarray], k: int | None = None) -> np.ndarray:
    """Each query's top-k candidate columns [Q, k] (-1 past the last candidate).

    score_rows(query_indices) returns scores [len(indices), N] over all items;
    non-candidates are masked here, so a scorer need not know about them.
    """
    k = k or data.config.max_k
    out = np.full((len(data.queries), k), -1, dtype=np.int64)
    for start in range(0, len(data.queries), CHUNK):
        idx = np.arange(start, min(start + CHUNK, len(data.queries)))
        out[idx] = topk(np.asarray(score_rows(idx)), data.candidates[idx], k)
    return out


def curve_ks(max_k: int) -> list[int]:
    """About 40 K values, log-spaced from 1 to max_k: the points of the recall@K curves."""
    return sorted({int(round(x)) for x in np.geomspace(1, max_k, 40)} | {max_k})


def score_ranking(data: EvalData, ranked: np.ndarray) -> dict[str, Any]:
    """Metrics of one ranking [Q, >= max_k]: per segment the means, and recall@K curves.

    Also "per_query": {segment: {metric: [that segment's queries]}} (numpy, for
    the intervals; run_eval drops it before writing results.json).
    """
    cfg = data.config
    points = curve_ks(ranked.shape[1])
    segments, curves, per_query = {}, {}, {}
    by_positives: dict[int, tuple] = {}
    for name, rows in data.segment_rows().items():
        positives = data.segment_positives(name)
        if id(positives) not in by_positives:
            rel = relevance(ranked, positives)
            n_pos = positives.sum(axis=1)
            by_positives[id(positives)] = (rel, n_pos, recall_matrix(rel, n_pos, cfg.ks), ndcg_matrix(rel, n_pos, cfg.ndcg_k))
        rel, n_pos, recalls, ndcg = by_positives[id(positives)]
        n = int(rows.sum())
        values = {**{f"recall@{k}": recalls[k][rows] for k in cfg.ks}, f"ndcg@{cfg.ndcg_k}": ndcg[rows]}
        segments[name] = {"queries": n, **{m: (float(v.mean()) if n else None) for m, v in values.items()}}
        per_query[name] = values
        curve = recall_curve(rel[rows], n_pos[rows]) if n else None
        curves[name] = None if curve is None else [round(float(curve[k - 1]), 6) for k in points]
    return {"segments": segments, "curve": {"k": points, **curves}, "per_query": per_query}


def width_dims(dim: int, fractions: Sequence[float]) -> list[int]:
    """Matryoshka prefix widths for a model: round(dim * f), at least 1, widest first, no repeats."""
    return sorted({max(1, int(round(dim * f))) for f in fractions}, reverse=True)


def truncate(vecs: np.ndarray, width: int) -> np.ndarray:
    """The first `width` dimensions, re-normalised to unit length (float32)."""
    v = np.ascontiguousarray(vecs[:, :width], dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


def evaluate_vectors(
    data: EvalData, post_vecs: np.ndarray, member_vecs: np.ndarray, widths: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """Metrics per width for precomputed vectors (posts [N, d] in item order, members [Q, d])."""
    if post_vecs.shape[0] != len(data.item_ids) or member_vecs.shape[0] != len(data.queries):
        raise ValueError(
            f"vectors for {post_vecs.shape[0]} posts and {member_vecs.shape[0]} members; "
            f"the test set has {len(data.item_ids)} and {len(data.queries)}"
        )
    dim = post_vecs.shape[1]
    out = []
    for w in widths or width_dims(dim, data.config.widths):
        started = time.perf_counter()
        p, m = truncate(post_vecs, w), truncate(member_vecs, w)
        ranked = rank(data, lambda idx: m[idx] @ p.T)
        result = {"width": int(w), "fraction": round(w / dim, 4), **score_ranking(data, ranked)}
        result["rank_s"] = round(time.perf_counter() - started, 3)
        out.append(result)
    return out


def _embed_unique(encoder: Any, prompts: Sequence[str]) -> tuple[np.ndarray, int]:
    """Embed each distinct prompt once (many member states repeat); rows follow `prompts`."""
    unique = sorted(set(prompts))
    where = {p: i for i, p in enumerate(unique)}
    vecs = encoder.embed_prompts(unique)
    return vecs[[where[p] for p in prompts]], len(unique)


def prompts_cut(encoder: Any, prompts: Sequence[str]) -> float | None:
    """truncated_share of these prompts under the encoder's token limit; None when it cannot tell."""
    if not prompts or not hasattr(encoder, "tokenize") or not getattr(encoder, "max_length", None):
        return None
    from feedret.encoder.model import truncated_share

    return round(truncated_share(encoder.tokenize(prompts), encoder.max_length), 4)


def embed(encoder: Any, data: EvalData) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Post vectors [N, d], member vectors [Q, d] and timings for any Encoder-like object.

    An object with member_prompt/post_prompt/embed_prompts (Encoder, OnnxEncoder)
    gets each distinct prompt embedded once; otherwise embed_posts/embed_members.
    Timings also carry the share of post and member prompts the token limit cut.
    """
    t0 = time.perf_counter()
    timings: dict[str, Any] = {}
    if all(hasattr(encoder, a) for a in ("post_prompt", "member_prompt", "embed_prompts")):
        post_prompts = [encoder.post_prompt(p) for p in data.posts]
        post_vecs, timings["distinct_post_prompts"] = _embed_unique(encoder, post_prompts)
        t1 = time.perf_counter()
        member_prompts = [encoder.member_prompt(m) for m in data.members]
        member_vecs, timings["distinct_member_prompts"] = _embed_unique(encoder, member_prompts)
        t2 = time.perf_counter()
        timings["post_prompts_truncated"] = prompts_cut(encoder, post_prompts)
        timings["member_prompts_truncated"] = prompts_cut(encoder, member_prompts)
        for side, share in (("post", timings["post_prompts_truncated"]), ("member", timings["member_prompts_truncated"])):
            if share and share > 0.05:
                log.warning("prompts_truncated", side=side, share=share, max_length=encoder.max_length,
                            model=getattr(encoder, "model_version", None), fix="train with a larger max_length")
    else:
        post_vecs = np.asarray(encoder.embed_posts(data.posts), dtype=np.float32)
        t1 = time.perf_counter()
        member_vecs = np.asarray(encoder.embed_members(data.members), dtype=np.float32)
        t2 = time.perf_counter()
    timings.update(
        embed_posts_s=round(t1 - t0, 3),
        embed_members_s=round(t2 - t1, 3),
        posts_per_s=round(len(data.posts) / max(t1 - t0, 1e-9), 1),
        members_per_s=round(len(data.members) / max(t2 - t1, 1e-9), 1),
    )
    return post_vecs, member_vecs, timings


def describe_encoder(encoder: Any) -> dict[str, Any]:
    meta = getattr(encoder, "meta", None)
    return {
        "model_version": getattr(encoder, "model_version", None),
        "dim": int(encoder.dim) if hasattr(encoder, "dim") else None,
        "pooling": getattr(encoder, "pooling", None),
        "causal": getattr(encoder, "causal", None),
        "max_length": getattr(encoder, "max_length", None),
        "numeric": getattr(meta, "numeric", None),
        "quantizer": getattr(meta, "quantizer", None) is not None,
        "activity_chars": getattr(meta, "activity_chars", None),
        "max_activity": getattr(meta, "max_activity", None),
    }


def evaluate_encoder(encoder: Any, data: EvalData, name: str | None = None, **info: Any) -> dict[str, Any]:
    """One dual encoder: embed posts and member states, rank, score at every Matryoshka width.

    Returns {"name", "kind": "encoder", "model": {...}, "timings": {...}, "widths": [per width:
    {"width", "fraction", "segments": {segment: {"queries", "recall@K"..., "ndcg@K"}}, "curve"}]}.
    """
    post_vecs, member_vecs, timings = embed(encoder, data)
    widths = evaluate_vectors(data, post_vecs, member_vecs)
    timings["rank_s"] = round(sum(w.pop("rank_s") for w in widths), 3)
    model = {**describe_encoder(encoder), **info}
    name = name or model["model_version"] or "encoder"
    log.info("eval_system_done", system=name, **{k: v for k, v in timings.items()}, **_headline(widths[0]))
    return {"name": name, "kind": "encoder", "model": model, "timings": timings, "widths": widths}


def popularity_scores(data: EvalData) -> np.ndarray:
    """Training-period like counts made strictly ordered: more likes first, then the lower item id."""
    order = np.lexsort((data.item_ids, -data.popularity))
    scores = np.empty(len(order), dtype=np.float64)
    scores[order] = np.arange(len(order), 0, -1, dtype=np.float64)
    return scores


def evaluate_popularity(data: EvalData) -> dict[str, Any]:
    """The baseline every model must beat: the same list for everyone, minus what they have seen."""
    started = time.perf_counter()
    scores = popularity_scores(data)
    ranked = rank(data, lambda idx: np.broadcast_to(scores, (len(idx), len(scores))))
    result = {"width": None, "fraction": None, **score_ranking(data, ranked)}
    timings = {"rank_s": round(time.perf_counter() - started, 3)}
    log.info("eval_system_done", system=POPULARITY, **timings, **_headline(result))
    return {
        "name": POPULARITY, "kind": "popularity",
        "model": {"model_version": f"{POPULARITY} (training-period likes >= {data.config.like_threshold:g})"},
        "timings": timings, "widths": [result],
    }


def _baseline_ranker(model: Any, data: EvalData, history: Any) -> Callable[[np.ndarray], np.ndarray]:
    """score_rows for `rank`: the model's scores on each query's history, ties (and no signal) by popularity."""
    from feedret.evaluation.baselines import tie_break

    secondary = popularity_scores(data)
    return lambda idx: tie_break(model.scores(history[idx]), secondary)


def _validation_recall(model: Any, val: EvalData, history: Any, segment: str) -> float | None:
    """Mean recall@TUNE_K over the segment's validation queries; None when it has none."""
    rows = val.segment_rows()[segment]
    if not rows.any():
        return None
    ranked = rank(val, _baseline_ranker(model, val, history), k=TUNE_K)
    positives = val.segment_positives(segment)
    recall = recall_matrix(relevance(ranked, positives), positives.sum(axis=1), [TUNE_K])[TUNE_K]
    return float(recall[rows].mean())


def evaluate_baselines(
    data: EvalData, validation: EvalData, baselines: Sequence[Any] | None = None
) -> list[dict[str, Any]]:
    """Each CF baseline tuned on `validation` (every grid point fitted on its training period, chosen
    by recall@100 on its `select_on` segment), refitted on data's training period, then scored.

    Returns one system dict per baseline (as evaluate_popularity), with "tuning": the grid,
    each point's validation recall@100, and the choice (the first point on a tie, and
    when the validation split has no queries at all).
    """
    from feedret.evaluation.baselines import BASELINES, history_likes, training

    cfg = data.config
    train, val_train = (training(d.train, d.item_ids, cfg.like_threshold) for d in (data, validation))
    history, val_history = (
        history_likes([m.history for m in d.queries], d.item_ids, cfg.like_threshold) for d in (data, validation)
    )
    out = []
    for b in baselines if baselines is not None else BASELINES:
        started = time.perf_counter()
        seed = {"seed": cfg.seed} if b.seeded else {}
        segment = b.select_on if validation.stats["segments"].get(b.select_on) else "all"
        grid = []
        for params in b.grid:
            t = time.perf_counter()
            score = _validation_recall(b.fit(val_train, **params, **seed), validation, val_history, segment)
            score = None if score is None else round(score, 6)
            grid.append({"params": dict(params), f"recall@{TUNE_K}": score, "s": round(time.perf_counter() - t, 3)})
            log.info("eval_baseline_tuning", system=b.name, **params, **{f"val_recall@{TUNE_K}": score})
        scores = [-math.inf if g[f"recall@{TUNE_K}"] is None else g[f"recall@{TUNE_K}"] for g in grid]
        best = max(range(len(grid)), key=lambda i: (scores[i], -i))  # ties: the earlier point
        chosen = dict(b.grid[best])
        tune_s = time.perf_counter() - started
        t = time.perf_counter()
        model = b.fit(train, **chosen, **seed)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        result = {"width": None, "fraction": None, **score_ranking(data, rank(data, _baseline_ranker(model, data, history)))}
        timings = {"tune_s": round(tune_s, 3), "fit_s": round(fit_s, 3), "rank_s": round(time.perf_counter() - t, 3)}
        label = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen.items())
        log.info("eval_system_done", system=b.name, **timings, **_headline(result))
        out.append({
            "name": b.name, "kind": "baseline",
            "model": {"model_version": f"{b.name} ({label})", "description": b.description, "params": chosen},
            "tuning": {"metric": f"recall@{TUNE_K}", "segment": segment, "grid": grid, "chosen": chosen},
            "timings": timings, "widths": [result],
        })
    return out


def _headline(width_result: Mapping[str, Any]) -> dict[str, Any]:
    seg = width_result["segments"]["all"]
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in seg.items() if k != "queries"}


# ------------------------------------------------------------------ intervals


def add_differences(systems: Sequence[dict[str, Any]], data: EvalData) -> dict[str, Any]:
    """Every system's difference from the best baseline, per segment and metric, with a 95% interval.

    The best baseline of a (segment, metric) is the system of a BASELINE_KINDS kind
    with the highest point estimate there (the earlier one on a tie). Each
    interval comes from the same member resamples for every system (paired).
    Sets w["vs_best_baseline"][segment][metric] = {"baseline", "diff", "low", "high"} on
    every width and drops w["per_query"]. Returns the method and the best baselines.
    """
    cfg = data.config
    members = np.array(data.member_ids, dtype=object)
    baselines = [s for s in systems if s["kind"] in BASELINE_KINDS]
    best: dict[str, dict[str, str]] = {}
    counts: dict[str, int] = {}
    for seg, rows in data.segment_rows().items():
        if not rows.any() or not baselines:
            continue
        boot = MemberBootstrap.draw(members[rows], cfg.bootstrap_resamples, cfg.seed)
        best[seg], counts[seg] = {}, int(boot.weights.shape[1])
        for metric in cfg.metric_names():
            ref = max(baselines, key=lambda s: s["widths"][0]["segments"][seg][metric])
            best[seg][metric] = ref["name"]
            reference = ref["widths"][0]["per_query"][seg][metric]
            for s in systems:
                for w in s["widths"]:
                    interval = boot.difference(w["per_query"][seg][metric], reference)
                    w.setdefault("vs_best_baseline", {}).setdefault(seg, {})[metric] = {
                        "baseline": ref["name"], **{k: round(v, 6) for k, v in interval.to_json().items()},
                    }
    for s in systems:
        for w in s["widths"]:
            w.pop("per_query", None)
    return {
        "method": "member bootstrap: members resampled with replacement, all their queries with them; "
                  "percentile interval of the paired difference in means",
        "resamples": cfg.bootstrap_resamples, "seed": cfg.seed, "level": LEVEL,
        "baselines": [s["name"] for s in baselines], "best_baseline": best, "members": counts,
    }


# ------------------------------------------------------------------ a whole run


def _check_baselines_installed() -> None:
    try:
        import implicit  # noqa: F401
        import scipy  # noqa: F401
    except ImportError as exc:
        raise BaselinesMissing(
            f"the CF baselines need scipy and implicit: pip install -e '.[eval]', or pass --no-baselines ({exc})"
        ) from None


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    for pkg in ("feedret", "torch", "transformers", "tokenizers", "numpy", "scipy", "implicit"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _unique_name(name: str, taken: Iterable[str], model_dir: Path | None) -> str:
    taken = set(taken)
    if name not in taken:
        return name
    alt = f"{name} ({model_dir})" if model_dir is not None else name
    n = 2
    while alt in taken:
        alt, n = f"{name} #{n}", n + 1
    return alt


def run_eval(
    config: EvalConfig,
    model_dirs: Sequence[str | Path] = (),
    *,
    minilm: bool = True,
    baselines: bool = True,
    max_length: int | None = None,  # None: each model's own
    batch_size: int = 64,
    device: str = "cpu",
    torch_threads: int | None = None,
    out: str | Path | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Evaluate each model directory, popularity, (unless baselines=False) the CF baselines and
    (unless minilm=False) MiniLM, all on the same queries; write the report to `out`."""
    from feedret.encoder.model import Encoder

    started = time.perf_counter()
    minilm_path = None
    if minilm:
        from feedret.encoder.minilm import minilm_dir

        minilm_path = minilm_dir()  # fail before the slow part when it is not installed
    if baselines:
        _check_baselines_installed()
    dataset = read_dataset(config.dataset)
    data = prepare(config, dataset)
    systems = [evaluate_popularity(data)]
    validation = None
    if baselines:
        validation = prepare_validation(config, dataset, data)
        systems += evaluate_baselines(data, validation)
    for model_dir in model_dirs:
        t = time.perf_counter()
        encoder = Encoder.from_pretrained(
            model_dir, device=device, max_length=max_length, batch_size=batch_size, torch_threads=torch_threads
        )
        load_s = round(time.perf_counter() - t, 3)
        name = _unique_name(encoder.model_version, (s["name"] for s in systems), Path(model_dir))
        result = evaluate_encoder(encoder, data, name=name, model_dir=str(model_dir))
        result["timings"]["load_s"] = load_s
        systems.append(result)
        del encoder
    if minilm_path is not None:
        from feedret.encoder.minilm import MINILM_MAX_LENGTH, MINILM_NAME, minilm_version

        t = time.perf_counter()
        encoder = Encoder.from_pretrained(
            minilm_path, device=device, max_length=MINILM_MAX_LENGTH, batch_size=batch_size, torch_threads=torch_threads
        )
        load_s = round(time.perf_counter() - t, 3)
        result = evaluate_encoder(
            encoder, data, name=MINILM_NAME, model_dir=str(minilm_path), zero_shot=True,
        )
        result["model"]["model_version"] = minilm_version()
        result["timings"]["load_s"] = load_s
        systems.append(result)
        del encoder
    intervals = add_differences(systems, data)
    results = {
        "command": command,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config.to_json(),
        "settings": {"max_length": max_length, "minilm_max_length": _minilm_max_length() if minilm else None,
                     "batch_size": batch_size, "device": device, "torch_threads": torch_threads},
        "dataset": data.stats,
        "validation": None if validation is None else validation.stats,
        "intervals": intervals,
        "versions": versions(),
        "systems": systems,
        "timings": {"prepare_s": data.stats["prepare_s"], "total_s": round(time.perf_counter() - started, 3)},
    }
    if out is not None:
        write_report(results, out)
    return results


# ------------------------------------------------------------------ the report


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def _width_label(w: Mapping[str, Any]) -> str:
    if w["width"] is None:
        return "–"
    frac = w["fraction"]
    label = "full" if frac == 1 else f"1/{round(1 / frac)}" if abs(1 / frac - round(1 / frac)) < 1e-6 else f"{frac:g}"
    return f"{w['width']} ({label})"


def popularity_row(results: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for s in results["systems"]:
        if s["kind"] == "popularity":
            return s["widths"][0]
    return None


def _signed(x: float) -> str:
    return ("+" if x >= 0 else "−") + f"{abs(x):.4f}"


def _diff(d: Mapping[str, Any] | None, system: str) -> str:
    """'+0.0040 [−0.0180, +0.0240]'; the best baseline's own row says so."""
    if d is None:
        return "–"
    if d["baseline"] == system and d["diff"] == d["low"] == d["high"] == 0:
        return "best baseline"
    return f"{_signed(d['diff'])} [{_signed(d['low'])}, {_signed(d['high'])}]"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def segment_title(segment: str, config: Mapping[str, Any]) -> str:
    if segment == "fresh" and config.get("fresh_max_age") is not None:
        return (f"Fresh posts (positives created after the split or at most "
                f"{_duration(config['fresh_max_age'])} before the moment)")
    return SEGMENT_TITLES[segment]


def _params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _cut(timings: Mapping[str, Any]) -> str:
    """Shares of member and post prompts cut by the token limit, as percentages."""
    m, p = timings.get("member_prompts_truncated"), timings.get("post_prompts_truncated")
    if m is None and p is None:
        return "–"
    return " / ".join("–" if x is None else f"{100 * x:.1f}%" for x in (m, p))


def _date(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def markdown(results: Mapping[str, Any]) -> str:
    cfg, ds = results["config"], results["dataset"]
    metric_names = [f"recall@{k}" for k in cfg["ks"]] + [f"ndcg@{cfg['ndcg_k']}"]
    ratio_metric = "recall@100" if 100 in cfg["ks"] else f"recall@{cfg['ks'][-1]}"
    pop = popularity_row(results)
    intervals = results.get("intervals") or {}
    baselines = [s for s in results["systems"] if s["kind"] == "baseline"]
    segments = [seg for seg in SEGMENTS if seg in ds["segments"]]
    lines = [
        f"# feedret eval: {ds['name']}",
        "",
        "```sh",
        results.get("command") or "(called from Python)",
        "```",
        "",
        f"Held-out evaluation on **{ds['name']}** ({ds['items']:,} items, {ds['interactions']:,} interactions). "
        f"Time split at {_date(ds['cutoff'])}: the last {cfg['test_fraction']:g} of interactions evaluate "
        f"({ds['test_interactions']:,}), the rest train ({ds['train_interactions']:,}); item features, "
        f"popularity counts and every baseline's fit come from the training period only.",
        "",
        f"A query is one test moment (a member rating at one time): {ds['test_moments']:,} in the test period, "
        f"{ds['queries']:,} of them evaluated (deterministic sample, seed {cfg['seed']}; {ds['query_members']} distinct members). "
        f"Positives: the items rated ≥ {cfg['like_threshold']:g} at that moment and not seen before "
        f"({ds['mean_positives']:.2f} per query). Candidates: every item that existed then and the member had not "
        f"rated ({ds['mean_candidates']:,.0f} per query on average). The member's state is their history strictly "
        f"before the moment (up to {cfg['max_recent']} most recent liked items). Cold start: at most 5 prior "
        f"engagements.",
        "",
        f"Encoders are scored at Matryoshka prefixes too: both vectors cut to the first w dimensions and "
        f"re-normalised. The last column of each segment's first table is each row's {ratio_metric} over "
        f"popularity's in the same segment.",
        "",
    ]
    if baselines:
        lines += [
            "Baselines (`evaluation/baselines.py`) are fitted on the training period's likes and score each "
            "query from the member's likes before the moment (ALS solves the member's vector from them: fold-in), "
            "so a member new since the split is scored like any other. Items nobody liked in the training period "
            "(every fresh post) have no collaborative signal: each baseline ranks them after every item it can "
            "score, and it falls back on popularity (then item id) wherever its scores tie. Hyperparameters were "
            "chosen on a validation split carved from the end of the training period (below).",
            "",
        ]
    if "fresh" in ds["segments"]:
        lines += [
            f"**Fresh posts**: {_count(ds.get('fresh_items', 0), 'item')} created at or after the split; "
            f"{ds.get('fresh_positive_share', 0):.1%} of the evaluated positives are fresh"
            + (f" (created after the split or at most {_duration(cfg['fresh_max_age'])} before the moment)"
               if cfg.get("fresh_max_age") is not None else " (created after the split)")
            + ". That segment's recall and NDCG count only the fresh positives, over the queries that have one.",
            "",
        ]
    if intervals.get("best_baseline"):
        lines += [
            f"**Intervals**: each system's difference from the best baseline (among "
            f"{', '.join(intervals['baselines'])}: the one with the highest point estimate of that metric in that "
            f"segment), with a {intervals['level']:.0%} interval from {intervals['resamples']:,} member bootstrap "
            f"resamples (members drawn with replacement, all their queries with them; seed {intervals['seed']}). "
            f"An interval that contains 0 is no evidence of a difference.",
            "",
        ]
    for seg in segments:
        n = ds["segments"][seg]
        lines += [f"## {segment_title(seg, cfg)}: {n:,} queries", ""]
        if not n:
            if seg == "profile_only":
                lines += [
                    "No query is from a member with a profile and no history: "
                    + ("the dataset has no member profiles (`members.jsonl`)." if not ds.get("members_with_profile")
                       else f"{ds['members_with_profile']:,} members have a profile, but none of them was queried "
                            f"before their first engagement.")
                    + f" ({ds.get('no_history_queries', 0):,} queries have no history.)",
                    "",
                ]
            else:
                lines += ["No query in this segment.", ""]
            continue
        header = ["system", "width", *metric_names, f"{ratio_metric} / popularity"]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
        base = pop["segments"][seg].get(ratio_metric) if pop else None
        for s in results["systems"]:
            for w in s["widths"]:
                m = w["segments"][seg]
                v = m.get(ratio_metric)
                ratio = f"{v / base:.2f}×" if (v is not None and base) else "–"
                lines.append(
                    "| " + " | ".join([s["name"], _width_label(w), *(_fmt(m.get(x)) for x in metric_names), ratio]) + " |"
                )
        lines.append("")
        best = intervals.get("best_baseline", {}).get(seg)
        if best:
            members = intervals.get("members", {}).get(seg)
            lines += [
                f"Difference from the best baseline, {intervals['level']:.0%} member-bootstrap interval"
                + (f" ({members} members):" if members else ":"),
                "",
                "| system | width | " + " | ".join(f"{x} − {best[x]}" for x in metric_names) + " |",
                "|---|---|" + "---:|" * len(metric_names),
            ]
            for s in results["systems"]:
                for w in s["widths"]:
                    d = w.get("vs_best_baseline", {}).get(seg, {})
                    lines.append("| " + " | ".join([s["name"], _width_label(w), *(_diff(d.get(x), s["name"]) for x in metric_names)]) + " |")
            lines.append("")
    if baselines:
        val = results.get("validation") or {}
        lines += [
            "## Baselines: tuned on a validation split",
            "",
            f"The same protocol inside the training period: its last {cfg['test_fraction']:g} "
            + (f"(from {_date(val['cutoff'])}, {val['test_interactions']:,} interactions; {val['queries']:,} queries, "
               f"{val['segments']['cold_start']:,} of them cold start, from {_count(val['query_members'], 'member')}) "
               f"validates, the rest "
               f"({val['train_interactions']:,} interactions) fits. " if val else "validates, the rest fits. ")
            + f"Every grid point was fitted on that and scored by validation recall@{TUNE_K}; the chosen point was "
            "refitted on the whole training period. Cold-start popularity is chosen on the validation's cold-start "
            "queries (the members it is for), the others on all of them.",
            "",
            f"| baseline | hyperparameters | validation recall@{TUNE_K} | chosen |",
            "|---|---|---:|:---:|",
        ]
        for s in baselines:
            tuning = s.get("tuning", {})
            for g in tuning.get("grid", []):
                chosen = "✓" if g["params"] == tuning.get("chosen") else ""
                seg = "" if tuning.get("segment", "all") == "all" else f" ({tuning['segment']})"
                lines.append(f"| {s['name']} | {_params(g['params'])} | {_fmt(g[f'recall@{TUNE_K}'])}{seg} | {chosen} |")
        lines.append("")
    lines += [
        "## Plots",
        "",
        f"![{ratio_metric} by system and width]({PLOT_WIDTHS})",
        "",
        f"![recall@K]({PLOT_CURVES})",
        "",
        "## Systems",
        "",
        "| system | model version | dim | pooling | max length | members cut / posts cut | prompt numbers | load or fit s | tune s | embed posts s | embed members s | rank s |",
        "|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in results["systems"]:
        m, t = s["model"], s["timings"]
        numbers = "–" if s["kind"] in BASELINE_KINDS else (
            f"{m.get('numeric')}" + ("" if m.get("quantizer") or m.get("numeric") != "quantized" else " (no quantizer: left out)")
        )
        lines.append(
            f"| {s['name']} | {m.get('model_version') or '–'} | {m.get('dim') or '–'} | {m.get('pooling') or '–'} | "
            f"{m.get('max_length') or '–'} | {_cut(t)} | {numbers} | {t.get('load_s', t.get('fit_s', '–'))} | {t.get('tune_s', '–')} | "
            f"{t.get('embed_posts_s', '–')} | {t.get('embed_members_s', '–')} | {t.get('rank_s', '–')} |"
        )
    v = results["versions"]
    lines += [
        "",
        "Members cut / posts cut: the share of member and post prompts that reached the token limit "
        "(max length) and lost their tail: a member's oldest activity, the end of a post's text.",
        "",
        f"Total {results['timings']['total_s']:.0f} s (data {results['timings']['prepare_s']:.1f} s) on "
        f"{results['settings']['device']}; feedret {v.get('feedret')} (commit {str(v.get('git_commit', '?'))[:10]}"
        f"{', uncommitted changes' if v.get('git_dirty') else ''}), torch {v.get('torch')}, transformers "
        f"{v.get('transformers')}, numpy {v.get('numpy')}"
        + (f", scipy {v.get('scipy')}, implicit {v.get('implicit')}" if baselines else "")
        + f", Python {v.get('python')}. All numbers: {RESULTS_JSON}.",
        "",
    ]
    return "\n".join(lines)


def plot(results: Mapping[str, Any], out: Path) -> list[Path]:
    """recall@100 by encoder and width (bars; baselines as lines), and recall@K curves at full width,
    for all queries, cold start and fresh posts; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("eval_no_plots", reason="matplotlib not installed: pip install -e '.[eval]'")
        return []
    cfg = results["config"]
    metric = "recall@100" if 100 in cfg["ks"] else f"recall@{cfg['ks'][-1]}"
    encoders = [s for s in results["systems"] if s["kind"] not in BASELINE_KINDS]
    baselines = [s for s in results["systems"] if s["kind"] in BASELINE_KINDS]
    panels = [seg for seg in ("all", "cold_start", "fresh") if results["dataset"]["segments"].get(seg)]
    if not panels:
        return []
    styles = [(0, (5, 2)), (0, (1, 1)), (0, (3, 1, 1, 1)), (0, (5, 1, 1, 1, 1, 1)), (0, (2, 2))]

    def baseline_style(i: int, s: Mapping[str, Any]) -> dict[str, Any]:
        if s["kind"] == "popularity":
            return {"color": "black", "linestyle": "--"}
        # Dashed, in colours from the end of matplotlib's cycle, so encoders (solid, from its start) stand out.
        return {"color": ("tab:brown", "tab:olive", "tab:cyan", "tab:gray", "tab:pink")[(i - 1) % 5],
                "linestyle": styles[i % len(styles)]}

    def title(seg: str) -> str:
        return f"{segment_title(seg, cfg).split(' (')[0]} ({results['dataset']['segments'][seg]} queries)"

    written = []

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + LEGEND_WIDTH, 4.2), squeeze=False)
    fractions = list(cfg["widths"])
    for ax, seg in zip(axes[0], panels):
        bar = 0.8 / max(len(fractions), 1)
        for j, frac in enumerate(fractions):
            heights = []
            for s in encoders:
                match = [w for w in s["widths"] if w["fraction"] is not None and abs(w["fraction"] - frac) < 0.02]
                heights.append(match[0]["segments"][seg][metric] if match else 0.0)
            label = "full" if frac == 1 else f"1/{round(1 / frac)}" if abs(1 / frac - round(1 / frac)) < 1e-6 else f"{frac:g}"
            ax.bar(np.arange(len(encoders)) + (j - (len(fractions) - 1) / 2) * bar, heights, bar, label=f"width {label}")
        for i, s in enumerate(baselines):
            ax.axhline(s["widths"][0]["segments"][seg][metric], label=s["name"], **baseline_style(i, s))
        ax.set_xticks(np.arange(len(encoders)), [s["name"] for s in encoders], rotation=10, fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(title(seg))
    _legend(fig, axes[0])
    fig.savefig(out / PLOT_WIDTHS, dpi=110)
    plt.close(fig)
    written.append(out / PLOT_WIDTHS)

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + LEGEND_WIDTH, 4.2), squeeze=False)
    for ax, seg in zip(axes[0], panels):
        for s in results["systems"]:
            w = s["widths"][0]  # full width (baselines have one)
            if w["curve"].get(seg) is None:
                continue
            style = baseline_style(baselines.index(s), s) if s in baselines else {}
            ax.plot(w["curve"]["k"], w["curve"][seg], label=s["name"], **style)
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        ax.set_ylim(0, 1)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title(seg))
    _legend(fig, axes[0])
    fig.savefig(out / PLOT_CURVES, dpi=110)
    plt.close(fig)
    written.append(out / PLOT_CURVES)
    return written


def _legend(fig: Any, axes: Sequence[Any]) -> None:
    """One legend for all panels, right of them (inside a panel it hides bars and curves)."""
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - LEGEND_WIDTH / fig.get_figwidth(), 1))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):  # per-query values are for the intervals, not the report
        return {k: _json_safe(v) for k, v in obj.items() if k != "per_query"}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_report(results: Mapping[str, Any], out: str | Path) -> list[Path]:
    """results.json, results.md and the PNG plots into `out` (created); the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(_json_safe(results), indent=1) + "\n", encoding="utf-8")
    (out / RESULTS_MD).write_text(markdown(results), encoding="utf-8")
    written = [out / RESULTS_JSON, out / RESULTS_MD, *plot(results, out)]
    log.info("eval_report_written", out=str(out), files=[p.name for p in written])
    return written


def _minilm_max_length() -> int:
    from feedret.encoder.minilm import MINILM_MAX_LENGTH

    return MINILM_MAX_LENGTH

"""`feedret eval`: held-out retrieval quality of dual encoders against baselines, with a report.

The protocol is training's (feedret.training.examples), applied to the period
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
(training-period likes, ties by item id), and zero-shot all-MiniLM-L6-v2.
Metrics: recall@K = |top K ∩ positives| / |positives| and binary NDCG@K,
averaged over queries, overall and for cold-start members (at most 5 prior
engagements) and the rest.

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

from feedret.dataprep.format import Dataset, read_dataset
from feedret.evaluation.metrics import ndcg_matrix, recall_curve, recall_matrix, relevance, topk
from feedret.members import MemberProfile
from feedret.training.examples import (
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

SEGMENTS = ("all", "cold_start", "warm")
SEGMENT_TITLES = {
    "all": "All queries",
    "cold_start": "Cold start (at most 5 prior engagements)",
    "warm": "Warm (more than 5 prior engagements)",
}
POPULARITY = "popularity"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_WIDTHS = "recall_at_100.png"
PLOT_CURVES = "recall_curves.png"
CHUNK = 256  # queries scored at once: [CHUNK, items] float64 stays small


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

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive, got {self.ks}")
        if self.ndcg_k < 1:
            raise ValueError(f"ndcg_k must be >= 1, got {self.ndcg_k}")
        if not self.widths or any(not 0 < w <= 1 for w in self.widths):
            raise ValueError(f"widths are fractions of the model dimension in (0, 1], got {self.widths}")
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1 (or None for all), got {self.max_queries}")
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
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_positives(self) -> np.ndarray:
        return self.positives.sum(axis=1)

    @property
    def cold_start(self) -> np.ndarray:
        return np.fromiter((m.cold_start for m in self.queries), dtype=bool, count=len(self.queries))

    def segment_rows(self) -> dict[str, np.ndarray]:
        cold = self.cold_start
        return {"all": np.ones_like(cold), "cold_start": cold, "warm": ~cold}


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
        "segments": {"all": len(queries), "cold_start": int(cold.sum()), "warm": int((~cold).sum())},
        "mean_positives": float(n_pos.mean()) if len(queries) else 0.0,
        "mean_candidates": float(candidates.sum(axis=1).mean()) if len(queries) else 0.0,
        # Positives the protocol says did not exist yet at the moment: no system can retrieve them.
        "unreachable_positives": int((positives & ~candidates).sum()),
        "prepare_s": round(time.perf_counter() - started, 3),
    }
    log.info("eval_data_ready", **{k: v for k, v in stats.items() if k not in ("source", "segments")})
    return EvalData(
        config=config, item_ids=item_ids, created_at=created_at, posts=[events[int(i)] for i in item_ids],
        queries=queries, members=members, candidates=candidates, positives=positives, popularity=pop,
        cutoff=split.cutoff, stats=stats,
    )


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
    """Metrics of one ranking [Q, >= max_k]: per segment the means, and recall@K curves."""
    cfg = data.config
    rel = relevance(ranked, data.positives)
    n_pos = data.n_positives
    recalls = recall_matrix(rel, n_pos, cfg.ks)
    ndcg = ndcg_matrix(rel, n_pos, cfg.ndcg_k)
    points = curve_ks(ranked.shape[1])
    segments, curves = {}, {}
    for name, rows in data.segment_rows().items():
        n = int(rows.sum())
        metrics: dict[str, Any] = {"queries": n}
        for k in cfg.ks:
            metrics[f"recall@{k}"] = float(recalls[k][rows].mean()) if n else None
        metrics[f"ndcg@{cfg.ndcg_k}"] = float(ndcg[rows].mean()) if n else None
        segments[name] = metrics
        curve = recall_curve(rel[rows], n_pos[rows]) if n else None
        curves[name] = None if curve is None else [round(float(curve[k - 1]), 6) for k in points]
    return {"segments": segments, "curve": {"k": points, **curves}}


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


def embed(encoder: Any, data: EvalData) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Post vectors [N, d], member vectors [Q, d] and timings for any Encoder-like object.

    An object with member_prompt/post_prompt/embed_prompts (Encoder, OnnxEncoder)
    gets each distinct prompt embedded once; otherwise embed_posts/embed_members.
    """
    t0 = time.perf_counter()
    timings: dict[str, Any] = {}
    if all(hasattr(encoder, a) for a in ("post_prompt", "member_prompt", "embed_prompts")):
        post_vecs, timings["distinct_post_prompts"] = _embed_unique(encoder, [encoder.post_prompt(p) for p in data.posts])
        t1 = time.perf_counter()
        member_vecs, timings["distinct_member_prompts"] = _embed_unique(
            encoder, [encoder.member_prompt(m) for m in data.members]
        )
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


def _headline(width_result: Mapping[str, Any]) -> dict[str, Any]:
    seg = width_result["segments"]["all"]
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in seg.items() if k != "queries"}


# ------------------------------------------------------------------ a whole run


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    for pkg in ("feedret", "torch", "transformers", "tokenizers", "numpy"):
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
    max_length: int = 128,
    batch_size: int = 64,
    device: str = "cpu",
    torch_threads: int | None = None,
    out: str | Path | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Evaluate each model directory, popularity and (unless minilm=False) MiniLM; write the report to `out`."""
    from feedret.encoder.model import Encoder

    started = time.perf_counter()
    minilm_path = None
    if minilm:
        from feedret.evaluation.minilm import minilm_dir

        minilm_path = minilm_dir()  # fail before the slow part when it is not installed
    data = prepare(config)
    systems = [evaluate_popularity(data)]
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
        from feedret.evaluation.minilm import MINILM_MAX_LENGTH, MINILM_NAME, minilm_version

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
    results = {
        "command": command,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config.to_json(),
        "settings": {"max_length": max_length, "minilm_max_length": _minilm_max_length() if minilm else None,
                     "batch_size": batch_size, "device": device, "torch_threads": torch_threads},
        "dataset": data.stats,
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


def markdown(results: Mapping[str, Any]) -> str:
    cfg, ds = results["config"], results["dataset"]
    metric_names = [f"recall@{k}" for k in cfg["ks"]] + [f"ndcg@{cfg['ndcg_k']}"]
    ratio_metric = "recall@100" if 100 in cfg["ks"] else f"recall@{cfg['ks'][-1]}"
    pop = popularity_row(results)
    cutoff = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ds["cutoff"]))
    lines = [
        f"# feedret eval: {ds['name']}",
        "",
        "```sh",
        results.get("command") or "(called from Python)",
        "```",
        "",
        f"Held-out evaluation on **{ds['name']}** ({ds['items']:,} items, {ds['interactions']:,} interactions). "
        f"Time split at {cutoff}: the last {cfg['test_fraction']:g} of interactions evaluate "
        f"({ds['test_interactions']:,}), the rest train ({ds['train_interactions']:,}); item features and "
        f"popularity counts come from the training period only.",
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
        f"re-normalised. The last column is each row's {ratio_metric} over popularity's in the same segment.",
        "",
    ]
    for seg in SEGMENTS:
        n = ds["segments"][seg]
        lines += [f"## {SEGMENT_TITLES[seg]}: {n:,} queries", ""]
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
    lines += [
        "## Plots",
        "",
        f"![{ratio_metric} by system and width]({PLOT_WIDTHS})",
        "",
        f"![recall@K]({PLOT_CURVES})",
        "",
        "## Systems",
        "",
        "| system | model version | dim | pooling | max length | prompt numbers | load s | embed posts s | embed members s | rank s |",
        "|---|---|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for s in results["systems"]:
        m, t = s["model"], s["timings"]
        numbers = "–" if s["kind"] == "popularity" else (
            f"{m.get('numeric')}" + ("" if m.get("quantizer") or m.get("numeric") != "quantized" else " (no quantizer: left out)")
        )
        lines.append(
            f"| {s['name']} | {m.get('model_version') or '–'} | {m.get('dim') or '–'} | {m.get('pooling') or '–'} | "
            f"{m.get('max_length') or '–'} | {numbers} | {t.get('load_s', '–')} | {t.get('embed_posts_s', '–')} | "
            f"{t.get('embed_members_s', '–')} | {t.get('rank_s', '–')} |"
        )
    v = results["versions"]
    lines += [
        "",
        f"Total {results['timings']['total_s']:.0f} s (data {results['timings']['prepare_s']:.1f} s) on "
        f"{results['settings']['device']}; feedret {v.get('feedret')} (commit {str(v.get('git_commit', '?'))[:10]}"
        f"{', uncommitted changes' if v.get('git_dirty') else ''}), torch {v.get('torch')}, transformers "
        f"{v.get('transformers')}, numpy {v.get('numpy')}, Python {v.get('python')}. All numbers: {RESULTS_JSON}.",
        "",
    ]
    return "\n".join(lines)


def plot(results: Mapping[str, Any], out: Path) -> list[Path]:
    """recall@100 by system and width (bars), and recall@K curves at full width; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("eval_no_plots", reason="matplotlib not installed: pip install -e '.[eval]'")
        return []
    cfg = results["config"]
    metric = "recall@100" if 100 in cfg["ks"] else f"recall@{cfg['ks'][-1]}"
    encoders = [s for s in results["systems"] if s["kind"] != "popularity"]
    pop = popularity_row(results)
    panels = [seg for seg in ("all", "cold_start") if results["dataset"]["segments"][seg]]
    written = []

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
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
        if pop is not None:
            ax.axhline(pop["segments"][seg][metric], color="black", linestyle="--", label=POPULARITY)
        ax.set_xticks(np.arange(len(encoders)), [s["name"] for s in encoders], rotation=10, fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{SEGMENT_TITLES[seg].split(' (')[0]} ({results['dataset']['segments'][seg]} queries)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / PLOT_WIDTHS, dpi=110)
    plt.close(fig)
    written.append(out / PLOT_WIDTHS)

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, seg in zip(axes[0], panels):
        for s in results["systems"]:
            w = s["widths"][0]  # full width (popularity has one)
            if w["curve"].get(seg) is None:
                continue
            style = {"color": "black", "linestyle": "--"} if s["kind"] == "popularity" else {}
            ax.plot(w["curve"]["k"], w["curve"][seg], label=s["name"], **style)
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        ax.set_ylim(0, 1)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{SEGMENT_TITLES[seg].split(' (')[0]} ({results['dataset']['segments'][seg]} queries)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / PLOT_CURVES, dpi=110)
    plt.close(fig)
    written.append(out / PLOT_CURVES)
    return written


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
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
    from feedret.evaluation.minilm import MINILM_MAX_LENGTH

    return MINILM_MAX_LENGTH

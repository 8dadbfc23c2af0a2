"""The root's merge of per-shard top-k lists: this version against the previous one, same run.

Each request, the root merges every shard's answer (k=2,000 each at the feed's
depth) into one top-k, ties broken by post id. Real answers are float32 inner
products packed in a narrow range, so two shards' 2,000 scores nearly always
share a value somewhere; the previous merge (`lexsort_merge` below, as of
5c3d676) then fell back to a full two-key lexsort. The current one
(`feedret.merge.merge_topk`) sorts by score once and orders each run of tied
scores by id. Both are checked to give the same answer on every input first.

Inputs: per shard, k scores drawn as 0.6 + 0.05·N(0,1) in float32 (the spread of
the 1M-post benchmark's top-2,000 scores), sorted descending, disjoint post ids
(posts live on one shard each), as the root receives them.

    python benchmarks/merge_topk.py --out benchmarks/results/merge_topk.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from feedret.merge import Merged, ShardHits, merge_topk  # noqa: E402


def lexsort_merge(results, k: int) -> Merged:
    """The merge as it was before (commit 5c3d676): the baseline."""
    ids = np.concatenate([r.post_ids.astype(np.int64, copy=False) for r in results])
    scores = np.concatenate([r.scores.astype(np.float32, copy=False) for r in results])
    shards = np.concatenate([np.full(len(r.post_ids), r.shard, np.int32) for r in results])
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    if len(ranked) > 1 and np.any(ranked[1:] == ranked[:-1]):
        order = np.lexsort((ids, -scores))
    ids, scores, shards = ids[order], scores[order], shards[order]
    if len(results) > 1:
        by_id = np.sort(ids)
        if np.any(by_id[1:] == by_id[:-1]):
            _, first = np.unique(ids, return_index=True)
            keep = np.sort(first)
            ids, scores, shards = ids[keep], scores[keep], shards[keep]
    return Merged(ids[:k], scores[:k], shards[:k])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, action="append", help="candidates per shard and in the answer (repeatable)")
    p.add_argument("--shards", type=int, action="append", help="shards merged (repeatable)")
    p.add_argument("--requests", type=int, default=2000, help="merges timed per system and case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the markdown report here")
    args = p.parse_args(argv)
    args.k = args.k or [100, 2000]
    args.shards = args.shards or [2, 8]
    return args


def requests(n: int, shards: int, k: int, rng: np.random.Generator) -> list[list[ShardHits]]:
    out = []
    for _ in range(n):
        ids = rng.choice(1 << 40, shards * k, replace=False).reshape(shards, k)
        hits = []
        for s in range(shards):
            scores = np.sort((0.6 + 0.05 * rng.standard_normal(k)).astype(np.float32))[::-1].copy()
            hits.append(ShardHits(shard=s, post_ids=ids[s], scores=scores))
        out.append(hits)
    return out


def time_per_call(fn, reqs, k: int) -> list[float]:
    out = []
    for hits in reqs:
        t = time.perf_counter()
        fn(hits, k)
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    systems = {"merge_topk (now)": merge_topk, "lexsort merge (before)": lexsort_merge}
    rows = []
    for shards in args.shards:
        for k in args.k:
            reqs = requests(args.requests, shards, k, rng)
            tied = 0
            for hits in reqs:
                a, b = merge_topk(hits, k), lexsort_merge(hits, k)
                assert np.array_equal(a.post_ids, b.post_ids) and np.array_equal(a.shards, b.shards), "merges disagree"
                scores = np.concatenate([h.scores for h in hits])
                tied += len(np.unique(scores)) < len(scores)
            timed = {name: [] for name in systems}
            for start in range(0, len(reqs), 50):  # alternate in blocks, so drift hits both
                for name, fn in systems.items():
                    timed[name] += time_per_call(fn, reqs[start : start + 50], k)
            now, before = (np.median(timed[n]) * 1e6 for n in systems)
            p99_now, p99_before = (np.percentile(timed[n], 99) * 1e6 for n in systems)
            rows.append((shards, k, tied / len(reqs), now, p99_now, before, p99_before))
            print(f"shards {shards} k {k}: now {now:.0f} µs, before {before:.0f} µs", file=sys.stderr)
    lines = [
        "# The root's merge of shard answers: now vs before (same run)",
        "",
        "```",
        "python benchmarks/merge_topk.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "```",
        "",
        "## Machine",
        "",
        *benchlib.machine_lines(),
        f"- load average (`uptime`: 1, 5, 15 min) at the end: {benchlib.uptime_load()}",
        "",
        "## Results",
        "",
        f"{args.requests} merges per system and case, alternating in blocks of 50; both give the same ids in the same order on every input.",
        "",
        "| shards | k | requests with a tied score | now p50 / p99 µs | before p50 / p99 µs | before / now (p50) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for shards, k, tied, now, p99_now, before, p99_before in rows:
        lines.append(f"| {shards} | {k:,} | {tied:.0%} | {now:.0f} / {p99_now:.0f} | {before:.0f} / {p99_before:.0f} | **{before / now:.2f}×** |")
    benchlib.emit("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()

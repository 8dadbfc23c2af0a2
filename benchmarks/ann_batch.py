"""A shard index's SearchBatch against the same queries one by one, in process, per index kind (#18).

Each of 64 queries excludes 100 posts of its own (a feed's seen list). `ShardIndex.search_batch`
answers the unfiltered and seen-list queries of a batch with one faiss search of the live posts
(Flat: one BLAS product; IVF and HNSW: one multi-query faiss call, merged with the posts a
rebuild has not added yet), then drops each query's exclusions; one by one, each is a
`ShardIndex.search` with its filter as a selector. Rounds alternate, so machine load hits both.

    python benchmarks/ann_batch.py --out benchmarks/results/ann_batch.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from feedret.indexer.shard_index import IndexOptions, SearchFilter, ShardIndex  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", action="append", help="factory:posts, repeatable (default Flat:200000, "
                   "IVF1024,Flat:200000, HNSW32:100000)")
    p.add_argument("--k", type=int, action="append", help="repeatable (default 100 and 1112, a shard's share of 2,000)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--cache-dir", type=Path, default=benchlib.CACHE)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    kinds = [(s.rsplit(":", 1)[0], int(s.rsplit(":", 1)[1])) for s in
             (args.index or ["Flat:200000", "IVF1024,Flat:200000", "HNSW32:100000"])]
    spec = benchlib.DataSpec(n=max(n for _, n in kinds), dim=256, queries=args.batch * args.rounds)
    vecs, queries = benchlib.dataset(spec, args.cache_dir)
    rows = []
    for factory, n in kinds:
        ix = ShardIndex(spec.dim, options=IndexOptions(index_factory=factory, background=False))
        for s in range(0, n, 20_000):
            m = min(20_000, n - s)
            ix.upsert(np.arange(s, s + m), np.array(vecs[s:s + m]), np.zeros(m), ["en"] * m, 0.0, model_versions=["m1"] * m)
        filts = [SearchFilter(exclude_post_ids=tuple(range(i * 100, i * 100 + 100))) for i in range(args.batch)]
        for k in args.k or [100, 1112]:
            alone, batched = [], []
            for r in range(args.rounds):
                q = queries[r * args.batch:(r + 1) * args.batch]
                t = time.perf_counter()
                for x, f in zip(q, filts):
                    ix.search(x, k, f)
                alone.append(time.perf_counter() - t)
                t = time.perf_counter()
                ix.search_batch(q, [k] * args.batch, filts)
                batched.append(time.perf_counter() - t)
            a, b = statistics.median(alone), statistics.median(batched)
            rows.append((factory, n, k, a, b))
            print(f"{factory} {n:,} k={k}: {a * 1000:.0f} ms alone, {b * 1000:.0f} ms batched, {a / b:.2f}x", file=sys.stderr)
    lines = benchlib.report_head("A shard's batched search against one by one, in process (#18)",
                                 "Time for a batch of queries, median of the rounds; ratio = one by one / batched.",
                                 benchlib.command_line(__file__, argv))
    lines += benchlib.machine_lines()
    lines += [f"- {spec.describe()}; batches of {args.batch}, each query excluding 100 posts of its own; "
              f"{args.rounds} rounds, alternating; one faiss thread (FEEDRET_SEARCH_THREADS 1)", "",
              "| index | posts | k | one by one, ms | batched, ms | ratio |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {f} | {n:,} | {k:,} | {a * 1000:.0f} | {b * 1000:.0f} | **{a / b:.2f}x** |" for f, n, k, a, b in rows]
    benchlib.write_outputs("\n".join(lines) + "\n", args.out, None, {})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How long searches wait on an HNSW shard while it ingests.

An HNSW add links each post into the graph and must run alone (under the index's
write lock). Linking a whole micro-batch at once held every search back for the
whole batch; the shard now links `_ANN_ADD_STEP` posts per lock hold and lets the
searches that queued meanwhile in between (until linked, new posts are found by
an exact search over them). This script restores one HNSW shard twice from the
same snapshot and, in each, searches back to back on one thread while another
upserts batches of new posts: the baseline links each batch in one hold (the
step set above the batch size), feedret in steps. Same run, same data.

    python benchmarks/hnsw_ingest_stall.py --n 262144 --dim 256 --batch 256 --batches 20
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import growth_stall  # noqa: E402

from feedret.indexer import shard_index as si  # noqa: E402
from feedret.indexer.shard_index import ShardIndex  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--factory", default="HNSW32")
    p.add_argument("--batch", type=int, default=256, help="posts per upsert (the consumer's micro-batch)")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def measure(args, state, step: int) -> dict:
    meta, sections, queries = state
    ix = ShardIndex.from_state(meta, sections, growth_stall.options(args))
    # The first-insert growth, not timed.
    ix.upsert([10**9], queries[:1], created_at=[2.0], langs=["en"], indexed_at=2.0, model_versions=["bench"])
    rng = np.random.default_rng(5)
    saved = si._ANN_ADD_STEP
    si._ANN_ADD_STEP = step
    try:
        with benchlib.searching_back_to_back(ix, queries, args.k) as timed:
            time.sleep(0.3)
            base = 2 * 10**9
            upserts = []
            for b in range(args.batches):
                v = rng.normal(size=(args.batch, args.dim)).astype(np.float32)
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                t = time.perf_counter()
                ix.upsert(list(range(base + b * args.batch, base + (b + 1) * args.batch)), v,
                          created_at=[3.0] * args.batch, langs=["en"] * args.batch, indexed_at=3.0,
                          model_versions=["bench"] * args.batch)
                upserts.append(time.perf_counter() - t)
                time.sleep(0.05)  # micro-batches arrive apart, as from the consumer
    finally:
        si._ANN_ADD_STEP = saved
    latencies = [seconds for _, seconds in timed]
    assert ix._buffered() is None, "every post ends up linked"
    return {"search_p50_ms": benchlib.pct(latencies, 50) * 1e3, "search_p99_ms": benchlib.pct(latencies, 99) * 1e3,
            "search_max_ms": max(latencies) * 1e3, "searches": len(latencies),
            "upsert_mean_ms": statistics.fmean(upserts) * 1e3}


def main(argv=None) -> None:
    args = parse_args(argv)
    args.backend = "faiss"  # growth_stall.options / snapshot read it
    command = "python benchmarks/hnsw_ingest_stall.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    t = time.perf_counter()
    state = growth_stall.snapshot(args)
    print(f"snapshot of {args.n:,} posts built in {time.perf_counter() - t:.1f} s", flush=True)
    results = {
        "baseline (a batch linked in one hold)": measure(args, state, step=10**9),
        f"feedret ({si._ANN_ADD_STEP} posts per hold)": measure(args, state, step=si._ANN_ADD_STEP),
    }
    base, ours = results.values()
    lines = [
        "# Searches on an HNSW shard while it ingests",
        "",
        "```",
        command,
        "```",
        "",
        *benchlib.machine_lines(),
        f"- {args.n:,} posts × {args.dim} dims, {args.factory}, restored from one snapshot per system; one thread "
        f"searches back to back (k={args.k}) while {args.batches} upserts of {args.batch} new posts run, 50 ms apart",
        "",
        "| | search p50 ms | search p99 ms | longest search ms | searches | upsert mean ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['search_p50_ms']:.2f} | {r['search_p99_ms']:.1f} | {r['search_max_ms']:.1f} | "
                     f"{r['searches']} | {r['upsert_mean_ms']:.1f} |")
    lines += ["", f"p99 search latency, baseline over feedret: **{base['search_p99_ms'] / ours['search_p99_ms']:.1f}×**; "
              f"longest search: **{base['search_max_ms'] / ours['search_max_ms']:.1f}×**.", ""]
    benchlib.emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()

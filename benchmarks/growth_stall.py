"""How long searches wait while a shard grows, on the first new post after a restart.

A restored shard's arrays are sized exactly: the vector store (which doubles when
full, at any time, not only after a restart) and, for HNSW, faiss's own graph and
vector arrays; its id map starts up to 3/4 full and doubles (a rehash of every
entry) once it passes that. The first new post makes them grow, which copies every row. This
script builds a `ShardIndex` of N posts once, snapshots it (`export_state`), and
for each system restores it (`from_state`, as a restarting shard does), runs
searches back to back on one thread and inserts one post on another. It reports
the searches' latency during that insert and how long the insert took:

- feedret: the store and the id map grow beside the searches (`ShardIndex._make_room`:
  the copies under a long read lock, a pointer swap under the write lock), and a restored
  faiss index gets headroom at load (`faiss_ann.reserve_headroom`);
- baseline: both switched off, as before they existed: the growth happens under
  the write lock and every search waits for the copy.

    python benchmarks/growth_stall.py --n 524288 --dim 256 --out benchmarks/results/growth_stall.md
    python benchmarks/growth_stall.py --n 200000 --dim 256 --factory HNSW32
    python benchmarks/growth_stall.py --n 6291456 --dim 16   # the id map at 3/4 of 8M buckets doubles too
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

from feedret.indexer import faiss_ann  # noqa: E402
from feedret.indexer.shard_index import IndexOptions, ShardIndex  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=65536, help="posts in the snapshot")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--factory", default="Flat", help="faiss index factory (FEEDRET_INDEX_FACTORY)")
    p.add_argument("--backend", choices=["faiss", "torch"], default="faiss")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def options(args) -> IndexOptions:
    if args.backend == "torch":
        return IndexOptions(backend="torch", device="cpu")
    return IndexOptions(index_factory=args.factory)


def snapshot(args) -> tuple[dict, dict, np.ndarray]:
    """A shard of N posts, as the snapshot a restart loads, and some queries."""
    ix = ShardIndex(args.dim, options=options(args))
    rng = np.random.default_rng(0)
    queries = None
    for start in range(0, args.n, 65536):
        m = min(65536, args.n - start)
        v = rng.normal(size=(m, args.dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        ix.upsert(list(range(start, start + m)), v, created_at=[1.0] * m, langs=["en"] * m, indexed_at=1.0,
                  model_versions=["bench"] * m)
        if queries is None:
            queries = v[:64].copy()
    meta, sections = ix.export_state()
    return meta, sections, queries


def measure(args, state, feedret: bool) -> dict:
    meta, sections, queries = state
    if feedret:
        ix = ShardIndex.from_state(meta, sections, options(args))
    else:
        real = faiss_ann.reserve_headroom
        faiss_ann.reserve_headroom = lambda index, fraction=0.5: None
        try:
            ix = ShardIndex.from_state(meta, sections, options(args))
        finally:
            faiss_ann.reserve_headroom = real
        ix._make_room = lambda n: None  # grow under the write lock
    assert ix._store.capacity == args.n, "a restored store is sized exactly"
    with benchlib.searching_back_to_back(ix, queries, args.k) as latencies:  # (start, seconds)
        time.sleep(0.5)  # steady state first
        before, buckets = ix._store.capacity, ix._slot_of.buckets
        new = np.random.default_rng(1).normal(size=(1, args.dim)).astype(np.float32)
        t0 = time.perf_counter()
        ix.upsert([10**9], new, created_at=[2.0], langs=["en"], indexed_at=2.0, model_versions=["bench"])
        t1 = time.perf_counter()
        time.sleep(0.5)
    assert ix._store.capacity > before and 10**9 in ix
    steady = [s for t, s in latencies if t < t0]
    during = [s for t, s in latencies if t <= t1 and t + s >= t0]  # overlapping the insert
    return {
        "insert_s": t1 - t0,
        "steady_p50_ms": statistics.median(steady) * 1e3,
        "during_max_ms": max(during) * 1e3 if during else 0.0,
        "during_n": len(during),
        "rows": (before, ix._store.capacity),
        "id_map_buckets": (buckets, ix._slot_of.buckets),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/growth_stall.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    results = {}
    started = time.perf_counter()
    state = snapshot(args)
    print(f"snapshot of {args.n:,} posts built in {time.perf_counter() - started:.1f} s", flush=True)
    for name, feedret in (("baseline (growth under the write lock)", False), ("feedret (growth beside searches)", True)):
        results[name] = measure(args, state, feedret)
        r = results[name]
        print(f"{name}: insert {r['insert_s']:.3f} s, steady search p50 {r['steady_p50_ms']:.2f} ms, "
              f"longest search during growth {r['during_max_ms']:.1f} ms ({r['during_n']} searches)", flush=True)
    base, ours = results.values()
    ratio = base["during_max_ms"] / max(ours["during_max_ms"], 1e-9)
    lines = [
        "# Searches while the vector store (and the id map) grow",
        "",
        "```",
        command,
        "```",
        "",
        *benchlib.machine_lines(),
        f"- {args.n:,} posts × {args.dim} dims, "
        f"{'torch backend, exact search' if args.backend == 'torch' else args.factory + ' (faiss)'} at k={args.k}, "
        "restored from a snapshot; one search thread back to back; one insert makes the store grow "
        f"({base['rows'][0]:,} → {base['rows'][1]:,} rows)"
        + (f" and the id map double ({base['id_map_buckets'][0]:,} → {base['id_map_buckets'][1]:,} buckets)"
           if base["id_map_buckets"][1] != base["id_map_buckets"][0] else ""),
        "",
        "| | insert that grows the store, s | search p50 before, ms | longest search during the growth, ms | "
        "searches answered during it |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['insert_s']:.3f} | {r['steady_p50_ms']:.2f} | {r['during_max_ms']:.1f} | "
                     f"{r['during_n']} |")
    lines += ["", f"Longest search during the growth, baseline over feedret: **{ratio:.1f}×**.", ""]
    benchlib.emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()

"""How long searches wait while a shard's vector store grows.

A shard's store doubles when it runs out of rows (and, after a restart, on the
first new post, since a restored store is sized exactly). Growing copies every
row. This script fills a `ShardIndex` to exactly its capacity, runs searches
back to back on one thread, and inserts one post on another, which makes the
store grow. It reports the searches' latency during the growth and how long
the insert took, twice in the same run:

- feedret: the store grows beside the searches (`ShardIndex._make_room`: the copy
  under a long read lock, a pointer swap under the write lock);
- baseline: `_make_room` switched off, so the growth happens under the write
  lock, as before it existed; every search waits for the copy.

    python benchmarks/growth_stall.py --n 524288 --dim 256 --out benchmarks/results/growth_stall.md
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from feedret.indexer.shard_index import IndexOptions, ShardIndex  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=65536, help="posts before the growth (the store's exact capacity)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--backend", choices=["faiss", "torch"], default="faiss")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def filled(args) -> tuple[ShardIndex, np.ndarray]:
    opts = IndexOptions(backend="torch", device="cpu") if args.backend == "torch" else IndexOptions()
    ix = ShardIndex(args.dim, options=opts)
    rng = np.random.default_rng(0)
    queries = None
    for start in range(0, args.n, 65536):
        m = min(65536, args.n - start)
        v = rng.normal(size=(m, args.dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        ix.upsert(list(range(start, start + m)), v, created_at=[1.0] * m, langs=["en"] * m, indexed_at=1.0)
        if queries is None:
            queries = v[:64].copy()
    # The store is exactly full, as right after a snapshot restore: the next post grows it.
    ix._store = ix._store.grown(args.n) if ix._store.capacity != args.n else ix._store
    if ix._store.capacity != args.n:
        raise SystemExit(f"could not size the store to {args.n} rows (it has {ix._store.capacity})")
    return ix, queries


def measure(args, off_lock: bool) -> dict:
    ix, queries = filled(args)
    if not off_lock:
        ix._make_room = lambda n: None  # the baseline: grow under the write lock
    latencies: list[tuple[float, float]] = []  # (start, seconds)
    stop = threading.Event()

    def searcher():
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            ix.search(queries[i % len(queries)], args.k)
            latencies.append((t, time.perf_counter() - t))
            i += 1

    thread = threading.Thread(target=searcher)
    thread.start()
    time.sleep(0.5)  # steady state first
    before = ix._store.capacity
    new = np.random.default_rng(1).normal(size=(1, args.dim)).astype(np.float32)
    t0 = time.perf_counter()
    ix.upsert([10**9], new, created_at=[2.0], langs=["en"], indexed_at=2.0)
    t1 = time.perf_counter()
    time.sleep(0.5)
    stop.set()
    thread.join()
    assert ix._store.capacity > before and 10**9 in ix
    steady = [s for t, s in latencies if t < t0]
    during = [s for t, s in latencies if t <= t1 and t + s >= t0]  # overlapping the insert
    return {
        "insert_s": t1 - t0,
        "steady_p50_ms": statistics.median(steady) * 1e3,
        "during_max_ms": max(during) * 1e3 if during else 0.0,
        "during_n": len(during),
        "rows": (before, ix._store.capacity),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/growth_stall.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    results = {}
    for name, off in (("baseline (growth under the write lock)", False), ("feedret (growth beside searches)", True)):
        results[name] = measure(args, off)
        r = results[name]
        print(f"{name}: insert {r['insert_s']:.3f} s, steady search p50 {r['steady_p50_ms']:.2f} ms, "
              f"longest search during growth {r['during_max_ms']:.1f} ms ({r['during_n']} searches)", flush=True)
    base, ours = results.values()
    ratio = base["during_max_ms"] / max(ours["during_max_ms"], 1e-9)
    lines = [
        "# Searches while the vector store grows",
        "",
        "```",
        command,
        "```",
        "",
        *benchlib.machine_lines(),
        f"- {args.n:,} posts × {args.dim} dims, {args.backend} backend, exact search at k={args.k}, one "
        "search thread back to back; one insert makes the store grow "
        f"({base['rows'][0]:,} → {base['rows'][1]:,} rows)",
        "",
        "| | insert that grows the store, s | search p50 before, ms | longest search during the growth, ms | "
        "searches answered during it |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['insert_s']:.3f} | {r['steady_p50_ms']:.2f} | {r['during_max_ms']:.1f} | "
                     f"{r['during_n']} |")
    lines += ["", f"Longest search during the growth, baseline over feedret: **{ratio:.1f}×**.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

"""What RetrieveBatch buys: many queries in one call, each shard asked once per batch.

One stack (broker, 2 shard processes on the same snapshots, root), the same queries
three ways, in turn, in the same run:

- single: one Retrieve at a time (one client);
- concurrent: Retrieve from --concurrency client threads at once;
- batch: RetrieveBatch of --batch queries per call (one client); the root fetches
  nothing (vector queries) and sends each shard one SearchBatch per call.

For each: queries per second, p50 of a call, and CPU seconds per query of the root
and of the shards (their processes' user+system time over the phase).

    python benchmarks/retrieve_batch.py --n 200000 --out benchmarks/results/retrieve_batch.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import DataSpec, pct  # noqa: E402

from feedret.clients.client import FeedretClient, Query  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--index", default="Flat")
    p.add_argument("--k", type=int, action="append", help="repeatable; default 100 and 2000")
    p.add_argument("--queries", type=int, default=512, help="per mode and k")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="each mode runs this many times, interleaved")
    p.add_argument("--note", default="")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def cpu_seconds(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def run_mode(mode: str, client: FeedretClient, queries: np.ndarray, k: int, args) -> list[float]:
    """Seconds per call, for every call of the mode over all the queries."""
    calls: list[float] = []

    def one(q: np.ndarray) -> None:
        started = time.perf_counter()
        result = client.retrieve(vector=q, k=k, timeout=30)
        calls.append(time.perf_counter() - started)
        assert not result.partial and len(result.ids) == k

    if mode == "single":
        for q in queries:
            one(q)
    elif mode == "concurrent":
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, queries))
    else:
        for start in range(0, len(queries), args.batch):
            chunk = queries[start:start + args.batch]
            started = time.perf_counter()
            results = client.retrieve_batch([Query(vector=q, k=k) for q in chunk], timeout=60)
            calls.append(time.perf_counter() - started)
            assert all(not r.partial and len(r.ids) == k for r in results), results[:1]
    return calls


def main(argv=None) -> int:
    args = parse_args(argv)
    ks = args.k or [100, 2000]
    spec = DataSpec(n=args.n, dim=args.dim, queries=args.queries)
    vectors, queries = benchlib.dataset(spec)
    snapshots, counts, _ = benchlib.shard_snapshots(spec, vectors, args.index, 2, 64, 128)
    modes = ["single", "concurrent", "batch"]
    totals = {(m, k): {"calls": [], "seconds": 0.0, "root_cpu": 0.0, "shard_cpu": 0.0, "queries": 0} for m in modes for k in ks}
    with tempfile.TemporaryDirectory(prefix="feedret-batch-") as tmp:
        run_dir = benchlib.link_snapshots(snapshots, Path(tmp) / "snapshots")
        env = benchlib.shard_env(args.index, run_dir, 64, 128)
        with benchlib.search_stack(Path(tmp), 2, env) as stack, FeedretClient(stack.config.root_address) as client:
            root = [psutil.Process(stack.procs["root"].pid)]
            shards = [psutil.Process(stack.procs[n].pid) for n in stack.config.shard_names()]
            for k in ks:  # warm: channels, the root's knowledge of the fleet, faiss
                run_mode("batch", client, queries[: args.batch], k, args)
                run_mode("single", client, queries[:16], k, args)
            for r in range(args.rounds):
                for k in ks:
                    for mode in modes[r % 3:] + modes[: r % 3]:  # the order rotates per round
                        cpu_root, cpu_shards, started = cpu_seconds(root), cpu_seconds(shards), time.perf_counter()
                        calls = run_mode(mode, client, queries, k, args)
                        t = totals[(mode, k)]
                        t["seconds"] += time.perf_counter() - started
                        t["root_cpu"] += cpu_seconds(root) - cpu_root
                        t["shard_cpu"] += cpu_seconds(shards) - cpu_shards
                        t["calls"] += calls
                        t["queries"] += len(queries)
                        print(f"round {r} k={k} {mode}: {len(queries) / (time.perf_counter() - started):.0f} q/s", flush=True)
    rows = []
    for k in ks:
        base = totals[("single", k)]
        for mode in modes:
            t = totals[(mode, k)]
            rows.append({
                "k": k, "mode": mode, "qps": t["queries"] / t["seconds"],
                "call_p50_ms": pct([c * 1000 for c in t["calls"]], 50),
                "root_cpu_ms_per_query": 1000 * t["root_cpu"] / t["queries"],
                "shard_cpu_ms_per_query": 1000 * t["shard_cpu"] / t["queries"],
                "qps_vs_single": (t["queries"] / t["seconds"]) / (base["queries"] / base["seconds"]),
            })
    batch_rows = {r["k"]: r for r in rows if r["mode"] == "batch"}
    conc_rows = {r["k"]: r for r in rows if r["mode"] == "concurrent"}
    summary = "; ".join(
        f"k={k}: RetrieveBatch of {args.batch} {batch_rows[k]['qps_vs_single']:.2f}x the queries/s of one Retrieve at a "
        f"time, {batch_rows[k]['qps'] / conc_rows[k]['qps']:.2f}x {args.concurrency} concurrent Retrieves"
        for k in ks)
    lines = benchlib.report_head("RetrieveBatch against Retrieve", summary + ".", benchlib.command_line(__file__, argv))
    lines += benchlib.machine_lines() + [
        f"- load average at the end: {benchlib.uptime_load()}",
        *([f"- {args.note}"] if args.note else []),
        f"- {args.n:,} clustered {args.dim}-d vectors over 2 shards ({counts[0]:,} / {counts[1]:,}), {args.index}; "
        f"{args.queries} queries per mode and k, {args.rounds} rounds, the modes' order rotating per round",
        "",
        "| k | mode | queries/s | × single | p50 of a call (ms) | root CPU ms / query | shards' CPU ms / query |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = {"single": "Retrieve, one at a time", "concurrent": f"Retrieve, {args.concurrency} at once",
                 "batch": f"RetrieveBatch of {args.batch}"}[r["mode"]]
        lines.append(f"| {r['k']} | {label} | {r['qps']:.0f} | {r['qps_vs_single']:.2f} | {r['call_p50_ms']:.1f} | "
                     f"{r['root_cpu_ms_per_query']:.2f} | {r['shard_cpu_ms_per_query']:.2f} |")
    lines += ["", "A batch's call p50 is the whole batch's. CPU is each process's user + system time over the "
              "phase divided by its queries (the shards' summed)."]
    benchlib.write_outputs("\n".join(lines) + "\n", args.out, args.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

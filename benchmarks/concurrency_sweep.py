"""Queries per second and latency against concurrency: feedret, the bare-gRPC floor, raw faiss.

Issue #18 asks what the serving path does under load, not one query at a time: with
1, 4, 16 and 64 clients each sending its next query as soon as the last is answered
(a closed loop), at k = 100 and k = 2,000, for each index type, in one run:

- **feedret**: the real stack (broker, 2 shard servers on the same snapshots, root),
  through `AsyncFeedretClient.retrieve`; the root coalesces concurrent Retrieves into
  one SearchBatch per shard (`coalesce_max_batch`), the shards answer a batch with one
  index call where the index can;
- **floor (asyncio root) / floor (thread-pool root)**: `grpc_floor.py`'s bare servers in
  the same topology (generic handlers on raw bytes, no protobuf, validation, logging,
  filters or batching): what any Python gRPC fan-out costs here without batching;
- **raw faiss**: one index of all posts in this process, the concurrent queries searched
  as one batch (`index.search` of c rows, faiss's own threads): what batching can reach
  with no serving path at all.

Every server (feedret's and the bare ones) gets `--workers` threads, enough for the
highest concurrency, so no system queues behind a thread limit the others lack. The
clients are asyncio tasks in this process (one event loop, no thread per client), the
same for every system. Each (k, concurrency) cell runs every system in turn, the order
rotating per round; CPU is each process's user + system time over the system's turns,
divided by its queries.

    python benchmarks/concurrency_sweep.py --n 1000000 --index Flat --index IVF4096,Flat \\
        --out benchmarks/results/concurrency_sweep_1m.md --json benchmarks/results/concurrency_sweep_1m.json

The defaults are a smoke run (20,000 vectors, IVF64,Flat) of about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import grpc_floor  # noqa: E402
from benchlib import DataSpec, pct  # noqa: E402

SYSTEMS = ("feedret", "floor_asyncio", "floor_threads", "raw")
LABELS = {
    "feedret": "feedret (root coalesces, shards batch)",
    "floor_asyncio": "floor: bare gRPC, asyncio root",
    "floor_threads": "floor: bare gRPC, thread-pool root",
    "raw": "raw faiss in-process, c queries as one batch",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="posts in the index (all shards together)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--index", action="append", help="faiss factory, repeatable (default IVF64,Flat)")
    p.add_argument("--k", type=int, action="append", help="repeatable (default 100 and 2000)")
    p.add_argument("--concurrency", type=int, action="append", help="clients, repeatable (default 1, 4, 16, 64)")
    p.add_argument("--queries", type=int, default=512, help="distinct queries (cycled)")
    p.add_argument("--per-cell", type=int, default=128, help="queries per system per round of a cell "
                   "(at least 4 per client)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--ef-search", type=int, default=64)
    p.add_argument("--workers", type=int, default=64, help="gRPC threads of every server, feedret's and the bare ones")
    p.add_argument("--cache-dir", type=Path, default=benchlib.CACHE)
    p.add_argument("--note", default="", help="a line for the report's machine section")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="QPS against clients, one panel per index and k (PNG)")
    p.add_argument("--render", type=Path, help="re-render the report from a JSON this script wrote; measure nothing")
    return p.parse_args(argv)


log = benchlib.log


async def closed_loop(call, queries: np.ndarray, k: int, clients: int, total: int, start: int) -> dict:
    """`clients` tasks, each sending its next query when the last is answered, `total` queries
    between them (query i is queries[(start + i) % len]). Latencies, ids per query, wall seconds."""
    latencies: list[float] = []
    found: dict[int, np.ndarray] = {}
    next_i = 0

    async def client() -> None:
        nonlocal next_i
        while next_i < total:
            i = next_i
            next_i += 1
            qi = (start + i) % len(queries)
            t0 = time.perf_counter()
            ids = await call(queries[qi], k)
            latencies.append(time.perf_counter() - t0)
            found[qi] = ids
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"latency": latencies, "found": found, "seconds": time.perf_counter() - t0}


async def raw_batches(index, params, queries: np.ndarray, k: int, clients: int, total: int, start: int) -> dict:
    """`total` queries searched `clients` at a time as one faiss batch; each query's latency is its batch's."""
    latencies: list[float] = []
    found: dict[int, np.ndarray] = {}
    t0 = time.perf_counter()
    for b in range(0, total, clients):
        rows = [(start + i) % len(queries) for i in range(b, min(total, b + clients))]
        s = time.perf_counter()
        _, ids = index.search(np.ascontiguousarray(queries[rows]), k, params=params)
        took = time.perf_counter() - s
        latencies += [took] * len(rows)
        for r, row in zip(rows, ids):
            found[r] = row
    return {"latency": latencies, "found": found, "seconds": time.perf_counter() - t0}


def cpu(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


async def timed_cell(runs: dict, pids: dict[str, dict[str, psutil.Process]], k: int, clients: int, total: int,
                     rounds: int, n_queries: int, truth: np.ndarray, in_process: set[str] = frozenset()) -> dict:
    """One (k, clients) cell: `rounds` rounds, every system in turn (the order rotating per round),
    each answering `total` queries with `runs[name](clients, total, start)` (a `closed_loop`-shaped
    result). CPU per query is each of the system's processes' (`pids[name]`, by role) over its
    turns; a system `in_process` (it runs inside this process) is charged this process's."""
    me = psutil.Process()
    names = list(runs)
    acc = {name: {"latency": [], "found": {}, "seconds": 0.0, "client_cpu": 0.0,
                  "cpu": dict.fromkeys(pids[name], 0.0)} for name in names}
    for r in range(rounds):
        start = (r * total) % n_queries
        for name in names[r % len(names):] + names[: r % len(names)]:
            before = {role: cpu([proc]) for role, proc in pids[name].items()}
            mine = cpu([me])
            res = await runs[name](clients, total, start)
            a = acc[name]
            for role, proc in pids[name].items():
                a["cpu"][role] += cpu([proc]) - before[role]
            a["client_cpu"] += cpu([me]) - mine
            a["latency"] += res["latency"]
            a["found"].update(res["found"])
            a["seconds"] += res["seconds"]
    n_q = rounds * total
    row = {"k": k, "clients": clients, "queries": n_q, "systems": {}}
    for name, a in acc.items():
        inside = name in in_process
        row["systems"][name] = {
            "qps": n_q / a["seconds"], "p50_ms": pct(a["latency"], 50) * 1e3, "p99_ms": pct(a["latency"], 99) * 1e3,
            "recall": float(np.mean([benchlib.recall_at(ids, truth[qi], k) for qi, ids in a["found"].items()])),
            "server_cpu_ms": (a["client_cpu"] if inside else sum(a["cpu"].values())) * 1e3 / n_q,
            "cpu_ms_by_process": {role: sec * 1e3 / n_q for role, sec in a["cpu"].items()},
            "client_cpu_ms": 0.0 if inside else a["client_cpu"] * 1e3 / n_q,
        }
    return row


def sweep_index(args, spec: DataSpec, factory: str, vectors, queries, truths: dict[int, np.ndarray]) -> dict:
    import faiss
    import grpc

    from feedret.clients.client import AsyncFeedretClient, FeedretClient
    from feedret.indexer import faiss_ann
    from feedret.indexer import snapshot as snapshots
    from feedret.server.launcher import free_port_block, wait_for_port

    snap_dir, counts, _ = benchlib.shard_snapshots(spec, vectors, factory, args.shards, args.nprobe,
                                                   args.ef_search, args.cache_dir, log=log)
    raw = benchlib.raw_index(spec, vectors, factory, args.cache_dir, log=log)
    base = free_port_block(2 + args.shards)
    shard_addrs = [f"127.0.0.1:{base + i}" for i in range(args.shards)]
    run_dir = args.cache_dir / "runs" / f"sweep-{os.getpid()}"
    benchlib.link_snapshots(snap_dir, run_dir / "snapshots")
    env = {**benchlib.shard_env(factory, run_dir / "snapshots", args.nprobe, args.ef_search),
           "FEEDRET_GRPC_WORKERS": str(args.workers), "FEEDRET_MAX_CONCURRENT_RPCS": str(4 * args.workers)}
    stack = benchlib.search_stack(run_dir, args.shards, env)

    def bare(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, grpc_floor.__file__, *extra, "--index", factory,
                                 "--nprobe", str(args.nprobe), "--ef-search", str(args.ef_search),
                                 "--shards", str(args.shards), "--workers", str(args.workers)])

    procs: list[subprocess.Popen] = []
    cells = []
    try:
        for i in range(args.shards):
            (path,) = snapshots.list_snapshots(snap_dir, i)[:1]
            procs.append(bare("--serve", "shard", "--port", str(base + i), "--snapshot", str(path), "--shard", str(i)))
        threads_port, asyncio_port = base + args.shards, base + args.shards + 1
        procs.append(bare("--serve", "root-threads", "--port", str(threads_port), "--targets", ",".join(shard_addrs)))
        procs.append(bare("--serve", "root-asyncio", "--port", str(asyncio_port), "--targets", ",".join(shard_addrs)))
        with stack:
            for port in [*(base + i for i in range(args.shards)), threads_port, asyncio_port]:
                wait_for_port("127.0.0.1", port, 600)
            with FeedretClient(stack.config.root_address) as sync_client:
                assert sync_client.stats(timeout=10).total_indexed == spec.n
            bare_shards = {f"shard-{i}": psutil.Process(p.pid) for i, p in enumerate(procs[: args.shards])}
            pids = {  # per system, its processes by role
                "feedret": {name: psutil.Process(p.pid) for name, p in stack.procs.items()},
                "floor_threads": {**bare_shards, "root": psutil.Process(procs[args.shards].pid)},
                "floor_asyncio": {**bare_shards, "root": psutil.Process(procs[args.shards + 1].pid)},
                "raw": {},
            }
            faiss.omp_set_num_threads(os.cpu_count() or 1)

            async def run_all() -> None:
                feedret = AsyncFeedretClient(stack.config.root_address)
                opts = grpc_floor.OPTIONS
                bare_calls = {
                    "floor_threads": grpc.aio.insecure_channel(f"127.0.0.1:{threads_port}", options=opts).unary_unary(grpc_floor.METHOD),
                    "floor_asyncio": grpc.aio.insecure_channel(f"127.0.0.1:{asyncio_port}", options=opts).unary_unary(grpc_floor.METHOD),
                }

                async def call_feedret(q, k):
                    return (await feedret.retrieve(vector=q, k=k, timeout=30)).ids

                def call_bare(name):
                    async def call(q, k):
                        return grpc_floor.decode_hits(await bare_calls[name](grpc_floor.encode_query(k, q), timeout=30))[0]
                    return call

                calls = {"feedret": call_feedret, **{name: call_bare(name) for name in bare_calls}}
                for k in args.k:
                    nprobe, ef = faiss_ann.search_breadth(faiss_ann.nlist_of(raw), spec.n, k, 1.0, args.nprobe, args.ef_search)
                    params, _keep = benchlib.faiss_params(raw, nprobe, ef)
                    for name, call in calls.items():  # warm-up: channels, caches, the shards' first batches
                        await closed_loop(call, queries, k, 4, 16, 0)
                    for clients in args.concurrency:
                        runs = {name: (lambda c, t, st, call=call: closed_loop(call, queries, k, c, t, st))
                                for name, call in calls.items()}
                        runs["raw"] = lambda c, t, st: raw_batches(raw, params, queries, k, c, t, st)
                        row = await timed_cell({name: runs[name] for name in SYSTEMS}, pids, k, clients,
                                               max(args.per_cell, 4 * clients), args.rounds, len(queries),
                                               truths[k], in_process={"raw"})
                        s = row["systems"]
                        log(f"[{factory}] k={k} c={clients}: " + ", ".join(
                            f"{n} {s[n]['qps']:.0f} q/s p50 {s[n]['p50_ms']:.1f} ms" for n in SYSTEMS))
                        cells.append(row)
                await feedret.close()

            asyncio.run(run_all())
    finally:
        benchlib.stop_processes(procs)
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"index": factory, "shard_posts": counts, "cells": cells}


def measure(args, spec: DataSpec) -> dict:
    vectors, queries = benchlib.dataset(spec, args.cache_dir)
    truths = {k: benchlib.ground_truth(spec, vectors, queries, k, args.cache_dir) for k in args.k}
    out = {"n": spec.n, "dim": spec.dim, "k": args.k, "concurrency": args.concurrency, "workers": args.workers,
           "load_before": benchlib.uptime_load(), "indexes": []}
    for factory in args.index:
        out["indexes"].append(sweep_index(args, spec, factory, vectors, queries, truths))
    out["load_after"] = benchlib.uptime_load()
    return out


def floor_of(systems: dict, key: str, best=min) -> tuple[str, float]:
    name = best(("floor_asyncio", "floor_threads"), key=lambda n: systems[n][key])
    return name, systems[name][key]


def verdicts(res: dict) -> list[str]:
    """The issue's two targets per index and k: at 1 client feedret p50 ≤ 1.15 × the best floor's;
    at the most clients, feedret's QPS ≥ 2 × the best unbatched floor's."""
    lines = []
    lo, hi = min(res["concurrency"]), max(res["concurrency"])
    for ix in res["indexes"]:
        for k in res["k"]:
            by_c = {c["clients"]: c["systems"] for c in ix["cells"] if c["k"] == k}
            _, floor_p50 = floor_of(by_c[lo], "p50_ms")
            _, floor_qps = floor_of(by_c[hi], "qps", best=max)
            p50_ratio = by_c[lo]["feedret"]["p50_ms"] / floor_p50
            qps_ratio = by_c[hi]["feedret"]["qps"] / floor_qps
            lines.append(f"| {ix['index']} | {k:,} | {p50_ratio:.2f} {'✓' if p50_ratio <= 1.15 else '✗'} | "
                         f"{qps_ratio:.2f} {'✓' if qps_ratio >= 2 else '✗'} | "
                         f"{by_c[hi]['feedret']['qps'] / by_c[hi]['raw']['qps']:.2f} |")
    return lines


def report(res: dict, command: str, machine: list[str]) -> str:
    lo, hi = min(res["concurrency"]), max(res["concurrency"])
    lines = [
        *benchlib.report_head(
            "Queries per second against concurrency: feedret, the bare-gRPC floor, raw faiss",
            f"{res['n']:,} × {res['dim']} over 2 shards; clients {', '.join(map(str, res['concurrency']))}; "
            f"k {', '.join(f'{k:,}' for k in res['k'])}; every server {res['workers']} gRPC threads.",
            command,
        ),
        *machine,
        f"- load average before → after: {res['load_before']} → {res['load_after']}",
        "",
        "## Targets (issue #18)",
        "",
        f"| index | k | feedret p50 / floor p50 at {lo} client (≤ 1.15) | feedret QPS / floor QPS at {hi} clients (≥ 2) "
        f"| feedret QPS / raw faiss batched at {hi} |",
        "|---|---:|---:|---:|---:|",
        *verdicts(res),
        "",
        "The floor is the better of the two bare roots in each cell (lowest p50, highest QPS).",
    ]
    for ix in res["indexes"]:
        lines += ["", f"## {ix['index']} (shards hold {', '.join(f'{c:,}' for c in ix['shard_posts'])} posts)", ""]
        for k in res["k"]:
            lines += [f"### k = {k:,}", "",
                      "| system | clients | queries/s | p50 ms | p99 ms | recall@k | server CPU ms / query | client CPU ms / query |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for name in SYSTEMS:
                for cell in (c for c in ix["cells"] if c["k"] == k):
                    s = cell["systems"][name]
                    lines.append(f"| {LABELS[name]} | {cell['clients']} | {s['qps']:.0f} | {s['p50_ms']:.1f} | "
                                 f"{s['p99_ms']:.1f} | {s['recall']:.3f} | {s['server_cpu_ms']:.2f} | "
                                 f"{s['client_cpu_ms']:.2f} |")
            lines.append("")
    lines += [
        "Server CPU: every process of the system (feedret: broker, shards and root; a floor: the two bare "
        "shards and its root) over its turns, per query; for raw faiss, this process's. Client CPU: this "
        "process (the asyncio clients) over the system's turns. A raw faiss query's latency is its batch's.",
    ]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(ix, k) for ix in res["indexes"] for k in res["k"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (ix, k) in zip(axes[0], panels):
        cells = [c for c in ix["cells"] if c["k"] == k]
        for name in SYSTEMS:
            ax.plot([c["clients"] for c in cells], [c["systems"][name]["qps"] for c in cells], marker="o",
                    label=LABELS[name])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{ix['index']}, k = {k:,}")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("queries / s")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.render:
        import json

        payload = json.loads(args.render.read_text())
        res = payload["result"]
        text = report(res, payload["command"], payload["machine"])
        benchlib.write_outputs(text, args.out, None, payload)
        if args.plot:
            plot(res, args.plot)
        return res
    args.index = args.index or ["IVF64,Flat"]
    args.k = args.k or [100, 2000]
    args.concurrency = sorted(args.concurrency or [1, 4, 16, 64])
    command = benchlib.command_line(__file__, argv)
    machine = benchlib.machine_lines() + ([f"- {args.note}"] if args.note else [])
    spec = DataSpec(n=args.n, dim=args.dim, queries=args.queries)
    log(f"data: {spec.describe()}")
    res = measure(args, spec)
    benchlib.write_outputs(report(res, command, machine), args.out, args.json,
                           {"command": command, "machine": machine, "result": res})
    if args.plot:
        plot(res, args.plot)
    return res


if __name__ == "__main__":
    main()

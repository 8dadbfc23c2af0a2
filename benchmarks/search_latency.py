"""Search latency, throughput and recall through the real root and shard servers, against raw faiss in-process.

For each index factory (Flat, IVF…, HNSW…) it

1. makes (or reuses, from var/bench/) N synthetic post vectors, the queries and their
   exact top-k;
2. writes one snapshot per shard straight from `ShardIndex` (post i routed by
   `shard_of(i)`, as the consumer routes it) and starts the broker, the shard
   servers (FEEDRET_SNAPSHOT_DIR: they load it, then follow their partition)
   and the root, each its own process;
3. builds one faiss index over all N vectors with the same factory, in this
   process, searched as broadly as feedret's rule says for one index of all
   N posts (`ShardIndex.search_breadth`), one query at a time; each shard
   applies the rule to its posts and the depth the root asks of it
   (`shard_depth`);
4. sends every query through `FeedretClient.retrieve` (client -> root -> all
   shards over gRPC -> merge -> client) and through raw faiss, alternating per
   query so contention from other processes hits both, at each k: p50/p99
   latency, QPS one query at a time and with --concurrency clients, recall@k
   against exact search; and the shards' own Search RPCs called directly
   (no root), to split where the time goes.

    python benchmarks/search_latency.py --n 1000000 --index Flat --index IVF4096,Flat --index HNSW32 \\
        --out benchmarks/results/search_latency_1m.md --plot benchmarks/results/search_latency_1m.png

The defaults are a smoke run (20,000 vectors, small indexes) that takes well under a minute.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import DataSpec, pct  # noqa: E402

from feedret.grpc_client import MAX_MESSAGE_BYTES  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--n", type=int, default=20_000, help="posts in the index (all shards together)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=50, help="queries per k (each through feedret and raw faiss)")
    p.add_argument("--k", type=int, action="append", help="top-k; repeat for several (default 100 and 2000)")
    p.add_argument("--index", action="append", help="faiss factory; repeat (default Flat, IVF64,Flat, HNSW16)")
    p.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--nprobe", type=int, default=16, help="FEEDRET_NPROBE for the shards (a floor: see search_breadth)")
    p.add_argument("--ef-search", type=int, default=64, help="FEEDRET_EF_SEARCH for the shards (raised to k)")
    p.add_argument("--concurrency", type=int, default=4, help="client threads for the throughput measurement")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of the throughput measurement")
    p.add_argument("--warmup", type=int, default=5, help="queries per system before timing")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each retrieve, seconds")
    p.add_argument("--cache-dir", type=Path, default=benchlib.CACHE, help="vectors, truth, snapshots, raw indexes")
    p.add_argument("--prepare-only", action="store_true", help="build the cached data, snapshots and raw indexes, then exit")
    p.add_argument("--out", type=Path, help="write the markdown report here")
    p.add_argument("--plot", type=Path, help="write a PNG plot here")
    p.add_argument("--json", type=Path, help="write the raw numbers here")
    args = p.parse_args(argv)
    args.k = args.k or [100, 2000]
    args.index = args.index or ["Flat", "IVF64,Flat", "HNSW16"]
    return args


log = benchlib.log


def measure_index(args, spec: DataSpec, vectors, queries, truth, factory: str) -> dict:
    import faiss
    import grpc

    from feedret.indexer import faiss_ann
    from feedret.clients.client import FeedretClient
    from feedret.config import RootConfig
    from feedret.merge import shard_depth
    from feedret.v1 import feedret_pb2 as pb
    from feedret.v1 import feedret_pb2_grpc as pb_grpc

    log(f"[{factory}] shard snapshots")
    snap_dir, counts, info = benchlib.shard_snapshots(spec, vectors, factory, args.shards, args.nprobe,
                                                      args.ef_search, args.cache_dir, log=log)
    log(f"[{factory}] raw faiss index over all {spec.n:,}")
    raw = benchlib.raw_index(spec, vectors, factory, args.cache_dir, log=log)
    run_dir = args.cache_dir / "runs" / f"{os.getpid()}-{benchlib._slug(factory)}"
    benchlib.link_snapshots(snap_dir, run_dir / "snapshots")
    env = benchlib.shard_env(factory, run_dir / "snapshots", args.nprobe, args.ef_search)
    stack = benchlib.search_stack(run_dir, args.shards, env)
    result = {"index": factory, "shard_posts": counts, "build": info, "k": {}}
    started = time.monotonic()
    with stack:
        log(f"[{factory}] stack up in {time.monotonic() - started:.1f}s")
        result["stack_start_s"] = round(time.monotonic() - started, 1)
        client = FeedretClient(stack.config.root_address)
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        shard_stubs = [pb_grpc.ShardServiceStub(grpc.insecure_channel(stack.config.shard_address(i), options=opts))
                       for i in range(args.shards)]
        result["shard_rss_mib"] = [benchlib.rss_mib(stack.procs[f"shard-{i}"].pid) for i in range(args.shards)]
        stats = client.stats(timeout=10)
        result["indexed"] = stats.total_indexed
        result["index_state"] = [s.index_state for s in stats.shards]
        result["index_device"] = [s.index_device or "cpu" for s in stats.shards]  # cuda:N: a faiss GPU copy
        assert stats.total_indexed == spec.n, f"the shards hold {stats.total_indexed}, not {spec.n}"
        partial = 0

        def feedret(q, k):
            nonlocal partial
            r = client.retrieve(vector=q, k=k, timeout=args.timeout)
            partial += r.partial
            return r.post_ids

        callers = ThreadPoolExecutor(4 * args.shards)  # blocking calls on long-lived threads, as the root makes them

        # The floor of one hop: a Lookup of an absent post on shard 0 (no search, a tiny reply)
        # through the same gRPC server, interceptors and channel options. End to end is two hops
        # (client → root → shards), so 2× this is what the serving path costs before any work.
        admin = pb_grpc.IndexAdminStub(grpc.insecure_channel(stack.config.shard_address(0), options=opts))

        def noop_rpc(q, k):
            return admin.Lookup(pb.LookupRequest(post_id=-1), timeout=args.timeout)

        def shards_direct(q, k):
            req = pb.SearchRequest(k=k)
            req.vector.extend(q.tolist())
            calls = [callers.submit(s.Search, req, timeout=args.timeout) for s in shard_stubs]
            return [c.result() for c in calls]

        for k in args.k:
            # Raw faiss searches as broadly as feedret's rule says for one index holding every post
            # (ShardIndex.search_breadth with N posts and k). Each shard applies the same rule to
            # its own posts and the depth the root asks of it (shard_depth: its share of k), so
            # together the shards probe about what the single index does, at about its recall.
            depth = shard_depth(k, args.shards, RootConfig().shard_depth_sigmas)
            nprobe, ef = faiss_ann.search_breadth(faiss_ann.nlist_of(raw), spec.n, k, 1.0, args.nprobe, args.ef_search)
            shard_nprobe, shard_ef = faiss_ann.search_breadth(faiss_ann.nlist_of(raw), counts[0], depth, 1.0, args.nprobe, args.ef_search)
            params, keep = benchlib.faiss_params(raw, nprobe, ef)

            def raw_faiss(q, k, params=params):
                # One thread per query, as in each shard: faiss's default would split a single
                # query over all cores, which on a shared 2-core machine makes OpenMP spin-wait.
                faiss.omp_set_num_threads(1)
                _, labels = raw.search(q.reshape(1, -1), k, params=params)
                return labels[0]

            systems = {"feedret": feedret, "raw": raw_faiss}
            for name, fn in systems.items():
                for q in queries[: args.warmup]:
                    fn(q, k)
            load_before = benchlib.uptime_load()
            for q in queries[: args.warmup]:
                shards_direct(q, k)
                noop_rpc(q, k)
            timed = benchlib.time_interleaved({**systems, "shards": shards_direct, "noop_rpc": noop_rpc}, queries, k)
            qps = benchlib.qps_interleaved(systems, queries, k, args.concurrency, args.rounds)
            load_after = benchlib.uptime_load()
            ivf, hnsw = faiss.try_extract_index_ivf(raw) is not None, "HNSW" in factory.upper()
            row = {"nprobe": nprobe if ivf else None,
                   "ef_search": ef if hnsw else None,
                   "shard_depth": depth,
                   "shard_nprobe": shard_nprobe if ivf else None,
                   "shard_ef_search": shard_ef if hnsw else None,
                   "load_before": load_before, "load_after": load_after}
            for name in ("feedret", "raw", "shards", "noop_rpc"):
                lat = timed[name]["latency"]
                row[name] = {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                             "mean_ms": statistics.fmean(lat) * 1e3, "qps_1": 1 / statistics.fmean(lat)}
                if name in qps:
                    row[name]["qps_c"] = qps[name]
                if name in systems:
                    row[name]["recall"] = statistics.fmean(
                        benchlib.recall_at(ids, truth[i], k) for i, ids in enumerate(timed[name]["ids"]))
            row["ratio_p50"] = row["feedret"]["p50_ms"] / row["raw"]["p50_ms"]
            row["ratio_mean"] = row["feedret"]["mean_ms"] / row["raw"]["mean_ms"]
            row["ratio_qps_c"] = row["raw"]["qps_c"] / row["feedret"]["qps_c"]
            result["k"][k] = row
            log(f"[{factory}] k={k}: feedret p50 {row['feedret']['p50_ms']:.1f} ms recall {row['feedret']['recall']:.3f}"
                f" | raw p50 {row['raw']['p50_ms']:.1f} ms recall {row['raw']['recall']:.3f}"
                f" | ratio {row['ratio_p50']:.2f} | load {load_after}")
        result["partial"] = partial
        client.close()
    raw = None  # free the 1M-post index before the next factory loads its own
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def report(args, spec: DataSpec, results: list[dict], command: str, machine: list[str]) -> str:
    kmax = max(args.k)
    head = ", ".join(f"{r['index']} **{r['k'][kmax]['ratio_p50']:.2f}**" for r in results)
    lines = [
        *benchlib.report_head(
            "Search latency: feedret (client → root → shards over gRPC) vs raw faiss in-process",
            f"End-to-end p50 over raw-faiss p50 at k={kmax:,}: {head} (issue #4 target: ≤ 1.3).",
            command,
        ),
        *machine,
        "- load average (`uptime`: 1, 5, 15 min) before / after each measurement: in the table below",
        "",
        "## Setup",
        "",
        f"- data: {spec.describe()}; post id = row; {spec.queries} queries",
        f"- feedret: {args.shards} shard servers and the root, each its own process, plus the embedded broker; "
        f"shards loaded from snapshots written by `ShardState.capture` (posts routed by `shard_of`), "
        f"FEEDRET_NPROBE={args.nprobe}, FEEDRET_EF_SEARCH={args.ef_search}; queries through "
        "`FeedretClient.retrieve(vector=…, k=…)`, i.e. client → root → every shard → merge → client",
        "- raw faiss: one index over all posts with the same factory, built in the benchmark process, "
        "`index.search` one query at a time, as broadly as feedret's rule says for one index holding every "
        "post (`ShardIndex.search_breadth` with all N posts and k: IVF lists for ~4k candidates, HNSW efSearch "
        "at least k). Each shard applies the same rule to its own posts and the depth the root asks of it "
        "(`feedret.merge.shard_depth`: its share of k plus 5 standard deviations, 1,112 of k=2,000 over 2 "
        "shards), shown as 'shard' in the breadth column: together the shards search about as much as the "
        "single index, and the recall columns show how close they come",
        "- shards direct: the same query sent straight to every shard's Search RPC in parallel (no root, "
        "no merge): the shard part of the end-to-end time",
        "- no-op RPC: a Lookup of an absent post on shard 0 (no search, a few-byte reply), interleaved with the "
        "others: what one gRPC hop costs on this machine before any work; end to end makes two hops in sequence",
        f"- latency: one query at a time, feedret / raw / shards-direct alternating per query; "
        f"QPS@{args.concurrency}: {args.concurrency} client threads, feedret and raw alternating over "
        f"{args.rounds} rounds of all queries; recall@k: |found ∩ exact top-k| / k, averaged",
        "- threads: raw faiss searches with `faiss.omp_set_num_threads(1)`, one query on one core, as each "
        "shard does; feedret's two shards search in parallel, so with the cores free it can beat raw faiss "
        "on Flat; with the machine shared, it cannot count on that",
        "",
        "## Results",
        "",
        "| index | k | nprobe / efSearch (raw; shard, for its depth) | feedret p50 / p99 ms | raw p50 / p99 ms | shards-direct p50 ms "
        "| no-op RPC p50 ms "
        f"| feedret / raw (p50) | QPS 1 client: feedret / raw | QPS {args.concurrency} clients: feedret / raw "
        "| recall@k feedret / raw | load before → after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        for k, row in r["k"].items():
            f, w, s = row["feedret"], row["raw"], row["shards"]
            noop = row.get("noop_rpc", {}).get("p50_ms")
            if row["nprobe"]:
                breadth = f"nprobe {row['nprobe']}; shard {row.get('shard_nprobe')} for {row.get('shard_depth'):,}"
            elif row["ef_search"]:
                breadth = f"ef {row['ef_search']}; shard {row.get('shard_ef_search')} for {row.get('shard_depth'):,}"
            else:
                breadth = "exact"
            lines.append(
                f"| {r['index']} | {k:,} | {breadth} | {fmt(f['p50_ms'])} / {fmt(f['p99_ms'])} "
                f"| {fmt(w['p50_ms'])} / {fmt(w['p99_ms'])} | {fmt(s['p50_ms'])} | {fmt(noop, 2)} "
                f"| **{row['ratio_p50']:.2f}** "
                f"| {fmt(f['qps_1'])} / {fmt(w['qps_1'])} | {fmt(f['qps_c'])} / {fmt(w['qps_c'])} "
                f"| {f['recall']:.3f} / {w['recall']:.3f} | {row['load_before']} → {row['load_after']} |"
            )
    lines += ["", "## Index builds (not timed against anything)", ""]
    for r in results:
        lines.append(f"- {r['index']}: shards hold {', '.join(f'{c:,}' for c in r['shard_posts'])} posts "
                     f"(state {', '.join(r['index_state'])}; searching on {', '.join(r.get('index_device', ['cpu']))}); shard process RSS after loading "
                     f"{', '.join(f'{m:,.0f}' for m in r['shard_rss_mib'])} MiB "
                     f"(~{sum(r['shard_rss_mib']) * 2**20 / sum(r['shard_posts']):,.0f} bytes per post, Python and "
                     f"gRPC included); shard index builds {r['build']['build_seconds']} s; "
                     f"stack start with snapshot load {r['stack_start_s']} s; partial replies: {r['partial']}")
    lines.append("")
    return "\n".join(lines)


def plot(args, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, feed, raw, shards, qf, qr = [], [], [], [], [], []
    for r in results:
        for k, row in r["k"].items():
            labels.append(f"{r['index']}\nk={k}")
            feed.append(row["feedret"]["p50_ms"])
            raw.append(row["raw"]["p50_ms"])
            shards.append(row["shards"]["p50_ms"])
            qf.append(row["feedret"]["qps_c"])
            qr.append(row["raw"]["qps_c"])
    x = np.arange(len(labels))
    fig, (a, b) = plt.subplots(1, 2, figsize=(min(16, max(9, 1.4 * len(labels) + 4)), 4.5))
    w = 0.27
    a.bar(x - w, feed, w, label="feedret end to end")
    a.bar(x, shards, w, label="shards direct (no root)")
    a.bar(x + w, raw, w, label="raw faiss in-process")
    a.set_yscale("log")
    a.set_ylabel("p50 latency, ms (log)")
    a.set_xticks(x, labels, fontsize=8)
    a.legend(fontsize=8)
    a.set_title("latency, one query at a time")
    b.bar(x - w / 2, qf, w, label="feedret")
    b.bar(x + w / 2, qr, w, label="raw faiss")
    b.set_yscale("log")
    b.set_ylabel(f"queries/s with {args.concurrency} clients (log)")
    b.set_xticks(x, labels, fontsize=8)
    b.legend(fontsize=8)
    b.set_title("throughput")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = benchlib.command_line(__file__, argv)
    machine = benchlib.machine_lines()
    spec = DataSpec(n=args.n, dim=args.dim, queries=args.queries, seed=args.seed, kind=args.data)
    log(f"data: {spec.describe()}")
    vectors, queries = benchlib.dataset(spec, args.cache_dir)
    truth = benchlib.ground_truth(spec, vectors, queries, max(args.k), args.cache_dir)
    if args.prepare_only:
        for factory in args.index:
            benchlib.shard_snapshots(spec, vectors, factory, args.shards, args.nprobe, args.ef_search,
                                     args.cache_dir, log=log)
            benchlib.raw_index(spec, vectors, factory, args.cache_dir, log=log)
        return {"results": []}
    results = [measure_index(args, spec, vectors, queries, truth, factory) for factory in args.index]
    benchlib.write_outputs(report(args, spec, results, command, machine), args.out, args.json,
                           {"command": command, "results": results})
    if args.plot:
        plot(args, results, args.plot)
    return {"results": results}


if __name__ == "__main__":
    main()

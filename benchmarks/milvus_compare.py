"""feedret against milvus-lite on the same vectors and queries, at matched recall; and insert-to-searchable time.

For each index kind (flat, ivf, hnsw) it

1. starts feedret (broker, shard servers loaded from snapshots, root: see
   search_latency.py) with the faiss factory for that kind, and measures its
   recall@k against exact search;
2. loads the same vectors into milvus-lite (`pymilvus.MilvusClient` on a local
   .db directory, in this process, as milvus-lite is meant to be used) with the
   matching index (FLAT / IVF_FLAT with the same nlist / HNSW with the same M and
   faiss's default efConstruction 40), then raises its search breadth (nprobe or
   ef) until its recall@k reaches feedret's: the two are compared at matched recall;
3. times both on the same queries, alternating per query (latency) and per round
   (QPS with --concurrency client threads);
4. insert-to-searchable: feedret gets one new post vector published to the
   post-vector topic through Kafka (on its shard's partition, as the consumer
   publishes it) and is polled with Lookup and with search until the post is
   there; milvus-lite gets one `insert` and is polled with search. Timed from
   just before the publish / insert call.

    python benchmarks/milvus_compare.py --n 1000000 --index flat --index ivf --index hnsw --nlist 4096 --hnsw-m 32 \\
        --out benchmarks/results/milvus_compare.md --plot benchmarks/results/milvus_compare.png

Needs the bench extra: pip install -e '.[bench]'. The defaults are a smoke run (20,000 vectors).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import DataSpec, pct  # noqa: E402

COLLECTION = "posts"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--n", type=int, default=20_000, help="posts (vectors) in both systems")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--k", type=int, action="append", help="top-k; repeat for several (default 100)")
    p.add_argument("--index", action="append", choices=["flat", "ivf", "hnsw"], help="repeat (default all three)")
    p.add_argument("--nlist", type=int, default=64, help="IVF lists (feedret IVF<nlist>,Flat; milvus IVF_FLAT nlist)")
    p.add_argument("--hnsw-m", type=int, default=16, help="HNSW graph degree M (feedret HNSW<M>; milvus HNSW M)")
    p.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--nprobe", type=int, default=16, help="FEEDRET_NPROBE (a floor: see ShardIndex.search_breadth)")
    p.add_argument("--ef-search", type=int, default=64, help="FEEDRET_EF_SEARCH (raised to k)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--freshness-trials", type=int, default=5, help="insert-to-searchable trials per system")
    p.add_argument("--insert-batch", type=int, default=10_000, help="rows per milvus-lite insert call")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--cache-dir", type=Path, default=benchlib.CACHE)
    p.add_argument("--out", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.k = args.k or [100]
    args.index = args.index or ["flat", "ivf", "hnsw"]
    return args


log = benchlib.log


def feedret_factory(kind: str, args) -> str:
    return {"flat": "Flat", "ivf": f"IVF{args.nlist},Flat", "hnsw": f"HNSW{args.hnsw_m}"}[kind]


def milvus_index(kind: str, args) -> tuple[str, dict]:
    return {
        "flat": ("FLAT", {}),
        "ivf": ("IVF_FLAT", {"nlist": args.nlist}),
        # faiss's default efConstruction, which the feedret shards' HNSW is built with.
        "hnsw": ("HNSW", {"M": args.hnsw_m, "efConstruction": 40}),
    }[kind]


def milvus_breadths(kind: str, k: int, args) -> list[dict]:
    """Search parameters to try, narrowest first."""
    if kind == "ivf":
        return [{"nprobe": p} for p in (8, 16, 32, 64, 128, 256, 512, 1024) if p <= args.nlist] + [{"nprobe": args.nlist}]
    if kind == "hnsw":
        return [{"ef": e} for e in sorted({max(k, 64), 2 * k, 4 * k, 8 * k, 16 * k, 32 * k})]
    return [{}]


class Milvus:
    """milvus-lite through MilvusClient on a local .db directory (its server runs in this process)."""

    def __init__(self, path: Path) -> None:
        from pymilvus import MilvusClient

        self.path = path
        self.client = MilvusClient(str(path))
        self.params: dict = {}

    def load(self, vectors: np.ndarray, kind: str, args) -> dict:
        from pymilvus import DataType, MilvusClient

        c = self.client
        if c.has_collection(COLLECTION):
            c.load_collection(COLLECTION)
            rows = int(c.get_collection_stats(COLLECTION).get("row_count", 0))
            if rows == len(vectors):
                return {"reused": True}
            c.drop_collection(COLLECTION)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=vectors.shape[1])
        index_type, params = milvus_index(kind, args)
        index_params = c.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=params)
        started = time.monotonic()
        c.create_collection(COLLECTION, schema=schema, index_params=index_params)
        for start in range(0, len(vectors), args.insert_batch):
            block = np.asarray(vectors[start : start + args.insert_batch])
            c.insert(COLLECTION, [{"id": start + i, "vector": row} for i, row in enumerate(block)])
        inserted = time.monotonic()
        c.flush(COLLECTION)
        c.load_collection(COLLECTION)
        done = time.monotonic()
        return {"reused": False, "insert_s": round(inserted - started, 1), "flush_index_s": round(done - inserted, 1)}

    def search(self, q: np.ndarray, k: int) -> list[int]:
        hits = self.client.search(COLLECTION, data=[q.tolist()], limit=k, output_fields=["id"],
                                  search_params={"metric_type": "IP", "params": self.params})
        return [h["id"] for h in hits[0]]

    def insert_to_searchable(self, post_id: int, vector: np.ndarray, timeout: float) -> float:
        started = time.monotonic()
        self.client.insert(COLLECTION, [{"id": post_id, "vector": vector}])
        while time.monotonic() - started < timeout:
            if post_id in self.search(vector, 10):
                return time.monotonic() - started
        return float("nan")

    def forget(self, post_ids: list[int]) -> None:
        self.client.delete(COLLECTION, ids=post_ids)
        self.client.flush(COLLECTION)

    def close(self) -> None:
        from milvus_lite.server_manager import server_manager_instance

        self.client.close()
        server_manager_instance.release_server(str(self.path))  # its in-process server, so the next fork is clean


def feedret_freshness(stack, client, post_id: int, vector: np.ndarray, producer, timeout: float) -> tuple[float, float]:
    """(seconds until Lookup finds it, seconds until a search finds it), from just before the publish."""
    started = time.monotonic()
    benchlib.publish_vector(stack.kafka.bootstrap_servers, stack.kafka.vectors_topic, stack.config.num_shards,
                            post_id, vector, producer)
    lookup = search = float("nan")
    while time.monotonic() - started < timeout:
        if client.lookup(post_id, timeout=5).found:
            lookup = time.monotonic() - started
            break
    while time.monotonic() - started < timeout:
        if post_id in client.retrieve(vector=vector, k=10, timeout=10).post_ids:
            search = time.monotonic() - started
            break
    return lookup, search


def fresh_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng([seed, 99]).standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def measure_kind(args, spec: DataSpec, vectors, queries, truth, kind: str) -> dict:
    from kafka import KafkaProducer

    from feedret.clients.client import FeedretClient

    factory = feedret_factory(kind, args)
    log(f"[{kind}] feedret shard snapshots ({factory})")
    snap_dir, counts, info = benchlib.shard_snapshots(spec, vectors, factory, args.shards, args.nprobe,
                                                      args.ef_search, args.cache_dir, log=log)
    run_dir = args.cache_dir / "runs" / f"{os.getpid()}-m-{kind}"
    benchlib.link_snapshots(snap_dir, run_dir / "snapshots")
    env = benchlib.shard_env(factory, run_dir / "snapshots", args.nprobe, args.ef_search)
    # The stack first: its processes are forked, which must not happen while milvus-lite's
    # in-process gRPC server is running.
    with benchlib.search_stack(run_dir, args.shards, env) as stack:
        log(f"[{kind}] milvus-lite load")
        mpath = args.cache_dir / f"milvus-{spec.key}-{kind}-{args.nlist if kind == 'ivf' else args.hnsw_m}.db"
        milvus = Milvus(mpath)
        load_info = milvus.load(vectors, kind, args)
        log(f"[{kind}] milvus-lite {load_info}")
        result = {"kind": kind, "feedret_index": factory, "milvus_index": milvus_index(kind, args),
                  "milvus_load": load_info, "k": {}}
        client = FeedretClient(stack.config.root_address)

        def feedret(q, k):
            return client.retrieve(vector=q, k=k, timeout=args.timeout).ids

        for k in args.k:
            for q in queries[: args.warmup]:
                feedret(q, k)
            feedret_recall = statistics.fmean(benchlib.recall_at(feedret(q, k), truth[i], k) for i, q in enumerate(queries))
            tried = []
            for params in milvus_breadths(kind, k, args):
                milvus.params = params
                rec = statistics.fmean(benchlib.recall_at(milvus.search(q, k), truth[i], k) for i, q in enumerate(queries))
                tried.append((params, rec))
                log(f"[{kind}] k={k} milvus {params}: recall {rec:.4f} (feedret {feedret_recall:.4f})")
                if rec >= feedret_recall - 1e-9:
                    break
            systems = {"feedret": feedret, "milvus": milvus.search}
            for q in queries[: args.warmup]:
                milvus.search(q, k)
            load_before = benchlib.uptime_load()
            timed = benchlib.time_interleaved(systems, queries, k)
            qps = benchlib.qps_interleaved(systems, queries, k, args.concurrency, args.rounds)
            load_after = benchlib.uptime_load()
            row = {"milvus_params": milvus.params, "milvus_tried": tried, "load_before": load_before,
                   "load_after": load_after}
            for name in systems:
                lat = timed[name]["latency"]
                row[name] = {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                             "qps_1": 1 / statistics.fmean(lat), "qps_c": qps[name],
                             "recall": statistics.fmean(benchlib.recall_at(ids, truth[i], k)
                                                        for i, ids in enumerate(timed[name]["ids"]))}
            row["qps_ratio_1"] = row["feedret"]["qps_1"] / row["milvus"]["qps_1"]
            row["qps_ratio_c"] = row["feedret"]["qps_c"] / row["milvus"]["qps_c"]
            result["k"][k] = row
            log(f"[{kind}] k={k}: QPS@{args.concurrency} feedret {row['feedret']['qps_c']:.1f} "
                f"milvus {row['milvus']['qps_c']:.1f} (x{row['qps_ratio_c']:.2f}); recall "
                f"{row['feedret']['recall']:.3f} / {row['milvus']['recall']:.3f}")

        # Insert-to-searchable, alternating systems; new posts get ids past the loaded ones.
        fresh = fresh_vectors(args.freshness_trials, spec.dim, args.seed)
        producer = KafkaProducer(bootstrap_servers=stack.kafka.bootstrap_servers, acks="all", linger_ms=0)
        f_lookup, f_search, m_search = [], [], []
        base = spec.n + 10_000_000
        for t in range(args.freshness_trials):
            lookup, search = feedret_freshness(stack, client, base + t, fresh[t], producer, args.timeout)
            f_lookup.append(lookup)
            f_search.append(search)
            m_search.append(milvus.insert_to_searchable(base + t, fresh[t], args.timeout))
            time.sleep(0.2)
        producer.close()
        milvus.forget([base + t for t in range(args.freshness_trials)])
        result["freshness"] = {"feedret_lookup_s": f_lookup, "feedret_search_s": f_search, "milvus_search_s": m_search}
        log(f"[{kind}] insert-to-searchable median: feedret lookup {np.nanmedian(f_lookup) * 1e3:.0f} ms, "
            f"search {np.nanmedian(f_search) * 1e3:.0f} ms; milvus search {np.nanmedian(m_search) * 1e3:.0f} ms")
        client.close()
        milvus.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def ms(values: list[float], q: float) -> str:
    v = [x for x in values if x == x]
    return f"{np.percentile(v, q) * 1e3:,.0f}" if v else "-"


def report(args, spec: DataSpec, results: list[dict], command: str, machine: list[str], versions: str) -> str:
    k0 = args.k[0]
    head = ", ".join(f"{r['kind']} **{r['k'][k0]['qps_ratio_c']:.2f}x**" for r in results)
    lines = [
        *benchlib.report_head(
            "feedret vs milvus-lite: throughput at matched recall, and insert-to-searchable",
            f"feedret QPS / milvus-lite QPS with {args.concurrency} clients at k={k0:,}: {head} (goal: 3x).",
            command,
        ),
        *machine,
        f"- {versions}",
        "- load average (`uptime`: 1, 5, 15 min) before / after each measurement: in the tables",
        "",
        "## Setup",
        "",
        f"- data: {spec.describe()}; {spec.queries} queries; recall@k against exact search",
        f"- feedret: {args.shards} shard servers + root + embedded broker, each its own process, shards loaded "
        f"from snapshots; FEEDRET_NPROBE={args.nprobe}, FEEDRET_EF_SEARCH={args.ef_search} (both floors: a shard "
        "widens them with k, `ShardIndex.search_breadth`); queries through `FeedretClient.retrieve`",
        "- milvus-lite: `MilvusClient(<local .db>)`, which serves it from threads in the benchmark process; one "
        "collection (INT64 primary key, FLOAT_VECTOR, metric IP), index built at load, searches with "
        "`output_fields=['id']`; its search breadth is the narrowest of the listed values whose recall@k reaches "
        "feedret's (matched recall)",
        f"- latency: one query at a time, the systems alternating per query; QPS: {args.concurrency} client "
        f"threads, alternating over {args.rounds} rounds of all queries",
        "- insert-to-searchable: from just before the call that writes (feedret: a PostVectorEvent produced to "
        "`post-vectors` with acks=all; milvus-lite: `insert`) until a poll finds the post (feedret: Lookup through "
        "the root, then a search for its vector; milvus-lite: a search for its vector); "
        f"{args.freshness_trials} trials each, alternating",
        "",
        "## Throughput and latency at matched recall",
        "",
        f"| index | k | feedret | milvus-lite (search params) | recall@k feedret / milvus | QPS {args.concurrency} clients "
        "feedret / milvus | **ratio** | QPS 1 client feedret / milvus | p50 / p99 ms feedret | p50 / p99 ms milvus "
        "| load before → after |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        mi = r["milvus_index"]
        for k, row in r["k"].items():
            f, m = row["feedret"], row["milvus"]
            lines.append(
                f"| {r['kind']} | {k:,} | `{r['feedret_index']}` | {mi[0]} {json.dumps(mi[1]) if mi[1] else ''} "
                f"({json.dumps(row['milvus_params']) if row['milvus_params'] else 'exact'}) "
                f"| {f['recall']:.3f} / {m['recall']:.3f} | {f['qps_c']:,.1f} / {m['qps_c']:,.1f} "
                f"| **{row['qps_ratio_c']:.2f}x** | {f['qps_1']:,.1f} / {m['qps_1']:,.1f} "
                f"| {f['p50_ms']:,.1f} / {f['p99_ms']:,.1f} | {m['p50_ms']:,.1f} / {m['p99_ms']:,.1f} "
                f"| {row['load_before']} → {row['load_after']} |")
    lines += [
        "",
        "milvus-lite breadths tried (recall@k): " + "; ".join(
            f"{r['kind']} k={k}: " + ", ".join(f"{json.dumps(p) if p else 'exact'} {rec:.3f}" for p, rec in row["milvus_tried"])
            for r in results for k, row in r["k"].items()),
        "",
        "## Insert to searchable (ms)",
        "",
        "| index | feedret, Lookup finds it: p50 / max | feedret, search finds it: p50 / max "
        "| milvus-lite, search finds it: p50 / max |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        fr = r["freshness"]
        lines.append(f"| {r['kind']} | {ms(fr['feedret_lookup_s'], 50)} / {ms(fr['feedret_lookup_s'], 100)} "
                     f"| {ms(fr['feedret_search_s'], 50)} / {ms(fr['feedret_search_s'], 100)} "
                     f"| {ms(fr['milvus_search_s'], 50)} / {ms(fr['milvus_search_s'], 100)} |")
    lines += ["", "## Loading (not compared)", ""]
    for r in results:
        lines.append(f"- {r['kind']}: milvus-lite {r['milvus_load']}")
    lines.append("")
    return "\n".join(lines)


def plot(args, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, qf, qm = [], [], []
    for r in results:
        for k, row in r["k"].items():
            labels.append(f"{r['kind']} k={k}\nrecall {row['feedret']['recall']:.3f}/{row['milvus']['recall']:.3f}")
            qf.append(row["feedret"]["qps_c"])
            qm.append(row["milvus"]["qps_c"])
    x = np.arange(len(labels))
    fig, (a, b) = plt.subplots(1, 2, figsize=(min(16, max(9, 1.3 * len(labels) + 4)), 4.5))
    a.bar(x - 0.2, qf, 0.4, label="feedret")
    a.bar(x + 0.2, qm, 0.4, label="milvus-lite")
    a.set_yscale("log")
    a.set_ylabel(f"queries/s, {args.concurrency} clients (log)")
    a.set_xticks(x, labels, fontsize=8)
    a.set_title("throughput at matched recall (feedret/milvus)")
    a.legend(fontsize=8)
    kinds = [r["kind"] for r in results]
    xs = np.arange(len(kinds))
    med = lambda v: float(np.nanmedian(v)) * 1e3  # noqa: E731
    b.bar(xs - 0.27, [med(r["freshness"]["feedret_lookup_s"]) for r in results], 0.27, label="feedret (Lookup)")
    b.bar(xs, [med(r["freshness"]["feedret_search_s"]) for r in results], 0.27, label="feedret (search)")
    b.bar(xs + 0.27, [med(r["freshness"]["milvus_search_s"]) for r in results], 0.27, label="milvus-lite (search)")
    b.set_ylabel("insert to searchable, median ms")
    b.set_xticks(xs, kinds)
    b.set_title("freshness")
    b.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        import milvus_lite
        import pymilvus
    except ImportError:
        raise SystemExit("milvus_compare needs milvus-lite and pymilvus: pip install -e '.[bench]'")
    command = benchlib.command_line(__file__, argv)
    machine = benchlib.machine_lines()
    versions = f"pymilvus {pymilvus.__version__}, milvus-lite {milvus_lite.__version__}"
    spec = DataSpec(n=args.n, dim=args.dim, queries=args.queries, seed=args.seed, kind=args.data)
    log(f"data: {spec.describe()}")
    vectors, queries = benchlib.dataset(spec, args.cache_dir)
    truth = benchlib.ground_truth(spec, vectors, queries, max(args.k), args.cache_dir)
    results = [measure_kind(args, spec, vectors, queries, truth, kind) for kind in args.index]
    benchlib.write_outputs(report(args, spec, results, command, machine, versions), args.out, args.json,
                           {"command": command, "results": results})
    if args.plot:
        plot(args, results, args.plot)
    return {"results": results}


if __name__ == "__main__":
    main()

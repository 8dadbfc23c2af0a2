"""The floor of the serving path: the same two-hop topology with bare gRPC servers, against feedret and raw faiss.

Issue #4 asks for end to end (client -> root -> 2 shards -> merge -> client) at most
1.3x raw faiss in-process at k=2,000. This benchmark measures what *any* Python gRPC
implementation of that topology costs on this machine, so feedret's own overhead can
be told apart from the cost of the topology:

- **floor, thread-pool root**: two bare shard processes (a generic gRPC handler, no
  interceptors, logging, validation or filters) that search the same faiss index the
  feedret shard loads from the same snapshot, with the same nprobe / efSearch, and a
  bare root process that fans each query out to both on a long-lived thread pool
  (as feedret's root does), merges with numpy and replies; requests and replies are
  raw bytes (no protobuf);
- **floor, asyncio root**: the same, with a grpc.aio root (one event loop,
  `asyncio.gather` over aio channels, no thread hand-offs);
- **feedret**: the real stack (broker, 2 shard servers, root) on the same snapshots,
  through `FeedretClient.retrieve`;
- **raw faiss**: one index of all N posts in this process, one thread, as broad as
  feedret's rule says (as in `search_latency.py`);
- **no-op hop**: a bare shard answering an empty reply without searching: one gRPC hop.

Every query goes through every system in turn (the order rotating per query).

    python benchmarks/grpc_floor.py --n 1000000 --index IVF4096,Flat --out benchmarks/results/grpc_floor_1m.md

The defaults are a smoke run (20,000 vectors) that takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import DataSpec, pct  # noqa: E402

from feedret.grpc_client import MAX_MESSAGE_BYTES  # noqa: E402

METHOD = "/floor.Floor/Search"
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]


# ------------------------------------------------------------------ wire: raw bytes, no protobuf


def encode_query(k: int, vector: np.ndarray) -> bytes:
    return struct.pack("<I", k) + np.ascontiguousarray(vector, "<f4").tobytes()


def decode_query(data: bytes) -> tuple[int, np.ndarray]:
    (k,) = struct.unpack_from("<I", data)
    return k, np.frombuffer(data, "<f4", offset=4)


def encode_hits(ids: np.ndarray, scores: np.ndarray) -> bytes:
    return struct.pack("<I", len(ids)) + np.ascontiguousarray(ids, "<i8").tobytes() + np.ascontiguousarray(scores, "<f4").tobytes()


def decode_hits(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    (n,) = struct.unpack_from("<I", data)
    ids = np.frombuffer(data, "<i8", count=n, offset=4)
    return ids, np.frombuffer(data, "<f4", count=n, offset=4 + 8 * n)


def merge(parts: list[bytes], k: int) -> bytes:
    hits = [decode_hits(p) for p in parts]
    ids = np.concatenate([h[0] for h in hits])
    scores = np.concatenate([h[1] for h in hits])
    order = np.argsort(-scores, kind="stable")[:k]
    return encode_hits(ids[order], scores[order])


# ------------------------------------------------------------------ the bare servers


def serve_bytes(port: int, search, workers: int = 4) -> None:
    """A thread-pool gRPC server answering /floor.Floor/Search with `search(bytes, context) -> bytes`, forever."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(workers), options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "floor.Floor", {"Search": grpc.unary_unary_rpc_method_handler(search)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve_shard(snapshot: Path, shard: int, num_shards: int, port: int, factory: str, nprobe: int, ef_search: int,
                workers: int = 4) -> None:
    """A shard with nothing but the search: feedret's snapshot loaded, its faiss index searched raw."""
    import faiss

    from feedret.config import ShardConfig
    from feedret.indexer import snapshot as snapshots
    from feedret.indexer.shard_index import IndexOptions, ShardIndex

    header, sections = snapshots.read_snapshot(snapshot)
    cfg = ShardConfig(shard_id=shard, num_shards=num_shards, index_factory=factory, nprobe=nprobe, ef_search=ef_search)
    index = ShardIndex.from_state(header["index"], sections, IndexOptions.from_config(cfg))
    # The benchmark reaches inside on purpose: the floor is faiss alone, without the
    # shard's lock, masks and bookkeeping, on the very index the feedret shard serves.
    ann, post_id = index._ann, index._slots.post_id
    breadth: dict[int, object] = {}

    def params_for(k: int):
        if k not in breadth:
            nprobe_k, ef_k = index.search_breadth(ann, k, 1.0)
            breadth[k] = benchlib.faiss_params(ann.index, nprobe_k, ef_k)[0] if ann is not None else None
        return breadth[k]

    def search(request: bytes, context) -> bytes:
        k, q = decode_query(request)
        faiss.omp_set_num_threads(1)  # per thread: one query on one core, as feedret's shard and raw faiss search
        if k == 0:  # the no-op hop
            return encode_hits(np.empty(0, np.int64), np.empty(0, np.float32))
        if ann is None:  # Flat: the shard's exact store
            ids, scores = index.search(q, k)
            return encode_hits(ids, scores)
        scores, slots = ann.index.search(q.reshape(1, -1), k, params=params_for(k))
        valid = slots[0] >= 0
        return encode_hits(post_id[slots[0][valid]], scores[0][valid])

    serve_bytes(port, search, workers)


def serve_root_threads(port: int, shards: list[str], sigmas: float, workers: int = 4) -> None:
    """A root that fans out on a long-lived thread pool with blocking calls, as feedret's does."""
    import grpc

    from feedret.merge import shard_depth

    calls = [grpc.insecure_channel(a, options=OPTIONS).unary_unary(METHOD) for a in shards]
    pool = futures.ThreadPoolExecutor(workers * len(shards))

    def search(request: bytes, context) -> bytes:
        k, q = decode_query(request)
        ask = encode_query(shard_depth(k, len(shards), sigmas), q)
        parts = [f.result() for f in [pool.submit(c, ask, timeout=5) for c in calls]]
        return merge(parts, k)

    serve_bytes(port, search, workers)


def serve_root_asyncio(port: int, shards: list[str], sigmas: float, workers: int = 4) -> None:
    """A grpc.aio root: one event loop, both shard calls awaited together, no thread hand-offs."""
    import grpc

    from feedret.merge import shard_depth

    async def main() -> None:
        calls = [grpc.aio.insecure_channel(a, options=OPTIONS).unary_unary(METHOD) for a in shards]

        async def search(request: bytes, context) -> bytes:
            k, q = decode_query(request)
            ask = encode_query(shard_depth(k, len(shards), sigmas), q)
            parts = await asyncio.gather(*(c(ask, timeout=5) for c in calls))
            return merge(list(parts), k)

        server = grpc.aio.server(options=OPTIONS)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "floor.Floor", {"Search": grpc.unary_unary_rpc_method_handler(search)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


# ------------------------------------------------------------------ the measurement


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="posts in the index (all shards together)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=2000)
    p.add_argument("--index", default="IVF64,Flat", help="faiss factory")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--ef-search", type=int, default=64)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--cache-dir", type=Path, default=benchlib.CACHE)
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path)
    # Internal: the bare servers are this file started again.
    p.add_argument("--serve", choices=["shard", "root-threads", "root-asyncio"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--snapshot", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--shard", type=int, help=argparse.SUPPRESS)
    p.add_argument("--targets", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=4, help=argparse.SUPPRESS)  # a bare server's threads
    return p.parse_args(argv)


log = benchlib.log


def start(args, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *extra, "--index", args.index, "--nprobe", str(args.nprobe),
                             "--ef-search", str(args.ef_search), "--shards", str(args.shards)])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(args, spec: DataSpec) -> dict:
    import faiss
    import grpc

    from feedret.clients.client import FeedretClient
    from feedret.config import RootConfig
    from feedret.indexer import faiss_ann
    from feedret.indexer import snapshot as snapshots
    from feedret.merge import shard_depth
    from feedret.server.launcher import free_port_block, wait_for_port

    vectors, queries = benchlib.dataset(spec, args.cache_dir)
    truth = benchlib.ground_truth(spec, vectors, queries, args.k, args.cache_dir)
    snap_dir, counts, _ = benchlib.shard_snapshots(spec, vectors, args.index, args.shards, args.nprobe,
                                                   args.ef_search, args.cache_dir, log=log)
    raw = benchlib.raw_index(spec, vectors, args.index, args.cache_dir, log=log)
    del vectors
    sigmas = RootConfig().shard_depth_sigmas
    base = free_port_block(3 + args.shards)
    shard_addrs = [f"127.0.0.1:{base + i}" for i in range(args.shards)]
    procs = []
    run_dir = args.cache_dir / "runs" / f"floor-{os.getpid()}"
    benchlib.link_snapshots(snap_dir, run_dir / "snapshots")
    stack = benchlib.search_stack(run_dir, args.shards, benchlib.shard_env(args.index, run_dir / "snapshots",
                                                                            args.nprobe, args.ef_search))
    try:
        for i in range(args.shards):
            (path,) = snapshots.list_snapshots(snap_dir, i)[:1]
            procs.append(start(args, "--serve", "shard", "--port", str(base + i), "--snapshot", str(path),
                               "--shard", str(i)))
        threads_port, asyncio_port = base + args.shards, base + args.shards + 1
        procs.append(start(args, "--serve", "root-threads", "--port", str(threads_port), "--targets", ",".join(shard_addrs)))
        procs.append(start(args, "--serve", "root-asyncio", "--port", str(asyncio_port), "--targets", ",".join(shard_addrs)))
        started = time.monotonic()
        with stack:
            for port in [*(base + i for i in range(args.shards)), threads_port, asyncio_port]:
                wait_for_port("127.0.0.1", port, 600)
            log(f"[{args.index}] stacks up in {time.monotonic() - started:.1f}s")
            client = FeedretClient(stack.config.root_address)
            assert client.stats(timeout=10).total_indexed == spec.n
            floor_threads = grpc.insecure_channel(f"127.0.0.1:{threads_port}", options=OPTIONS).unary_unary(METHOD)
            floor_asyncio = grpc.insecure_channel(f"127.0.0.1:{asyncio_port}", options=OPTIONS).unary_unary(METHOD)
            hop = grpc.insecure_channel(shard_addrs[0], options=OPTIONS).unary_unary(METHOD)
            nprobe, ef = faiss_ann.search_breadth(faiss_ann.nlist_of(raw), spec.n, args.k, 1.0, args.nprobe, args.ef_search)
            params, _keep = benchlib.faiss_params(raw, nprobe, ef)

            def raw_faiss(q, k):
                faiss.omp_set_num_threads(1)
                return raw.search(q.reshape(1, -1), k, params=params)[1][0]

            systems = {
                "feedret": lambda q, k: client.retrieve(vector=q, k=k, timeout=5).post_ids,
                "floor_threads": lambda q, k: decode_hits(floor_threads(encode_query(k, q), timeout=5))[0],
                "floor_asyncio": lambda q, k: decode_hits(floor_asyncio(encode_query(k, q), timeout=5))[0],
                "raw": raw_faiss,
                "hop": lambda q, k: decode_hits(hop(encode_query(0, q), timeout=5))[0],
            }
            for fn in systems.values():
                for q in queries[: args.warmup]:
                    fn(q, args.k)
            pids = {**{f"feedret {name}": proc.pid for name, proc in stack.procs.items()},
                    **{f"bare {name}": proc.pid for name, proc in zip(
                        [*(f"shard-{i}" for i in range(args.shards)), "root (threads)", "root (asyncio)"], procs)},
                    "benchmark (clients, raw faiss)": os.getpid()}
            load_before = benchlib.uptime_load()
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            timed = benchlib.time_interleaved(systems, queries, args.k)
            cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
            load_after = benchlib.uptime_load()
            client.close()
    finally:
        benchlib.stop_processes(procs)
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    out = {"index": args.index, "k": args.k, "nprobe": nprobe, "shard_depth": shard_depth(args.k, args.shards, sigmas),
           "shard_posts": counts, "load_before": load_before, "load_after": load_after, "systems": {},
           "cpu_ms_per_query": {name: round(sec * 1e3 / len(queries), 2) for name, sec in cpu.items()}}
    for name, t in timed.items():
        lat = t["latency"]
        row = {"p50_ms": pct(lat, 50) * 1e3, "p90_ms": pct(lat, 90) * 1e3, "p99_ms": pct(lat, 99) * 1e3}
        if name != "hop":
            row["recall"] = float(np.mean([benchlib.recall_at(ids, truth[i], args.k) for i, ids in enumerate(t["ids"])]))
        out["systems"][name] = row
    raw_p50 = out["systems"]["raw"]["p50_ms"]
    for row in out["systems"].values():
        row["over_raw"] = row["p50_ms"] / raw_p50
    return out


LABELS = {
    "raw": "raw faiss, in-process (the baseline)",
    "hop": "no-op hop: bare gRPC, client → bare shard, empty reply",
    "floor_asyncio": "floor: bare gRPC, client → asyncio root → 2 bare shards → merge",
    "floor_threads": "floor: bare gRPC, client → thread-pool root → 2 bare shards → merge",
    "feedret": "feedret: client → root → 2 shard servers → merge",
}


def report(args, spec: DataSpec, res: dict, command: str, machine: list[str]) -> str:
    s = res["systems"]
    floor = min(s["floor_threads"]["p50_ms"], s["floor_asyncio"]["p50_ms"])
    lines = [
        *benchlib.report_head(
            "The serving path's floor: bare gRPC in the same topology vs feedret vs raw faiss",
            f"k = {res['k']:,}, {res['index']}: feedret / raw faiss (p50) **{s['feedret']['over_raw']:.2f}**; "
            f"the best bare-gRPC floor / raw faiss **{floor / s['raw']['p50_ms']:.2f}**; "
            f"feedret / that floor **{s['feedret']['p50_ms'] / floor:.2f}** (issue #4 target: feedret / raw ≤ 1.3).",
            command,
        ),
        *machine,
        f"- load average before → after: {res['load_before']} → {res['load_after']}",
        "",
        "## Setup",
        "",
        f"- data: {spec.describe()}; {spec.queries} queries; shards hold {', '.join(f'{c:,}' for c in res['shard_posts'])} posts",
        f"- raw faiss: one index of all posts, nprobe {res['nprobe']} (feedret's rule for one index and k), one thread",
        f"- every shard, bare or feedret, searches the same index loaded from the same snapshot, "
        f"{res['shard_depth']:,} deep (the root's `shard_depth` for k), with the shard's nprobe rule",
        "- bare servers: generic gRPC handlers on raw bytes, no interceptors, logging, validation, filters or protobuf",
        "- every query through every system in turn, one at a time, the order rotating per query",
        "",
        "## Results",
        "",
        "| path | p50 ms | p90 ms | p99 ms | p50 / raw faiss | recall@k |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("raw", "hop", "floor_asyncio", "floor_threads", "feedret"):
        r = s[name]
        recall = f"{r['recall']:.3f}" if "recall" in r else ""
        lines.append(f"| {LABELS[name]} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['over_raw']:.2f} | {recall} |")
    lines += [
        "",
        "CPU time each process spent while every system answered every query once, per query "
        "(all systems together; a process that serves only one system shows that system's cost):",
        "",
        "| process | CPU ms per query |",
        "|---|---:|",
        *(f"| {name} | {ms:.2f} |" for name, ms in res["cpu_ms_per_query"].items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.serve == "shard":
        serve_shard(args.snapshot, args.shard, args.shards, args.port, args.index, args.nprobe, args.ef_search,
                    args.workers)
        return {}
    if args.serve:
        from feedret.config import RootConfig

        serve = serve_root_threads if args.serve == "root-threads" else serve_root_asyncio
        serve(args.port, args.targets.split(","), RootConfig().shard_depth_sigmas, args.workers)
        return {}
    command = benchlib.command_line(__file__, argv)
    machine = benchlib.machine_lines()
    spec = DataSpec(n=args.n, dim=args.dim, queries=args.queries)
    log(f"data: {spec.describe()}")
    res = measure(args, spec)
    benchlib.write_outputs(report(args, spec, res, command, machine), args.out, args.json,
                           {"command": command, "result": res})
    return res


if __name__ == "__main__":
    main()

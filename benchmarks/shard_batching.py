"""Throughput of one shard server on the torch backend, with and without dynamic batching.

One shard (the real `ShardServicer` over gRPC, torch exact backend) holds N random
unit vectors. Client threads send Search RPCs back to back; at each concurrency
the same queries go to two servers over the same index in the same run:
`FEEDRET_SEARCH_BATCH_MAX=1` (every RPC searches alone: the baseline) and the
default 32 (concurrent RPCs share one pass over the rows). Reports QPS and
latency percentiles and the batches the server formed.

    python benchmarks/shard_batching.py --n 262144 --dim 256 --out benchmarks/results/shard_batching_cpu.md
    python benchmarks/shard_batching.py --device cuda --n 10000000 --dim 256   # on a GPU
"""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from feedret.config import ShardConfig  # noqa: E402
from feedret.indexer.replica import ShardState  # noqa: E402
from feedret.server import shard as shard_server  # noqa: E402
from feedret.server.grpc_common import build_server  # noqa: E402
from feedret.server.shard import ShardServicer  # noqa: E402
from feedret.v1 import feedret_pb2 as pb  # noqa: E402
from feedret.v1 import feedret_pb2_grpc as pb_grpc  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", type=int, action="append", help="client threads; repeat (default 1, 4, 16)")
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    p.add_argument("--batch-max", type=int, default=32)
    p.add_argument("--exclude", type=int, default=100, help="post ids each query excludes (a feed's seen list)")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def start_server(state: ShardState, batch_max: int, workers: int):
    state.config = state.config.model_copy(update={"search_batch_max": batch_max})
    servicer = ShardServicer(state, "bench")
    server, _, port = build_server("127.0.0.1", 0, workers,
                                   [lambda s: pb_grpc.add_ShardServiceServicer_to_server(servicer, s)],
                                   shard_server.SERVICE_NAMES)
    server.start()
    return server, servicer, port


def run(port: int, requests: list[pb.SearchRequest], concurrency: int, seconds: float) -> dict:
    stub = pb_grpc.ShardServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}",
                                                          options=[("grpc.max_receive_message_length", 1 << 26)]))
    for r in requests[:4]:
        stub.Search(r, timeout=60)
    stop = time.monotonic() + seconds
    latencies: list[float] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        i = c
        mine = []
        while time.monotonic() < stop:
            t = time.perf_counter()
            stub.Search(requests[i % len(requests)], timeout=60)
            mine.append(time.perf_counter() - t)
            i += concurrency
        with lock:
            latencies.extend(mine)

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {"qps": len(latencies) / elapsed, "p50_ms": latencies[len(latencies) // 2] * 1e3,
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3, "n": len(latencies)}


def main(argv=None) -> None:
    args = parse_args(argv)
    levels = args.concurrency or [1, 4, 16]
    command = "python benchmarks/shard_batching.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    config = ShardConfig(index_backend="torch", index_device=args.device)
    state = ShardState(config=config, topic="post-vectors")
    state.ensure_index(args.dim)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for start in range(0, args.n, 1 << 17):
        m = min(1 << 17, args.n - start)
        v = rng.normal(size=(m, args.dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        state.index.upsert(list(range(start, start + m)), v, created_at=[1.0] * m, langs=["en"] * m, indexed_at=1.0,
                           model_versions=["bench"] * m)
    print(f"{args.n:,} posts loaded in {time.perf_counter() - t:.1f} s", flush=True)
    q = rng.normal(size=(256, args.dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    requests = []
    for i, row in enumerate(q):
        req = pb.SearchRequest(k=args.k, request_id=f"bench-{i}")
        req.vector.extend(row.tolist())
        req.filters.exclude_post_ids.extend(rng.integers(0, args.n, args.exclude).tolist())
        requests.append(req)
    rows = []
    for c in levels:
        row = {"concurrency": c}
        for name, batch_max in (("alone", 1), ("batched", args.batch_max)):
            server, servicer, port = start_server(state, batch_max, workers=max(8, 2 * c))
            try:
                row[name] = run(port, requests, c, args.seconds)
                if servicer.batcher is not None:
                    row[name]["mean_batch"] = servicer.batcher.queries / max(servicer.batcher.batches, 1)
            finally:
                server.stop(0)
                if servicer.batcher is not None:
                    servicer.batcher.close()
        rows.append(row)
        a, b = row["alone"], row["batched"]
        print(f"concurrency {c}: alone {a['qps']:.1f} QPS p50 {a['p50_ms']:.1f} ms | batched {b['qps']:.1f} QPS "
              f"p50 {b['p50_ms']:.1f} ms (mean batch {b.get('mean_batch', 1):.1f}) | x{b['qps'] / a['qps']:.2f}",
              flush=True)
    lines = [
        "# One shard, torch exact backend: concurrent searches alone vs dynamically batched",
        "",
        "```",
        command,
        "```",
        "",
        *benchlib.machine_lines(),
        f"- torch {__import__('torch').__version__}, device {state.index._store.device}; "
        f"{args.n:,} random unit vectors × {args.dim} dims; k={args.k}; each query excludes {args.exclude} post ids "
        f"(its own filter; batched, those are dropped after a search k + 100 deep over the shared mask); Search RPCs over gRPC on 127.0.0.1, "
        f"client threads back to back for {args.seconds:g} s per cell",
        f"- alone: FEEDRET_SEARCH_BATCH_MAX=1; batched: FEEDRET_SEARCH_BATCH_MAX={args.batch_max}; "
        "both serve the same index, alternately, in the same run",
        "",
        "| client threads | alone: QPS | p50 / p99 ms | batched: QPS | p50 / p99 ms | mean batch | QPS batched / alone |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        a, b = row["alone"], row["batched"]
        lines.append(f"| {row['concurrency']} | {a['qps']:.1f} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | "
                     f"{b['qps']:.1f} | {b['p50_ms']:.1f} / {b['p99_ms']:.1f} | {b.get('mean_batch', 1):.1f} | "
                     f"**{b['qps'] / a['qps']:.2f}×** |")
    benchlib.emit("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()

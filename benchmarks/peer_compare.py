"""feedret against Chroma (server mode) and LanceDB: QPS and latency against concurrency at matched recall,
and insert-to-searchable.

Issue #18 asks how feedret compares with the vector stores a user would pick instead, on
the same vectors and queries (benchlib's synthetic unit vectors, inner product):

- **feedret**: the real stack (broker, --shards shard servers loaded from snapshots, root;
  see concurrency_sweep.py), the faiss factory --index, through `AsyncFeedretClient.retrieve`;
- **Chroma**: `chroma run` (the chromadb package's Rust server) as its own process on a free
  port, one collection with an HNSW index (space "ip"; M = --chroma-m, ef_construction =
  --chroma-ef-construction, i.e. the `hnsw:M` / `hnsw:construction_ef` metadata), queried
  through `chromadb.AsyncHttpClient` with `include=["distances"]`;
- **LanceDB**: embedded in this process (`lancedb.connect_async` on a local directory), one
  table (id, vector) with an --lance-index index (IVF_FLAT by default, --lance-partitions
  partitions, distance "dot"), queried with `nearest_to(...).distance_type("dot")`.

For each k, each peer's search breadth (Chroma's `ef_search`, i.e. `hnsw:search_ef`;
LanceDB's `nprobes`) is raised from the narrowest value until its recall@k on the first
--tune-queries queries reaches feedret's: the systems are compared at matched recall, and the
recall measured in every timed cell is reported beside its QPS. Chroma's is changed with
`collection.modify`, which a running Chroma server applies only when it next opens the index
(measured: recall stays put until then), so its server is restarted after each change.
Then, for each number of clients (--concurrency), every system in turn (the order rotating
per round) serves a closed loop (`concurrency_sweep.closed_loop`: asyncio tasks in this
process, each sending its next query when the last is answered). CPU is each process's
user + system time over the system's turns, divided by its queries (LanceDB runs in this
process, so its figure is this process's: client and engine together).

Insert-to-searchable, alternating systems per trial, each timed from just before the write:
feedret gets one PostVectorEvent produced to `post-vectors` with acks=all on the post's
shard partition (the consumer's output; the shard consumes it from Kafka) and is polled with
Lookup and with a search for its vector through the root; Chroma gets one synchronous `add`
and LanceDB one `add`, each then polled with a search for the vector.

    python benchmarks/peer_compare.py --n 200000 --index IVF1024,Flat --queries 512 --per-cell 256 \\
        --tune-queries 128 --freshness-trials 20 --out benchmarks/results/peer_compare.md \\
        --json benchmarks/results/peer_compare.json --plot benchmarks/results/peer_compare.png

Needs the bench extra: pip install -e '.[bench]'. The defaults are a smoke run (20,000
vectors, IVF64,Flat) of about a minute. Chroma's collection and LanceDB's table are cached
under --cache-dir, keyed by the data and index settings, and reused when complete.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
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
from benchlib import DataSpec  # noqa: E402
from concurrency_sweep import closed_loop, timed_cell  # noqa: E402

SYSTEMS = ("feedret", "chroma", "lancedb")
PEERS = ("chroma", "lancedb")
LABELS = {"feedret": "feedret", "chroma": "Chroma (server)", "lancedb": "LanceDB (embedded)"}
COLLECTION = "posts"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="posts (vectors) in every system")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--queries", type=int, default=256, help="distinct queries (cycled)")
    p.add_argument("--k", type=int, action="append", help="top-k, repeatable (default 100 and 2000)")
    p.add_argument("--concurrency", type=int, action="append", help="clients, repeatable (default 1, 4, 16, 64)")
    p.add_argument("--per-cell", type=int, default=64, help="queries per system per round of a cell "
                   "(at least 4 per client)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tune-queries", type=int, default=64, help="queries the recall matching is measured on")
    p.add_argument("--recall-slack", type=float, default=0.0, help="a peer's breadth is matched when its recall@k "
                   "reaches feedret's minus this (0: at least feedret's)")
    p.add_argument("--index", default="IVF64,Flat", help="feedret's faiss factory")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--nprobe", type=int, default=16, help="FEEDRET_NPROBE (a floor: see ShardIndex.search_breadth)")
    p.add_argument("--ef-search", type=int, default=64, help="FEEDRET_EF_SEARCH (raised to k)")
    p.add_argument("--workers", type=int, default=64, help="feedret's gRPC threads per server")
    p.add_argument("--chroma-m", type=int, default=16, help="Chroma HNSW max_neighbors (hnsw:M)")
    p.add_argument("--chroma-ef-construction", type=int, default=100,
                   help="Chroma HNSW ef_construction (hnsw:construction_ef; Chroma's default 100)")
    p.add_argument("--chroma-batch", type=int, default=5000, help="rows per Chroma add while loading "
                   "(capped at the server's max batch size)")
    p.add_argument("--lance-index", choices=["IVF_FLAT", "IVF_SQ", "IVF_PQ"], default="IVF_FLAT")
    p.add_argument("--lance-partitions", type=int, default=0,
                   help="LanceDB IVF partitions (default: feedret's IVF nlist, else sqrt(n))")
    p.add_argument("--lance-refine", type=int, default=0,
                   help="LanceDB refine_factor for IVF_SQ / IVF_PQ (re-rank refine × k rows on the raw vectors)")
    p.add_argument("--freshness-trials", type=int, default=5, help="insert-to-searchable trials per system")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--cache-dir", type=Path, default=benchlib.CACHE)
    p.add_argument("--note", default="", help="a line for the report's machine section")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="QPS against clients per k, and insert-to-searchable (PNG)")
    p.add_argument("--render", type=Path, help="re-render the report from a JSON this script wrote; measure nothing")
    return p.parse_args(argv)


log = benchlib.log


def ivf_nlist(factory: str) -> int:
    head = factory.split(",")[0]
    return int(head[3:]) if head.startswith("IVF") and head[3:].isdigit() else 0


# Breadths grow by about 1.5x a step, so a peer matched to feedret's recall overshoots it little.
STEPS = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def chroma_breadths(k: int, n: int) -> list[int]:
    """ef_search values to try, narrowest first (hnswlib searches with max(ef, k))."""
    return sorted({min(n, int(k * f)) for f in STEPS})


def lance_breadths(partitions: int) -> list[int]:
    """nprobes values to try, narrowest first, up to every partition."""
    grid = sorted({int(2 ** i * f) for i in range(20) for f in (1, 1.5)})
    return [p for p in grid if p < partitions] + [partitions]


def ids_of(strings: list[str]) -> np.ndarray:
    return np.fromiter(map(int, strings), np.int64, len(strings))


# ------------------------------------------------------------------ Chroma


class ChromaServer:
    """`chroma run --path <dir> --port <p>` as a subprocess; one HNSW collection of the vectors.

    A running server keeps the ef_search an index was opened with: `collection.modify` stores a
    new one, which takes effect when the index is next opened, so `restart` follows each change.
    """

    def __init__(self, path: Path, log_path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.log_path = log_path
        self.client = None
        self.start()

    def start(self) -> None:
        from feedret.server.launcher import free_port_block

        self.port = free_port_block(1)
        script = Path(sys.executable).parent / "chroma"
        cli = [str(script)] if script.exists() else [
            sys.executable, "-c", "import sys; from chromadb.cli.cli import app; sys.argv[0] = 'chroma'; app()"]
        # close_fds=False lets subprocess use posix_spawn: no fork of this process, whose at-fork
        # hooks (LanceDB's restarts its runtime in the child) would otherwise run before the exec.
        self.proc = subprocess.Popen([*cli, "run", "--path", str(self.path), "--host", "127.0.0.1", "--port",
                                      str(self.port)], stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT,
                                     close_fds=False)

    def restart(self, timeout: float) -> float:
        self.stop()
        self.start()
        return self.wait_ready(timeout)

    def settings(self):
        from chromadb.config import Settings

        return Settings(anonymized_telemetry=False)

    def wait_ready(self, timeout: float) -> float:
        import chromadb

        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chroma run exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                client = chromadb.HttpClient(host="127.0.0.1", port=self.port, settings=self.settings())
                client.heartbeat()
                self.client = client
                return time.monotonic() - started
            except Exception:
                if time.monotonic() - started > timeout:
                    raise
                time.sleep(0.2)

    def load(self, vectors: np.ndarray, args) -> dict:
        c = self.client
        want = {"space": "ip", "max_neighbors": args.chroma_m, "ef_construction": args.chroma_ef_construction}
        try:
            coll = c.get_collection(COLLECTION)
            if coll.count() == len(vectors):
                return {"reused": True, "count": len(vectors)}
            c.delete_collection(COLLECTION)
        except Exception:  # not there (NotFoundError; its class moved between releases)
            pass
        coll = c.create_collection(COLLECTION, embedding_function=None, configuration={"hnsw": {**want, "ef_search": 100}})
        batch = min(args.chroma_batch, c.get_max_batch_size())
        started = time.monotonic()
        for start in range(0, len(vectors), batch):
            block = np.ascontiguousarray(vectors[start : start + batch])
            coll.add(ids=[str(i) for i in range(start, start + len(block))], embeddings=block)
            if start // batch % 20 == 0:
                log(f"  chroma: {start + len(block):,} / {len(vectors):,} added")
        seconds = time.monotonic() - started
        assert coll.count() == len(vectors)
        return {"reused": False, "count": len(vectors), "batch": batch, "insert_s": round(seconds, 1),
                "insert_per_s": round(len(vectors) / seconds)}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# ------------------------------------------------------------------ LanceDB


def lance_rows(ids: np.ndarray, vectors: np.ndarray):
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1), pa.float32())
    return pa.table({"id": pa.array(np.asarray(ids, np.int64), pa.int64()),
                     "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})


def lance_config(args, partitions: int):
    from lancedb.index import IvfFlat, IvfPq, IvfSq

    cls = {"IVF_FLAT": IvfFlat, "IVF_SQ": IvfSq, "IVF_PQ": IvfPq}[args.lance_index]
    return cls(distance_type="dot", num_partitions=partitions)


def lance_load(path: Path, table: str, vectors: np.ndarray, args, partitions: int) -> dict:
    """The table (id, vector) with its vector index, in `path`; reused when complete."""
    import lancedb

    db = lancedb.connect(str(path))
    try:
        t = db.open_table(table)
    except Exception:  # not there
        t = None
    if t is not None:
        if t.count_rows() == len(vectors) and t.list_indices():
            return {"reused": True, "count": len(vectors)}
        db.drop_table(table)
    started = time.monotonic()
    chunk = 65536
    t = db.create_table(table, lance_rows(np.arange(min(chunk, len(vectors))), vectors[:chunk]))
    for start in range(chunk, len(vectors), chunk):
        block = vectors[start : start + chunk]
        t.add(lance_rows(np.arange(start, start + len(block)), block))
    inserted = time.monotonic()
    t.create_index("vector", config=lance_config(args, partitions))
    done = time.monotonic()
    return {"reused": False, "count": len(vectors), "insert_s": round(inserted - started, 1),
            "index_s": round(done - inserted, 1)}


# ------------------------------------------------------------------ measuring


async def recall_of(call, queries: np.ndarray, truth: np.ndarray, k: int, n: int) -> float:
    res = await closed_loop(call, queries[:n], k, 4, n, 0)
    return float(np.mean([benchlib.recall_at(ids, truth[qi], k) for qi, ids in res["found"].items()]))


async def poll_until(found, timeout: float, started: float) -> float:
    """Seconds from `started` until `await found()` is true (nan after `timeout`)."""
    while time.monotonic() - started < timeout:
        if await found():
            return time.monotonic() - started
    return float("nan")


def fresh_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng([seed, 99]).standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def measure(args, spec: DataSpec) -> dict:
    import chromadb
    from kafka import KafkaProducer

    from feedret.clients.client import FeedretClient

    vectors, queries = benchlib.dataset(spec, args.cache_dir)
    truths = {k: benchlib.ground_truth(spec, vectors, queries, k, args.cache_dir) for k in args.k}
    factory = args.index
    partitions = args.lance_partitions or ivf_nlist(factory) or max(1, int(math.sqrt(spec.n)))
    out = {"n": spec.n, "dim": spec.dim, "data": spec.describe(), "queries": spec.queries, "k": args.k,
           "concurrency": args.concurrency, "index": factory, "shards": args.shards, "nprobe": args.nprobe,
           "ef_search": args.ef_search, "workers": args.workers, "rounds": args.rounds, "per_cell": args.per_cell,
           "tune_queries": args.tune_queries, "recall_slack": args.recall_slack, "chroma_m": args.chroma_m,
           "chroma_ef_construction": args.chroma_ef_construction, "lance_index": args.lance_index,
           "lance_partitions": partitions, "lance_refine": args.lance_refine,
           "freshness_trials": args.freshness_trials, "load_before": benchlib.uptime_load(), "cells": [], "tuning": {}}

    log(f"feedret shard snapshots ({factory})")
    snap_dir, counts, info = benchlib.shard_snapshots(spec, vectors, factory, args.shards, args.nprobe,
                                                      args.ef_search, args.cache_dir, log=log)
    out["feedret_load"] = {"shard_posts": counts, "snapshot_build_s": info.get("build_seconds")}
    run_dir = args.cache_dir / "runs" / f"peers-{os.getpid()}"
    benchlib.link_snapshots(snap_dir, run_dir / "snapshots")
    env = {**benchlib.shard_env(factory, run_dir / "snapshots", args.nprobe, args.ef_search),
           "FEEDRET_GRPC_WORKERS": str(args.workers), "FEEDRET_MAX_CONCURRENT_RPCS": str(4 * args.workers)}
    chroma_dir = args.cache_dir / f"chroma-{spec.key}-M{args.chroma_m}-efc{args.chroma_ef_construction}"
    lance_dir = args.cache_dir / f"lancedb-{spec.key}"
    lance_table = f"posts_{args.lance_index.lower()}_{partitions}"
    chroma = None
    # The stack's processes first, before this process has LanceDB's or any client's threads.
    with benchlib.search_stack(run_dir, args.shards, env) as stack:
        try:
            with FeedretClient(stack.config.root_address) as sync_client:
                assert sync_client.stats(timeout=10).total_indexed == spec.n
            chroma = ChromaServer(chroma_dir, run_dir / "chroma.log")
            up = chroma.wait_ready(120)
            log(f"chroma: server up in {up:.1f}s; loading")
            out["chroma_load"] = chroma.load(vectors, args)
            out["chroma_load"]["server_start_s"] = round(up, 1)
            log(f"chroma: {out['chroma_load']}")
            # LanceDB only now: its runtime's threads must not be running when a process is forked.
            import lancedb

            out["lance_load"] = lance_load(lance_dir, lance_table, vectors, args, partitions)
            log(f"lancedb: {out['lance_load']}")
            out["versions"] = (f"chromadb {chromadb.__version__} (server reports {chroma.client.get_version()}), "
                               f"lancedb {lancedb.__version__}")
            pids = {
                "feedret": {name: psutil.Process(p.pid) for name, p in stack.procs.items()},
                "chroma": {"chroma": psutil.Process(chroma.proc.pid)},
                "lancedb": {},
            }
            producer = KafkaProducer(bootstrap_servers=stack.kafka.bootstrap_servers, acks="all", linger_ms=0)
            try:
                asyncio.run(run_all(args, spec, queries, truths, stack, chroma, lance_dir, lance_table, pids,
                                    producer, out))
            finally:
                producer.close()
        finally:
            if chroma is not None:
                chroma.stop()
    shutil.rmtree(run_dir, ignore_errors=True)
    out["load_after"] = benchlib.uptime_load()
    return out


async def run_all(args, spec, queries, truths, stack, chroma, lance_dir, lance_table, pids, producer, out) -> None:
    import chromadb
    import lancedb

    from feedret.clients.client import AsyncFeedretClient

    feedret = AsyncFeedretClient(stack.config.root_address)
    chroma_coll = {}

    async def connect_chroma() -> None:
        client = await chromadb.AsyncHttpClient(host="127.0.0.1", port=chroma.port, settings=chroma.settings())
        chroma_coll["coll"] = await client.get_collection(COLLECTION)

    await connect_chroma()
    adb = await lancedb.connect_async(str(lance_dir))
    table = await adb.open_table(lance_table)
    nprobes = {"value": 1}

    async def call_feedret(q, k):
        return (await feedret.retrieve(vector=q, k=k, timeout=args.timeout)).ids

    async def call_chroma(q, k):
        r = await chroma_coll["coll"].query(query_embeddings=[q], n_results=k, include=["distances"])
        return ids_of(r["ids"][0])

    def lance_query(q, k):
        query = table.query().nearest_to(q).distance_type("dot").nprobes(nprobes["value"]).limit(k)
        if args.lance_refine and args.lance_index != "IVF_FLAT":
            query = query.refine_factor(args.lance_refine)
        return query.select(["id", "_distance"])

    async def call_lance(q, k):
        return (await lance_query(q, k).to_arrow())["id"].to_numpy()

    async def set_ef(ef: int) -> None:
        """Store ef_search on the collection, then restart the server so that it opens the index with it."""
        await chroma_coll["coll"].modify(configuration={"hnsw": {"ef_search": ef}})
        chroma.restart(120)
        pids["chroma"]["chroma"] = psutil.Process(chroma.proc.pid)
        await connect_chroma()
        got = (await chroma_coll["coll"].query(query_embeddings=[queries[0]], n_results=1))["ids"]  # opens the index
        assert got and chroma_coll["coll"].configuration["hnsw"]["ef_search"] == ef, chroma_coll["coll"].configuration

    calls = {"feedret": call_feedret, "chroma": call_chroma, "lancedb": call_lance}
    tq = min(args.tune_queries, len(queries))
    for k in args.k:
        truth = truths[k]
        for call in calls.values():  # warm-up: channels, connections, caches
            await closed_loop(call, queries, k, 4, 16, 0)
        target = await recall_of(call_feedret, queries, truth, k, tq)
        tuning = {"feedret": target, "chroma": [], "lancedb": []}
        for ef in chroma_breadths(k, spec.n):
            await set_ef(ef)
            rec = await recall_of(call_chroma, queries, truth, k, tq)
            tuning["chroma"].append((ef, rec))
            log(f"k={k} chroma ef_search {ef}: recall {rec:.4f} (feedret {target:.4f})")
            if rec >= target - args.recall_slack - 1e-9:
                break
        for probes in lance_breadths(out["lance_partitions"]):
            nprobes["value"] = probes
            rec = await recall_of(call_lance, queries, truth, k, tq)
            tuning["lancedb"].append((probes, rec))
            log(f"k={k} lancedb nprobes {probes}: recall {rec:.4f} (feedret {target:.4f})")
            if rec >= target - args.recall_slack - 1e-9:
                break
        tuning["chroma_ef_search"] = tuning["chroma"][-1][0]
        tuning["lancedb_nprobes"] = nprobes["value"]
        out["tuning"][str(k)] = tuning
        for call in calls.values():
            await closed_loop(call, queries, k, 4, 16, 0)

        for clients in args.concurrency:
            runs = {name: (lambda c, t, st, call=calls[name]: closed_loop(call, queries, k, c, t, st)) for name in SYSTEMS}
            # LanceDB's engine runs in this process: its CPU is the client's.
            row = await timed_cell(runs, pids, k, clients, max(args.per_cell, 4 * clients), args.rounds, len(queries),
                                   truth, in_process={"lancedb"})
            s = row["systems"]
            log(f"k={k} c={clients}: " + ", ".join(
                f"{n} {s[n]['qps']:.0f} q/s p50 {s[n]['p50_ms']:.1f} ms recall {s[n]['recall']:.3f}" for n in SYSTEMS))
            out["cells"].append(row)

    out["freshness"] = await freshness(args, spec, stack, feedret, chroma_coll["coll"], table, producer)
    await feedret.close()


async def freshness(args, spec, stack, feedret, coll, table, producer) -> dict:
    """Insert-to-searchable per system, the systems' order rotating per trial; fresh posts get ids past
    the loaded ones and are deleted from the peers afterwards (their stores are cached between runs)."""
    fresh = fresh_vectors(args.freshness_trials, spec.dim, args.seed)
    base = spec.n + 10_000_000
    res = {name: [] for name in ("feedret_ack", "feedret_lookup", "feedret_search", "chroma_add", "chroma_search",
                                 "lancedb_add", "lancedb_search")}

    async def feedret_trial(pid: int, v: np.ndarray) -> None:
        started = time.monotonic()
        acked = benchlib.publish_vector(stack.kafka.bootstrap_servers, stack.kafka.vectors_topic,
                                        stack.config.num_shards, pid, v, producer)
        res["feedret_ack"].append(acked - started)

        async def looked_up() -> bool:
            return (await feedret.lookup(pid, timeout=5)).found

        async def searched() -> bool:
            return pid in (await feedret.retrieve(vector=v, k=10, timeout=10)).post_ids

        res["feedret_lookup"].append(await poll_until(looked_up, args.timeout, started))
        res["feedret_search"].append(await poll_until(searched, args.timeout, started))

    async def chroma_trial(pid: int, v: np.ndarray) -> None:
        started = time.monotonic()
        await coll.add(ids=[str(pid)], embeddings=[v])
        res["chroma_add"].append(time.monotonic() - started)

        async def searched() -> bool:
            r = await coll.query(query_embeddings=[v], n_results=10, include=["distances"])
            return str(pid) in r["ids"][0]

        res["chroma_search"].append(await poll_until(searched, args.timeout, started))

    async def lance_trial(pid: int, v: np.ndarray) -> None:
        started = time.monotonic()
        await table.add(lance_rows(np.array([pid]), v[None, :]))
        res["lancedb_add"].append(time.monotonic() - started)

        async def searched() -> bool:
            r = await table.query().nearest_to(v).distance_type("dot").limit(10).select(["id", "_distance"]).to_arrow()
            return pid in r["id"].to_pylist()

        res["lancedb_search"].append(await poll_until(searched, args.timeout, started))

    trials = [feedret_trial, chroma_trial, lance_trial]
    for t in range(args.freshness_trials):
        for trial in trials[t % 3:] + trials[: t % 3]:
            await trial(base + t, fresh[t])
        await asyncio.sleep(0.2)
    ids = [base + t for t in range(args.freshness_trials)]
    await coll.delete(ids=[str(i) for i in ids])
    await table.delete(f"id >= {base}")
    log("insert-to-searchable median ms: " + ", ".join(
        f"{name} {np.nanmedian(v) * 1e3:.0f}" for name, v in res.items()))
    return res


# ------------------------------------------------------------------ report


def ms(values: list[float], q: float) -> str:
    v = [x for x in values if x == x]
    return f"{np.percentile(v, q) * 1e3:,.0f}" if v else "-"


def best_peer(systems: dict) -> str:
    return max(PEERS, key=lambda n: systems[n]["qps"])


def verdicts(res: dict) -> list[str]:
    lines = []
    for cell in res["cells"]:
        s = cell["systems"]
        peer = best_peer(s)
        ratio = s["feedret"]["qps"] / s[peer]["qps"]
        recall_ok = s[peer]["recall"] >= s["feedret"]["recall"] - 0.01
        lines.append(
            f"| {cell['k']:,} | {cell['clients']} | {s['feedret']['qps']:,.0f} ({s['feedret']['recall']:.3f}) "
            f"| {s['chroma']['qps']:,.0f} ({s['chroma']['recall']:.3f}) | {s['lancedb']['qps']:,.0f} "
            f"({s['lancedb']['recall']:.3f}) | {LABELS[peer]} | **{ratio:.2f}x** {'✓' if ratio >= 2 else '✗'}"
            f"{'' if recall_ok else ' (peer recall below feedret’s)'} |")
    return lines


def report(res: dict, command: str, machine: list[str]) -> str:
    hi = max(res["concurrency"])
    fr = res["freshness"]
    heads = []
    for k in res["k"]:
        (cell,) = [c for c in res["cells"] if c["k"] == k and c["clients"] == hi]
        s = cell["systems"]
        peer = best_peer(s)
        heads.append(f"k={k:,}: **{s['feedret']['qps'] / s[peer]['qps']:.2f}x** {LABELS[peer]} "
                     f"(recall {s['feedret']['recall']:.3f} / {s[peer]['recall']:.3f})")
    f_search = float(np.nanmedian(fr["feedret_search"]))
    c_search = float(np.nanmedian(fr["chroma_search"]))
    c_add = float(np.nanmedian(fr["chroma_add"]))
    fresh_ok = f_search <= c_search
    tun = res["tuning"]
    slack = res.get("recall_slack", 0.0)
    lines = [
        *benchlib.report_head(
            "feedret vs Chroma (server) and LanceDB: QPS against concurrency at matched recall, and insert-to-searchable",
            f"feedret QPS / best peer's QPS with {hi} clients: {'; '.join(heads)} (goal: ≥ 2x). Insert to "
            f"searchable, median: feedret {f_search * 1e3:,.0f} ms through Kafka, Chroma {c_search * 1e3:,.0f} ms "
            f"(its synchronous add returns in {c_add * 1e3:,.0f} ms), LanceDB "
            f"{float(np.nanmedian(fr['lancedb_search'])) * 1e3:,.0f} ms (goal: feedret no later than Chroma: "
            f"{'✓' if fresh_ok else '✗'}).",
            command,
        ),
        *machine,
        f"- {res.get('versions', '')}",
        f"- load average before → after: {res['load_before']} → {res['load_after']}",
        "",
        "## Setup",
        "",
        f"- data: {res['data']}; {res['queries']} queries (cycled); recall@k against exact inner-product search",
        f"- feedret: {res['shards']} shard servers + root + embedded broker, each its own process, shards loaded "
        f"from snapshots, `{res['index']}`, FEEDRET_NPROBE={res['nprobe']}, FEEDRET_EF_SEARCH={res['ef_search']} "
        f"(floors, widened with k: `ShardIndex.search_breadth`), {res['workers']} gRPC threads per server; "
        "`AsyncFeedretClient.retrieve`",
        f"- Chroma: `chroma run` in its own process, one collection, HNSW space \"ip\", M (`hnsw:M`) "
        f"{res['chroma_m']}, ef_construction (`hnsw:construction_ef`) {res['chroma_ef_construction']}, "
        "ef_search (`hnsw:search_ef`) set per k by `collection.modify` to the narrowest value matching feedret's "
        "recall, the server restarted after each change (a running server keeps the ef_search it opened the "
        "index with); `chromadb.AsyncHttpClient`, `query(n_results=k, include=['distances'])`",
        f"- LanceDB: embedded in the benchmark process (`lancedb.connect_async`, local directory), {res['lance_index']} "
        f"with {res['lance_partitions']} partitions, distance \"dot\""
        + (f", refine_factor {res['lance_refine']}" if res["lance_refine"] and res["lance_index"] != "IVF_FLAT" else "")
        + "; nprobes set per k to the narrowest value matching feedret's recall; "
        "`nearest_to(q).distance_type('dot').nprobes(p).limit(k).select(['id', '_distance'])`",
        f"- recall matching on the first {res['tune_queries']} queries, 4 clients: a peer's narrowest breadth whose "
        f"recall@k is at least feedret's" + (f" minus {res['recall_slack']}" if res.get("recall_slack") else "")
        + f"; timed cells: closed loop "
        f"(`concurrency_sweep.closed_loop`, asyncio tasks in this process), max({res['per_cell']}, 4 × clients) "
        f"queries per system per round, {res['rounds']} rounds, the systems' order rotating per round",
        "",
        "## Targets (issue #18): QPS at matched recall",
        "",
        "QPS (recall@k measured in the same cell) per system; the ratio is feedret's over the faster peer's.",
        "",
        "| k | clients | feedret | Chroma | LanceDB | faster peer | feedret / peer (≥ 2) |",
        "|---:|---:|---:|---:|---:|---|---:|",
        *verdicts(res),
        "",
        "Search breadth chosen (recall@k on the tuning queries; feedret's is the target"
        + (f", less {slack}" if slack else "") + "):",
        "",
    ]
    def chose(tried: list, target: float) -> str:
        breadth, recall = tried[-1]
        return f"chose {breadth}" + ("" if recall >= target - slack - 1e-9
                                     else ", the widest tried: feedret's recall not reached")

    for k in res["k"]:
        t = tun[str(k)]
        lines.append(f"- k={int(k):,}: feedret {t['feedret']:.3f}; Chroma ef_search " + ", ".join(
            f"{e} → {r:.3f}" for e, r in t["chroma"]) + f" ({chose(t['chroma'], t['feedret'])}); LanceDB nprobes "
            + ", ".join(f"{p} → {r:.3f}" for p, r in t["lancedb"]) + f" ({chose(t['lancedb'], t['feedret'])})")
    for k in res["k"]:
        lines += ["", f"## k = {int(k):,}", "",
                  "| system | clients | queries/s | p50 ms | p99 ms | recall@k | server CPU ms / query "
                  "| client CPU ms / query |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name in SYSTEMS:
            for cell in (c for c in res["cells"] if c["k"] == k):
                s = cell["systems"][name]
                lines.append(f"| {LABELS[name]} | {cell['clients']} | {s['qps']:,.0f} | {s['p50_ms']:.1f} | "
                             f"{s['p99_ms']:.1f} | {s['recall']:.3f} | {s['server_cpu_ms']:.2f} | "
                             f"{s['client_cpu_ms']:.2f} |")
    lines += [
        "",
        "Server CPU: every process of the system (feedret: broker, shards and root; Chroma: its server) over its "
        "turns, per query; LanceDB runs inside the benchmark process, so its figure is that process's (engine and "
        "client together) and its client column is 0. Client CPU: the benchmark process over the system's turns.",
        "",
        "## Insert to searchable (ms)",
        "",
        f"{res['freshness_trials']} trials per system, the systems alternating, each from just before the write, "
        "with no query load. feedret: a PostVectorEvent produced to `post-vectors` (acks=all, the post's shard "
        "partition, as the consumer publishes it), consumed by the shard from Kafka; polled with Lookup through "
        "the root, then with a search for the vector. Chroma: one `add` (returns when the server has written it); "
        "LanceDB: one `add` (a new fragment, searched by a flat scan until re-indexed); each polled with a search "
        "for the vector.",
        "",
        "| system | write returns: p50 / max | searchable: p50 / max | Lookup finds it: p50 / max |",
        "|---|---:|---:|---:|",
        f"| feedret | {ms(fr['feedret_ack'], 50)} / {ms(fr['feedret_ack'], 100)} (broker ack) "
        f"| {ms(fr['feedret_search'], 50)} / {ms(fr['feedret_search'], 100)} "
        f"| {ms(fr['feedret_lookup'], 50)} / {ms(fr['feedret_lookup'], 100)} |",
        f"| Chroma | {ms(fr['chroma_add'], 50)} / {ms(fr['chroma_add'], 100)} "
        f"| {ms(fr['chroma_search'], 50)} / {ms(fr['chroma_search'], 100)} | - |",
        f"| LanceDB | {ms(fr['lancedb_add'], 50)} / {ms(fr['lancedb_add'], 100)} "
        f"| {ms(fr['lancedb_search'], 50)} / {ms(fr['lancedb_search'], 100)} | - |",
        "",
        "## Loading (not compared)",
        "",
        f"- feedret: shard snapshots written directly ({res['feedret_load']})",
        f"- Chroma: {res['chroma_load']}",
        f"- LanceDB: {res['lance_load']}",
        "",
    ]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = res["k"]
    fig, axes = plt.subplots(1, len(ks) + 1, figsize=(4.4 * (len(ks) + 1), 3.8), squeeze=False)
    for ax, k in zip(axes[0], ks):
        cells = [c for c in res["cells"] if c["k"] == k]
        for name in SYSTEMS:
            rec = np.mean([c["systems"][name]["recall"] for c in cells])
            ax.plot([c["clients"] for c in cells], [c["systems"][name]["qps"] for c in cells], marker="o",
                    label=f"{LABELS[name]} (recall {rec:.3f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"k = {k:,}")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("queries / s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fr = res["freshness"]
    b = axes[0][-1]
    names = ["feedret_ack", "feedret_search", "chroma_add", "chroma_search", "lancedb_add", "lancedb_search"]
    b.bar(range(len(names)), [float(np.nanmedian(fr[n])) * 1e3 for n in names],
          color=["C0", "C0", "C1", "C1", "C2", "C2"])
    b.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
    b.set_ylabel("median ms from the write")
    b.set_title("insert: write returns / searchable")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.render:
        payload = json.loads(args.render.read_text())
        res = payload["result"]
        benchlib.write_outputs(report(res, payload["command"], payload["machine"]), args.out, None, payload)
        if args.plot:
            plot(res, args.plot)
        return res
    # Looked up, not imported: LanceDB must not be imported before the stack's processes are forked.
    if not all(importlib.util.find_spec(name) for name in ("chromadb", "lancedb")):
        raise SystemExit("peer_compare needs chromadb and lancedb: pip install -e '.[bench]'")
    args.k = args.k or [100, 2000]
    args.concurrency = sorted(args.concurrency or [1, 4, 16, 64])
    command = benchlib.command_line(__file__, argv)
    machine = benchlib.machine_lines() + ([f"- {args.note}"] if args.note else [])
    spec = DataSpec(n=args.n, dim=args.dim, queries=args.queries, seed=args.seed, kind=args.data)
    log(f"data: {spec.describe()}")
    res = measure(args, spec)
    benchlib.write_outputs(report(res, command, machine), args.out, args.json,
                           {"command": command, "machine": machine, "result": res})
    if args.plot:
        plot(res, args.plot)
    return res


if __name__ == "__main__":
    main()

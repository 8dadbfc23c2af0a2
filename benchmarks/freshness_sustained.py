"""Publish to searchable under sustained ingest, through the whole pipeline.

One stack (embedded broker, embedding consumer with the committed model, 2 shards,
root). Posts are published at a steady rate for a while, each carrying its send
time as `created_at`; once all are indexed, each post's Lookup gives the time its
shard applied it (`indexed_at`, searchable from then on), so nothing polls while the
load runs. Each rate (--rate, repeatable; the first is the baseline) runs in turn on
the same stack, then again while --query-threads clients send member queries:

    python benchmarks/freshness_sustained.py --rate 5 --rate 50 --seconds 60 --query-threads 4 --out benchmarks/results/freshness_sustained.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from kafka import KafkaProducer  # noqa: E402

from feedret.clients.client import FeedretClient  # noqa: E402
from feedret.members import MemberProfile  # noqa: E402
from feedret.server.launcher import Stack  # noqa: E402

SAMPLE_POSTS = benchlib.ROOT / "data" / "sample" / "posts.jsonl"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, action="append", help="posts per second; repeatable (default 5 and 50)")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--query-threads", type=int, default=0,
                   help="also serve member queries from this many closed-loop clients while ingesting (a second run per rate)")
    p.add_argument("--note", default="")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def run_rate(stack: Stack, client: FeedretClient, rate: float, seconds: float, first_id: int,
             templates: list[dict], query_threads: int = 0) -> dict:
    stop = threading.Event()
    served = [0]
    members = [MemberProfile.from_json(json.loads(line))
               for line in (SAMPLE_POSTS.parent / "members.jsonl").read_text().splitlines() if line.strip()]

    def query() -> None:
        with FeedretClient(stack.config.root_address) as c:
            i = 0
            while not stop.is_set():
                c.retrieve(member=members[i % len(members)], k=100, timeout=5)
                served[0] += 1
                i += 1

    threads = [threading.Thread(target=query, daemon=True) for _ in range(query_threads)]
    for t in threads:
        t.start()
    producer = KafkaProducer(**stack.kafka.client_options(), acks="all", linger_ms=0)
    n = int(rate * seconds)
    started = time.monotonic()
    try:
        for i in range(n):
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
            post = {**templates[i % len(templates)], "post_id": first_id + i, "created_at": time.time()}
            producer.send(stack.kafka.posts_topic, key=str(first_id + i).encode(), value=json.dumps(post).encode())
        producer.flush()
    finally:
        producer.close()
        stop.set()
        for t in threads:
            t.join(30)
    sent_s = time.monotonic() - started
    ages = []
    deadline = time.monotonic() + 300
    for i in range(n):
        while True:
            found = client.lookup(first_id + i, timeout=5)
            if found.found:
                ages.append(found.indexed_at - found.created_at)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"post {first_id + i} not indexed within 300 s of the last send")
            time.sleep(0.05)
    ms = np.asarray(ages) * 1000
    return {"rate": rate, "query_threads": query_threads, "queries_per_s": served[0] / sent_s, "posts": n, "publish_s": sent_s, "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
            "over_1s": int((ms > 1000).sum())}


def main(argv=None) -> int:
    args = parse_args(argv)
    rates = args.rate or [5.0, 50.0]
    templates = [json.loads(line) for line in SAMPLE_POSTS.read_text().splitlines()[:500]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="feedret-fresh-") as tmp:
        with benchlib.pipeline_stack(Path(tmp)) as stack, FeedretClient(stack.config.root_address) as client:
            run_rate(stack, client, 5, 4, 7_000_000_000, templates)  # warm: consumer's first batches, channels
            runs = [(rate, 0) for rate in rates] + ([(rate, args.query_threads) for rate in rates] if args.query_threads else [])
            for r, (rate, threads) in enumerate(runs):
                rows.append(run_rate(stack, client, rate, args.seconds, 7_100_000_000 + r * 10_000_000, templates, threads))
                print(rows[-1], flush=True)
    base_row = rows[0]
    summary = "; ".join(f"at {r['rate']:g} posts/s for {args.seconds:g} s"
                        + (f" while serving {r['queries_per_s']:.0f} member queries/s" if r["query_threads"] else "")
                        + f", p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms "
                        f"({r['p99_ms'] / base_row['p99_ms']:.1f}x the p99 at {base_row['rate']:g}/s), "
                        f"{r['over_1s']} of {r['posts']} over 1 s" for r in rows)
    lines = benchlib.report_head("Publish to searchable under sustained ingest", summary + ".",
                                 benchlib.command_line(__file__, argv))
    lines += benchlib.machine_lines() + [
        f"- load average at the end: {benchlib.uptime_load()}",
        *([f"- {args.note}"] if args.note else []),
        "- stack: embedded tansu broker, the embedding consumer and the member service with the committed "
        "tiny model (FEEDRET_TORCH_THREADS=1), 2 Flat shards, root; today's defaults otherwise",
        "- each post's age when its shard applied it (`indexed_at` − `created_at`, both wall clock on this "
        "machine); the post is searchable from then on",
        "",
        "| rate (posts/s) | member queries served meanwhile | posts | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) | over 1 s | p99 vs the first row |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        serving = f"{r['queries_per_s']:.0f}/s ({r['query_threads']} clients)" if r["query_threads"] else "none"
        lines.append(f"| {r['rate']:g} | {serving} | {r['posts']} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['max_ms']:.0f} | {r['over_1s']} | {r['p99_ms'] / base_row['p99_ms']:.2f} |")
    benchlib.write_outputs("\n".join(lines) + "\n", args.out, args.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A model rollout under load: query latency before, during and after it, and the backfill's pace.

One `feedret up`-style stack (broker, consumer, member service, 2 shards, root; the
committed tiny model) holds --posts posts. Throughout, posts keep arriving
(--publish-rate per second, new ids) and one closed-loop client sends member
queries to the root. Four phases, timed in the same run:

- steady: nothing else happens (--phase-s seconds); the baseline;
- backfill: a new generation (--model-b, --next-shards shards) is started beside the
  serving one (Stack.start_generation, as `feedret rollout start`) and re-embeds every
  post from `posts` while serving and ingestion go on: its posts/s, and query latency
  while it runs, until it indexes as many posts as the serving generation;
- both: the two generations both live and caught up (--phase-s);
- promoted: after the promote (the root's generations file switched), the old
  generation retired after --grace-s (--phase-s).

Every query failure is counted; a reply of another model than the phase's is too.

    python benchmarks/rollout.py --out benchmarks/results/rollout.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

import grpc  # noqa: E402

from feedret.clients.client import FeedretClient  # noqa: E402
from feedret.clients.publish import publish_lines  # noqa: E402
from feedret.members import MemberProfile  # noqa: E402
from feedret.server.launcher import Stack  # noqa: E402
from feedret.v1 import feedret_pb2 as pb  # noqa: E402
from feedret.v1 import feedret_pb2_grpc as pb_grpc  # noqa: E402

SAMPLE = benchlib.ROOT / "data" / "sample"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--posts", type=int, default=20_000, help="the corpus the new generation re-embeds")
    p.add_argument("--model-b", type=Path, default=benchlib.ROOT / "models" / "feedret-tiny-llama")
    p.add_argument("--next-shards", type=int, default=3)
    p.add_argument("--publish-rate", type=float, default=20.0, help="new posts per second, throughout")
    p.add_argument("--phase-s", type=float, default=30.0, help="length of the steady, both and promoted phases")
    p.add_argument("--grace-s", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=1800.0, help="the backfill's limit")
    p.add_argument("--note", default="", help="a line for the report's machine section (what else ran)")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def corpus(n: int, first_id: int) -> list[str]:
    """n post events: the sample's posts, cycled, under new ids (so a longer corpus is not a smaller one)."""
    lines = (SAMPLE / "posts.jsonl").read_text(encoding="utf-8").splitlines()
    out = []
    for i in range(n):
        obj = json.loads(lines[i % len(lines)])
        obj["post_id"] = first_id + i
        obj["text"] = f"{obj['text']} (#{i // len(lines)})" if i >= len(lines) else obj["text"]
        out.append(json.dumps(obj))
    return out


def fleet_indexed(addresses: str) -> int:
    total = 0
    for target in addresses.split(","):
        with grpc.insecure_channel(target) as channel:
            try:
                total += pb_grpc.IndexAdminStub(channel).Stats(pb.StatsRequest(), timeout=2).total_indexed
            except grpc.RpcError:
                return -1
    return total


class Load:
    """Posts published at a steady rate and member queries in a closed loop, each reply tagged with the phase."""

    def __init__(self, stack: Stack, rate: float) -> None:
        self.stack, self.rate = stack, rate
        self.phase = "warmup"
        self.records: list[tuple[str, float, str]] = []  # (phase, seconds, model or "FAILED <code>")
        self.published = 0
        self._stop = threading.Event()
        members = [json.loads(line) for line in (SAMPLE / "members.jsonl").read_text().splitlines() if line.strip()]
        self.members = [MemberProfile.from_json(m) for m in members]
        self.threads = [threading.Thread(target=self._publish, daemon=True),
                        threading.Thread(target=self._query, daemon=True)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _publish(self) -> None:
        template = json.loads(corpus(1, 0)[0])
        i = 0
        while not self._stop.wait(1 / self.rate):
            publish_lines(self.stack.kafka, [json.dumps({**template, "post_id": 8_000_000_000 + i,
                                                          "created_at": time.time(), "text": f"new post {i}"})])
            i += 1
            self.published = i

    def _query(self) -> None:
        with FeedretClient(self.stack.config.root_address) as client:
            i = 0
            while not self._stop.is_set():
                member = self.members[i % len(self.members)]
                i += 1
                started = time.perf_counter()
                try:
                    result = client.retrieve(member=member, k=100, timeout=5)
                    outcome = result.model_version if not result.partial else "PARTIAL"
                except grpc.RpcError as exc:
                    outcome = f"FAILED {exc.code().name}"
                self.records.append((self.phase, time.perf_counter() - started, outcome))


def phase_rows(records, phases) -> list[dict]:
    rows = []
    for phase in phases:
        times = [s * 1000 for p, s, o in records if p == phase and not o.startswith(("FAILED", "PARTIAL"))]
        outcomes = [o for p, _, o in records if p == phase]
        rows.append({
            "phase": phase, "queries": len(outcomes),
            "failed": sum(o.startswith(("FAILED", "PARTIAL")) for o in outcomes),
            "models": sorted({o for o in outcomes if not o.startswith(("FAILED", "PARTIAL"))}),
            "p50_ms": benchlib.pct(times, 50) if times else float("nan"),
            "p99_ms": benchlib.pct(times, 99) if times else float("nan"),
        })
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from feedret.encoder.model import open_model_dir

    _, meta_b = open_model_dir(args.model_b)
    with tempfile.TemporaryDirectory(prefix="feedret-rollout-") as tmp:
        with benchlib.pipeline_stack(Path(tmp), ready_timeout_s=300) as stack, \
                FeedretClient(stack.config.root_address) as client:
            config = stack.config
            started = time.monotonic()
            publish_lines(stack.kafka, corpus(args.posts, 1_000_000_000))
            while client.stats().total_indexed < args.posts:
                time.sleep(0.2)
            first_ingest_s = time.monotonic() - started
            print(f"{args.posts} posts indexed in {first_ingest_s:.1f} s", flush=True)
            with Load(stack, args.publish_rate) as load:
                time.sleep(3)  # connections and caches warm
                load.phase = "steady"
                time.sleep(args.phase_s)
                load.phase = "backfill"
                started = time.monotonic()
                gen = stack.start_generation(str(args.model_b), meta_b.model_version, args.next_shards, 300)
                up_s = time.monotonic() - started
                addresses = gen.shard_addresses(config.host)
                while True:
                    serving, nxt = client.stats().total_indexed, fleet_indexed(addresses)
                    if nxt >= serving >= args.posts:
                        break
                    if time.monotonic() - started > args.timeout:
                        raise RuntimeError(f"the backfill did not finish within {args.timeout:.0f} s ({nxt} of {serving})")
                    time.sleep(0.2)
                backfill_s = time.monotonic() - started
                backfilled = nxt
                print(f"backfill: {backfilled} posts in {backfill_s:.1f} s (processes up after {up_s:.1f} s)", flush=True)
                load.phase = "both"
                time.sleep(args.phase_s)
                load.phase = "promote"
                stack.promote(args.grace_s)
                while client.stats().model_version != meta_b.model_version:
                    time.sleep(0.05)
                load.phase = "promoted"
                time.sleep(args.grace_s + 1)
                retired = stack.retire_due()
                time.sleep(max(args.phase_s - args.grace_s - 1, 1))
                published = load.published
            records = list(load.records)
    rows = phase_rows(records, ["steady", "backfill", "both", "promote", "promoted"])
    steady = rows[0]
    command = benchlib.command_line(__file__, argv)
    lines = benchlib.report_head(
        "A model rollout under load",
        f"Backfill of {backfilled} posts by a new generation ({meta_b.model_version}, {args.next_shards} shards) "
        f"beside the serving one: {backfilled / (backfill_s - up_s):.0f} posts/s once its processes were up, while {args.publish_rate:g} new posts/s "
        f"were ingested and member queries served; query p99 {rows[1]['p99_ms'] / steady['p99_ms']:.2f}x steady "
        f"during it, p50 {rows[1]['p50_ms'] / steady['p50_ms']:.2f}x; "
        f"{sum(r['failed'] for r in rows)} queries failed of {sum(r['queries'] for r in rows)}.",
        command,
    )
    lines += benchlib.machine_lines() + [
        f"- load average at the end: {benchlib.uptime_load()}",
        *([f"- {args.note}"] if args.note else []),
        "- stack: embedded tansu broker, consumer, member service, 2 Flat shards, root; the committed "
        "tiny model (serving) and the rollout's model, FEEDRET_TORCH_THREADS=1 per process",
        f"- corpus: {args.posts} posts (the sample's, cycled under new ids), first indexed in {first_ingest_s:.1f} s "
        "with nothing else running; one closed-loop client of member queries (k=100, a sample member each, "
        f"its session cache warm after the first round), {args.publish_rate:g} new posts/s throughout "
        f"({published} in all)",
        "",
        "## Query latency by phase (member queries through the root, ms)",
        "",
        "| phase | queries | failed | models answering | p50 | p99 | p50 / steady | p99 / steady |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['queries']} | {r['failed']} | {', '.join(r['models'])} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['p50_ms'] / steady['p50_ms']:.2f} | {r['p99_ms'] / steady['p99_ms']:.2f} |")
    lines += [
        "",
        "## Backfill",
        "",
        "| | value |",
        "|---|---:|",
        f"| new generation's processes SERVING after | {up_s:.1f} s |",
        f"| posts re-embedded and indexed | {backfilled} |",
        f"| from start to holding every post | {backfill_s:.1f} s |",
        f"| backfill rate once its processes were up, while serving and ingesting | {backfilled / (backfill_s - up_s):.0f} posts/s |",
        f"| the same, from `start` (model loading included) | {backfilled / backfill_s:.0f} posts/s |",
        f"| the same corpus first ingested, nothing else running | {args.posts / first_ingest_s:.0f} posts/s |",
        f"| old generation retired after the promote | {'yes' if retired else 'no'} |",
        "",
        "Phases: steady = before the rollout; backfill = from `start` until the new generation indexes as many "
        "posts as the serving one; both = both live and caught up; promote = until the root answered with the "
        "new model; promoted = after it, the old generation retired after its grace period. On this 2-core "
        "machine the new generation's embedding competes with serving for the same cores: the backfill "
        "phase's latency is that contention, which separate nodes (Kubernetes) do not have.",
    ]
    benchlib.write_outputs("\n".join(lines) + "\n", args.out, args.json,
                           {"rows": rows, "backfill_s": backfill_s, "backfilled": backfilled, "up_s": up_s,
                            "first_ingest_s": first_ingest_s})
    return 0 if not sum(r["failed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

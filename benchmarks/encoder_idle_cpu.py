"""CPU per request of the member embedding service's encoder, with idle threads spinning or sleeping.

A member embedding service embeds one member at a time as requests arrive. Between
requests its intra-op threads (torch's OpenMP team, onnxruntime's pool) either spin
for the next one (OpenMP's and onnxruntime's defaults) or sleep
(`FEEDRET_SPIN_WAIT=false`). For each backend and each policy this
starts a fresh process (OpenMP reads its wait policy once, when torch loads), loads
the encoder through `load_encoder` as `feedret serve member` does, embeds one member
prompt every `--interval-ms`, and reads the process's CPU time around the timed part.

    python benchmarks/encoder_idle_cpu.py --out benchmarks/results/encoder_idle_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "feedret-movielens-tiny")
    p.add_argument("--wide", action="store_true",
                   help="measure benchlib.wide_model(--model-dir): 4 layers x 512, where the forward pass dominates")
    p.add_argument("--backend", action="append", choices=["torch", "onnx"], help="repeatable (default both)")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--interval-ms", type=float, default=5.0, help="time between one reply and the next request")
    p.add_argument("--batch", type=int, default=64, help="posts per micro-batch in the consumer's measurement")
    p.add_argument("--batches", type=int, default=40, help="micro-batches embedded back to back")
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per backend and policy")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement, as JSON on stdout
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    import numpy as np

    from feedret.config import EncoderConfig
    from feedret.events import PostEvent
    from feedret.members import ActivityItem, MemberProfile
    from feedret.encoder.loader import load_encoder

    backend, spin = args.child.split(":")
    encoder = load_encoder(EncoderConfig(backend=backend, model_dir=args.model_dir, spin_wait=spin == "spin"))
    members = [
        MemberProfile(member_id=str(i), features={"connections": float(i * 37 % 900)},
                      recent_activity=tuple(ActivityItem(post_id=j, text=f"a film about {j} things", action="like")
                                            for j in range(i % 7)))
        for i in range(args.requests)
    ]
    for m in members[:20]:
        encoder.embed_members([m])
    latency = []
    cpu0 = time.process_time()
    for m in members:
        started = time.perf_counter()
        encoder.embed_members([m])
        latency.append(time.perf_counter() - started)
        time.sleep(args.interval_ms / 1000)
    cpu = time.process_time() - cpu0
    # The consumer's side: micro-batches of posts back to back, as during a backlog.
    posts = [PostEvent(post_id=i, op="upsert", text=f"a film about space travel and friendship, part {i}",
                       created_at=time.time() - i * 60, lang="en", features={"likes": float(i % 50)})
             for i in range(args.batch)]
    encoder.embed_posts(posts)
    started = time.perf_counter()
    for _ in range(args.batches):
        encoder.embed_posts(posts)
    posts_per_s = args.batch * args.batches / (time.perf_counter() - started)
    print(json.dumps({"p50_ms": float(np.percentile(latency, 50)) * 1e3, "p99_ms": float(np.percentile(latency, 99)) * 1e3,
                      "cpu_ms_per_request": cpu / len(members) * 1e3, "posts_per_s": posts_per_s,
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))


def measure(args: argparse.Namespace, backend: str, spin: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "FEEDRET_SPIN_WAIT")}
    out = subprocess.run([sys.executable, __file__, "--child", f"{backend}:{spin}", "--model-dir", str(args.model_dir),
                          "--requests", str(args.requests), "--interval-ms", str(args.interval_ms),
                          "--batch", str(args.batch), "--batches", str(args.batches)],
                         env=env, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.wide:
        args.model_dir = benchlib.wide_model(args.model_dir)
    if args.child:
        child(args)
        return {}
    command = benchlib.command_line(__file__, argv)
    backends = args.backend or ["torch", "onnx"]
    runs: dict[str, list[dict]] = {}
    load_before = benchlib.uptime_load()
    for _ in range(args.repeats):
        for backend in backends:  # alternating, so machine noise hits both policies alike
            for spin in ("sleep", "spin"):
                runs.setdefault(f"{backend}:{spin}", []).append(measure(args, backend, spin))
    load_after = benchlib.uptime_load()

    def mid(key: str, field: str) -> float:
        values = sorted(r[field] for r in runs[key])
        return values[len(values) // 2]

    rows, ratios, rates = [], [], []
    for backend in backends:
        s, p = f"{backend}:spin", f"{backend}:sleep"
        ratios.append(f"{backend} **{mid(s, 'cpu_ms_per_request') / mid(p, 'cpu_ms_per_request'):.1f}x**")
        rates.append(f"{backend} {mid(p, 'posts_per_s') / mid(s, 'posts_per_s'):.2f}")
        for key in (p, s):
            cpu = ", ".join(f"{r['cpu_ms_per_request']:.2f}" for r in runs[key])
            p50 = ", ".join(f"{r['p50_ms']:.2f}" for r in runs[key])
            p99 = ", ".join(f"{r['p99_ms']:.2f}" for r in runs[key])
            rate = ", ".join(f"{r['posts_per_s']:,.0f}" for r in runs[key])
            how = {"torch": runs[key][0]["omp_wait_policy"] or "OpenMP's default", "onnx": "allow_spinning "
                   + ("1" if key.endswith("spin") else "0")}[backend]
            rows.append(f"| {backend} | {key.split(':')[1]} ({how}) | {cpu} | {p50} | {p99} | {rate} |")
    lines = [
        *benchlib.report_head(
            "Encoder idle threads spinning vs sleeping: CPU per member request, consumer throughput",
            f"Member requests, CPU per request spinning over sleeping (median of {args.repeats} processes): "
            f"{', '.join(ratios)}. Consumer throughput, sleeping over spinning: {', '.join(rates)}.",
            command,
        ),
        *benchlib.machine_lines(),
        f"- load average before → after: {load_before} → {load_after}",
        "",
        "## Setup",
        "",
        f"- model: `{os.path.relpath(args.model_dir, ROOT)}`, loaded by `load_encoder` as `feedret serve member` does; "
        f"{args.requests} members (a feature and up to 6 liked posts each), one per request, {args.interval_ms:g} ms between a reply and the next request; "
        f"then, as the consumer does during a backlog, {args.batches} micro-batches of {args.batch} posts back to back",
        "- each row: a fresh process (OpenMP reads its wait policy when torch loads); "
        "`spin` = `FEEDRET_SPIN_WAIT=true`, the default (torch: OpenMP's own bounded spin, "
        "OMP_WAIT_POLICY unset; onnxruntime: allow_spinning 1, its default), `sleep` = `FEEDRET_SPIN_WAIT=false`, "
        "(OMP_WAIT_POLICY=PASSIVE, allow_spinning 0)",
        "",
        "## Results (one figure per process, in run order)",
        "",
        "| backend | idle threads | member requests: CPU ms per request | p50 ms | p99 ms | consumer: posts/s, batches back to back |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
    ]
    benchlib.write_outputs("\n".join(lines) + "\n", args.out, args.json, {"command": command, "runs": runs})
    return runs


if __name__ == "__main__":
    main()

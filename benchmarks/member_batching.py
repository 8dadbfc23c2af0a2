"""Throughput of the member embedding service under concurrent cache misses, with and without batching.

Two member servers (`feedret serve member`, real gRPC, the same model and backend)
run side by side: `FEEDRET_EMBED_BATCH_MAX=1` (every miss gets a forward pass of its
own, one at a time: the service as it was, the baseline) and the default (misses that
queue behind a pass are embedded together in the next one). Closed-loop client threads
send members from the sample data, each with a fresh session id so every request is a
miss; at each concurrency the two servers are measured in turn, in the same run.
Reports requests/s, latency percentiles, the servers' CPU per request and the mean
members per forward pass (from each server's /metrics).

With one client there is nothing to batch (each request is alone in its pass on both
servers), so that row is the control: its ratio says how far apart the two servers
measure without batching in this run, not a speedup. Ratios are compared only where
the batching server's passes held more than one member.

    python benchmarks/member_batching.py --out benchmarks/results/member_batching_cpu.md

`--wide` adds a randomly initialised model 4x wider and 4 layers deep on the same
tokenizer and prompts, where the forward pass, not the per-call overhead, dominates.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from feedret.config import DEFAULT_MODEL_DIR  # noqa: E402
from feedret.members import MemberProfile  # noqa: E402
from feedret.server.launcher import free_port_block, is_serving  # noqa: E402
from feedret.v1 import feedret_pb2 as pb  # noqa: E402
from feedret.v1 import feedret_pb2_grpc as pb_grpc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = ROOT / "data" / "sample" / "members.jsonl"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--wide", action="store_true", help="also measure a wider random model (compute-bound)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    p.add_argument("--concurrency", default="1,4,16,64", help="client threads, comma-separated")
    p.add_argument("--seconds", type=float, default=6.0, help="measured time per server and concurrency")
    p.add_argument("--batch-max", type=int, default=32, help="FEEDRET_EMBED_BATCH_MAX of the batching server")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


class MemberServer:
    def __init__(self, name: str, model_dir: Path, backend: str, batch_max: int, port: int, metrics_port: int,
                 log_dir: Path) -> None:
        self.name, self.port, self.metrics_port = name, port, metrics_port
        env = dict(os.environ, FEEDRET_MODEL_DIR=str(model_dir), FEEDRET_BACKEND=backend,
                   FEEDRET_EMBED_BATCH_MAX=str(batch_max), FEEDRET_PORT=str(port),
                   FEEDRET_METRICS_PORT=str(metrics_port), FEEDRET_LOG_LEVEL="warning")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(log_dir / f"{name}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "feedret.clients.cli", "serve", "member"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 300
        while not is_serving(self.address):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {self.log.name}")
            time.sleep(0.2)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def batch_totals(self) -> tuple[float, float]:
        """(members embedded, forward passes) so far, from the server's /metrics."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        values = {s.name: s.value for family in text_string_to_metric_families(text)
                  if family.name == "feedret_member_embed_batch_members" for s in family.samples}
        return (values.get("feedret_member_embed_batch_members_sum", 0.0),
                values.get("feedret_member_embed_batch_members_count", 0.0))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def requests_from(members: list[dict]) -> list[pb.EmbedRequest]:
    out = []
    for m in members:
        req = pb.EmbedRequest()
        MemberProfile.from_json(m).fill_proto(req.member)
        out.append(req)
    return out


_SESSIONS = itertools.count()  # one sequence per run: a session id never repeats, so every request misses


def measure(server: MemberServer, templates: list[pb.EmbedRequest], concurrency: int, seconds: float) -> dict:
    """Closed loop: `concurrency` threads, each sending its next miss as soon as the last reply lands."""
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.MemberEmbeddingServiceStub(channel)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    failures = [0]
    stop_at = [0.0]
    barrier = threading.Barrier(concurrency + 1)

    def client(slot: int) -> None:
        barrier.wait()
        while time.perf_counter() < stop_at[0]:
            n = next(_SESSIONS)
            req = pb.EmbedRequest()
            req.CopyFrom(templates[n % len(templates)])
            req.member.session_id = f"bench-{server.name}-{n}"
            t0 = time.perf_counter()
            try:
                stub.Embed(req, timeout=60)
            except grpc.RpcError:
                failures[0] += 1
                continue
            latencies[slot].append(time.perf_counter() - t0)

    # Warm-up: the first passes of each batch shape are slower.
    for req in templates[:8]:
        stub.Embed(req, timeout=60)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    members0, passes0 = server.batch_totals()
    cpu0 = server.cpu_s()
    started = time.perf_counter()
    stop_at[0] = started + seconds
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    cpu = server.cpu_s() - cpu0
    members1, passes1 = server.batch_totals()
    channel.close()
    done = sorted(x for per in latencies for x in per)
    return {
        "requests": len(done),
        "failures": failures[0],
        "rps": len(done) / elapsed,
        "p50_ms": benchlib.pct(done, 50) * 1e3,
        "p99_ms": benchlib.pct(done, 99) * 1e3,
        "cpu_ms_per_request": cpu / max(len(done), 1) * 1e3,
        "members_per_pass": (members1 - members0) / max(passes1 - passes0, 1),
    }


def run_model(label: str, model_dir: Path, args: argparse.Namespace, templates, levels: list[int]) -> list[dict]:
    base = free_port_block(4)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "feedret-member-batching"
    servers = {
        "alone": MemberServer("alone", model_dir, args.backend, 1, base, base + 1, logs),
        "batched": MemberServer("batched", model_dir, args.backend, args.batch_max, base + 2, base + 3, logs),
    }
    rows = []
    try:
        for c in levels:
            row = {"model": label, "concurrency": c}
            for name in ("alone", "batched"):
                row[name] = measure(servers[name], templates, c, args.seconds)
                print(f"{label} c={c} {name}: {json.dumps(row[name])}", flush=True)
            rows.append(row)
    finally:
        for s in servers.values():
            s.stop()
    return rows


# A batching server whose passes average at most this many members did not batch.
BATCHED_MIN_MEMBERS_PER_PASS = 1.05
# A control further than this from 1.0 means the two servers were not measured alike.
CONTROL_TOLERANCE = 0.15


def batching_happened(row: dict) -> bool:
    return row["concurrency"] > 1 and row["batched"]["members_per_pass"] > BATCHED_MIN_MEMBERS_PER_PASS


def summarize(rows: list[dict]) -> str:
    """The report's one-line result: batched over one at a time only where passes held several members.

    A row where both servers ran one member per pass (one client, or misses that never
    overlapped) has nothing batched to compare; it is reported as the control, and a
    control far from 1.0 is flagged, since then every other ratio of the run is suspect.
    """
    compared: dict[str, list[str]] = {}
    controls: dict[str, list[str]] = {}
    odd = []
    for r in rows:
        ratio = r["batched"]["rps"] / r["alone"]["rps"]
        if batching_happened(r):
            compared.setdefault(r["model"], []).append(
                f"{ratio:.2f} ({r['concurrency']}, {r['batched']['members_per_pass']:.1f} per pass)")
        else:
            controls.setdefault(r["model"], []).append(f"{ratio:.2f} ({r['concurrency']})")
            if abs(ratio - 1) > CONTROL_TOLERANCE:
                odd.append(f"{r['model']} at {r['concurrency']} client{'s' if r['concurrency'] > 1 else ''}: {ratio:.2f}")
    if compared:
        out = ("Requests/s batched over one at a time where misses shared passes (clients, members per pass): "
               + "; ".join(f"{m} model **{', '.join(v)}**" for m, v in compared.items()) + ".")
    else:
        out = "No batches formed (every pass held one member), so there is no batching gain to report."
    if controls:
        out += (" Control, one member per pass on both servers (clients): "
                + "; ".join(f"{m} model {', '.join(v)}" for m, v in controls.items())
                + " (nothing to batch, so not a speedup: how far apart the two servers measure without batching).")
    if odd:
        out += (f" **Warning:** a control is more than {CONTROL_TOLERANCE:.0%} from 1.0 ({'; '.join(odd)}): "
                "the two servers were not measured alike, so read every ratio of this run with that doubt.")
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    templates = requests_from([json.loads(line) for line in MEMBERS.read_text().splitlines() if line.strip()])
    models = [("committed", args.model_dir)]
    if args.wide:
        models.append(("wide", benchlib.wide_model(args.model_dir)))
    load_before = benchlib.uptime_load()
    rows = [r for label, path in models for r in run_model(label, path, args, templates, levels)]
    machine = benchlib.machine_lines() + [f"- load average before → after: {load_before} → {benchlib.uptime_load()}"]

    summary = summarize(rows)
    lines = benchlib.report_head("Member embedding service: concurrent misses, batched against one at a time",
                                 summary, benchlib.command_line(__file__, argv))
    lines += machine + ["", "## Setup", "",
                        f"- backend {args.backend}; batching server FEEDRET_EMBED_BATCH_MAX={args.batch_max}, "
                        "baseline FEEDRET_EMBED_BATCH_MAX=1; both run side by side, measured in turn",
                        f"- members: the {len(templates)} sample members (`data/sample/members.jsonl`), each request "
                        "with a fresh session id (every request a cache miss)",
                        f"- closed loop: each client thread sends its next request when the last reply lands; "
                        f"{args.seconds:g} s per server and concurrency, after 8 warm-up requests",
                        "- models: committed = " + os.path.relpath(args.model_dir, ROOT)
                        + ("; wide = the same tokenizer and feedret.json on a random Llama with hidden 512, "
                           "MLP 1376, 4 layers, 8 heads" if args.wide else ""),
                        "", "## Results", "",
                        "| model | clients | alone req/s | batched req/s | **batched / alone** | alone p50 / p99 ms "
                        "| batched p50 / p99 ms | alone CPU ms/req | batched CPU ms/req | members per pass |",
                        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["alone"], r["batched"]
        ratio = f"**{b['rps'] / a['rps']:.2f}**" if batching_happened(r) else f"{b['rps'] / a['rps']:.2f} (control)"
        lines.append(f"| {r['model']} | {r['concurrency']} | {a['rps']:.0f} | {b['rps']:.0f} | "
                     f"{ratio} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | "
                     f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f} | {a['cpu_ms_per_request']:.2f} | "
                     f"{b['cpu_ms_per_request']:.2f} | {b['members_per_pass']:.1f} |")
    failures = sum(r[n]["failures"] for r in rows for n in ("alone", "batched"))
    lines += ["", f"Failed requests: {failures}.", ""]
    benchlib.write_outputs("\n".join(lines), args.out, args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()

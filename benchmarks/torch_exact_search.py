"""Exact brute-force search with the torch backend (`FEEDRET_INDEX_BACKEND=torch`), at batch sizes 1..256.

The shard's `TorchStore` is measured against the bare minimum in the same run:
one matmul plus top-k over the same rows with no mask, no chunking and no host
round trip for the mask ("raw torch"). The ratio says what our store adds.

On a GPU, a search streams every row once per batch, so its floor is
rows x dim x 4 bytes / memory bandwidth; the report gives the fraction of the
device's bandwidth and of its bf16 dense peak that each batch size reaches.
Defaults are a CPU smoke size; on an H100:

    python benchmarks/torch_exact_search.py --device cuda --n 10000000 --dim 256 \\
        --out benchmarks/results/torch_exact_search_h100.md

Vectors are random unit vectors generated on the device (exact search costs
the same whatever they are), written straight into the store's rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from feedret.indexer.codecs import TorchCodecStore, int8_scale
from feedret.indexer.stores import TorchStore

H100_SXM_HBM3_BYTES_S = 3.35e12
H100_SXM_BF16_DENSE = 989e12


def fill_random(store: TorchStore, n: int, seed: int, chunk: int = 1 << 20) -> None:
    """n random unit rows, made on the store's device so 10M x 256 never crosses the host
    (encoded there too for a codec store: float16, or int8 with the store's scale)."""
    store.reserve(n)
    gen = torch.Generator(device=store.device).manual_seed(seed)
    scale = getattr(store, "_scale", None)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = torch.randn((stop - start, store.dimension), generator=gen, device=store.device)
        rows = rows / rows.norm(dim=1, keepdim=True)
        if scale is not None:
            rows = torch.clamp(torch.round(rows / scale), -127, 127)
        store._rows[start:stop] = rows.to(store._rows.dtype)


def timed(fn, sync, seconds: float, min_iters: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_iters or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p))


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        text += f"; GPU {props.name}, {props.total_memory / 2**30:.0f} GiB"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="rows in the store")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=2000)
    parser.add_argument("--batch-sizes", default="1,32,256", help="comma-separated")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--chunk-rows", type=int, default=1 << 20, help="rows per matmul (the shard uses 2**20)")
    parser.add_argument("--deleted", type=float, default=0.01, help="fraction of rows masked out, as deletes are")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per point")
    parser.add_argument("--min-iters", type=int, default=10)
    parser.add_argument("--peak-bw", type=float, default=H100_SXM_HBM3_BYTES_S, help="memory bandwidth, bytes/s (CUDA)")
    parser.add_argument("--peak-flops", type=float, default=H100_SXM_BF16_DENSE, help="bf16 dense peak FLOP/s (CUDA)")
    parser.add_argument("--codec", default="float32", choices=["float32", "float16", "int8"],
                        help="what the store keeps (FEEDRET_VECTOR_CODEC)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the markdown report here too")
    args = parser.parse_args(argv)

    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.codec == "float32":
        store = TorchStore(args.dim, device=args.device, chunk_rows=args.chunk_rows)
    else:  # int8's scale as the stream would teach it: the largest magnitude of unit rows
        sample = np.random.default_rng(args.seed).normal(size=(100_000, args.dim)).astype(np.float32)
        sample /= np.linalg.norm(sample, axis=1, keepdims=True)
        store = TorchCodecStore(args.dim, device=args.device, chunk_rows=args.chunk_rows, codec=args.codec,
                                scale=int8_scale(sample) if args.codec == "int8" else None)
    row_bytes = args.dim * 4 if args.codec == "float32" else store.bytes_per_row
    on_cuda = store.device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(store.device)) if on_cuda else (lambda: None)
    t0 = time.perf_counter()
    fill_random(store, args.n, args.seed)
    sync()
    fill_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    mask = rng.random(args.n) >= args.deleted
    rows = store._rows[: args.n]

    results = []
    for b in batches:
        q = rng.normal(size=(b, args.dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        q_dev = torch.from_numpy(q).to(store.device)

        def raw():
            with torch.inference_mode():
                if args.codec == "float32":
                    scores = rows @ q_dev.T
                elif on_cuda:
                    scores = (rows.half() @ q_dev.half().T).float()
                else:
                    scores = rows.float() @ q_dev.T
                top = torch.topk(scores, args.k, dim=0)
                return top.values.T.cpu(), top.indices.T.cpu()

        def ours():
            return store.search_batch(q, args.k, mask)

        # Interleave the two so drift in machine load hits both alike.
        t_raw, t_ours = [], []
        for _ in range(2):
            t_raw += timed(raw, sync, args.seconds / 2, args.min_iters // 2)
            t_ours += timed(ours, sync, args.seconds / 2, args.min_iters // 2)
        med_raw, med_ours = statistics.median(t_raw), statistics.median(t_ours)
        row = {
            "batch": b,
            "qps": b / med_ours,
            "p50_ms": pct(t_ours, 50) * 1e3,
            "p99_ms": pct(t_ours, 99) * 1e3,
            "raw_p50_ms": med_raw * 1e3,
            "ratio": med_ours / med_raw,
        }
        if on_cuda:
            row["bw"] = args.n * row_bytes / med_ours / args.peak_bw
            row["flops"] = 2 * args.n * args.dim * b / med_ours / args.peak_flops
        results.append(row)
        print(f"batch {b}: {row['qps']:.0f} q/s, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
              f"{row['ratio']:.2f}x raw torch", file=sys.stderr)

    gb = args.n * row_bytes / 1e9
    lines = [
        f"# Exact search, torch backend: {args.n:,} x {args.dim} on {store.device}",
        "",
        "```sh",
        "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "```",
        "",
        f"- {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {machine(store.device)}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        f"- Store: {gb:.2f} GB of {args.codec} rows, filled in {fill_s:.1f} s; k = {args.k}; "
        f"{args.deleted:.0%} of rows masked out as deleted; chunks of {args.chunk_rows:,} rows.",
        "- Latency is per call (one batch of queries), results copied back to the host. "
        "\"raw torch\" is one matmul + top-k over the same rows in the same run, without mask or chunking.",
        "",
        "| batch | queries/s | p50 ms | p99 ms | raw torch p50 ms | ours / raw |" + (" bandwidth | bf16 peak |" if on_cuda else ""),
        "|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if on_cuda else ""),
    ]
    for r in results:
        cells = [f"{r['batch']}", f"{r['qps']:,.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                 f"{r['raw_p50_ms']:.2f}", f"{r['ratio']:.2f}×"]
        if on_cuda:
            cells += [f"{r['bw']:.1%}", f"{r['flops']:.2%}"]
        lines.append("| " + " | ".join(cells) + " |")
    if on_cuda:
        lines += ["", f"Bandwidth: rows × {row_bytes} bytes per batch over {args.peak_bw:.3g} B/s; "
                      f"bf16 peak: 2 × rows × dim × batch FLOPs over {args.peak_flops:.3g} FLOP/s "
                      "(the search runs in float32, so the bf16 figure is a ceiling, not a target)."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

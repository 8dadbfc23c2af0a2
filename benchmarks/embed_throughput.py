"""Embedding throughput: the torch encoder against the ONNX Runtime encoder, in one run.

Embeds N sample posts (data/sample/posts.jsonl, repeated to N) with both backends
at the same batch size and thread count, after a warm-up, and reports posts/s,
tokens/s (real tokens, padding not counted) and the onnx/torch ratio. Two
measurements per backend:

- end to end: `embed_posts` as the consumer calls it (prompt, tokenize, length
  buckets, pad, forward); the prompt and tokenizer work is the same code for both;
- forward only: the already padded batches through `embed_batch`, i.e. the model.

Backends alternate within each repeat (torch, onnx, torch, onnx, ...) so drift
on a shared machine hits both alike; the median repeat is reported. On CUDA it
also reports MFU = achieved FLOP/s / peak, with FLOPs estimated as
2 x non-embedding parameters x real tokens (the embedding table is a lookup, not
multiply-adds; attention's T^2 term is left out). The torch backend runs bf16
on CUDA, the onnx export float32 (TF32 where onnxruntime allows it), so the
bf16 peak is the reference for both.

    python benchmarks/embed_throughput.py --n 3000 --batch-size 64 --threads 2 --out results.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
POSTS = ROOT / "data" / "sample" / "posts.jsonl"
H100_SXM_BF16_DENSE = 989e12


def load_posts(n: int) -> list:
    from feedret.events import parse_post_event

    with open(POSTS, encoding="utf-8") as f:
        base = [parse_post_event(line) for line in f if line.strip()]
    return [base[i % len(base)] for i in range(n)]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def non_embedding_params(model: Any) -> tuple[int, int]:
    """(all parameters, parameters outside the input embedding table) of the torch model."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings()
    return total, total - (emb.weight.numel() if emb is not None else 0)


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="posts to embed per measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads = onnxruntime intra-op threads")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the model the servers load by default (models/feedret-movielens-tiny)")
    parser.add_argument("--onnx-path", type=Path, default=None, help="default: <model-dir>/onnx/model.onnx (exported if missing)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (the same for both backends)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=512, help="posts embedded by each backend before timing")
    parser.add_argument("--peak-flops", type=float, default=H100_SXM_BF16_DENSE, help="bf16 dense peak FLOP/s for MFU (CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    parser.add_argument("--backend", action="append", choices=["torch", "onnx"], default=None,
                        help="repeat for both (the default); torch alone where onnxruntime has no CUDA provider")
    args = parser.parse_args(argv)
    backends = args.backend or ["torch", "onnx"]

    import torch

    from feedret.config import DEFAULT_MODEL_DIR
    from feedret.encoder.model import Encoder, length_buckets
    from feedret.encoder.onnx_backend import OnnxEncoder

    model_dir = args.model_dir or DEFAULT_MODEL_DIR
    common = dict(device=args.device, max_length=args.max_length, batch_size=args.batch_size, torch_threads=args.threads)
    # The torch model is loaded in any case: its parameter count is the MFU's numerator.
    reference = Encoder.from_pretrained(model_dir, **common)
    encoders: dict[str, Any] = {}
    for name in backends:
        encoders[name] = reference if name == "torch" else OnnxEncoder.from_pretrained(
            model_dir, onnx_path=args.onnx_path, **common)
    on_cuda = reference.device.startswith("cuda")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    total_params, params = non_embedding_params(reference.model)
    if "torch" not in encoders:
        del reference  # not timed: free its memory

    first = next(iter(encoders.values()))
    posts = load_posts(args.n)
    prompts = [first.post_prompt(p) for p in posts]
    token_ids = first.tokenize(prompts)
    real_tokens = sum(len(t) for t in token_ids)
    batches = [first.pad([token_ids[i] for i in idx]) for idx in length_buckets([len(t) for t in token_ids], args.batch_size)]
    padded_tokens = sum(ids.size for ids, _ in batches)

    def forward_only(enc: Any) -> None:
        for ids, mask in batches:
            enc.embed_batch(ids, mask)

    load_before = os.getloadavg()
    warm = load_posts(min(args.warmup, args.n)) if args.warmup else []
    for enc in encoders.values():
        if warm:
            enc.embed_posts(warm)
        forward_only(enc)

    e2e: dict[str, list[float]] = {k: [] for k in encoders}
    fwd: dict[str, list[float]] = {k: [] for k in encoders}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, enc in encoders.items():
            seconds, vectors[name] = timed(lambda: enc.embed_posts(posts), sync)
            e2e[name].append(seconds)
            fwd[name].append(timed(lambda: forward_only(enc), sync)[0])
    load_after = os.getloadavg()
    both = "torch" in vectors and "onnx" in vectors
    if both:
        a, b = vectors["torch"], vectors["onnx"]
        min_cos = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())
    base_name = backends[0]

    def row(name: str, times: dict[str, list[float]], base: float) -> str:
        t = statistics.median(times[name])
        cells = [
            name,
            f"{args.n / t:,.0f}",
            f"{real_tokens / t:,.0f}",
            f"{base / t:.2f}x",
            f"{t:.3f} ({min(times[name]):.3f}-{max(times[name]):.3f})",
        ]
        if on_cuda:
            cells.append(f"{2 * params * real_tokens / t / args.peak_flops:.2%}")
        return "| " + " | ".join(cells) + " |"

    header = f"| backend | posts/s | tokens/s | vs {base_name} | seconds, median (min-max) |" + (" MFU |" if on_cuda else "")
    rule = "|---|---:|---:|---:|---:|" + ("---:|" if on_cuda else "")
    gpu = torch.cuda.get_device_name() if on_cuda else ""
    onnx_enc = encoders.get("onnx")
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd()), *(argv if argv is not None else sys.argv[1:])])
    if both:
        e2e_ratio = statistics.median(e2e["torch"]) / statistics.median(e2e["onnx"])
        fwd_ratio = statistics.median(fwd["torch"]) / statistics.median(fwd["onnx"])
        summary = (f"**onnx/torch throughput: {e2e_ratio:.2f}x end to end, {fwd_ratio:.2f}x forward only** "
                   f"(higher is better for onnx; same batch size, threads and posts, measured in one run).")
    else:
        summary = f"**{base_name} alone** (`--backend {base_name}`): no comparison in this run."
    try:
        import onnxruntime as ort

        ort_line = f"onnxruntime {ort.__version__}" + (
            f" (providers used: {', '.join(onnx_enc.session.get_providers())})" if onnx_enc else " (not timed)")
    except ImportError:
        ort_line = "no onnxruntime"
    lines = [
        "# Embedding throughput: " + (" vs ".join({"torch": "torch", "onnx": "ONNX Runtime"}[b] for b in backends)),
        "",
        summary,
        "",
        "```",
        command,
        "```",
        "",
        "## Machine",
        "",
        f"- nproc: {os.cpu_count()}; CPU: {cpu_model()}" + (f"; GPU: {gpu}" if gpu else ""),
        f"- load average (1 min) before / after the timed part: {load_before[0]:.2f} / {load_after[0]:.2f} "
        "(other processes compete for the cores when it is above the thread count)",
        f"- python {platform.python_version()}, torch {torch.__version__}, {ort_line}",
        "",
        "## Setup",
        "",
        f"- model: `{os.path.relpath(model_dir, ROOT) if Path(model_dir).resolve().is_relative_to(ROOT) else model_dir}` "
        f"({first.model_version}, {total_params:,} parameters, {params:,} outside the embedding table, "
        f"dim {first.dim}, pooling {first.pooling})",
        f"- device {args.device}: "
        + ", ".join(([f"torch {'bfloat16' if on_cuda else 'float32'}"] if "torch" in encoders else [])
                    + ([f"onnx float32 graph (`{onnx_enc.onnx_path.name}`, opset from its export record)"] if onnx_enc else [])),
        f"- {args.n:,} posts (the {POSTS.name} sample repeated), {real_tokens:,} real tokens "
        f"({real_tokens / args.n:.1f} per post, max_length {args.max_length}); padded to {padded_tokens:,} "
        f"({real_tokens / padded_tokens:.1%} real) in length-bucketed batches of {args.batch_size}",
        f"- threads: torch.set_num_threads({args.threads}) and onnxruntime intra_op_num_threads={args.threads}",
        f"- warm-up {len(warm)} posts end to end plus one forward-only pass per backend; "
        f"{args.repeats} repeats, backends alternating; median reported",
        *([f"- agreement: min cosine between the backends' vectors over all posts = {min_cos:.6f}"] if both else []),
        "",
        "## End to end (`embed_posts`: prompt, tokenize, bucket, pad, forward)",
        "",
        header,
        rule,
        *[row(name, e2e, statistics.median(e2e[base_name])) for name in encoders],
        "",
        "## Forward only (pre-padded batches through `embed_batch`)",
        "",
        header,
        rule,
        *[row(name, fwd, statistics.median(fwd[base_name])) for name in encoders],
        "",
    ]
    if on_cuda:
        lines += [
            f"MFU = 2 x {params:,} non-embedding parameters x real tokens / seconds / {args.peak_flops:.3g} FLOP/s "
            "(bf16 dense peak).",
            "",
        ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()

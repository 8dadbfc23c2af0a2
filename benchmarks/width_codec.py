"""Matryoshka width × vector codec as one choice: the task's recall and the bytes a post costs (#19).

A trained model embeds the evaluation's posts and member states (`feedret eval`'s
protocol: the same 3,000 MovieLens queries, candidates and positives). Each post
vector is cut to a Matryoshka prefix, re-normalised, and kept as the shard's codec
store keeps it (`feedret.indexer.codecs`): float32, float16, int8 (ranges learned
from the posts), binary (the query against the signs, then the best `--rescore` ×
k rescored from int8) or binary with Hamming search. Each query's candidates are
ranked from those codes exactly as a shard would search them, and scored against
the held-out positives: recall@10 and @100 of the real task, not recall against
exact search. Bytes per post are the codec's (the shard's per-post attributes and
id map, ~60-80 bytes, come on top whatever the choice).

    python benchmarks/width_codec.py --model var/runs/minilm-fresh06-x3/model \\
        --out benchmarks/results/width_codec.md

The vectors are cached under var/bench/ per model, so a second run only re-ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

CODECS = ("float32", "float16", "int8", "binary", "binary-hamming")
K = 100  # binary's first stage keeps rescore × K candidates per query


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/feedret-movielens-tiny"))
    p.add_argument("--dataset", type=Path, default=Path("var/datasets/movielens"))
    p.add_argument("--queries", type=int, default=3000)
    p.add_argument("--rescore", type=int, default=8)
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=benchlib.CACHE)
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def vectors(args, data) -> tuple[np.ndarray, np.ndarray]:
    from feedret.encoder.model import Encoder
    from feedret.evaluation.evaluate import embed

    meta = (args.model / "feedret.json").read_bytes() if (args.model / "feedret.json").exists() else b""
    key = hashlib.sha256(str(args.model.resolve()).encode() + meta + str(args.queries).encode()).hexdigest()[:16]
    path = args.cache_dir / f"width-codec-{key}.npz"
    if path.exists():
        saved = np.load(path)
        return saved["posts"], saved["members"]
    encoder = Encoder.from_pretrained(args.model, torch_threads=args.torch_threads)
    posts, members, _ = embed(encoder, data)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(path, posts=posts, members=members)
    return posts, members


def ranked(data, codec: str, posts: np.ndarray, members: np.ndarray, rescore: int) -> np.ndarray:
    """Each query's top K candidate columns, searched as a shard with this codec searches."""
    from feedret.evaluation.evaluate import rank
    from feedret.indexer import codecs

    n, d = posts.shape
    if codec == "float32":
        return rank(data, lambda idx: members[idx] @ posts.T, K)
    if codec == "float16":
        store = codecs.ScalarStore(d, "float16")
    else:
        store = codecs.ScalarStore.trained_on(d, "int8", posts)
    store.reserve(n)
    store.write(np.arange(n), posts)
    decoded = store.read(np.arange(n))  # what the store scores against: its codes, decoded
    if codec in ("float16", "int8"):
        return rank(data, lambda idx: members[idx] @ decoded.T, K)
    signs = np.where(posts > 0, 1.0, -1.0).astype(np.float32)

    def two_stage(idx: np.ndarray) -> np.ndarray:
        if codec == "binary":  # the query against each post's signs
            first = members[idx] @ signs.T
        else:  # Hamming: agreement of sign bits, sign(q) . sign(p)
            first = np.where(members[idx] > 0, 1.0, -1.0).astype(np.float32) @ signs.T
        first = np.where(data.candidates[idx], first, -np.inf)
        depth = min(K * rescore, n)
        keep = np.argpartition(-first, depth - 1, axis=1)[:, :depth]
        out = np.full(first.shape, -np.inf, np.float32)
        rescored = np.einsum("qd,qkd->qk", members[idx], decoded[keep])  # from int8
        np.put_along_axis(out, keep, rescored, axis=1)
        return out

    return rank(data, two_stage, K)


def main(argv=None) -> int:
    args = parse_args(argv)
    from feedret.dataprep.format import read_dataset
    from feedret.evaluation.evaluate import EvalConfig, prepare, score_ranking, truncate, width_dims

    config = EvalConfig(dataset=args.dataset, max_queries=args.queries, ks=(10, K), ndcg_k=K)
    data = prepare(config, read_dataset(args.dataset))
    posts, members = vectors(args, data)
    dim = posts.shape[1]
    rows = []
    for width in width_dims(dim, (1.0, 0.5, 0.25, 0.125)):
        p, m = truncate(posts, width), truncate(members, width)
        for codec in CODECS:
            result = score_ranking(data, ranked(data, codec, p, m, args.rescore))["segments"]
            per_post = {"float32": 4 * width, "float16": 2 * width, "int8": width}.get(codec, (width + 7) // 8)
            rows.append({"width": width, "codec": codec, "bytes_per_post": per_post,
                         "bytes_with_rescoring": per_post + (width if codec.startswith("binary") else 0),
                         **{f"{seg}_{m}": result[seg][m] for seg in ("all", "fresh", "cold_start")
                            for m in ("recall@10", f"recall@{K}")}})
            r = rows[-1]
            print(f"w={width} {codec}: R@10 {r['all_recall@10']:.4f} R@100 {r['all_recall@100']:.4f}",
                  file=sys.stderr, flush=True)
    base = next(r for r in rows if r["width"] == dim and r["codec"] == "float32")
    lines = benchlib.report_head(
        f"Matryoshka width x vector codec on {args.model.name}'s vectors (#19)",
        "The real task's recall (held-out positives, `feedret eval`'s protocol), per serving width and codec, "
        "against the bytes a post's vector costs.", benchlib.command_line(__file__, argv))
    lines += benchlib.machine_lines()
    lines += [f"- model: `{args.model}` ({dim} dims); {len(data.queries):,} queries over {len(data.item_ids):,} "
              f"posts (the evaluation's sample, seed 0); binary keeps the best {args.rescore} x {K} by its first "
              "stage and rescores them from int8", "",
              f"| width | codec | bytes/post in memory | with an int8 rescoring store | recall@10 | recall@{K} | "
              f"recall@{K} vs {dim} float32 | fresh recall@{K} | cold-start recall@{K} |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['codec']} | {r['bytes_per_post']:,} | {r['bytes_with_rescoring']:,} | "
                     f"{r['all_recall@10']:.4f} | {r[f'all_recall@{K}']:.4f} | "
                     f"{r[f'all_recall@{K}'] / base[f'all_recall@{K}']:.3f} | "
                     f"{r[f'fresh_recall@{K}'] or 0:.4f} | {r[f'cold_start_recall@{K}'] or 0:.4f} |")
    lines += ["", "Binary's in-memory bytes assume its rescoring store on disk (`FEEDRET_RESCORE_DIR`); "
              "the next column keeps it in memory as int8."]
    benchlib.write_outputs("\n".join(lines) + "\n", args.out, args.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How every cost of a shard grows with its corpus, per vector codec (issue #19).

For each corpus size (the first N of one synthetic set of clustered 256-d unit
vectors) and each codec, a fresh process builds a `ShardIndex` (the shard's own
index, without gRPC) the way a shard's applier fills it, in batches of 10,000,
and reports:

- memory: the process's anonymous resident memory (RssAnon: what faiss and
  numpy allocated) grown over its empty-index baseline, per post; the store's
  own bytes per post (`info().store_bytes`); file-backed resident memory
  (RssFile: a binary codec rescored from disk reads it through the page cache);
- ingest: posts applied per second (upsert: encode, write, id map);
- search: p50/p99 of one query at a time (one thread, as a shard's gRPC worker
  searches) at k = 100 and 2,000, and recall@k against exact float32 search;
- snapshot: its size on disk, the time to write it, and the time to restore an
  index from it (read + `ShardIndex.from_state`).

The float32 codec stops at --max-float32 posts (a 24 GB machine, the corpus mapped
beside it). Exact top-k per size is computed once, streaming the vectors.

    python benchmarks/codec_growth.py --sizes 100000 1000000 3000000 10000000 \\
        --out benchmarks/results/codec_growth.md --plot benchmarks/results/codec_growth.png

The defaults are a smoke run (20,000 vectors, 64 dims) of well under a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

# name -> IndexOptions changes; a "-disk" one gets its rescore_dir in the child.
CODECS = {
    "float32": {},
    "float16": {"vector_codec": "float16"},
    "int8": {"vector_codec": "int8"},
    "binary": {"vector_codec": "binary"},
    "binary-hamming": {"vector_codec": "binary", "binary_search": "hamming"},
    "binary-disk": {"vector_codec": "binary"},
    # RaBitQ codes (8 bytes a post more than the bits): a scan fast enough for a deep rescore (:32, :64).
    "binary-rabitq": {"vector_codec": "binary", "binary_search": "rabitq"},
    "binary-rabitq-disk": {"vector_codec": "binary", "binary_search": "rabitq"},
    # An approximate index over int8 codes beside an int8 store: what a 10M-post shard needs
    # for a search in tens of milliseconds on a CPU (an exact scan reads every code).
    "ivf-int8": {"vector_codec": "int8", "index_factory": "IVF1024,SQ8", "nprobe": 32},
    # Finer lists: at a given share of the corpus scanned, a deep top-k (2,000) is found in
    # fewer, closer lists. --nprobes sweeps the breadth of both.
    "ivf4096-int8": {"vector_codec": "int8", "index_factory": "IVF4096,SQ8", "nprobe": 32},
}


def codec_name(text: str) -> str:
    name, _, rescore = text.partition(":")
    if name not in CODECS or (rescore and (not name.startswith("binary") or not rescore.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r}: one of {', '.join(CODECS)}, a binary one as NAME:R")
    return text


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--codecs", nargs="+", default=[c for c in CODECS if "ivf" not in c], type=codec_name,
                   help="from " + ", ".join(CODECS) + "; a binary one as NAME:R rescores R x k (default --rescore)")
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--ks", type=int, nargs="+", default=[100, 2000])
    p.add_argument("--rescore", type=int, default=8, help="binary: candidates rescored per result")
    p.add_argument("--nprobes", type=int, nargs="+", default=[],
                   help="IVF codecs: also search at each of these nprobe floors (largest k; the shard widens "
                        "a floor too low for k, faiss_ann.search_breadth)")
    p.add_argument("--max-float32", type=int, default=3_000_000, help="largest corpus float32 and float16 run at")
    p.add_argument("--clusters", type=int, default=0, help="0: n // 1000 (benchlib.DataSpec)")
    p.add_argument("--cache-dir", type=Path, default=benchlib.CACHE, help="vectors, queries and exact answers")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--render", type=Path, help="only write the report (and plot) again from this run's --json; "
                   "give the run's own options")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def proc_mem() -> dict[str, int]:
    """RssAnon and RssFile of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) * 1024
    return out


def truth(vectors: np.ndarray, queries: np.ndarray, n: int, k: int, path: Path) -> np.ndarray:
    """Exact top-k ids of each query among the first n vectors, streamed in chunks. Cached."""
    if path.exists():
        return np.load(path)
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, n, 500_000):
        chunk = np.asarray(vectors[start : min(start + 500_000, n)], np.float32)
        scores = queries @ chunk.T
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
        i = np.concatenate([best_i, top + start], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    np.save(path, best_i)
    return best_i


def timed_searches(ix, queries: np.ndarray, gt: np.ndarray, k: int) -> dict:
    """One query at a time: p50/p99 ms and mean recall@k against the exact answers `gt`."""
    times, recalls = [], []
    for q, row in zip(queries, gt):
        t = time.perf_counter()
        ids, _ = ix.search(q, k)
        times.append(time.perf_counter() - t)
        recalls.append(benchlib.recall_at(ids, row, k))
    return {"p50_ms": 1000 * statistics.median(times), "p99_ms": 1000 * benchlib.pct(times, 99),
            "recall": float(np.mean(recalls))}


def child(spec: dict) -> dict:
    """One codec at one size, in its own process (so its memory is its own)."""
    from feedret.indexer import snapshot
    from feedret.indexer.shard_index import IndexOptions, ShardIndex
    from feedret.indexer.stores import release_free_memory

    vectors = np.load(spec["vectors"], mmap_mode="r")
    queries = np.load(spec["queries"])
    n, dim = spec["n"], vectors.shape[1]
    scratch = Path(spec["scratch"])
    name, _, rescore = spec["codec"].partition(":")
    changes = dict(CODECS[name])
    if name.endswith("-disk"):
        changes["rescore_dir"] = str(scratch / "rescore")
    options = IndexOptions(**changes, binary_rescore=int(rescore or spec["rescore"]), background=False)
    ix = ShardIndex(dim, options=options)
    gc.collect()
    release_free_memory()
    base = proc_mem()
    started = time.perf_counter()
    batch = 10_000
    langs, models = ["en"] * batch, ["m1"] * batch
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        chunk = np.array(vectors[start:stop], np.float32)  # a copy: the mapped file's pages are not the index's
        ix.upsert(np.arange(start, stop), chunk, np.zeros(stop - start), langs[: stop - start], 0.0,
                  model_versions=models[: stop - start])
    ingest_s = time.perf_counter() - started
    # The corpus is read through a map: drop its pages so RssFile counts only the index's own.
    del vectors
    gc.collect()
    release_free_memory()  # as a shard does after each snapshot: what it holds, not what it freed
    mem = proc_mem()
    info = ix.info()
    out = {
        "codec": spec["codec"], "n": n, "dim": dim, "store_codec": info.vector_codec,
        "store_bytes_per_post": info.store_bytes / max(info.store_rows, 1),
        "anon_bytes_per_post": (mem["RssAnon"] - base["RssAnon"]) / n,
        "rss_file_mib": mem["RssFile"] / 2**20, "anon_mib": mem["RssAnon"] / 2**20,
        "ingest_posts_per_s": n / ingest_s, "search": {},
    }
    for k in spec["ks"]:
        out["search"][str(k)] = timed_searches(ix, queries, np.load(spec["truth"][str(k)]), k)
    if "index_factory" in changes:
        k = max(spec["ks"])
        gt = np.load(spec["truth"][str(k)])
        out["breadth"] = []
        for nprobe in spec["nprobes"]:
            ix.options = dataclasses.replace(options, nprobe=nprobe)
            out["breadth"].append({"nprobe": nprobe, "k": k, **timed_searches(ix, queries, gt, k)})
        ix.options = options
    out["rss_file_after_search_mib"] = proc_mem()["RssFile"] / 2**20
    t = time.perf_counter()
    meta, sections = ix.export_state()
    path = snapshot.write_snapshot(scratch / "snap", 0, 0, {"index": meta}, sections)
    out["snapshot_write_s"] = time.perf_counter() - t
    out["snapshot_bytes_per_post"] = path.stat().st_size / n
    del ix, meta, sections
    gc.collect()
    t = time.perf_counter()
    header, read = snapshot.read_snapshot(path)
    restored = ShardIndex.from_state(header["index"], read, options)
    out["restore_s"] = time.perf_counter() - t
    assert len(restored) == n
    return out


def run_child(args, codec: str, n: int, paths: dict) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix=f"codec-{codec.replace(':', '-')}-", dir=args.workdir))
    spec = {"codec": codec, "n": n, "ks": args.ks, "rescore": args.rescore, "nprobes": args.nprobes,
            "scratch": str(scratch), **paths}
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{codec} at {n:,}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def report(args, rows: list[dict], spec: benchlib.DataSpec, command: str, machine: list[str]) -> str:
    by = {(r["codec"], r["n"]): r for r in rows}
    sizes = sorted({r["n"] for r in rows})
    largest_f32 = max((r["n"] for r in rows if r["codec"] == "float32"), default=0)
    base = by.get(("float32", largest_f32))
    lines = benchlib.report_head(
        "Vector codecs: memory, search, ingest and recovery as the corpus grows (#19)",
        "See the tables; ratios are against float32 at the same size in the same run.",
        command,
    )
    lines += machine
    lines += [f"- data: {spec.describe()}; corpus sizes are prefixes of it; {args.queries} queries; "
              f"binary rescores {args.rescore} x k (binary:R: R x k); search one query at a time on one thread", ""]
    lines += ["## Memory per post", "",
              "Anonymous resident memory (RssAnon) grown over the empty index, divided by the posts, after "
              "freed memory is handed back to the OS (as a shard does after each snapshot): the codes, the "
              "per-post attributes (id, times, language, model, flags: 26 bytes), the id map (16-32 bytes) "
              "and the rows grown but not filled yet (a store grows by a quarter past 1M rows).", "",
              "| codec | " + " | ".join(f"{n:,}" for n in sizes) + " | store bytes/post | vs float32 |",
              "|---|" + "---:|" * (len(sizes) + 2)]
    for codec in args.codecs:
        cells = [f"{by[(codec, n)]['anon_bytes_per_post']:.0f}" if (codec, n) in by else "–" for n in sizes]
        last = max((n for n in sizes if (codec, n) in by), default=None)
        both = max((n for n in sizes if (codec, n) in by and ("float32", n) in by), default=None)
        ratio = ""
        if both is not None:  # at the largest size float32 was measured at too
            ratio = (f"{by[('float32', both)]['anon_bytes_per_post'] / by[(codec, both)]['anon_bytes_per_post']:.2f}x"
                     f" less at {both:,}")
        store = f"{by[(codec, last)]['store_bytes_per_post']:.0f}" if last is not None else "–"
        lines.append(f"| {codec} | " + " | ".join(cells) + f" | {store} | {ratio} |")
    lines += ["", "**Growth rate**: the slope of log(cost) against log(posts) between the smallest and the "
              "largest corpus (1: linear; search p50 at k = 2,000; process memory in total, not per post).", "",
              "| codec | memory | search p50, k = 2,000 | ingest posts/s |", "|---|---:|---:|---:|"]
    for codec in args.codecs:
        rs = sorted((r for r in rows if r["codec"] == codec), key=lambda r: r["n"])
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[-1]
        span = np.log(b["n"] / a["n"])
        mem = np.log(b["anon_bytes_per_post"] * b["n"] / (a["anon_bytes_per_post"] * a["n"])) / span
        search = np.log(b["search"][str(max(args.ks))]["p50_ms"] / a["search"][str(max(args.ks))]["p50_ms"]) / span
        ingest = np.log(b["ingest_posts_per_s"] / a["ingest_posts_per_s"]) / span
        lines.append(f"| {codec} | {mem:.2f} | {search:.2f} | {ingest:+.2f} |")
    for k in args.ks:
        lines += ["", f"## Search at k = {k:,}: p50 / p99 ms, recall@{k:,} against exact float32", "",
                  "| codec | " + " | ".join(f"{n:,}" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
        for codec in args.codecs:
            cells = []
            for n in sizes:
                r = by.get((codec, n))
                s = r["search"][str(k)] if r else None
                cells.append(f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f}, {s['recall']:.3f}" if s else "–")
            lines.append(f"| {codec} | " + " | ".join(cells) + " |")
    swept = [r for r in rows if r.get("breadth")]
    if swept:
        lines += ["", "## IVF breadth: p50 / p99 ms, recall against exact float32, by nprobe", "",
                  "The configured nprobe is a floor; the shard widens it to see about 4k candidates "
                  "(`faiss_ann.search_breadth`).", "",
                  "| codec | n | k | " + " | ".join(f"nprobe {b['nprobe']}" for b in swept[0]["breadth"]) + " |",
                  "|---|---:|---:|" + "---:|" * len(swept[0]["breadth"])]
        for r in sorted(swept, key=lambda r: (args.codecs.index(r["codec"]), r["n"])):
            lines.append(f"| {r['codec']} | {r['n']:,} | {r['breadth'][0]['k']:,} | " + " | ".join(
                f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f}, {b['recall']:.3f}" for b in r["breadth"]) + " |")
    lines += ["", "## Ingest (posts/s applied), snapshot (bytes/post, write s), restore s", "",
              "| codec | n | ingest posts/s | snapshot bytes/post | snapshot write s | restore s | RssFile MiB after searches |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (args.codecs.index(r["codec"]), r["n"])):
        lines.append(f"| {r['codec']} | {r['n']:,} | {r['ingest_posts_per_s']:,.0f} | {r['snapshot_bytes_per_post']:.0f} | "
                     f"{r['snapshot_write_s']:.2f} | {r['restore_s']:.2f} | {r['rss_file_after_search_mib']:.0f} |")
    if base:
        lines += ["", f"float32 at {largest_f32:,} posts is the baseline of the ratios."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], codecs: list[str], ks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 + len(ks), figsize=(5 * (2 + len(ks)), 4))
    for codec in codecs:
        rs = sorted((r for r in rows if r["codec"] == codec), key=lambda r: r["n"])
        if not rs:
            continue
        ns = [r["n"] for r in rs]
        axes[0].plot(ns, [r["anon_bytes_per_post"] * r["n"] / 2**30 for r in rs], "o-", label=codec)
        axes[1].plot(ns, [r["ingest_posts_per_s"] for r in rs], "o-", label=codec)
        for ax, k in zip(axes[2:], ks):
            ax.plot(ns, [r["search"][str(k)]["p50_ms"] for r in rs], "o-", label=codec)
    titles = ["process memory, GiB", "ingest, posts/s"] + [f"search p50 ms, k={k:,}" for k in ks]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("posts")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.render:  # the same rows, reported again (the command shown is the one that measured them)
        saved = json.loads(args.render.read_text())
        spec = benchlib.DataSpec(n=max(args.sizes), dim=args.dim, queries=args.queries, clusters=args.clusters)
        text = report(args, saved["rows"], spec, saved["command"], saved["machine"])
        benchlib.write_outputs(text, args.out, None, saved)
        if args.plot:
            plot(saved["rows"], args.codecs, args.ks, args.plot)
        return 0
    args.workdir = args.cache_dir / "codec-growth"
    args.workdir.mkdir(parents=True, exist_ok=True)
    spec = benchlib.DataSpec(n=max(args.sizes), dim=args.dim, queries=args.queries, clusters=args.clusters)
    benchlib.dataset(spec, args.cache_dir)
    vec_path = args.cache_dir / f"vectors-{spec.key}.npy"
    q_path = args.cache_dir / f"queries-{spec.key}-q{spec.queries}.npy"
    vectors, queries = np.load(vec_path, mmap_mode="r"), np.load(q_path)
    rows = []
    for n in sorted(args.sizes):
        truths = {str(k): str(args.workdir / f"truth-{spec.key}-n{n}-q{args.queries}-k{k}.npy") for k in args.ks}
        for k in args.ks:
            truth(vectors, queries, n, k, Path(truths[str(k)]))
        for codec in args.codecs:
            if codec in ("float32", "float16") and n > args.max_float32:
                continue
            row = run_child(args, codec, n, {"vectors": str(vec_path), "queries": str(q_path), "truth": truths})
            print(f"{codec} n={n:,}: {row['anon_bytes_per_post']:.0f} B/post, ingest {row['ingest_posts_per_s']:,.0f}/s, "
                  + ", ".join(f"k={k} p50 {s['p50_ms']:.1f} ms recall {s['recall']:.3f}" for k, s in row["search"].items()),
                  file=sys.stderr, flush=True)
            rows.append(row)
    command, machine = benchlib.command_line(__file__, argv), benchlib.machine_lines()
    text = report(args, rows, spec, command, machine)
    benchlib.write_outputs(text, args.out, args.json, {"rows": rows, "command": command, "machine": machine})
    if args.plot:
        plot(rows, args.codecs, args.ks, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmarks run end to end at a tiny size, so they do not rot (they start real stacks: e2e).

The runs are marked `bench`: `make test` leaves them out (together they took about a
third of the suite), `make test-bench` runs them, and `.ci/run` runs both.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n", "3000", "--queries", "8", "--warmup", "1", "--rounds", "1", "--concurrency", "2", "--k", "10", "--k", "200"]


def run(script: str, args: list[str], tmp_path: Path) -> tuple[str, float]:
    out = tmp_path / "report.md"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--cache-dir", str(tmp_path / "cache"),
         "--out", str(out), "--plot", str(tmp_path / "plot.png"), "--json", str(tmp_path / "raw.json")],
        capture_output=True, text=True, timeout=170, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "plot.png").stat().st_size > 0 and (tmp_path / "raw.json").exists()
    return out.read_text(), time.monotonic() - started


@pytest.mark.bench
def test_search_latency_smoke(tmp_path):
    report, seconds = run("search_latency.py", [*TINY, "--index", "Flat", "--index", "IVF16,Flat", "--index", "HNSW16"],
                          tmp_path)
    assert "feedret / raw" in report and "| IVF16,Flat | 200 |" in report and "| HNSW16 | 10 |" in report
    assert "| Flat | 200 | exact |" in report and "1.000 / 1.000" in report  # exact search finds the exact top-k
    assert "| no-op RPC p50 ms |" in report  # the floor of one hop, beside the end-to-end figure
    assert seconds < 120, f"took {seconds:.0f}s"


@pytest.mark.bench
def test_milvus_compare_smoke(tmp_path):
    pytest.importorskip("pymilvus", reason="the bench extra (pip install -e '.[bench]') is not installed")
    pytest.importorskip("milvus_lite")
    report, seconds = run("milvus_compare.py", [*TINY, "--index", "flat", "--index", "hnsw", "--nlist", "16",
                                                "--freshness-trials", "2"], tmp_path)
    assert "at matched recall" in report and "| flat | 200 |" in report and "| hnsw | 10 |" in report
    assert "Insert to searchable" in report
    assert seconds < 120, f"took {seconds:.0f}s"


@pytest.mark.bench
def test_grpc_floor_smoke(tmp_path):
    out = tmp_path / "floor.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grpc_floor.py"), "--n", "3000", "--queries", "8",
                           "--warmup", "1", "--k", "200", "--index", "IVF16,Flat", "--cache-dir", str(tmp_path / "cache"),
                           "--out", str(out), "--json", str(tmp_path / "raw.json")],
                          capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    # Every path answered, the bare ones finding what feedret finds (same snapshots, same breadth).
    assert "| feedret: client → root → 2 shard servers → merge |" in report
    assert "| floor: bare gRPC, client → asyncio root → 2 bare shards → merge |" in report
    import json

    systems = json.loads((tmp_path / "raw.json").read_text())["result"]["systems"]
    assert systems["floor_threads"]["recall"] == systems["floor_asyncio"]["recall"] == systems["feedret"]["recall"] > 0.5


@pytest.mark.bench
def test_encoder_idle_cpu_smoke(tmp_path):
    out = tmp_path / "idle.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "encoder_idle_cpu.py"), "--backend", "torch",
                           "--requests", "5", "--repeats", "1", "--interval-ms", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    # Each policy reached torch's OpenMP through a fresh process.
    assert "| torch | sleep (PASSIVE) |" in report and "| torch | spin (OpenMP's default) |" in report


@pytest.mark.bench
def test_member_batching_smoke(tmp_path):
    out, raw = tmp_path / "member.md", tmp_path / "member.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "member_batching.py"), "--concurrency", "1,8",
                           "--seconds", "1", "--out", str(out), "--json", str(raw)],
                          capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = json.loads(raw.read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1, 8]
    for r in rows:
        assert r["alone"]["requests"] > 0 and r["batched"]["requests"] > 0
        assert r["alone"]["failures"] == r["batched"]["failures"] == 0
        assert r["alone"]["members_per_pass"] == 1.0  # the baseline never batches
    assert rows[1]["batched"]["members_per_pass"] > 1.0  # 8 clients' misses queued and went together
    assert "| committed | 8 |" in out.read_text()


@pytest.mark.bench
def test_concurrency_sweep_smoke(tmp_path):
    out, raw, plot = tmp_path / "sweep.md", tmp_path / "raw.json", tmp_path / "sweep.png"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "concurrency_sweep.py"), "--n", "3000",
                           "--queries", "16", "--per-cell", "8", "--rounds", "1", "--k", "50", "--concurrency", "1",
                           "--concurrency", "4", "--index", "IVF16,Flat", "--workers", "8",
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--json", str(raw),
                           "--plot", str(plot)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (index,) = json.loads(raw.read_text())["result"]["indexes"]
    assert [(c["k"], c["clients"]) for c in index["cells"]] == [(50, 1), (50, 4)]
    for cell in index["cells"]:
        s = cell["systems"]
        # Every system answered every query, feedret and the bare servers finding the same posts
        # (same snapshots, same breadth).
        assert all(s[name]["qps"] > 0 for name in s)
        assert s["feedret"]["recall"] == s["floor_asyncio"]["recall"] == s["floor_threads"]["recall"] > 0.5
    report = out.read_text()
    assert "## Targets (issue #18)" in report and "| IVF16,Flat | 50 |" in report and plot.stat().st_size > 0


@pytest.mark.bench
def test_peer_compare_smoke(tmp_path):
    pytest.importorskip("chromadb", reason="the bench extra (pip install -e '.[bench]') is not installed")
    pytest.importorskip("lancedb")
    report, seconds = run("peer_compare.py", ["--n", "3000", "--queries", "16", "--tune-queries", "16", "--per-cell", "8",
                                              "--rounds", "1", "--k", "10", "--k", "200", "--concurrency", "1",
                                              "--concurrency", "4", "--index", "IVF16,Flat", "--workers", "8",
                                              "--freshness-trials", "2"], tmp_path)
    res = json.loads((tmp_path / "raw.json").read_text())["result"]
    assert [(c["k"], c["clients"]) for c in res["cells"]] == [(10, 1), (10, 4), (200, 1), (200, 4)]
    for cell in res["cells"]:
        # Every system answered every query, and found posts the exact search finds.
        assert all(s["qps"] > 0 and s["recall"] > 0.5 for s in cell["systems"].values()), cell
    fresh = res["freshness"]
    assert all(len(v) == 2 and all(x == x for x in v) for v in fresh.values()), fresh  # every fresh post was found
    assert res["chroma_load"]["count"] == res["lance_load"]["count"] == 3000
    assert "## Targets (issue #18)" in report and "| 200 | 4 |" in report and "Insert to searchable" in report
    assert seconds < 120, f"took {seconds:.0f}s"


@pytest.mark.parametrize("script", ["search_latency.py", "milvus_compare.py", "grpc_floor.py", "concurrency_sweep.py",
                                    "peer_compare.py"])
def test_help(script):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--n" in proc.stdout


@pytest.mark.bench
def test_growth_stall_smoke(tmp_path):
    out = tmp_path / "growth.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "growth_stall.py"), "--n", "8192", "--dim", "16",
                           "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "| baseline (growth under the write lock) |" in report and "| feedret (growth beside searches) |" in report
    assert "8,192 → 16,384 rows" in report


@pytest.mark.bench
def test_shard_batching_smoke(tmp_path):
    out = tmp_path / "batching.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shard_batching.py"), "--n", "4096", "--dim", "16",
                           "--seconds", "0.5", "--concurrency", "1", "--concurrency", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "| 1 |" in report and "| 8 |" in report and "QPS batched / alone" in report


@pytest.mark.bench
def test_hnsw_ingest_stall_smoke(tmp_path):
    out = tmp_path / "hnsw.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hnsw_ingest_stall.py"), "--n", "4096", "--dim", "16",
                           "--batches", "3", "--batch", "64", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "| baseline (a batch linked in one hold) |" in report and "posts per hold) |" in report


@pytest.mark.bench
def test_merge_topk_smoke(tmp_path):
    out = tmp_path / "merge.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "merge_topk.py"), "--requests", "60",
                           "--k", "300", "--shards", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "| 3 | 300 |" in report and "before / now (p50)" in report


@pytest.mark.bench
def test_freshness_smoke(tmp_path):
    out = tmp_path / "freshness.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "freshness.py"), "--trials", "2",
                           "--setting", "before=FEEDRET_KAFKA_FETCH_MAX_WAIT_MS=500,FEEDRET_BATCH_LINGER_MS=200",
                           "--setting", "now=", "--gap-s", "0.05", "--backlog", "20", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| vector |", "| pipeline |"))]
    assert len(rows) == 4
    assert all(line.split("|")[6].strip() == "0" for line in rows), rows  # every post was found
    assert "| now |" in out.read_text().split("Backlog:")[1]


@pytest.mark.bench
@pytest.mark.parametrize("backends", [[], ["--backend", "torch"]], ids=["both", "torch-alone"])
def test_embed_throughput_smoke(tmp_path, backends):
    out = tmp_path / "embed.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "embed_throughput.py"), "--n", "64", "--repeats", "1",
                           "--warmup", "0", "--threads", "1", *backends, "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "| torch |" in report and ("| onnx |" in report) == (not backends)
    assert ("min cosine" in report) == (not backends)  # agreement is measured only when both ran


def test_model_shapes_are_the_production_models_without_their_vocabulary():
    """--shape llama-3.2-1b / -3b: the same transformer as Meta's (non-embedding parameters: 0.97B and
    2.8B, from their configs), so throughput and MFU measured on it carry over."""
    import torch
    from transformers import AutoTokenizer

    from feedret.encoder.build_tiny import build_model

    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "feedret-tiny-llama")
    for shape, want in (("llama-3.2-1b", 0.973e9), ("llama-3.2-3b", 2.818e9)):
        model = build_model(tok, shape, device="meta")
        outside = sum(p.numel() for n, p in model.model.named_parameters() if "embed_tokens" not in n)
        assert abs(outside / want - 1) < 0.01, (shape, outside)
        assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.bench
def test_replica_bootstrap_smoke(tmp_path):
    out = tmp_path / "bootstrap.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "replica_bootstrap.py"), "--n", "3000",
                           "--out", str(out), "--json", str(tmp_path / "raw.json")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [line for line in out.read_text().splitlines() if line.startswith("| 3,000 |")]
    assert "| 30 |" in row and "(3,030)" in row  # both replicas end with every post


@pytest.mark.bench
def test_rollout_smoke(tmp_path):
    out = tmp_path / "rollout.md"
    raw = tmp_path / "raw.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rollout.py"), "--posts", "300", "--phase-s", "2",
                           "--grace-s", "1", "--publish-rate", "5", "--out", str(out), "--json", str(raw)],
                          capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    rows = {r["phase"]: r for r in json.loads(raw.read_text())["rows"]}
    assert all(r["failed"] == 0 and r["queries"] > 0 for phase, r in rows.items() if phase != "promote")
    assert rows["steady"]["models"] == ["feedret-movielens-tiny-v2"] and rows["promoted"]["models"] == ["feedret-tiny-llama-v0"]
    assert "| old generation retired after the promote | yes |" in out.read_text()


@pytest.mark.bench
def test_retrieve_batch_smoke(tmp_path):
    out = tmp_path / "batch.md"
    raw = tmp_path / "raw.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "retrieve_batch.py"), "--n", "3000", "--queries", "32",
                           "--batch", "16", "--rounds", "1", "--k", "50", "--out", str(out), "--json", str(raw)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(raw.read_text())["rows"]
    assert {r["mode"] for r in rows} == {"single", "concurrent", "batch"} and all(r["qps"] > 0 for r in rows)
    assert "RetrieveBatch of 16" in out.read_text()


@pytest.mark.bench
def test_freshness_sustained_smoke(tmp_path):
    out = tmp_path / "fresh.md"
    raw = tmp_path / "raw.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "freshness_sustained.py"), "--rate", "5",
                           "--rate", "10", "--seconds", "2", "--out", str(out), "--json", str(raw)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(raw.read_text())["rows"]
    assert [r["posts"] for r in rows] == [10, 20] and all(0 < r["p50_ms"] <= r["p99_ms"] for r in rows)


@pytest.mark.bench
def test_codec_growth_smoke(tmp_path):
    out, raw = tmp_path / "codecs.md", tmp_path / "raw.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "codec_growth.py"), "--sizes", "3000", "6000",
                           "--dim", "32", "--queries", "5", "--ks", "10", "100", "--max-float32", "3000",
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--json", str(raw),
                           "--plot", str(tmp_path / "plot.png")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(raw.read_text())["rows"]
    by = {(r["codec"], r["n"]): r for r in rows}
    assert ("float32", 6000) not in by and ("binary-disk", 6000) in by  # float32 stops at --max-float32
    assert by[("float32", 3000)]["search"]["100"]["recall"] == 1.0
    assert by[("binary-disk", 3000)]["store_bytes_per_post"] == 4  # 32 sign bits; float32 from disk
    assert all(r["restore_s"] > 0 and r["snapshot_bytes_per_post"] > 0 for r in rows)
    assert "## Memory per post" in out.read_text() and (tmp_path / "plot.png").stat().st_size > 0


@pytest.mark.bench
def test_width_codec_smoke(tmp_path):
    import numpy as np

    from feedret.dataprep.format import Interaction, Item, write_dataset

    rng = np.random.default_rng(0)
    genres = ["Comedy", "Drama", "Horror", "Romance"]
    items = [Item(i, f"Movie {i}. Genres: {genres[i % 4]}", float(i), lang="en") for i in range(1, 301)]
    likes = [Interaction(f"m{m}", int(rng.integers(1, 301)), float(t), 5.0) for m in range(30) for t in range(40)]
    write_dataset(tmp_path / "ds", items, likes, meta={"name": "synthetic"})
    raw = tmp_path / "raw.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "width_codec.py"), "--dataset", str(tmp_path / "ds"),
                           "--queries", "40", "--torch-threads", "1", "--cache-dir", str(tmp_path / "cache"),
                           "--out", str(tmp_path / "wc.md"), "--json", str(raw)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(raw.read_text())["rows"]
    assert {(r["width"], r["codec"]) for r in rows} >= {(128, "float32"), (16, "binary")}
    full = next(r for r in rows if r["width"] == 128 and r["codec"] == "float16")
    assert full["bytes_per_post"] == 256 and 0 <= full["all_recall@100"] <= 1


@pytest.mark.bench
def test_codec_growth_sweeps_ivf_breadth(tmp_path):
    out, raw = tmp_path / "codecs.md", tmp_path / "raw.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "codec_growth.py"), "--sizes", "50000",
                           "--dim", "16", "--queries", "5", "--ks", "100", "--codecs", "int8", "ivf-int8",
                           "--nprobes", "4", "256", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                           "--json", str(raw)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by = {r["codec"]: r for r in json.loads(raw.read_text())["rows"]}
    assert "breadth" not in by["int8"]  # an exact store has no breadth to sweep
    narrow, wide = by["ivf-int8"]["breadth"]
    assert (narrow["nprobe"], wide["nprobe"]) == (4, 256) and wide["recall"] >= narrow["recall"]
    assert wide["recall"] > 0.9  # a quarter of the 1,024 lists: nearly exact
    assert "## IVF breadth" in out.read_text()

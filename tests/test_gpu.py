"""The CUDA paths, run where there is a GPU: training with bf16 and LoRA, encoders (torch and the
ONNX CUDA provider), the torch exact store and the faiss GPU copy of an IVF index.

Each test skips, saying why, where its piece is missing (no CUDA device; an onnxruntime
without the CUDA provider; faiss without GPUs), so the suite passes on CPU machines.
`benchmarks/gpu_suite.sh` runs this module on a lent GPU machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from feedret.encoder.model import Encoder  # noqa: E402
from feedret.events import parse_post_event  # noqa: E402
from feedret.indexer.shard_index import IndexOptions, SearchFilter, ShardIndex  # noqa: E402
from tests.test_trainer import BASE, config, dataset, weights  # noqa: E402,F401 - dataset is a fixture

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "feedret-movielens-tiny"


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def torch_weights(model_dir) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {n: w.float().numpy() for n, w in load_file(str(model_dir / "model.safetensors")).items()}


def unit(n: int, d: int = 64, seed: int = 0) -> np.ndarray:
    vecs = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def overlap(a: list, b: list) -> float:
    return len(set(a) & set(b)) / max(len(a), 1)


@pytest.fixture(scope="module")
def posts():
    with (ROOT / "data" / "sample" / "posts.jsonl").open() as f:
        return [parse_post_event(next(f)) for _ in range(64)]


def test_lora_bf16_and_gradient_checkpointing_train_on_the_gpu(dataset, tmp_path):  # noqa: F811
    cfg = config(dataset, tmp_path, device="cuda", bf16=True, base_model=str(BASE), numeric="none",
                 lora={"r": 4, "alpha": 8, "dropout": 0.0}, gradient_checkpointing=True)
    from feedret.training.trainer import train

    model_dir = train(cfg)
    base = {n.removeprefix("model."): w for n, w in weights(BASE).items() if not n.startswith("lm_head")}
    tuned = torch_weights(model_dir)  # bf16 with LoRA: the base is loaded in bf16 to save memory
    assert set(tuned) == set(base)
    changed = {n for n in base if not np.allclose(base[n], tuned[n], atol=1e-2)}  # beyond bf16 rounding
    assert changed and all(n.rsplit(".", 2)[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for n in changed), changed
    assert all(np.isfinite(w).all() for w in tuned.values())


def test_the_torch_encoder_on_the_gpu_matches_the_cpu(posts):
    cpu = Encoder.from_pretrained(MODEL, device="cpu").embed_posts(posts)
    gpu = Encoder.from_pretrained(MODEL, device="cuda").embed_posts(posts)  # bfloat16 there
    assert cosines(cpu, gpu).min() >= 0.99, cosines(cpu, gpu).min()


def test_the_onnx_cuda_provider_matches_torch(posts, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA provider (the `gpu` extra installs onnxruntime-gpu)")
    from feedret.encoder.onnx_backend import OnnxEncoder

    model_dir = tmp_path / "model"
    shutil.copytree(MODEL, model_dir, ignore=shutil.ignore_patterns("onnx"))
    onnx = OnnxEncoder.from_pretrained(model_dir, device="cuda")
    assert "CUDAExecutionProvider" in onnx.session.get_providers()
    want = Encoder.from_pretrained(model_dir, device="cpu").embed_posts(posts)
    assert cosines(onnx.embed_posts(posts), want).min() >= 0.999


def test_flat_on_the_gpu_is_the_torch_store_there_and_exact():
    vecs = unit(20_000, seed=0)
    ids = np.arange(len(vecs))
    out = {}
    for device in ("cpu", "cuda"):
        ix = ShardIndex(64, options=IndexOptions(device=device))
        ix.upsert(ids, vecs, [0.0] * len(ids), ["en"] * len(ids), 0.0, model_versions=["m1"] * len(ids))
        ix.delete(ids[:100].tolist())
        out[device] = [ix.search(q, 2500, SearchFilter(exclude_post_ids=[int(i) for i in ids[100:110]]))[0].tolist()
                       for q in vecs[:5]]
        assert ix.device.startswith(device)
    for a, b in zip(out["cpu"], out["cuda"]):
        assert a[:10] == b[:10] and overlap(a, b) >= 0.999  # float sums differ a little: near-ties may swap


def test_the_faiss_gpu_copy_matches_the_cpu_index():
    faiss = pytest.importorskip("faiss")
    if faiss.get_num_gpus() == 0:
        pytest.skip("faiss sees no GPU (the `gpu` extra installs faiss-gpu)")
    vecs = unit(50_000, seed=1)
    ids = np.arange(len(vecs))
    out = {}
    for device in ("cpu", "cuda:0"):
        opts = IndexOptions(index_factory="IVF64,Flat", train_size=10_000, nprobe=64, device=device, background=False)
        ix = ShardIndex(64, options=opts)
        ix.upsert(ids, vecs, [0.0] * len(ids), ["en" if i % 4 else "de" for i in ids], 0.0,
                  model_versions=["m1"] * len(ids))
        ix.delete(ids[:500].tolist())
        assert ix.device == device
        filters = (None, SearchFilter(exclude_post_ids=[int(i) for i in ids[500:600]]), SearchFilter(languages=["de"]))
        out[device] = [[ix.search(q, k, f)[0].tolist() for f in filters] for q in vecs[:5] for k in (100, 2000, 3000)]
        if device != "cpu":
            info = ix.info()
            assert info.gpu_searches > 0 and info.gpu_declined > 0  # k=3,000 goes to the CPU index
            # Concurrent searches go to the GPU as one search, with the answers each gets alone.
            assert ix.batches_searches
            cases = [(q, k, f) for q in vecs[5:9] for k in (100, 2000) for f in filters]
            batched = ix.search_batch(np.stack([c[0] for c in cases]), [c[1] for c in cases], [c[2] for c in cases])
            for (q, k, f), (got, _) in zip(cases, batched):
                assert overlap(got.tolist(), ix.search(q, k, f)[0].tolist()) >= 0.99
    for per_filter_cpu, per_filter_gpu in zip(out["cpu"], out["cuda:0"]):
        for a, b in zip(per_filter_cpu, per_filter_gpu):
            assert len(a) == len(b) and a[:10] == b[:10] and overlap(a, b) >= 0.99

"""The ONNX Runtime backend on the committed tiny Llama: parity with torch, stale exports, backend selection.

Everything is exported into tmp_path (a copy of the model directory), never into models/.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import structlog
import structlog.testing

from feedret.config import EncoderConfig
from feedret.encoder.model import Encoder
from feedret.encoder.onnx_backend import (
    INPUT_NAMES,
    OUTPUT_NAME,
    OnnxEncoder,
    StaleExportError,
    export_info_path,
    export_onnx,
    pick_providers,
)
from feedret.events import parse_post_event
from feedret.members import MemberProfile
from feedret.encoder.loader import load_encoder

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "feedret-tiny-llama"
MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A private copy of the tiny model, so exports land in tmp, not in models/."""
    out = tmp_path_factory.mktemp("model") / "feedret-tiny-llama"
    shutil.copytree(MODEL, out, ignore=shutil.ignore_patterns("onnx"))
    return out


@pytest.fixture(scope="module")
def posts():
    with open(ROOT / "data" / "sample" / "posts.jsonl") as f:
        lines = f.readlines()
    return [parse_post_event(line) for line in lines[::60]]  # 50 posts from across the file


@pytest.fixture(scope="module")
def members():
    with open(ROOT / "data" / "sample" / "members.jsonl") as f:
        return [MemberProfile.from_json(json.loads(line)) for line in f]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_onnx_matches_torch_for_posts_and_members_at_batch_sizes_1_and_7(model_dir, posts, members, pooling):
    # The missing export is made on first use (model.onnx for the model's own pooling).
    onnx = OnnxEncoder.from_pretrained(model_dir, pooling=pooling, batch_size=7, torch_threads=2)
    torch_enc = Encoder.from_pretrained(model_dir, pooling=pooling, batch_size=7)
    assert onnx.onnx_path.exists() and onnx.onnx_path.parent == model_dir / "onnx"
    assert onnx.pooling == pooling and onnx.dim == torch_enc.dim == 128
    assert onnx.model_version == torch_enc.model_version and onnx.quantizer is not None

    post_prompts = [onnx.post_prompt(p) for p in posts]
    member_prompts = [onnx.member_prompt(m) for m in members]
    assert post_prompts == [torch_enc.post_prompt(p) for p in posts]
    assert member_prompts == [torch_enc.member_prompt(m) for m in members]
    # The torch-free tokenizer gives the same ids, and the lengths really vary (members are truncated).
    assert onnx.tokenize(post_prompts + member_prompts) == torch_enc.tokenize(post_prompts + member_prompts)
    lengths = {len(ids) for ids in onnx.tokenize(post_prompts + member_prompts)}
    assert min(lengths) < 50 and max(lengths) == onnx.max_length and len(lengths) > 10

    want_posts, want_members = torch_enc.embed_posts(posts), torch_enc.embed_members(members)
    for batch_size in (7, 1):
        onnx.batch_size = batch_size
        got_posts, got_members = onnx.embed_posts(posts), onnx.embed_members(members)
        assert got_posts.dtype == np.float32 and got_posts.shape == want_posts.shape
        assert got_members.shape == (len(members), 128)
        np.testing.assert_allclose(np.linalg.norm(got_posts, axis=1), 1.0, atol=1e-5)
        assert cosines(got_posts, want_posts).min() >= MIN_COSINE, (pooling, batch_size)
        assert cosines(got_members, want_members).min() >= MIN_COSINE, (pooling, batch_size)
    assert onnx.embed_prompts([]).shape == (0, 128)


def test_graph_runs_at_sequence_lengths_and_batches_other_than_the_tracing_example(model_dir, tmp_path):
    out = export_onnx(model_dir, tmp_path / "direct.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    encoder = Encoder.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    for lengths in ([1], [2, 1], [5, 5, 5], [64, 3, 17, 40, 9, 1, 33], [300, 120]):
        ids, mask = encoder.pad([list(rng.integers(3, 4096, size=n)) for n in lengths])
        got = session.run([OUTPUT_NAME], {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask})[0]
        want = encoder.embed_batch(ids, mask)
        assert got.shape == (len(lengths), 128)
        assert cosines(got, want).min() >= MIN_COSINE, lengths


def test_stale_or_unrecorded_export_is_refused(model_dir, tmp_path):
    stale_dir = tmp_path / "model"
    shutil.copytree(model_dir, stale_dir, ignore=shutil.ignore_patterns("onnx"))
    export_onnx(stale_dir)
    assert OnnxEncoder.from_pretrained(stale_dir).model_version == "feedret-tiny-llama-v0"

    # The model directory moves on (retrained: new model_version) but the export stays.
    meta_path = stale_dir / "feedret.json"
    meta = json.loads(meta_path.read_text())
    meta["model_version"] = "feedret-tiny-llama-v1"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StaleExportError, match=r"stale ONNX export .*model_version 'feedret-tiny-llama-v0'"):
        OnnxEncoder.from_pretrained(stale_dir)

    # A graph made with one pooling is not served for another.
    meta["model_version"] = "feedret-tiny-llama-v0"
    meta_path.write_text(json.dumps(meta))
    last_graph = stale_dir / "onnx" / "model.onnx"
    with pytest.raises(StaleExportError, match=r"pooling 'last' \(serving wants 'mean'\)"):
        OnnxEncoder.from_pretrained(stale_dir, pooling="mean", onnx_path=last_graph)
    # ... nor one whose provenance is unknown.
    export_info_path(last_graph).unlink()
    with pytest.raises(StaleExportError, match="model.export.json beside it"):
        OnnxEncoder.from_pretrained(stale_dir)


def test_an_export_of_weights_since_retrained_under_the_same_version_is_refused(model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    retrained = tmp_path / "model"
    shutil.copytree(model_dir, retrained, ignore=shutil.ignore_patterns("onnx"))
    export_onnx(retrained)
    weights = retrained / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] * 1.01  # another training run: same names, shapes and version
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(StaleExportError, match=r"weights '[0-9a-f]+' \(the model directory's are '[0-9a-f]+': retrained\?\)"):
        OnnxEncoder.from_pretrained(retrained)
    export_onnx(retrained)  # re-exported, it serves again
    assert OnnxEncoder.from_pretrained(retrained).model_version == "feedret-tiny-llama-v0"


def test_backend_is_chosen_by_encoder_config(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what load_encoder would set, kept from later tests
    onnx_path = tmp_path / "chosen" / "model.onnx"
    monkeypatch.setenv("FEEDRET_BACKEND", "onnx")
    monkeypatch.setenv("FEEDRET_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("FEEDRET_ONNX_PATH", str(onnx_path))
    monkeypatch.setenv("FEEDRET_BATCH_SIZE", "5")
    config = EncoderConfig()
    assert config.backend == "onnx" and config.onnx_path == onnx_path
    encoder = load_encoder(config)
    assert isinstance(encoder, OnnxEncoder) and encoder.onnx_path == onnx_path and onnx_path.exists()
    assert encoder.batch_size == 5

    torch_encoder = load_encoder(EncoderConfig(backend="torch", model_dir=model_dir))
    assert type(torch_encoder) is Encoder
    assert EncoderConfig(backend="onnx", onnx_path="").onnx_path is None  # empty env var: the default path
    with pytest.raises(ValueError, match="unknown encoder backend 'tensorrt'; available: torch, onnx"):
        EncoderConfig(backend="tensorrt")


def test_idle_threads_spin_unless_sleeping_is_asked_for(model_dir, monkeypatch):
    # Spinning's cost is a gap's CPU per request, its gain grows with the model
    # (benchmarks/results/encoder_idle_cpu.md), so it is the default; FEEDRET_SPIN_WAIT=false sleeps.
    def spins(encoder) -> str:
        return encoder.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    assert spins(OnnxEncoder.from_pretrained(model_dir)) == "0"  # the library call: as asked
    assert spins(OnnxEncoder.from_pretrained(model_dir, spin_wait=True)) == "1"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what load_encoder would set, kept from later tests
    assert spins(load_encoder(EncoderConfig(backend="onnx", model_dir=model_dir))) == "1"  # member and consumer
    assert spins(load_encoder(EncoderConfig(backend="onnx", model_dir=model_dir, spin_wait=False))) == "0"

    # torch's OpenMP threads: the policy goes into the environment before torch loads, in the
    # member and consumer processes as `feedret serve` starts them. Both keep OpenMP's bounded
    # spin, FEEDRET_SPIN_WAIT=false sleeps, and an operator's own OMP_WAIT_POLICY wins.
    def policy(**env_extra: str) -> str:
        code = (
            "import os, sys\n"
            "import feedret.server.member, feedret.consumer.service\n"
            "from feedret.config import EncoderConfig\n"
            "from feedret.encoder.loader import load_encoder\n"
            f"load_encoder(EncoderConfig(backend='torch', model_dir={str(model_dir)!r}))\n"
            "assert 'torch' in sys.modules\n"
            "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))\n"
        )
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "FEEDRET_SPIN_WAIT")}
        out = subprocess.run([sys.executable, "-c", code], env={**env, **env_extra}, capture_output=True, text=True,
                             timeout=120, check=True)
        return out.stdout.strip().splitlines()[-1]

    assert policy() == "unset"  # OpenMP's own bounded spin
    assert policy(FEEDRET_SPIN_WAIT="false") == "PASSIVE"
    assert policy(FEEDRET_SPIN_WAIT="false", OMP_WAIT_POLICY="active") == "active"


def test_serving_from_an_existing_export_does_not_import_torch(model_dir):
    OnnxEncoder.from_pretrained(model_dir)  # make sure the default export exists
    code = (
        "import sys\n"
        "from feedret.encoder.onnx_backend import OnnxEncoder\n"
        f"e = OnnxEncoder.from_pretrained({str(model_dir)!r})\n"
        "v = e.embed_prompts(['post\\ntext: hello', 'x'])\n"
        "assert v.shape == (2, 128), v.shape\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_devices():
    assert pick_providers("cpu") == ("cpu", ["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="device must be"):
        pick_providers("tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert pick_providers("auto")[0] == "cpu"
        with pytest.raises(ValueError, match="install onnxruntime-gpu"):
            pick_providers("cuda")
    else:
        assert pick_providers("auto")[0] == "cuda"


def test_cuda_provider_libraries_are_preloaded_before_the_session(monkeypatch, capsys):
    # onnxruntime-gpu's CUDA provider finds the pip-installed CUDA libraries only once
    # they are loaded (the GPU image puts them on no loader path: docs/kubernetes.md).
    calls = []

    class FakeOrt:
        @staticmethod
        def get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        @staticmethod
        def preload_dlls():
            calls.append("preload")
            print("Failed to load libcudnn.so.9: not found")  # what onnxruntime prints on a miss

    monkeypatch.setattr("feedret.encoder.onnx_backend._onnxruntime", lambda: FakeOrt)
    with structlog.testing.capture_logs() as logs:
        assert pick_providers("cuda:1") == ("cuda", [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"])
    assert calls == ["preload"]
    # Its print goes into one structured log line, not onto the server's stdout.
    assert capsys.readouterr().out == ""
    assert [(e["event"], e["output"]) for e in logs] == [("onnxruntime_preload_dlls", "Failed to load libcudnn.so.9: not found")]
    assert pick_providers("cpu") == ("cpu", ["CPUExecutionProvider"]) and calls == ["preload"]


@pytest.mark.parametrize("pooling", [None, "cls"])
def test_encoder_only_models_export_and_match_too(tmp_path, pooling):
    from test_encoder_only import SENTENCES, build_bert  # same directory; pytest puts it on sys.path

    bert_dir = build_bert(tmp_path / "bert")
    prompts = SENTENCES + ["x", "a much longer sentence " * 5]
    want = Encoder.from_pretrained(bert_dir, pooling=pooling, max_length=16, batch_size=3).embed_prompts(prompts)
    onnx = OnnxEncoder.from_pretrained(bert_dir, pooling=pooling, max_length=16, batch_size=3)
    assert onnx.pooling == (pooling or "mean") and not onnx.causal
    assert cosines(onnx.embed_prompts(prompts), want).min() >= MIN_COSINE

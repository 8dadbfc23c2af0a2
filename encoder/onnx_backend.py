"""ONNX Runtime serving backend for the encoder.

`export_onnx(model_dir)` traces the causal LM together with its pooling and L2
normalisation into one ONNX graph, (input_ids int64 [B, T], attention_mask int64
[B, T]) -> embeddings float32 [B, H], with batch and sequence length dynamic. It
goes to `<model_dir>/onnx/model.onnx` by default, and beside it goes
`model.export.json`, which records the model version, the pooling and a
fingerprint of the weights the graph was made from. `OnnxEncoder.from_pretrained(model_dir)`
refuses an export whose record does not match the model directory (a stale
export: another version, another pooling, or weights retrained under the same
version), and exports first when there is none.

`OnnxEncoder` is an `Encoder` in every public respect: it shares `BaseEncoder`
(prompts, tokenization, padding, length buckets) and differs only in running one
padded batch through an `onnxruntime.InferenceSession`. With an export in place
it does not import torch: the tokenizer is loaded as a plain fast tokenizer from
`tokenizer.json` (transformers' AutoTokenizer imports torch), which the export
step checked gives the same ids as AutoTokenizer; where it did not, the record
says so and serving falls back to AutoTokenizer.

The export uses torch's TorchScript-based exporter (`torch.onnx.export(...,
dynamo=False)`, deprecated but present in torch 2.13): it needs only the `onnx`
package and takes about a second for the tiny model. The dynamo exporter works
too but needs onnxscript and is several times slower to run.

    python -m feedret.encoder.onnx_backend models/feedret-tiny-llama [--pooling mean] [--out PATH]
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import structlog

from feedret.encoder.model import POOLINGS, BaseEncoder, EncoderMeta, open_model_dir

log = structlog.get_logger(__name__)

DEFAULT_OPSET = 17
ONNX_DIR = "onnx"
EXPORT_FORMAT = 2  # 2: records the weights' fingerprint
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embeddings"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

# Prompts used to check an export: they tokenize to different lengths from each
# other and from the tracing example, so a graph that baked in a shape fails.
_TRACE_PROMPTS = ("post\nauthor: a\ntext: tracing example, longer than the other one", "post\ntext: b")
_CHECK_PROMPTS = (
    "member\nrecent activity:\n- Alien (1979). Genres: Horror, Sci-Fi\n- Amadeus (1984). Genres: Drama",
    "x",
    "post\nauthor: genre:comedy\nlanguage: en\nengagements: <num>100</num>\n"
    "text: Forrest Gump (1994). Genres: Comedy, Drama, Romance, War — «émotion» 日本 123.45",
)
_MIN_CHECK_COSINE = 0.999


class StaleExportError(ValueError):
    """An ONNX export that was not made from this model directory and pooling."""


@dataclass(frozen=True)
class ExportInfo:
    """What `model.export.json` records about one export."""

    model_version: str
    pooling: str  # the pooling baked into the graph
    dim: int
    opset: int
    tokenizer: str  # "fast": PreTrainedTokenizerFast gives AutoTokenizer's ids; "auto": use AutoTokenizer
    # The pooling the torch Encoder picks for this model when none is asked for, and whether
    # it is a causal LM (end token appended): serving needs both without loading the model.
    default_pooling: str = ""
    causal: bool = True
    weights: str = ""  # weights_fingerprint() of the model directory exported
    format: int = EXPORT_FORMAT
    exporter: str = "torch.onnx.export(dynamo=False)"
    torch: str = ""
    transformers: str = ""
    onnx: str = ""
    exported_at: str = ""

    @classmethod
    def read(cls, path: Path) -> "ExportInfo":
        obj = json.loads(path.read_text(encoding="utf-8"))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in obj.items() if k in known})

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")


def _onnxruntime():
    """onnxruntime (or onnxruntime-gpu), imported on use: the torch backend never needs it."""
    try:
        import onnxruntime
    except ModuleNotFoundError as exc:  # the base dependencies leave the build to the `cpu`/`gpu` extra
        raise ModuleNotFoundError(
            "onnxruntime is not installed: install feedret with the `cpu` extra (pip install 'feedret[cpu]'), "
            "or the `gpu` extra (onnxruntime-gpu) on CUDA machines",
            name="onnxruntime",
        ) from exc
    return onnxruntime


def default_onnx_path(model_dir: str | Path, pooling: str | None = None, meta: EncoderMeta | None = None) -> Path:
    """`<model_dir>/onnx/model.onnx` for the model's own pooling, `model-<pooling>.onnx` for another.

    Pooling is baked into the graph, so an override gets its own file instead of
    fighting over one.
    """
    model_dir = Path(model_dir)
    meta = meta or EncoderMeta.read(model_dir)
    if pooling is None or pooling == meta.pooling:
        return model_dir / ONNX_DIR / "model.onnx"
    return model_dir / ONNX_DIR / f"model-{pooling}.onnx"


def weights_fingerprint(model_dir: str | Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A digest of what the graph is made from: config.json whole, and each weight file by
    name, size and `samples` chunks spread over it, first and last included.

    A model retrained into the same directory under the same model_version differs
    all through its weights, so a few samples catch it; reading every byte of a
    multi-GB checkpoint at each start would not be worth it. An edit confined to a
    few tensors can slip past: re-export after one.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = model_dir / "config.json"
    if config.exists():
        digest.update(b"config.json\0" + config.read_bytes())
    for f in sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        size = f.stat().st_size
        digest.update(f"{f.name}\0{size}\0".encode())
        with f.open("rb") as handle:
            offsets = sorted({round(i * max(size - chunk, 0) / max(samples - 1, 1)) for i in range(samples)})
            for offset in offsets:
                handle.seek(offset)
                digest.update(handle.read(chunk))
    return digest.hexdigest()[:32]


def export_info_path(onnx_path: str | Path) -> Path:
    """The record beside an export: model.onnx -> model.export.json."""
    return Path(onnx_path).with_suffix(".export.json")


def check_export(
    onnx_path: str | Path, meta: EncoderMeta, pooling: str | None = None, model_dir: str | Path | None = None
) -> ExportInfo:
    """The export's record, or StaleExportError when it was made from another model version,
    pooling or (with `model_dir`) other weights.

    pooling None: the model's own (feedret.json's, else the architecture's default).
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        raise FileNotFoundError(f"no ONNX export at {onnx_path}")
    info_path = export_info_path(onnx_path)
    redo = f"re-export with `python -m feedret.encoder.onnx_backend <model_dir> --out {onnx_path}`, or delete it"
    if not info_path.exists():
        raise StaleExportError(
            f"ONNX export {onnx_path} has no {info_path.name} beside it, so what it was made from is unknown; {redo}"
        )
    try:
        info = ExportInfo.read(info_path)
    except (ValueError, TypeError) as exc:
        raise StaleExportError(f"cannot read {info_path}: {exc}; {redo}") from exc
    if info.format != EXPORT_FORMAT:
        raise StaleExportError(f"ONNX export {onnx_path} has record format {info.format}, expected {EXPORT_FORMAT}; {redo}")
    want = pooling or meta.pooling or info.default_pooling
    mismatches = []
    if info.model_version != meta.model_version:
        mismatches.append(f"model_version {info.model_version!r} (the model directory is {meta.model_version!r})")
    if info.pooling != want:
        mismatches.append(f"pooling {info.pooling!r} (serving wants {want!r})")
    if model_dir is not None and info.weights != (now := weights_fingerprint(model_dir)):
        mismatches.append(f"weights {info.weights!r} (the model directory's are {now!r}: retrained?)")
    if mismatches:
        raise StaleExportError(f"stale ONNX export {onnx_path}: it was made from " + " and ".join(mismatches) + f"; {redo}")
    return info


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(model_dir: Path, kind: str = "fast") -> Any:
    """The model's tokenizer; "fast" reads tokenizer.json without importing torch, "auto" is AutoTokenizer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if kind == "fast" and (model_dir / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    from transformers import AutoTokenizer  # imports torch (transformers' configuration module does)

    return AutoTokenizer.from_pretrained(model_dir)


def _tokenizer_kind(model_dir: Path, auto_tokenizer: Any, probes: Sequence[str]) -> str:
    """"fast" when the torch-free tokenizer gives AutoTokenizer's ids and special tokens, else "auto"."""
    try:
        fast = load_tokenizer(model_dir, "fast")
    except Exception as exc:  # noqa: BLE001 - any failure means: serve with AutoTokenizer
        log.warning("onnx_fast_tokenizer_unusable", error=str(exc))
        return "auto"
    same = (
        fast.eos_token_id == auto_tokenizer.eos_token_id
        and fast.pad_token_id == auto_tokenizer.pad_token_id
        and fast(list(probes), add_special_tokens=True)["input_ids"]
        == auto_tokenizer(list(probes), add_special_tokens=True)["input_ids"]
    )
    if not same:
        log.warning("onnx_fast_tokenizer_differs", model_dir=str(model_dir), fallback="AutoTokenizer")
    return "fast" if same else "auto"


# ------------------------------------------------------------------- export


def _embedding_module(model: Any, pooling: str, causal: bool = True) -> Any:
    """The transformer, pooling and L2 normalisation as one module: (ids, mask) -> [B, H]."""
    import torch

    from feedret.encoder.model import pool

    # No KV cache: tracing it would bake the cache set-up into the graph for nothing.
    extra = {"use_cache": False} if causal else {}

    class EmbeddingGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            return pool(hidden, attention_mask, pooling)

    return EmbeddingGraph().eval()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def export_onnx(
    model_dir: str | Path,
    out_path: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    *,
    pooling: str | None = None,
    verify: bool = True,
) -> Path:
    """Export the model at model_dir (with pooling and normalisation) to ONNX; returns the .onnx path.

    Default output: `default_onnx_path(model_dir, pooling)`. The graph and its
    record appear atomically (written to a scratch folder beside them, then
    renamed), so processes exporting at the same time do not see half a file.
    With verify, the graph is run by onnxruntime on a batch of another shape than
    the tracing example and must match torch (cosine >= 0.999 per vector).
    """
    import torch
    import transformers

    from feedret.encoder.model import Encoder

    started = time.perf_counter()
    model_dir, meta = open_model_dir(model_dir)
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    out = Path(out_path) if out_path is not None else default_onnx_path(model_dir, pooling, meta)
    if out.suffix != ".onnx":
        raise ValueError(f"ONNX output path must end in .onnx, got {out}")
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - a dependency of feedret
        raise ImportError("exporting to ONNX needs the `onnx` package (pip install onnx)") from exc

    # Always exported in float32 on the CPU: what onnxruntime's CPU provider runs best.
    encoder = Encoder.from_pretrained(model_dir, device="cpu", pooling=pooling)
    pooling = encoder.pooling
    causal = bool(getattr(encoder, "causal", True))
    default_pooling = Encoder(encoder.model, encoder.tokenizer, meta).pooling
    module = _embedding_module(encoder.model, pooling, causal)
    trace_ids, trace_mask = encoder.pad(encoder.tokenize(_TRACE_PROMPTS))
    if len(set(trace_mask.sum(axis=1).tolist())) < 2:  # the example must carry padding
        raise AssertionError("tracing prompts must tokenize to different lengths")

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        tmp_model = scratch / out.name
        axes = {0: "batch", 1: "sequence"}
        with warnings.catch_warnings():
            # The tracer's notes on Python-level branches (cache set-up, SDPA's
            # q_length == 1 path) concern paths the mask-and-no-cache call never
            # takes; the graph is checked at other shapes below instead.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            torch.onnx.export(
                module,
                (torch.from_numpy(trace_ids), torch.from_numpy(trace_mask)),
                str(tmp_model),  # a str path lets models over 2 GB go to external data files
                dynamo=False,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes={
                    INPUT_NAMES[0]: axes,
                    INPUT_NAMES[1]: axes,
                    OUTPUT_NAME: {0: "batch"},
                },
                opset_version=opset,
                do_constant_folding=True,
            )
        if verify:
            _verify(tmp_model, encoder, module)
        info = ExportInfo(
            model_version=meta.model_version,
            pooling=pooling,
            dim=encoder.dim,
            opset=opset,
            tokenizer=_tokenizer_kind(model_dir, encoder.tokenizer, _TRACE_PROMPTS + _CHECK_PROMPTS),
            default_pooling=default_pooling,
            causal=causal,
            weights=weights_fingerprint(model_dir),
            torch=torch.__version__,
            transformers=transformers.__version__,
            onnx=onnx.__version__,
            exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        tmp_info = export_info_path(tmp_model)
        info.write(tmp_info)
        # External data files (models over 2 GB) first, then the record, then the graph itself.
        for f in scratch.iterdir():
            if f not in (tmp_model, tmp_info):
                os.replace(f, out.parent / f.name)
        os.replace(tmp_info, export_info_path(out))
        os.replace(tmp_model, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info(
        "onnx_exported",
        path=str(out),
        model_version=meta.model_version,
        pooling=pooling,
        opset=opset,
        mb=round(out.stat().st_size / 2**20, 1),
        seconds=round(time.perf_counter() - started, 2),
    )
    return out


def _verify(onnx_path: Path, encoder: Any, module: Any) -> None:
    ort = _onnxruntime()
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=[CPU_PROVIDER])
    ids, mask = encoder.pad(encoder.tokenize(_CHECK_PROMPTS))
    got = session.run([OUTPUT_NAME], {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask})[0]
    with torch.inference_mode():
        want = module(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()
    cos = _cosines(got, want)
    if got.shape != want.shape or float(cos.min()) < _MIN_CHECK_COSINE:
        raise RuntimeError(
            f"the ONNX export does not reproduce torch at shape {ids.shape}: "
            f"output {got.shape} vs {want.shape}, min cosine {float(cos.min()):.6f}"
        )


# ------------------------------------------------------------------ serving


def pick_providers(device: str) -> tuple[str, list[Any]]:
    """("cpu" | "cuda", onnxruntime providers) for device "cpu", "cuda[:N]" or "auto".

    "auto" takes CUDA when this onnxruntime has it (the onnxruntime-gpu build),
    else the CPU; an explicit "cuda" without it is an error, as for the torch Encoder.
    """
    ort = _onnxruntime()

    available = ort.get_available_providers()
    if device == "auto":
        device = "cuda" if CUDA_PROVIDER in available else "cpu"
    if device.startswith("cuda"):
        if CUDA_PROVIDER not in available:
            raise ValueError(
                f"device {device!r} requested but onnxruntime has no {CUDA_PROVIDER} "
                f"(available: {', '.join(available)}); install onnxruntime-gpu (the `gpu` extra)"
            )
        device_id = int(device.split(":", 1)[1]) if ":" in device else 0
        # The CUDA provider's libraries (CUDA runtime, cuBLAS, cuDNN) are pip wheels beside
        # torch's, on no loader path: load them first, or the provider cannot start.
        if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21
            # It print()s what fails to load: into the log instead, as one structured line.
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                ort.preload_dlls()
            if printed.getvalue().strip():
                log.warning("onnxruntime_preload_dlls", output=printed.getvalue().strip())
        return "cuda", [(CUDA_PROVIDER, {"device_id": device_id}), CPU_PROVIDER]
    if device != "cpu":
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}")
    return "cpu", [CPU_PROVIDER]


class OnnxEncoder(BaseEncoder):
    """The encoder run by ONNX Runtime: same prompts, tokens, batches and vectors as `Encoder`."""

    def __init__(
        self,
        session: Any,
        tokenizer: Any,
        meta: EncoderMeta,
        *,
        dim: int,
        device: str = "cpu",
        max_length: int | None = None,
        batch_size: int = 64,
        pooling: str | None = None,
        onnx_path: Path | None = None,
        causal: bool = True,
    ) -> None:
        # Only an encoder-only model's export says causal=False, and only a BaseEncoder
        # that knows such models takes the flag.
        extra: dict[str, Any] = {} if causal else {"causal": False}
        super().__init__(tokenizer, meta, max_length=max_length, batch_size=batch_size, pooling=pooling, **extra)
        self.session = session
        self.device = device
        self.onnx_path = onnx_path
        self._dim = int(dim)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        max_length: int | None = None,
        batch_size: int = 64,
        torch_threads: int | None = None,
        pooling: str | None = None,
        onnx_path: str | Path | None = None,
        spin_wait: bool = False,
    ) -> "OnnxEncoder":
        """Load the export for the model at path (exporting it first if missing).

        torch_threads sets onnxruntime's intra-op threads (None: onnxruntime's default),
        so the same setting means the same thing for both backends. spin_wait: idle
        intra-op threads spin for the next run (onnxruntime's default) instead of sleeping.
        """
        ort = _onnxruntime()

        model_dir, meta = open_model_dir(path)
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        device, providers = pick_providers(device)
        onnx_file = Path(onnx_path) if onnx_path else default_onnx_path(model_dir, pooling, meta)
        if not onnx_file.exists():
            log.info("onnx_export_missing", path=str(onnx_file), model_dir=str(model_dir), pooling=pooling or "model's")
            export_onnx(model_dir, onnx_file, pooling=pooling)
        info = check_export(onnx_file, meta, pooling, model_dir)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = int(torch_threads or 0)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        options.log_severity_level = 3  # errors only: the server's logs are structlog lines
        session = ort.InferenceSession(str(onnx_file), sess_options=options, providers=providers)
        if device == "cuda" and CUDA_PROVIDER not in session.get_providers():
            raise RuntimeError(f"onnxruntime could not start {CUDA_PROVIDER} (CUDA/cuDNN libraries missing?)")
        width = session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != info.dim:
            raise StaleExportError(f"ONNX export {onnx_file} outputs width {width} but its record says {info.dim}")
        tokenizer = load_tokenizer(model_dir, info.tokenizer)
        log.info(
            "onnx_encoder_loaded",
            path=str(onnx_file),
            providers=session.get_providers(),
            intra_op_threads=options.intra_op_num_threads,
            tokenizer=info.tokenizer,
        )
        return cls(
            session,
            tokenizer,
            meta,
            dim=info.dim,
            device=device,
            max_length=max_length,
            batch_size=batch_size,
            pooling=info.pooling,  # check_export made sure it is the one asked for
            onnx_path=onnx_file,
            causal=info.causal,
        )

    @property
    def dim(self) -> int:
        return self._dim

    def embed_batch(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = self.session.run([OUTPUT_NAME], {INPUT_NAMES[0]: input_ids, INPUT_NAMES[1]: attention_mask})[0]
        return np.asarray(out, dtype=np.float32)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from feedret.logging import configure_logging

    parser = argparse.ArgumentParser(prog="python -m feedret.encoder.onnx_backend", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: <model_dir>/onnx/model.onnx")
    parser.add_argument("--pooling", choices=POOLINGS, default=None, help="default: the model's feedret.json")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch check")
    args = parser.parse_args(argv)
    configure_logging("onnx-export")
    print(export_onnx(args.model_dir, args.out, args.opset, pooling=args.pooling, verify=not args.no_verify))


if __name__ == "__main__":
    main()

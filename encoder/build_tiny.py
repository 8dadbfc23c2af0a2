"""Build the tiny, randomly initialised Llama checkpoint the servers use by default.

Run:  python -m feedret.encoder.build_tiny --out models/feedret-tiny-llama

It is a stand-in with the real model's shape of interface (a Hugging Face
causal LM directory plus feedret.json), small enough to commit (< 5 MB) and to
run on a laptop CPU. Its weights are random (seed 0): retrieval quality is not
its job. Deterministic: the same sample data gives the same files.

`--shape llama-3.2-1b` or `llama-3.2-3b` builds the same thing at a production
model's size (its layers, widths and heads; the vocabulary stays this sample's),
saved in bfloat16, for throughput and MFU measurements on a GPU where no real
checkpoint can be downloaded:

    python -m feedret.encoder.build_tiny --shape llama-3.2-3b --device cuda --out /tmp/llama-3b-shape
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Sequence

import structlog

from feedret.encoder.model import share_model_dir
from feedret.encoder.prompts import NUM_CLOSE, NUM_OPEN, member_prompt, post_prompt
from feedret.encoder.quantize import FeatureQuantizer
from feedret.events import PostEvent, parse_post_event
from feedret.members import MemberProfile

log = structlog.get_logger(__name__)

MODEL_VERSION = "feedret-tiny-llama-v0"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, PAD, NUM_OPEN, NUM_CLOSE]
VOCAB_SIZE = 4096
SEED = 0


def read_posts(path: Path) -> list[PostEvent]:
    with path.open(encoding="utf-8") as f:
        return [parse_post_event(line) for line in f if line.strip()]


def read_members(path: Path) -> list[MemberProfile]:
    with path.open(encoding="utf-8") as f:
        return [MemberProfile.from_json(json.loads(line)) for line in f if line.strip()]


def fit_quantizer(posts: Sequence[PostEvent], members: Sequence[MemberProfile]) -> FeatureQuantizer:
    """One quantizer over every numeric feature in the sample, posts' and members' alike."""
    values: dict[str, list[float]] = {}
    for features in [p.features for p in posts] + [m.features for m in members]:
        for name, value in features.items():
            values.setdefault(name, []).append(float(value))
    return FeatureQuantizer.fit(values)


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE (any text is encodable) with BOS prepended by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="right",
        model_max_length=512,
    )


# Transformer shapes: the committed tiny model; "small", still far from a production
# model but one whose forward pass, not the per-call overhead, dominates a CPU request
# (the member and encoder benchmarks); and Meta's Llama 3.2 1B and 3B (their
# config.json: hidden size, MLP width, layers, attention and key-value heads).
SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8),
}


def build_model(tokenizer, shape: str = "tiny", device: str = "cpu"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **SHAPES[shape],
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    with torch.device(device):  # a 3B model initialises in seconds on a GPU, minutes on a CPU
        model = LlamaForCausalLM(config).eval()
    # The production shapes in bfloat16, as they are served on a GPU; the CPU-sized ones in float32.
    return model.to(torch.bfloat16) if shape.startswith("llama") else model


def reshape(base: Path, out: Path, shape: str, device: str = "cpu") -> Path:
    """`base`'s tokenizer, prompts and feedret.json on a random Llama of `shape` (seed 0), at `out`.

    For measurements that need a model of a given size with the base's exact inputs.
    Written to a temporary directory first, so `out` is complete or absent.
    """
    import shutil

    from transformers import AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "onnx", "config.json"))
    build_model(AutoTokenizer.from_pretrained(base), shape, device).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build(posts_path: Path, members_path: Path, out: Path, shape: str = "tiny", device: str = "cpu") -> None:
    posts = [p for p in read_posts(posts_path) if p.op == "upsert"]
    members = read_members(members_path)
    quantizer = fit_quantizer(posts, members)
    # Train on the exact prompts the encoder will see, so `<num>`, field names
    # and titles get compact tokens.
    texts = [post_prompt(p, quantizer) for p in posts] + [member_prompt(m, quantizer) for m in members]
    tokenizer = wrap_tokenizer(train_tokenizer(texts))
    model = build_model(tokenizer, shape, device)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {
        "model_version": MODEL_VERSION if shape == "tiny" else f"random-{shape}-shape",
        "pooling": "last",
        "numeric": "quantized",
        "quantizer": quantizer.to_json(),
    }
    (out / "feedret.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    share_model_dir(out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log.info("tiny_model_built", out=str(out), vocab=len(tokenizer), bytes=size)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/feedret-tiny-llama"))
    parser.add_argument("--posts", type=Path, default=Path("data/sample/posts.jsonl"))
    parser.add_argument("--members", type=Path, default=Path("data/sample/members.jsonl"))
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny", help="tiny, or a production model's size")
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda: much faster for 1B/3B)")
    args = parser.parse_args(argv)
    build(args.posts, args.members, args.out, args.shape, args.device)


if __name__ == "__main__":
    main()

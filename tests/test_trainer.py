"""`feedret train` end to end on a small synthetic log: learns, saves a servable model, resumes exactly."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from feedret.dataprep.format import Interaction, Item, read_dataset, write_dataset
from feedret.encoder.model import Encoder
from feedret.training.config import TrainConfig
from feedret.dataprep.protocol import item_features, member_state, post_events
from feedret.training.trainer import train

COLOURS = ("red", "blue")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two tastes: members who like red things go on liking red things, and the same for blue."""
    rng = random.Random(0)
    items = [
        Item(i, f"{COLOURS[i % 2]} thing number {i}", created_at=0.0, features={"size": float(i % 7)})
        for i in range(40)
    ]
    log = []
    for m in range(24):
        colour = m % 2
        picks = rng.sample([i for i in range(40) if i % 2 == colour], 8)
        log += [Interaction(f"m{m}", item, float(t * 100 + m), 5.0) for t, item in enumerate(picks)]
    d = tmp_path_factory.mktemp("synthetic")
    write_dataset(d, items, log)
    return d


def config(dataset, out, **kw) -> TrainConfig:
    base = dict(
        dataset=dataset, out=out, epochs=2, batch_size=16, lr=3e-3, max_length=48, max_per_member=None,
        test_fraction=0.25, tiny={"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1},
        hard_negatives=1, checkpoint_every=3, model_version="synthetic-v1", device="cpu", torch_threads=1,
    )
    base.update(kw)
    return TrainConfig.model_validate(base)


def weights(model_dir) -> dict[str, np.ndarray]:
    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module", params=["quantized", "raw", "none"])
def trained(dataset, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("run")
    # 96 tokens hold every prompt of this character-level vocabulary (48 would cut the post text).
    return train(config(dataset, out, epochs=20, lr=1e-2, numeric=request.param, max_length=96)), request.param


def test_the_trained_model_learns_tastes_and_serves_through_encoder(trained, dataset):
    model_dir, numeric = trained
    encoder = Encoder.from_pretrained(model_dir)
    meta = json.loads((model_dir / "feedret.json").read_text())
    assert meta["model_version"] == "synthetic-v1" and meta["numeric"] == numeric
    assert encoder.dim == 32 and meta["widths"] == [32, 16, 8, 4]
    # Prompts built the way training and evaluation build them.
    ds = read_dataset(dataset)
    posts_by_id = post_events(ds.items, item_features(ds.items, ds.interactions))
    posts = encoder.embed_posts([posts_by_id[i] for i in range(40)])
    hits = 0
    for colour in (0, 1):
        history = [Interaction("new", i, float(t), 5.0) for t, i in enumerate((colour, colour + 2))]
        member = member_state("new", history, ds.items, like_threshold=4.0)
        scores = posts @ encoder.embed_members([member])[0]
        top = np.argsort(-scores)[:10]
        hits += sum(1 for i in top if i % 2 == colour)
    assert hits >= 16, f"only {hits}/20 of the top-10s match the member's taste"


def test_the_saved_model_is_readable_by_the_pods_user(trained):
    # safetensors writes 0600: a model saved by root and baked into an image or copied
    # onto a volume was unreadable to the pods' user 10001.
    model_dir, _ = trained
    umask = os.umask(0)
    os.umask(umask)
    for f in model_dir.iterdir():
        assert f.stat().st_mode & 0o444 & ~umask == 0o444 & ~umask, f"{f.name}: {oct(f.stat().st_mode)}"


def test_training_is_deterministic_and_resumes_to_the_same_weights(dataset, tmp_path, monkeypatch):
    straight = train(config(dataset, tmp_path / "a"))
    again = train(config(dataset, tmp_path / "b"))

    # Interrupt a run mid-epoch (after 13 steps; checkpoints every 3), then rerun the same command.
    from feedret.training.trainer import Trainer

    real_step, calls = Trainer.step, {"n": 0}

    def flaky_step(self, batch):
        calls["n"] += 1
        if calls["n"] > 13:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        train(config(dataset, tmp_path / "c"))
    monkeypatch.setattr(Trainer, "step", real_step)
    state = json.loads((tmp_path / "c" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 12
    resumed = train(config(dataset, tmp_path / "c"))

    w_straight, w_again, w_resumed = weights(straight), weights(again), weights(resumed)
    for name in w_straight:
        np.testing.assert_array_equal(w_straight[name], w_again[name])
        np.testing.assert_allclose(w_straight[name], w_resumed[name], atol=1e-6)


def test_quantized_runs_save_the_training_cut_points(dataset, tmp_path):
    model_dir = train(config(dataset, tmp_path, epochs=1))
    meta = json.loads((model_dir / "feedret.json").read_text())
    assert {"size", "engagements", "prior_engagements"} <= set(meta["quantizer"]["cut_points"])
    assert Encoder.from_pretrained(model_dir).quantizer is not None


def test_bad_config_is_refused(dataset, tmp_path):
    with pytest.raises(ValueError, match="matryoshka_widths"):
        config(dataset, tmp_path, matryoshka_widths=[2.0])


BASE = Path(__file__).resolve().parents[1] / "models" / "feedret-tiny-llama"


def lora_config(dataset, out, **kw) -> TrainConfig:
    return config(
        dataset, out, base_model=str(BASE), lora={"r": 4, "alpha": 8, "dropout": 0.0},
        gradient_checkpointing=True, numeric="none", **kw,
    )


def test_lora_with_gradient_checkpointing_changes_only_the_adapted_weights(dataset, tmp_path):
    model_dir = train(lora_config(dataset, tmp_path))
    assert not (model_dir / "adapter_config.json").exists()  # merged: serving needs no peft
    # The base is a causal-LM checkpoint ("model." prefix, LM head); the encoder ships the bare model.
    base = {n.removeprefix("model."): w for n, w in weights(BASE).items() if not n.startswith("lm_head")}
    tuned = weights(model_dir)
    assert set(tuned) == set(base), "the shipped model must have exactly the base model's weights"
    changed = {n for n in base if not np.array_equal(base[n], tuned[n])}
    # LoRA targets the attention projections; everything else stays frozen.
    assert changed and all(n.rsplit(".", 2)[-2] in {"q_proj", "k_proj", "v_proj", "o_proj"} for n in changed), changed
    assert any("q_proj" in n for n in changed) and any("v_proj" in n for n in changed)
    ds = read_dataset(dataset)
    posts = list(post_events(ds.items, item_features(ds.items, ds.interactions)).values())[:8]
    before, after = Encoder.from_pretrained(BASE).embed_posts(posts), Encoder.from_pretrained(model_dir).embed_posts(posts)
    np.testing.assert_allclose(np.linalg.norm(after, axis=1), 1.0, atol=1e-5)
    assert np.abs(before - after).max() > 1e-3, "the adapters must change what the model embeds"


def test_lora_runs_resume_to_the_same_adapters(dataset, tmp_path, monkeypatch):
    from feedret.training.trainer import Trainer

    straight = train(lora_config(dataset, tmp_path / "a"))
    real_step, calls = Trainer.step, {"n": 0}

    def flaky_step(self, batch):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        train(lora_config(dataset, tmp_path / "b"))
    monkeypatch.setattr(Trainer, "step", real_step)
    checkpoint = tmp_path / "b" / "checkpoint"
    assert (checkpoint / "adapter.safetensors").exists() and not (checkpoint / "model.safetensors").exists()
    resumed = train(lora_config(dataset, tmp_path / "b"))
    w_straight, w_resumed = weights(straight), weights(resumed)
    for name in w_straight:
        np.testing.assert_allclose(w_straight[name], w_resumed[name], atol=1e-6)
    with pytest.raises(ValueError, match="LoRA"):
        train(config(dataset, tmp_path / "b", base_model=str(BASE), numeric="none"))


def test_bf16_autocast_trains_on_cpu(dataset, tmp_path):
    model_dir = train(config(dataset, tmp_path, epochs=1, bf16=True, numeric="none"))
    tuned = weights(model_dir)
    assert all(w.dtype == np.float32 for w in tuned.values())  # float32 master weights
    assert Encoder.from_pretrained(model_dir).dim == 32


def test_the_model_is_served_with_the_token_limit_it_was_trained_with(trained):
    # Trained at 96: serving it at the old fixed default (128) or shorter would cut history it learned from.
    model_dir, _ = trained
    assert json.loads((model_dir / "feedret.json").read_text())["max_length"] == 96
    assert Encoder.from_pretrained(model_dir).max_length == 96
    assert Encoder.from_pretrained(model_dir, max_length=64).max_length == 64  # an explicit limit still wins


def test_a_max_length_that_cuts_post_text_is_reported(dataset, tmp_path):
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        train(config(dataset, tmp_path, epochs=1, numeric="quantized", max_length=48))
    warning = [e for e in logs if e["event"] == "post_prompts_truncated"]
    assert warning and warning[0]["share"] == 1.0 and warning[0]["log_level"] == "warning"
    # Member prompts too: half of them lose their oldest activity at 48 tokens.
    members = [e for e in logs if e["event"] == "member_prompts_truncated"]
    assert members and members[0]["share"] > 0.2 and members[0]["log_level"] == "warning"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "training" / "configs").glob("*.json")),
                         ids=lambda p: p.name)
def test_every_committed_run_config_is_valid(path):
    # The docs' reproduction commands point at these: a field renamed or retyped must not strand them.
    config = TrainConfig.model_validate(json.loads(path.read_text()))
    assert config.out.parts[:2] == ("var", "runs"), f"{path.name} writes outside var/runs: {config.out}"


def test_fresh_dropout_shows_posts_as_just_published_in_that_share_of_documents(dataset, tmp_path):
    """A model trained only on posts that carry training-period engagement counts buries every
    post that has none, i.e. every fresh one (docs/training.md, 6); fresh_dropout shows that
    share of each batch's documents as they were when published."""
    from feedret.encoder.prompts import post_prompt
    from feedret.dataprep.protocol import as_unengaged
    from feedret.training.trainer import Trainer

    post = post_events({1: Item(1, "red thing", 0.0, features={"size": 2.0})},
                       {1: {"size": 2.0, "engagements": 37.0, "mean_weight": 4.5}})[1]
    fresh = as_unengaged(post)
    assert fresh.features == {"size": 2.0, "engagements": 0.0} and fresh.text == post.text
    assert "mean_weight" not in post_prompt(fresh, None, "raw") and "engagements: 0" in post_prompt(fresh, None, "raw")

    never = Trainer(config(dataset, tmp_path / "a", epochs=1))
    always = Trainer(config(dataset, tmp_path / "b", epochs=1, fresh_dropout=1.0))
    half = Trainer(config(dataset, tmp_path / "c", epochs=1, fresh_dropout=0.5))
    docs = list(range(len(always.item_tokens)))
    assert never.fresh_tokens is None and never._doc_tokens(docs) == never.item_tokens
    assert always._doc_tokens(docs) == always.fresh_tokens != always.item_tokens
    mixed = half._doc_tokens(docs)
    shown_fresh = sum(m == f != t for m, f, t in zip(mixed, half.fresh_tokens, half.item_tokens))
    assert 0 < shown_fresh < len(docs)
    assert mixed == half._doc_tokens(docs)  # the same draw for the same step: resumable


def test_engagement_counts_as_of_the_moment_show_each_post_as_the_member_could_have_seen_it(dataset, tmp_path):
    """With engagement_counts "split" a positive's prompt carries the whole training period's count,
    its own engagement and its future included; "moment" shows the count before the example's moment."""
    from feedret.training.trainer import Trainer

    split = Trainer(config(dataset, tmp_path / "split", epochs=1, numeric="raw"))
    moment = Trainer(config(dataset, tmp_path / "moment", epochs=1, numeric="raw", engagement_counts="moment"))
    ex = moment.data.examples[0]
    j = moment.item_index[ex.positive]
    want = moment.data.as_of.features(ex.positive, ex.timestamp)
    assert want["engagements"] < split.posts[ex.positive].features["engagements"]
    decode = moment.encoder.tokenizer.decode
    shown = decode(moment._doc_tokens([j], [ex.timestamp])[0])
    assert f"engagements: {want['engagements']:g}" in shown
    assert f"engagements: {split.posts[ex.positive].features['engagements']:g}" in decode(split._doc_tokens([j])[0])
    assert moment._doc_tokens([j], [ex.timestamp]) == moment._doc_tokens([j], [ex.timestamp])  # cached, same tokens
    assert moment.train().joinpath("feedret.json").exists()  # and a run completes with it


def test_max_length_auto_keeps_the_member_history_whole_and_travels_with_the_model(dataset, tmp_path):
    # At 48 tokens half of these member prompts lose their oldest activity; "auto" sizes the limit to the data.
    from structlog.testing import capture_logs

    from feedret.training.trainer import fitting_length

    assert fitting_length([10, 20, 30], [5], limit=512) == 32 and fitting_length([300] * 20, [5], limit=256) == 256
    with capture_logs() as logs:
        model_dir = train(config(dataset, tmp_path, epochs=1, max_length="auto"))
    chosen = json.loads((model_dir / "feedret.json").read_text())["max_length"]
    assert isinstance(chosen, int) and chosen % 32 == 0
    ready = next(e for e in logs if e["event"] == "training_ready")
    assert ready["member_prompts_truncated"] <= 0.05 and ready["post_prompts_truncated"] == 0.0
    assert not [e for e in logs if e["event"] in ("member_prompts_truncated", "post_prompts_truncated")]
    assert Encoder.from_pretrained(model_dir).max_length == chosen

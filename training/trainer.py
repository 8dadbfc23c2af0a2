"""`feedret train`: fine-tune (or build and train) a causal-LM dual encoder on interactions.

One model embeds both towers. Each step takes a batch of (member state, engaged
item) examples, embeds the members, their positives and optional hard negatives,
and minimises InfoNCE over in-batch and hard negatives, wrapped in Matryoshka so
prefixes of the vector work too. Deterministic for a seed: the example order is
a seeded permutation per epoch and the model has no dropout.

Checkpoints (model in safetensors, optimizer state flattened into safetensors,
progress in JSON) go to `<out>/checkpoint` every `checkpoint_every` steps and at
each epoch's end; rerunning the same command resumes from there. The final
model, loadable by `Encoder.from_pretrained`, goes to `<out>/model`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import structlog
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from feedret.dataprep.format import read_dataset
from feedret.encoder.model import Encoder, EncoderMeta, pick_device, share_model_dir, truncated_share
from feedret.encoder.prompts import NUM_CLOSE, NUM_OPEN
from feedret.encoder.quantize import FeatureQuantizer
from feedret.training.config import TrainConfig
from feedret.dataprep.protocol import (
    Example,
    EngagementsAsOf,
    as_unengaged,
    item_features,
    post_events,
    time_split,
    training_examples,
)
from feedret.training.losses import InfoNCELoss, MatryoshkaLoss

log = structlog.get_logger(__name__)

CHECKPOINT = "checkpoint"
FINAL = "model"


# ------------------------------------------------------------------ set-up


@dataclass
class TrainingData:
    examples: list[Example]
    item_ids: np.ndarray  # every item, ascending id
    created_at: np.ndarray
    quantizer: FeatureQuantizer | None
    cutoff: float
    as_of: EngagementsAsOf  # posts' engagement features at any moment of the training period


def prepare_data(config: TrainConfig) -> tuple[TrainingData, dict]:
    """Examples, item arrays and the quantizer from the training period; the posts as events."""
    dataset = read_dataset(config.dataset)
    split = time_split(dataset.interactions, config.test_fraction)
    feats = item_features(dataset.items, split.train)
    examples = training_examples(
        split.train,
        dataset.items,
        dataset.members,
        like_threshold=config.like_threshold,
        max_recent=config.max_recent,
        max_per_member=config.max_per_member,
        seed=config.seed,
    )
    # Cut points from the training period only: items' and members' numbers alike.
    values: dict[str, list[float]] = {}
    for f in feats.values():
        for name, v in f.items():
            values.setdefault(name, []).append(v)
    for ex in examples:
        for name, v in ex.member.features.items():
            values.setdefault(name, []).append(v)
    quantizer = FeatureQuantizer.fit(values) if config.numeric == "quantized" else None
    ids = np.array(sorted(dataset.items), dtype=np.int64)
    created = np.array([dataset.items[int(i)].created_at for i in ids], dtype=np.float64)
    return TrainingData(
        examples=examples,
        item_ids=ids,
        created_at=created,
        quantizer=quantizer,
        cutoff=split.cutoff,
        as_of=EngagementsAsOf(dataset.items, split.train),
    ), post_events(dataset.items, feats)


def build_tiny(config: TrainConfig, texts: Sequence[str]):
    """A LLaMA-architecture model from scratch with a byte-level BPE trained on `texts`."""
    from transformers import LlamaConfig, LlamaModel

    from feedret.encoder.build_tiny import train_tokenizer, wrap_tokenizer

    tokenizer = wrap_tokenizer(train_tokenizer(texts, config.tiny.vocab_size))
    t = config.tiny
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=max(512, config.max_length if isinstance(config.max_length, int) else 0),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    return LlamaModel(model_config), tokenizer


def base_model_dir(name: str, cache_dir: Path | str = "var/base-models") -> str:
    """A local model directory for a base-model name: "minilm" (the all-MiniLM-L6-v2 the `eval`
    extra installs), "smollm2" or a .gguf file (converted once into `cache_dir`), or a directory."""
    from feedret.encoder.gguf import converted, gguf_source

    if name == "minilm":
        from feedret.encoder.minilm import minilm_dir

        return str(minilm_dir())
    source = gguf_source(name)
    if source is not None:
        return str(converted(source, Path(cache_dir)))
    return name


def load_base(config: TrainConfig, texts: Sequence[str], device: str):
    from transformers import AutoModel, AutoTokenizer

    if config.base_model == "tiny":
        model, tokenizer = build_tiny(config, texts)
    else:
        path = base_model_dir(config.base_model, config.base_model_cache)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
        added = tokenizer.add_special_tokens({"additional_special_tokens": [NUM_OPEN, NUM_CLOSE]})
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if added:
            model.resize_token_embeddings(len(tokenizer))
    if config.gradient_checkpointing:
        # Non-reentrant: it propagates gradients to LoRA weights inside a checkpointed
        # block even though the block's inputs (frozen embeddings) need none.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if config.lora is not None:
        try:
            from peft import LoraConfig as PeftLora, get_peft_model
        except ImportError as exc:
            raise RuntimeError("a run with `lora` needs peft: pip install -e '.[train]'") from exc

        if config.bf16:
            # The frozen base in bf16 halves its memory; peft keeps the adapters in
            # float32 so their optimizer updates are not rounded away.
            model = model.to(torch.bfloat16)
        l = config.lora
        model = get_peft_model(
            model, PeftLora(r=l.r, lora_alpha=l.alpha, lora_dropout=l.dropout, target_modules=l.target_modules)
        )
    # A full fine-tune keeps float32 master weights; bf16 then means autocast in the forward pass.
    return model.to(device), tokenizer


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "merge_and_unload")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a LoRA run changes: its checkpoint holds these, not the frozen base."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ checkpoints


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, s in state["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def sampling_log_q(positive_counts: np.ndarray, drawn_negatives: int = 0) -> np.ndarray:
    """log of how likely each item is to be a document in a batch, per example, up to a constant.

    An item enters as some example's positive, in proportion to how often it is one
    (+1 smoothing: drawn negatives may be items no example has as positive), and, with
    `drawn_negatives` > 0, as one of the negatives each example draws from all items
    (mixed negative sampling, Yang et al. 2020). Without the second term a rare drawn
    negative is corrected as if popularity had picked it, which lifts its logit by up
    to log(total positives).
    """
    counts = np.asarray(positive_counts, dtype=np.float64) + 1.0
    q = counts / counts.sum()
    if drawn_negatives:
        q = q + drawn_negatives / len(counts)
    return np.log(q)


def save_model(encoder: Encoder, loss: InfoNCELoss, out: Path, extra: dict[str, Any] | None = None) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = encoder.model
    if is_lora(model):
        # Ship merged weights, loadable without peft. This unloads the adapters from the
        # live model, so it is for the final model only; checkpoints keep them.
        model = model.merge_and_unload()
        encoder.model = model
    model.save_pretrained(tmp, safe_serialization=True)
    encoder.tokenizer.save_pretrained(tmp)
    meta = {
        "model_version": encoder.meta.model_version,
        "pooling": encoder.pooling,
        "numeric": encoder.meta.numeric,
        "max_activity": encoder.meta.max_activity,
        "activity_chars": encoder.meta.activity_chars,
        "max_length": encoder.max_length,  # serving and eval use it unless told otherwise
        "temperature": loss.temperature,
        **(extra or {}),
    }
    if encoder.meta.quantizer is not None:
        meta["quantizer"] = encoder.meta.quantizer.to_json()
    (tmp / "feedret.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    share_model_dir(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a reader never sees a half-written model


def save_checkpoint(
    out: Path, encoder: Encoder, loss: InfoNCELoss, opt: torch.optim.Optimizer, progress: dict[str, Any],
    negatives: np.ndarray | None,
) -> None:
    path = out / CHECKPOINT
    lora = is_lora(encoder.model)
    if lora:
        path.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state(encoder.model), str(path / "adapter.safetensors"))
    else:
        save_model(encoder, loss, path)
    tensors, meta = _flatten_optimizer(opt)
    save_file(tensors, str(path / "optimizer.safetensors"))
    extra = {"log_scale": loss.log_scale.detach().cpu().reshape(1)}
    if negatives is not None:
        extra["negatives"] = torch.from_numpy(negatives)
    save_file(extra, str(path / "trainer.safetensors"))
    state = {**progress, "lora": lora, "optimizer": meta}
    (path / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")


# ------------------------------------------------------------------ the loop


def fitting_length(member_tokens: Sequence[int], post_tokens: Sequence[int], limit: int, step: int = 32) -> int:
    """max_length "auto": the shortest multiple of `step` that keeps 95% of member prompts and
    99% of post prompts whole (token counts without the end token, which is added), at most `limit`."""
    need = max(
        float(np.quantile(member_tokens, 0.95)) if len(member_tokens) else 0.0,
        float(np.quantile(post_tokens, 0.99)) if len(post_tokens) else 0.0,
    ) + 1
    return int(min(limit, max(step, step * math.ceil(need / step))))


# Above this share of member prompts cut by max_length, training warns (MovieLens at 128 tokens: 95%).
MEMBER_CUT_WARN = 0.2


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        hf_logging.disable_progress_bar()  # ours is the only progress bar
        self.config = config
        self.device = pick_device(config.device)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        config.out.mkdir(parents=True, exist_ok=True)
        config.save(config.out / "config.json")

        started = time.perf_counter()
        self.data, self.posts = prepare_data(config)
        resume = config.out / CHECKPOINT
        self.progress: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "step": 0}
        state = None
        if (resume / "trainer_state.json").exists():
            state = json.loads((resume / "trainer_state.json").read_text())
            self.progress = {k: state[k] for k in ("epoch", "step_in_epoch", "step")}
            log.info("resuming", **self.progress)
        if state is not None and bool(state.get("lora")) != (config.lora is not None):
            raise ValueError(
                f"{resume} is a checkpoint of a run {'with' if state.get('lora') else 'without'} LoRA; "
                "resume it with the same config, or use a new --out"
            )
        from feedret.encoder.prompts import member_prompt, post_prompt

        post_texts = [post_prompt(p, self.data.quantizer, config.numeric) for p in self.posts.values()]
        member_texts = [
            member_prompt(e.member, self.data.quantizer, config.numeric, config.max_recent, config.activity_chars)
            for e in self.data.examples[:: max(1, len(self.data.examples) // 5000)]
        ]
        if state is not None and not state.get("lora"):
            from transformers import AutoModel, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resume)
            model = AutoModel.from_pretrained(resume).to(self.device)
        else:
            # Fresh, or LoRA resuming: rebuild the same frozen base (a seeded tiny
            # model is rebuilt bit for bit), then load the adapters below.
            model, tokenizer = load_base(config, post_texts + member_texts, self.device)
            if state is not None:
                adapter = load_file(str(resume / "adapter.safetensors"))
                params = dict(model.named_parameters())
                with torch.no_grad():
                    for name, value in adapter.items():
                        params[name].copy_(value)
        self.max_length = config.max_length
        if self.max_length == "auto":
            count = lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]  # noqa: E731
            limit = int(getattr(model.config, "max_position_embeddings", 512) or 512)
            self.max_length = fitting_length(count(member_texts), count(post_texts), limit)
            log.info("max_length_auto", max_length=self.max_length, model_positions=limit)
        meta = EncoderMeta(
            config.model_version, config.pooling, config.numeric, self.data.quantizer, config.max_recent,
            config.activity_chars,
        )
        self.encoder = Encoder(
            model, tokenizer, meta, device=self.device, max_length=self.max_length,
            batch_size=config.batch_size * 4, pooling=config.pooling,
        )
        dim = self.encoder.dim
        self.widths = config.widths(dim)
        self.base_loss = InfoNCELoss(config.temperature, learnable=config.learn_temperature).to(self.device)
        self.loss = MatryoshkaLoss(self.base_loss, self.widths)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": params, "weight_decay": config.weight_decay}]
        if config.learn_temperature:
            groups.append({"params": [self.base_loss.log_scale], "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, lr=config.lr)
        self.item_index = {int(i): n for n, i in enumerate(self.data.item_ids)}
        self.steps_per_epoch = math.ceil(len(self.data.examples) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.negatives: np.ndarray | None = None
        if state is not None:
            self.opt.load_state_dict(_unflatten_optimizer(load_file(str(resume / "optimizer.safetensors")), state["optimizer"]))
            extra = load_file(str(resume / "trainer.safetensors"))
            with torch.no_grad():
                self.base_loss.log_scale.copy_(extra["log_scale"].reshape(()))
            if "negatives" in extra:
                self.negatives = extra["negatives"].numpy()

        counts = np.zeros(len(self.data.item_ids))
        for ex in self.data.examples:
            counts[self.item_index[ex.positive]] += 1
        drawn = self.config.hard_negatives if self.config.logq_mixture else 0
        self.log_q = torch.from_numpy(sampling_log_q(counts, drawn)).float().to(self.device)

        # Tokenize once: every step reuses these.
        prompts = [self.encoder.post_prompt(self.posts[int(i)]) for i in self.data.item_ids]
        self.item_tokens = self.encoder.tokenize(prompts)
        # The same posts as when just published, for config.fresh_dropout.
        self.fresh_tokens = (
            self.encoder.tokenize([self.encoder.post_prompt(as_unengaged(self.posts[int(i)])) for i in self.data.item_ids])
            if config.fresh_dropout > 0 else None
        )
        self._prompt_tokens: dict[str, list[int]] = {}  # engagement_counts "moment": tokens by prompt
        self.member_tokens = self.encoder.tokenize([self.encoder.member_prompt(e.member) for e in self.data.examples])
        post_cut = truncated_share(self.item_tokens, self.max_length)
        if post_cut > 0.01:
            # A post prompt ends with its text, so a cut post loses its text first; when the
            # header alone fills max_length, posts differ only by their numbers and collapse.
            log.warning("post_prompts_truncated", share=round(post_cut, 3), max_length=self.max_length,
                        fix="raise max_length")
        member_cut = truncated_share(self.member_tokens, self.max_length)
        if member_cut > MEMBER_CUT_WARN:
            # A member prompt ends with its oldest activity: what the limit cuts, the model never sees.
            log.warning("member_prompts_truncated", share=round(member_cut, 3), max_length=self.max_length,
                        fix="raise max_length, or lower max_recent or activity_chars")
        log.info(
            "training_ready",
            examples=len(self.data.examples),
            items=len(self.item_tokens),
            dim=dim,
            widths=self.widths,
            params=sum(p.numel() for p in model.parameters()),
            trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
            steps=self.total_steps,
            device=self.device,
            post_prompts_truncated=round(post_cut, 3),
            member_prompts_truncated=round(member_cut, 3),
            setup_s=round(time.perf_counter() - started, 1),
        )

    # -------------------------------------------------------------- pieces


    def _lr(self, step: int) -> float:
        warm = max(1, int(self.total_steps * self.config.warmup_fraction))
        if step < warm:
            return self.config.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.total_steps - warm)
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def _embed(self, token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        ids, mask = self.encoder.pad(token_lists)
        ids_t = torch.from_numpy(ids).to(self.device)
        mask_t = torch.from_numpy(mask).to(self.device)
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.config.bf16):
            return self.encoder.forward(ids_t, mask_t)

    def _embed_all(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        from feedret.encoder.model import length_buckets

        out = np.zeros((len(token_lists), self.encoder.dim), dtype=np.float32)
        self.encoder.model.eval()
        with torch.inference_mode():
            for idx in length_buckets([len(t) for t in token_lists], self.config.batch_size * 4):
                out[idx] = self._embed([token_lists[i] for i in idx]).float().cpu().numpy()
        self.encoder.model.train()
        return out

    def mine_negatives(self, epoch: int) -> np.ndarray:
        """Per example, `hard_negatives` item indices: epoch 0 random, later from the model's own ranking.

        Sampled from ranks [lo, hi) among items that existed then and the member
        had not seen: close enough to be hard, far enough from the top that few
        are unlabelled positives.
        """
        k = self.config.hard_negatives
        n_items = len(self.data.item_ids)
        rng = np.random.default_rng(self.config.seed + 1000 + epoch)
        out = np.zeros((len(self.data.examples), k), dtype=np.int64)
        if epoch == 0:
            for e in range(len(out)):
                seen = self.data.examples[e].seen
                picks = []
                while len(picks) < k:
                    j = int(rng.integers(n_items))
                    if int(self.data.item_ids[j]) not in seen:
                        picks.append(j)
                out[e] = picks
            return out
        lo, hi = self.config.hard_negative_ranks
        hi = min(hi, n_items)
        lo = max(0, min(lo, hi - k))  # small catalogues: keep a window of at least k
        items = torch.from_numpy(self._embed_all(self.item_tokens))
        members = self._embed_all(self.member_tokens)
        for start in range(0, len(members), 1024):
            rows = range(start, min(start + 1024, len(members)))
            scores = torch.from_numpy(members[start : start + 1024]) @ items.T
            for r, e in enumerate(rows):
                seen_idx = [self.item_index[i] for i in self.data.examples[e].seen if i in self.item_index]
                scores[r, seen_idx] = -float("inf")
            top_scores, ranked = torch.topk(scores, hi, dim=1)
            for r, e in enumerate(rows):
                window = ranked[r, lo:hi][torch.isfinite(top_scores[r, lo:hi])].numpy()
                if len(window) >= k:
                    out[e] = rng.choice(window, size=k, replace=False)
                else:  # the member has seen nearly everything: any unseen item will do
                    unseen = [j for j in range(n_items) if int(self.data.item_ids[j]) not in self.data.examples[e].seen]
                    out[e] = rng.choice(unseen or list(range(n_items)), size=k, replace=len(unseen) < k)
        return out

    def _doc_tokens(self, docs_items: Sequence[int], times: Sequence[float] = ()) -> list[list[int]]:
        """Each document's tokens: the post with the engagement counts config.engagement_counts
        says (as of `times`, one per document, for "moment"); with fresh_dropout, some as the
        post was when just published."""
        fresh = np.zeros(len(docs_items), dtype=bool)
        if self.fresh_tokens is not None:
            # Seeded by the step, so a resumed run draws what it would have drawn.
            rng = np.random.default_rng((self.config.seed, self.progress["step"]))
            fresh = rng.random(len(docs_items)) < self.config.fresh_dropout
        if self.config.engagement_counts == "split":
            return [self.fresh_tokens[j] if f else self.item_tokens[j] for j, f in zip(docs_items, fresh)]
        if len(times) != len(docs_items):
            raise ValueError(f"engagement_counts 'moment' needs one time per document, got {len(times)} for {len(docs_items)}")
        out: list[list[int] | None] = [None] * len(docs_items)
        missing: dict[str, list[int]] = {}
        for k, (j, t, f) in enumerate(zip(docs_items, times, fresh)):
            if f:
                out[k] = self.fresh_tokens[j]
                continue
            item_id = int(self.data.item_ids[j])
            post = dataclasses.replace(self.posts[item_id], features=self.data.as_of.features(item_id, t))
            prompt = self.encoder.post_prompt(post)
            if prompt in self._prompt_tokens:
                out[k] = self._prompt_tokens[prompt]
            else:
                missing.setdefault(prompt, []).append(k)
        # Buckets change a few times in a post's life: each distinct prompt is tokenized once.
        for prompt, tokens in zip(missing, self.encoder.tokenize(list(missing)) if missing else ()):
            self._prompt_tokens[prompt] = tokens
            for k in missing[prompt]:
                out[k] = tokens
        return out  # type: ignore[return-value]

    def step(self, batch: Sequence[int]) -> float:
        examples = [self.data.examples[i] for i in batch]
        doc_index: dict[int, int] = {}  # item index -> position in docs
        doc_times: list[float] = []  # the moment each document is shown as of: its first example's
        for ex in examples:
            if doc_index.setdefault(self.item_index[ex.positive], len(doc_index)) == len(doc_times):
                doc_times.append(ex.timestamp)
        if self.negatives is not None and self.config.hard_negatives:
            for i in batch:
                for j in self.negatives[i]:
                    if doc_index.setdefault(int(j), len(doc_index)) == len(doc_times):
                        doc_times.append(self.data.examples[i].timestamp)
        docs_items = list(doc_index)
        labels = torch.tensor([doc_index[self.item_index[ex.positive]] for ex in examples], device=self.device)
        doc_ids = [int(self.data.item_ids[j]) for j in docs_items]
        exclude = torch.tensor(
            [[d in ex.seen for d in doc_ids] for ex in examples], dtype=torch.bool, device=self.device
        )
        q = self._embed([self.member_tokens[i] for i in batch])
        d = self._embed(self._doc_tokens(docs_items, doc_times))
        log_q = self.log_q[torch.tensor(docs_items, device=self.device)] if self.config.logq_correction else None
        loss = self.loss(q.float(), d.float(), labels, exclude, log_q)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], self.config.grad_clip)
        self.opt.step()
        return float(loss.detach())

    # -------------------------------------------------------------- run

    def train(self) -> Path:
        config = self.config
        self.encoder.model.train()
        bar = tqdm(total=self.total_steps, initial=self.progress["step"], desc="train", unit="step", dynamic_ncols=True)
        started = time.perf_counter()
        for epoch in range(self.progress["epoch"], config.epochs):
            if self.negatives is None or self.progress["step_in_epoch"] == 0:
                if config.hard_negatives:
                    t0 = time.perf_counter()
                    self.negatives = self.mine_negatives(epoch)
                    log.info("negatives_mined", epoch=epoch, s=round(time.perf_counter() - t0, 1))
            order = np.random.default_rng(config.seed + epoch).permutation(len(self.data.examples))
            batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
            losses = []
            for b in range(self.progress["step_in_epoch"], len(batches)):
                for g in self.opt.param_groups:
                    g["lr"] = self._lr(self.progress["step"])
                losses.append(self.step(batches[b].tolist()))
                self.progress.update(step=self.progress["step"] + 1, step_in_epoch=b + 1, epoch=epoch)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-50:]):.3f}", tau=f"{self.base_loss.temperature:.3f}")
                if self.progress["step"] % config.checkpoint_every == 0:
                    save_checkpoint(config.out, self.encoder, self.base_loss, self.opt, self.progress, self.negatives)
            log.info("epoch_done", epoch=epoch, loss=round(float(np.mean(losses)) if losses else float("nan"), 4),
                     temperature=round(self.base_loss.temperature, 4), s=round(time.perf_counter() - started, 1))
            self.progress.update(epoch=epoch + 1, step_in_epoch=0)
            save_checkpoint(config.out, self.encoder, self.base_loss, self.opt, self.progress, self.negatives)
        bar.close()
        self.encoder.model.eval()
        final = config.out / FINAL
        save_model(self.encoder, self.base_loss, final, {"trained_on": str(config.dataset), "cutoff": self.data.cutoff,
                                                           "widths": self.widths})
        log.info("model_saved", out=str(final), s=round(time.perf_counter() - started, 1))
        return final


def train(config: TrainConfig) -> Path:
    return Trainer(config).train()

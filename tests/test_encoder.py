"""The encoder on the committed tiny Llama: shapes, normalisation, pooling, batching."""

import json
from pathlib import Path

import numpy as np
import pytest

from feedret.encoder.model import Encoder, length_buckets
from feedret.events import parse_post_event
from feedret.members import MemberProfile

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "feedret-tiny-llama"


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.from_pretrained(MODEL, batch_size=4)


@pytest.fixture(scope="module")
def posts():
    with open(ROOT / "data" / "sample" / "posts.jsonl") as f:
        return [parse_post_event(next(f)) for _ in range(10)]


def test_vectors_are_unit_length_float32_of_the_model_width(encoder, posts):
    vecs = encoder.embed_posts(posts)
    assert vecs.shape == (10, encoder.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert encoder.model_version == "feedret-tiny-llama-v0"


def test_a_vector_does_not_depend_on_its_batch(encoder, posts):
    together = encoder.embed_posts(posts)
    alone = np.stack([encoder.embed_posts([p])[0] for p in posts[:3]])
    np.testing.assert_allclose(alone, together[:3], atol=1e-5)


def test_different_posts_get_different_vectors(encoder, posts):
    vecs = encoder.embed_posts(posts[:2])
    assert float(vecs[0] @ vecs[1]) < 0.9999


def test_members_embed_into_the_same_space(encoder):
    with open(ROOT / "data" / "sample" / "members.jsonl") as f:
        member = MemberProfile.from_json(json.loads(next(f)))
    vec = encoder.embed_members([member])
    assert vec.shape == (1, encoder.dim)
    assert "recent activity:" in encoder.member_prompt(member)


def test_prompt_longer_than_max_length_keeps_the_end_token(encoder):
    ids = encoder.tokenize(["word " * 1000])[0]
    assert len(ids) == encoder.max_length and ids[-1] == encoder.tokenizer.eos_token_id


def test_mean_pooling_is_an_option_and_differs(posts):
    last = Encoder.from_pretrained(MODEL).embed_posts(posts[:2])
    mean = Encoder.from_pretrained(MODEL, pooling="mean").embed_posts(posts[:2])
    np.testing.assert_allclose(np.linalg.norm(mean, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(last, mean)


def test_unknown_pooling_and_missing_model_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="pooling must be one of"):
        Encoder.from_pretrained(MODEL, pooling="max")
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        Encoder.from_pretrained(tmp_path)


def test_length_buckets_group_similar_lengths_and_cover_every_index():
    batches = length_buckets([5, 1, 9, 2, 8], 2)
    assert batches == [[1, 3], [0, 4], [2]]
    assert sorted(i for b in batches for i in b) == list(range(5))

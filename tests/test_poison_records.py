"""A record the encoder cannot take is set aside, never lets it stop the records around it.

Before, one post the tokenizer refused failed its whole micro-batch, and the consumer
retried that batch forever: nothing behind it was indexed, on any partition.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from feedret.consumer.batch import EncoderFailure, embed_isolating
from feedret.events import PostEvent

ROOT = Path(__file__).resolve().parents[1]


def post(i: int, text: str) -> PostEvent:
    return PostEvent(post_id=i, op="upsert", author_id="a", text=text, created_at=1.0, lang="en")


@pytest.fixture(scope="module")
def encoder():
    from feedret.encoder.model import Encoder

    return Encoder.from_pretrained(ROOT / "models" / "feedret-movielens-tiny")


def test_the_post_the_tokenizer_refuses_is_isolated_and_the_rest_embed_as_alone(encoder):
    posts = [post(i, f"post number {i} about jazz") for i in range(9)]
    # What validation now rejects, as it would reach the model if anything let it through.
    posts[5] = post(5, "a lone surrogate \ud800 here")
    done = embed_isolating(posts, encoder.embed_posts)
    assert set(done.failed) == {5} and "Error" in done.failed[5]
    assert sorted(done.vectors) == [0, 1, 2, 3, 4, 6, 7, 8]
    alone = encoder.embed_posts([posts[7]])[0]
    assert float(done.vectors[7] @ alone) > 0.999


class ScriptedEncoder:
    """Fails on what a test says: a post whose text holds a marker, or everything."""

    def __init__(self, raise_on: str = "", nan_on: str = "", broken: bool = False) -> None:
        self.raise_on, self.nan_on, self.broken = raise_on, nan_on, broken
        self.passes: list[int] = []

    def embed_posts(self, posts):
        self.passes.append(len(posts))
        if self.broken or (self.raise_on and any(self.raise_on in p.text for p in posts)):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        out = np.ones((len(posts), 4), np.float32) / 2
        for row, p in enumerate(posts):
            if self.nan_on and self.nan_on in p.text:
                out[row] = np.nan
        return out


def test_one_bad_post_in_64_costs_a_few_small_passes_not_64():
    posts = [post(i, "POISON" if i == 40 else f"fine {i}") for i in range(64)]
    enc = ScriptedEncoder(raise_on="POISON")
    done = embed_isolating(posts, enc.embed_posts)
    assert list(done.failed) == [40] and len(done.vectors) == 63
    assert len(enc.passes) <= 2 * 6 + 1  # halving: two passes per level of log2(64)


def test_posts_the_model_turns_into_nan_are_isolated_like_errors():
    posts = [post(i, "NAN" if i in (2, 3) else "fine") for i in range(6)]
    done = embed_isolating(posts, ScriptedEncoder(nan_on="NAN").embed_posts)
    assert sorted(done.failed) == [2, 3] and "not finite" in done.failed[2]
    assert all(np.isfinite(v).all() for v in done.vectors.values())


def test_a_model_that_fails_on_everything_is_the_models_fault_and_dead_letters_nothing():
    with pytest.raises(EncoderFailure, match="sound post too"):
        embed_isolating([post(i, "fine") for i in range(5)], ScriptedEncoder(broken=True).embed_posts)
    with pytest.raises(EncoderFailure):
        embed_isolating([post(1, "fine")], ScriptedEncoder(broken=True).embed_posts)


def test_a_batch_whose_only_post_is_bad_is_that_posts_fault_when_the_model_is_sound():
    done = embed_isolating([post(1, "POISON")], ScriptedEncoder(raise_on="POISON").embed_posts)
    assert list(done.failed) == [0] and not done.vectors

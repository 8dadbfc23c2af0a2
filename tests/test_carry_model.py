"""benchmarks/carry_model.py shrinks a model for the trip to the lent GPU and restores it there:
the restored model must embed as the original does (#15, point 6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "feedret-tiny-llama"


def carry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "carry_model.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_a_packed_model_is_smaller_and_unpacks_to_one_that_embeds_alike(tmp_path):
    from feedret.encoder.model import Encoder

    packed, restored = tmp_path / "packed", tmp_path / "restored"
    done = carry("pack", str(MODEL), str(packed), "--min-rows", "1000")  # the tiny vocabulary: 4,096 rows
    assert done.returncode == 0, done.stderr
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    assert size(packed) < 0.6 * size(MODEL)
    assert carry("unpack", str(packed), str(restored)).returncode == 0
    prompts = ["title: Heat (1995)\ngenres: Action|Crime", "recent activity: liked Fargo (1996); liked Up (2009)"]
    before = Encoder.from_pretrained(MODEL).embed_prompts(prompts)
    after = Encoder.from_pretrained(restored).embed_prompts(prompts)
    assert np.all((before * after).sum(axis=1) > 0.999)


def test_a_directory_without_a_model_gets_one_clear_line(tmp_path):
    done = carry("pack", str(tmp_path), str(tmp_path / "out"))
    assert done.returncode != 0 and "not a model directory" in done.stderr and "Traceback" not in done.stderr

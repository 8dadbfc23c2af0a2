"""benchmarks/member_batching.py reports a batching gain only where passes held several members."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "member_batching.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("member_batching_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def row(concurrency: int, alone_rps: float, batched_rps: float, members_per_pass: float, model: str = "committed"):
    side = {"requests": 100, "failures": 0, "p50_ms": 5.0, "p99_ms": 9.0, "cpu_ms_per_request": 9.0}
    return {"model": model, "concurrency": concurrency,
            "alone": {**side, "rps": alone_rps, "members_per_pass": 1.0},
            "batched": {**side, "rps": batched_rps, "members_per_pass": members_per_pass}}


def test_one_client_is_the_control_not_a_speedup():
    bench = load_bench()
    # What `make bench` printed as "2.56x at 1 client": both sides one member per pass.
    summary = bench.summarize([row(1, 70.0, 179.2, 1.0), row(16, 200.0, 330.0, 7.7)])
    head, _, control = summary.partition("Control")
    assert "**1.65 (16, 7.7 per pass)**" in head and "2.56" not in head
    assert "2.56 (1)" in control and "not a speedup" in control
    # A control that far from 1.0 says the two servers were not measured alike.
    assert "**Warning:**" in summary and "committed at 1 client: 2.56" in summary


def test_a_sound_control_raises_no_warning_and_no_batches_claims_nothing():
    bench = load_bench()
    sound = bench.summarize([row(1, 185.0, 176.0, 1.0), row(64, 192.0, 352.0, 30.8)])
    assert "Warning" not in sound and "**1.83 (64, 30.8 per pass)**" in sound and "0.95 (1)" in sound
    none = bench.summarize([row(1, 185.0, 176.0, 1.0), row(4, 200.0, 201.0, 1.0)])
    assert none.startswith("No batches formed") and "**" not in none

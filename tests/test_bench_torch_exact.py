"""The torch exact-search benchmark runs at a tiny size, so it still works when a GPU session needs it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "torch_exact_search.py"


@pytest.mark.parametrize("codec", ["float32", "int8"])
def test_torch_exact_search_benchmark_reports_every_batch_size(tmp_path, codec):
    spec = importlib.util.spec_from_file_location("torch_exact_search", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "report.md"
    assert bench.main(["--n", "5000", "--dim", "32", "--k", "50", "--batch-sizes", "1,4", "--codec", codec,
                       "--device", "cpu", "--seconds", "0.2", "--min-iters", "2", "--out", str(out)]) == 0
    assert f"of {codec} rows" in out.read_text()
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "4"]
    assert all(float(r.split("|")[-2].strip().rstrip("×")) > 0 for r in rows)

"""docker/image_smoke.py's check of the GPU image's CUDA libraries, run where it must fail.

The check runs inside a built image (no build here); in the test environment, a CPU
build of everything, it must name each missing GPU piece rather than pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docker"))
import image_smoke  # noqa: E402


def test_cuda_check_names_every_missing_gpu_piece_of_a_cpu_environment():
    out = subprocess.run([sys.executable, "-c", image_smoke.CUDA_CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    problems = " | ".join(report["problems"])
    assert "torch is built for CUDA None" in problems
    assert "onnxruntime has no CUDAExecutionProvider" in problems
    assert "onnxruntime has no CUDA provider library" in problems
    assert "faiss has no GPU support" in problems
    assert report["libraries_checked"] > 0  # torch's and faiss's own libraries resolve here
    assert not any(p.startswith("missing from the image") for p in report["problems"]), problems

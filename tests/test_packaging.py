"""pyproject.toml: faiss and onnxruntime come from exactly one of the `cpu` and `gpu` extras."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]


def _names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9._-]+(\[[^\]]*\])?", r).group(0).lower() for r in requirements}


def test_cpu_and_gpu_builds_are_alternative_extras():
    # faiss-cpu and faiss-gpu-cu12 (onnxruntime and onnxruntime-gpu) install the same
    # import package; the base dependencies may hold neither, or the gpu extra would
    # install both and one would overwrite the other's files.
    base = _names(PROJECT["dependencies"])
    assert not {n for n in base if n.startswith(("faiss", "onnxruntime"))}, base
    assert {"faiss-cpu", "onnxruntime"} <= _names(EXTRAS["cpu"])
    gpu = _names(EXTRAS["gpu"])
    assert "onnxruntime-gpu" in gpu and any(n.startswith("faiss-gpu") for n in gpu)
    assert not gpu & _names(EXTRAS["cpu"])
    # `pip install -e '.[test]'` (make install, CI) still brings everything the tests need.
    assert "feedret[cpu]" in _names(EXTRAS["test"])


def test_a_missing_build_says_which_extra_to_install():
    for module, importer in [
        ("faiss", "import feedret.indexer.shard_index"),
        ("onnxruntime", "from feedret.encoder.onnx_backend import pick_providers; pick_providers('cpu')"),
    ]:
        code = f"import sys; sys.modules[{module!r}] = None\n{importer}"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert f"{module} is not installed" in proc.stderr and "feedret[cpu]" in proc.stderr, proc.stderr[-2000:]


def test_an_installed_wheel_finds_its_default_model_and_sample_feed_without_a_checkout(tmp_path):
    # Built and installed outside the checkout, feedret must still serve its default model and
    # publish the sample feed (`feedret up`): both ship inside the package.
    root = Path(__file__).resolve().parents[1]
    had_build = (root / "build").exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "wheel")], check=True, timeout=300, cwd=tmp_path)
    finally:
        if not had_build:  # setuptools builds in the source tree: leave no stale copy of the code there
            shutil.rmtree(root / "build", ignore_errors=True)
    wheel = next((tmp_path / "wheel").glob("feedret-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, timeout=300, cwd=tmp_path)
    code = ("import feedret.config as c; from feedret.encoder.model import EncoderMeta; "
            "print(c.IN_CHECKOUT, c.DEFAULT_MODEL_DIR, c.SAMPLE_DIR, c.WORK_ROOT); "
            "print(EncoderMeta.read(c.DEFAULT_MODEL_DIR).model_version, "
            "sum(1 for _ in open(c.SAMPLE_DIR / 'posts.jsonl')))")
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    where, meta = out.stdout.splitlines()
    in_checkout, model_dir, sample_dir, work_root = where.split()
    assert in_checkout == "False" and model_dir.startswith(str(tmp_path / "site")) and sample_dir.startswith(str(tmp_path / "site"))
    assert work_root == str(tmp_path)  # runs and reports go where the command runs, not into site-packages
    assert meta == "feedret-movielens-tiny-v2 3000"

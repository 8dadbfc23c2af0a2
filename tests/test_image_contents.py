"""What the images install, built and run without Docker (this machine has no Docker engine).

Each image's `wheel` stage builds feedret from exactly the directories its Dockerfile
copies, and the runtime stage installs that wheel and runs `feedret serve <role>`
away from any checkout, with the model at FEEDRET_MODEL_DIR. This test does the same
steps here: the wheel from a copy of only those directories, installed without
dependencies into a fresh virtual environment (third-party packages borrowed from the
test's own environment, never feedret's editable install), then the member service
started from that environment in an empty directory, answering a real Embed. A
directory the Dockerfile forgets to copy, a module outside the wheel, a generated
proto or a file the model needs that does not ship: each fails here, as it would in
the image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feedret.v1 import feedret_pb2 as pb
from feedret.v1 import feedret_pb2_grpc as pb_grpc

from conftest import free_port_block

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = [REPO / "docker" / "Dockerfile.cpu", REPO / "docker" / "Dockerfile.gpu"]


def _stage_copies(dockerfile: Path, stage: str) -> list[tuple[str, str]]:
    """(source, destination) of each COPY in one build stage (no --from copies)."""
    copies, current = [], None
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "FROM":
            current = words[-1] if "AS" in (w.upper() for w in words) else None
        elif words[0] == "COPY" and current == stage and not any(w.startswith("--") for w in words):
            copies.append((words[1], words[2]))
    return copies


def _default_model_src(dockerfile: Path) -> str:
    for line in dockerfile.read_text().splitlines():
        if line.startswith("ARG MODEL_SRC="):
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"{dockerfile.name} sets no default MODEL_SRC")


@pytest.fixture(scope="module", params=DOCKERFILES, ids=lambda p: p.name)
def image_env(request, tmp_path_factory) -> dict[str, Path]:
    dockerfile = request.param
    root = tmp_path_factory.mktemp("image")
    src = root / "src"
    copies = _stage_copies(dockerfile, "wheel")
    assert copies, f"{dockerfile.name}'s wheel stage copies nothing"
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")  # the deps stage's copy
    for source, dest in [("pyproject.toml", "/src/pyproject.toml"), *copies]:
        target = src / Path(dest).relative_to("/src")
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / source, target)
    wheels = root / "wheels"
    # As the image's `pip wheel --no-deps`, offline: the build backend comes from this environment.
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "--wheel-dir", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, f"the wheel stage of {dockerfile.name} would fail:\n{built.stderr[-3000:]}"
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # Third-party packages from this environment. Only its directory is added: .pth files in it
    # (feedret's editable install among them) are not run, so feedret can come only from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True, timeout=300)
    model = root / "model"
    shutil.copytree(REPO / _default_model_src(dockerfile), model)  # COPY ${MODEL_SRC} /opt/feedret/model
    workdir = root / "work"
    workdir.mkdir()
    return {"venv": venv, "model": model, "workdir": workdir}


def test_the_wheel_holds_feedret_and_its_generated_protos(image_env):
    probe = ("import feedret, feedret.v1.feedret_pb2, feedret.server.roles, feedret.encoder.model, "
             "feedret.indexer.shard_index, feedret.consumer.service; print(feedret.__file__)")
    out = subprocess.run([str(image_env["venv"] / "bin" / "python"), "-c", probe], cwd=image_env["workdir"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(out.stdout.strip()).is_relative_to(image_env["venv"]), f"feedret imported from {out.stdout}"
    help_out = subprocess.run([str(image_env["venv"] / "bin" / "feedret"), "serve", "--help"],
                              cwd=image_env["workdir"], capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0 and "consumer" in help_out.stdout, help_out.stdout + help_out.stderr


@pytest.mark.e2e
def test_the_installed_member_service_serves_embeddings_from_the_baked_model(image_env):
    port = free_port_block(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEEDRET_", "PYTHONPATH"))}
    env.update({
        # The image's ENV, and what the manifests set.
        "FEEDRET_MODEL_DIR": str(image_env["model"]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HOME": str(image_env["workdir"]), "HF_HOME": str(image_env["workdir"] / "hf"),
        "FEEDRET_HOST": "127.0.0.1", "FEEDRET_PORT": str(port), "FEEDRET_METRICS_PORT": "0",
        "FEEDRET_TORCH_THREADS": "1",
    })
    proc = subprocess.Popen([str(image_env["venv"] / "bin" / "feedret"), "serve", "member"], cwd=image_env["workdir"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "the installed member service never became SERVING"
                time.sleep(0.2)
            member = pb.Member(member_id="m1", session_id="s1", profile={"headline": "film critic"})
            reply = pb_grpc.MemberEmbeddingServiceStub(channel).Embed(pb.EmbedRequest(member=member), timeout=30)
        assert len(reply.vector) > 0 and reply.model_version
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

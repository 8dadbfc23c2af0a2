"""Process entrypoints, one per role: `feedret serve consumer|shard|root|member`.

Each builds its typed config from the environment once, installs SIGTERM/SIGINT
handlers that stop it cleanly, and runs until stopped.
"""

from __future__ import annotations

import os
import signal
import sys
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


def openmp_wait_policy(spin: bool) -> None:
    """Set how torch's idle OpenMP threads wait.

    Sleeping sets OMP_WAIT_POLICY=PASSIVE; spinning leaves OpenMP's default, a bounded spin
    (ACTIVE would spin on through an idle spell). OpenMP reads the variable once, when torch
    loads it, so this must run before torch is imported; an operator's own OMP_WAIT_POLICY wins.
    """
    if not spin:
        if "torch" in sys.modules and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
            log.warning("openmp_wait_policy_too_late", wanted="PASSIVE", reason="torch was imported before the encoder")
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_encoder(config: EncoderConfig):  # -> feedret.encoder.model.BaseEncoder
    """The encoder the config asks for: torch (`Encoder`) or onnxruntime (`OnnxEncoder`),
    its idle threads spinning or sleeping as `config.spin_wait` says."""
    openmp_wait_policy(config.spin_wait)
    kwargs = dict(
        device=config.device,
        max_length=config.max_length,
        batch_size=config.batch_size,
        torch_threads=config.torch_threads or None,
    )
    if config.pooling:
        kwargs["pooling"] = config.pooling
    # Imported only by the roles that embed, so shards and the root start fast; the
    # onnx backend imports no torch once its export exists.
    if config.backend == "onnx":
        from feedret.encoder.onnx_backend import OnnxEncoder

        encoder = OnnxEncoder.from_pretrained(config.model_dir, onnx_path=config.onnx_path,
                                              spin_wait=config.spin_wait, **kwargs)
    else:
        from feedret.encoder.model import Encoder

        encoder = Encoder.from_pretrained(config.model_dir, **kwargs)
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

        EmbeddingConsumer(kafka, config, load_encoder(EncoderConfig())).run(stop)

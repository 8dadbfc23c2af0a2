"""One entry point from a typed `EncoderConfig` to an encoder: torch (`Encoder`) or onnxruntime
(`OnnxEncoder`), the same prompts, tokens and vectors either way.

The two backends' `from_pretrained` share everything but the network (`BaseEncoder`,
`open_model_dir`); what differs is how the network is loaded, so the choice between them
is made here, once, for the servers, the benchmarks and the tests. Imports no torch
itself: the onnx backend needs none once its export exists.
"""

from __future__ import annotations

import os
import sys

import structlog

from feedret.config import EncoderConfig
from feedret.encoder.model import BaseEncoder

log = structlog.get_logger(__name__)


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


def load_encoder(config: EncoderConfig) -> BaseEncoder:
    """The encoder the config asks for, its idle threads spinning or sleeping as `config.spin_wait` says."""
    openmp_wait_policy(config.spin_wait)
    common = dict(
        device=config.device,
        max_length=config.max_length,
        batch_size=config.batch_size,
        torch_threads=config.torch_threads or None,
        pooling=config.pooling or None,  # None: the model's own (feedret.json)
    )
    if config.backend == "onnx":
        from feedret.encoder.onnx_backend import OnnxEncoder

        return OnnxEncoder.from_pretrained(config.model_dir, onnx_path=config.onnx_path,
                                           spin_wait=config.spin_wait, **common)
    from feedret.encoder.model import Encoder

    return Encoder.from_pretrained(config.model_dir, **common)

"""Contrastive losses for the dual encoder, one idea per class, composable.

`InfoNCELoss` scores every member against every document in the batch (the
in-batch positives of the other members plus any mined hard negatives) and
asks for its own positive to win a softmax at temperature tau.
`MatryoshkaLoss` wraps any such loss and applies it at several prefix widths
of the same vectors, so one vector can be served truncated.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class InfoNCELoss(nn.Module):
    """Softmax cross-entropy over [own positive, every other document in the batch].

    queries [B, H] and docs [M, H] are L2-normalised; labels [B] index each
    query's positive in docs; exclude [B, M] (optional) marks documents that
    must not count as negatives for that query (items it engaged with: false
    negatives would teach it to push away what it likes); log_q [M] (optional)
    is each document's log sampling probability, subtracted from its logits.
    The temperature is fixed or learned (as a log scale, clamped like CLIP's).
    """

    def __init__(self, temperature: float = 0.05, learnable: bool = False, max_scale: float = 100.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        log_scale = torch.tensor(math.log(1.0 / temperature))
        self.log_scale = nn.Parameter(log_scale, requires_grad=learnable)
        self.max_log_scale = math.log(max_scale)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_scale.detach().clamp(max=self.max_log_scale)))

    def forward(
        self,
        queries: torch.Tensor,
        docs: torch.Tensor,
        labels: torch.Tensor,
        exclude: torch.Tensor | None = None,
        log_q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scale = self.log_scale.clamp(max=self.max_log_scale).exp()
        logits = scale * (queries @ docs.T)
        if log_q is not None:
            # Sampling-bias correction (Yi et al., RecSys 2019): in-batch negatives are
            # drawn in proportion to popularity; without this the model learns to
            # push popular items down merely for being frequent negatives.
            logits = logits - log_q.unsqueeze(0)
        if exclude is not None:
            keep_own = F.one_hot(labels, docs.shape[0]).bool()
            logits = logits.masked_fill(exclude & ~keep_own, float("-inf"))
        return F.cross_entropy(logits.float(), labels)


def truncate(x: torch.Tensor, width: int) -> torch.Tensor:
    """The first `width` dimensions, re-normalised: how a shard serves a narrower vector."""
    return F.normalize(x[..., :width], p=2, dim=-1)


class MatryoshkaLoss(nn.Module):
    """A base loss applied at several prefix widths, weighted (Kusupati et al., 2022).

    widths must be ascending-or-any ints no larger than the vector width; the
    full width is simply one of them.
    """

    def __init__(self, base: nn.Module, widths: Sequence[int], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be positive, got {list(widths)}")
        weights = list(weights) if weights is not None else [1.0] * len(widths)
        if len(weights) != len(widths):
            raise ValueError("one weight per width")
        self.base = base
        self.widths = list(widths)
        self.weights = weights

    def forward(self, queries: torch.Tensor, docs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if max(self.widths) > queries.shape[-1]:
            raise ValueError(f"width {max(self.widths)} exceeds the vector width {queries.shape[-1]}")
        total = queries.new_zeros(())
        for width, weight in zip(self.widths, self.weights):
            total = total + weight * self.base(truncate(queries, width), truncate(docs, width), *args, **kwargs)
        return total / sum(self.weights)

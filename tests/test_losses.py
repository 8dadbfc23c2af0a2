"""InfoNCE and Matryoshka losses against hand-computed values."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from feedret.training.losses import InfoNCELoss, MatryoshkaLoss, truncate


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_infonce_is_cross_entropy_over_scaled_similarities():
    q = unit([1.0, 0.0], [0.0, 1.0])
    d = unit([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    loss = InfoNCELoss(temperature=0.5)(q, d, torch.tensor([0, 1]))
    s = 1 / math.sqrt(2)
    expected = -(math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(2 * s)))) * 2 / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_a_perfect_ranking_costs_less_than_a_wrong_one():
    q = unit([1.0, 0.0], [0.0, 1.0])
    d = unit([1.0, 0.0], [0.0, 1.0])
    loss = InfoNCELoss(0.05)
    assert loss(q, d, torch.tensor([0, 1])) < 0.01 < loss(q, d, torch.tensor([1, 0]))


def test_excluded_documents_are_not_negatives_but_the_own_positive_stays():
    q = unit([1.0, 0.0])
    d = unit([1.0, 0.0], [1.0, 0.01])  # a near-duplicate the member also engaged with
    loss = InfoNCELoss(0.05)
    plain = loss(q, d, torch.tensor([0]))
    masked = loss(q, d, torch.tensor([0]), torch.tensor([[True, True]]))
    assert plain.item() > 0.5 and masked.item() == pytest.approx(0.0, abs=1e-6)


def test_logq_correction_lowers_the_logit_of_frequent_documents():
    q = unit([1.0, 0.0])
    d = unit([1.0, 0.0], [0.9, 0.1])
    loss = InfoNCELoss(0.1)
    popular_negative = torch.log(torch.tensor([0.01, 0.99]))
    assert loss(q, d, torch.tensor([0]), log_q=popular_negative) < loss(q, d, torch.tensor([0]))


def test_learnable_temperature_gets_a_gradient_and_fixed_does_not():
    q, d = unit([1.0, 0.0], [0.0, 1.0]), unit([1.0, 0.2], [0.3, 1.0])
    learn = InfoNCELoss(0.1, learnable=True)
    learn(q, d, torch.tensor([0, 1])).backward()
    assert learn.log_scale.grad is not None and learn.temperature == pytest.approx(0.1)
    assert not InfoNCELoss(0.1).log_scale.requires_grad


def test_matryoshka_averages_the_base_loss_over_prefix_widths():
    torch.manual_seed(0)
    q, d = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.arange(4)
    base = InfoNCELoss(0.1)
    got = MatryoshkaLoss(base, [8, 4, 2])(q, d, labels)
    want = sum(base(truncate(q, w), truncate(d, w), labels) for w in (8, 4, 2)) / 3
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(truncate(q, 4).norm(dim=-1), torch.ones(4))
    with pytest.raises(ValueError, match="exceeds"):
        MatryoshkaLoss(base, [16])(q, d, labels)


def test_sampling_log_q_counts_drawn_negatives_so_rare_ones_are_not_lifted():
    from feedret.training.trainer import sampling_log_q

    counts = np.array([1000.0, 10.0, 0.0, 0.0])  # one popular item, one rare, two never a positive
    popularity = sampling_log_q(counts)
    assert popularity[0] > popularity[1] > popularity[2] == popularity[3]
    # Correction subtracts log q: popularity alone lifts an unseen drawn negative ~6 nats over the popular item.
    assert popularity[0] - popularity[2] > 6.5
    mixed = sampling_log_q(counts, drawn_negatives=2)
    assert mixed[0] > mixed[1] > mixed[2] == mixed[3]
    # Each example draws 2 of 4 items: every item is at least as likely as one draw, so the lift is bounded.
    assert mixed[0] - mixed[2] < math.log(1.0 + 1.0 / (2 / 4))
    assert np.allclose(np.exp(popularity).sum(), 1.0)

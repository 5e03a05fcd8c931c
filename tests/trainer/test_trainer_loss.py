"""Bradley-Terry loss and accuracy on literal tensors."""

from __future__ import annotations

import math

import pytest
import torch

from prefstream.trainer.loss import bradley_terry_loss, pair_accuracy, pair_margin


def test_loss_of_equal_rewards_is_log2() -> None:
    r = torch.tensor([0.3, -1.0])
    assert bradley_terry_loss(r, r).item() == pytest.approx(math.log(2))


def test_loss_matches_the_formula() -> None:
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = (-math.log(1 / (1 + math.exp(-2))) - math.log(1 / (1 + math.exp(1)))) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(expected, rel=1e-6)


def test_margin_is_subtracted_from_the_difference() -> None:
    rc, rr = torch.tensor([1.0]), torch.tensor([0.0])
    with_margin = bradley_terry_loss(rc, rr, margin=torch.tensor([1.0]))
    assert with_margin.item() == pytest.approx(math.log(2))


def test_centering_adds_coef_times_squared_sum() -> None:
    rc, rr = torch.tensor([3.0]), torch.tensor([1.0])
    plain = bradley_terry_loss(rc, rr)
    centered = bradley_terry_loss(rc, rr, center_coef=0.01)
    assert (centered - plain).item() == pytest.approx(0.01 * 16)


def test_loss_falls_as_the_gap_grows_and_has_gradients() -> None:
    rc = torch.tensor([0.0], requires_grad=True)
    loss = bradley_terry_loss(rc, torch.tensor([0.0]))
    loss.backward()
    assert rc.grad is not None and rc.grad.item() == pytest.approx(-0.5)
    assert bradley_terry_loss(torch.tensor([5.0]), torch.tensor([0.0])) < loss


def test_accuracy_counts_ties_as_wrong() -> None:
    rc, rr = torch.tensor([1.0, 0.5, 0.0, 2.0]), torch.tensor([0.0, 0.5, 1.0, 1.0])
    assert pair_accuracy(rc, rr) == 0.5
    assert pair_accuracy(torch.tensor([]), torch.tensor([])) == 0.0


def test_margin_from_confidence() -> None:
    assert pair_margin(0.95, 2.0) == pytest.approx(0.9)
    assert pair_margin(0.4, 2.0) == 0.0
    assert pair_margin(0.95, 0.0) == 0.0


def test_weights_scale_each_pairs_term_and_the_mean_is_over_pairs() -> None:
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    terms = [-math.log(1 / (1 + math.exp(-2))), -math.log(1 / (1 + math.exp(1)))]
    weighted = bradley_terry_loss(rc, rr, weights=torch.tensor([0.5, 0.0]))
    assert weighted.item() == pytest.approx(0.5 * terms[0] / 2, rel=1e-6)  # a 0 weight: no pull
    ones = bradley_terry_loss(rc, rr, weights=torch.ones(2))
    assert ones.item() == pytest.approx(bradley_terry_loss(rc, rr).item())

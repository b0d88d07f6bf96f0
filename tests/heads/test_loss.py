"""The weighted MSE: inverse level frequency, normalised to mean 1 over training images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from object2brain.heads.loss import level_weights, sample_weights, weighted_mse


def test_level_weights_by_hand() -> None:
    # Training levels: three of 0, one of 2, two of -1: N = 6, L = 3 levels.
    levels = [0, 0, 0, 2, -1, -1]
    weights = level_weights(levels)
    # w_l = N / (L * n_l): 6 / (3 * 3) = 2/3, 6 / (3 * 1) = 2, 6 / (3 * 2) = 1
    assert weights == pytest.approx({0: 2 / 3, 2: 2.0, -1: 1.0})
    per_image = sample_weights(levels, weights)
    assert per_image.mean() == pytest.approx(1.0)
    assert sample_weights([5], weights).tolist() == [1.0]  # a level unseen in training
    assert sample_weights(levels, None).tolist() == [1.0] * 6


def test_weighted_mse_by_hand() -> None:
    predicted = torch.tensor([0.5, -1.0, 2.0, 0.0])
    target = torch.tensor([0.0, -1.0, 3.0, 2.0])
    weight = torch.tensor([2 / 3, 1.0, 2.0, 0.5])
    # squared errors 0.25, 0, 1, 4 -> weighted 1/6, 0, 2, 2 -> mean over 4 images
    expected = (0.25 * 2 / 3 + 0.0 + 2.0 + 2.0) / 4
    assert float(weighted_mse(predicted, target, weight)) == pytest.approx(expected)
    assert float(weighted_mse(predicted, target)) == pytest.approx((0.25 + 1 + 4) / 4)


def test_weights_balance_a_skewed_training_set() -> None:
    rng = np.random.default_rng(0)
    levels = rng.choice([-3, 0, 3], size=1000, p=[0.05, 0.8, 0.15])
    weights = sample_weights(levels, level_weights(levels))
    totals = {int(v): float(weights[levels == v].sum()) for v in (-3, 0, 3)}
    # every level carries the same total weight N / L
    assert totals == pytest.approx({-3: 1000 / 3, 0: 1000 / 3, 3: 1000 / 3})

"""The loss of a valence head: mean squared error, optionally weighted by valence level.

Weighted MSE (the default loss)::

    n_l  = number of training images of integer valence level l (level = floor(v + 0.5))
    w_l  = N / (L * n_l)        N training images, L levels present in training
    loss = mean_i  w_{l(i)} * (yhat_i - y_i)^2      (over the images of a batch)

The weights are the inverse level frequencies normalised to mean 1 over the training images
(``sum_i w_{l(i)} = N``), so every level carries the same total weight ``N / L`` and a head cannot
lower its loss by predicting the most frequent level; an image of a level absent from training
(a validation or test image) gets weight 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from object2brain.errors import DataError


def level_weights(train_levels: Sequence[int] | np.ndarray) -> dict[int, float]:
    """Inverse-frequency weight of each integer valence level, normalised to mean 1.

    ``w_l = N / (L * n_l)`` with ``n_l`` the training images of level ``l``, ``N`` all training
    images and ``L`` the number of levels present, so that ``mean_i w_{l(i)} = 1``.

    Args:
        train_levels: levels of the training images ``(N,)``.

    Returns:
        ``{level: weight}`` for every level present in training.
    """
    levels = np.asarray(train_levels, dtype=np.int64)
    if levels.size == 0:
        raise DataError("no training images: cannot compute valence level weights")
    values, counts = np.unique(levels, return_counts=True)
    n, n_levels = levels.size, values.size
    return {int(v): float(n / (n_levels * c)) for v, c in zip(values, counts, strict=True)}


def sample_weights(
    levels: Sequence[int] | np.ndarray, weights: dict[int, float] | None
) -> np.ndarray:
    """Per-image loss weights ``(n,)`` float32: ``weights[level]`` (1 for unseen levels or MSE)."""
    levels = np.asarray(levels, dtype=np.int64)
    if weights is None:
        return np.ones(levels.shape, dtype=np.float32)
    return np.asarray([weights.get(int(v), 1.0) for v in levels], dtype=np.float32)


def weighted_mse(
    predicted: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean_i w_i * (predicted_i - target_i)^2`` over ``(b,)`` tensors (MSE if no weights)."""
    squared = (predicted.reshape(-1) - target.reshape(-1)) ** 2
    if weight is None:
        return squared.mean()
    return (weight.reshape(-1) * squared).mean()

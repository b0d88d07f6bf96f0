"""Fitting a valence head on backbone features, its predictions and their metrics.

A head is ``nn.Linear(in_features, 1)`` trained on frozen features (:mod:`.features`):

1. it starts at ``weight = 0``, ``bias`` = (weighted) mean training rating;
2. it trains with Adam (``lr``, ``weight_decay``) on shuffled mini-batches of ``batch_size``
   images, the order drawn by a ``torch.Generator`` seeded with ``seed``, minimising the loss of
   :mod:`.loss` (level weights from the training rows only);
3. after every epoch the validation loss (same weights; 1 for a level absent from training)
   decides early stopping: training stops after ``patience`` epochs without improvement and the
   best epoch's weights are kept (with no validation rows: all ``epochs``, the training loss
   choosing the best epoch).

Cross-fitting (:func:`cross_fitted_predictions`) fits one such head per fold and predicts each
stimulus with the head that never saw it, so correlating predictions with ratings of the same
stimuli is not optimistic.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from object2brain.errors import DataError
from object2brain.heads.features import FeatureSource, FeatureSources
from object2brain.heads.loss import level_weights, sample_weights, weighted_mse

if TYPE_CHECKING:
    from object2brain.options import TrainHeadOptions

log = logging.getLogger("object2brain.heads")

#: Smallest batch of a prediction pass (prediction needs no gradients: larger batches are free).
PREDICT_BATCH = 64


@dataclass(frozen=True)
class RatedFeatures:
    """What a head is fitted to: features and the ratings of every stimulus.

    Attributes:
        sources: the features (:class:`~object2brain.heads.features.FeatureSources`).
        valence: ratings ``(n,)`` float64.
        levels: integer valence levels ``(n,)`` int64 (``floor(valence + 0.5)``).
    """

    sources: FeatureSources
    valence: np.ndarray
    levels: np.ndarray


@dataclass
class FitResult:
    """A trained head and its training history.

    Attributes:
        head: ``nn.Linear(in_features, 1)`` on the CPU, weights of the best validation epoch.
        history: one ``{"epoch", "train_loss", "val_loss"}`` per epoch run.
        best_epoch: 1-based epoch whose weights were kept (0: the initial head).
        best_val_loss: its validation loss (training loss when there is no validation split).
        level_weights: the loss weight of each level (``None`` for plain MSE).
    """

    head: nn.Linear
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    level_weights: dict[int, float] | None = None


def _mean_loss(
    head: nn.Linear,
    source: FeatureSource,
    rows: np.ndarray,
    targets: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
) -> float:
    """Weighted MSE of ``head`` over ``rows``, averaged over images."""
    y, w = targets
    total, count = 0.0, 0
    with torch.no_grad():
        for batch_rows, features in source.batches(rows, batch_size):
            index = torch.from_numpy(batch_rows).to(y.device)
            loss = weighted_mse(head(features).reshape(-1), y[index], w[index])
            total += float(loss) * len(batch_rows)
            count += len(batch_rows)
    return total / max(count, 1)


def _train_epoch(
    head: nn.Linear,
    optimiser: torch.optim.Optimizer,
    source: FeatureSource,
    order: np.ndarray,
    targets: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
) -> float:
    """One pass over ``order`` (training rows, shuffled); returns the mean training loss."""
    y, w = targets
    head.train()
    total = 0.0
    for batch_rows, features in source.batches(order, batch_size):
        index = torch.from_numpy(batch_rows).to(y.device)
        loss = weighted_mse(head(features).reshape(-1), y[index], w[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        total += float(loss.detach()) * len(batch_rows)
    head.eval()
    return total / len(order)


def fit_head(
    data: RatedFeatures,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    options: TrainHeadOptions,
    *,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> FitResult:
    """Train ``nn.Linear(in_features, 1)`` on the features of ``train_rows`` (module docstring).

    Args:
        data: features and ratings of every stimulus ``(n,)``.
        train_rows: stimulus rows of the training split ``(n_train,)``.
        val_rows: rows of the validation split ``(n_val,)`` (may be empty: no early stopping).
        options: ``loss``, ``epochs``, ``patience``, ``lr``, ``weight_decay``, ``batch_size``.
        seed: seed of the shuffling generator (the augmentations are seeded by the caller).
        device: where the head trains.
        progress: show a progress bar over epochs.

    Returns:
        :class:`FitResult` with the best epoch's head.
    """
    from tqdm.auto import tqdm

    if len(train_rows) == 0:
        raise DataError("the training split is empty")
    lw = level_weights(data.levels[train_rows]) if options.loss == "weighted_mse" else None
    y = torch.tensor(np.asarray(data.valence, dtype=np.float32), device=device)
    w = torch.tensor(sample_weights(data.levels, lw), device=device)
    head = nn.Linear(data.sources.in_features, 1).to(device)
    train_index = torch.as_tensor(train_rows, dtype=torch.long, device=device)
    with torch.no_grad():  # start from the constant (weighted) mean rating
        head.weight.zero_()
        head.bias.fill_(float((w[train_index] * y[train_index]).sum() / w[train_index].sum()))
    optimiser = torch.optim.Adam(
        head.parameters(), lr=options.lr, weight_decay=options.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    has_val = len(val_rows) > 0
    result = FitResult(head=head, level_weights=lw)
    best_state = copy.deepcopy(head.state_dict())
    evaluate = data.sources.eval
    if has_val:
        result.best_val_loss = _mean_loss(head, evaluate, val_rows, (y, w), options.batch_size)
    stale = 0
    bar = tqdm(range(1, options.epochs + 1), disable=not progress, unit="epoch", desc="train head")
    for epoch in bar:
        order = np.asarray(train_rows)[torch.randperm(len(train_rows), generator=generator).numpy()]
        train_loss = _train_epoch(
            head, optimiser, data.sources.train, order, (y, w), options.batch_size
        )
        val_loss = (
            _mean_loss(head, evaluate, val_rows, (y, w), options.batch_size)
            if has_val
            else train_loss
        )
        result.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        if val_loss < result.best_val_loss:
            result.best_val_loss, result.best_epoch, stale = val_loss, epoch, 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            stale += 1
            if has_val and stale >= options.patience:
                break
    bar.close()
    head.load_state_dict(best_state)
    result.head = head.cpu().eval()
    return result


def predict(
    head: nn.Linear, source: FeatureSource, rows: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Predicted valence of ``rows`` ``(n_rows,)`` float64, in the order of ``rows``."""
    device = next(head.parameters()).device
    out = np.empty(len(rows), dtype=np.float64)
    position = {int(r): i for i, r in enumerate(rows)}
    with torch.no_grad():
        for batch_rows, features in source.batches(np.asarray(rows), batch_size):
            values = head(features.to(device)).reshape(-1).cpu().numpy()
            for r, v in zip(batch_rows, values, strict=True):
                out[position[int(r)]] = float(v)
    return out


def cross_fitted_predictions(
    data: RatedFeatures,
    folds: np.ndarray,
    val_rows: np.ndarray,
    options: TrainHeadOptions,
    *,
    seed: int,
    device: torch.device,
) -> np.ndarray:
    """Out-of-fold predicted valence: each stimulus predicted by a head that never saw it.

    The head of fold ``j`` is fitted exactly as the main head (:func:`fit_head`, level weights of
    its own training rows) on every stimulus outside fold ``j`` except the validation rows, early
    stopping on the validation rows outside fold ``j``, and predicts fold ``j``. Correlating these
    predictions with the ratings of the same stimuli is then not optimistic, unlike the main
    head's predictions of its own training images.

    Args:
        data: features and ratings of every stimulus ``(n,)``.
        folds: fold index of every stimulus ``(n,)`` (:func:`~object2brain.data.splits.make_folds`).
        val_rows: the main split's validation rows (never trained on; early stopping).
        options: training options, as for :func:`fit_head`.
        seed: fold ``j`` shuffles its batches with ``seed + 1 + j``.
        device: where the heads train.

    Returns:
        Predicted valence ``(n,)`` float64.
    """
    predicted = np.full(len(data.valence), np.nan)
    fits = fit_fold_heads(data, folds, val_rows, options, seed=seed, device=device)
    for j, fit in enumerate(fits):
        held = np.flatnonzero(folds == j)
        head = fit.head.to(device)
        batch = max(options.batch_size, PREDICT_BATCH)
        predicted[held] = predict(head, data.sources.eval, held, batch_size=batch)
        fit.head = head.cpu()
        log.info(
            "cross-fitting fold %d: %d stimuli predicted by a head fitted on %d (best epoch %d)",
            j,
            len(held),
            int((folds != j).sum()),
            fit.best_epoch,
        )
    return predicted


def fit_fold_heads(
    data: RatedFeatures,
    folds: np.ndarray,
    val_rows: np.ndarray,
    options: TrainHeadOptions,
    *,
    seed: int,
    device: torch.device,
) -> list[FitResult]:
    """One head per fold ``j = 0 .. K - 1``, each fitted without fold ``j``'s stimuli.

    Fold ``j``'s head is fitted as the main head (:func:`fit_head`) on every stimulus outside
    fold ``j`` except the validation rows, stopping early on the validation rows outside fold
    ``j``, shuffling with ``seed + 1 + j``.

    Args:
        data: features and ratings of every stimulus ``(n,)``.
        folds: fold index of every stimulus ``(n,)`` in ``0 .. K - 1``.
        val_rows: the main split's validation rows (never trained on; early stopping).
        options: training options, as for :func:`fit_head`.
        seed: root seed of the folds' batch shuffles.
        device: where the heads train.

    Returns:
        The ``K`` fits, in fold order (heads on the CPU).
    """
    is_val = np.zeros(len(data.valence), dtype=bool)
    is_val[val_rows] = True
    fits = []
    for j in range(int(np.max(folds)) + 1):
        train_rows = np.flatnonzero((folds != j) & ~is_val)
        fold_val = np.flatnonzero((folds != j) & is_val)
        fits.append(fit_head(data, train_rows, fold_val, options, seed=seed + 1 + j, device=device))
    return fits


def regression_metrics(predicted: np.ndarray, rated: np.ndarray) -> dict[str, Any]:
    """MAE, RMSE, Pearson r, Spearman rho and R^2 of ``predicted`` vs ``rated`` (both ``(n,)``).

    ``R^2 = 1 - sum (y - yhat)^2 / sum (y - mean y)^2``. Undefined values (constant input, fewer
    than 2 images) are ``None``; then, and when a value is defined but says nothing (two images:
    any correlation of two points is +1 or -1), ``reasons`` maps the metric to why
    (:func:`metric_reasons`; the key is absent when every metric is meaningful).
    """
    from scipy import stats

    p = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(rated, dtype=np.float64)
    n = int(p.size)
    out: dict[str, Any] = {"n": n}
    reasons = metric_reasons(p, y)
    if n == 0:
        out |= {"mae": None, "rmse": None, "pearson": None, "spearman": None, "r2": None}
        return out | {"reasons": reasons}
    error = p - y
    out["mae"] = float(np.mean(np.abs(error)))
    out["rmse"] = float(np.sqrt(np.mean(error**2)))
    constant = n < 2 or np.ptp(p) == 0 or np.ptp(y) == 0
    out["pearson"] = None if constant else float(stats.pearsonr(p, y).statistic)
    out["spearman"] = None if constant else float(stats.spearmanr(p, y).statistic)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    out["r2"] = None if ss_tot == 0 else 1.0 - float(np.sum(error**2)) / ss_tot
    return out | ({"reasons": reasons} if reasons else {})


def metric_reasons(predicted: np.ndarray, rated: np.ndarray) -> dict[str, str]:
    """Why a metric of :func:`regression_metrics` is undefined or uninformative, by metric name
    (empty when all are meaningful). ``predicted``, ``rated``: ``(n,)``."""
    n = int(np.asarray(predicted).size)
    correlations = ("pearson", "spearman")
    if n == 0:
        return dict.fromkeys(("mae", "rmse", *correlations, "r2"), "no images in this split")
    if n == 1:
        return dict.fromkeys((*correlations, "r2"), "1 image: needs at least 2")
    reasons: dict[str, str] = {}
    if np.ptp(rated) == 0:
        reasons = dict.fromkeys(
            (*correlations, "r2"), f"the rated valence is the same ({rated[0]:g}) for every image"
        )
    elif np.ptp(predicted) == 0:
        reasons = dict.fromkeys(correlations, "the head predicts the same value for every image")
    elif n == 2:
        reasons = dict.fromkeys(correlations, "2 images: any correlation of 2 points is +1 or -1")
    return reasons


def per_level_metrics(
    predicted: np.ndarray, rated: np.ndarray, levels: np.ndarray
) -> dict[str, dict[str, float]]:
    """Per valence level: ``n``, ``mae``, ``rmse``, ``mean_predicted``, ``mean_rated``, ``bias``.

    ``bias = mean(predicted - rated)`` within the level (regression to the mean shows as a
    positive bias at negative levels and a negative one at positive levels).
    """
    p, y, lv = (np.asarray(a) for a in (predicted, rated, levels))
    out: dict[str, dict[str, float]] = {}
    for level in np.unique(lv):
        mask = lv == level
        error = p[mask] - y[mask]
        out[str(int(level))] = {
            "n": int(mask.sum()),
            "mae": float(np.mean(np.abs(error))),
            "rmse": float(np.sqrt(np.mean(error**2))),
            "mean_predicted": float(np.mean(p[mask])),
            "mean_rated": float(np.mean(y[mask])),
            "bias": float(np.mean(error)),
        }
    return out


#: Test predictions whose spread is below this fraction of the ratings' spread count as constant.
CONSTANT_PREDICTIONS = 1e-3


def degeneracy(fit: FitResult, predicted: np.ndarray, rated: np.ndarray) -> str | None:
    """Why a trained head is degenerate, or ``None``.

    A head is degenerate when (any of) its best epoch is 0 (no epoch improved the validation loss
    of the initial head, so it kept the initial weights: zero weights, the mean rating as bias),
    its weights are all zero (the gradient of its output with respect to the backbone, hence at
    any dissected layer, is zero), or its predictions ``predicted`` ``(n,)`` of the held-out
    stimuli are (nearly) constant: standard deviation below ``CONSTANT_PREDICTIONS`` times that of
    the ratings ``rated`` ``(n,)``. Its Grad-CAM maps are then zero and its correlations undefined.
    """
    reasons = []
    if fit.best_epoch == 0:
        reasons.append(
            f"no epoch improved on the initial head (best epoch 0 of {len(fit.history)} run)"
        )
    if not bool(torch.any(fit.head.weight != 0)):
        reasons.append("all weights are zero (zero gradient into the backbone)")
    spread, scale = float(np.std(predicted)), float(np.std(rated))
    if len(predicted) >= 2 and spread <= CONSTANT_PREDICTIONS * max(scale, 1e-12):
        reasons.append(f"constant test predictions (sd {spread:.3g}, ratings sd {scale:.3g})")
    return "; ".join(reasons) or None

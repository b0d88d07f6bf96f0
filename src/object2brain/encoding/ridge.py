r"""Cross-validated ridge regression from features to voxel responses, with himalaya.

For outer fold :math:`k` with training stimuli :math:`T_k` and test stimuli :math:`S_k`, every voxel
:math:`v` gets

.. math:: \hat{w}_v = \arg\min_w \|Y_{T_k v} - \bar{y}_v - (X_{T_k} - \bar{x}) w\|^2
          + \alpha_v \|w\|^2, \qquad
          \hat{Y}_{S_k v} = (X_{S_k} - \bar{x}) \hat{w}_v + \bar{y}_v

(means over :math:`T_k`; an unpenalised intercept). The penalty :math:`\alpha_v` is chosen per voxel
from the grid by inner cross-validation *inside* :math:`T_k` (the mean over inner folds of the
negative mean squared error, himalaya's default score; ties go to the larger alpha); the test fold
never takes part. Concatenating :math:`\hat{Y}_{S_k}` over folds gives the out-of-fold predictions
``(n, v)``.

The solver is himalaya's: :class:`himalaya.ridge.RidgeCV` when the fold has at least as many
training stimuli as features, else the equivalent :class:`himalaya.kernel_ridge.KernelRidgeCV`
with a linear kernel (whose dual coefficients give the primal weights
:math:`W = X_{T_k}^\top D`). Banded ridge (one penalty per feature space, chosen by himalaya's
seeded random search over the simplex of band weights) uses :class:`himalaya.ridge.BandedRidgeCV`.

Backends: ``numpy`` (float64, CPU) or ``torch_cuda`` (float32, the current CUDA device). Weights,
intercepts and predictions are returned as float64 numpy arrays.

Feature reduction inside the folds: ``pca:DIM`` fits a PCA on each outer training set only
(:func:`fit_pca`) and projects that fold's training and test features on it. (SRP needs no fit; it
is applied to the layer's features before the folds, see :mod:`object2brain.encoding.compute`.)
The fitted standardisation and PCA of a fold depend on the features and the fold's stimuli only,
not on the responses: :func:`reduce_folds` computes them once (:class:`FoldReduction`), and
:func:`fit_ridge_cv`, :func:`fit_smoother` and :func:`fit_banded_cv` take them (``reductions``)
so that every ROI of a layer shares them; :class:`ReductionCache` keys them by layer, fold and
the fold's stimulus ids. The results are bit-identical to fitting them inside each call (the
same operations on the same arrays).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from object2brain.encoding.folds import fold_splits, inner_splits
from object2brain.errors import DataError

BackendName = Literal["numpy", "torch_cuda"]


def backend_for(device: torch.device | str) -> BackendName:
    """The himalaya backend for a compute device: ``torch_cuda`` on CUDA, else ``numpy``."""
    return "torch_cuda" if torch.device(device).type == "cuda" else "numpy"


@contextmanager
def using_backend(name: BackendName) -> Iterator[Any]:
    """Set himalaya's (global) backend for the duration of the block, then restore the previous
    one. Yields the backend module."""
    from himalaya.backend import get_backend, set_backend

    previous = get_backend().name
    backend = set_backend(name, on_error="raise")
    try:
        yield backend
    finally:
        set_backend(previous, on_error="raise")


def _dtype(backend: BackendName) -> type[np.floating[Any]]:
    return np.float64 if backend == "numpy" else np.float32


@dataclass(frozen=True)
class Pca:
    """A PCA fitted on one training set: ``transform(X) = (X - mean) @ components``.

    ``mean`` ``(p,)``, ``components`` ``(p, d)`` (orthonormal columns, by decreasing variance).
    """

    mean: np.ndarray
    components: np.ndarray

    def transform(self, features: np.ndarray) -> np.ndarray:
        """``(m, p)`` -> ``(m, d)``."""
        return np.asarray((features - self.mean) @ self.components)


def fit_pca(features: np.ndarray, dim: int) -> Pca:
    """PCA of ``features`` ``(n_train, p)`` to ``min(dim, n_train - 1, p)`` components (SVD of the
    centred matrix)."""
    mean = features.mean(axis=0)
    _, _, vt = np.linalg.svd(features - mean, full_matrices=False)
    d = max(1, min(dim, features.shape[0] - 1, features.shape[1]))
    return Pca(mean=mean, components=np.ascontiguousarray(vt[:d].T))


@dataclass(frozen=True)
class Scaler:
    """Standardisation fitted on one training set: ``transform(X) = (X - mean) / scale``.

    ``mean``, ``scale`` ``(p,)``: the training stimuli's mean and standard deviation (ddof 0) of
    each feature; a feature constant on the training stimuli keeps ``scale = 1``.
    """

    mean: np.ndarray
    scale: np.ndarray

    def transform(self, features: np.ndarray) -> np.ndarray:
        """``(m, p)`` -> ``(m, p)``."""
        return np.asarray((features - self.mean) / self.scale)


def fit_scaler(features: np.ndarray) -> Scaler:
    """The :class:`Scaler` of training features ``(n_train, p)`` (their rows only)."""
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    return Scaler(mean=mean, scale=np.where(scale > 0, scale, 1.0))


@dataclass(frozen=True)
class FoldReduction:
    """The feature reduction of one outer fold, fitted on its training stimuli only.

    ``train`` ``(n_train,)`` and ``test`` ``(n_test,)`` stimulus indices; ``scaler`` and ``pca``
    (either may be ``None``); with a PCA, ``x_train`` ``(n_train, d)`` and ``x_test``
    ``(n_test, d)`` are the fold's model features (standardised, then projected), kept because
    they are small; without one they are ``None`` and :meth:`train_inputs` /
    :meth:`test_inputs` recompute them (standardising is elementwise and cheap, and keeping
    ``(n, p)`` copies of a large layer would not be).
    """

    fold: int
    train: np.ndarray
    test: np.ndarray
    scaler: Scaler | None
    pca: Pca | None
    x_train: np.ndarray | None = None
    x_test: np.ndarray | None = None

    def inputs(self, features: np.ndarray) -> np.ndarray:
        """The model features ``(m, d)`` of any features ``(m, p)``: standardised, then PCA."""
        x = self.scaler.transform(features) if self.scaler is not None else features
        return self.pca.transform(x) if self.pca is not None else x

    def train_inputs(self, features: np.ndarray) -> np.ndarray:
        """Model features ``(n_train, d)`` of the training stimuli of ``features`` ``(n, p)``."""
        return self.x_train if self.x_train is not None else self.inputs(features[self.train])

    def test_inputs(self, features: np.ndarray) -> np.ndarray:
        """Model features ``(n_test, d)`` of the test stimuli of ``features`` ``(n, p)``."""
        return self.x_test if self.x_test is not None else self.inputs(features[self.test])


def reduce_fold(
    features: np.ndarray,
    fold: int,
    train: np.ndarray,
    test: np.ndarray,
    *,
    pca_dim: int | None,
    standardize: bool,
) -> FoldReduction:
    """The :class:`FoldReduction` of ``features`` ``(n, p)`` for one outer fold: the scaler of
    the training rows (``standardize``), then a PCA of the standardised training rows to
    ``pca_dim`` components (when given)."""
    x_train = features[train]
    scaler = fit_scaler(x_train) if standardize else None
    x_train = scaler.transform(x_train) if scaler is not None else x_train
    if pca_dim is None:
        return FoldReduction(fold, train, test, scaler, None)
    pca = fit_pca(x_train, pca_dim)
    x_test = scaler.transform(features[test]) if scaler is not None else features[test]
    return FoldReduction(
        fold, train, test, scaler, pca, pca.transform(x_train), pca.transform(x_test)
    )


def reduce_folds(
    features: np.ndarray, folds: np.ndarray, *, pca_dim: int | None, standardize: bool
) -> tuple[FoldReduction, ...]:
    """:func:`reduce_fold` of every outer fold of ``folds`` ``(n,)`` (in fold order)."""
    return tuple(
        reduce_fold(features, k, train, test, pca_dim=pca_dim, standardize=standardize)
        for k, (train, test) in enumerate(fold_splits(folds))
    )


def _digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(ids).encode()).hexdigest()


@dataclass
class ReductionCache:
    """Fold reductions fitted once and shared by every fit with the same features and folds.

    An entry is keyed by ``(layer, fold, training stimulus ids, test stimulus ids)``: the ROIs,
    targets and subjects encoded from one layer on the same stimuli and folds share it, and a
    target on other stimuli (or other folds) gets its own fit. The caller guarantees that one
    ``layer`` name stands for one feature matrix (rows in the order of ``ids``) and that
    ``pca_dim`` and ``standardize`` are those of the cache. ``fitted`` counts the reductions
    fitted (a test reads it).
    """

    pca_dim: int | None
    standardize: bool
    fitted: int = 0
    _entries: dict[tuple[str, int, str, str], FoldReduction] = field(default_factory=dict)

    def reductions(
        self, layer: str, features: np.ndarray, folds: np.ndarray, ids: Sequence[str]
    ) -> tuple[FoldReduction, ...] | None:
        """The fold reductions of ``features`` ``(n, p)`` (``layer``'s, of the stimuli ``ids``)
        for ``folds`` ``(n,)``; ``None`` when nothing is fitted (no PCA, no standardisation)."""
        if self.pca_dim is None and not self.standardize:
            return None
        names = np.asarray(ids, dtype=object)
        out = []
        for k, (train, test) in enumerate(fold_splits(folds)):
            key = (layer, k, _digest(names[train].tolist()), _digest(names[test].tolist()))
            if key not in self._entries:
                self._entries[key] = reduce_fold(
                    features, k, train, test, pca_dim=self.pca_dim, standardize=self.standardize
                )
                self.fitted += 1
            out.append(self._entries[key])
        return tuple(out)


def check_reductions(
    reductions: Sequence[FoldReduction], folds: np.ndarray
) -> Sequence[FoldReduction]:
    splits = fold_splits(folds)
    same = len(splits) == len(reductions) and all(
        np.array_equal(r.train, train) and np.array_equal(r.test, test)
        for r, (train, test) in zip(reductions, splits, strict=False)
    )
    if not same:
        raise ValueError("reductions were fitted on other folds than the ones given")
    return reductions


@dataclass(frozen=True)
class FoldFit:
    """The ridge model of one outer fold.

    ``test`` ``(n_test,)`` stimulus indices it predicts; ``alphas`` ``(v,)`` chosen penalties;
    ``weights`` ``(d, v)`` and ``intercept`` ``(v,)`` on the fold's model features (after
    ``scaler``, then ``pca``, when fitted): ``prediction = transform(X) @ weights + intercept``.
    ``weights`` is empty ``(0, v)`` when the fit was asked not to keep them (then
    :meth:`predict` cannot run).
    """

    fold: int
    test: np.ndarray
    alphas: np.ndarray
    weights: np.ndarray
    intercept: np.ndarray
    pca: Pca | None = None
    scaler: Scaler | None = None

    def inputs(self, features: np.ndarray) -> np.ndarray:
        """The model features ``(m, d)`` of features ``(m, p)``: standardised, then PCA."""
        x = self.scaler.transform(features) if self.scaler is not None else features
        return self.pca.transform(x) if self.pca is not None else x

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predictions ``(m, v)`` from features ``(m, p)`` (before standardisation and PCA)."""
        if self.weights.shape[0] == 0:
            raise ValueError("this fold's weights were not kept (keep_weights=False)")
        return np.asarray(self.inputs(features) @ self.weights + self.intercept)


@dataclass(frozen=True)
class RidgeFit:
    """Cross-validated ridge: out-of-fold ``predictions`` ``(n, v)``, one :class:`FoldFit` per
    outer fold, ``feature_dim`` (model features per fold after reduction)."""

    predictions: np.ndarray
    folds: tuple[FoldFit, ...]
    feature_dim: int

    @property
    def alphas(self) -> np.ndarray:
        """Chosen penalty per fold and voxel ``(K, v)``."""
        return np.stack([f.alphas for f in self.folds])

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Out-of-fold predictions ``(n, v)`` of other features ``(n, p)`` of the same stimuli
        (e.g. with filters zeroed): each fold's fitted model predicts its own test stimuli."""
        out = np.empty_like(self.predictions)
        for fold in self.folds:
            out[fold.test] = fold.predict(features[fold.test])
        return out


def given_or_reduced(
    features: np.ndarray,
    folds: np.ndarray,
    pca_dim: int | None,
    standardize: bool,
    reductions: Sequence[FoldReduction] | None,
) -> Sequence[FoldReduction]:
    """The given folds' ``reductions``, checked against ``folds`` (:func:`check_reductions`), or
    those of :func:`reduce_folds` fitted here."""
    if reductions is None:
        return reduce_folds(features, folds, pca_dim=pca_dim, standardize=standardize)
    return check_reductions(reductions, folds)


def check_inputs(features: np.ndarray, responses: np.ndarray, where: str) -> None:
    """Raise :class:`DataError` for unusable inputs: shapes, non-finite values, a single feature,
    constant voxels."""
    if features.ndim != 2 or responses.ndim != 2:
        raise DataError(f"{where}: features and responses must be 2-D (stimuli first)")
    if features.shape[0] != responses.shape[0]:
        raise DataError(
            f"{where}: {features.shape[0]} stimuli of features vs {responses.shape[0]} responses"
        )
    if features.shape[1] < 2:
        raise DataError(f"{where}: {features.shape[1]} feature(s); a ridge model needs 2 or more")
    if responses.shape[1] == 0:
        raise DataError(f"{where}: no voxels")
    if not np.isfinite(features).all():
        raise DataError(f"{where}: features contain NaN or infinite values")
    bad = np.flatnonzero(~np.isfinite(responses).all(axis=0))
    if bad.size:
        raise DataError(
            f"{where}: {bad.size} voxel(s) with NaN or infinite responses (first: column "
            f"{int(bad[0])}); remove them (e.g. voxels outside the brain mask)"
        )
    flat = np.flatnonzero(np.ptp(responses, axis=0) == 0)
    if flat.size:
        raise DataError(
            f"{where}: {flat.size} voxel(s) with constant responses (first: column "
            f"{int(flat[0])}); their correlation is undefined"
        )


def _fit_one(
    x_train: np.ndarray,
    y_train: np.ndarray,
    alphas: np.ndarray,
    cv: list[tuple[np.ndarray, np.ndarray]],
    backend: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(weights (d, v), intercept (v,), alphas (v,))`` of one training set, penalty per voxel by
    the inner folds ``cv``."""
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV

    n, d = x_train.shape
    model: Any
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="himalaya")
        if d <= n:
            model = RidgeCV(alphas=alphas, fit_intercept=True, cv=cv)
            model.fit(x_train, y_train)
            weights = backend.to_numpy(model.coef_)
        else:
            model = KernelRidgeCV(
                alphas=alphas, kernel="linear", fit_intercept=True, cv=cv, warn=False
            )
            model.fit(x_train, y_train)
            weights = backend.to_numpy(model.get_primal_coef())
    # himalaya returns exp(-log(alpha)): snap to the grid value it stands for
    chosen = np.asarray(backend.to_numpy(model.best_alphas_), dtype=np.float64)
    grid = np.asarray(alphas, dtype=np.float64)
    nearest = np.abs(np.log(chosen)[:, None] - np.log(grid)[None, :]).argmin(axis=1)
    return (
        np.asarray(weights, dtype=np.float64),
        np.asarray(backend.to_numpy(model.intercept_), dtype=np.float64),
        grid[nearest],
    )


def fit_ridge_cv(
    features: np.ndarray,
    responses: np.ndarray,
    folds: np.ndarray,
    *,
    alphas: Sequence[float],
    inner_folds: int,
    seed: int,
    pca_dim: int | None = None,
    standardize: bool = False,
    keep_weights: bool = True,
    backend: BackendName = "numpy",
    reductions: Sequence[FoldReduction] | None = None,
) -> RidgeFit:
    """Cross-validated ridge from ``features`` ``(n, p)`` to ``responses`` ``(n, v)``.

    ``folds`` ``(n,)``: outer fold of each stimulus
    (:func:`~object2brain.encoding.folds.outer_folds`); inner folds come from
    :func:`~object2brain.encoding.folds.inner_splits` with ``seed``.
    ``standardize``: each feature z-scored with the mean and standard deviation of the outer
    training set (:func:`fit_scaler`; the test fold's stimuli never enter them).
    ``pca_dim``: PCA of each training set to this many components (after standardisation).
    ``reductions``: the folds' standardisation and PCA already fitted on these features and
    folds (:func:`reduce_folds`, shared by the ROIs of a layer); then ``pca_dim`` and
    ``standardize`` are not used. The results are those of fitting them here, bit for bit.
    ``keep_weights``: False drops each fold's ``(d, v)`` weights and its reduction once its test
    stimuli are predicted (predictions, alphas and intercepts are kept; no lesion prediction
    then).

    Raises:
        DataError: see :func:`check_inputs`; too few training stimuli for the inner folds.
        ValueError: ``reductions`` of other folds.
    """
    check_inputs(features, responses, "encoding")
    if reductions is None:
        reductions = reduce_folds(features, folds, pca_dim=pca_dim, standardize=standardize)
    else:
        reductions = check_reductions(reductions, folds)
    dtype = _dtype(backend)
    grid = np.asarray(alphas, dtype=dtype)
    predictions = np.empty(responses.shape, dtype=np.float64)
    fits: list[FoldFit] = []
    dims: list[int] = []
    with using_backend(backend) as module:
        for k, fold in enumerate(reductions):
            train, test = fold.train, fold.test
            cv = inner_splits(train.size, inner_folds, seed=seed, outer_fold=k)
            weights, intercept, chosen = _fit_one(
                fold.train_inputs(features).astype(dtype, copy=False),
                responses[train].astype(dtype, copy=False),
                grid,
                cv,
                module,
            )
            predictions[test] = fold.test_inputs(features) @ weights + intercept
            dims.append(int(weights.shape[0]))
            if keep_weights:
                fits.append(FoldFit(k, test, chosen, weights, intercept, fold.pca, fold.scaler))
            else:
                fits.append(FoldFit(k, test, chosen, weights[:0], intercept))
    return RidgeFit(predictions, tuple(fits), dims[0])


@dataclass(frozen=True)
class BandedFit:
    r"""Cross-validated banded ridge over ``b`` feature spaces (bands).

    - ``predictions`` ``(n, v)``: joint out-of-fold predictions;
    - ``band_predictions`` ``(b, n, v)``: each band's part
      :math:`(X^{(j)}_{S_k} - \bar{x}^{(j)}) W^{(j)}` (so ``predictions = band_predictions.sum(0)
      + offsets``);
    - ``offsets`` ``(n, v)``: the training mean of the responses of each test stimulus' fold;
    - ``deltas`` ``(K, b, v)``: himalaya's log band weights :math:`\log(\gamma_j / \alpha)` per
      fold (band :math:`j`'s effective penalty is :math:`e^{-\delta_j}`);
    - ``r2_joint`` ``(v,)``: :math:`1 - SSE/SST` of the joint predictions (SST around the mean of
      the responses);
    - ``r2_shares`` ``(b, v)`` and ``r2_offset`` ``(v,)``: himalaya's product-measure split of the
      joint :math:`R^2` (:func:`himalaya.scoring.r2_score_split` with the correlations between
      bands), ``r2_shares.sum(0) + r2_offset == r2_joint``; the offset term is the part of the
      fold-wise intercepts (differences between the folds' training means), usually small.
    """

    predictions: np.ndarray
    band_predictions: np.ndarray
    offsets: np.ndarray
    deltas: np.ndarray
    r2_joint: np.ndarray
    r2_shares: np.ndarray
    r2_offset: np.ndarray


def fit_banded_cv(
    bands: Sequence[np.ndarray],
    responses: np.ndarray,
    folds: np.ndarray,
    *,
    alphas: Sequence[float],
    inner_folds: int,
    n_iter: int,
    seed: int,
    pca_dim: int | None = None,
    standardize: bool = False,
    backend: BackendName = "numpy",
    reductions: Sequence[Sequence[FoldReduction]] | None = None,
) -> BandedFit:
    """Banded ridge from ``bands`` (``b`` arrays ``(n, p_j)``) to ``responses`` ``(n, v)``.

    Each outer fold runs himalaya's ``BandedRidgeCV`` (``solver="random_search"``, ``n_iter``
    Dirichlet samples of the band weights, seeded by ``(seed, fold)``, ``alphas`` the grid) with
    the inner folds of :func:`~object2brain.encoding.folds.inner_splits`. ``standardize``: each
    band's features z-scored with the training set's mean and standard deviation; ``pca_dim``:
    each band reduced by its own PCA fitted on the training set (after standardisation).
    ``reductions``: per band, its fold reductions already fitted on these folds
    (:func:`reduce_folds`; shared by the ROIs), used instead of ``pca_dim`` and ``standardize``
    (same results, bit for bit).
    """
    from himalaya.ridge import BandedRidgeCV
    from himalaya.scoring import r2_score_split

    if len(bands) < 2:
        raise DataError(f"encoding: banded ridge needs 2 or more bands, got {len(bands)}")
    for j, band in enumerate(bands):
        check_inputs(band, responses, f"encoding band {j}")
    dtype = _dtype(backend)
    n, v = responses.shape
    parts = np.zeros((len(bands), n, v))
    offsets = np.zeros((n, v))
    deltas: list[np.ndarray] = []
    if reductions is None:
        reductions = [
            reduce_folds(b, folds, pca_dim=pca_dim, standardize=standardize) for b in bands
        ]
    elif len(reductions) != len(bands):
        raise ValueError(f"{len(reductions)} band reductions for {len(bands)} bands")
    per_band = [check_reductions(r, folds) for r in reductions]
    with using_backend(backend) as module:
        for k, (train, test) in enumerate(fold_splits(folds)):
            xs = [r[k].inputs(b) for r, b in zip(per_band, bands, strict=True)]
            means = [x[train].mean(axis=0) for x in xs]
            model = BandedRidgeCV(
                groups="input",
                solver="random_search",
                solver_params={
                    "n_iter": n_iter,
                    "alphas": np.asarray(alphas, dtype=dtype),
                    "progress_bar": False,
                    "warn": False,
                },
                fit_intercept=True,
                cv=inner_splits(train.size, inner_folds, seed=seed, outer_fold=k),
                random_state=int(np.random.default_rng([seed, 2, k]).integers(2**31)),
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=UserWarning, module="himalaya")
                model.fit([x[train].astype(dtype) for x in xs], responses[train].astype(dtype))
            weights = np.asarray(module.to_numpy(model.coef_), dtype=np.float64)
            start = 0
            for j, (x, mean) in enumerate(zip(xs, means, strict=True)):
                stop = start + x.shape[1]
                parts[j][test] = (x[test] - mean) @ weights[start:stop]
                start = stop
            offsets[test] = responses[train].mean(axis=0)
            deltas.append(np.asarray(module.to_numpy(model.deltas_), dtype=np.float64))
    predictions = parts.sum(axis=0) + offsets
    centred = responses - responses.mean(axis=0)
    with using_backend("numpy"):
        split = np.asarray(
            r2_score_split(centred, np.concatenate([parts, (offsets - responses.mean(0))[None]]))
        )
    return BandedFit(
        predictions=predictions,
        band_predictions=parts,
        offsets=offsets,
        deltas=np.stack(deltas),
        r2_joint=split.sum(axis=0),
        r2_shares=split[:-1],
        r2_offset=split[-1],
    )


@dataclass(frozen=True)
class _FoldSmoother:
    r"""Linear maps of one outer fold from training responses to predictions, per alpha.

    ``outer`` ``(A * n_test, n_train)``: row block ``a`` maps the training responses to the test
    predictions with alpha ``a``. ``residual`` ``(A * n_train, n_train)``: row block ``a`` maps
    them to the inner-fold validation residuals (prediction minus response of every training
    stimulus, predicted by its inner fold's model), each row scaled by
    :math:`1/\sqrt{n_{val} K_{inner}}` so that minus the squared norm of a block's column is the
    inner-CV score (the mean over inner folds of the negative mean squared error).
    """

    train: np.ndarray
    test: np.ndarray
    outer: np.ndarray
    residual: np.ndarray


def _smoother(x_train: np.ndarray, x_test: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    r"""``G`` ``(A, m, n_train)`` with ``G[a] @ y_train`` the ridge (with intercept) predictions:
    :math:`G(\alpha) = \frac{1}{n}\mathbf{1}\mathbf{1}^\top + (X_* - \bar{x}) V
    \,\mathrm{diag}(s / (s^2 + \alpha))\, U^\top` from the thin SVD
    :math:`X - \bar{x} = U s V^\top`."""
    mean = x_train.mean(axis=0)
    u, s, vt = np.linalg.svd(x_train - mean, full_matrices=False)
    projected = (x_test - mean) @ vt.T
    shrink = s[None, :] / (s[None, :] ** 2 + alphas[:, None])
    base = np.full((alphas.size, x_test.shape[0], x_train.shape[0]), 1.0 / x_train.shape[0])
    return np.asarray(base + np.einsum("tr,ar,sr->ats", projected, shrink, u))


def _residual_operator(
    x: np.ndarray, splits: Sequence[tuple[np.ndarray, np.ndarray]], alphas: np.ndarray
) -> np.ndarray:
    """The stacked inner-fold residual map ``(A * n_train, n_train)`` of :class:`_FoldSmoother`
    for training features ``x`` ``(n_train, d)`` and inner ``splits``."""
    n = x.shape[0]
    out = np.zeros((alphas.size, n, n))
    for train, validation in splits:
        block = np.zeros((alphas.size, validation.size, n))
        block[:, :, train] = _smoother(x[train], x[validation], alphas)
        block[:, np.arange(validation.size), validation] -= 1.0
        out[:, validation, :] = block / np.sqrt(validation.size * len(splits))
    return out.reshape(alphas.size * n, n)


@dataclass(frozen=True)
class CvSmoother:
    r"""The whole cross-validated ridge of one feature matrix as linear maps of the responses.

    For fixed features, the out-of-fold prediction of every alpha is linear in the responses, so
    :meth:`predict` reruns :func:`fit_ridge_cv` (inner-fold choice of alpha per voxel included:
    mean over inner folds of the negative mean squared error, ties to the larger alpha) for any
    responses ``(n, c)`` without refitting. These dense maps are the numpy reference (tests,
    ``validation/encoding_null.py``); the ``encode`` stage's exact permutation test uses the
    equivalent, cheaper spectral maps of
    :class:`object2brain.encoding.smoother.TorchCvSmoother` (CPU or CUDA; equal to 1e-10).
    Memory: about ``8 A n^2`` bytes for ``A`` alphas and ``n`` stimuli; cost of
    :meth:`predict`: about ``2 A n^2 c`` flops for ``c`` columns (two matrix products per fold).
    """

    alphas: np.ndarray
    folds: tuple[_FoldSmoother, ...]

    def predict(self, responses: np.ndarray) -> np.ndarray:
        """Out-of-fold predictions ``(n, c)`` of ``responses`` ``(n, c)`` (each column a voxel)."""
        out = np.empty(responses.shape, dtype=np.float64)
        n_alphas, c = self.alphas.size, responses.shape[1]
        tie_break = (np.log(self.alphas) * 1e-10)[:, None]
        for fold in self.folds:
            y = responses[fold.train]
            residual = (fold.residual @ y).reshape(n_alphas, fold.train.size, c)
            score = -np.einsum("atc,atc->ac", residual, residual)
            best = (score + tie_break).argmax(axis=0)
            predicted = (fold.outer @ y).reshape(n_alphas, fold.test.size, c)
            out[fold.test] = np.take_along_axis(predicted, best[None, None, :], axis=0)[0]
        return out


def fit_smoother(
    features: np.ndarray,
    folds: np.ndarray,
    *,
    alphas: Sequence[float],
    inner_folds: int,
    seed: int,
    pca_dim: int | None = None,
    standardize: bool = False,
    reductions: Sequence[FoldReduction] | None = None,
) -> CvSmoother:
    """The :class:`CvSmoother` of ``features`` ``(n, p)`` with the folds, inner folds, alphas,
    standardisation and PCA of :func:`fit_ridge_cv` (same arguments, float64; ``reductions``:
    the folds' fitted standardisation and PCA, shared with the ridge fits)."""
    grid = np.asarray(sorted(alphas), dtype=np.float64)
    reductions = given_or_reduced(features, folds, pca_dim, standardize, reductions)
    smoothers = []
    for k, fold in enumerate(reductions):
        x, x_test = fold.train_inputs(features), fold.test_inputs(features)
        splits = inner_splits(fold.train.size, inner_folds, seed=seed, outer_fold=k)
        outer = _smoother(x, x_test, grid).reshape(grid.size * fold.test.size, fold.train.size)
        smoothers.append(
            _FoldSmoother(fold.train, fold.test, outer, _residual_operator(x, splits, grid))
        )
    return CvSmoother(grid, tuple(smoothers))

"""Cross-validated ridge against scikit-learn; banded ridge; PCA inside the folds; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, cross_val_predict
from sklearn.pipeline import make_pipeline

from object2brain.encoding.folds import fold_splits, inner_splits, outer_folds
from object2brain.encoding.ridge import (
    ReductionCache,
    backend_for,
    fit_banded_cv,
    fit_ridge_cv,
    fit_smoother,
    reduce_folds,
)
from object2brain.errors import DataError

GRID = np.logspace(-2, 4, 13)


def _data(n: int, p: int, v: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    return x, x @ rng.standard_normal((p, v)) + 2.0 * rng.standard_normal((n, v))


@pytest.mark.parametrize("p", [10, 80], ids=["primal (p < n)", "kernel (p > n)"])
def test_fixed_alpha_equals_sklearn_cross_val_predict(p: int) -> None:
    x, y = _data(40, p, 6)
    folds = outer_folds(40, 5, seed=1)
    fit = fit_ridge_cv(x, y, folds, alphas=[3.0], inner_folds=3, seed=1)
    expected = cross_val_predict(Ridge(alpha=3.0), x, y, cv=fold_splits(folds))
    np.testing.assert_allclose(fit.predictions, expected, atol=1e-6, rtol=0)
    assert fit.feature_dim == p
    np.testing.assert_array_equal(fit.alphas, 3.0)
    # the stored per-fold weights reproduce the out-of-fold predictions
    np.testing.assert_allclose(fit.predict(x), fit.predictions, atol=1e-12)


@pytest.mark.parametrize("p", [10, 80], ids=["primal (p < n)", "kernel (p > n)"])
def test_chosen_alphas_equal_sklearn_grid_search_on_the_inner_folds(p: int) -> None:
    x, y = _data(40, p, 5, seed=2)
    folds = outer_folds(40, 4, seed=2)
    fit = fit_ridge_cv(x, y, folds, alphas=GRID, inner_folds=3, seed=2)
    for k, (train, _) in enumerate(fold_splits(folds)):
        cv = inner_splits(train.size, 3, seed=2, outer_fold=k)
        for voxel in range(5):
            search = GridSearchCV(
                Ridge(), {"alpha": GRID}, cv=cv, scoring="neg_mean_squared_error"
            ).fit(x[train], y[train, voxel])
            assert fit.folds[k].alphas[voxel] == pytest.approx(search.best_params_["alpha"])


def test_pca_is_fitted_on_the_training_folds_only() -> None:
    x, y = _data(40, 30, 4, seed=3)
    folds = outer_folds(40, 5, seed=3)
    fit = fit_ridge_cv(x, y, folds, alphas=[1.0], inner_folds=3, seed=3, pca_dim=6)
    expected = cross_val_predict(
        make_pipeline(PCA(6, svd_solver="full"), Ridge(alpha=1.0)), x, y, cv=fold_splits(folds)
    )
    np.testing.assert_allclose(fit.predictions, expected, atol=1e-6)
    assert fit.feature_dim == 6
    # changing a fold's test features changes neither its PCA nor its weights
    changed = x.copy()
    test = fit.folds[0].test
    changed[test] += 5.0
    again = fit_ridge_cv(changed, y, folds, alphas=[1.0], inner_folds=3, seed=3, pca_dim=6)
    assert again.folds[0].pca is not None and fit.folds[0].pca is not None
    np.testing.assert_allclose(again.folds[0].pca.mean, fit.folds[0].pca.mean)
    np.testing.assert_allclose(again.folds[0].weights, fit.folds[0].weights)


def test_pca_to_at_least_the_training_stimuli_is_lossless() -> None:
    """With more features than stimuli, a PCA of each training set to >= n_train - 1 components
    spans every direction ridge can use (its weights lie in the centred training rows' span, and
    the penalty is rotation invariant), so its predictions and chosen alphas equal the unreduced
    fit's: the cheap way to keep a large layer's stimulus kernel (an SRP to few dimensions adds
    noise to it)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((36, 400))
    y = x @ rng.standard_normal((400, 7)) / 20 + rng.standard_normal((36, 7))
    folds = outer_folds(36, 3, seed=1)
    full = fit_ridge_cv(x, y, folds, alphas=GRID, inner_folds=3, seed=2, keep_weights=False)
    pca = fit_ridge_cv(
        x, y, folds, alphas=GRID, inner_folds=3, seed=2, pca_dim=36, keep_weights=False
    )
    assert pca.feature_dim == 23  # 24 training stimuli: rank 23 after centring
    np.testing.assert_array_equal(pca.alphas, full.alphas)
    np.testing.assert_allclose(pca.predictions, full.predictions, atol=1e-8)
    fewer = fit_ridge_cv(x, y, folds, alphas=GRID, inner_folds=3, seed=2, pca_dim=5)
    assert np.abs(fewer.predictions - full.predictions).max() > 1e-3


def test_banded_ridge_splits_the_joint_score_and_finds_the_planted_band() -> None:
    rng = np.random.default_rng(4)
    bands = [rng.standard_normal((80, 6)), rng.standard_normal((80, 10))]
    y = bands[1] @ rng.standard_normal((10, 5)) + rng.standard_normal((80, 5))
    fit = fit_banded_cv(
        bands, y, outer_folds(80, 4, seed=0), alphas=GRID, inner_folds=3, n_iter=20, seed=0
    )
    r2 = 1 - ((y - fit.predictions) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(fit.r2_joint, r2, atol=1e-10)
    np.testing.assert_allclose(fit.r2_shares.sum(0) + fit.r2_offset, fit.r2_joint, atol=1e-10)
    np.testing.assert_allclose(fit.band_predictions.sum(0) + fit.offsets, fit.predictions)
    assert np.all(fit.r2_shares[1] > 0.5) and np.all(fit.r2_shares[0] < 0.05)
    assert fit.deltas.shape == (4, 2, 5)
    again = fit_banded_cv(
        bands, y, outer_folds(80, 4, seed=0), alphas=GRID, inner_folds=3, n_iter=20, seed=0
    )
    np.testing.assert_array_equal(again.predictions, fit.predictions)


@pytest.mark.parametrize(
    ("p", "pca_dim"), [(12, None), (80, None), (80, 6)], ids=["primal", "kernel", "pca"]
)
def test_smoother_reruns_the_cross_validation_for_any_responses(
    p: int, pca_dim: int | None
) -> None:
    x, y = _data(50, p, 6, seed=5)
    folds = outer_folds(50, 5, seed=5)
    smoother = fit_smoother(x, folds, alphas=GRID, inner_folds=4, seed=5, pca_dim=pca_dim)
    for responses in (y, y[np.random.default_rng(0).permutation(50)]):
        fit = fit_ridge_cv(x, responses, folds, alphas=GRID, inner_folds=4, seed=5, pca_dim=pca_dim)
        np.testing.assert_allclose(smoother.predict(responses), fit.predictions, atol=1e-9)


@pytest.mark.parametrize(
    ("p", "pca_dim", "standardize"),
    [(30, 6, False), (30, None, True), (80, 12, True), (80, 60, False)],
    ids=["pca", "standardize", "standardize+pca", "pca (kernel, lossless)"],
)
def test_shared_fold_reductions_are_bit_identical_to_a_fit_per_call(
    p: int, pca_dim: int | None, standardize: bool
) -> None:
    """The fold reductions fitted once (reduce_folds) and handed to the ridge fits of several
    ROIs, the refit null's smoother and a banded model give the same numbers, bit for bit, as
    each call fitting its own."""
    x, _ = _data(45, p, 1, seed=9)
    rng = np.random.default_rng(9)
    rois = [x[:, :5] @ rng.standard_normal((5, v)) + rng.standard_normal((45, v)) for v in (3, 4)]
    folds = outer_folds(45, 3, seed=9)
    shared = reduce_folds(x, folds, pca_dim=pca_dim, standardize=standardize)
    args = {"alphas": GRID, "inner_folds": 3, "seed": 4}
    for y in rois:
        own = fit_ridge_cv(x, y, folds, pca_dim=pca_dim, standardize=standardize, **args)
        fit = fit_ridge_cv(x, y, folds, reductions=shared, **args)
        np.testing.assert_array_equal(fit.predictions, own.predictions)
        np.testing.assert_array_equal(fit.alphas, own.alphas)
        assert fit.feature_dim == own.feature_dim
        for a, b in zip(fit.folds, own.folds, strict=True):
            np.testing.assert_array_equal(a.weights, b.weights)
            np.testing.assert_array_equal(a.intercept, b.intercept)
        assert all(f.pca is s.pca for f, s in zip(fit.folds, shared, strict=True))
    smoother = fit_smoother(x, folds, reductions=shared, **args)
    own_smoother = fit_smoother(x, folds, pca_dim=pca_dim, standardize=standardize, **args)
    for a, b in zip(smoother.folds, own_smoother.folds, strict=True):
        np.testing.assert_array_equal(a.outer, b.outer)
        np.testing.assert_array_equal(a.residual, b.residual)
    band = x[:, ::-1].copy()
    banded_args = {"n_iter": 5, **args}
    own_banded = fit_banded_cv(
        [x, band], rois[0], folds, pca_dim=pca_dim, standardize=standardize, **banded_args
    )
    banded = fit_banded_cv(
        [x, band],
        rois[0],
        folds,
        reductions=[shared, reduce_folds(band, folds, pca_dim=pca_dim, standardize=standardize)],
        **banded_args,
    )
    np.testing.assert_array_equal(banded.predictions, own_banded.predictions)
    np.testing.assert_array_equal(banded.r2_shares, own_banded.r2_shares)
    with pytest.raises(ValueError, match="other folds"):
        fit_ridge_cv(x, rois[0], outer_folds(45, 3, seed=10), reductions=shared, **args)


def test_reduction_cache_fits_once_per_layer_fold_and_stimulus_set() -> None:
    x, _ = _data(30, 40, 1, seed=11)
    ids = [f"s{i}" for i in range(30)]
    folds = outer_folds(30, 3, seed=0)
    cache = ReductionCache(pca_dim=8, standardize=False)
    first = cache.reductions("conv", x, folds, ids)
    assert first is not None and cache.fitted == 3
    again = cache.reductions("conv", x, folds, ids)  # another ROI of the same layer
    assert again is not None and cache.fitted == 3
    assert all(a is b for a, b in zip(first, again, strict=True))
    # other folds, another layer, or other stimuli (same rows, other ids): their own fits
    cache.reductions("conv", x, outer_folds(30, 3, seed=1), ids)
    assert cache.fitted == 6
    cache.reductions("fc", x, folds, ids)
    assert cache.fitted == 9
    other = cache.reductions("conv", x, folds, [f"t{i}" for i in range(30)])
    assert other is not None and cache.fitted == 12 and other[0] is not first[0]
    assert ReductionCache(pca_dim=None, standardize=False).reductions("c", x, folds, ids) is None


def test_backend_follows_the_device() -> None:
    assert backend_for("cpu") == "numpy"
    assert backend_for("cuda:0") == "torch_cuda"


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.ones((20, 1)), np.ones((20, 3)), "1 feature"),
        (
            np.random.default_rng(0).standard_normal((20, 4)),
            np.where(np.eye(20, 3) > 0, np.nan, 1.0) + np.arange(20)[:, None],
            "3 voxel\\(s\\) with NaN",
        ),
        (
            np.random.default_rng(0).standard_normal((20, 4)),
            np.ones((20, 3)),
            "constant responses",
        ),
        (np.ones((20, 4)), np.ones((19, 3)), "20 stimuli of features vs 19"),
    ],
)
def test_bad_input_raises_one_clear_error(x: np.ndarray, y: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=message):
        fit_ridge_cv(x, y, outer_folds(20, 5, seed=0), alphas=[1.0], inner_folds=3, seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("p", [30, 200], ids=["primal", "kernel"])
def test_cuda_backend_agrees_with_numpy(p: int) -> None:
    """float32 on the GPU vs float64 on the CPU: predictions within 1e-3 of the responses' scale
    (float32 SVD of centred features, relative error ~1e-6 per product, amplified by at most the
    condition number of the smallest chosen alpha's system); chosen alphas equal except near
    ties."""
    x, y = _data(120, p, 50, seed=6)
    folds = outer_folds(120, 5, seed=6)
    cpu = fit_ridge_cv(x, y, folds, alphas=GRID, inner_folds=5, seed=6)
    gpu = fit_ridge_cv(x, y, folds, alphas=GRID, inner_folds=5, seed=6, backend="torch_cuda")
    scale = float(y.std())
    assert np.max(np.abs(gpu.predictions - cpu.predictions)) < 1e-3 * scale
    assert np.mean(gpu.alphas == cpu.alphas) > 0.95

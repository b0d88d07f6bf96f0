"""The ``fixed_alpha`` permutation null: relabelled responses refitted with each voxel's alphas,
against brute-force scikit-learn ridge fits, on every chunking and through the stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from object2brain.encoding import compute_encoding
from object2brain.encoding.folds import fold_splits, outer_folds
from object2brain.encoding.ridge import fit_ridge_cv, reduce_folds
from object2brain.encoding.scores import pearson_r, refit_permutation_tests
from object2brain.encoding.smoother import fit_fixed_alpha_smoother
from object2brain.options import EncodeOptions, Runtime

GRID = [10.0**k for k in range(-2, 5)]


def _data(n: int, p: int, v: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    y = x @ rng.standard_normal((p, v)) * 0.3 + rng.standard_normal((n, v)) + 50.0
    return x, y


def _sklearn_predictions(
    x: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    alphas: np.ndarray,
    pca_dim: int | None = None,
    standardize: bool = False,
) -> np.ndarray:
    """Out-of-fold predictions ``(n, v)``: one scikit-learn ``Ridge`` per fold and voxel with
    that voxel's alpha ``alphas[k, j]`` (the independent reference)."""
    reductions = reduce_folds(x, folds, pca_dim=pca_dim, standardize=standardize)
    out = np.empty_like(y)
    for k, (train, test) in enumerate(fold_splits(folds)):
        fold = reductions[k]
        for j in range(y.shape[1]):
            model = Ridge(alpha=float(alphas[k, j])).fit(fold.train_inputs(x), y[train, j])
            out[test, j] = model.predict(fold.test_inputs(x))
    return out


@pytest.mark.parametrize(
    ("p", "pca_dim", "standardize"),
    [(6, None, False), (70, None, False), (70, 12, True)],
    ids=["primal", "more features than stimuli", "pca+standardize"],
)
def test_null_statistics_equal_sklearn_refits_with_the_chosen_alphas(
    p: int, pca_dim: int | None, standardize: bool
) -> None:
    """Every relabelled copy's mean r (per mask) equals the mean r of scikit-learn ridge refits
    with each voxel's alphas, to 1e-10, on every chunking; a voxel that is constant within a
    small mask drops out of that mask's mean (NaN on one path only would fail). The responses
    sit far from 0 (mean 50): the moment sums must not lose precision to it."""
    x, y = _data(36, p, 5, seed=p)
    y[:, 4] = np.random.default_rng(1).integers(0, 2, 36) + 50.0  # binary voxel
    folds = outer_folds(36, 4, seed=0)
    fit = fit_ridge_cv(
        x, y, folds, alphas=GRID, inner_folds=3, seed=0, pca_dim=pca_dim, standardize=standardize
    )
    assert len(np.unique(fit.alphas)) > 1  # the alphas differ between voxels and folds
    smoother = fit_fixed_alpha_smoother(
        x, folds, alphas=GRID, pca_dim=pca_dim, standardize=standardize
    )
    null = smoother.bind(fit.alphas)
    np.testing.assert_allclose(null.predict(y), fit.predictions, rtol=0, atol=1e-8)
    rng = np.random.default_rng(2)
    orders = np.stack([rng.permutation(36) for _ in range(9)])
    masks = [np.ones(36, dtype=bool), np.arange(36) % 2 == 0, np.arange(36) < 3]
    expected = np.empty((len(masks), len(orders)))
    for b, order in enumerate(orders):
        refit = _sklearn_predictions(x, y[order], folds, fit.alphas, pca_dim, standardize)
        for m, mask in enumerate(masks):
            expected[m, b] = np.nanmean(pearson_r(y[order][mask], refit[mask]))
    for max_elements in (None, 1, 36 * 5 * 2):  # default, one copy per chunk, two per chunk
        got = smoother.bind(fit.alphas, max_elements=max_elements).null_mean_r(y, orders, masks)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    # other alphas give other statistics (the binding matters)
    other = smoother.bind(np.full_like(fit.alphas, GRID[0])).null_mean_r(y, orders, masks)
    assert np.abs(other - expected).max() > 1e-3


def test_stage_p_values_equal_a_brute_force_refit_test() -> None:
    """``perm_null = fixed_alpha`` in the stage: each row's p and permutation count equal
    :func:`refit_permutation_tests` with scikit-learn refits at the alphas the stage chose
    (host path), for the ``all`` row and each condition, sequential and full."""
    x, y = _data(30, 8, 4, seed=5)
    y[:15] += 2.0 * x[:15, :4]  # planted in half of the stimuli
    ids = [f"s{i}" for i in range(30)]
    conditions = ["a", "b", "c"] * 10
    for stop, n_perm in ((0, 60), (3, 150)):
        options = EncodeOptions(
            n_perm=n_perm, perm_null="fixed_alpha", perm_stop=stop, folds=3, inner_folds=3,
            alphas=GRID,
        )  # fmt: skip
        result = compute_encoding(
            {"l": x}, {("roi", "s"): y}, options, Runtime(seed=4, device="cpu", progress=False),
            stimulus_ids=ids, conditions=conditions,
        )  # fmt: skip
        fit = result.fits[("l", "roi", "s")].ridge
        folds = result.folds["fold"].to_numpy()
        labels = np.asarray(conditions)
        masks = [np.ones(30, dtype=bool)] + [labels == c for c in "abc"]
        chosen = fit.alphas

        def refit(r: np.ndarray, f: np.ndarray = folds, a: np.ndarray = chosen) -> np.ndarray:
            return _sklearn_predictions(x, r, f, np.tile(a, r.shape[1] // 4))

        expected = refit_permutation_tests(
            y, fit.predictions, refit, masks, n_perm=n_perm, seed=4, stop=stop
        )
        table = result.encoding
        assert table["condition"].tolist() == ["all", "a", "b", "c"]
        np.testing.assert_allclose(table["p_perm"], [t.p for t in expected], rtol=0, atol=1e-12)
        assert table["n_perm"].tolist() == [t.n_used for t in expected]
    assert table["p_perm"].iloc[0] < 0.05


def test_bind_rejects_alphas_of_other_folds_or_off_the_grid() -> None:
    x, _ = _data(20, 4, 1, seed=0)
    smoother = fit_fixed_alpha_smoother(x, outer_folds(20, 4, seed=0), alphas=GRID)
    with pytest.raises(ValueError, match="4 outer folds"):
        smoother.bind(np.ones((3, 2)))
    with pytest.raises(ValueError, match="off the grid"):
        smoother.bind(np.full((4, 2), 2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu() -> None:
    """float64 on both devices: predictions and null statistics agree to rounding (1e-10)."""
    x, y = _data(80, 120, 50, seed=9)
    folds = outer_folds(80, 5, seed=0)
    fit = fit_ridge_cv(x, y, folds, alphas=GRID, inner_folds=5, seed=0, pca_dim=40)
    on_cpu = fit_fixed_alpha_smoother(x, folds, alphas=GRID, pca_dim=40).bind(fit.alphas)
    on_cuda = fit_fixed_alpha_smoother(x, folds, alphas=GRID, pca_dim=40, device="cuda").bind(
        fit.alphas
    )
    np.testing.assert_allclose(on_cuda.predict(y), on_cpu.predict(y), rtol=0, atol=1e-10)
    orders = np.stack([np.random.default_rng(i).permutation(80) for i in range(30)])
    masks = [np.ones(80, dtype=bool), np.arange(80) % 2 == 0]
    np.testing.assert_allclose(
        on_cuda.null_mean_r(y, orders, masks),
        on_cpu.null_mean_r(y, orders, masks),
        rtol=0,
        atol=1e-10,
    )

"""The torch spectral smoother of the ``refit`` null against the dense numpy maps, himalaya and
the exact permutation tests built on each; chunking; CUDA against the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from object2brain.encoding.folds import outer_folds
from object2brain.encoding.ridge import fit_ridge_cv, fit_smoother, reduce_folds
from object2brain.encoding.scores import refit_permutation_tests
from object2brain.encoding.smoother import fit_torch_smoother

GRID = np.logspace(-2, 4, 13)
ROOT = Path(__file__).resolve().parents[2]


def _data(n: int, p: int, v: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    return x, x @ rng.standard_normal((p, v)) * 0.3 + rng.standard_normal((n, v))


@pytest.mark.parametrize(
    ("p", "pca_dim", "standardize", "folds", "inner"),
    [
        (8, None, False, 5, 4),
        (90, None, False, 5, 5),
        (90, 20, True, 3, 3),
        (90, 200, False, 4, 3),
    ],
    ids=["primal", "kernel", "pca+standardize", "pca (lossless)"],
)
def test_torch_smoother_equals_the_dense_maps_and_himalaya(
    p: int, pca_dim: int | None, standardize: bool, folds: int, inner: int
) -> None:
    """Predictions of the responses and of relabelled copies (all columns at once) equal the
    dense numpy :class:`CvSmoother` to 1e-10 and himalaya's refit to 1e-8 (its own solver);
    a wrong alpha choice, score or fold would differ by the signal's size (~0.1-1)."""
    x, y = _data(60, p, 7, seed=p)
    split = outer_folds(60, folds, seed=1)
    args = {"alphas": GRID, "inner_folds": inner, "seed": 2, "pca_dim": pca_dim}
    dense = fit_smoother(x, split, standardize=standardize, **args)
    fast = fit_torch_smoother(x, split, standardize=standardize, **args)
    rng = np.random.default_rng(0)
    copies = np.hstack([y] + [y[rng.permutation(60)] for _ in range(5)])
    ours = fast.predict(copies)
    np.testing.assert_allclose(ours, dense.predict(copies), rtol=0, atol=1e-10)
    refit = fit_ridge_cv(x, copies, split, standardize=standardize, **args).predictions
    np.testing.assert_allclose(ours, refit, rtol=0, atol=1e-8)
    # the alpha choice matters here: with the middle alpha only the predictions move
    fixed = fit_ridge_cv(x, copies, split, standardize=standardize, **{**args, "alphas": [1.0]})
    assert np.abs(ours - fixed.predictions).max() > 1e-3


def test_shared_reductions_and_chunking_do_not_change_the_predictions() -> None:
    x, y = _data(50, 40, 30, seed=3)
    split = outer_folds(50, 5, seed=0)
    args = {"alphas": GRID, "inner_folds": 4, "seed": 1}
    shared = reduce_folds(x, split, pca_dim=12, standardize=True)
    whole = fit_torch_smoother(x, split, reductions=shared, **args).predict(y)
    own = fit_torch_smoother(x, split, pca_dim=12, standardize=True, **args)
    np.testing.assert_array_equal(own.predict(y), whole)
    # one column per chunk against all at once
    tiny = fit_torch_smoother(x, split, reductions=shared, max_elements=1, **args)
    np.testing.assert_allclose(tiny.predict(y), whole, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="other folds"):
        fit_torch_smoother(x, outer_folds(50, 4, seed=0), reductions=shared, **args)


def test_exact_tests_equal_the_dense_and_the_himalaya_refits() -> None:
    """The permutation tests (sequential and full) on the torch smoother (scoring on its device,
    or predicting for the host to score) give the p-values, permutation counts and null
    statistics of the dense maps (to 1e-10) and of a brute-force refit with himalaya (each call
    a new :func:`fit_ridge_cv` of the relabelled copies), on a tiny case, whatever the columns
    per call; voxels constant within a mask drop out of its mean on both paths."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((30, 6))
    y = rng.standard_normal((30, 4))
    y[:15] += x[:15] @ rng.standard_normal((6, 4))  # a signal in the first half only
    # binary: constant within the 3-stimulus mask in about a quarter of the relabellings (an
    # undefined r, dropped from the mean: NaN on one path and not the other would fail below)
    y[:, 3] = rng.integers(0, 2, 30)
    split = np.arange(30) % 3
    args = {"alphas": [0.1, 10.0, 1000.0], "inner_folds": 3, "seed": 0}
    fast = fit_torch_smoother(x, split, **args)
    dense = fit_smoother(x, split, **args)

    def himalaya(responses: np.ndarray) -> np.ndarray:
        return fit_ridge_cv(x, responses, split, **args).predictions

    masks = [np.ones(30, dtype=bool), np.arange(30) < 15, np.arange(30) >= 15, np.arange(30) < 3]
    predictions = fast.predict(y)
    for stop, n_perm in ((0, 60), (4, 200)):
        runs = [
            refit_permutation_tests(
                y, predictions, refit, masks, n_perm=n_perm, seed=3, stop=stop, max_columns=cols
            )
            for refit, cols in (
                (fast, 8192),  # relabelled, refitted and scored by the smoother (its device)
                (fast, 12),
                (fast.predict, 8192),  # predictions only, scored on the host
                (dense.predict, 8192),
                (himalaya, 8192),
            )
        ]
        for results in runs[1:]:
            for ours, other in zip(runs[0], results, strict=True):
                assert (ours.p, ours.n_used) == (other.p, other.n_used)
                np.testing.assert_allclose(ours.null, other.null, rtol=0, atol=1e-8)
        for ours, other in zip(runs[0], runs[3], strict=True):
            np.testing.assert_allclose(ours.null, other.null, rtol=0, atol=1e-10)
    assert runs[0][1].p < 0.05 < runs[0][2].p  # the planted half rejects, the other does not


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu() -> None:
    """float64 on both devices: the predictions and the null statistics agree to rounding
    (1e-10)."""
    x, y = _data(80, 120, 50, seed=9)
    split = outer_folds(80, 5, seed=0)
    args = {"alphas": GRID, "inner_folds": 5, "seed": 0, "pca_dim": 40}
    on_cpu = fit_torch_smoother(x, split, **args)
    on_cuda = fit_torch_smoother(x, split, device="cuda", **args)
    np.testing.assert_allclose(on_cuda.predict(y), on_cpu.predict(y), rtol=0, atol=1e-10)
    orders = np.stack([np.random.default_rng(i).permutation(80) for i in range(30)])
    masks = [np.ones(80, dtype=bool), np.arange(80) % 2 == 0]
    np.testing.assert_allclose(
        on_cuda.null_mean_r(y, orders, masks),
        on_cpu.null_mean_r(y, orders, masks),
        rtol=0,
        atol=1e-10,
    )


@pytest.mark.slow
def test_gpu_case_runs_the_refit_null_without_pydantic_or_himalaya(tmp_path: Path) -> None:
    """``benchmarks/gpu_cases.py --cases encode`` on the CPU, as on the device image (no pydantic,
    no himalaya): the refit null's CPU-vs-device check and timings run, the himalaya part says
    it is skipped."""
    code = (
        "import runpy, sys; sys.modules['pydantic'] = None; sys.modules['himalaya'] = None; "
        f"sys.argv = ['gpu_cases.py', '--smoke', '--device', 'cpu', '--cases', 'encode', "
        f"'--json', {str(tmp_path / 'out.json')!r}]; "
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_cases.py')!r}, run_name='__main__')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=600)
    case = json.loads((tmp_path / "out.json").read_text())["cases"]["encode"]
    assert "himalaya" in case["skipped"]
    assert case["refit_null"]["check"]["ok"]
    for shape in ("demo", "issue_scale"):
        assert case["refit_null"][shape]["device_s"] > 0
        assert case["refit_null"][shape]["max_null_difference_first_relabellings"] < 1e-10

"""Per-voxel scores, noise ceiling and the permutation test."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import r2_score as sk_r2

from object2brain.encoding.ridge import fit_smoother
from object2brain.encoding.scores import (
    PERM_BLOCK,
    noise_ceiling,
    pearson_r,
    permutation_test,
    r2_score,
    refit_permutation_test,
    refit_permutation_tests,
    roi_summary,
)
from object2brain.errors import DataError


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.standard_normal((40, 12))
    return y, 0.4 * y + rng.standard_normal((40, 12))


def test_r_and_r2_match_references(data: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = data
    expected = [np.corrcoef(y[:, i], p[:, i])[0, 1] for i in range(12)]
    np.testing.assert_allclose(pearson_r(y, p), expected, atol=1e-12)
    np.testing.assert_allclose(r2_score(y, p), sk_r2(y, p, multioutput="raw_values"), atol=1e-12)
    summary = roi_summary(pearson_r(y, p), r2_score(y, p))
    assert summary.r_median == pytest.approx(float(np.median(expected)))


def test_noise_ceiling_is_spearman_brown_corrected_split_half() -> None:
    rng = np.random.default_rng(1)
    signal = rng.standard_normal((50, 30))
    runs = signal[None] + rng.standard_normal((4, 50, 30))
    half = pearson_r(runs[0::2].mean(0), runs[1::2].mean(0))
    np.testing.assert_allclose(
        noise_ceiling(runs), np.sqrt(np.clip(2 * half / (1 + half), 0, None))
    )
    # Signal variance 1, noise variance 1/4 in the mean of 4 runs: reliability 0.8.
    assert float(np.mean(noise_ceiling(runs))) == pytest.approx(np.sqrt(0.8), abs=0.05)
    assert float(np.mean(noise_ceiling(rng.standard_normal((4, 50, 30))))) < 0.2
    with pytest.raises(DataError, match="runs >= 2"):
        noise_ceiling(runs[:1])


def test_permutation_p_value_counts_the_null(data: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = data
    result = permutation_test(y, p, n_perm=300, seed=5)
    assert result.observed == pytest.approx(float(pearson_r(y, p).mean()))
    exceed = int(np.sum(result.null >= result.observed - 1e-12))
    assert result.p == (1 + exceed) / 301
    # The first null value is the mean r of the first permutation of block 0.
    first = np.random.default_rng([5, 0]).permuted(np.tile(np.arange(40), (PERM_BLOCK, 1)), axis=1)
    assert result.null[0] == pytest.approx(float(pearson_r(y, p[first[0]]).mean()))
    assert np.isnan(permutation_test(y, p, n_perm=0, seed=5).p)


@pytest.mark.parametrize("groups", [None, np.repeat(np.arange(4), 10)])
def test_permutations_do_not_depend_on_chunking(
    data: tuple[np.ndarray, np.ndarray], groups: np.ndarray | None
) -> None:
    y, p = data
    n_perm = 3 * PERM_BLOCK + 17
    runs = [
        permutation_test(y, p, n_perm=n_perm, seed=9, groups=groups, blocks_per_chunk=chunk)
        for chunk in (1, 2, 100)
    ]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.null, runs[0].null)
        assert other.p == runs[0].p
    # a prefix of a longer run is the shorter run
    short = permutation_test(y, p, n_perm=100, seed=9, groups=groups)
    np.testing.assert_array_equal(short.null, runs[0].null[:100])


def test_within_group_permutations_keep_each_group() -> None:
    rng = np.random.default_rng(2)
    y = rng.standard_normal((12, 2))
    groups = np.repeat(np.arange(3), 4)
    # predictions constant within groups: a within-group permutation changes nothing
    p = np.column_stack([groups * 1.0, groups * -2.0])
    result = permutation_test(y, p, n_perm=50, seed=0, groups=groups)
    np.testing.assert_allclose(result.null, result.observed, atol=1e-12)
    assert result.p == 1.0
    assert permutation_test(y, p, n_perm=50, seed=0).p < 1.0


def test_refit_permutation_test_relabels_and_refits(data: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = data
    calls: list[np.ndarray] = []

    def refit(responses: np.ndarray) -> np.ndarray:
        calls.append(responses)
        return 0.5 * responses  # a "model" that predicts perfectly: every null r is 1

    # 12 voxels, 36 columns per call: 3 relabelled copies stacked per refit
    result = refit_permutation_test(y, p, refit, n_perm=PERM_BLOCK + 3, seed=4, max_columns=36)
    assert len(calls) == -(-(PERM_BLOCK + 3) // 3)
    np.testing.assert_allclose(result.null, 1.0)
    assert result.p == 1.0
    order = np.random.default_rng([4, 0]).permuted(np.tile(np.arange(40), (PERM_BLOCK, 1)), axis=1)
    np.testing.assert_array_equal(calls[0][:, 12:24], y[order[1]])  # the second permutation
    mask = np.arange(40) < 20
    masked = refit_permutation_test(y, p, refit, n_perm=5, seed=4, mask=mask)
    assert masked.observed == pytest.approx(float(pearson_r(y[mask], p[mask]).mean()))


def test_refit_tests_do_not_depend_on_batching_and_share_the_refits() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 5))
    y = x @ rng.standard_normal((5, 4)) * 0.3 + rng.standard_normal((30, 4))
    folds = np.arange(30) % 3
    smoother = fit_smoother(x, folds, alphas=[0.1, 10.0, 1000.0], inner_folds=3, seed=0)
    predictions = smoother.predict(y)
    masks = [np.ones(30, dtype=bool), np.arange(30) < 15]
    calls: list[int] = []

    def counted(responses: np.ndarray) -> np.ndarray:
        calls.append(responses.shape[1])
        return smoother.predict(responses)

    batched = refit_permutation_tests(y, predictions, counted, masks, n_perm=300, seed=2)
    assert sum(calls) == 300 * 4  # one refit per permutation for both masks
    for mask, together in zip(masks, batched, strict=True):
        one = refit_permutation_test(
            y, predictions, smoother.predict, n_perm=300, seed=2, mask=mask, max_columns=4
        )
        np.testing.assert_allclose(together.null, one.null, atol=1e-12)
        assert together.p == one.p
    # each null value is the mean r of a relabelled refit, computed directly
    first = np.random.default_rng([2, 0]).permuted(np.tile(np.arange(30), (PERM_BLOCK, 1)), axis=1)[
        0
    ]
    direct = float(pearson_r(y[first], smoother.predict(y[first])).mean())
    assert batched[0].null[0] == pytest.approx(direct, abs=1e-12)

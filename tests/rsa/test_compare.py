"""Comparisons against rsatoolbox and scipy, and hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
import rsatoolbox
import scipy.stats
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from object2brain.errors import DataError
from object2brain.rsa.compare import WeightedComparison, compare, masked_compare, rankdata
from object2brain.rsa.rdm import rdm_from_features, upper_triangle

RSATOOLBOX_NAME = {"spearman": "spearman", "pearson": "corr", "kendall_tau_a": "tau-a"}


@pytest.mark.parametrize("method", ["spearman", "pearson", "kendall_tau_a"])
def test_compare_matches_rsatoolbox(method: str) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 45))
    b = np.round(rng.normal(size=(4, 45)), 1)  # ties
    b[0] = np.round(b[0])  # many ties
    ref = rsatoolbox.rdm.compare(
        rsatoolbox.rdm.RDMs(a), rsatoolbox.rdm.RDMs(b), method=RSATOOLBOX_NAME[method]
    )
    np.testing.assert_allclose(compare(a, b, method).numpy(), ref, atol=1e-6)


def test_rankdata_matches_scipy_with_ties() -> None:
    x = np.round(np.random.default_rng(1).normal(size=(4, 3, 50)), 1)
    np.testing.assert_allclose(
        rankdata(torch.as_tensor(x)).numpy(), scipy.stats.rankdata(x, axis=-1)
    )


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 6),
    st.integers(2, 80),
    st.lists(st.sampled_from([None, 0, 1]), min_size=6, max_size=6),
)
def test_rankdata_matches_scipy_rows_with_and_without_ties(
    seed: int, rows: int, m: int, rounding: list[int | None]
) -> None:
    """Rows without ties take the fast path, rows with ties the averaging one, in one call."""
    x = np.random.default_rng(seed).normal(size=(rows, m))
    for r in range(rows):
        if rounding[r] is not None:
            x[r] = np.round(x[r], rounding[r])
    np.testing.assert_allclose(
        rankdata(torch.as_tensor(x)).numpy(), scipy.stats.rankdata(x, axis=-1)
    )


def test_rankdata_of_a_row_with_nan_is_nan_as_scipy() -> None:
    """A NaN entry makes its whole row NaN (scipy's nan_policy="propagate"); other rows keep
    their ranks, so a Spearman coefficient of an undefined RDM is NaN rather than made up."""
    x = np.array([[0.3, np.nan, 0.1, 0.2], [0.3, 0.3, 0.1, 0.2], [np.nan] * 4])
    got = rankdata(torch.as_tensor(x)).numpy()
    np.testing.assert_array_equal(got, scipy.stats.rankdata(x, axis=-1, nan_policy="propagate"))
    assert np.isnan(got[0]).all() and np.isfinite(got[1]).all()


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # constant rows: on purpose
@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(3, 40),
    st.sampled_from(["spearman", "pearson"]),
    st.booleans(),
)
def test_weighted_comparison_equals_scipy_on_expanded_copies(
    seed: int, m: int, method: str, ties: bool
) -> None:
    """Integer weights (0 drops an entry, c counts it c times) vs scipy on explicit copies."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, m)), rng.normal(size=(3, m))
    if ties:
        a[0], b[1] = np.round(a[0]), np.round(b[1] * 2) / 2
    w = rng.integers(0, 4, size=(4, m)).astype(float)
    w[:, :3] = 1  # at least three distinct entries per weighting
    got = WeightedComparison(a, b, method)(torch.as_tensor(w)).numpy()
    correlate = scipy.stats.spearmanr if method == "spearman" else scipy.stats.pearsonr
    for k, weights in enumerate(w):
        copies = np.repeat(np.arange(m), weights.astype(int))
        with np.errstate(all="ignore"):
            expected = [[correlate(x[copies], y[copies])[0] for y in b] for x in a]
        np.testing.assert_allclose(got[k], expected, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(
    st.floats(-1e6, 1e6, allow_nan=False).filter(lambda v: v != 0),
    st.integers(2, 60),
    st.integers(1, 9),
    st.sampled_from(["spearman", "pearson"]),
)
def test_constant_rows_are_undefined_not_rounding_noise(
    value: float, m: int, copies: int, method: str
) -> None:
    """A constant row (its mean rounds, so centring leaves ~1e-17, not 0) and a weighting that
    keeps copies of one entry only both give NaN, never a spurious +-1 or ~0."""
    rng = np.random.default_rng(m)
    other = rng.normal(size=(1, m))
    assert torch.isnan(compare(np.full((1, m), value), other, method)).all()
    w = np.zeros((1, m))
    w[0, m // 2] = copies  # e.g. a bootstrap resample that kept one distinct pair
    got = WeightedComparison(rng.normal(size=(2, m)) + value, other, method)(torch.as_tensor(w))
    assert torch.isnan(got).all()
    w[0, :] = copies
    got = WeightedComparison(np.full((1, m), value), other, method)(torch.as_tensor(w))
    assert torch.isnan(got).all()


@pytest.mark.parametrize("method", ["spearman", "pearson", "kendall_tau_a"])
def test_masked_compare_equals_compare_on_valid_entries(method: str) -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 30)), np.round(rng.normal(size=(3, 30)), 1)
    w = np.ones(30)
    w[[1, 5, 17]] = 0
    keep = w > 0
    got = masked_compare(
        torch.as_tensor(a)[None], torch.as_tensor(b)[None], torch.as_tensor(w)[None], method
    )[0]
    np.testing.assert_allclose(
        got.numpy(), compare(a[:, keep], b[:, keep], method).numpy(), atol=1e-12
    )


def test_size_mismatch_and_unknown_method() -> None:
    with pytest.raises(DataError, match="differ in size"):
        compare(np.ones((1, 3)), np.ones((1, 6)))
    with pytest.raises(DataError, match="unknown comparison"):
        compare(np.ones((1, 3)), np.ones((1, 3)), "bures")


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.int64, st.integers(3, 40), elements=st.integers(0, 1000)),
    arrays(np.int64, 40, elements=st.integers(0, 1000)),
)
def test_spearman_invariant_to_monotone_transform(x: np.ndarray, y_full: np.ndarray) -> None:
    y = y_full[: x.size].astype(np.float64)
    xf = x.astype(np.float64)
    assume(np.ptp(xf) > 0 and np.ptp(y) > 0)
    transformed = xf**3 + 7 * xf + 5  # strictly increasing, exact in float64
    r1 = compare(xf, y, "spearman")
    r2 = compare(transformed, y, "spearman")
    torch.testing.assert_close(r1, r2, atol=1e-12, rtol=0)
    t1 = compare(xf, y, "kendall_tau_a")
    t2 = compare(transformed, y, "kendall_tau_a")
    torch.testing.assert_close(t1, t2, atol=1e-12, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    arrays(
        np.float64,
        st.tuples(st.integers(2, 8), st.integers(2, 12)),
        elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
    ),
    st.sampled_from(["correlation", "euclidean", "cosine"]),
)
def test_rdm_symmetric_zero_diagonal(X: np.ndarray, metric: str) -> None:
    try:
        D = rdm_from_features(X, metric, device="cpu", chunk_elements=5)
    except DataError:
        assume(False)
        return
    assert torch.equal(D, D.T)
    assert torch.all(torch.diagonal(D) == 0)
    assert torch.all(D >= -1e-9)
    if metric != "euclidean":
        assert torch.all(D <= 2 + 1e-9)
    assert upper_triangle(D).shape == (X.shape[0] * (X.shape[0] - 1) // 2,)

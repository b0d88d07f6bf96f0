"""RDMs against rsatoolbox and against direct formulas."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from rsatoolbox.data import Dataset
from rsatoolbox.rdm import calc_rdm

from object2brain.activations.store import ActivationStore
from object2brain.errors import DataError
from object2brain.rsa.rdm import (
    behavior_rdm,
    rdm_from_features,
    rdm_from_store,
    snap_ties,
    squareform,
    to_rsatoolbox,
    upper_triangle,
)


@pytest.mark.parametrize("metric", ["correlation", "euclidean"])
def test_rdm_matches_rsatoolbox(metric: str) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(15, 40)) * 3 + 10  # large offset: exercises the shifted accumulation
    ref = calc_rdm(Dataset(X), method=metric).get_vectors()[0]
    # several feature chunks
    ours = upper_triangle(rdm_from_features(X, metric, device="cpu", chunk_elements=15 * 7))
    ours_np = ours.numpy()
    if metric == "euclidean":  # rsatoolbox: squared distance / n_features
        ours_np = ours_np**2 / X.shape[1]
    np.testing.assert_allclose(ours_np, ref, atol=1e-6, rtol=0)


def test_cosine_matches_scipy() -> None:
    from scipy.spatial.distance import pdist

    X = np.random.default_rng(1).normal(size=(10, 20))
    ours = upper_triangle(rdm_from_features(X, "cosine", device="cpu", chunk_elements=30))
    np.testing.assert_allclose(ours.numpy(), pdist(X, "cosine"), atol=1e-10)


def test_multidim_features_are_flattened() -> None:
    X = np.random.default_rng(2).normal(size=(8, 3, 4, 4))
    a = rdm_from_features(X, device="cpu", chunk_elements=8 * 5)
    b = rdm_from_features(X.reshape(8, -1), device="cpu")
    torch.testing.assert_close(a, b)


def test_single_feature_is_absolute_difference() -> None:
    v = np.array([1.0, -2.0, 0.5])
    expected = np.abs(v[:, None] - v[None, :])
    np.testing.assert_allclose(rdm_from_features(v, device="cpu").numpy(), expected)
    np.testing.assert_allclose(behavior_rdm(v, device="cpu").numpy(), expected)


def test_zero_variance_pattern_named() -> None:
    X = np.random.default_rng(3).normal(size=(5, 10))
    X[2] = 4.0
    with pytest.raises(DataError, match=r"zero-variance.*s2"):
        rdm_from_features(X, device="cpu", ids=["s0", "s1", "s2", "s3", "s4"])


def test_nan_features_rejected() -> None:
    X = np.ones((4, 3))
    X[1, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        rdm_from_features(X, device="cpu")


def test_squareform_roundtrip() -> None:
    v = torch.arange(10, dtype=torch.float64)
    D = squareform(v)
    assert D.shape == (5, 5)
    torch.testing.assert_close(upper_triangle(D), v)
    torch.testing.assert_close(D, D.T)


def test_rdm_from_store_streams_columns(activation_store) -> None:  # type: ignore[no-untyped-def]
    path, _layers, ids = activation_store
    with ActivationStore.open(path) as store:
        order = ids[::-1]
        D = rdm_from_store(store, "conv1", order, device="cpu", chunk_elements=len(ids) * 2 * 9)
        with h5py.File(path) as f:
            X = np.asarray(f["layers/conv1"])[::-1]
        torch.testing.assert_close(D, rdm_from_features(X, device="cpu"))
        V = rdm_from_store(store, "valence", order, device="cpu")
        assert V.shape == (len(ids), len(ids))


def test_to_rsatoolbox() -> None:
    D = rdm_from_features(np.random.default_rng(4).normal(size=(6, 5)), device="cpu")
    rdms = to_rsatoolbox(torch.stack([D, D]), list("abcdef"), descriptors={"layer": ["x", "y"]})
    assert rdms.n_rdm == 2
    assert rdms.pattern_descriptors["stimulus_id"] == list("abcdef")
    assert rdms.rdm_descriptors["layer"] == ["x", "y"]
    np.testing.assert_allclose(rdms.get_matrices()[0], D.numpy())


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.float64, (2, 15), elements=st.floats(0, 1e6, allow_subnormal=False)),
    st.sampled_from([1e-9, 1.0, 3.0, 1e9]),
)
@example(np.full((2, 15), 6.4e-298), 1e-9)  # near the subnormal range (found by hypothesis)
def test_snap_ties_moves_values_by_at_most_2_to_minus_40_of_the_largest(
    values: np.ndarray, scale: float
) -> None:
    d = torch.as_tensor(values * scale)
    snapped = snap_ties(d, dims=1)
    peak = d.abs().amax(dim=1, keepdim=True)
    assert bool(((snapped - d).abs() <= 2.0**-40 * peak).all())
    assert bool((snapped[d == 0] == 0).all())
    np.testing.assert_array_equal(snap_ties(snapped, dims=1), snapped)  # idempotent


def test_group_mean_ratings_tie_exactly() -> None:
    """|v_i - v_j| of means of integer ratings over 3 raters: equal differences (multiples of
    1/3) that float rounding splits must rank as ties, as with exact integer sums."""
    rng = np.random.default_rng(3)
    ratings = rng.integers(-3, 4, size=(3, 40))
    means = ratings.mean(axis=0)
    rdm = upper_triangle(behavior_rdm(means, device="cpu")).numpy()
    sums = ratings.sum(axis=0)
    exact = np.abs(sums[:, None] - sums[None, :])[np.triu_indices(40, 1)]  # 3 x the true RDM
    raw = np.abs(means[:, None] - means[None, :])[np.triu_indices(40, 1)]
    assert len(np.unique(raw)) > len(np.unique(exact))  # rounding does split ties here
    assert len(np.unique(rdm)) == len(np.unique(exact))
    other = rng.normal(size=exact.shape)
    np.testing.assert_allclose(
        scipy.stats.rankdata(rdm), scipy.stats.rankdata(exact), rtol=0, atol=0
    )
    assert scipy.stats.spearmanr(rdm, other)[0] == pytest.approx(
        scipy.stats.spearmanr(exact, other)[0], abs=1e-15
    )

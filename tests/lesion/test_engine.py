"""The sufficient-statistics engine equals brute force: mask the features, recompute the RDM."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import pdist

from object2brain.activations.store import ActivationStore
from object2brain.errors import DataError
from object2brain.lesion.engine import (
    MAX_STRATA,
    FilterStats,
    condensed_subset,
    matched_subset_masks,
    norm_strata,
    random_subset_masks,
)
from object2brain.rsa.rdm import rdm_from_features, upper_triangle

SCIPY_METRIC = {"correlation": "correlation", "euclidean": "euclidean", "cosine": "cosine"}


def brute_force(acts: np.ndarray, mask: np.ndarray, metric: str) -> np.ndarray:
    masked = acts * mask[None, :, None, None]
    return pdist(masked.reshape(acts.shape[0], -1), SCIPY_METRIC[metric])


@pytest.fixture
def acts() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.maximum(rng.normal(size=(12, 10, 3, 4)), 0) + rng.normal(size=(12, 10, 1, 1))


@pytest.mark.parametrize("metric", ["correlation", "euclidean", "cosine"])
def test_random_subsets_equal_brute_force(acts: np.ndarray, metric: str) -> None:
    stats = FilterStats.from_activations(acts)
    masks = random_subset_masks(10, 4, 25, seed=1)
    masks[0] = True  # all filters
    engine = stats.rdms(masks, metric, chunk_bytes=10 * 8 * 7)  # force several pair chunks
    for mask, row in zip(masks, engine, strict=True):
        np.testing.assert_allclose(
            row.numpy(), brute_force(acts, mask, metric), atol=1e-9, rtol=1e-9
        )


@pytest.mark.parametrize("metric", ["correlation", "euclidean", "cosine"])
def test_all_filters_equal_alignment_engine_rdm(acts: np.ndarray, metric: str) -> None:
    stats = FilterStats.from_activations(acts, chunk_bytes=12 * 12 * 8 * 3)  # filter chunks
    full = stats.rdms(np.ones(10, dtype=bool), metric)[0]
    plain = upper_triangle(rdm_from_features(acts, metric, device="cpu"))
    np.testing.assert_allclose(full.numpy(), np.asarray(plain).reshape(-1), atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(3, 9),
    k=st.integers(2, 6),
    positions=st.integers(1, 5),
    metric=st.sampled_from(["correlation", "euclidean", "cosine"]),
)
def test_engine_property(seed: int, n: int, k: int, positions: int, metric: str) -> None:
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(n, k, positions)) + 2.0
    mask = rng.random(k) < 0.6
    mask[rng.integers(k)] = True
    engine = FilterStats.from_activations(acts).rdms(mask, metric)[0].numpy()
    masked = (acts * mask[None, :, None]).reshape(n, -1)
    np.testing.assert_allclose(engine, pdist(masked, metric), atol=1e-8, rtol=1e-8)


def test_stimulus_subset(acts: np.ndarray) -> None:
    stats = FilterStats.from_activations(acts, [f"s{i}" for i in range(12)])
    keep = [7, 2, 9, 3]
    sub = stats.subset(keep)
    assert sub.stimulus_ids == ["s2", "s3", "s7", "s9"]
    mask = np.arange(10) % 2 == 0
    np.testing.assert_allclose(
        sub.rdms(mask)[0].numpy(), brute_force(acts[sorted(keep)], mask, "correlation"), atol=1e-9
    )
    full = stats.rdms(mask)[0].numpy()
    np.testing.assert_allclose(full[condensed_subset(12, keep)], sub.rdms(mask)[0].numpy())


def test_from_store_streams_filters_in_id_order(acts: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as handle:
        handle["stimulus_ids"] = np.array([f"s{i}" for i in range(12)], dtype=object)
        handle.create_group("layers")["conv"] = acts.astype(np.float32)
        handle.attrs["complete"] = True
    ids = [f"s{i}" for i in (5, 1, 0, 11, 3)]
    with ActivationStore.open(path) as store:
        stats = FilterStats.from_store(store, "conv", ids, chunk_bytes=5 * 12 * 8 * 2)
    assert stats.stimulus_ids == ids
    mask = np.ones(10, dtype=bool)
    expected = brute_force(
        acts.astype(np.float32).astype(np.float64)[[5, 1, 0, 11, 3]], mask, "correlation"
    )
    np.testing.assert_allclose(stats.rdms(mask)[0].numpy(), expected, atol=1e-9)


def test_degenerate_subset_is_reported(acts: np.ndarray) -> None:
    stats = FilterStats.from_activations(acts)
    with pytest.raises(DataError, match="constant"):
        stats.rdms(np.zeros(10, dtype=bool))
    with pytest.raises(DataError, match="has 10"):
        stats.rdms(np.ones(9, dtype=bool))


def test_random_masks_have_the_right_size_and_are_seeded() -> None:
    a = random_subset_masks(50, 7, 100, seed=3)
    assert a.shape == (100, 50) and (a.sum(axis=1) == 7).all()
    assert np.array_equal(a, random_subset_masks(50, 7, 100, seed=3))
    # every filter is drawn about equally often
    assert a.sum(axis=0).min() > 0
    pooled = random_subset_masks(50, 3, 20, seed=0, pool=[1, 2, 3, 4])
    assert not pooled[:, 5:].any()


def test_torch_input_and_gpu_style_chunking(acts: np.ndarray) -> None:
    stats = FilterStats.from_activations(torch.from_numpy(acts))
    masks = random_subset_masks(10, 5, 8, seed=0)
    np.testing.assert_allclose(
        stats.rdms(masks, chunk_bytes=1).numpy(), stats.rdms(masks).numpy(), atol=1e-12
    )


@pytest.mark.parametrize("metric", ["correlation", "cosine"])
def test_one_kept_filter_of_a_1x1_layer_gives_exact_ties(metric: str) -> None:
    """One filter at one position: the distance is 1 - sign(a_i a_j), exactly 0 or 2, so the
    ranks are ties; rounding noise (numpy's values differ in the last bits) must not order them."""
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(12, 5, 1, 1))
    mask = np.zeros(5)
    mask[2] = 1
    rdm = FilterStats.from_activations(acts).rdms(mask, metric)[0].numpy()
    assert set(np.unique(rdm)) == {0.0, 2.0}
    np.testing.assert_allclose(rdm, brute_force(acts, mask, metric), atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    norms=st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=2, max_size=80),
    fraction=st.floats(0.01, 0.6),
    seed=st.integers(0, 2**16),
)
def test_norm_strata_are_quantile_bins_with_room_to_draw(
    norms: list[float], fraction: float, seed: int
) -> None:
    values = np.asarray(norms)
    k = len(values)
    rng = np.random.default_rng(seed)
    members = rng.choice(k, max(1, int(fraction * k)), replace=False)
    strata = norm_strata(values, members)
    n_strata = int(strata.max()) + 1
    assert 1 <= n_strata <= MAX_STRATA
    sizes = np.bincount(strata, minlength=n_strata)
    assert sizes.max() - sizes.min() <= 1  # quantile bins
    order = np.argsort(values, kind="stable")
    assert (np.diff(strata[order]) >= 0).all()  # ordered by norm
    if n_strata > 1:  # every stratum can be drawn from in more than one way
        assert (sizes >= 2 * np.bincount(strata[members], minlength=n_strata)).all()


def test_matched_subsets_follow_the_group_stratum_by_stratum() -> None:
    strata = np.repeat(np.arange(4), 10)  # 40 filters in 4 strata of 10
    members = np.array([31, 35, 38, 12])  # three in stratum 3, one in stratum 1
    masks = matched_subset_masks(strata, members, 4000, seed=2)
    for stratum, expected in enumerate([0, 1, 0, 3]):
        assert (masks[:, strata == stratum].sum(axis=1) == expected).all()
    # uniform within a stratum: each of its filters drawn with probability count / 10
    frequency = masks[:, strata == 3].mean(axis=0)
    np.testing.assert_allclose(frequency, 0.3, atol=0.04)
    assert np.array_equal(masks, matched_subset_masks(strata, members, 4000, seed=2))

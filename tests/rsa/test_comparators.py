"""rsatoolbox's comparators (rho-a, cosine, corr_cov, cosine_cov) in every path: the plain
comparison, the Mantel permutation null, the stimulus bootstrap, condition subsets and pooling,
each against ``rsatoolbox.rdm.compare`` on data generated here (within 1e-9)."""

from __future__ import annotations

import numpy as np
import pytest
import rsatoolbox
import torch
from rsatoolbox.util.pooling import pool_rdm

from object2brain.errors import DataError
from object2brain.options import LesionOptions, RsaOptions
from object2brain.rsa import inference
from object2brain.rsa.compare import (
    RSATOOLBOX_NAMES,
    WeightedComparison,
    compare,
    comparison_scale,
    counts_from_pair_weights,
    masked_compare,
)
from object2brain.rsa.rdm import triu_indices

NEW = ["rho_a", "cosine", "corr_cov", "cosine_cov"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rdms(rng: np.random.Generator, k: int, n: int, *, ties: bool = False) -> np.ndarray:
    """``k`` condensed RDMs over ``n`` stimuli: distances of random patterns (plus a tied one)."""
    patterns = rng.normal(size=(k, n, 6))
    diff = patterns[:, :, None] - patterns[:, None]
    square = np.sqrt((diff**2).sum(-1))
    iu, ju = np.triu_indices(n, 1)
    vectors = square[:, iu, ju]
    if ties:
        vectors[0] = np.round(vectors[0])
    return vectors


def _rsatoolbox(a: np.ndarray, b: np.ndarray, method: str) -> np.ndarray:
    ref: np.ndarray = rsatoolbox.rdm.compare(
        rsatoolbox.rdm.RDMs(a), rsatoolbox.rdm.RDMs(b), method=RSATOOLBOX_NAMES[method]
    )
    return ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [3, 4, 9, 30])
@pytest.mark.parametrize("method", NEW)
def test_compare_equals_rsatoolbox(method: str, n: int, device: str) -> None:
    rng = np.random.default_rng(n)
    a, b = _rdms(rng, 3, n, ties=True), _rdms(rng, 2, n)
    ours = compare(torch.as_tensor(a, device=device), b, method).cpu().numpy()
    np.testing.assert_allclose(ours, _rsatoolbox(a, b, method), rtol=0, atol=1e-9)


def test_rho_a_differs_from_spearman_only_with_ties() -> None:
    rng = np.random.default_rng(1)
    a, b = _rdms(rng, 2, 12, ties=True), _rdms(rng, 1, 12)
    rho_a, rho = compare(a, b, "rho_a").numpy(), compare(a, b, "spearman").numpy()
    np.testing.assert_allclose(rho_a[1], rho[1], atol=1e-12)  # no ties: the same
    assert abs(rho_a[0, 0]) < abs(rho[0, 0])  # ties shrink rho-a (the untied denominator)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", NEW)
def test_mantel_null_equals_rsatoolbox_on_permuted_rdms(method: str, device: str) -> None:
    rng = np.random.default_rng(3)
    n, n_perm = 10, 60
    a, b = _rdms(rng, 2, n, ties=True), _rdms(rng, 3, n)
    a[1] = 0.4 * a[1] + b[0]  # a planted relation: p small for that cell
    result = inference.mantel_test(a, b, method, n_perm=n_perm, seed=5, device=device)
    np.testing.assert_allclose(result.r, _rsatoolbox(a, b, method), atol=1e-9)
    iu, ju = np.triu_indices(n, 1)
    square = rsatoolbox.rdm.RDMs(a).get_matrices()
    count = np.zeros_like(result.r)
    for perm in np.concatenate(list(inference.permutations(n, n_perm, 5))):
        permuted = square[:, perm][:, :, perm][:, iu, ju]
        count += _rsatoolbox(permuted, b, method) >= result.r - 1e-12
    np.testing.assert_array_equal(result.p, (1 + count) / (1 + n_perm))
    assert result.p[1, 0] < 0.05


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", NEW)
def test_bootstrap_resamples_equal_rsatoolbox(method: str, device: str) -> None:
    """Each resample equals rsatoolbox's comparison of the resampled RDMs, whose pairs of a
    stimulus with its own copy are missing (``RDMs.subsample_pattern``)."""
    rng = np.random.default_rng(4)
    n, n_boot, seed = 12, 30, 7
    a, b = _rdms(rng, 2, n, ties=True), _rdms(rng, 2, n)
    sa, sb = rsatoolbox.rdm.RDMs(a), rsatoolbox.rdm.RDMs(b)
    values = inference.bootstrap_values(
        sa.get_matrices(), sb.get_matrices(), method, n_boot, seed, device
    )
    draws = np.random.default_rng([seed, inference._BOOT_STREAM]).integers(0, n, (n_boot, n))
    for k in range(n_boot):
        ref = rsatoolbox.rdm.compare(
            sa.subsample_pattern("index", draws[k]),
            sb.subsample_pattern("index", draws[k]),
            method=RSATOOLBOX_NAMES[method],
        )
        np.testing.assert_allclose(values[k], ref, rtol=0, atol=1e-9)


def test_counts_from_pair_weights_recovers_the_draws() -> None:
    rng = np.random.default_rng(5)
    n = 7
    idx = torch.as_tensor(rng.integers(0, n, (200, n)))
    idx[0] = torch.tensor([0, 0, 0, 0, 0, 1, 2])  # one stimulus drawn more than n / 2 times
    counts = torch.zeros((200, n), dtype=torch.float64).scatter_add_(
        1, idx, torch.ones((200, n), dtype=torch.float64)
    )
    iu, ju = triu_indices(n)
    got = counts_from_pair_weights(counts[:, iu] * counts[:, ju], n)
    distinct = (counts > 0).sum(dim=1)
    ok = distinct >= 3
    torch.testing.assert_close(got[ok], counts[ok])
    assert bool(torch.isnan(got[~ok]).all())  # too few stimuli: the weights do not tell


@pytest.mark.parametrize("method", NEW)
def test_weighted_comparison_with_unit_weights_is_plain(method: str) -> None:
    rng = np.random.default_rng(6)
    a, b = _rdms(rng, 3, 8, ties=True), _rdms(rng, 2, 8)
    w = torch.ones((2, a.shape[1]), dtype=torch.float64)
    got = WeightedComparison(a, b, method)(w)
    np.testing.assert_allclose(got[1].numpy(), _rsatoolbox(a, b, method), atol=1e-12)


@pytest.mark.parametrize("method", NEW)
def test_condition_subsets_equal_rsatoolbox(method: str) -> None:
    rng = np.random.default_rng(7)
    n = 16
    a, b = _rdms(rng, 2, n), _rdms(rng, 2, n)
    labels = ["x"] * 8 + ["y"] * 8
    sa, sb = rsatoolbox.rdm.RDMs(a), rsatoolbox.rdm.RDMs(b)
    res = inference.condition_difference_test(
        sa.get_matrices(), sb.get_matrices(), labels, "x", "y", method, n_perm=20, device="cpu"
    )
    for rows, r in ((np.arange(8), res.r_a), (np.arange(8, 16), res.r_b)):
        ref = rsatoolbox.rdm.compare(
            sa.subset_pattern("index", rows),
            sb.subset_pattern("index", rows),
            method=RSATOOLBOX_NAMES[method],
        )
        np.testing.assert_allclose(r, ref, atol=1e-9)
    assert np.all((res.p > 0) & (res.p <= 1))


@pytest.mark.parametrize("method", NEW)
def test_pooled_rdm_is_rsatoolbox_pool_up_to_scale(method: str) -> None:
    rng = np.random.default_rng(8)
    subjects = _rdms(rng, 5, 9) * rng.uniform(0.5, 4, size=(5, 1))
    ours = comparison_scale(torch.as_tensor(subjects), method).mean(dim=0).numpy()
    name = {"rho_a": "rho-a"}.get(method, method)
    ref = pool_rdm(rsatoolbox.rdm.RDMs(subjects), name).get_vectors()[0]
    if method == "rho_a":  # both pool ranks
        np.testing.assert_allclose(ours, ref, atol=1e-9)
    else:  # a factor common to all subjects: the pooled RDMs are proportional
        if method == "corr_cov":  # rsatoolbox shifts its pooled RDM (min 0.01): centre both
            ours, ref = ours - ours.mean(), ref - ref.mean()
        ratio = ours / ref
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-7)
    lower, upper = inference.noise_ceiling(subjects, method)
    assert -1 <= lower <= upper <= 1


def test_masked_compare_refuses_the_new_methods() -> None:
    x = torch.zeros((1, 1, 3), dtype=torch.float64)
    with pytest.raises(DataError, match="masked comparison supports"):
        masked_compare(x, x, torch.ones((1, 3), dtype=torch.float64), "cosine")


@pytest.mark.parametrize("method", NEW)
def test_rsa_and_lesion_options_accept_the_comparators(method: str) -> None:
    assert RsaOptions(compare=method).compare_method == method
    assert LesionOptions(compare=method).compare_method == method


@pytest.mark.parametrize("method", NEW)
def test_lesion_delta_permutation_equals_rsatoolbox(method: str) -> None:
    """The lesions' test of ``delta = r(variant, y) - r(full, y)`` (a statistic linear in the
    prepared target) with the new comparators, against rsatoolbox on permuted RDMs."""
    from object2brain.rsa.compare import prepare

    rng = np.random.default_rng(9)
    n, n_perm = 9, 40
    full, variant, y = _rdms(rng, 1, n), _rdms(rng, 1, n), _rdms(rng, 2, n)
    side = prepare(variant, method) - prepare(full, method)
    res = inference.linear_permutation_test(side, prepare(y, method), n_perm, seed=2)
    observed = _rsatoolbox(variant, y, method) - _rsatoolbox(full, y, method)
    np.testing.assert_allclose(res.r, observed, atol=1e-9)
    count = np.zeros_like(observed)
    iu, ju = np.triu_indices(n, 1)
    squares = [rsatoolbox.rdm.RDMs(v).get_matrices()[0] for v in (variant, full)]
    for perm in np.concatenate(list(inference.permutations(n, n_perm, 2))):
        v, f = (s[perm][:, perm][iu, ju][None] for s in squares)
        delta = _rsatoolbox(v, y, method) - _rsatoolbox(f, y, method)
        count += np.abs(delta) >= np.abs(observed) - 1e-12
    np.testing.assert_array_equal(res.p, (1 + count) / (1 + n_perm))

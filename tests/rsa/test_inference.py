"""Permutation tests, bootstrap, noise ceilings and FDR against brute force and planted truth."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import rsatoolbox
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from object2brain.rsa.compare import compare
from object2brain.rsa.inference import (
    bootstrap_ci,
    bootstrap_values,
    combine_finite,
    combine_matrix,
    condition_difference_bootstrap,
    condition_difference_test,
    corrected_spread,
    correlation_test,
    fdr_bh,
    jackknife_values,
    mantel_test,
    noise_ceiling,
    observed_values,
    pair_permutation,
    percentile_interval,
    permutations,
    pool_rdms,
)
from object2brain.rsa.rdm import rdm_from_features, squareform, upper_triangle

# the package's function ``compare`` shadows the submodule of that name
compare_module = importlib.import_module("object2brain.rsa.compare")
RSATOOLBOX_NAME = {"spearman": "spearman", "pearson": "corr", "kendall_tau_a": "tau-a"}


def _rdms(rng: np.random.Generator, k: int, n: int, p: int = 6) -> torch.Tensor:
    return torch.stack([rdm_from_features(rng.normal(size=(n, p)), device="cpu") for _ in range(k)])


def test_pair_permutation_matches_square_permutation() -> None:
    rng = np.random.default_rng(0)
    D = _rdms(rng, 1, 7)[0]
    perms = next(permutations(7, 5, seed=3))
    index = pair_permutation(perms)
    for perm, idx in zip(perms, index, strict=True):
        expected = upper_triangle(D[perm][:, perm])
        torch.testing.assert_close(upper_triangle(D)[idx], expected)


def test_permutations_do_not_depend_on_batching() -> None:
    a = np.concatenate(list(permutations(9, 2500, seed=5)))
    b = np.concatenate(list(permutations(9, 1200, seed=5)))
    assert a.shape == (2500, 9)
    np.testing.assert_array_equal(a[:1200], b)
    assert all(sorted(row) == list(range(9)) for row in a[:50])


@pytest.mark.parametrize("method", ["spearman", "pearson", "kendall_tau_a"])
def test_mantel_matches_brute_force_rsatoolbox_loop(method: str) -> None:
    rng = np.random.default_rng(1)
    n, n_perm, seed = 8, 120, 11
    models, targets = _rdms(rng, 2, n), _rdms(rng, 3, n)
    targets[0] = models[0] + 0.05 * targets[0]  # one strong effect
    res = mantel_test(
        upper_triangle(models), upper_triangle(targets), method, n_perm, seed, device="cpu"
    )
    name = RSATOOLBOX_NAME[method]
    t_rdms = rsatoolbox.rdm.RDMs(upper_triangle(targets).numpy())
    perms = np.concatenate(list(permutations(n, n_perm, seed)))
    for k in range(2):
        D = models[k].numpy()
        observed = rsatoolbox.rdm.compare(
            rsatoolbox.rdm.RDMs(upper_triangle(models[k]).numpy()[None]), t_rdms, method=name
        )[0]
        np.testing.assert_allclose(res.r[k], observed, atol=1e-10)
        count = np.zeros(3)
        for perm in perms:
            permuted = rsatoolbox.rdm.RDMs(
                upper_triangle(torch.as_tensor(D[perm][:, perm])).numpy()[None]
            )
            count += rsatoolbox.rdm.compare(permuted, t_rdms, method=name)[0] >= observed - 1e-12
        np.testing.assert_allclose(res.p[k], (1 + count) / (1 + n_perm))


@settings(max_examples=12, deadline=None)
@given(
    st.integers(0, 10_000),
    st.integers(1, 400),
    st.sampled_from(["spearman", "pearson"]),
    st.sampled_from([(2, 3), (3, 2)]),
)
def test_mantel_tiles_equal_a_scipy_loop(
    seed: int, memory_elements: int, method: str, shape: tuple[int, int]
) -> None:
    """Tiles that split both the permutations and the pairs give scipy's null, permutation by
    permutation (30 stimuli, 435 pairs)."""
    rng = np.random.default_rng(seed)
    n, n_perm = 30, 40
    x = upper_triangle(_rdms(rng, shape[0], n)).numpy()
    y = upper_triangle(_rdms(rng, shape[1], n)).numpy()
    y[0] += 0.3 * x[0]
    res = mantel_test(x, y, method, n_perm, seed, device="cpu", memory_elements=memory_elements)
    corr = scipy.stats.spearmanr if method == "spearman" else scipy.stats.pearsonr
    observed = np.array([[corr(a, b)[0] for b in y] for a in x])
    np.testing.assert_allclose(res.r, observed, atol=1e-12)
    count = np.zeros_like(observed)
    for perm in np.concatenate(list(permutations(n, n_perm, seed))):
        index = pair_permutation(perm[None])[0].numpy()
        count += np.array([[corr(a[index], b)[0] for b in y] for a in x]) >= observed - 1e-12
    np.testing.assert_array_equal(res.p, (1 + count) / (1 + n_perm))


def test_mantel_combine_and_gather_side() -> None:
    rng = np.random.default_rng(2)
    x, y = upper_triangle(_rdms(rng, 4, 9)), upper_triangle(_rdms(rng, 2, 9))
    C = combine_matrix([[0, 1]], 2)
    a = mantel_test(x, y, n_perm=200, seed=0, device="cpu", combine=C)  # gathers targets
    b = mantel_test(x[:1], y, n_perm=200, seed=0, device="cpu", combine=C)  # gathers models
    np.testing.assert_allclose(a.r[:1], b.r)
    np.testing.assert_allclose(a.p[:1], b.p)
    np.testing.assert_allclose(a.r[:, 2], a.r[:, :2].mean(axis=1))
    assert a.p.shape == (4, 3)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5), st.floats(0.0, 1.0))
def test_combine_finite_is_a_nan_mean(seed: int, n_groups: int, nan_share: float) -> None:
    """Each derived column is the weighted mean over the group's finite coefficients (numpy
    reference), NaN only where the whole group is undefined; ``r @ C`` when all are defined."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, size=n_groups)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    groups = [list(range(a, a + s)) for a, s in zip(starts, sizes, strict=True)]
    T = int(sizes.sum())
    r = rng.uniform(-1, 1, size=(7, T))
    r[rng.uniform(size=r.shape) < nan_share] = np.nan
    out = combine_finite(torch.from_numpy(r), combine_matrix(groups, T)).numpy()
    for g, cols in enumerate(groups):
        block = r[:, cols]
        defined = np.isfinite(block).any(axis=1)
        expected = np.full(len(r), np.nan)
        expected[defined] = np.nanmean(block[defined], axis=1)
        np.testing.assert_allclose(out[:, g], expected, rtol=1e-12, atol=1e-15)
    full = np.nan_to_num(r)
    C = combine_matrix(groups, T)
    torch.testing.assert_close(
        combine_finite(torch.from_numpy(full), C), torch.from_numpy(full) @ C
    )


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_group_mean_leaves_out_a_constant_subject(method: str) -> None:
    """A subject whose RDM is constant has no r; the group column of every engine (Mantel r and
    p, bootstrap interval, condition contrast, noise ceiling) equals the same analysis run
    without that subject, and is NaN only when every subject is constant."""
    rng = np.random.default_rng(12)
    n, labels = 14, ["a", "b"] * 7
    models, targets = _rdms(rng, 2, n), _rdms(rng, 3, n)
    constant = torch.ones((1, n, n), dtype=torch.float64) - torch.eye(n, dtype=torch.float64)
    with_constant = torch.cat([targets[:1], constant, targets[1:]])
    C_all, C_ref = combine_matrix([[0, 1, 2, 3]], 4), combine_matrix([[0, 1, 2]], 3)
    x = upper_triangle(models)
    a = mantel_test(x, upper_triangle(with_constant), method, 99, 3, "cpu", C_all)
    b = mantel_test(x, upper_triangle(targets), method, 99, 3, "cpu", C_ref)
    assert np.isnan(a.r[:, 1]).all() and np.isnan(a.p[:, 1]).all()
    np.testing.assert_allclose(a.r[:, 4], b.r[:, 3], rtol=1e-12)
    np.testing.assert_array_equal(a.p[:, 4], b.p[:, 3])
    ci_a = bootstrap_ci(models, with_constant, method, 40, 3, "cpu", C_all)
    ci_b = bootstrap_ci(models, targets, method, 40, 3, "cpu", C_ref)
    for got, want in zip(ci_a, ci_b, strict=True):
        np.testing.assert_allclose(got[:, 4], want[:, 3], rtol=1e-12)
    c_a = condition_difference_test(
        models, with_constant, labels, "a", "b", method, 49, 3, "cpu", C_all
    )
    c_b = condition_difference_test(models, targets, labels, "a", "b", method, 49, 3, "cpu", C_ref)
    np.testing.assert_allclose(c_a.delta[:, 4], c_b.delta[:, 3], rtol=1e-12)
    np.testing.assert_array_equal(c_a.p[:, 4], c_b.p[:, 3])
    np.testing.assert_allclose(
        noise_ceiling(upper_triangle(with_constant), method),
        noise_ceiling(upper_triangle(targets), method),
        rtol=1e-12,
    )
    everyone_constant = mantel_test(
        x,
        upper_triangle(constant.expand(2, n, n)),
        method,
        9,
        3,
        "cpu",
        combine_matrix([[0, 1]], 2),
    )
    assert np.isnan(everyone_constant.r).all() and np.isnan(everyone_constant.p).all()
    assert np.isnan(noise_ceiling(upper_triangle(constant.expand(3, n, n)), method)).all()


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 60), st.sampled_from(["spearman", "pearson"]))
def test_permutation_p_in_unit_interval(seed: int, n_perm: int, method: str) -> None:
    rng = np.random.default_rng(seed)
    res = mantel_test(
        upper_triangle(_rdms(rng, 2, 6)),
        upper_triangle(_rdms(rng, 2, 6)),
        method,
        n_perm,
        seed,
        device="cpu",
    )
    assert np.all(res.p > 0)
    assert np.all(res.p <= 1)
    assert np.all(res.p >= 1 / (1 + n_perm))


def test_pure_noise_false_positive_rate_near_alpha() -> None:
    """Independent model and target: P(p <= alpha) = alpha exactly for (N + 1) alpha integral."""
    n_rep, alpha, n_perm = 300, 0.05, 99
    hits = 0
    for seed in range(n_rep):
        rng = np.random.default_rng(1000 + seed)
        x = upper_triangle(_rdms(rng, 1, 10))
        y = upper_triangle(_rdms(rng, 1, 10))
        hits += int(mantel_test(x, y, "spearman", n_perm, seed, device="cpu").p[0, 0] <= alpha)
    low, high = scipy.stats.binom.ppf([0.0005, 0.9995], n_rep, alpha)
    assert low <= hits <= high, (hits, low, high)


def test_planted_layer_is_best_and_fdr_significant() -> None:
    rng = np.random.default_rng(3)
    n = 24
    layers = [rng.normal(size=(n, 30)) for _ in range(5)]
    rois = {
        "planted": layers[2] @ rng.normal(size=(30, 50)) + 0.5 * rng.normal(size=(n, 50)),
        "noise": rng.normal(size=(n, 50)),
    }
    x = upper_triangle(torch.stack([rdm_from_features(f, device="cpu") for f in layers]))
    y = upper_triangle(torch.stack([rdm_from_features(f, device="cpu") for f in rois.values()]))
    res = mantel_test(x, y, n_perm=500, seed=0, device="cpu")
    q = fdr_bh(res.p)
    assert int(np.argmax(res.r[:, 0])) == 2
    assert q[2, 0] < 0.05
    assert res.r[2, 0] > 0.5


@pytest.mark.filterwarnings("ignore:Noise ceiling for tau based on averaged ranks")
def test_noise_ceiling_matches_rsatoolbox() -> None:
    """Leave-one-out lower and pooled upper bound as rsatoolbox's ``boot_noise_ceiling``, whose
    ``pool_rdm`` averages ranks (Spearman, tau-a) or z-scores (Pearson)."""
    from rsatoolbox.inference.noise_ceiling import boot_noise_ceiling

    rng = np.random.default_rng(4)
    base = rng.normal(size=(10, 5))
    subj = upper_triangle(
        torch.stack(
            [rdm_from_features(base + rng.normal(size=(10, 5)), device="cpu") for _ in range(5)]
        )
    ).numpy()
    subj[2] *= 6.0  # one subject on a larger scale (pooling must not let it dominate)
    for method in ["spearman", "pearson", "kendall_tau_a"]:
        low, high = noise_ceiling(subj, method)
        rdms = rsatoolbox.rdm.RDMs(subj)
        expected_low, expected_high = boot_noise_ceiling(rdms, RSATOOLBOX_NAME[method])
        assert low == pytest.approx(expected_low, abs=1e-10), method
        assert high == pytest.approx(expected_high, abs=1e-10), method
        assert low <= high
    assert np.isnan(noise_ceiling(subj[:1])[0])


@pytest.mark.parametrize("method", ["spearman", "pearson", "kendall_tau_a"])
def test_group_rdm_pools_like_rsatoolbox(method: str) -> None:
    """The group RDM of the ``group_rdm`` rows equals rsatoolbox's ``pool_rdm`` up to an affine
    map (which no comparison sees), and a subject on a 50x scale no longer dominates it."""
    from rsatoolbox.util.pooling import pool_rdm

    rng = np.random.default_rng(6)
    base = rng.normal(size=(12, 5))
    rdms = torch.stack(
        [rdm_from_features(base + rng.normal(size=(12, 5)), device="cpu") for _ in range(4)]
    )
    rdms[3] = 50.0 * rdm_from_features(rng.normal(size=(12, 5)), device="cpu")  # unrelated
    ours = upper_triangle(pool_rdms(rdms, method))
    expected = pool_rdm(rsatoolbox.rdm.RDMs(upper_triangle(rdms).numpy()), RSATOOLBOX_NAME[method])
    np.testing.assert_allclose(
        scipy.stats.pearsonr(ours.numpy(), expected.get_vectors()[0]).statistic, 1.0, atol=1e-12
    )
    consensus = upper_triangle(rdms[:3].mean(0))
    raw = upper_triangle(rdms.mean(0))
    assert float(compare(consensus, ours[None], method)) > 0.6  # pooled: the three agree
    assert float(compare(consensus, raw[None], method)) < 0.5  # raw mean: the 50x subject


def test_group_rdm_leaves_out_subjects_without_a_scale() -> None:
    """A subject whose RDM is constant within rounding (no z-scores) or holds NaN is left out of
    the pooled RDM instead of turning all of it into NaN."""
    rng = np.random.default_rng(2)
    rdms = torch.stack([rdm_from_features(rng.normal(size=(8, 4)), device="cpu") for _ in range(3)])
    expected = pool_rdms(rdms[:2], "pearson")
    nearly_constant = torch.ones(8, 8, dtype=torch.float64).fill_diagonal_(0)
    nearly_constant[0, 1] = nearly_constant[1, 0] = 1 + 1e-15
    with_nan = rdms[2].clone()
    with_nan[0, 3] = with_nan[3, 0] = float("nan")
    for odd in (nearly_constant, with_nan):
        pooled = pool_rdms(torch.stack([rdms[0], rdms[1], odd]), "pearson")
        torch.testing.assert_close(pooled, expected)


def test_noise_ceiling_bounds_the_true_model_when_subject_scales_differ() -> None:
    """Planted truth: subjects = true RDM + noise, one noisier subject on 8x the scale
    (euclidean). The true model's mean r stays below the upper bound (averaging raw
    dissimilarities put it above in every one of 300 simulated runs)."""
    rng = np.random.default_rng(8)
    exceeded = 0
    for _ in range(20):
        truth = rng.normal(size=(30, 6))
        model = upper_triangle(rdm_from_features(truth, "euclidean", device="cpu"))
        subjects = [truth + 0.8 * rng.normal(size=truth.shape) for _ in range(5)]
        subjects.append(8.0 * (truth + 3.0 * rng.normal(size=truth.shape)))
        vectors = upper_triangle(
            torch.stack([rdm_from_features(x, "euclidean", device="cpu") for x in subjects])
        )
        _low, high = noise_ceiling(vectors, "spearman")
        exceeded += float(compare(model, vectors, "spearman").mean()) > high
    assert exceeded == 0


SCIPY_CORRELATION = {
    "spearman": lambda a, b: scipy.stats.spearmanr(a, b)[0],
    "pearson": lambda a, b: scipy.stats.pearsonr(a, b)[0],
    "kendall_tau_a": lambda a, b: rsatoolbox.rdm.compare(
        rsatoolbox.rdm.RDMs(a[None]), rsatoolbox.rdm.RDMs(b[None]), method="tau-a"
    )[0, 0],
}


@pytest.mark.parametrize("method", ["spearman", "pearson", "kendall_tau_a"])
@pytest.mark.parametrize("ties", [False, True])
def test_bootstrap_ci_brute_force(monkeypatch: pytest.MonkeyPatch, method: str, ties: bool) -> None:
    """Every resample expanded explicitly (duplicated stimuli, self-pairs dropped) and compared
    by scipy / rsatoolbox; ``ties``: a behavioural RDM of integer ratings, full of tied values.
    Steps of 3 rows force the weighted ranking to work through several row chunks."""
    monkeypatch.setattr(compare_module, "_WEIGHTED_STEP_ELEMENTS", 3 * 40 * 36)
    rng = np.random.default_rng(5)
    n, n_boot, seed = 9, 40, 2
    A, B = _rdms(rng, 4, n), _rdms(rng, 2, n)
    if ties:
        ratings = rng.integers(-3, 4, size=n).astype(float)
        A[1] = torch.as_tensor(np.abs(ratings[:, None] - ratings[None, :]))
        B[0] = torch.round(B[0] * 2) / 2
    low, high = bootstrap_ci(A, B, method, n_boot, seed, device="cpu", corrected=False)
    sample_rng = np.random.default_rng([seed, 7_919])
    corr = SCIPY_CORRELATION[method]
    values = []
    for _ in range(n_boot):
        idx = sample_rng.integers(0, n, size=n)
        i, j = np.triu_indices(n, 1)
        keep = idx[i] != idx[j]
        rows = [R.numpy()[idx[i], idx[j]][keep] for R in (*A, *B)]
        values.append([[corr(a, b) for b in rows[4:]] for a in rows[:4]])
    with np.errstate(all="ignore"):
        expected_low = np.nanquantile(values, 0.025, axis=0)
        expected_high = np.nanquantile(values, 0.975, axis=0)
    np.testing.assert_allclose(low, expected_low, atol=1e-10)
    np.testing.assert_allclose(high, expected_high, atol=1e-10)
    # the corrected interval: observed r +- t_{n-1} sqrt(V) with the exact pair form
    # V = max((2n-3)/(n-1) V_jack - n/(n-2) V_boot, n/(3n-4) V_boot), every delete-one RDM
    # recomputed by scipy
    i, j = np.triu_indices(n - 1, 1)
    jack = []
    for left_out in range(n):
        keep = np.delete(np.arange(n), left_out)
        rows = [R.numpy()[np.ix_(keep, keep)][i, j] for R in (*A, *B)]
        jack.append([[corr(a, b) for b in rows[4:]] for a in rows[:4]])
    i, j = np.triu_indices(n, 1)
    observed = np.array([[corr(a.numpy()[i, j], b.numpy()[i, j]) for b in B] for a in A])
    with np.errstate(all="ignore"):
        v_boot = np.nanvar(values, axis=0, ddof=1)
        v_jack = (n - 1) / n * ((jack - np.mean(jack, axis=0)) ** 2).sum(axis=0)
    v = np.maximum((2 * n - 3) / (n - 1) * v_jack - n / (n - 2) * v_boot, n / (3 * n - 4) * v_boot)
    half = scipy.stats.t.ppf(0.975, n - 1) * np.sqrt(v)
    low, high = bootstrap_ci(A, B, method, n_boot, seed, device="cpu")
    np.testing.assert_allclose(low, np.clip(observed - half, -1, 1), atol=1e-10)
    np.testing.assert_allclose(high, np.clip(observed + half, -1, 1), atol=1e-10)


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_bootstrap_ci_small_n_drops_undefined_resamples(method: str) -> None:
    """With 4 stimuli many resamples keep only one distinct pair (or two equal values): their
    coefficient is undefined and must be left out of the interval, as a brute-force loop does."""
    rng = np.random.default_rng(16)
    n, n_boot, seed = 4, 300, 16
    A, B = _rdms(rng, 2, n), _rdms(rng, 1, n)
    low, high = bootstrap_ci(A, B, method, n_boot, seed, device="cpu", corrected=False)
    sample_rng = np.random.default_rng([seed, 7_919])
    i, j = np.triu_indices(n, 1)
    values = []
    for _ in range(n_boot):
        idx = sample_rng.integers(0, n, size=n)
        keep = idx[i] != idx[j]
        a_rows = [R.numpy()[idx[i], idx[j]][keep] for R in A]
        b = B[0].numpy()[idx[i], idx[j]][keep]
        defined = len(b) > 1 and np.ptp(b) > 0
        values.append(
            [
                SCIPY_CORRELATION[method](a, b) if defined and np.ptp(a) > 0 else np.nan
                for a in a_rows
            ]
        )
    assert np.isnan(values).any()  # the case under test occurs
    expected_low = np.nanquantile(values, 0.025, axis=0)
    expected_high = np.nanquantile(values, 0.975, axis=0)
    np.testing.assert_allclose(low[:, 0], expected_low, atol=1e-10)
    np.testing.assert_allclose(high[:, 0], expected_high, atol=1e-10)


def test_fdr_matches_scipy() -> None:
    p = np.random.default_rng(6).uniform(size=(4, 5)) ** 2
    np.testing.assert_allclose(
        fdr_bh(p), scipy.stats.false_discovery_control(p.ravel()).reshape(4, 5)
    )
    q = fdr_bh([0.01, np.nan, 0.04])
    assert np.isnan(q[1])
    np.testing.assert_allclose(q[[0, 2]], [0.02, 0.04])


def test_condition_difference_detects_planted_difference() -> None:
    rng = np.random.default_rng(7)
    n = 20
    labels = ["a"] * 10 + ["b"] * 10
    feats = rng.normal(size=(n, 8))
    model = rdm_from_features(feats, device="cpu")
    # condition a: target follows the model; condition b: noise
    target_feats = np.where(np.array(labels)[:, None] == "a", feats, rng.normal(size=(n, 8)))
    target = rdm_from_features(target_feats + 0.1 * rng.normal(size=(n, 8)), device="cpu")
    res = condition_difference_test(
        model[None], target[None], labels, "a", "b", n_perm=200, seed=0, device="cpu"
    )
    assert res.delta[0, 0] > 0.5
    assert res.p[0, 0] < 0.05
    r_a = compare(upper_triangle(model[:10, :10]), upper_triangle(target[:10, :10]))[0, 0]
    assert res.r_a[0, 0] == pytest.approx(float(r_a))
    null = condition_difference_test(
        model[None], model[None], labels, "a", "b", n_perm=50, seed=0, device="cpu"
    )
    assert null.p[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_condition_difference_matches_a_scipy_loop(method: str) -> None:
    """Observed r per condition, and every permutation of the condition labels, recomputed with
    scipy; a behavioural RDM of integer ratings (many ties) and a third condition left out."""
    rng = np.random.default_rng(9)
    n, n_perm, seed = 18, 60, 4
    labels = ["a", "b", "c"] * 6
    models = _rdms(rng, 2, n)
    ratings = rng.integers(-3, 4, size=n).astype(float)
    targets = torch.stack(
        [_rdms(rng, 1, n)[0], torch.as_tensor(np.abs(ratings[:, None] - ratings[None, :]))]
    )
    res = condition_difference_test(models, targets, labels, "a", "b", method, n_perm, seed, "cpu")
    corr = scipy.stats.spearmanr if method == "spearman" else scipy.stats.pearsonr

    def r_within(rows: np.ndarray) -> np.ndarray:
        i, j = np.triu_indices(len(rows), 1)
        a, b = rows[i], rows[j]
        return np.array(
            [[corr(M[a, b], T[a, b])[0] for T in targets.numpy()] for M in models.numpy()]
        )

    lab = np.array(labels)
    pool = np.concatenate([np.flatnonzero(lab == "a"), np.flatnonzero(lab == "b")])
    delta = r_within(pool[:6]) - r_within(pool[6:])
    np.testing.assert_allclose(res.delta, delta, atol=1e-12)
    count = np.zeros_like(delta)
    for perm in np.concatenate(list(permutations(len(pool), n_perm, seed))):
        shuffled = pool[perm]
        d = r_within(shuffled[:6]) - r_within(shuffled[6:])
        count += np.abs(d) >= np.abs(delta) - 1e-12
    np.testing.assert_array_equal(res.p, (1 + count) / (1 + n_perm))


def test_correlation_test_direct() -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    r, p, low, high = correlation_test(x, y, "pearson", n_perm=200, n_boot=200, seed=0)
    assert r == pytest.approx(scipy.stats.pearsonr(x, y)[0])
    assert p < 0.01
    assert low < r < high
    r2, *_ = correlation_test(x, y, "spearman", n_perm=0, n_boot=0)
    assert r2 == pytest.approx(scipy.stats.spearmanr(x, y)[0])


def test_squareform_helper_used_in_tests() -> None:
    assert squareform(torch.ones(3)).shape == (3, 3)


def _two_conditions(
    rng: np.random.Generator, offset: float, n: int = 24, dims: int = 10, noise: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Model and brain RDMs of two conditions with the same true r within each; ``offset``
    gives each condition its own mean pattern, shared by model and brain (not exchangeable)."""
    mix_x, mix_y = rng.normal(size=(dims, 40)), rng.normal(size=(dims, 30))
    means = rng.normal(size=(2, dims))
    means *= offset * np.sqrt(dims) / np.linalg.norm(means, axis=1, keepdims=True)
    latent = np.vstack([means[c] + rng.normal(size=(n, dims)) for c in (0, 1)])
    model = latent @ mix_x
    brain = latent @ mix_y + noise * rng.normal(size=(2 * n, 30))
    labels = ["a"] * n + ["b"] * n
    return (
        rdm_from_features(model, device="cpu")[None],
        rdm_from_features(brain, device="cpu")[None],
        labels,
    )


def test_contrast_bootstrap_resamples_within_each_condition() -> None:
    """delta* is the difference of the two conditions' own bootstrap resamples (independent
    streams); the interval and p follow from them."""
    rng = np.random.default_rng(3)
    model, brain, labels = _two_conditions(rng, offset=0.0, n=12)
    res = condition_difference_bootstrap(
        model, brain, labels, "a", "b", "spearman", 50, 5, "cpu", corrected=False
    )
    a, b = slice(0, 12), slice(12, 24)
    va = bootstrap_values(model[:, a, a], brain[:, a, a], "spearman", 50, (5, 104_729, 0), "cpu")
    vb = bootstrap_values(model[:, b, b], brain[:, b, b], "spearman", 50, (5, 104_729, 1), "cpu")
    delta = va - vb
    np.testing.assert_allclose(res.low, np.percentile(delta, 2.5, axis=0))
    np.testing.assert_allclose(res.high, np.percentile(delta, 97.5, axis=0))
    expected = min(1.0, 2 * min(1 + (delta <= 0).sum(), 1 + (delta >= 0).sum()) / 51)
    assert res.p[0, 0] == pytest.approx(expected)
    assert not np.allclose(va, vb)  # the two conditions' streams differ
    # corrected: each condition's pair-corrected variance, summed; Welch-Satterthwaite t
    spreads = [
        corrected_spread(v, jackknife_values(model[:, s, s], brain[:, s, s], "spearman", "cpu"),
                         observed_values(model[:, s, s], brain[:, s, s], "spearman", "cpu"))
        for v, s in ((va, a), (vb, b))
    ]  # fmt: skip
    (ra, rb), (var_a, var_b) = ([x.observed[0, 0] for x in spreads],
                                [x.variance[0, 0] for x in spreads])  # fmt: skip
    assert var_a < np.var(va[:, 0, 0], ddof=1)  # the correction narrows
    dof = (var_a + var_b) ** 2 / (var_a**2 / 11 + var_b**2 / 11)
    t = (ra - rb) / np.sqrt(var_a + var_b)
    fixed = condition_difference_bootstrap(model, brain, labels, "a", "b", "spearman", 50, 5, "cpu")
    assert fixed.p[0, 0] == pytest.approx(2 * scipy.stats.t.sf(abs(t), dof), rel=1e-9)
    half = scipy.stats.t.ppf(0.975, dof) * np.sqrt(var_a + var_b)
    assert fixed.low[0, 0] == pytest.approx(ra - rb - half, rel=1e-9)
    assert fixed.high[0, 0] == pytest.approx(ra - rb + half, rel=1e-9)
    np.testing.assert_array_equal(  # numpy integer seeds (e.g. from a table) are seeds too
        va,
        bootstrap_values(
            model[:, a, a], brain[:, a, a], "spearman", 50, (np.int64(5), 104_729, 0), "cpu"
        ),
    )
    np.testing.assert_array_equal(
        bootstrap_values(model, brain, "spearman", 5, np.int64(2), "cpu"),
        bootstrap_values(model, brain, "spearman", 5, 2, "cpu"),
    )
    nothing = condition_difference_bootstrap(model, brain, labels, "a", "b", n_boot=0, device="cpu")
    assert np.isnan(nothing.p).all() and nothing.n_boot == 0


def test_contrast_bootstraps_share_a_condition_s_resamples() -> None:
    """With a shared cache, three contrasts of three conditions give what they give alone."""
    rng = np.random.default_rng(8)
    model, brain, labels = _two_conditions(rng, offset=0.0, n=12)
    labels = [*labels[:8], *["c"] * 8, *labels[16:]]
    pairs = [("a", "b"), ("a", "c"), ("b", "c")]
    cache: dict[tuple[str, int], np.ndarray] = {}
    for cond_a, cond_b in pairs:
        alone = condition_difference_bootstrap(model, brain, labels, cond_a, cond_b, n_boot=30)
        shared = condition_difference_bootstrap(
            model, brain, labels, cond_a, cond_b, n_boot=30, cache=cache
        )
        for field in ("low", "high", "p"):
            np.testing.assert_array_equal(getattr(shared, field), getattr(alone, field))
    assert set(cache) == {("a", 0), ("b", 1), ("c", 1), ("b", 0)}  # a's side-0 draw reused


def test_contrast_when_conditions_differ_in_content() -> None:
    """Planted truth: equal r within both conditions, but each condition has its own mean
    pattern shared by model and brain. The label permutation rejects far too often (it assumes
    exchangeable stimuli); the within-condition bootstrap stays near alpha. A planted
    difference is still found by the bootstrap."""
    rng = np.random.default_rng(11)
    reps, perm_rejects, boot_rejects = 30, 0, 0
    for rep in range(reps):
        model, brain, labels = _two_conditions(rng, offset=3.0)
        perm = condition_difference_test(model, brain, labels, "a", "b", "spearman", 99, rep, "cpu")
        boot = condition_difference_bootstrap(
            model, brain, labels, "a", "b", "spearman", 200, rep, "cpu"
        )
        perm_rejects += perm.p[0, 0] <= 0.05
        boot_rejects += boot.p[0, 0] <= 0.05
    assert perm_rejects >= 10  # measured 0.3-0.7 in larger simulations
    assert boot_rejects <= 4  # 30 draws at alpha 0.05: 4 or fewer has probability 0.94

    model, brain, labels = _two_conditions(rng, offset=0.0, noise=1.0)
    noise = rdm_from_features(rng.normal(size=(24, 30)), device="cpu")
    brain[0, 24:, 24:] = noise  # condition b: brain unrelated to the model
    planted = condition_difference_bootstrap(
        model, brain, labels, "a", "b", "spearman", 300, 0, "cpu"
    )
    assert planted.p[0, 0] < 0.01 and planted.low[0, 0] > 0


def test_corrected_bootstrap_interval_matches_the_sampling_spread() -> None:
    """Reduced calibration (full run: validation/alignment_calibration.py): with a noisy brain
    RDM, the corrected interval's SE (what ``bootstrap_ci`` reports, from the same resamples)
    matches the spread of r over 80 experiments of 30 new
    stimuli (ratio 0.8-1.25); the percentile interval of the same resamples is wider by the pair
    excess (1.29x here; corrected ratio 1.01), so an uncorrected interval fails the first bound."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "validation"))
    from inference_common import World

    world = World.make(1, noise=10.0)
    rng = np.random.default_rng(3)
    weights = world.subjects(rng, 1)
    estimates, corrected_se, percentile_se = [], [], []
    q = scipy.stats.t.ppf(0.975, 29)
    for rep in range(80):
        models, subs = world.draw(rng, 30, weights)
        r = float(compare(upper_triangle(models), upper_triangle(subs))[0, 0])
        boot = bootstrap_values(models, subs, "spearman", 200, rep, "cpu")
        jack = jackknife_values(models, subs, "spearman", "cpu")
        low, high = corrected_spread(boot, jack, np.full((1, 1), r)).interval()
        p_low, p_high = percentile_interval(boot, 0.95)
        estimates.append(r)
        corrected_se.append(float(high[0, 0] - low[0, 0]) / (2 * q))
        percentile_se.append(float(p_high[0, 0] - p_low[0, 0]) / (2 * 1.96))
    spread = np.std(estimates, ddof=1)
    assert 0.8 < np.mean(corrected_se) / spread < 1.25
    assert np.mean(percentile_se) / np.mean(corrected_se) > 1.15


def test_exact_pair_form_is_unbiased_at_small_n() -> None:
    """Reduced check of the exact pair form (issue 18; full run:
    validation/alignment_calibration.py): at n = 10 stimuli the mean corrected variance of
    Pearson r over 200 experiments (fresh stimuli, fixed model and brain mixing; 25 cells)
    matches the variance of r over the experiments (ratio 1.06 here), while the large-n limit
    ``2 V_jack - V_boot`` of the same resamples (the estimator before) is ~1.45x too large, so a
    reverted ``corrected_spread`` fails the first bound."""
    n, cells, reps, dims = 10, 5, 200, 6
    rng = np.random.default_rng(1)
    mix_x, mix_y = rng.normal(size=(cells, dims, 20)), rng.normal(size=(cells, dims, 20))
    observed, exact, limit = [], [], []
    for rep in range(reps):
        latent = rng.normal(size=(n, dims))
        models = torch.stack([rdm_from_features(latent @ m, device="cpu") for m in mix_x])
        brains = torch.stack([rdm_from_features(latent @ m, device="cpu") for m in mix_y])
        boot = bootstrap_values(models, brains, "pearson", 200, rep, "cpu")
        jack = jackknife_values(models, brains, "pearson", "cpu")
        r = observed_values(models, brains, "pearson", "cpu")
        observed.append(r)
        exact.append(corrected_spread(boot, jack, r).variance)
        limit.append(corrected_spread(boot, jack, r, exact=False).variance)
    spread = np.var(observed, axis=0, ddof=1).sum()
    assert 0.85 < np.mean(exact, axis=0).sum() / spread < 1.2
    assert np.mean(limit, axis=0).sum() / spread > 1.3

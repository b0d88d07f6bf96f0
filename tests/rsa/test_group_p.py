"""The ``p`` column of ``group_inference`` (one-sided, r > 0): the score test of
:func:`object2brain.rsa.group.association_test` (``both``) and the relabelling test of
:func:`object2brain.rsa.group.relabelling_test` (``stimuli``) (reduced
``validation/inference_null_p.py``)."""

from __future__ import annotations

import sys
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from object2brain.rsa import group as g
from object2brain.rsa.compare import compare, prepare
from object2brain.rsa.inference import (
    PERM_BLOCK,
    linear_permutation_test,
    pair_permutation,
    relabelled_mean_test,
)
from object2brain.rsa.inference import permutations as relabellings
from object2brain.rsa.rdm import squareform, upper_triangle

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "validation"))
from inference_null_p import sharp_world
from rsa_helpers import ReverseExecutor

D, DM, DV = 4, 12, 16
DOT_METHODS = ("spearman", "pearson", "rho_a", "cosine", "corr_cov", "cosine_cov")


def _corr_rdms(patterns: np.ndarray) -> torch.Tensor:
    z = patterns - patterns.mean(axis=-1, keepdims=True)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return torch.as_tensor(1.0 - z @ np.swapaxes(z, -1, -2))


def _world(
    rng: np.random.Generator, n: int, S: int, model_noise: float | None, noise: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One model (``None``: its own stimulus features, unrelated to the subjects) and ``S``
    subject RDMs of ``n`` fresh stimuli."""
    x = rng.normal(size=(n, D))
    m = rng.normal(size=(D, DM))
    seen = rng.normal(size=(n, D)) if model_noise is None else x
    model = seen @ m + (1.0 if model_noise is None else model_noise) * rng.normal(size=(n, DM))
    w = rng.normal(size=(D, DV))[None] + 0.5 * rng.normal(size=(S, D, DV))
    subs = np.einsum("nd,sdv->snv", x, w) + noise * rng.normal(size=(S, n, DV))
    return _corr_rdms(model[None]), _corr_rdms(subs)


def _table_p(
    models: torch.Tensor, subs: torch.Tensor, mode: str, seed: int, method: str, n_perm: int = 0
) -> float:
    """What the table's ``p`` column gets (:func:`object2brain.rsa.group.group_p`)."""
    n, S = subs.shape[-1], subs.shape[0]
    plan = g.resample_plan(n, S, 40, seed)
    est = g.estimate(g.subject_coefficients(models, subs, method, plan), plan, mode)
    return float(g.group_p(models, np.arange(n), subs, method, mode, est, n_perm, seed)[0])


@pytest.mark.parametrize("method", DOT_METHODS)
def test_permutation_moments_are_exact(method: str) -> None:
    """Mean and variance of <a o pi, y> over all 720 relabellings of 6 stimuli."""
    rng = np.random.default_rng(1)
    a = prepare(torch.as_tensor(rng.random((2, 15))), method)
    y = prepare(torch.as_tensor(rng.random((3, 15))) + 0.5 * a[:1], method)
    idx = pair_permutation(np.array(list(permutations(range(6)))))
    values = torch.stack([a[k][idx] @ y.T for k in range(2)], dim=1).numpy()  # (720, 2, 3)
    mean, var = g.permutation_moments(a, y, 6)
    np.testing.assert_allclose(mean, values.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(var, values.var(axis=0), rtol=1e-10, atol=1e-15)


def test_table_p_is_the_score_test() -> None:
    """``both`` rows (and ``stimuli`` without relabellings) report the score test's p, not the
    bootstrap t-test's (which rejected < 1% under the null below: the conservative p this test
    replaces); ``stimuli`` with relabellings reports the relabelling test's."""
    models, subs = _world(np.random.default_rng(2), 16, 4, None)
    for mode in ("both", "stimuli"):
        test = g.association_test(models, subs, "spearman", mode)
        assert test is not None
        assert _table_p(models, subs, mode, 0, "spearman") == test.p[0]
    assert _table_p(models, subs, "both", 0, "spearman", 99) == _table_p(
        models, subs, "both", 0, "spearman"
    )
    exact = g.relabelling_test(models, subs, "spearman", 99, 5)
    assert _table_p(models, subs, "stimuli", 5, "spearman", 99) == exact[0]
    for method in ("kendall_tau_a", "cosine"):
        assert _table_p(models, subs, "stimuli", 5, method, 19) == pytest.approx(
            g.relabelling_test(models, subs, method, 19, 5)[0], abs=0
        )


def _brute_force_p(
    models: torch.Tensor, subs: torch.Tensor, method: str, n_perm: int, seed: int
) -> np.ndarray:
    """``(1 + #{rbar_pi >= rbar}) / (1 + n_perm)`` from whole relabelled model RDMs, each
    compared anew with every subject (re-ranked), subjects with an undefined r left out."""
    y = upper_triangle(subs)

    def rbar(rdms: torch.Tensor) -> np.ndarray:
        r = compare(upper_triangle(rdms), y, method).numpy()
        return np.nanmean(np.where(np.isfinite(r), r, np.nan), axis=1)

    observed = rbar(models)
    count = np.zeros(models.shape[0])
    for block in relabellings(models.shape[-1], n_perm, seed):
        for pi in torch.as_tensor(block):
            count += rbar(models[:, pi][:, :, pi]) >= observed - 1e-12
    return (1 + count) / (1 + n_perm)


@pytest.mark.parametrize("method", [*DOT_METHODS, "kendall_tau_a"])
def test_relabelling_p_equals_a_brute_force_loop(method: str) -> None:
    """The ``stimuli`` mode's p: the same relabellings applied to whole model RDMs, each
    permuted RDM compared with the subjects from scratch; a constant (undefined-r) subject is
    left out; the smallest p is ``1 / (1 + n_perm)``."""
    rng = np.random.default_rng(8)
    models, subs = _world(rng, 9, 3, 2.0)
    unrelated, _ = _world(rng, 9, 3, None)
    models = torch.cat([models, unrelated])
    subs[1] = 1.0 - torch.eye(9, dtype=subs.dtype)  # constant: no r (left out)
    p = g.relabelling_test(models, subs, method, 1100, 3)  # two blocks of relabellings
    np.testing.assert_allclose(p, _brute_force_p(models, subs, method, 1100, 3), rtol=0, atol=0)
    assert np.all((p >= 1 / 1101) & (p <= 1)) and p[0] < 0.05 < p[1]


def test_relabelling_p_is_independent_of_chunks_and_equals_the_condensed_gather() -> None:
    """The square-form null of :func:`relabelled_mean_test` counts as the condensed gather of
    :func:`linear_permutation_test` (one-sided) with the same relabellings, and its blocks run
    by an executor in reverse order give the same p."""
    models, subs = _world(np.random.default_rng(9), 13, 4, 3.0)
    a = prepare(upper_triangle(models), "spearman")
    y = prepare(upper_triangle(subs), "spearman").mean(dim=0, keepdim=True)
    n_perm = 2 * PERM_BLOCK + 9  # three blocks
    square = relabelled_mean_test(a, y, n_perm, 4)
    gathered = linear_permutation_test(a, y, n_perm, 4, two_sided=False)
    np.testing.assert_array_equal(square.p, gathered.p)
    reverse = ReverseExecutor()
    moved = g.relabelling_test(models, subs, "spearman", n_perm, 4, executor=reverse)
    assert reverse.calls == 3
    np.testing.assert_array_equal(moved, square.p[:, 0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["spearman", "cosine_cov", "kendall_tau_a"])
def test_relabelling_p_on_cuda_equals_cpu(method: str) -> None:
    models, subs = _world(np.random.default_rng(10), 30, 4, 3.0)
    unrelated, _ = _world(np.random.default_rng(11), 30, 4, None)
    models = torch.cat([models, unrelated])
    n_perm = 199 if method == "kendall_tau_a" else 3000
    cpu = g.relabelling_test(models, subs, method, n_perm, 2)
    gpu = g.relabelling_test(models, subs, method, n_perm, 2, device="cuda")
    np.testing.assert_array_equal(gpu, cpu)


def test_relabelling_p_is_exact_where_the_score_test_is_liberal() -> None:
    """400 null datasets of 10 stimuli (6 subjects, the world of the validation script): the
    relabelling test (199 relabellings) rejects inside the binomial interval around 0.05 and
    finds the planted model; the normal approximation (score test) is liberal at this n."""
    rng = np.random.default_rng(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = []
        for rep in range(400):
            models, subs = sharp_world(rng, 10, (8.0,))
            test = g.association_test(models, subs, "spearman", "stimuli")
            assert test is not None
            p.append([*g.relabelling_test(models, subs, "spearman", 199, rep), test.p[0]])
    finally:
        torch.set_num_threads(threads)
    rates = (np.array(p) < 0.05).mean(axis=0)
    low, high = scipy.stats.binom.interval(0.95, 400, 0.05)
    assert low / 400 <= rates[0] <= high / 400, rates
    assert rates[1] > 0.15, rates  # the planted model (0.22 here)
    assert rates[2] > rates[0], rates  # score test 0.08 vs 0.0575 on these datasets


def _null_p(
    rng: np.random.Generator, n: int, S: int, method: str, modes: tuple[str, ...]
) -> list[float]:
    models, subs = _world(rng, n, S, None)
    tests = [g.association_test(models, subs, method, mode) for mode in modes]
    return [float(t.p[0]) for t in tests if t is not None]


def test_null_rate_inside_binomial_interval() -> None:
    """Under a model unrelated to every subject (the world of ``validation/inference_null_p.py``,
    40 stimuli, 6 subjects), p rejects at 5% (binomial interval over 400 datasets, both
    bootstraps; the bootstrap t-test rejected 0.4-2% there) and is uniform (Kolmogorov-Smirnov)."""
    rng = np.random.default_rng(2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 400 small problems: threads only contend (10x slower)
    try:
        p = []
        for _ in range(400):
            models, subs = sharp_world(rng, 40, ())
            tests = [g.association_test(models, subs, "spearman", m) for m in ("both", "stimuli")]
            p.append([float(t.p[0]) for t in tests if t is not None])
    finally:
        torch.set_num_threads(threads)
    low, high = scipy.stats.binom.interval(0.95, 400, 0.05)
    rates = (np.array(p) < 0.05).mean(axis=0)
    assert np.all((rates >= low / 400) & (rates <= high / 400)), rates
    assert min(scipy.stats.kstest(col, "uniform").pvalue for col in np.array(p).T) > 0.01


def test_cosine_is_tested_against_its_null_mean() -> None:
    """cosine of two distance RDMs is near 1 without any association: p tests r against its
    no-association value (the relabelling mean), not against 0."""
    rng = np.random.default_rng(3)
    p = np.array([_null_p(rng, 20, 4, "cosine", ("both",)) for _ in range(300)])
    low, high = scipy.stats.binom.interval(0.95, 300, 0.05)
    assert low / 300 <= (p < 0.05).mean() <= high / 300


def test_both_generalises_over_subjects() -> None:
    """Subjects whose association has population mean 0 (each subject's RDM +-lambda_s D_s + eps):
    ``both`` holds this null, the sharp-null ``stimuli`` test rejects it (it is a test of 'the
    model carries information about these subjects')."""
    rng = np.random.default_rng(4)
    out = []
    for _ in range(200):
        model, subs = _world(rng, 24, 5, 1.0)
        d = upper_triangle(subs)
        d = (d - d.mean(dim=1, keepdim=True)) / d.std(dim=1, keepdim=True)
        mixed = torch.as_tensor(rng.normal(size=(5, 1))) * d + torch.as_tensor(
            rng.normal(size=d.shape)
        )
        tests = [g.association_test(model, squareform(mixed), "spearman", m) for m in
                 ("both", "stimuli")]  # fmt: skip
        out.append([t.p[0] for t in tests if t is not None])
    rates = (np.array(out) < 0.05).mean(axis=0)
    assert rates[0] <= scipy.stats.binom.interval(0.95, 200, 0.05)[1] / 200
    assert rates[1] > 0.2


def test_power_not_below_the_t_test() -> None:
    """A weakly planted model: the score test finds it at least as often as the bootstrap
    t-test of the same datasets."""
    rng = np.random.default_rng(5)
    found = []
    for rep in range(40):
        models, subs = _world(rng, 16, 5, 3.0)
        plan = g.resample_plan(16, 5, 20, rep)
        est = g.estimate(g.subject_coefficients(models, subs, "spearman", plan), plan, "both")
        test = g.association_test(models, subs, "spearman", "both")
        assert test is not None
        found.append([test.p[0] < 0.05, est.p_greater[0] < 0.05])
    score, t = np.mean(found, axis=0)
    assert score > 0.2 and score >= t


def test_where_it_does_not_apply() -> None:
    """subjects (stimuli fixed), kendall_tau_a without relabellings and n < 4: the bootstrap
    t-test p is kept (Kendall with relabellings: tests/rsa/test_group_kendall.py)."""
    models, subs = _world(np.random.default_rng(6), 8, 3, 1.0)
    assert g.association_test(models, subs, "spearman", "subjects") is None
    assert g.association_test(models, subs, "kendall_tau_a", "both") is None
    assert g.association_test(models[:, :3, :3], subs[:, :3, :3], "spearman", "both") is None
    plan = g.resample_plan(8, 3, 20, 0)
    est = g.estimate(g.subject_coefficients(models, subs, "spearman", plan), plan, "subjects")
    assert g.group_p(models, np.arange(8), subs, "spearman", "subjects", est) is est.p_greater


def test_constant_subject_is_left_out() -> None:
    """A subject with a constant RDM (undefined r) is left out, as in mean_r."""
    models, subs = _world(np.random.default_rng(7), 10, 3, 1.0)
    subs[2] = 1.0 - torch.eye(10, dtype=subs.dtype)
    test = g.association_test(models, subs, "spearman", "both")
    ref = g.association_test(models, subs[:2], "spearman", "both")
    assert test is not None and ref is not None
    np.testing.assert_allclose(test.p, ref.p)

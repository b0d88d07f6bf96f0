"""The ``p`` column of ``group_inference`` for Kendall's tau-a under ``both``: the score test of
:func:`object2brain.rsa.group.association_test` with Monte Carlo relabelling moments
(:func:`object2brain.rsa.inference.relabelling_moments`); reduced
``validation/inference_null_p.py`` sections ``kendall_both`` and ``kendall_random_effects``."""

from __future__ import annotations

import sys
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from object2brain.rsa import group as g
from object2brain.rsa.compare import compare
from object2brain.rsa.inference import (
    PERM_BLOCK,
    pair_permutation,
    relabelling_moments,
)
from object2brain.rsa.inference import permutations as relabellings
from object2brain.rsa.rdm import squareform, upper_triangle

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "validation"))
from inference_null_p import random_effects_world, sharp_world
from rsa_helpers import ReverseExecutor

KENDALL = g.KENDALL


def _vectors(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two model and three subject condensed RDMs of ``n`` stimuli (the first subject related to
    the first model, ties in the second model) and the subject-mean combine matrix."""
    rng = np.random.default_rng(seed)
    m = n * (n - 1) // 2
    a = torch.as_tensor(rng.random((2, m)))
    a[1] = torch.round(a[1] * 4)  # ties: sign 0 pairs
    y = torch.as_tensor(rng.random((3, m)))
    y[0] += 0.5 * a[0]
    return a, y, torch.full((3, 1), 1.0 / 3, dtype=torch.float64)


def test_moments_converge_to_those_of_all_relabellings() -> None:
    """Over all 720 relabellings of 6 stimuli tau-a's mean is 0 (every subject and the subject
    mean) and its variance is what the Monte Carlo moments (20,000 relabellings) estimate,
    within their sampling error; the stimulus bootstrap variance, which the t-test used,
    is another quantity (larger here)."""
    a, y, mean = _vectors(1)
    idx = pair_permutation(np.array(list(permutations(range(6)))))
    every = torch.stack([compare(a[k][idx], y, KENDALL) for k in range(2)], dim=1)  # (720, 2, 3)
    every = torch.cat([every, every.mean(dim=2, keepdim=True)], dim=2).numpy()
    np.testing.assert_allclose(every.mean(axis=0), 0.0, atol=1e-15)
    exact = (every**2).mean(axis=0)
    got = relabelling_moments(a, y, KENDALL, 20_000, 3, "cpu", mean)
    assert got.second.shape == (2, 4) and got.n_perm == 20_000
    np.testing.assert_allclose(got.second, exact, rtol=0.04)
    np.testing.assert_allclose(got.mean, 0.0, atol=0.01)
    n = 6
    plan = g.resample_plan(n, 3, 400, 0)
    coef = g.subject_coefficients(squareform(a), squareform(y), KENDALL, plan)
    boot = g.bootstrap_variances(coef, plan).stimuli
    assert np.all(boot > 1.5 * exact[:, -1]), (boot, exact[:, -1])


def test_dot_product_moments_match_the_closed_form() -> None:
    """The same Monte Carlo moments for Spearman agree with the exact relabelling mean and
    variance of :func:`object2brain.rsa.group.permutation_moments` (a check of the kernel shared
    with tau-a: blocks, tiles, the combined column)."""
    a, y, mean = _vectors(2, 9)
    from object2brain.rsa.compare import prepare

    got = relabelling_moments(a, y, "spearman", 20_000, 5, "cpu", mean)
    ap, yp = prepare(a, "spearman"), prepare(y, "spearman")
    e, v = g.permutation_moments(ap, yp, 9)
    e_mean, v_mean = g.permutation_moments(ap, yp.mean(dim=0, keepdim=True), 9)
    np.testing.assert_allclose(got.mean[:, :3], e, atol=0.004)
    np.testing.assert_allclose(got.second[:, :3], v + e**2, rtol=0.04)
    np.testing.assert_allclose(got.second[:, 3], v_mean[:, 0] + e_mean[:, 0] ** 2, rtol=0.04)


def test_moments_equal_a_brute_force_loop_over_the_same_relabellings() -> None:
    """Each relabelled whole model RDM compared from scratch with every subject, over the
    relabellings of :func:`object2brain.rsa.inference.permutations` (two blocks)."""
    a, y, mean = _vectors(3, 8)
    n_perm = PERM_BLOCK + 37
    total = np.zeros((2, 2, 4))
    for block in relabellings(8, n_perm, 4):
        for pi in torch.as_tensor(block):
            r = compare(upper_triangle(squareform(a)[:, pi][:, :, pi]), y, KENDALL).numpy()
            r = np.concatenate([r, r.mean(axis=1, keepdims=True)], axis=1)
            total += [r, r**2]
    got = relabelling_moments(a, y, KENDALL, n_perm, 4, "cpu", mean)
    np.testing.assert_allclose(got.mean, total[0] / n_perm, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.second, total[1] / n_perm, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", [KENDALL, "spearman"])
def test_moments_do_not_depend_on_tiles_or_executor_chunks(method: str) -> None:
    """Tiles of 1 and 3 relabellings and blocks run by an executor in reverse order: the same
    moments (tau-a: bit for bit, its coefficients are integer counts over a fixed denominator);
    so the ``both`` p is the same."""
    a, y, mean = _vectors(4, 10)
    n_perm = 2 * PERM_BLOCK + 9  # three blocks
    ref = relabelling_moments(a, y, method, n_perm, 6, "cpu", mean)
    reverse = ReverseExecutor()
    moved = relabelling_moments(a, y, method, n_perm, 6, "cpu", mean, executor=reverse)
    assert reverse.calls == 3
    np.testing.assert_array_equal(moved.second, ref.second)
    for elements in (45, 3 * 45 * 3):
        tiled = relabelling_moments(a, y, method, n_perm, 6, "cpu", mean, elements)
        if method == KENDALL:
            np.testing.assert_array_equal(tiled.second, ref.second)
        else:
            np.testing.assert_allclose(tiled.second, ref.second, rtol=1e-12)
    models, subs = squareform(a), squareform(y)
    p = g.association_test(models, subs, KENDALL, "both", n_perm=n_perm, seed=6)
    q = g.association_test(
        models, subs, KENDALL, "both", n_perm=n_perm, seed=6, executor=ReverseExecutor()
    )
    assert p is not None and q is not None
    np.testing.assert_array_equal(p.p, q.p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moments_on_cuda_equal_cpu() -> None:
    models, subs = sharp_world(np.random.default_rng(5), 30, (8.0,))
    cpu = g.association_test(models, subs, KENDALL, "both", n_perm=1999, seed=2)
    gpu = g.association_test(models, subs, KENDALL, "both", n_perm=1999, seed=2, device="cuda")
    assert cpu is not None and gpu is not None
    np.testing.assert_allclose(gpu.null_variance, cpu.null_variance, rtol=1e-12)
    np.testing.assert_allclose(gpu.p, cpu.p, rtol=1e-10)


def test_table_p_of_kendall_both_is_the_score_test() -> None:
    """``group_p`` of a Kendall ``both`` cell is the score test over the run's relabellings
    (those of the ``stimuli`` p for the seed); without relabellings the bootstrap t-test."""
    models, subs = sharp_world(np.random.default_rng(6), 12, (8.0,))
    n = 12
    plan = g.resample_plan(n, subs.shape[0], 30, 0)
    est = g.estimate(g.subject_coefficients(models, subs, KENDALL, plan), plan, "both")
    test = g.association_test(models, subs, KENDALL, "both", n_perm=299, seed=7)
    assert test is not None
    rows = np.arange(n)
    np.testing.assert_array_equal(
        g.group_p(models, rows, subs, KENDALL, "both", est, 299, 7), test.p
    )
    assert g.group_p(models, rows, subs, KENDALL, "both", est, 0, 7) is est.p_greater
    assert g.association_test(models, subs, KENDALL, "both") is None
    assert np.all(test.null_mean == 0) and np.all(test.dof >= subs.shape[0] - 1)


def test_null_rate_inside_binomial_interval_where_the_t_test_is_conservative() -> None:
    """400 datasets of 14 stimuli x 6 subjects (the sharp world of the validation script; 199
    relabellings, 40 resamples): under the unrelated model the score test rejects inside the
    binomial interval around 0.05, the bootstrap t-test ``both`` reported before rejects below
    it (0.0125 here), and the score test finds the planted model more often."""
    rng = np.random.default_rng(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = []
        for rep in range(400):
            models, subs = sharp_world(rng, 14, (8.0,))
            test = g.association_test(models, subs, KENDALL, "both", n_perm=199, seed=rep)
            assert test is not None
            plan = g.resample_plan(14, subs.shape[0], 40, rep)
            est = g.estimate(g.subject_coefficients(models, subs, KENDALL, plan), plan, "both")
            p.append([*test.p, *est.p_greater])
    finally:
        torch.set_num_threads(threads)
    rates = (np.array(p) < 0.05).mean(axis=0)  # score null, score planted, t null, t planted
    low, high = scipy.stats.binom.interval(0.95, 400, 0.05)
    assert low / 400 <= rates[0] <= high / 400, rates
    assert rates[2] < low / 400, rates
    assert rates[1] > rates[3] + 0.05, rates


def test_both_generalises_over_subjects() -> None:
    """Subjects whose tau-a has population mean 0 (the random-effects world of the validation
    script at 16 stimuli): ``both`` holds this null; the same moments without the
    between-subject part (``B0 = 0``, the sharp null of ``stimuli``) reject it far more often."""
    rng = np.random.default_rng(2)
    out = []
    for rep in range(150):
        model, subs = random_effects_world(rng, 16)
        test = g.association_test(model, subs, KENDALL, "both", n_perm=199, seed=rep)
        assert test is not None
        sharp = test.z * np.sqrt(1 + test.subject_variance / test.null_variance)
        out.append([test.p[0], scipy.stats.norm.sf(sharp[0])])
    rates = (np.array(out) < 0.05).mean(axis=0)
    assert rates[0] <= scipy.stats.binom.interval(0.95, 150, 0.05)[1] / 150, rates
    assert rates[1] > 0.2, rates

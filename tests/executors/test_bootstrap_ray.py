"""The bootstrap resamples of the RSA stage (stimulus bootstrap, contrast bootstrap, two-factor
group bootstrap, within-pairs bootstrap) drawn in chunks of their own seeds: a Ray run with 1 or
2 workers equals a local run exactly, and the first chunks do not change with the number of
resamples."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch

from object2brain.executors import RayExecutor
from object2brain.rsa import group as g
from object2brain.rsa.inference import (
    BOOT_CHUNK,
    PERM_BLOCK,
    bootstrap_values,
    condition_difference_bootstrap,
)
from object2brain.rsa.rdm import upper_triangle
from object2brain.rsa.within import within_bootstrap_ci, within_mantel_test


def _square(rng: np.random.Generator, count: int, n: int, base: np.ndarray) -> torch.Tensor:
    x = base[None] + rng.normal(size=(count, n, 5))
    z = x - x.mean(-1, keepdims=True)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return torch.as_tensor(1 - z @ np.swapaxes(z, -1, -2))


def _study(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(4)
    base = rng.normal(size=(n, 5))
    return _square(rng, 2, n, base), _square(rng, 3, n, base)


def test_chunks_do_not_depend_on_the_number_of_resamples() -> None:
    models, subjects = _study()
    short = bootstrap_values(models, subjects, "spearman", BOOT_CHUNK, 5, "cpu")
    long = bootstrap_values(models, subjects, "spearman", 2 * BOOT_CHUNK + 7, 5, "cpu")
    np.testing.assert_array_equal(long[:BOOT_CHUNK], short)
    assert not np.array_equal(long[BOOT_CHUNK : 2 * BOOT_CHUNK], short)  # chunks differ
    plan = g.resample_plan(12, 3, g.RESAMPLE_CHUNK, (5, 1))
    longer = g.resample_plan(12, 3, 2 * g.RESAMPLE_CHUNK + 3, (5, 1))
    np.testing.assert_array_equal(longer.counts[: g.RESAMPLE_CHUNK], plan.counts)
    np.testing.assert_array_equal(longer.subjects[: g.RESAMPLE_CHUNK], plan.subjects)
    assert (plan.counts.sum(axis=1) == 12).all()


@pytest.mark.parametrize("cpus_per_task", [2, 1], ids=["1-worker", "2-workers"])
def test_bootstraps_on_ray_equal_local(ray_cluster: ModuleType, cpus_per_task: int) -> None:
    models, subjects = _study()
    ray_ex = RayExecutor(num_cpus=cpus_per_task)
    assert ray_ex.workers == 2 // cpus_per_task
    n_boot = 3 * BOOT_CHUNK + 11  # four chunks: several per worker
    local = bootstrap_values(models, subjects, "spearman", n_boot, 7, "cpu")
    remote = bootstrap_values(models, subjects, "spearman", n_boot, 7, "cpu", executor=ray_ex)
    np.testing.assert_array_equal(remote, local)
    labels = ["a", "b"] * 6
    args = (models, subjects, labels, "a", "b", "pearson", n_boot, 7, "cpu")
    here = condition_difference_bootstrap(*args)
    there = condition_difference_bootstrap(*args, executor=ray_ex)
    for x, y in zip((here.low, here.high, here.p), (there.low, there.high, there.p), strict=True):
        np.testing.assert_array_equal(y, x)
    plan = g.resample_plan(12, 3, 3 * g.RESAMPLE_CHUNK + 11, (7, 0, 0))
    coef = g.subject_coefficients(models, subjects, "spearman", plan)
    remote_coef = g.subject_coefficients(models, subjects, "spearman", plan, ray_ex)
    np.testing.assert_array_equal(remote_coef.boot, coef.boot)
    low = g.lower_ceiling_coefficients(subjects, "spearman", plan)
    remote_low = g.lower_ceiling_coefficients(subjects, "spearman", plan, ray_ex)
    np.testing.assert_array_equal(remote_low.boot, low.boot)
    a, y = upper_triangle(models), upper_triangle(subjects)
    np.testing.assert_array_equal(
        g.resampled(a, y, "cosine", plan.counts, ray_ex), g.resampled(a, y, "cosine", plan.counts)
    )
    within = (models, subjects, ["a"] * 5 + ["b"] * 4 + [""] + ["c"] * 2, "spearman", n_boot, 7)
    for corrected in (True, False):
        here_ci = within_bootstrap_ci(*within, corrected=corrected)
        there_ci = within_bootstrap_ci(*within, corrected=corrected, executor=ray_ex)
        np.testing.assert_array_equal(there_ci[0], here_ci[0])
        np.testing.assert_array_equal(there_ci[1], here_ci[1])
    here_test = within_mantel_test(*within[:4], 2 * PERM_BLOCK + 9, 7)
    there_test = within_mantel_test(*within[:4], 2 * PERM_BLOCK + 9, 7, executor=ray_ex)
    np.testing.assert_array_equal(there_test.p, here_test.p)

"""``--pairs within``: the ``all`` rows over within-condition pairs only, with a stratified
Mantel test and a stratified bootstrap; checked against scipy / rsatoolbox on the pair vectors,
by brute force, and by a reduced null simulation where conditions differ in content (the full
one: ``validation/within_pairs_null.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
import rsatoolbox
import scipy.stats
import torch
from rsa_helpers import ReverseExecutor, write_store

from object2brain.api.rsa import rsa
from object2brain.errors import DataError
from object2brain.executors import chunk_seed
from object2brain.rsa.compare import RSATOOLBOX_NAMES
from object2brain.rsa.inference import BOOT_CHUNK, PERM_BLOCK, mantel_test
from object2brain.rsa.rdm import rdm_from_features, upper_triangle
from object2brain.rsa.within import (
    _WITHIN_BOOT_STREAM,
    _within_boot_chunks,
    _WithinBootJob,
    stratified_permutations,
    within_bootstrap_ci,
    within_mantel_test,
    within_pairs,
)

LABELS = ["a"] * 6 + ["b"] * 5 + [""] + ["c"] * 4


def _square(rng: np.random.Generator, k: int, n: int) -> torch.Tensor:
    return torch.stack(
        [rdm_from_features(rng.normal(size=(n, 5)), "euclidean", "cpu") for _ in range(k)]
    )


def _pair_vectors(square: torch.Tensor, labels: list[str]) -> np.ndarray:
    pairs = within_pairs(labels)
    return square[:, pairs.rows, pairs.cols].numpy()


@pytest.mark.parametrize("method", ["spearman", "pearson", "rho_a", "cosine"])
def test_statistic_and_p_by_brute_force(method: str) -> None:
    rng = np.random.default_rng(0)
    n = len(LABELS)
    models, targets = _square(rng, 2, n), _square(rng, 3, n)
    models[1] = 0.3 * models[1] + targets[0]
    res = within_mantel_test(models, targets, LABELS, method, n_perm=50, seed=3)
    x, y = _pair_vectors(models, LABELS), _pair_vectors(targets, LABELS)
    ref = rsatoolbox.rdm.compare(x, y, method=RSATOOLBOX_NAMES[method])
    np.testing.assert_allclose(res.r, ref, atol=1e-12)
    if method == "spearman":
        np.testing.assert_allclose(res.r[0, 0], scipy.stats.spearmanr(x[0], y[0])[0], atol=1e-12)
    count = np.zeros_like(res.r)
    for perm in np.concatenate(list(stratified_permutations(within_pairs(LABELS), n, 50, 3))):
        for g in within_pairs(LABELS).groups:  # stays within its condition
            assert sorted(perm[g]) == list(g)
        permuted = models[:, perm][:, :, perm]
        xp = _pair_vectors(permuted, LABELS)
        count += rsatoolbox.rdm.compare(xp, y, method=RSATOOLBOX_NAMES[method]) >= res.r - 1e-12
    np.testing.assert_array_equal(res.p, (1 + count) / 51)
    assert res.p[1, 0] < 0.05


def test_bootstrap_by_brute_force() -> None:
    rng = np.random.default_rng(1)
    n = len(LABELS)
    models, targets = _square(rng, 2, n), _square(rng, 2, n)
    low, high = within_bootstrap_ci(models, targets, LABELS, "spearman", 40, 5, corrected=False)
    pairs = within_pairs(LABELS)
    draws_rng = np.random.default_rng(chunk_seed(5, _WITHIN_BOOT_STREAM, 0))  # one chunk
    draws = [g[draws_rng.integers(0, g.size, size=(40, g.size))] for g in pairs.groups]
    values = np.full((40, 2, 2), np.nan)
    for b in range(40):
        xa, xb = [], []
        for d in draws:
            i, j = np.triu_indices(d.shape[1], 1)
            a, c = d[b, i], d[b, j]
            keep = a != c  # a stimulus with its own copy: dropped
            xa.append(models[:, a[keep], c[keep]].numpy())
            xb.append(targets[:, a[keep], c[keep]].numpy())
        va, vb = np.concatenate(xa, axis=1), np.concatenate(xb, axis=1)
        for k in range(2):
            for t in range(2):
                values[b, k, t] = scipy.stats.spearmanr(va[k], vb[t])[0]
    np.testing.assert_allclose(low, np.nanquantile(values, 0.025, axis=0), atol=1e-9)
    np.testing.assert_allclose(high, np.nanquantile(values, 0.975, axis=0), atol=1e-9)
    # corrected: r -+ t sqrt(max(2 V_jack - V_boot, V_boot / 3)), the delete-one values over the
    # stimuli with within pairs recomputed by scipy (dof: their number - 1)
    x, y = _pair_vectors(models, LABELS), _pair_vectors(targets, LABELS)
    observed = np.array([[scipy.stats.spearmanr(a, b)[0] for b in y] for a in x])
    stimuli = np.concatenate(pairs.groups)
    jack = []
    for left in stimuli:
        labels = [lab if i != left else "" for i, lab in enumerate(LABELS)]
        xl, yl = _pair_vectors(models, labels), _pair_vectors(targets, labels)
        jack.append([[scipy.stats.spearmanr(a, b)[0] for b in yl] for a in xl])
    m = len(stimuli)
    v_jack = (m - 1) / m * ((jack - np.mean(jack, axis=0)) ** 2).sum(axis=0)
    v_boot = np.nanvar(values, axis=0, ddof=1)
    half = scipy.stats.t.ppf(0.975, m - 1) * np.sqrt(np.maximum(2 * v_jack - v_boot, v_boot / 3))
    low, high = within_bootstrap_ci(models, targets, LABELS, "spearman", 40, seed=5)
    np.testing.assert_allclose(low, np.clip(observed - half, -1, 1), atol=1e-9)
    np.testing.assert_allclose(high, np.clip(observed + half, -1, 1), atol=1e-9)


def _content_null(rng: np.random.Generator, n_per: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Two conditions that differ in content (a mean pattern shared by model and brain), nothing
    shared within a condition: (model features, brain patterns)."""
    labels = np.repeat([0, 1], n_per)
    direction = rng.normal(size=(2, 30))
    model = 1.5 * direction[labels] + rng.normal(size=(2 * n_per, 30))
    brain = 1.5 * direction[labels] @ np.eye(30) + rng.normal(size=(2 * n_per, 30))
    return model, brain


def test_reduced_null_simulation_keeps_alpha_where_all_pairs_do_not() -> None:
    rng = np.random.default_rng(2)
    labels = ["x"] * 10 + ["y"] * 10
    within_hits = all_hits = 0
    datasets = 60
    for d in range(datasets):
        model, brain = _content_null(rng)
        a = rdm_from_features(model, "correlation", "cpu")[None]
        b = rdm_from_features(brain, "correlation", "cpu")[None]
        within_hits += within_mantel_test(a, b, labels, "spearman", 99, d).p[0, 0] <= 0.05
        all_hits += (
            mantel_test(upper_triangle(a), upper_triangle(b), n_perm=99, seed=d).p[0, 0] <= 0.05
        )
    # binomial 95% interval around 0.05 with 60 datasets: at most 7 rejections
    assert within_hits <= scipy.stats.binom.ppf(0.975, datasets, 0.05)
    assert all_hits >= datasets // 2  # the all-pairs test is fooled by the content difference


def test_power_on_planted_within_structure() -> None:
    rng = np.random.default_rng(3)
    labels = ["x"] * 10 + ["y"] * 10
    hits = 0
    for d in range(20):
        model, brain = _content_null(rng)
        brain = brain + 1.2 * model  # shared structure within conditions too
        a = rdm_from_features(model, "correlation", "cpu")[None]
        b = rdm_from_features(brain, "correlation", "cpu")[None]
        hits += within_mantel_test(a, b, labels, "spearman", 99, d).p[0, 0] <= 0.05
    assert hits >= 18


def _inputs(tmp_path: Path, conditions: bool = True) -> dict[str, Path]:
    rng = np.random.default_rng(4)
    ids = [f"s{i:02d}" for i in range(12)]
    store = write_store(tmp_path / "acts.h5", {"fc": rng.normal(size=(12, 6))}, ids)
    with h5py.File(tmp_path / "brain.h5", "w") as f:
        f.attrs["kind"] = "patterns"
        f.create_dataset("stimulus_ids", data=np.asarray(ids, dtype="S"))
        for s in range(2):
            f.create_dataset(f"sub-{s}/EVC", data=rng.normal(size=(12, 7)))
    table = {"stimulus_id": ids} | ({"condition": ["p", "q", "r"] * 4} if conditions else {})
    pd.DataFrame(table).to_csv(tmp_path / "stimuli.csv", index=False)
    return {
        "activations": store,
        "brain": tmp_path / "brain.h5",
        "stimuli": tmp_path / "stimuli.csv",
    }


def test_rsa_within_rows(tmp_path: Path) -> None:
    paths = _inputs(tmp_path)
    kwargs = {"n_perm": 30, "n_boot": 10, "progress": False, "figures": False}
    within = rsa(paths["activations"], brain=paths["brain"], stimuli=paths["stimuli"],
                 pairs="within", **kwargs).alignment  # fmt: skip
    plain = rsa(paths["activations"], brain=paths["brain"], stimuli=paths["stimuli"],
                **kwargs).alignment  # fmt: skip
    is_all = within["condition"] == "all"
    # only the 'all' rows change; their r is that of the within pairs
    pd.testing.assert_frame_equal(within[~is_all], plain[~is_all])
    assert not np.allclose(within.loc[is_all, "r"], plain.loc[is_all, "r"])
    assert (within.loc[is_all, "n_stimuli"] == 12).all()
    assert within.loc[is_all, "p_perm"].between(0, 1).all()


def test_rsa_within_refuses_bad_input(tmp_path: Path) -> None:
    paths = _inputs(tmp_path, conditions=False)
    kwargs = {"n_perm": 0, "n_boot": 0, "progress": False, "figures": False}
    with pytest.raises(DataError, match="--pairs within needs a 'condition' column"):
        rsa(paths["activations"], brain=paths["brain"], stimuli=paths["stimuli"],
            pairs="within", **kwargs)  # fmt: skip
    paths = _inputs(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path)
    with pytest.raises(DataError, match="--pairs within supports --compare"):
        rsa(paths["activations"], brain=paths["brain"], stimuli=paths["stimuli"],
            pairs="within", compare_method="cosine_cov", **kwargs)  # fmt: skip


@pytest.mark.parametrize("corrected", [True, False])
def test_bootstrap_chunks_in_reverse_order_equal_local(corrected: bool) -> None:
    rng = np.random.default_rng(2)
    n = len(LABELS)
    models, targets = _square(rng, 2, n), _square(rng, 3, n)
    combine = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]).T.to(torch.float64)
    n_boot = 3 * BOOT_CHUNK + 7  # four chunks
    args = (models, targets, LABELS, "pearson", n_boot, 9, combine)
    reverse = ReverseExecutor()
    here = within_bootstrap_ci(*args, corrected=corrected)
    there = within_bootstrap_ci(*args, corrected=corrected, executor=reverse)
    assert reverse.calls == 4  # one task per chunk with two workers
    np.testing.assert_array_equal(there[0], here[0])
    np.testing.assert_array_equal(there[1], here[1])
    assert np.isfinite(here[0]).all() and (here[0] < here[1]).all()
    test = within_mantel_test(models, targets, LABELS, "pearson", 2 * PERM_BLOCK + 9, 9, combine)
    reverse = ReverseExecutor()
    moved = within_mantel_test(
        models, targets, LABELS, "pearson", 2 * PERM_BLOCK + 9, 9, combine, executor=reverse
    )
    assert reverse.calls == 3  # three blocks, one task each
    np.testing.assert_array_equal(moved.p, test.p)
    np.testing.assert_array_equal(moved.r, test.r)


def test_bootstrap_chunks_do_not_depend_on_the_number_of_resamples() -> None:
    rng = np.random.default_rng(3)
    n = len(LABELS)
    models, targets = _square(rng, 1, n), _square(rng, 1, n)
    args = (models, targets, LABELS, "spearman")
    first = within_bootstrap_ci(*args, BOOT_CHUNK, 4, corrected=False, level=0.5)
    job_values = _within_values(models, targets, BOOT_CHUNK, 4)
    longer = _within_values(models, targets, 2 * BOOT_CHUNK + 3, 4)
    np.testing.assert_array_equal(longer[:BOOT_CHUNK], job_values)
    assert not np.array_equal(longer[BOOT_CHUNK : 2 * BOOT_CHUNK], job_values)
    np.testing.assert_allclose(first[0], np.nanquantile(job_values, 0.25, axis=0), atol=1e-12)


def _within_values(models: torch.Tensor, targets: torch.Tensor, n_boot: int, seed: int) -> Any:
    pairs = within_pairs(LABELS)
    a, b = models[:, pairs.rows, pairs.cols], targets[:, pairs.rows, pairs.cols]
    job = _WithinBootJob(
        a, b, pairs.rows, pairs.cols, tuple(pairs.groups), len(LABELS), "spearman", None,
        n_boot, seed,
    )  # fmt: skip
    return _within_boot_chunks(job, range(-(-n_boot // BOOT_CHUNK))).numpy()

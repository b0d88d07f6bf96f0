"""The lesion nulls in seeded chunks: a chunk's draws depend only on the root seed, its stream
and its index, so the object2brain table is the same whatever runs the chunks, in any order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import pdist, squareform

from object2brain.executors import LocalExecutor, chunk_seed
from object2brain.lesion.analysis import LayerFilters, lesion_layer, selection_folds
from object2brain.lesion.engine import (
    FilterStats,
    alignment_bins,
    matched_subset_masks,
    norm_strata,
    random_subset_masks,
    swap_subset_masks,
)
from object2brain.lesion.nulls import (
    GROUP_STREAM,
    NULL_CHUNK,
    RANDOM_STREAM,
    NullRequest,
    chunk_masks,
    chunks_of_request,
    request_masks,
)
from object2brain.options import LesionOptions
from object2brain.rsa.targets import AnalysisSet, Target

K, N = 20, 28
CPU = torch.device("cpu")


def test_chunks_are_cut_at_the_constant_and_seeded_by_index() -> None:
    members = np.arange(5)
    request = NullRequest("random", 11, 2 * NULL_CHUNK + 7, K, members, lesion=False)
    chunks = chunks_of_request(request)
    assert [c.size for c in chunks] == [NULL_CHUNK, NULL_CHUNK, 7]
    masks = request_masks(request)
    assert masks.shape == (2 * NULL_CHUNK + 7, K) and (masks.sum(axis=1) == 5).all()
    last = random_subset_masks(K, 5, 7, seed=chunk_seed(11, RANDOM_STREAM, 2))
    np.testing.assert_array_equal(masks[-7:], last)
    # drawn alone, in any order, a chunk is the same: no generator is shared between chunks
    alone = np.concatenate([chunk_masks(c) for c in reversed(chunks)][::-1])
    np.testing.assert_array_equal(alone, masks)
    # the first chunks do not depend on how many draws follow
    shorter = NullRequest("random", 11, NULL_CHUNK + 3, K, members, lesion=False)
    np.testing.assert_array_equal(request_masks(shorter)[:NULL_CHUNK], masks[:NULL_CHUNK])
    lesioned = NullRequest("random", 11, 2 * NULL_CHUNK + 7, K, members, lesion=True)
    np.testing.assert_array_equal(request_masks(lesioned), ~masks)


def test_matched_and_group_chunks_keep_their_rules() -> None:
    rng = np.random.default_rng(3)
    norms = np.exp(rng.normal(size=K))
    members = np.array([0, 3, 7, 12])
    strata = norm_strata(norms, members)
    matched = NullRequest("random", 5, NULL_CHUNK + 9, K, members, False, strata=strata)
    masks = request_masks(matched)
    want = np.bincount(strata[members], minlength=strata.max() + 1)
    for row in masks[:: NULL_CHUNK // 5]:  # as many per stratum as the group
        np.testing.assert_array_equal(np.bincount(strata[row], minlength=len(want)), want)
    second = matched_subset_masks(strata, members, 9, seed=chunk_seed(5, RANDOM_STREAM, 1))
    np.testing.assert_array_equal(masks[NULL_CHUNK:], second)
    bins = alignment_bins(rng.normal(size=K), members)
    own = np.array([True, False])
    group = NullRequest("group", 5, 30, K, members, False, norms=norms, bins=bins, own=own)
    direct = swap_subset_masks(norms, bins, members, 30, seed=chunk_seed(5, GROUP_STREAM, 0))
    np.testing.assert_array_equal(request_masks(group), direct)


class _ShuffledExecutor:
    """Runs the chunks in reverse order, one at a time (as scattered workers would finish)."""

    name = "shuffled"
    workers = 3

    def map_chunks(
        self, fn: Callable[..., Any], chunks: Sequence[Any], *, stage: str, shared: Any = None
    ) -> list[Any]:
        assert stage.startswith(("lesion ", "rsa permutations"))  # the Mantel blocks
        done = {i: fn(shared, chunks[i]) for i in reversed(range(len(chunks)))}
        return [done[i] for i in range(len(chunks))]


def _study(seed: int = 0) -> tuple[FilterStats, AnalysisSet]:
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(N, K, 2)) * np.exp(rng.normal(scale=0.3, size=K))[None, :, None]
    ids = [f"s{i:02d}" for i in range(N)]
    voxels = acts[:, :6].reshape(N, -1) @ rng.normal(size=(12, 30)) + rng.normal(size=(N, 30))
    noisy = [voxels + rng.normal(size=voxels.shape) for _ in range(2)]
    rdms = torch.as_tensor(np.stack([squareform(pdist(v, "correlation")) for v in noisy]))
    target = Target("ROI", "roi", ["a", "b"], rdms, group_rdm=rdms.mean(dim=0))
    labels = np.array(["x", "y"] * (N // 2), dtype=object)
    return FilterStats.from_activations(acts, ids), AnalysisSet.from_targets(ids, [target], labels)


def lesion_table(executor: Any, *, cross_fit: bool, n_draws: int = NULL_CHUNK + 11) -> pd.DataFrame:
    """Rows of the object2brain table of a small layer with two targets' subjects (and group
    columns), nulls of two chunks each; ``cross_fit``: two selection folds (permutation
    chunks), else the same selection (Mantel blocks)."""
    stats, analysis = _study()
    options = LesionOptions(
        n_null=n_draws, n_perm=n_draws, n_group_null=n_draws, compare_method="pearson",
        null_subsets="matched", selection="cross_fit" if cross_fit else "same",
    )  # fmt: skip
    groups = {"G": np.arange(6), "H": np.arange(8, 12)}
    task = LayerFilters("m", "L", stats, groups)
    if cross_fit:
        folds = selection_folds(analysis, 2, 0)
        task = LayerFilters("m", "L", stats, {}, folds=folds, fold_groups=(groups, groups))
    rows = lesion_layer(task, analysis, options, seed=4, device=CPU, executor=executor)
    return pd.DataFrame(rows)


P_COLUMNS = ["p_null", "p_perm", "p_group"]
R_COLUMNS = ["r_full", "r_variant", "delta_r", "z_null"]


def same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """p-values identical, r (and z) within 1e-12, every other column equal."""
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    for column in P_COLUMNS:
        np.testing.assert_array_equal(a[column].to_numpy(), b[column].to_numpy(), err_msg=column)
    for column in R_COLUMNS:
        np.testing.assert_allclose(a[column], b[column], rtol=0, atol=1e-12, err_msg=column)
    rest = [c for c in a.columns if c not in (*P_COLUMNS, *R_COLUMNS)]
    pd.testing.assert_frame_equal(a[rest], b[rest])


@pytest.mark.parametrize("cross_fit", [False, True], ids=["same", "cross_fit"])
def test_table_does_not_depend_on_chunk_order(cross_fit: bool) -> None:
    local = lesion_table(LocalExecutor(), cross_fit=cross_fit)
    assert local[P_COLUMNS].notna().all().all()  # every null drawn: not a trivial table
    assert (local["p_null"] < 1).all() and local["p_null"].nunique() > 3
    same_table(lesion_table(_ShuffledExecutor(), cross_fit=cross_fit), local)

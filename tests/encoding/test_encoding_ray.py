"""Encoding on a local Ray cluster: each layer of ``compute_encoding`` and each ROI of the
encoding lesion run as Ray tasks, with 1 and 2 workers; the tables equal the local ones
(r within 1e-12, p identical)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
import pandas as pd
import pytest

from object2brain.activations.store import ActivationStore
from object2brain.encoding import compute_encoding
from object2brain.executors import Executor, LocalExecutor, RayExecutor
from object2brain.lesion.analysis import load_filter_table
from object2brain.lesion.encoding import EncodingLesionData, compute_encoding_lesion
from object2brain.options import EncodeOptions, LesionOptions, Runtime

N, C = 40, 8
RUNTIME = Runtime(seed=2, device="cpu", progress=False)
IDS = [f"s{i:02d}" for i in range(N)]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[ModuleType]:
    """The session's Ray cluster when one runs (``tests/executors``), else a local one of 2
    CPUs for this module."""
    ray = __import__("ray") if os.environ.get("CI") else pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        src = str(Path(__file__).resolve().parents[2] / "src")
        paths = [src, os.environ.get("PYTHONPATH", "")]
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}},
        )
    yield ray
    if started:
        ray.shutdown()


def _data() -> tuple[dict[str, np.ndarray], dict[tuple[str, str], np.ndarray], np.ndarray]:
    rng = np.random.default_rng(5)
    features = {name: rng.standard_normal((N, C, 2, 2)) for name in ("l1", "l2")}
    planted = features["l2"][:, :3].reshape(N, -1)
    signal = planted @ rng.standard_normal((planted.shape[1], 10))
    responses = {
        ("roi", "a"): signal + signal.std() * rng.standard_normal(signal.shape),
        ("roi", "b"): signal + signal.std() * rng.standard_normal(signal.shape),
        ("noise", "a"): rng.standard_normal((N, 7)),
    }
    return features, responses, np.array(["x", "y"] * (N // 2))


def _encoding(executor: Executor) -> pd.DataFrame:
    features, responses, conditions = _data()
    options = EncodeOptions(n_perm=300, folds=4, keep_weights=False)
    result = compute_encoding(
        features, responses, options, RUNTIME, stimulus_ids=IDS, model="net",
        conditions=list(conditions), executor=executor,
    )  # fmt: skip
    voxels = result.encoding_voxels.rename(columns={"r": "r_voxel"})
    return result.encoding.merge(voxels.groupby(["layer", "target", "subject"]).r_voxel.sum(),
                                 on=["layer", "target", "subject"])  # fmt: skip


def _lesion(executor: Executor, folder: Path) -> pd.DataFrame:
    features, responses, conditions = _data()
    path = folder / "acts.h5"
    if not path.exists():
        with h5py.File(path, "w") as handle:
            handle["stimulus_ids"] = np.array(IDS, dtype=object)
            handle.create_group("layers")["l2"] = features["l2"]
            handle.attrs.update(complete=True, order=json.dumps(["l2"]), model="net", arch="net")
    table = load_filter_table(
        pd.DataFrame(
            {"model": "net", "layer": "l2", "filter": range(C),
             "group": ["Faces"] * 3 + ["Cars"] * 3 + ["Other"] * 2,
             "assigned": [True] * 6 + [False] * 2}
        )
    )  # fmt: skip
    data = EncodingLesionData(IDS, responses, list(conditions))
    options = LesionOptions(n_null=60, n_perm=0, n_group_null=0, selection="same")
    with ActivationStore.open(path) as store:
        return compute_encoding_lesion(
            [store], table, data, options, EncodeOptions(folds=4), RUNTIME, executor=executor
        )


def _same(a: pd.DataFrame, b: pd.DataFrame, p: list[str], r: list[str]) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    for column in p:
        np.testing.assert_array_equal(a[column].to_numpy(), b[column].to_numpy(), err_msg=column)
    for column in r:
        np.testing.assert_allclose(a[column], b[column], rtol=0, atol=1e-12, err_msg=column)
    rest = [c for c in a.columns if c not in (*p, *r)]
    pd.testing.assert_frame_equal(a[rest], b[rest], check_exact=False, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cpus_per_task", [2, 1], ids=["1-worker", "2-workers"])
def test_encoding_on_ray_equals_local(ray_cluster: ModuleType, cpus_per_task: int) -> None:
    local = _encoding(LocalExecutor())
    assert (local["p_perm"] < 0.05).any() and (local["p_perm"] > 0.05).any()  # not trivial
    remote = _encoding(RayExecutor(num_cpus=cpus_per_task))
    _same(remote, local, ["p_perm", "p_fdr"], ["r_mean", "r_median", "r2_mean", "r_voxel"])


@pytest.mark.parametrize("cpus_per_task", [2, 1], ids=["1-worker", "2-workers"])
def test_encoding_lesion_on_ray_equals_local(
    ray_cluster: ModuleType, cpus_per_task: int, tmp_path: Path
) -> None:
    local = _lesion(LocalExecutor(), tmp_path)
    assert local["p_null"].notna().all() and local["p_null"].nunique() > 3
    remote = _lesion(RayExecutor(num_cpus=cpus_per_task), tmp_path)
    _same(remote, local, ["p_null", "p_fdr"], ["r_full", "r_variant", "delta_r", "z_null"])

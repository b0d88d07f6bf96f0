"""Dissection in shards (in this process and on a local Ray cluster): the ``filter_objects``
table of a local run (p-values identical, floats within 1e-12), with the selection folds, for 1
and 2 workers; a rerun reuses the finished shards; a shard that always fails is one error
naming the stage and the shard, the finished shards kept."""

from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest

import object2brain as o2b
from explain.helpers import FACE, FACE_POSITIONS, make_composites, planted_model
from object2brain.api.dissect import _detector_and_groups
from object2brain.data.stimuli import load_stimuli
from object2brain.executors import ExecutorError, LocalExecutor, RayExecutor
from object2brain.executors import dissection as sharded
from object2brain.executors.dissection import DissectShards, dissect_shard_folder, shard_path
from object2brain.explain.dissect import DissectResult, compute_dissection
from object2brain.options import DissectOptions, Runtime

N = 12
SEED = 5
EXACT = ["model", "layer", "filter", "group", "p_assign", "p_assign_fdr", "n_images",
         "assigned", "fold"]  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("shards")
    paths = make_composites(folder, n=N)
    ids = [p.stem for p in paths]
    stimuli = folder / "stimuli.csv"
    conditions = ["a" if i % 3 else "b" for i in range(N)]
    pd.DataFrame({"stimulus_id": ids, "path": [str(p) for p in paths],
                  "condition": conditions}).to_csv(stimuli, index=False)  # fmt: skip
    rows = []
    for i, sid in enumerate(ids):
        x, y = FACE_POSITIONS[i % len(FACE_POSITIONS)]
        rows.append([sid, x, y, x + FACE, y + FACE, "Human face"])
        if i % 4:  # a group in 9 of 12 images: donors without it in some draws
            rows.append([sid, 0, 0, 60 + 10 * (i % 4), 50, "Building"])
    boxes = folder / "boxes.csv"
    columns = ["stimulus_id", "x0", "y0", "x1", "y1", "label"]
    pd.DataFrame(rows, columns=columns).to_csv(boxes, index=False)
    options = DissectOptions(layer="features", detector=f"boxes:{boxes}", min_images=2,
                             n_null_assign=99, batch_size=2, num_workers=0)  # fmt: skip
    return {"stimuli": stimuli, "options": options, "boxes": boxes}


def _run(study: dict[str, Any], accumulate: DissectShards | None = None) -> DissectResult:
    options: DissectOptions = study["options"]
    runtime = Runtime(seed=SEED, device="cpu", progress=False)
    detector, groups = _detector_and_groups(options.detector, None, options, runtime)
    return compute_dissection(planted_model(), load_stimuli(study["stimuli"]), detector, groups,
                              options, runtime, accumulate=accumulate)  # fmt: skip


@pytest.fixture(scope="module")
def local(study: dict[str, Any]) -> pd.DataFrame:
    table = _run(study).table
    assert sorted(table["fold"].dropna().unique()) == [0, 1]  # the selection folds are in
    assert table["assigned"].any()  # something to compare: an assignment was made
    assert (table["p_assign"].dropna() < 0.5).any() and (table["p_assign"] > 0.5).any()
    return table


def _same_table(table: pd.DataFrame, local: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(table[EXACT], local[EXACT])  # p-values identical
    for column in ("importance", "enrichment"):
        np.testing.assert_allclose(table[column], local[column], rtol=1e-12, atol=0)


def test_shards_in_this_process_equal_the_local_pass(
    study: dict[str, Any], local: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = DissectShards(LocalExecutor(), tmp_path / "s", batches_per_shard=1)  # 6 shards
    _same_table(_run(study, shards).table, local)
    assert sorted(p.name for p in (tmp_path / "s").glob("shard-*.h5")) == [
        f"shard-{i:05d}.h5" for i in range(6)
    ]
    state = sharded.read_shard(shard_path(tmp_path / "s", 0))
    n_groups, n_filters = local["group"].nunique(), local["filter"].nunique()
    assert state["null/sum"].shape == (99 * n_groups, n_filters)  # R x G rows, K columns
    assert "fold1/null_sum" in state and "pass/top_images" in state
    # a rerun reuses every finished shard; a deleted one is computed again, alone
    computed: list[int] = []
    original = sharded.compute_shard

    def counting(job: Any, index: int) -> int:
        computed.append(index)
        return original(job, index)

    monkeypatch.setattr(sharded, "compute_shard", counting)
    shard_path(tmp_path / "s", 3).unlink()
    _same_table(_run(study, shards).table, local)
    assert computed == [3]
    # the fingerprint follows what the sums depend on: the run's key, the donor permutations
    args = _base_args(study)
    base = sharded._fingerprint_base("x", *args)
    assert base == sharded._fingerprint_base("x", *_base_args(study))  # deterministic
    assert base != sharded._fingerprint_base("y", *args)
    null = args[3]
    null.donors = null.donors[::-1].copy()  # other draws
    assert base != sharded._fingerprint_base("x", *args)


def _base_args(study: dict[str, Any]) -> tuple[Any, ...]:
    """Arguments of the fingerprint, captured from a real pass."""
    captured: dict[str, Any] = {}

    class Capture(DissectShards):
        def __call__(self, cams: Any, prepared: Any, stimuli: Any, options: Any,
                     on_device_decode: bool, null: Any, *, progress: bool,
                     folds: Any = None) -> Any:  # fmt: skip
            captured.update(cams=cams, prepared=prepared, options=options, null=null, folds=folds)
            raise RuntimeError("captured")

    with pytest.raises(RuntimeError, match="captured"):
        _run(study, Capture(LocalExecutor(), Path("unused")))
    c = captured
    return c["cams"], c["prepared"], c["options"], c["null"], c["folds"]


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_shards_equal_the_local_pass(
    ray_cluster: ModuleType, study: dict[str, Any], local: pd.DataFrame, tmp_path: Path,
    workers: int,
) -> None:  # fmt: skip
    shards = DissectShards(RayExecutor(), tmp_path / "s", workers=workers, batches_per_shard=1)
    _same_table(_run(study, shards).table, local)


def test_dissect_api_on_ray(
    ray_cluster: ModuleType, study: dict[str, Any], local: pd.DataFrame, tmp_path: Path
) -> None:
    options: DissectOptions = study["options"]
    out = tmp_path / "dissect"
    result = o2b.dissect(planted_model(), study["stimuli"], options=options, out=out, seed=SEED,
                         device="cpu", progress=False, figures=False, executor="ray")  # fmt: skip
    _same_table(result.table, local)
    assert (out / "filter_objects.csv").is_file()
    assert not dissect_shard_folder(out).exists()  # removed once the tables are written


class _Broken(sharded._ShardActor):
    """Shard 1 always fails (after a pause, so shards already in flight usually finish); the
    others are computed."""

    def compute(self, index: int) -> None:
        if index == 1:
            time.sleep(1.0)
            raise RuntimeError("this node lost its disk")
        super().compute(index)


def test_failed_shard_is_one_error_and_finished_shards_are_kept(
    ray_cluster: ModuleType,
    study: dict[str, Any],
    local: pd.DataFrame,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "s"
    shards = DissectShards(RayExecutor(), folder, workers=1, batches_per_shard=2, max_retries=0)
    monkeypatch.setattr(sharded, "_ShardActor", _Broken)
    failed = r"^dissect: shard\(s\) \[1, 2\] of 3 failed \(shard 1: RuntimeError: this node"
    with pytest.raises(ExecutorError, match=failed):
        _run(study, shards)
    # one worker takes the shards in order: 0 finished and kept, 1 failed, 2 never started
    assert {int(p.name[6:11]) for p in folder.glob("shard-*.h5")} == {0}
    monkeypatch.undo()
    _same_table(_run(study, shards).table, local)  # the rerun completes them

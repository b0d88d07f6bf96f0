"""Extraction on a local Ray cluster: the store equals a local run's (ids, order, attributes,
arrays bit-identical on the CPU) with 1 and 2 workers; a worker killed mid-extraction is
restarted and the store is the same; a failed shard is one error naming it, the finished shards
are kept and a rerun computes only the missing ones; a pool no node can hold is one error that
leaves nothing behind; with int8 the driver calibrates once for all actors, and a driver killed
while calibrating blocks no rerun."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import pytest

import object2brain as o2b
from o2b_testing import PHOTOS
from object2brain.activations.extract import manifest_path, plan_extraction, run_extraction
from object2brain.activations.store import ActivationStore
from object2brain.executors import ExecutorError
from object2brain.executors import extraction as ray_extraction
from object2brain.executors.extraction import extract_on_ray, shard_folder, shard_ranges
from object2brain.executors.pool import PoolSettings
from object2brain.models import quantize
from object2brain.models.zoo import load_model
from object2brain.options import ExtractOptions, Runtime

NAMES = list(PHOTOS)[:6]
IDS = [f"s{i:02d}_{name}" for i, name in enumerate(NAMES)]


@pytest.fixture(scope="module")
def table(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("table") / "stimuli.csv"
    rows = [
        {"stimulus_id": i, "path": str(photo_dir / f"{n}.jpg")}
        for i, n in zip(IDS, NAMES, strict=True)
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def plan(table: Path) -> Any:
    stimuli = o2b.load_stimuli(table)
    model = load_model("resnet18", "none", seed=3)
    options = ExtractOptions(batch_size=2, srp=64, num_workers=0)
    runtime = Runtime(seed=5, device="cpu", progress=False)
    return plan_extraction(model, stimuli, ["layer1", "layer4", "fc"], options, runtime)


@pytest.fixture(scope="module")
def local_store(plan: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_extraction(plan, tmp_path_factory.mktemp("local") / "acts.h5")


def _same_store(a: Path, b: Path) -> None:
    with ActivationStore.open(a) as x, ActivationStore.open(b) as y:
        assert x.stimulus_ids == y.stimulus_ids == IDS
        assert x.layers == y.layers
        assert x.attrs == y.attrs  # fingerprint, order, srp, model, weights, preprocessing ...
        for layer in x.layers:
            ax, ay = x.read(layer), y.read(layer)
            assert ax.dtype == ay.dtype and ax.shape == ay.shape
            assert ax.tobytes() == ay.tobytes(), layer  # bit-identical
    ma, mb = (o2b_manifest(p) for p in (a, b))
    assert ma == mb


def o2b_manifest(store: Path) -> dict[str, Any]:
    import json

    manifest = json.loads(manifest_path(store).read_text())
    for volatile in ("created", "seconds", "out", "outputs", "host", "elapsed"):
        manifest.pop(volatile, None)
        manifest.get("config", {}).pop(volatile, None)
        manifest.get("extra", {}).pop(volatile, None)
    return manifest


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_store_equals_local(
    ray_cluster: ModuleType, plan: Any, local_store: Path, tmp_path: Path, workers: int
) -> None:
    out = tmp_path / "acts.h5"
    settings = PoolSettings(workers=workers)
    assert len(shard_ranges(len(IDS), 2, 2)) == 3  # 3 shards of one batch each
    assert extract_on_ray(plan, out, settings=settings, shard_size=2) == out
    _same_store(out, local_store)
    assert not shard_folder(out).exists()  # removed once the store is complete


def test_extract_api_on_ray_equals_local(
    ray_cluster: ModuleType, table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def recorded(plan: Any, out: Path, **kwargs: Any) -> Path:
        calls.append(out)
        return extract_on_ray(plan, out, **kwargs)

    monkeypatch.setattr(ray_extraction, "extract_on_ray", recorded)
    common: dict[str, Any] = {
        "layers": ["layer1", "fc"],
        "batch_size": 2,
        "srp": 64,
        "num_workers": 0,
        "seed": 5,
        "device": "cpu",
        "progress": False,
    }
    model = load_model("resnet18", "none", seed=3)
    local = o2b.extract(model, table, out=tmp_path / "local.h5", **common)
    on_ray = o2b.extract(model, table, out=tmp_path / "ray.h5", executor="ray", **common)
    assert calls == [tmp_path / "ray.h5"]  # the API went through the pool, the local run not
    _same_store(on_ray, local)  # one shard here: 6 stimuli, 8 batches of 2 per shard
    assert not shard_folder(on_ray).exists()


def test_shards_hold_whole_batches() -> None:
    assert [(r.start, r.stop) for r in shard_ranges(7, 2, 3)] == [(0, 4), (4, 7)]
    assert [(r.start, r.stop) for r in shard_ranges(5, 4)] == [(0, 5)]


class _DiesOnce(ray_extraction._ShardActor):
    """An actor whose process exits on its first shard, once (a marker file remembers)."""

    def compute(self, index: int) -> None:
        marker = self.folder.parent / "killed-once"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # the worker process dies mid-extraction
        super().compute(index)


def test_killed_worker_is_restarted_same_store(
    ray_cluster: ModuleType,
    plan: Any,
    local_store: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ray_extraction, "_ShardActor", _DiesOnce)
    out = tmp_path / "acts.h5"
    extract_on_ray(plan, out, settings=PoolSettings(workers=2), shard_size=2)
    assert (tmp_path / "killed-once").is_file()  # a worker did die
    _same_store(out, local_store)


class _Broken(ray_extraction._ShardActor):
    """Shard 1 always fails; the others are computed."""

    def compute(self, index: int) -> None:
        if index == 1:
            time.sleep(1.0)  # shards already in flight usually finish first
            raise RuntimeError("this node lost its disk")
        super().compute(index)


def test_failed_shard_keeps_finished_ones_and_rerun_redoes_only_it(
    ray_cluster: ModuleType,
    plan: Any,
    local_store: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "acts.h5"
    settings = PoolSettings(workers=1, max_retries=0)
    monkeypatch.setattr(ray_extraction, "_ShardActor", _Broken)
    failed = r"extract: shard\(s\) \[[0-9, ]*\] of 3 failed \(shard 1: RuntimeError: this node lost"
    with pytest.raises(ExecutorError, match=failed) as err:
        extract_on_ray(plan, out, settings=settings, shard_size=2)
    assert not out.exists()
    # one worker takes the shards in order: 0 is finished and kept, 1 fails, 2 is never started
    named = {int(i) for i in re.search(r"\[([0-9, ]*)\]", str(err.value)).group(1).split(",")}
    kept = {int(p.name[6:11]) for p in shard_folder(out).glob("shard-*.h5")}
    assert named == {1, 2} and kept == {0}
    ranges = shard_ranges(len(IDS), 2, 2)
    assert ray_extraction._missing_shards(plan, shard_folder(out), ranges) == [1, 2]
    monkeypatch.setattr(ray_extraction, "_ShardActor", _Counting)
    extract_on_ray(plan, out, settings=settings, shard_size=2)
    done = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("computed-*"))
    assert done == [1, 2]  # the rerun computed the missing shards only
    _same_store(out, local_store)


class _Counting(ray_extraction._ShardActor):
    """Leaves a marker file next to the shard folder for each shard it computes."""

    def compute(self, index: int) -> None:
        (self.folder.parent / f"computed-{index}").write_text("")
        super().compute(index)


def _count_calibrations(folder: Path) -> Any:
    """A stand-in for ``quantize.calibrate`` that leaves ``calibrated-<pid>-<n>`` in ``folder``
    for each calibrating pass in its process, then calibrates."""
    original = quantize.calibrate

    def counted(prepared: Any, batches: Any) -> None:
        (folder / f"calibrated-{os.getpid()}-{time.monotonic_ns()}").write_text("")
        original(prepared, batches)

    return counted


class _CountsCalibrations(ray_extraction._ShardActor):
    """Counts the calibrations of its process next to the shard folder."""

    def setup(self, job: Any) -> None:
        super().setup(job)
        quantize.calibrate = _count_calibrations(self.folder.parent)  # this actor's process


class _StartTogether(_CountsCalibrations):
    """Each shard waits until two shards have arrived: two actors compute at the same time (the
    case where each actor used to calibrate)."""

    def compute(self, index: int) -> None:
        meeting = self.folder.parent
        (meeting / f"arrived-{index}-{os.getpid()}").write_text("")
        deadline = time.monotonic() + 60.0
        while len(list(meeting.glob("arrived-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        super().compute(index)


INT8 = {"batch_size": 2, "num_workers": 0, "quantize": "int8"}


def _int8_plan(table: Path) -> Any:
    stimuli = o2b.load_stimuli(table)
    runtime = Runtime(seed=5, device="cpu", progress=False)
    model = load_model("resnet18", "none", seed=3)
    return plan_extraction(model, stimuli, ["layer1", "fc"], ExtractOptions(**INT8), runtime)


@pytest.fixture(scope="module")
def int8_local(table: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local int8 run's store (calibrated in this process, its own cache file)."""
    return run_extraction(_int8_plan(table), tmp_path_factory.mktemp("int8") / "acts.h5")


def test_int8_calibrated_once_for_all_actors(
    ray_cluster: ModuleType,
    table: Path,
    int8_local: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The driver calibrates once before the pool starts; two actors computing at the same time
    read its cache (0 calibrations in the actors), and the store equals a local int8 run's bit
    for bit. A rerun calibrates nowhere."""
    int8 = _int8_plan(table)
    monkeypatch.setattr(quantize, "calibrate", _count_calibrations(tmp_path))
    monkeypatch.setattr(ray_extraction, "_ShardActor", _StartTogether)
    out = tmp_path / "acts.h5"
    extract_on_ray(int8, out, settings=PoolSettings(workers=2), shard_size=2)
    arrived = {p.name.split("-")[2] for p in tmp_path.glob("arrived-*")}
    assert len(arrived) == 2 and len(list(tmp_path.glob("arrived-*"))) == 3  # 2 actors, 3 shards
    calibrated = [p.name.split("-")[1] for p in tmp_path.glob("calibrated-*")]
    assert calibrated == [str(os.getpid())]  # once, in the driver
    assert (tmp_path / "acts.h5.int8.safetensors").is_file()  # the cache the actors read
    _same_store(out, int8_local)
    # a rerun (store removed, cache kept): no calibration in the driver or the actor
    out.unlink()
    manifest_path(out).unlink()
    monkeypatch.setattr(ray_extraction, "_ShardActor", _CountsCalibrations)
    extract_on_ray(int8, out, settings=PoolSettings(workers=1), shard_size=6)
    assert len(list(tmp_path.glob("calibrated-*"))) == 1
    _same_store(out, int8_local)


KILLED_WHILE_CALIBRATING = """
import sys, time
from pathlib import Path
sys.path[:0] = sys.argv[3].split("|")
import test_extraction as t
from object2brain.executors.extraction import extract_on_ray
from object2brain.models import quantize
def stuck(prepared, batches):
    Path(sys.argv[2]).write_text("calibrating")
    time.sleep(600)
quantize.calibrate = stuck
extract_on_ray(t._int8_plan(Path(sys.argv[1])), Path(sys.argv[2]).parent / "acts.h5")
"""


def test_driver_killed_while_calibrating_blocks_no_rerun(
    ray_cluster: ModuleType,
    table: Path,
    int8_local: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A driver killed (SIGKILL) in the middle of the calibration, holding the store's lock,
    leaves no cache and no held lock: the rerun does not wait, calibrates once and writes the
    local int8 run's store."""
    import signal
    import subprocess
    import sys

    marker = tmp_path / "calibrating"
    paths = "|".join([str(Path(__file__).parent), *sys.path])
    driver = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_CALIBRATING, str(table),
                               str(marker), paths])  # fmt: skip
    try:
        deadline = time.monotonic() + 120.0
        while not marker.exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the driver never reached the calibration"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    out = tmp_path / "acts.h5"
    assert not (tmp_path / "acts.h5.int8.safetensors").exists()
    assert not list(tmp_path.glob(".acts.h5.int8*"))  # no temporary cache file either
    monkeypatch.setattr(quantize, "calibrate", _count_calibrations(tmp_path))
    monkeypatch.setattr(ray_extraction, "_ShardActor", _CountsCalibrations)
    started = time.monotonic()
    extract_on_ray(_int8_plan(table), out, settings=PoolSettings(workers=1), shard_size=6)
    assert time.monotonic() - started < 120.0
    assert [p.name.split("-")[1] for p in tmp_path.glob("calibrated-*")] == [str(os.getpid())]
    _same_store(out, int8_local)


def test_unplaceable_pool_is_one_error_and_leaves_nothing(
    ray_cluster: ModuleType, plan: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OBJECT2BRAIN_RAY_PLACEMENT_TIMEOUT", raising=False)
    out = tmp_path / "acts.h5"
    asks = r"^extract: no node of the Ray cluster can hold one actor of the pool: each actor asks for 4 CPUs, 0 GPUs; the Ray cluster has 2 CPUs, 0 GPUs"  # noqa: E501
    with pytest.raises(ExecutorError, match=asks):
        extract_on_ray(plan, out, settings=PoolSettings(cpus_per_worker=4.0), shard_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, shards or lock left

"""Extraction writes exactly what a direct forward pass computes, resumes, and fails cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import object2brain as o2b
from object2brain.activations.store import ActivationStore, StoreWriter, partial_path
from object2brain.api.extract import extract
from object2brain.data.images import load_image
from object2brain.errors import StoreError
from object2brain.heads.io import save_head
from object2brain.models.zoo import LoadedModel, load_model


def direct_forward(
    model: LoadedModel, paths: list[Path], names: list[str]
) -> dict[str, np.ndarray]:
    """Reference: one forward pass over all images with hooks written here, independently."""
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.module.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().clone())
        )
        for name in names
    ]
    transform = model.preprocessing.transform()
    batch = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        output = model.module(batch)
    for handle in handles:
        handle.remove()
    result = {name: t.numpy() for name, t in captured.items()}
    result["__output__"] = output.numpy()
    return result


@pytest.mark.parametrize(
    ("arch", "weights"),
    [
        ("alexnet", "none"),
        ("vgg16", "none"),
        ("resnet18", "none"),
        ("efficientnet_lite0", "default"),
    ],
)
def test_store_equals_direct_forward(
    arch: str, weights: str, stimulus_table: Path, tmp_path: Path
) -> None:
    stimuli = o2b.load_stimuli(stimulus_table).subset(
        ["s00_coffee", "s01_chelsea", "s02_astronaut", "s05_cat", "s07_page"]
    )
    model = load_model(arch, weights, seed=7)
    out = extract(model, stimuli, out=tmp_path / "acts.h5", batch_size=2, progress=False)
    names = o2b.list_layers(model)
    reference = direct_forward(model, stimuli.paths, [info.name for info in names])
    with ActivationStore.open(out) as store:
        assert store.stimulus_ids == stimuli.ids
        assert store.layers == [info.name for info in names]
        attrs = store.attrs
        assert attrs["complete"] is True or attrs["complete"] == 1
        assert attrs["arch"] == arch and attrs["model"] == arch
        assert attrs["weights_sha256"] == model.weights_sha256
        assert attrs["preprocessing"]["crop_size"] == 224
        assert attrs["object2brain_version"] == o2b.__version__
        for name in store.layers:
            stored = store.read(name)
            assert stored.dtype == np.float32
            assert stored.shape == reference[name].shape
            # float rounding: the store's channels_last convolutions (the default) sum in
            # another order than the reference's contiguous ones (~3e-6 of a layer's largest
            # value), so the tolerance scales with the layer
            scale = max(float(np.abs(reference[name]).max()), 1.0)
            np.testing.assert_allclose(stored, reference[name], rtol=0, atol=1e-5 * scale)
    assert (tmp_path / "acts.manifest.json").is_file()
    assert not partial_path(out).exists()


def test_float16_storage_and_layer_subset(stimulus_table: Path, tmp_path: Path) -> None:
    model = load_model("resnet18", "none", seed=0)
    out = extract(
        model,
        stimulus_table,
        out=tmp_path / "a.h5",
        layers="layer4,fc",
        dtype="float16",
        progress=False,
    )
    stimuli = o2b.load_stimuli(stimulus_table)
    reference = direct_forward(model, stimuli.paths, ["layer4", "fc"])
    with ActivationStore.open(out) as store:
        assert store.layers == ["layer4", "fc"]
        stored = store.read("fc")
        assert stored.dtype == np.float16
        np.testing.assert_allclose(stored, reference["fc"], rtol=2e-3, atol=2e-3)
        # rows can be read back by id, in any order
        picked = store.read("fc", ids=["s05_cat", "s00_coffee"])
        np.testing.assert_array_equal(picked, stored[[5, 0]])


def test_values_beyond_float16_range_are_refused(stimulus_table: Path, tmp_path: Path) -> None:
    """float16 storage would turn them into inf silently; float32 stores them."""
    model = load_model("resnet18", "none", seed=0)
    with torch.no_grad():
        model.module.conv1.weight.mul_(1e6)
    with pytest.raises(StoreError, match=r"layer 'conv1': activations beyond float16's range"):
        extract(model, stimulus_table, out=tmp_path / "a.h5", layers="conv1", dtype="float16",
                progress=False)  # fmt: skip
    stored = extract(model, stimulus_table, out=tmp_path / "b.h5", layers="conv1", progress=False)
    with ActivationStore.open(stored) as store:
        assert np.abs(store.read("conv1")).max() > 65504


def test_valence_head_adds_valence_layer(stimulus_table: Path, tmp_path: Path) -> None:
    head = nn.Linear(512, 1)
    torch.nn.init.normal_(head.weight, std=0.05)
    path = save_head(
        head, tmp_path / "head.safetensors", {"arch": "resnet18", "replaced_layer": "fc"}
    )
    model = load_model("resnet18", "none", seed=0, head=path)
    out = extract(model, stimulus_table, out=tmp_path / "v.h5", progress=False)
    reference = direct_forward(
        load_model("resnet18", "none", seed=0), o2b.load_stimuli(stimulus_table).paths, ["avgpool"]
    )
    expected = (
        reference["avgpool"].reshape(8, 512) @ head.weight.detach().numpy().T
        + head.bias.detach().numpy()
    )
    with ActivationStore.open(out) as store:
        assert store.layers[-1] == "valence" and "fc" not in store.layers
        valence = store.read("valence")
        assert valence.shape == (8,)
        np.testing.assert_allclose(valence, expected[:, 0], atol=1e-5)
        assert store.attrs["head"]["replaced_layer"] == "fc"


def test_head_for_wrong_model_is_rejected(tmp_path: Path) -> None:
    path = save_head(nn.Linear(512, 1), tmp_path / "h.safetensors", {"arch": "resnet18"})
    with pytest.raises(o2b.Object2BrainError, match="trained for resnet18"):
        load_model("alexnet", "none", head=path)
    path = save_head(nn.Linear(100, 1), tmp_path / "h2.safetensors", {"arch": "resnet18"})
    with pytest.raises(o2b.Object2BrainError, match="expects 100 input features"):
        load_model("resnet18", "none", head=path)


def _datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        out = {f"layers/{k}": handle["layers"][k][()] for k in handle["layers"]}
        out["stimulus_ids"] = handle["stimulus_ids"][()]
        return out


def test_resume_after_interruption_gives_identical_store(
    stimulus_table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model("alexnet", "none", seed=1)
    full = extract(model, stimulus_table, out=tmp_path / "full.h5", batch_size=3, progress=False)

    original = StoreWriter.write_rows
    calls = {"n": 0}

    def interrupted(self: StoreWriter, start: int, blocks: dict[str, np.ndarray]) -> None:
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        original(self, start, blocks)

    monkeypatch.setattr(StoreWriter, "write_rows", interrupted)
    target = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(model, stimulus_table, out=target, batch_size=3, progress=False)
    assert not target.exists() and partial_path(target).exists()
    with h5py.File(partial_path(target), "r") as handle:
        assert int(handle.attrs["n_done"]) == 6 and not handle.attrs["complete"]
    monkeypatch.setattr(StoreWriter, "write_rows", original)

    written: list[int] = []
    monkeypatch.setattr(
        StoreWriter,
        "write_rows",
        lambda self, start, blocks: (written.append(start), original(self, start, blocks))[1],
    )
    extract(model, stimulus_table, out=target, batch_size=3, progress=False)
    assert written == [6]  # only the unfinished batch was recomputed
    reference, resumed = _datasets(full), _datasets(target)
    assert reference.keys() == resumed.keys()
    for key in reference:
        np.testing.assert_array_equal(reference[key], resumed[key])


def test_batches_before_a_failing_one_are_written_and_resumed(
    stimulus_table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches are written on a background thread: a failure in the main loop (an image that
    cannot be decoded, in the third batch) still leaves the two batches before it written, and the
    next run resumes there."""
    # image input lives in models.inputs
    extract_module = sys.modules["object2brain.models.inputs"]

    model = load_model("alexnet", "none", seed=1)
    full = extract(model, stimulus_table, out=tmp_path / "full.h5", batch_size=3, progress=False)
    bad = o2b.load_stimuli(stimulus_table)
    bad_path, bad_id = bad.paths[7], bad.ids[7]

    def failing(path: str | Path) -> object:
        if Path(path) == bad_path:
            raise OSError("truncated file")
        return load_image(path)

    monkeypatch.setattr(extract_module, "load_image", failing)
    target = tmp_path / "resumed.h5"
    with pytest.raises(o2b.Object2BrainError, match=bad_id):
        extract(model, stimulus_table, out=target, batch_size=3, progress=False, num_workers=0)
    with h5py.File(partial_path(target), "r") as handle:
        assert int(handle.attrs["n_done"]) == 6
    monkeypatch.setattr(extract_module, "load_image", load_image)
    written: list[int] = []
    original = StoreWriter.write_rows
    monkeypatch.setattr(
        StoreWriter,
        "write_rows",
        lambda self, start, blocks: (written.append(start), original(self, start, blocks))[1],
    )
    extract(model, stimulus_table, out=target, batch_size=3, progress=False, num_workers=0)
    assert written == [6]
    reference, resumed = _datasets(full), _datasets(target)
    for key in reference:
        np.testing.assert_array_equal(reference[key], resumed[key])


def test_resume_after_sigkill(stimulus_table: Path, tmp_path: Path) -> None:
    """A real killed process: the partial store is resumed (or, if torn, restarted) correctly."""
    # 40 stimuli in batches of 1, so the kill lands well before the end on any machine
    frame = pd.read_csv(stimulus_table)
    frame = pd.concat(
        [frame.assign(stimulus_id=frame["stimulus_id"] + f"_{copy}") for copy in range(5)]
    )
    stimulus_table = stimulus_table.with_name("stimuli40.csv")
    frame.to_csv(stimulus_table, index=False)
    target = tmp_path / "killed.h5"
    command = [
        sys.executable,
        "-c",
        "import sys; from object2brain.cli import main; main(sys.argv[1:])",
        "extract",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--stimuli",
        str(stimulus_table),
        "--out",
        str(target),
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--quiet",
    ]
    process = subprocess.Popen(command, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline:
        if partial_path(target).exists():
            try:
                with h5py.File(partial_path(target), "r", locking=False) as handle:
                    if int(handle.attrs.get("n_done", 0)) >= 2:
                        break
            except (OSError, KeyError):
                pass
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not target.exists() and partial_path(target).exists()
    from object2brain.cli import main

    main(command[3:])  # the same command again resumes and completes
    assert target.exists() and not partial_path(target).exists()
    full = extract(
        load_model("resnet18", "none"),
        stimulus_table,
        out=tmp_path / "full.h5",
        batch_size=1,
        num_workers=0,
        progress=False,
    )
    reference, resumed = _datasets(full), _datasets(target)
    for key in reference:
        np.testing.assert_array_equal(reference[key], resumed[key])


def test_complete_store_is_not_recomputed(stimulus_table: Path, tmp_path: Path) -> None:
    model = load_model("resnet18", "none")
    out = extract(model, stimulus_table, out=tmp_path / "a.h5", layers="fc", progress=False)
    stamp = out.stat().st_mtime_ns
    extract(model, stimulus_table, out=out, layers="fc", progress=False)
    assert out.stat().st_mtime_ns == stamp
    with pytest.raises(o2b.Object2BrainError, match="--overwrite"):
        extract(model, stimulus_table, out=out, layers="layer4", progress=False)
    extract(model, stimulus_table, out=out, layers="layer4", progress=False, overwrite=True)
    with ActivationStore.open(out) as store:
        assert store.layers == ["layer4"]


def test_cpu_lanes_store_the_values_of_one_batch_at_a_time(
    stimulus_table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches side by side on the CPU (two lanes with one intra-op thread each) store bit
    for bit what one batch at a time over both threads stores, rows in order; torch's thread count
    is what it was afterwards."""
    import threading

    import object2brain.activations.extract as extract_module

    model = load_model("resnet18", "none", seed=0)
    names: list[set[str]] = []
    original = extract_module._BatchCompute.__call__

    def spy(self: object, indices: torch.Tensor, inputs: torch.Tensor) -> object:
        names[-1].add(threading.current_thread().name.split("_")[0])
        return original(self, indices, inputs)  # type: ignore[arg-type]

    monkeypatch.setattr(extract_module._BatchCompute, "__call__", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert extract_module.cpu_lanes(torch.device("cpu")) == 2
        stores = {}
        for lanes in (2, 1):
            monkeypatch.setattr(extract_module, "MAX_CPU_LANES", lanes)
            names.append(set())
            stores[lanes] = extract(model, stimulus_table, out=tmp_path / f"{lanes}.h5",
                                    batch_size=3, progress=False, num_workers=0)  # fmt: skip
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert names == [{"o2b-lane"}, {"MainThread"}]
    lanes, single = _datasets(stores[2]), _datasets(stores[1])
    assert lanes.keys() == single.keys()
    for key in single:
        np.testing.assert_array_equal(lanes[key], single[key])


def test_lanes_hand_batches_on_in_order_and_errors_at_their_batch() -> None:
    """:func:`in_lanes` yields in batch order whichever lane finishes first; a lane's error is
    raised at its batch (the batches before it handed on); an error of the batch source after
    the batches before it."""
    from object2brain.activations.extract import in_lanes

    def compute(indices: torch.Tensor, _inputs: torch.Tensor) -> int:
        first = int(indices[0])
        time.sleep(0.03 if first % 3 == 0 else 0.0)  # later batches often finish first
        if first == 12:
            raise ValueError("batch 12")
        return first

    def source(n: int, error: bool = False) -> object:
        for i in range(n):
            yield torch.tensor([i]), torch.zeros(1)
        if error:
            raise OSError("unreadable image")

    def collect(results: object, got: list[int]) -> None:
        for result in results:  # type: ignore[attr-defined]
            got.append(result)

    threads = torch.get_num_threads()
    for lanes in (1, 2, 3):
        got: list[int] = []
        with pytest.raises(ValueError, match="batch 12"):
            collect(in_lanes(compute, source(20), lanes), got)  # type: ignore[arg-type]
        assert got == list(range(12)), lanes
        got = []
        with pytest.raises(OSError, match="unreadable"):
            collect(in_lanes(compute, source(7, error=True), lanes), got)  # type: ignore[arg-type]
        assert got == list(range(7)), lanes
        assert torch.get_num_threads() == threads


def test_a_network_hooked_by_someone_else_runs_one_batch_at_a_time(
    stimulus_table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hooks registered on the network before extraction (the study's head-input capture, a
    user's own) see the batches one after the other in store order: no lanes then."""
    import threading

    import object2brain.activations.extract as extract_module

    model = load_model("resnet18", "none", seed=0)
    assert not extract_module.has_forward_hooks(model.module)
    seen: list[torch.Tensor] = []

    def keep(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if type(inputs[0]) is torch.Tensor:  # not the probe's fake-tensor pass
            seen.append(inputs[0].clone())

    handle = model.module.fc.register_forward_pre_hook(keep)
    assert extract_module.has_forward_hooks(model.module)
    names: set[str] = set()
    original = extract_module._BatchCompute.__call__

    def spy(self: object, indices: torch.Tensor, inputs: torch.Tensor) -> object:
        names.add(threading.current_thread().name)
        return original(self, indices, inputs)  # type: ignore[arg-type]

    monkeypatch.setattr(extract_module._BatchCompute, "__call__", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = extract(model, stimulus_table, out=tmp_path / "hooked.h5", layers=["avgpool"],
                      batch_size=3, progress=False, num_workers=0)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
        handle.remove()
    assert names == {"MainThread"}
    with ActivationStore.open(out) as store:  # the hook's batches in store order
        np.testing.assert_array_equal(
            torch.cat(seen).numpy(), store.read("avgpool").reshape(len(store.stimulus_ids), -1)
        )

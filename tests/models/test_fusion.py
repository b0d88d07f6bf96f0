"""Batch-norm folding: same function up to float rounding, module names kept, hooks unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import object2brain as o2b
from object2brain.activations.store import ActivationStore
from object2brain.errors import LayerError
from object2brain.models.fusion import fold_batchnorm, foldable_pairs
from object2brain.models.layers import LayerRecorder
from object2brain.models.zoo import load_model

LAYERS = ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]


def _trained_stats(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine terms, so a wrong fold cannot pass as identity."""
    rng = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, nn.BatchNorm2d):
            n = sub.num_features
            sub.running_mean.copy_(torch.randn(n, generator=rng) * 0.1)  # type: ignore[union-attr]
            sub.running_var.copy_(torch.rand(n, generator=rng) + 0.5)  # type: ignore[union-attr]
            sub.weight.data.copy_(torch.rand(n, generator=rng) + 0.5)
            sub.bias.data.copy_(torch.randn(n, generator=rng) * 0.1)
    return module.eval()


def _record(module: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    with LayerRecorder(module, names) as recorder, torch.inference_mode():
        module(x)
        return {k: v.clone() for k, v in recorder.outputs.items()}


def test_folded_resnet_equals_unfolded_to_rounding() -> None:
    loaded = load_model("resnet18", "none", seed=0)
    module = _trained_stats(loaded.module)
    names = [*LAYERS, "layer1.0.bn1"]
    folded, count = fold_batchnorm(module, keep=names)
    assert count == 20  # 17 conv+bn pairs of the blocks and stem, 3 downsample pairs
    assert isinstance(folded.get_submodule("layer1.0.bn1"), nn.Identity)
    assert isinstance(module.get_submodule("layer1.0.bn1"), nn.BatchNorm2d)  # original kept
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference, out = _record(module, names, x), _record(folded, names, x)
    for name in names:
        scale = float(reference[name].abs().max())
        error = float((reference[name] - out[name]).abs().max()) / scale
        assert error < 1e-5, (name, error)


def test_recorded_convolution_is_not_folded() -> None:
    module = _trained_stats(load_model("resnet18", "none", seed=0).module)
    pairs = foldable_pairs(module, keep=["layer2.0.conv1"])
    assert ("layer2.0.conv1", "layer2.0.bn1") not in pairs
    assert ("layer2.0.conv2", "layer2.0.bn2") in pairs
    x = torch.randn(2, 3, 64, 64)
    folded, _ = fold_batchnorm(module, keep=["layer2.0.conv1"])
    a = _record(module, ["layer2.0.conv1", "layer2.0.bn1"], x)
    b = _record(folded, ["layer2.0.conv1"], x)["layer2.0.conv1"]
    scale = float(a["layer2.0.conv1"].abs().max())
    # the raw convolution output (upstream folds round differently), not the normalised one
    assert float((a["layer2.0.conv1"] - b).abs().max()) < 1e-5 * scale
    assert float((a["layer2.0.bn1"] - b).abs().max()) > 0.1 * scale


def test_shared_convolution_output_is_not_folded() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # y feeds the sum too: folding would change it

    assert foldable_pairs(Branch().eval()) == []


def test_untraceable_network_is_a_clear_error() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.bn(self.conv(x))
            return x

    with pytest.raises(LayerError, match="fold_batchnorm"):
        fold_batchnorm(DataDependent().eval())


def test_extract_with_folding_close_to_default_and_fingerprinted(
    stimulus_table: Path, tmp_path: Path
) -> None:
    model = load_model("resnet18", "none", seed=0)
    _trained_stats(model.module)
    plain = o2b.extract(model, stimulus_table, out=tmp_path / "a.h5", layers=LAYERS,
                        device="cpu", batch_size=4, progress=False)  # fmt: skip
    folded = o2b.extract(model, stimulus_table, out=tmp_path / "b.h5", layers=LAYERS,
                         device="cpu", batch_size=4, progress=False,
                         fold_batchnorm=True)  # fmt: skip
    assert isinstance(model.module.get_submodule("bn1"), nn.BatchNorm2d)  # model unchanged
    with ActivationStore.open(plain) as a, ActivationStore.open(folded) as b:
        assert a.attrs["fingerprint"] != b.attrs["fingerprint"]
        for name in LAYERS:
            x, y = a.read(name), b.read(name)
            assert np.abs(x - y).max() <= 1e-5 * np.abs(x).max(), name
        assert not np.array_equal(a.read("layer4"), b.read("layer4"))  # it did fold

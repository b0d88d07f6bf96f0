"""The layer probe runs on fake tensors (no arithmetic) and still finds every bad layer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from object2brain.activations import extract as extract_module
from object2brain.activations.extract import probe_layers
from object2brain.errors import LayerError
from object2brain.models.zoo import LoadedModel, Preprocessing, load_model


def _calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    calls: list[bool] = []
    real = extract_module._probe_pass

    def spy(*args: Any, fake: bool) -> list[str]:
        calls.append(fake)
        return real(*args, fake=fake)

    monkeypatch.setattr(extract_module, "_probe_pass", spy)
    return calls


def test_probe_finds_shared_and_silent_modules_on_fake_tensors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _calls(monkeypatch)
    loaded = load_model("resnet18", "none", seed=0)
    probe_layers(loaded, ["layer1", "layer4", "fc"], torch.device("cpu"))
    with pytest.raises(LayerError, match="more than once"):
        probe_layers(loaded, ["layer4.1.relu"], torch.device("cpu"))
    assert calls == [True, True]  # no real forward pass was needed


class _DataDependent(nn.Module):
    """A network fake tensors cannot run (its output shape depends on the values)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[y >= y.min()].reshape(1, -1)


def test_probe_falls_back_to_a_real_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _calls(monkeypatch)
    loaded = LoadedModel(_DataDependent().eval(), "toy", "none", "0" * 64,
                         Preprocessing(resize_size=16, crop_size=16))  # fmt: skip
    probe_layers(loaded, ["conv"], torch.device("cpu"))
    assert calls == [True, False]
    with pytest.raises(LayerError, match="did not run"):
        probe_layers(loaded, ["unused"], torch.device("cpu"))

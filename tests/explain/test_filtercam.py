"""Per-filter Grad-CAM: the Grad-CAM identity against pytorch-grad-cam, directions, bad layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from object2brain.errors import LayerError, ModelError
from object2brain.explain.filtercam import (
    GradCAMHook,
    filter_cams,
    gradcam_map,
    upsample_maps,
)
from object2brain.heads.io import save_head
from object2brain.models.zoo import load_model


def _with_head(arch: str, weights: str, in_features: int, layer: str, tmp: Path) -> object:
    torch.manual_seed(1)
    head = nn.Linear(in_features, 1)
    path = save_head(head, tmp / f"{arch}.safetensors", {"arch": arch, "replaced_layer": layer})
    return load_model(arch, weights, head=path)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> object:
    return _with_head("resnet18", "none", 512, "fc", tmp_path_factory.mktemp("head"))


def _reference_gradcam(module: nn.Module, layer: str, x: torch.Tensor) -> np.ndarray:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    target_layer = module.get_submodule(layer)
    # The model is frozen: let the input require grad so pytorch-grad-cam sees gradients.
    with GradCAM(model=module, target_layers=[target_layer]) as cam:
        maps = cam(
            input_tensor=x.clone().requires_grad_(True),
            targets=[ClassifierOutputTarget(0)] * len(x),
        )
    return np.asarray(maps)


def _normalise(maps: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    return ((flat - low) / (high - low + 1e-7)).reshape(maps.shape)


def _check_identity(module: nn.Module, layer: str, x: torch.Tensor) -> None:
    ours = filter_cams(module, layer, x, direction="signed")
    summed = gradcam_map(ours.maps)[:, None]
    up = upsample_maps(summed, tuple(x.shape[-2:]))[:, 0].numpy()
    ref = _reference_gradcam(module, layer, x)
    assert ref.shape == up.shape
    a, b = _normalise(up), _normalise(ref)
    for i in range(len(x)):
        assert np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] > 0.999
    assert np.abs(a - b).max() < 0.02


def test_sum_of_filter_maps_is_pytorch_grad_cam(resnet: object) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 3, 128, 128)
    _check_identity(resnet.module, "layer4", x)  # type: ignore[attr-defined]


def test_grad_cam_identity_on_real_weights(tmp_path: Path, photo_dir: Path) -> None:
    from object2brain.data.images import load_image

    model = _with_head("efficientnet_lite0", "default", 1280, "_fc", tmp_path)
    transform = model.preprocessing.transform()  # type: ignore[attr-defined]
    x = torch.stack(
        [transform(load_image(photo_dir / f"{n}.jpg")) for n in ("astronaut", "chelsea")]
    )
    _check_identity(model.module, "_blocks.15", x)  # type: ignore[attr-defined]


def test_directions_and_one_pass(resnet: object) -> None:
    module = resnet.module  # type: ignore[attr-defined]
    calls = {"forward": 0}
    handle = module.register_forward_hook(
        lambda *_: calls.__setitem__("forward", calls["forward"] + 1)
    )
    try:
        x = torch.randn(2, 3, 96, 96)
        signed = filter_cams(module, "layer4", x, direction="signed")
        assert calls["forward"] == 1
        pos = filter_cams(module, "layer4", x, direction="positive").maps
        neg = filter_cams(module, "layer4", x, direction="negative").maps
        both = filter_cams(module, "layer4", x, direction="abs").maps
    finally:
        handle.remove()
    assert signed.maps.shape == (2, 512, 3, 3)
    assert signed.alpha.shape == (2, 512)
    torch.testing.assert_close(pos - neg, signed.maps)
    torch.testing.assert_close(pos + neg, both)
    assert (pos >= 0).all() and (neg >= 0).all()
    torch.testing.assert_close(signed.scores, module(x)[:, 0])
    # The network stays frozen and leaves no hooks or gradients behind.
    assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    assert not module.get_submodule("layer4")._forward_hooks


def test_fc_layer_is_rejected_clearly(resnet: object) -> None:
    with pytest.raises(LayerError, match=r"'fc'.*not spatial maps"):
        filter_cams(resnet.module, "fc", torch.randn(1, 3, 64, 64))  # type: ignore[attr-defined]
    assert not resnet.module.get_submodule("fc")._forward_hooks  # type: ignore[attr-defined]


def test_no_head_needs_target() -> None:
    model = load_model("resnet18", "none")
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ModelError, match="--target"):
        filter_cams(model.module, "layer4", x)
    cams = filter_cams(model.module, "layer4", x, target=7)
    torch.testing.assert_close(cams.scores, model.module(x)[:, 7])
    with pytest.raises(ModelError, match=r"0\.\.999"):
        filter_cams(model.module, "layer4", x, target=1000)


def test_hook_removed_on_error() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))
    with pytest.raises(RuntimeError), GradCAMHook(net, "0"):
        net(torch.randn(1, 3, 9, 9))  # wrong size for the linear layer
    assert not net[0]._forward_hooks
    with pytest.raises(LayerError, match="no module"):
        filter_cams(net, "nope", torch.randn(1, 3, 8, 8))

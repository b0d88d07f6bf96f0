"""Canonical layers exist, run once per forward pass in network order; hooks are cleaned up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from object2brain.errors import LayerError
from object2brain.models.layers import CANONICAL_LAYERS, LayerRecorder, list_layers, resolve_layers
from object2brain.models.zoo import SUPPORTED_MODELS, build_architecture


@pytest.mark.parametrize("arch", SUPPORTED_MODELS)
def test_canonical_layers_fire_once_in_network_order(arch: str) -> None:
    net = build_architecture(arch, on_meta=True).eval()
    names = [info.name for info in list_layers(net, arch=arch)]
    assert names == [name for name, _ in CANONICAL_LAYERS[arch]]
    calls: list[str] = []
    handles = [
        net.get_submodule(name).register_forward_hook(lambda *_, n=name: calls.append(n))
        for name in names
    ]
    with torch.no_grad():
        net(torch.empty(2, 3, 224, 224, device="meta"))
    for handle in handles:
        handle.remove()
    assert calls == names  # each exactly once, in the listed order


def test_every_supported_model_has_canonical_layers() -> None:
    assert set(SUPPORTED_MODELS) <= set(CANONICAL_LAYERS)


def test_unknown_layer_lists_close_matches() -> None:
    net = build_architecture("resnet18", on_meta=True)
    with pytest.raises(LayerError) as info:
        resolve_layers(net, "layer5,layer1")
    assert "'layer5'" in str(info.value)
    assert "layer1" in str(info.value)  # offered as a close match


def test_any_dotted_module_accepted() -> None:
    net = build_architecture("resnet18", on_meta=True)
    assert resolve_layers(net, "layer3.1.conv2, fc") == ["layer3.1.conv2", "fc"]
    with pytest.raises(LayerError, match="twice"):
        resolve_layers(net, "fc,fc")


def test_recorder_removes_hooks_on_exit_and_on_error() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    with LayerRecorder(net, ["0", "2"]) as recorder:
        net(x)
        assert set(recorder.outputs) == {"0", "2"}
        assert recorder.order == ["0", "2"]
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(RuntimeError), LayerRecorder(net, ["0"]):
        net(torch.randn(5, 7))  # wrong input size fails inside the forward pass
    assert all(not m._forward_hooks for m in net.modules())


def test_recorded_output_is_a_copy_not_overwritten_by_inplace_relu() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True))
    x = torch.randn(16, 4)
    with LayerRecorder(net, ["0"]) as recorder, torch.no_grad():
        net(x)
        recorded = recorder.outputs["0"]
    expected = net[0](x).detach()
    assert (expected < 0).any()
    torch.testing.assert_close(recorded, expected)


def test_shared_module_is_rejected() -> None:
    relu = nn.ReLU()
    net = nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu)
    with pytest.raises(LayerError, match="more than once"), LayerRecorder(net, ["1"]):
        net(torch.randn(2, 4))


def test_recorder_keeps_the_outputs_of_each_thread() -> None:
    """Forward passes of one hooked network on two threads at once (extraction's CPU lanes): each
    thread reads its own pass's outputs, equal to those of a pass alone, and ``reset`` forgets
    only the calling thread's."""
    import threading

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).eval()
    inputs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        alone = [net[1](net[0](x)).clone() for x in inputs]
    seen: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(2)
    with LayerRecorder(net, ["1", "2"]) as recorder:

        def run(i: int) -> None:
            with torch.no_grad():
                net(inputs[i])
                barrier.wait()  # both passes done before either reads
                seen[i] = recorder.outputs["1"]
                barrier.wait()
                recorder.reset()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert recorder.outputs == {}  # this thread ran no pass
        assert recorder.order == ["1", "2"]
    for i in range(2):
        torch.testing.assert_close(seen[i], alone[i], atol=0, rtol=0)

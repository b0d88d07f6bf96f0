"""Per-filter Grad-CAM (EmoCAM++): all K filter maps of a layer from one forward + one backward.

For a layer with activations ``A`` of shape ``(batch, K, H, W)`` and a scalar output ``y`` per image
(the predicted valence of a valence head, or one output unit chosen with ``target``):

    alpha_k = mean over (h, w) of dy / dA_k(h, w)          (batch, K)
    M_k     = alpha_k * A_k                                 (batch, K, H, W)

``ReLU(sum_k M_k)`` is standard Grad-CAM (Selvaraju et al. 2017). The per-filter maps are turned
into non-negative importance maps by ``direction``:

- ``positive``: ``ReLU(M_k)``, where filter k pushes ``y`` up (default);
- ``negative``: ``ReLU(-M_k)``, where filter k pushes ``y`` down;
- ``abs``: ``|M_k|``, either way;
- ``signed``: ``M_k`` itself (for checks such as the Grad-CAM identity above).

The layer is hooked by :class:`GradCAMHook` (a context manager whose forward hook is removed on
exit, even when the forward pass fails). The hook replaces the layer's output by a detached leaf
tensor that requires grad (a clone of it continues the forward pass, so in-place operations after
the layer cannot alter it), which makes the backward pass work on a frozen network
(``requires_grad=False`` parameters) and stop at the layer: nothing before it is differentiated.
Maps are returned detached at layer resolution; :func:`upsample_maps` enlarges them on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from object2brain.errors import LayerError, ModelError
from object2brain.models.layers import ForwardHooks

Direction = Literal["positive", "negative", "abs", "signed"]
DIRECTIONS: tuple[str, ...] = ("positive", "negative", "abs", "signed")


class GradCAMHook(ForwardHooks):
    """Context manager that exposes one layer's output as a leaf tensor requiring grad.

    Example::

        with GradCAMHook(net, "layer4") as hook:
            y = net(x)[:, 0]
            (grads,) = torch.autograd.grad(y.sum(), hook.activation)

    Attributes:
        activation: the layer's output of the last forward pass, ``(batch, K, H, W)``, a leaf
            with ``requires_grad=True`` (``None`` before the first pass or after :meth:`reset`).
    """

    def __init__(self, module: nn.Module, layer: str) -> None:
        super().__init__(module)
        self.layer = layer
        self.activation: torch.Tensor | None = None

    def hooks(self) -> dict[str, Any]:
        return {self.layer: self._hook}

    def reset(self) -> None:
        """Forget the activation of the previous forward pass."""
        self.activation = None

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
        tensor = self.checked_output(self.layer, output, seen=self.activation is not None)
        if tensor.ndim != 4:
            raise LayerError(
                f"layer {self.layer!r} gives outputs of shape {tuple(tensor.shape)}, not spatial "
                "maps (batch, K, H, W): per-filter Grad-CAM needs a convolutional layer "
                "(a conv, pool or block stage; `object2brain layers MODEL` lists them)"
            )
        leaf = tensor.detach().requires_grad_(True)
        self.activation = leaf
        return leaf.clone()


@dataclass
class FilterCAMs:
    """Per-filter Grad-CAM of one batch (all detached, at layer resolution).

    Attributes:
        maps: directed per-filter maps, ``(batch, K, H, W)``.
        alpha: filter weights ``alpha_k = mean_hw dy/dA_k``, ``(batch, K)``.
        scores: the explained scalar ``y`` per image, ``(batch,)``.
        direction: how ``M_k`` was turned into ``maps``.
    """

    maps: torch.Tensor
    alpha: torch.Tensor
    scores: torch.Tensor
    direction: str


def apply_direction(signed: torch.Tensor, direction: str) -> torch.Tensor:
    """``M_k`` -> ``ReLU(M_k)`` | ``ReLU(-M_k)`` | ``|M_k|`` | ``M_k`` (any shape)."""
    if direction == "positive":
        return signed.clamp_min(0.0)
    if direction == "negative":
        return (-signed).clamp_min(0.0)
    if direction == "abs":
        return signed.abs()
    if direction == "signed":
        return signed
    raise ValueError(f"direction {direction!r}: use one of {', '.join(DIRECTIONS)}")


def select_target(output: torch.Tensor, target: int | None) -> torch.Tensor:
    """The scalar explained per image, ``(batch,)``, from the network output ``(batch, n_out)``.

    ``target=None`` requires a one-unit output (a valence head); otherwise ``output[:, target]``.

    Raises:
        ModelError: no valence head and no target, or a target out of range.
    """
    flat = output.reshape(output.shape[0], -1)
    n_out = flat.shape[1]
    if target is None:
        if n_out != 1:
            raise ModelError(
                f"the model has {n_out} outputs, not one valence output: attach a valence head "
                "(--head HEAD.safetensors, from `object2brain train-head`), or explain one output "
                "unit explicitly with --target INDEX (e.g. an ImageNet class index)"
            )
        return flat[:, 0]
    if not 0 <= target < n_out:
        raise ModelError(f"--target {target}: the model has outputs 0..{n_out - 1}")
    return flat[:, target]


def filter_cams(
    module: nn.Module,
    layer: str,
    images: torch.Tensor,
    *,
    target: int | None = None,
    direction: Direction | str = "positive",
) -> FilterCAMs:
    """All K per-filter Grad-CAM maps of ``layer`` for a batch, from one forward + one backward.

    Args:
        module: the network in eval mode (parameters may be frozen); output ``(batch, n_out)``.
        layer: dotted module name whose output is ``(batch, K, H, W)``.
        images: model inputs ``(batch, 3, S, S)`` on the module's device.
        target: output unit explained; ``None`` = the single valence output.
        direction: ``positive`` | ``negative`` | ``abs`` | ``signed`` (module docstring).

    Returns:
        :class:`FilterCAMs` with ``maps`` ``(batch, K, H, W)``: ``M_k = alpha_k * A_k`` after
        ``direction``, ``alpha_k = mean_hw dy/dA_k``.

    Raises:
        LayerError: unknown layer, a layer without spatial maps, or one the output does not use.
        ModelError: no valence output and no ``target``.

    Must not run under ``torch.inference_mode()`` (gradients are needed); ``no_grad`` is lifted.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
    with GradCAMHook(module, layer) as hook, torch.enable_grad():
        output = module(images)
        activation = hook.activation
        if activation is None:
            raise LayerError(f"layer {layer!r} did not run in the forward pass")
        scores = select_target(output, target)
        (grads,) = torch.autograd.grad(scores.sum(), activation, allow_unused=True)
        if grads is None:
            raise LayerError(f"the output does not depend on layer {layer!r}")
        alpha = grads.mean(dim=(2, 3))
        signed = alpha[:, :, None, None] * activation.detach()
        del grads, output
    return FilterCAMs(
        maps=apply_direction(signed, str(direction)),
        alpha=alpha,
        scores=scores.detach(),
        direction=str(direction),
    )


def gradcam_map(signed_maps: torch.Tensor) -> torch.Tensor:
    """Standard Grad-CAM ``ReLU(sum_k M_k)`` from signed per-filter maps ``(batch, K, H, W)``."""
    return signed_maps.sum(dim=1).clamp_min(0.0)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (``align_corners=False``) of ``(batch, K, H, W)`` to ``size`` (h, w)."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)

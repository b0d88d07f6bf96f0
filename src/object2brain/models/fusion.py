"""Batch-norm folding: a faster, numerically near-identical network for inference.

In eval mode a batch norm after a convolution is an affine map per output channel,
``y = gamma * (conv(x) - mu) / sqrt(var + eps) + beta``, so it can be folded into the
convolution's weights and bias: ``W' = W * s``, ``b' = (b - mu) * s + beta`` with
``s = gamma / sqrt(var + eps)`` per output channel. The folded network computes the same
function with one pass over each activation fewer per folded pair; its values differ from the
unfolded network's only by float32 rounding (measured on resnet18's canonical layers: at most
~2e-6 of the layer's largest value; ``docs/performance.md``).

:func:`fold_batchnorm` keeps every module name: the folded convolution takes the convolution's
place and the batch norm becomes an :class:`torch.nn.Identity` at its own name, so forward hooks
by name (:class:`~object2brain.models.layers.LayerRecorder`) record what they recorded before
(the output of the batch norm's name is the batch-normalised value, as before). A convolution
whose own output is asked for (``keep``) is not folded, nor one whose output feeds anything but
the batch norm.
"""

from __future__ import annotations

import copy
from collections.abc import Collection

from torch import fx, nn

from object2brain.errors import LayerError

__all__ = ["fold_batchnorm", "foldable_pairs"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def foldable_pairs(module: nn.Module, keep: Collection[str] = ()) -> list[tuple[str, str]]:
    """``(convolution name, batch-norm name)`` of each pair :func:`fold_batchnorm` folds: a
    batch norm (with running statistics) whose only input is a convolution (not transposed)
    whose output feeds nothing else, the convolution not in ``keep``.

    Raises:
        LayerError: the network cannot be traced symbolically (:func:`torch.fx.symbolic_trace`:
            data-dependent control flow), so its pairs are unknown.
    """
    try:
        graph = fx.symbolic_trace(module).graph
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...)
        raise LayerError(
            f"cannot fold batch norms of this network (not traceable by torch.fx: "
            f"{type(exc).__name__}: {exc}); run without fold_batchnorm"
        ) from None
    modules = dict(module.named_modules())
    pairs = []
    for node in graph.nodes:
        norm = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(norm, _NORMS) or norm.running_mean is None or not node.args:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        conv = modules.get(str(source.target))
        if (
            isinstance(conv, _CONVS)
            and len(source.users) == 1
            and str(source.target) not in keep
            and conv.out_channels == norm.num_features
        ):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def fold_batchnorm(module: nn.Module, keep: Collection[str] = ()) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``module`` with each batch norm of :func:`foldable_pairs` folded
    into its convolution (module names kept; ``module`` itself is not changed) and the number
    of pairs folded.

    Raises:
        LayerError: the network cannot be traced (see :func:`foldable_pairs`).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(module).eval()
    pairs = foldable_pairs(folded, keep)
    for conv_name, norm_name in pairs:
        conv, norm = folded.get_submodule(conv_name), folded.get_submodule(norm_name)
        assert isinstance(conv, _CONVS) and isinstance(norm, _NORMS)  # by foldable_pairs
        _replace(folded, conv_name, fuse_conv_bn_eval(conv, norm))
        _replace(folded, norm_name, nn.Identity())
    return folded, len(pairs)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)

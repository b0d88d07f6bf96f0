"""Layer discovery and forward hooks.

Each architecture has a list of *canonical analysis layers*: the conv/pool stages, the fc6/fc7
style layers and the output, named by their dotted module names (``features.4``, ``layer3``,
``classifier.1``). Any other dotted module name is accepted too; an unknown one is rejected with
the closest matches.

:class:`LayerRecorder` registers forward hooks in a context manager and removes them on exit, even
when the forward pass fails.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from object2brain.errors import LayerError

VALENCE_LAYER = "valence"

# (dotted module name, kind) in network order.
CANONICAL_LAYERS: dict[str, tuple[tuple[str, str], ...]] = {
    "alexnet": (
        ("features.1", "conv"),
        ("features.2", "pool"),
        ("features.4", "conv"),
        ("features.5", "pool"),
        ("features.7", "conv"),
        ("features.9", "conv"),
        ("features.11", "conv"),
        ("features.12", "pool"),
        ("classifier.2", "fc"),
        ("classifier.5", "fc"),
        ("classifier.6", "output"),
    ),
    "vgg16": (
        ("features.4", "pool"),
        ("features.9", "pool"),
        ("features.16", "pool"),
        ("features.23", "pool"),
        ("features.30", "pool"),
        ("classifier.1", "fc"),
        ("classifier.4", "fc"),
        ("classifier.6", "output"),
    ),
    "resnet18": (
        ("maxpool", "pool"),
        ("layer1", "block"),
        ("layer2", "block"),
        ("layer3", "block"),
        ("layer4", "block"),
        ("avgpool", "pool"),
        ("fc", "output"),
    ),
    "densenet161": (
        ("features.pool0", "pool"),
        ("features.denseblock1", "block"),
        ("features.transition1", "pool"),
        ("features.denseblock2", "block"),
        ("features.transition2", "pool"),
        ("features.denseblock3", "block"),
        ("features.transition3", "pool"),
        ("features.denseblock4", "block"),
        ("features.norm5", "block"),
        ("classifier", "output"),
    ),
    "googlenet": (
        ("maxpool1", "pool"),
        ("maxpool2", "pool"),
        ("inception3a", "block"),
        ("inception3b", "block"),
        ("maxpool3", "pool"),
        ("inception4a", "block"),
        ("inception4b", "block"),
        ("inception4c", "block"),
        ("inception4d", "block"),
        ("inception4e", "block"),
        ("maxpool4", "pool"),
        ("inception5a", "block"),
        ("inception5b", "block"),
        ("avgpool", "pool"),
        ("fc", "output"),
    ),
    "mobilenet_v3_large": (
        ("features.1", "block"),
        ("features.3", "block"),
        ("features.6", "block"),
        ("features.10", "block"),
        ("features.12", "block"),
        ("features.15", "block"),
        ("features.16", "conv"),
        ("avgpool", "pool"),
        ("classifier.1", "fc"),
        ("classifier.3", "output"),
    ),
    "efficientnet_b0": (
        *((f"features.{i}", "block") for i in range(9)),
        ("avgpool", "pool"),
        ("classifier.1", "output"),
    ),
    "convnext_tiny": (
        ("features.0", "conv"),
        ("features.1", "block"),
        ("features.3", "block"),
        ("features.5", "block"),
        ("features.7", "block"),
        ("avgpool", "pool"),
        ("classifier.2", "output"),
    ),
    "efficientnet_lite0": (
        ("_blocks.0", "block"),
        ("_blocks.2", "block"),
        ("_blocks.4", "block"),
        ("_blocks.7", "block"),
        ("_blocks.10", "block"),
        ("_blocks.14", "block"),
        ("_blocks.15", "block"),
        ("_avg_pooling", "pool"),
        ("_fc", "output"),
    ),
}
CANONICAL_LAYERS["resnet50"] = CANONICAL_LAYERS["resnet18"]


@dataclass(frozen=True)
class LayerInfo:
    """One hookable layer: dotted module name, kind (conv/pool/block/fc/output/module), type."""

    name: str
    kind: str
    module_type: str


def _module_of(model: Any) -> nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model, "arch") else model  # type: ignore[no-any-return]


def list_layers(model: Any, *, arch: str | None = None, canonical: bool = True) -> list[LayerInfo]:
    """Canonical analysis layers of ``model`` (a :class:`LoadedModel` or an ``nn.Module``).

    Args:
        model: the network.
        arch: architecture name; taken from a :class:`LoadedModel` when omitted.
        canonical: ``False`` lists every named submodule instead.
    """
    module = _module_of(model)
    arch = arch or getattr(model, "arch", None)
    modules = dict(module.named_modules())
    if canonical and arch in CANONICAL_LAYERS:
        return [
            LayerInfo(name, kind, type(modules[name]).__name__)
            for name, kind in CANONICAL_LAYERS[arch]
        ]
    if canonical:
        return _generic_layers(module)
    return [LayerInfo(name, "module", type(sub).__name__) for name, sub in modules.items() if name]


def _generic_layers(module: nn.Module) -> list[LayerInfo]:
    """Top-level stages (children of ``features`` if present, else of the model)."""
    skip = (nn.Dropout, nn.Identity, nn.Flatten, nn.ReLU)
    features = getattr(module, "features", None)
    pairs = (
        [(f"features.{n}", m) for n, m in features.named_children()]
        if isinstance(features, nn.Module)
        else []
    ) + [(n, m) for n, m in module.named_children() if n != "features"]
    return [
        LayerInfo(name, "module", type(sub).__name__)
        for name, sub in pairs
        if not isinstance(sub, skip)
    ]


def resolve_layers(
    model: Any, layers: str | Sequence[str] = "all", *, arch: str | None = None
) -> list[str]:
    """Turn ``all`` or a comma-separated list / sequence of names into validated module names.

    With a valence head attached, ``all`` leaves out the replaced output layer: its output is
    written as the layer ``valence``. ``arch`` names the architecture in errors when ``model`` is
    a bare module (default: ``model.arch``).
    """
    module = _module_of(model)
    if isinstance(layers, str):
        if layers.strip().lower() == "all":
            names = [info.name for info in list_layers(model)]
            if getattr(model, "has_head", False):
                names = [n for n in names if n != model.output_layer]
            return names
        layers = [part.strip() for part in layers.split(",") if part.strip()]
    names = list(layers)
    if not names:
        raise LayerError("no layers requested")
    known = {name for name, _ in module.named_modules() if name}
    unknown = [n for n in names if n not in known and n != VALENCE_LAYER]
    if unknown:
        messages = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f" (close matches: {', '.join(close)})" if close else ""
            messages.append(f"{name!r}{hint}")
        arch = arch or getattr(model, "arch", None)
        listing_hint = (
            f"`object2brain layers {arch}` lists the canonical layers, --all every module"
            if arch
            else "list_layers(model) lists the canonical layers"
        )
        raise LayerError(
            f"unknown layer(s) for {arch or type(module).__name__}: {'; '.join(messages)}. "
            + listing_hint
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LayerError(f"layer(s) requested twice: {', '.join(duplicates)}")
    return [n for n in names if n != VALENCE_LAYER]


class ForwardHooks:
    """Base of context managers that put forward hooks on named modules.

    Subclasses return ``{module name: hook}`` from :meth:`hooks`; the hooks are registered on
    ``__enter__`` and removed on ``__exit__``, also when the forward pass (or a registration)
    fails, so a model is never left hooked. ``__exit__`` also calls :meth:`reset`, so what the
    last forward pass left is not kept alive after the block.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._handles: list[RemovableHandle] = []

    def hooks(self) -> dict[str, Any]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget what the previous forward pass left (nothing, unless a subclass keeps it)."""

    @staticmethod
    def checked_output(name: str, output: Any, *, seen: bool) -> torch.Tensor:
        """``output`` of module ``name``, which must be a tensor and the module's first output
        in this forward pass (``seen``: it already gave one)."""
        if seen:
            raise LayerError(
                f"module {name!r} runs more than once per forward pass (a shared module); "
                "choose a module that runs once, e.g. its parent block"
            )
        if not isinstance(output, torch.Tensor):
            raise LayerError(
                f"module {name!r} returns {type(output).__name__}, not a tensor; "
                "choose a module with a tensor output"
            )
        return output

    def __enter__(self) -> Self:
        modules = dict(self.module.named_modules())
        try:
            for name, hook in self.hooks().items():
                if not name or name not in modules:
                    raise LayerError(f"no module named {name!r} in {type(self.module).__name__}")
                self._handles.append(modules[name].register_forward_hook(hook))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()
        self.reset()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class LayerRecorder(ForwardHooks):
    """Context manager that records the outputs of named modules during forward passes.

    Each recorded output is detached and *copied* (in-place activations such as
    ``ReLU(inplace=True)`` would otherwise overwrite it) to ``device`` / ``dtype`` /
    ``memory_format`` (default: the output's own layout; ``torch.contiguous_format`` turns a
    channels_last output into the stored layout in the same copy).

    The outputs are kept per thread: forward passes of the same network running on several
    threads at once (extraction's CPU lanes) each see their own in :attr:`outputs`, and
    :meth:`reset` forgets the calling thread's.

    Example::

        with LayerRecorder(net, ["layer1", "fc"]) as rec:
            net(x)
            acts = rec.outputs          # {"layer1": (B, 64, 56, 56), "fc": (B, 1000)}
            rec.reset()                 # before the next batch
    """

    def __init__(
        self,
        module: nn.Module,
        names: Sequence[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        memory_format: torch.memory_format = torch.preserve_format,
    ) -> None:
        super().__init__(module)
        self.names = list(names)
        self.device = device
        self.dtype = dtype
        self.memory_format = memory_format
        self._local = threading.local()
        self._order_lock = threading.Lock()
        self.order: list[str] = []

    @property
    def outputs(self) -> dict[str, torch.Tensor]:
        """Module name -> recorded output of the calling thread's last forward pass."""
        outputs: dict[str, torch.Tensor] | None = getattr(self._local, "outputs", None)
        if outputs is None:
            outputs = self._local.outputs = {}
        return outputs

    def hooks(self) -> dict[str, Any]:
        return {name: self._hook_for(name) for name in self.names}

    def reset(self) -> None:
        """Forget the outputs of the calling thread's previous forward pass."""
        self._local.outputs = {}

    def _hook_for(self, name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            outputs = self.outputs
            tensor = self.checked_output(name, output, seen=name in outputs)
            if name not in self.order:
                with self._order_lock:
                    if name not in self.order:
                        self.order.append(name)
            outputs[name] = tensor.detach().to(
                device=self.device or tensor.device,
                dtype=self.dtype or tensor.dtype,
                memory_format=self.memory_format,
                copy=True,
            )

        return hook

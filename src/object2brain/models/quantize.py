"""Post-training static int8 quantization of a network for CPU extraction (``quantize="int8"``).

The network is traced by :mod:`torch.fx` with the output of every recorded module added to the
graph's outputs, quantized by :mod:`torch.ao.quantization`'s FX workflow with the ``x86``
backend (fbgemm/oneDNN int8 kernels, VNNI where the CPU has it): weights symmetric per output
channel, activations affine per tensor from their min/max over the calibration images
(:func:`qconfig_mapping`; on resnet18 both more accurate and cheaper than torch's default
histogram observers), calibrated on a fixed set of images, and wrapped in
:class:`Int8Network`:

- every recorded module name still exists on the wrapper: a tap module at that name receives the
  module's output, **dequantized to float32**, so forward hooks by name
  (:class:`~object2brain.models.layers.LayerRecorder`) record it as for the float network;
- a recorded module's output is a graph output, so it is never fused into the next operation
  (a recorded convolution keeps its own output, not the batch-normalised one);
- the calibration set does not depend on chunks, shards, resumption or worker counts: the first
  :data:`CALIBRATION_IMAGES` stimuli of the whole stimulus set in sorted-id order, decoded like
  every other image, in batches of :data:`CALIBRATION_BATCH` (not the extraction's batch
  size), in id order.

Values differ from float32 by the quantization (per-layer errors on resnet18 in
``docs/methods.md``); the mode, backend and calibration ids are part of the store's fingerprint.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from object2brain.errors import LayerError

log = logging.getLogger("object2brain.models.quantize")

__all__ = [
    "CALIBRATION_BATCH",
    "CALIBRATION_IMAGES",
    "Int8Network",
    "calibration_ids",
    "quantization_config",
    "quantize_int8",
]

#: Stimuli used to calibrate the activation ranges (fewer when the set is smaller).
CALIBRATION_IMAGES = 64
#: Images per calibration batch (fixed: the histograms depend on the batching).
CALIBRATION_BATCH = 32
#: The quantized backend (torch.backends.quantized.engine).
BACKEND = "x86"


def has_vnni() -> bool:
    """Whether the CPU has 8-bit dot-product instructions (AVX512-VNNI or AVX-VNNI): without
    them fbgemm's 16-bit intermediates can saturate with full-range activations, so activations
    are then quantized to 7 bits (``reduce_range``)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_vnni" in flags or "avx_vnni" in flags
    except OSError:
        pass
    return False


def qconfig_mapping(reduce_range: bool) -> Any:
    """Weights: symmetric int8 per output channel (min/max); activations: affine uint8 per
    tensor (min/max over the calibration images; 7 bits with ``reduce_range``)."""
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    qconfig = QConfig(  # type: ignore[no-untyped-call]
        activation=MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=reduce_range),
        weight=PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        ),
    )
    return QConfigMapping().set_global(qconfig)


def calibration_ids(ids: Sequence[str], n: int | None = None) -> list[str]:
    """The calibration stimuli: the first ``n`` (:data:`CALIBRATION_IMAGES`) of ``ids`` in
    sorted order (independent of the table's row order, of chunks, shards and workers)."""
    return sorted(ids)[: CALIBRATION_IMAGES if n is None else n]


def quantization_config(ids: Sequence[str]) -> dict[str, Any]:
    """What the store's fingerprint records of an int8 run."""
    chosen = calibration_ids(ids)
    return {
        "mode": "int8",
        "backend": BACKEND,
        "observers": "minmax",
        "reduce_range": not has_vnni(),
        "torch": torch.__version__.split("+")[0],
        "calibration_images": len(chosen),
        "calibration_batch": CALIBRATION_BATCH,
        "calibration_ids_sha256": hashlib.sha256("\n".join(chosen).encode()).hexdigest(),
    }


class _Tap(nn.Module):
    """Stands at a recorded module's name; its forward hooks see that module's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Int8Network(nn.Module):
    """The quantized network (child ``_int8``) and a :class:`_Tap` at each recorded name, called
    with that module's dequantized output in network order after each forward pass."""

    def __init__(self, quantized: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self._int8 = quantized
        self.tap_names = list(names)
        for name in self.tap_names:
            _place_tap(self, name)

    def forward(self, x: torch.Tensor) -> Any:
        output, *recorded = self._int8(x)
        for name, value in zip(self.tap_names, recorded, strict=True):
            self.get_submodule(name)(value)
        return output


def _place_tap(root: nn.Module, name: str) -> None:
    parent = root
    *path, last = name.split(".")
    for part in path:
        child = parent._modules.get(part)
        if child is None:
            child = _Tap()
            parent.add_module(part, child)
        parent = child
    if last in parent._modules:  # a tap under another recorded name (e.g. layer1, layer1.0)
        return
    parent.add_module(last, _Tap())


class _TapTracer(fx.Tracer):
    """Traces through every module (as :func:`torch.fx.symbolic_trace`) and remembers the
    output proxy of each module in ``names``."""

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        self.wanted = set(names)
        self.taps: dict[str, fx.Proxy] = {}

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        result = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        if name in self.wanted and isinstance(result, fx.Proxy):
            self.taps[name] = result
        return result


def _tapped_graph(module: nn.Module, names: Sequence[str]) -> tuple[fx.GraphModule, list[str]]:
    """``module`` as a graph module returning ``(output, *recorded)`` and the recorded names in
    graph order."""
    tracer = _TapTracer(names)
    try:
        graph = tracer.trace(module)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...)
        raise LayerError(
            f"cannot quantize this network (not traceable by torch.fx: {type(exc).__name__}: "
            f"{exc}); run without quantize"
        ) from None
    missing = [name for name in names if name not in tracer.taps]
    if missing:
        raise LayerError(
            f"cannot quantize: the output of {', '.join(missing)} is not one tensor in the "
            "traced graph; run without quantize"
        )
    position = {node: i for i, node in enumerate(graph.nodes)}
    ordered = sorted(names, key=lambda name: position[tracer.taps[name].node])
    (output,) = [node for node in graph.nodes if node.op == "output"]
    result = output.args[0]
    output.args = ((result, *[tracer.taps[name].node for name in ordered]),)
    graph.lint()
    return fx.GraphModule(tracer.root, graph), ordered


def quantize_int8(
    module: nn.Module, names: Sequence[str], calibration: Iterable[torch.Tensor]
) -> Int8Network:
    """An int8 copy of ``module`` (``module`` itself is not changed) recording ``names``,
    calibrated on the input batches ``calibration`` (float32, on the CPU).

    Raises:
        LayerError: the network cannot be traced, or a recorded output is not one tensor.
    """
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if BACKEND not in torch.backends.quantized.supported_engines:  # pragma: no cover
        raise LayerError(f"quantize int8: this torch build has no {BACKEND!r} quantized engine")
    torch.backends.quantized.engine = BACKEND
    float_copy = copy.deepcopy(module).cpu().eval()
    graph, ordered = _tapped_graph(float_copy, list(names))
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise LayerError("quantize int8: no calibration images")
    with warnings.catch_warnings():  # torch.ao's deprecation notices (moving to torchao)
        warnings.simplefilter("ignore")
        prepared = prepare_fx(graph, qconfig_mapping(not has_vnni()), (first[:1],))
        with torch.no_grad():  # observers update their buffers in place
            prepared(first)
            for batch in batches:
                prepared(batch)
        quantized = convert_fx(prepared)
    return Int8Network(quantized, ordered).eval()

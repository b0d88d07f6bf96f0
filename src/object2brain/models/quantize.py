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
  size), in id order;
- the calibration is cached (:func:`save_calibration`, :func:`load_calibration`): what it
  produces, the min/max of every activation observer, is a few KB of float tensors written as
  safetensors (no pickle) under :func:`calibration_key` (the float network's weights by SHA-256,
  the recorded layers, the calibration images' ids and bytes, the preprocessing, the torch
  version, the backend and observer settings). A run that finds its key skips the calibration
  (decoding and 2 forward passes of the calibration images, ~2-6 CPU-s on resnet18) and
  converts the same observers, so its network is bit for bit the calibrating run's.

Values differ from float32 by the quantization (per-layer errors on resnet18 in
``docs/methods.md``); the mode, backend and calibration ids are part of the store's fingerprint.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from object2brain.errors import LayerError, StoreError
from object2brain.io import atomic_path
from object2brain.models.zoo import state_dict_sha256, tensors_sha256

log = logging.getLogger("object2brain.models.quantize")

__all__ = [
    "CALIBRATION_BATCH",
    "CALIBRATION_IMAGES",
    "Int8Network",
    "calibrate",
    "calibration_ids",
    "calibration_key",
    "load_calibration",
    "quantization_config",
    "quantize_int8",
    "save_calibration",
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
        #: The calibrated observers ``{"<observer>.<buffer>": tensor}`` the network was converted
        #: from (what :func:`save_calibration` caches).
        self.observers: dict[str, torch.Tensor] = {}
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
    module: nn.Module,
    names: Sequence[str],
    calibration: Iterable[torch.Tensor] | None,
    *,
    observers: Mapping[str, torch.Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
) -> Int8Network:
    """An int8 copy of ``module`` (``module`` itself is not changed) recording ``names``.

    Either calibrated on the input batches ``calibration`` (float32, on the CPU; by
    :func:`calibrate`), or, with ``calibration`` None, given the ``observers`` of an earlier
    calibration of the same network, layers and images (:attr:`Int8Network.observers`, e.g. from
    :func:`load_calibration`): the same int8 network, bit for bit, without a forward pass.
    ``input_shape`` (``(batch, 3, height, width)``; the first calibration batch's by default):
    the shape the graph is prepared with (only its non-batch sizes matter).

    Raises:
        LayerError: the network cannot be traced, a recorded output is not one tensor, no
            calibration images, or ``observers`` that do not fit the prepared network.
    """
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if BACKEND not in torch.backends.quantized.supported_engines:  # pragma: no cover
        raise LayerError(f"quantize int8: this torch build has no {BACKEND!r} quantized engine")
    torch.backends.quantized.engine = BACKEND
    float_copy = copy.deepcopy(module).cpu().eval()
    graph, ordered = _tapped_graph(float_copy, list(names))
    batches: Iterator[torch.Tensor] = iter(calibration if calibration is not None else ())
    first = next(batches, None) if calibration is not None else None
    if calibration is not None and first is None:
        raise LayerError("quantize int8: no calibration images")
    if input_shape is None:
        if first is None:
            raise LayerError("quantize int8: observers given without an input_shape")
        input_shape = tuple(first.shape)
    # the same example input on both paths (zeros), so a cached calibration prepares the very
    # graph a calibrating run prepares
    example = torch.zeros((1, *tuple(input_shape)[1:]))
    with warnings.catch_warnings():  # torch.ao's deprecation notices (moving to torchao)
        warnings.simplefilter("ignore")
        prepared = prepare_fx(graph, qconfig_mapping(not has_vnni()), (example,))
        if first is not None:
            calibrate(prepared, itertools.chain([first], batches))
        elif observers is not None:
            _load_observers(prepared, observers)
        else:
            raise LayerError("quantize int8: neither calibration images nor observers given")
        state = _observer_state(prepared)
        quantized = convert_fx(prepared)
    network = Int8Network(quantized, ordered).eval()
    network.observers = state
    return network


def calibrate(prepared: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Run the calibration batches through the observed network ``prepared`` (its observers
    record each activation's min/max); the one place calibration forward passes happen."""
    with torch.no_grad():  # observers update their buffers in place
        for batch in batches:
            prepared(batch)


def _observers(prepared: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.quantization.observer import ObserverBase

    return {name: m for name, m in prepared.named_modules() if isinstance(m, ObserverBase)}


def _observer_state(prepared: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<observer>.<buffer>": tensor}`` of every observer of ``prepared`` (a copy)."""
    return {
        f"{name}.{key}": value.detach().clone().contiguous()
        for name, observer in _observers(prepared).items()
        for key, value in observer.state_dict().items()
    }


def _load_observers(prepared: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Set the observers of ``prepared`` to ``state`` (:func:`_observer_state` of a calibrated
    twin); the keys and shapes must match exactly."""
    mine = _observer_state(prepared)
    if set(mine) != set(state):
        raise LayerError(
            "quantize int8: the cached calibration does not fit this network "
            f"({len(state)} observer values, {len(mine)} expected)"
        )
    for name, observer in _observers(prepared).items():
        prefix = f"{name}."
        observer.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )


# --- calibration cache --------------------------------------------------------------------------

#: Version of the calibration cache's content; part of its key.
CACHE_FORMAT = "o2b-int8-observers-1"


def calibration_key(
    module: nn.Module, names: Sequence[str], images: str, preprocessing: Mapping[str, Any]
) -> str:
    """Key of a calibration: SHA-256 over the network's state as it is quantized (folded batch
    norms and heads included; :func:`~object2brain.models.zoo.state_dict_sha256`), the
    recorded layers in order, ``images`` (the calibration stimuli's fingerprint: their ids and
    the SHA-256 of each image's bytes), the preprocessing (and decoder), the torch version, the
    backend and the observer settings (:func:`quantization_config`'s ``reduce_range``,
    :data:`CALIBRATION_BATCH`)."""
    identity = {
        "format": CACHE_FORMAT,
        "network_sha256": state_dict_sha256(module),
        "layers": list(names),
        "calibration_images": images,
        "preprocessing": dict(preprocessing),
        "torch": torch.__version__,
        "backend": BACKEND,
        "observers": "minmax",
        "reduce_range": not has_vnni(),
        "calibration_batch": CALIBRATION_BATCH,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def load_calibration(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The observers cached in ``path`` (safetensors) for ``key``, or ``None``: no file, a file
    of another key (another network, layer set, calibration set, torch version, ...), or a file
    that cannot be read or fails its SHA-256 (a truncated or damaged file: logged; the caller
    calibrates again and replaces it)."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("key") != key:
            log.info("int8 calibration cache %s is for another network or set; calibrating", path)
            return None
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        log.warning("int8 calibration cache %s cannot be read (%s); calibrating again", path,
                    " ".join(str(exc).split())[:200])  # fmt: skip
        return None
    if meta.get("sha256") != tensors_sha256(state):
        log.warning("int8 calibration cache %s fails its checksum; calibrating again", path)
        return None
    return state


def save_calibration(path: Path, key: str, state: Mapping[str, torch.Tensor]) -> None:
    """Write the observers ``state`` for ``key`` to ``path`` (safetensors, written under a
    temporary name and renamed: a reader sees the old file or the new one, never half of one;
    several shards writing at once leave one of their identical files). A cache that cannot be
    written is logged and skipped: it only saves time."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in state.items()}
        with atomic_path(path) as temp:
            save_file(tensors, str(temp), metadata={"key": key, "sha256": tensors_sha256(tensors),
                                                    "format": CACHE_FORMAT})  # fmt: skip
    except (OSError, SafetensorError, StoreError) as exc:
        log.warning("int8 calibration cache %s not written (%s)", path, exc)

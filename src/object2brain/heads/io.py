"""Valence head files: a one-unit linear layer stored as ``head.safetensors`` (tensors ``weight``
``(1, in_features)`` and ``bias`` ``(1,)``) with a JSON sidecar ``head.json`` describing what it
fits (``arch``, ``replaced_layer``, ``in_features``, backbone weights and their SHA-256, ...).

:func:`attach_head` puts a head in place of the output layer of a loaded model; the model's output
is then the predicted valence ``(batch, 1)``, which extraction stores as layer ``valence``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from object2brain.errors import DataError, ModelError

if TYPE_CHECKING:
    from object2brain.models.zoo import LoadedModel


def sidecar_path(head_path: Path) -> Path:
    """``head.safetensors`` -> ``head.json``."""
    return head_path.with_suffix(".json")


def save_head(linear: nn.Linear, path: Path, metadata: dict[str, Any]) -> Path:
    """Write ``linear`` (``out_features == 1``) as safetensors plus its JSON sidecar."""
    from safetensors.torch import save_file

    from object2brain.io import atomic_path, write_json

    if linear.out_features != 1:
        raise ModelError(f"a valence head has one output, got {linear.out_features}")
    tensors = {"weight": linear.weight.detach().cpu().contiguous()}
    if linear.bias is not None:
        tensors["bias"] = linear.bias.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        save_file(tensors, str(temp))
    write_json(sidecar_path(path), {**metadata, "in_features": linear.in_features})
    return path


def load_head(path: Path) -> tuple[nn.Linear, dict[str, Any]]:
    """Read a head and its sidecar; returns the linear layer and the metadata."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path}: valence head not found")
    meta_path = sidecar_path(path)
    if not meta_path.is_file():
        raise ModelError(f"{path}: sidecar {meta_path.name} (arch, replaced layer) not found")
    try:
        tensors = load_file(str(path))
        meta: dict[str, Any] = json.loads(meta_path.read_text())
    except Exception as exc:  # safetensors and json raise their own error types
        raise ModelError(f"{path}: cannot read valence head ({exc})") from None
    weight = tensors.get("weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] != 1:
        raise ModelError(f"{path}: expected tensor 'weight' of shape (1, in_features)")
    linear = nn.Linear(weight.shape[1], 1, bias="bias" in tensors)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if "bias" in tensors:
            linear.bias.copy_(tensors["bias"].reshape(1))
    return linear, meta


def attach_head(model: LoadedModel, path: Path) -> None:
    """Replace ``model``'s output layer by the valence head at ``path`` (in place)."""
    linear, meta, layer = checked_head(model, path)
    linear.requires_grad_(False)
    model.module.set_submodule(layer, linear)
    model.head = {**meta, "path": str(path.resolve()), "replaced_layer": layer}


def checked_head(model: LoadedModel, path: Path) -> tuple[nn.Linear, dict[str, Any], str]:
    """The head at ``path``, its sidecar and the layer of ``model`` it replaces, after checking
    that it was trained for this architecture and these backbone weights and that its input
    size matches that layer.

    Raises:
        ModelError: naming the file and what does not match.
    """
    linear, meta = load_head(path)
    if meta.get("arch") not in (None, model.arch):
        raise ModelError(f"{path}: head was trained for {meta['arch']}, not {model.arch}")
    trained_on = meta.get("backbone_weights_sha256")
    if trained_on and trained_on != model.weights_sha256:
        raise ModelError(
            f"{path}: head was trained on {meta.get('backbone_weights')!r} backbone weights "
            f"(SHA-256 {str(trained_on)[:12]}...), not on these {model.weights!r} weights "
            f"(SHA-256 {model.weights_sha256[:12]}...): load the backbone it was trained on "
            "(same --weights, and --seed for random weights)"
        )
    layer = str(meta.get("replaced_layer") or model.output_layer)
    try:
        old = model.module.get_submodule(layer)
    except AttributeError:
        raise ModelError(f"{path}: {model.arch} has no layer {layer!r} to replace") from None
    if not isinstance(old, nn.Linear) or old.in_features != linear.in_features:
        got = getattr(old, "in_features", type(old).__name__)
        raise ModelError(
            f"{path}: head expects {linear.in_features} input features, "
            f"{model.arch}.{layer} gives {got}"
        )
    return linear, meta, layer


#: File name of selection fold head ``k`` (next to ``head.safetensors``).
FOLD_HEAD_PATTERN = "head.fold{k}.safetensors"


def fold_head_name(k: int) -> str:
    """``head.fold<k>.safetensors``."""
    return FOLD_HEAD_PATTERN.format(k=k)


@dataclass(frozen=True)
class FoldHeads:
    """The selection fold heads of one model, checked against it.

    Attributes:
        folder: where they were read.
        heads: head ``k`` ``nn.Linear(in_features, 1)`` (no gradient), in fold order.
        layer: the layer of the model they replace.
        held_out: fold ``k``'s stimulus ids (never seen by head ``k``), in fold order.
        paths: the head files, in fold order.
    """

    folder: Path
    heads: tuple[nn.Linear, ...]
    layer: str
    held_out: tuple[tuple[str, ...], ...]
    paths: tuple[Path, ...]

    @property
    def n_folds(self) -> int:
        return len(self.heads)

    def fold_of(self, ids: Sequence[str]) -> np.ndarray:
        """Fold ``(n,)`` int64 of every stimulus of ``ids``: the fold whose head held it out.

        Raises:
            DataError: a stimulus held out by no head (naming the folder and the first such id).
        """
        where = {sid: k for k, held in enumerate(self.held_out) for sid in held}
        missing = [sid for sid in ids if sid not in where]
        if missing:
            raise DataError(
                f"{self.folder}: stimulus {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f" is held out by none of the {self.n_folds} fold heads: they were fitted on "
                "another stimulus set; train them on these stimuli (train-head --selection-folds)"
            )
        return np.asarray([where[sid] for sid in ids], dtype=np.int64)


def load_fold_heads(model: LoadedModel, folder: Path) -> FoldHeads:
    """Read ``folder``'s ``head.fold<k>.safetensors`` (``k = 0 .. K - 1``, K >= 2) and their
    sidecars (``fold``, ``n_folds``, ``held_out``), each checked as :func:`checked_head`.

    Raises:
        ModelError: no fold heads, a gap in ``k``, a sidecar without ``held_out`` or with
            another ``n_folds``, a stimulus held out by two heads, or a head that does not fit.
    """
    folder = Path(folder).expanduser()
    paths: list[Path] = []
    while (folder / fold_head_name(len(paths))).is_file():
        paths.append(folder / fold_head_name(len(paths)))
    if len(paths) < 2:
        raise ModelError(
            f"--fold-heads {folder}: needs head.fold0.safetensors, head.fold1.safetensors, ... "
            f"(train-head --selection-folds K); found {len(paths)}"
        )
    heads, held, layers = [], [], set()
    for path in paths:
        linear, meta, layer = checked_head(model, path)
        if "held_out" not in meta or meta.get("n_folds") != len(paths):
            raise ModelError(
                f"{sidecar_path(path)}: a fold head's sidecar needs held_out (its fold's "
                f"stimulus ids) and n_folds = {len(paths)} (the fold heads found)"
            )
        linear.requires_grad_(False)
        heads.append(linear.eval())
        held.append(tuple(str(i) for i in meta["held_out"]))
        layers.add(layer)
    twice: set[str] = set()
    seen: set[str] = set()
    for ids in held:
        twice |= seen & set(ids)
        seen |= set(ids)
    if twice:
        raise ModelError(f"{folder}: stimulus {sorted(twice)[0]!r} is held out by two fold heads")
    return FoldHeads(folder, tuple(heads), layers.pop(), tuple(held), tuple(paths))


@contextmanager
def swapped_head(model: LoadedModel, layer: str, head: nn.Module) -> Iterator[None]:
    """``model.module`` with ``head`` in place of ``layer`` inside the block; restored after."""
    original = model.module.get_submodule(layer)
    model.module.set_submodule(layer, head.to(next(original.parameters()).device))
    try:
        yield
    finally:
        model.module.set_submodule(layer, original)


def degenerate_reason(head_path: Path | str) -> str | None:
    """Why the valence head at ``head_path`` is degenerate, or ``None`` when it is not.

    A head written by ``train-head`` carries ``degenerate`` and ``degenerate_reason`` in its
    sidecar ``head.json``. A head from elsewhere (or an older run) without that entry is judged
    from what it has: ``best_epoch == 0`` in the sidecar (it kept its initial weights) or a
    weight tensor that is zero everywhere (zero gradient into the backbone).

    Raises:
        ModelError: the head or its sidecar is missing or unreadable.
    """
    path = Path(head_path)
    linear, meta = load_head(path)
    if "degenerate" in meta:
        if not meta["degenerate"]:
            return None
        return str(meta.get("degenerate_reason") or "marked degenerate in its head.json")
    reasons = []
    if meta.get("best_epoch") == 0:
        reasons.append("no epoch improved on the initial head (best epoch 0)")
    if not bool(torch.any(linear.weight != 0)):
        reasons.append("all weights are zero (zero gradient into the backbone)")
    return "; ".join(reasons) or None


def write_skipped_manifest(folder: Path, command: str, model: str, head: Path, reason: str) -> Path:
    """``<folder>/manifest.json`` of a stage that skipped ``model`` because its valence head
    ``head`` is degenerate: ``skipped`` holds the reason (also logged as a warning)."""
    import logging

    from object2brain.io import write_json
    from object2brain.manifest import build_manifest

    logging.getLogger("object2brain.heads").warning(
        "%s: skipping %s, its valence head %s is degenerate (%s)", command, model, head, reason
    )
    payload = build_manifest(
        command,
        {"model": model, "head": str(head)},
        extra={"skipped": {"model": model, "reason": f"degenerate valence head: {reason}"}},
    )
    folder.mkdir(parents=True, exist_ok=True)
    return write_json(folder / "manifest.json", payload)

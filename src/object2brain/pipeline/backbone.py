"""Models of a study that share a backbone are extracted once.

Two models share a backbone when their architecture, weights (by content), extracted layers,
input preprocessing (fixed by architecture and weights), the extraction options, stimuli and
seed are the same (``object2brain.pipeline.stages.backbone_key``), e.g. one network with two
valence heads. The later model's store is then written from the first's (:func:`write_shared`):
the same layers, its own name, its own ``valence`` layer, and the attributes, fingerprint and
manifest of a store extracted for it alone (plus ``backbone_from``, the first store's name).

Its ``valence`` layer is

- none, when it has no head;
- the supplied values (the out-of-fold predictions of heads cross-fitted in the study);
- its own head applied to the head's input features, batch by batch, when it has a head file:
  the first model's extraction captures the input of the layer the head replaces
  (:func:`capturing`, a forward pre-hook, one tensor per batch) and :func:`head_valence` runs
  the head on those same batches, so the values are bit-identical to a separate extraction on
  the CPU (same batches, same operation).

A model ADDED to a finished study is served the same way: every local extraction also keeps the
input of the layer its own head replaces (its output layer when it has no head; kept only when it
has at most :data:`KEPT_LIMIT` values per stimulus, e.g. 512 for resnet18, 4096 for alexnet,
and :data:`KEPT_BYTES` in all, so memory and disk stay bounded) and
writes these batches next to its store, in its stage folder (``<out>/activations/.<model>/
head_inputs.h5``, :func:`write_head_inputs`): one dataset per layer with the rows of each batch,
the original dtype, the backbone key and the fingerprint of the store it came with. A later run
reads them (:func:`read_head_inputs`) when the backbone key and the store's fingerprint match, so
the added model reads no image. The file is a cache, not a stage output: when it is missing or
stale the model is extracted in full. Without captured features (the first model's store was
resumed mid-way, or written by Ray workers, where nothing is captured; or its head input is
larger than the limit) the model is likewise extracted in full: the safe fallback.

A head replacing a layer that the stores record (``models.N.layers`` naming the output layer)
changes that layer's values, so such models never share.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from object2brain.io import atomic_path

if TYPE_CHECKING:
    import torch

    from object2brain.activations.extract import ExtractionPlan
    from object2brain.models.zoo import LoadedModel
    from object2brain.pipeline.config import ModelConfig
    from object2brain.pipeline.stages import Study

log = logging.getLogger("object2brain.run")

VALENCE_LAYER = "valence"

#: per batch, the input of one layer ``(batch, ...)`` as the forward pass computed it
Batches = list["torch.Tensor"]

#: the most values per stimulus of a head input kept for models added to the study later
#: (16384 float32 values = 64 KiB per stimulus, 64 MB for 1000 stimuli)
KEPT_LIMIT = 16384
#: the most bytes of one such input kept in all (e.g. 73,000 stimuli x 512 float32 = 150 MB)
KEPT_BYTES = 512 << 20

HEAD_INPUTS_FILE = "head_inputs.h5"


def head_inputs_file(out: Path, label: str) -> Path:
    """Where model ``label``'s extraction keeps its head inputs: its stage folder."""
    return out / "activations" / f".{label}" / HEAD_INPUTS_FILE


def needs_head_pass(study: Study, model: ModelConfig) -> bool:
    """Whether ``model``'s valence layer comes from its head's forward pass (a head file and no
    supplied valence)."""
    return study.heads.get(model.label) is not None and model.label not in study.out_of_fold


def head_layer(head: Path, output_layer: str) -> str:
    """The layer a head file replaces (its sidecar's ``replaced_layer``, else the network's
    output layer ``output_layer``), whose input the head reads."""
    from object2brain.heads.io import load_head

    return str(load_head(head)[1].get("replaced_layer") or output_layer)


def shared_source(
    study: Study, model: ModelConfig, backbone_key: Callable[[ModelConfig], str], output_layer: str
) -> Path | None:
    """The store of an earlier model of ``study`` (extracted in this run, or reused from an
    earlier one) whose backbone ``model`` shares (the same ``backbone_key``: architecture,
    weights by content, layers, extraction options, stimuli, seed) and from which ``model``'s
    store can be written (for a model with a head file: that store's extraction captured the
    head's input, in this run or in the file :func:`write_head_inputs` wrote); else None."""
    mine = backbone_key(model)
    head = study.heads.get(model.label)
    layer = None if head is None else head_layer(head, output_layer)
    for other in study.config.models:
        if other.label == model.label:
            return None  # only models before this one
        store = study.stores.get(other.label)
        if store is None or not store.is_file() or backbone_key(other) != mine:
            continue
        if not _layers_untouched(store, layer):
            continue
        if needs_head_pass(study, model) and not _has_head_input(study, other, mine, store, layer):
            continue
        return store
    return None


def _has_head_input(
    study: Study, other: ModelConfig, backbone: str, store: Path, layer: str | None
) -> bool:
    """Whether ``other``'s extraction captured ``layer``'s input, in this run or (read into
    ``study.head_inputs``) in the file it wrote next to ``store``."""
    captured = study.head_inputs.get(other.label, {})
    if layer is None or layer in captured:
        return layer is not None
    batches = read_head_inputs(head_inputs_file(study.out, other.label), backbone, store, layer)
    if batches is None:
        return False
    study.head_inputs.setdefault(other.label, {})[layer] = batches
    return True


def _layers_untouched(store: Path, layer: str | None) -> bool:
    """Whether the layers ``store`` records hold neither its own head's output nor ``layer``
    (the layer another head replaces)."""
    import h5py

    with h5py.File(store, "r") as handle:
        order = set(json.loads(handle.attrs["order"]))
        head = str(handle.attrs.get("head", "none"))
    replaced = {layer} if layer is not None else set()
    if head != "none":
        replaced.add(str(json.loads(head).get("replaced_layer")))
    return not any(n == r or n.startswith(f"{r}.") for n in order for r in replaced)


def capture_layers(
    study: Study, model: ModelConfig, backbone_key: Callable[[ModelConfig], str], output_layer: str
) -> set[str]:
    """The layers whose input ``model``'s extraction should capture: those the heads of later
    models on the same backbone replace (models whose valence needs their head's pass)."""
    models = study.config.models
    later = models[[m.label for m in models].index(model.label) + 1 :]
    mine, layers = backbone_key(model), set()
    for other in later:
        head = study.heads.get(other.label)
        if head is not None and needs_head_pass(study, other) and backbone_key(other) == mine:
            layers.add(head_layer(head, output_layer))
    return layers


def layers_to_capture(
    study: Study,
    model: ModelConfig,
    backbone_key: Callable[[ModelConfig], str],
    loaded: LoadedModel,
) -> tuple[set[str], set[str]]:
    """What ``model``'s extraction (``loaded``: with its head) captures: the layers later models
    of this run need (:func:`capture_layers`) and the layer whose input is kept beside its store
    for models added later (the layer its head replaces, else its output layer). Nothing on
    Ray workers (``executor: ray``), where no hook of this process sees the forward pass."""
    if study.config.executor.kind != "local":
        return set(), set()
    head = study.heads.get(model.label)
    own = head_layer(head, loaded.output_layer) if head is not None else loaded.output_layer
    return capture_layers(study, model, backbone_key, loaded.output_layer), {own}


@contextmanager
def capturing(
    module: torch.nn.Module, layers: set[str], optional: set[str] | frozenset[str] = frozenset()
) -> Iterator[dict[str, Batches]]:
    """While open, every forward pass of ``module`` appends the input of each of ``layers`` to
    ``captured[layer]`` (a detached copy, on its device). A layer of ``optional`` whose input
    has more than :data:`KEPT_LIMIT` values per row, or more than :data:`KEPT_BYTES` in all, is
    not kept (dropped when the block ends)."""
    captured: dict[str, Batches] = {layer: [] for layer in sorted(layers | set(optional))}
    dropped: set[str] = set()
    held: dict[str, int] = {}  # bytes captured per optional layer
    handles = []
    for layer in captured:

        def hook(
            _: Any, inputs: tuple[Any, ...], into: Batches = captured[layer], name: str = layer
        ) -> None:
            tensor = inputs[0]
            if name in optional:
                held[name] = held.get(name, 0) + tensor.numel() * tensor.element_size()
                if tensor[0].numel() > KEPT_LIMIT or held[name] > KEPT_BYTES:
                    dropped.add(name)
                    into.clear()
            if name not in dropped:
                into.append(tensor.detach().clone())

        handles.append(module.get_submodule(layer).register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for layer in dropped:
            captured.pop(layer, None)


def write_head_inputs(
    path: Path, kept: dict[str, Batches], backbone: str, store: Path
) -> Path | None:
    """Write the captured head inputs ``kept`` (one pass over every stimulus, per layer its
    batches; layers with more than :data:`KEPT_LIMIT` values per stimulus left out) to ``path``
    atomically: per layer the rows ``(n, ...)`` (bfloat16 stored as float32, exactly), the rows
    of each batch and the dtype; the ``backbone`` key and the fingerprint of ``store``, the store
    they came with. None when no layer is kept."""
    import h5py
    import torch

    kept = {k: v for k, v in kept.items() if v and v[0][0].numel() <= KEPT_LIMIT}
    if not kept:
        return None

    with h5py.File(store, "r") as handle:
        store_fingerprint = str(handle.attrs["fingerprint"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp, h5py.File(temp, "w") as handle:
        handle.attrs["backbone_key"] = backbone
        handle.attrs["store_fingerprint"] = store_fingerprint
        for layer, batches in kept.items():
            rows = torch.cat([b.detach().cpu() for b in batches])
            dtype = str(rows.dtype).removeprefix("torch.")
            data = rows.float() if rows.dtype == torch.bfloat16 else rows
            dataset = handle.create_dataset(f"layers/{layer}", data=data.numpy())
            dataset.attrs["batch_rows"] = json.dumps([int(b.shape[0]) for b in batches])
            dataset.attrs["dtype"] = dtype
    return path


def read_head_inputs(path: Path, backbone: str, store: Path, layer: str) -> Batches | None:
    """The batches of ``layer``'s input that :func:`write_head_inputs` wrote to ``path``, as
    they were captured (same rows per batch, same dtype, on the CPU); None when the file is
    missing, holds no ``layer``, or another backbone's or another store's inputs."""
    import h5py
    import torch

    if not path.is_file() or not store.is_file():
        return None
    with h5py.File(store, "r") as handle:
        store_fingerprint = str(handle.attrs.get("fingerprint", ""))
    try:
        with h5py.File(path, "r") as handle:
            same = handle.attrs.get("backbone_key") == backbone and (
                handle.attrs.get("store_fingerprint") == store_fingerprint
            )
            if not same or f"layers/{layer}" not in handle:
                return None
            dataset = handle[f"layers/{layer}"]
            rows = json.loads(dataset.attrs["batch_rows"])
            dtype = getattr(torch, str(dataset.attrs["dtype"]))
            data = torch.from_numpy(dataset[()]).to(dtype)
    except (OSError, KeyError, ValueError):
        log.warning("%s: unreadable, extracting in full", path)
        return None
    return list(torch.split(data, rows))


def whole_run(captured: dict[str, Batches], n_rows: int) -> dict[str, Batches]:
    """The captured batches of one pass over all ``n_rows`` stimuli (the blank probe pass before
    it dropped); empty when the extraction did not compute every row (reused or resumed)."""
    kept: dict[str, Batches] = {}
    for layer, batches in captured.items():
        rows = [int(b.shape[0]) for b in batches]
        while rows and sum(rows) > n_rows:
            rows.pop(0)
        if rows and sum(rows) == n_rows:
            kept[layer] = batches[len(batches) - len(rows) :]
    return kept


def head_valence(loaded: LoadedModel, layer: str, batches: Batches, plan: ExtractionPlan) -> Any:
    """Layer ``valence`` ``(n,)`` as the extraction of ``loaded`` (its head in place of
    ``layer``) would store it: the head on each captured batch of its input, ``[:, 0]``, in the
    plan's device, mixed precision and storage dtype."""
    import torch

    from object2brain.activations.extract import _autocast

    head = loaded.module.to(plan.device).eval().get_submodule(layer)
    values = []
    with torch.inference_mode(), _autocast(plan.device, plan.options.amp):
        for batch in batches:
            output = head(batch.to(plan.device))
            values.append(output.reshape(output.shape[0], -1)[:, 0].float().cpu().numpy())
    return np.concatenate(values).astype(plan.storage_dtype)


def write_shared(
    source: Path, target: Path, plan: ExtractionPlan, valence: np.ndarray | None, seconds: float
) -> Path:
    """Write ``target``: ``source``'s layers with layer ``valence`` (none when None) in place
    of the source's, the attributes and fingerprint of ``plan`` (the store extracted alone),
    ``backbone_from``; atomically, then its manifest."""
    import h5py

    from object2brain.activations.extract import write_manifest
    from object2brain.activations.store import _attr_value

    with atomic_path(target) as temp:
        shutil.copyfile(source, temp)
        with h5py.File(temp, "r+") as handle:
            order = [n for n in json.loads(handle.attrs["order"]) if n != VALENCE_LAYER]
            if f"layers/{VALENCE_LAYER}" in handle:
                del handle[f"layers/{VALENCE_LAYER}"]
            if valence is not None:
                rows = int(max(1, min(len(valence), (4 << 20) // valence.dtype.itemsize)))
                handle["layers"].create_dataset(
                    VALENCE_LAYER, data=valence, chunks=(rows,), fletcher32=True
                )
                order.append(VALENCE_LAYER)
            if "valence_source" in handle.attrs:
                del handle.attrs["valence_source"]
            for key, value in plan.store_attrs().items():
                handle.attrs[key] = _attr_value(value)
            handle.attrs["order"] = _attr_value(order)
            if "srp" in handle.attrs:
                srp = json.loads(handle.attrs["srp"])
                srp["unprojected_layers"] = sorted(set(order) - set(srp["projected_layers"]))
                handle.attrs["srp"] = _attr_value(srp)
            handle.attrs["fingerprint"] = plan.fingerprint
            handle.attrs["backbone_from"] = str(source.name)
    write_manifest(plan, target, seconds=seconds)
    log.info("extract %s: backbone shared with %s (written from it, not extracted again)",
             plan.loaded.name, source.name)  # fmt: skip
    return target

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
  the CPU (same batches, same operation). Without captured features (the first model's store
  was reused from an earlier run, resumed, or written by Ray workers) such a model is extracted
  in full.

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
    """The store of an earlier model of ``study`` (extracted in this run) whose backbone
    ``model`` shares (the same ``backbone_key``: architecture, weights by content, layers,
    extraction options, stimuli, seed) and from which ``model``'s store can be written (for a
    model with a head file: that store's extraction captured the head's input); else None."""
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
        if needs_head_pass(study, model) and layer not in study.head_inputs.get(other.label, {}):
            continue
        return store
    return None


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


@contextmanager
def capturing(module: torch.nn.Module, layers: set[str]) -> Iterator[dict[str, Batches]]:
    """While open, every forward pass of ``module`` appends the input of each of ``layers`` to
    ``captured[layer]`` (a detached copy, on its device)."""
    captured: dict[str, Batches] = {layer: [] for layer in sorted(layers)}
    handles = []
    for layer in captured:

        def hook(_module: Any, inputs: tuple[Any, ...], into: Batches = captured[layer]) -> None:
            into.append(inputs[0].detach().clone())

        handles.append(module.get_submodule(layer).register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


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
            output = head(batch)
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

"""Models of a study that share a backbone are extracted once.

Two models share a backbone when their architecture, weights (by content), extracted layers,
input preprocessing (fixed by architecture and weights), the extraction options, stimuli and
seed are the same (``object2brain.pipeline.stages.backbone_key``), e.g. one network with two
valence heads. The second model's store is then a copy of the first's (:func:`copy_backbone`)
with its own name and its own ``valence`` layer, when that layer needs no forward pass: the
model has no head, or its valence is supplied (the out-of-fold predictions of heads
cross-fitted in the study). A model with its own head file and no supplied valence is extracted
in full (its head's outputs need the forward pass).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from object2brain.io import atomic_path

if TYPE_CHECKING:
    from object2brain.pipeline.config import ModelConfig
    from object2brain.pipeline.stages import Study

log = logging.getLogger("object2brain.run")

VALENCE_LAYER = "valence"


def shared_source(
    study: Study, model: ModelConfig, backbone_key: Callable[[ModelConfig], str]
) -> Path | None:
    """The store of an earlier model of ``study`` (extracted in this run) whose backbone
    ``model`` shares (the same ``backbone_key``: architecture, weights by content, layers,
    extraction options, stimuli, seed), when ``model``'s valence layer needs no forward pass;
    else None."""
    head, supplied = study.heads.get(model.label), study.out_of_fold.get(model.label)
    if head is not None and supplied is None:
        return None
    mine = backbone_key(model)
    for other in study.config.models:
        if other.label == model.label:
            return None  # only models before this one
        store = study.stores.get(other.label)
        if store is not None and store.is_file() and backbone_key(other) == mine:
            return store
    return None


def copy_backbone(
    source: Path, target: Path, label: str, head: Path | None, valence: np.ndarray | None
) -> Path:
    """Write ``target``: ``source``'s store renamed to model ``label``, with layer ``valence``
    ``(n,)`` float32 (``valence``; none when None) in place of the source's; atomically."""
    import h5py

    with atomic_path(target) as temp:
        shutil.copyfile(source, temp)
        with h5py.File(temp, "r+") as handle:
            order = [n for n in json.loads(handle.attrs["order"]) if n != VALENCE_LAYER]
            if f"layers/{VALENCE_LAYER}" in handle:
                del handle[f"layers/{VALENCE_LAYER}"]
            if valence is not None:
                handle.create_dataset(f"layers/{VALENCE_LAYER}", data=valence.astype(np.float32))
                order.append(VALENCE_LAYER)
                handle.attrs["valence_source"] = "supplied"
            elif "valence_source" in handle.attrs:
                del handle.attrs["valence_source"]
            handle.attrs["order"] = json.dumps(order)
            handle.attrs["model"] = label
            handle.attrs["head"] = _head_attr(head)
            handle.attrs["backbone_from"] = str(source.name)
            previous = str(handle.attrs.get("fingerprint", ""))
            extra = b"" if valence is None else valence.astype(np.float32).tobytes()
            handle.attrs["fingerprint"] = hashlib.sha256(
                previous.encode() + label.encode() + extra
            ).hexdigest()
    log.info("extract %s: backbone shared with %s (copied, not extracted again)", label,
             source.name)  # fmt: skip
    return target


def _head_attr(head: Path | None) -> str:
    if head is None:
        return "none"
    from object2brain.heads.io import load_head

    meta: dict[str, Any] = load_head(head)[1]
    return json.dumps({**meta, "path": str(head.resolve())}, default=str)

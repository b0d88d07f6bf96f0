"""Writing the outputs of head training (:class:`~object2brain.heads.train.HeadsResult`).

Files under the output folder ``<out>``::

    split.csv                      stimulus_id, valence, level, split (train|val|test)
    missing_images.csv             source rows whose image is absent or unreadable (if any)
    head_metrics.csv|.parquet      one row per model and split (tables.HEAD_METRICS)
    manifest.json                  options, inputs by SHA-256 / fingerprint, outputs, timings
    <model>/head.safetensors       the head (weight (1, in_features), bias (1,))
    <model>/head.json              what it fits: backbone, replaced layer, split, options, metrics
    <model>/metrics.json           regression metrics per split and level, training history
    <model>/predictions.csv        stimulus_id, split, valence, level, predicted
    <model>/out_of_fold.csv        stimulus_id, fold, valence, level, predicted (cross-fitting)
    <model>/head.fold<k>.safetensors  selection fold head k (fitted without selection fold k)
    <model>/head.fold<k>.json      its sidecar: fold, n_folds, held_out (fold k's stimulus ids)
    <model>/features.h5            the feature store (written while computing, see .features)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from object2brain.heads.io import fold_head_name, save_head, sidecar_path
from object2brain.heads.train import OUT_OF_FOLD_NAME, HeadFit, HeadsResult, json_ready, uses_cache

log = logging.getLogger("object2brain.heads")

SPLIT_NAME = "split.csv"
MISSING_NAME = "missing_images.csv"
MANIFEST_NAME = "manifest.json"
HEAD_NAME = "head.safetensors"
METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.csv"


@dataclass(frozen=True)
class RunRecord:
    """What the manifest records about the call beyond the result: inputs as given, timing.

    Attributes:
        findingemo, image_root, stimuli, split: the rated set and split file as given (or
            ``None``).
        device: the device the heads were trained on (``cpu``, ``cuda:0``, ...).
        started: ``time.time()`` at the start of the call.
    """

    findingemo: str | None
    image_root: str | None
    stimuli: str | None
    split: str | None
    device: str
    started: float


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    from object2brain.io import atomic_path

    with atomic_path(path) as temp:
        frame.to_csv(temp, index=False)
    return path


def _write_missing(result: HeadsResult, out: Path) -> Path | None:
    data = result.rated.data
    if not len(data.missing):
        return None
    path = _write_csv(data.missing, out / MISSING_NAME)
    log.warning(
        "%d of %d annotated images are missing or unreadable under the image root and were "
        "skipped; listed in %s",
        len(data.missing),
        len(data.missing) + len(data.stimuli),
        path,
    )
    return path


def head_metadata(fit: HeadFit, result: HeadsResult, split_path: Path) -> dict[str, Any]:
    """The sidecar ``head.json`` of one head (``in_features`` is added by ``save_head``)."""
    from object2brain._version import __version__
    from object2brain.manifest import file_sha256

    loaded, options, rows = fit.model.loaded, result.options, result.rated.rows
    return dict(
        json_ready(
            {
                "model": fit.model.name,
                "arch": loaded.arch,
                "backbone_weights": loaded.weights,
                "backbone_weights_sha256": loaded.weights_sha256,
                "replaced_layer": loaded.output_layer,
                "feature_dim": fit.model.sources.in_features,
                "preprocessing": loaded.preprocessing.to_dict(),
                "loss": options.loss,
                "level_weights": {str(k): v for k, v in (fit.fit.level_weights or {}).items()},
                "valence_range": list(result.rated.data.valence_range),
                "split_file": str(split_path.resolve()),
                "split_sha256": file_sha256(split_path),
                **{f"n_{part}": len(part_rows) for part, part_rows in rows.items()},
                "augment": options.augment,
                "epochs": options.epochs,
                "epochs_run": len(fit.fit.history),
                "best_epoch": fit.fit.best_epoch,
                "patience": options.patience,
                "lr": options.lr,
                "weight_decay": options.weight_decay,
                "batch_size": options.batch_size,
                "seed": result.runtime.seed,
                "metrics": {"test": fit.metrics["test"], "val": fit.metrics["val"]},
                "degenerate": fit.degenerate is not None,
                "degenerate_reason": fit.degenerate,
                "object2brain_version": __version__,
            }
        )
    )


def write_head(fit: HeadFit, result: HeadsResult, out: Path, split_path: Path) -> list[Path]:
    """One model's files: out-of-fold predictions, predictions, metrics, head and sidecar."""
    from object2brain.io import write_json

    folder = out / fit.model.name
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if fit.out_of_fold is None:  # an earlier run's predictions would no longer match this head
        (folder / OUT_OF_FOLD_NAME).unlink(missing_ok=True)
    else:
        written.append(_write_csv(fit.out_of_fold, folder / OUT_OF_FOLD_NAME))
    written.append(_write_csv(fit.predictions, folder / PREDICTIONS_NAME))
    written.append(write_json(folder / METRICS_NAME, fit.metrics))
    metadata = head_metadata(fit, result, split_path)
    head_path = save_head(fit.head, folder / HEAD_NAME, metadata)
    return [
        *written,
        head_path,
        sidecar_path(head_path),
        *write_fold_heads(fit, result, metadata, folder),
    ]


def write_fold_heads(
    fit: HeadFit, result: HeadsResult, metadata: dict[str, Any], folder: Path
) -> list[Path]:
    """The selection fold heads of one model (``head.fold<k>.safetensors`` + sidecar): the main
    head's sidecar ``metadata`` with ``fold``, ``n_folds``, ``held_out`` (the ids of fold
    ``k``'s stimuli, never trained on), ``best_epoch`` and ``epochs_run`` of that head, in
    ``folder`` (the model's folder). Fold
    heads of an earlier run are removed first (they would no longer match this split)."""
    for stale in folder.glob("head.fold*.*"):
        stale.unlink()
    selection = result.rated.selection
    if selection is None or not fit.fold_heads:
        return []
    ids = list(result.rated.data.stimuli.ids)
    written: list[Path] = []
    n_folds = len(fit.fold_heads)
    for k, head_fit in enumerate(fit.fold_heads):
        held_out = [sid for sid, f in zip(ids, selection, strict=True) if f == k]
        entry = dict(metadata) | {
            "fold": k,
            "n_folds": n_folds,
            "held_out": held_out,
            "best_epoch": head_fit.best_epoch,
            "epochs_run": len(head_fit.history),
            "fold_definition": "condition_folds (stratified by condition), seed "
            f"{result.runtime.seed}",
        }
        entry.pop("metrics", None)  # the main head's
        path = save_head(head_fit.head, folder / fold_head_name(k), json_ready(entry))
        written += [path, sidecar_path(path)]
    return written


def _manifest(
    result: HeadsResult, out: Path, record: RunRecord, split_path: Path, outputs: list[Path]
) -> dict[str, Any]:
    from object2brain.manifest import build_manifest, file_sha256, output_list

    data, options = result.rated.data, result.options
    models = [fit.model for fit in result.heads.values()]
    inputs = {"split": file_sha256(split_path)}
    if data.source is not None and data.source.is_file():
        inputs["ratings"] = file_sha256(data.source)
    inputs["images_fingerprint"] = data.stimuli.fingerprint()
    inputs |= {f"weights:{m.name}": m.loaded.weights_sha256 for m in models}
    config = {
        "models": [m.loaded.arch for m in models],
        "names": [m.name for m in models],
        "weights": [m.loaded.weights for m in models],
        "findingemo": record.findingemo,
        "image_root": record.image_root,
        "stimuli": record.stimuli,
        "split": record.split,
        "fractions": list(options.fractions),
        "valence_range": list(data.valence_range),
        "loss": options.loss,
        "augment": options.augment,
        "cache": uses_cache(options),
        "cross_fit": result.rated.n_folds,
        "selection_folds": 0
        if result.rated.selection is None
        else int(result.rated.selection.max()) + 1,
        **{k: getattr(options, k) for k in ("epochs", "patience", "lr", "weight_decay")},
        "batch_size": options.batch_size,
        "device": record.device,
        "out": str(out),
    }
    extra = {
        "n_images": len(data.stimuli),
        "n_missing": len(data.missing),
        "n_split": {k: len(v) for k, v in result.rated.rows.items()},
        "seconds": round(time.time() - record.started, 3),
        "models": {
            name: {"seconds": fit.seconds, "features_reused": fit.model.reused}
            for name, fit in result.heads.items()
        },
    }
    return build_manifest(
        "train-head",
        config,
        seeds={"seed": result.runtime.seed},
        inputs=inputs,
        outputs=output_list(outputs, out),
        extra=extra,
    )


def write_heads(
    result: HeadsResult, out: Path, *, record: RunRecord, figures: Sequence[Path] = ()
) -> list[Path]:
    """Write every file of a training run (module docstring) and its manifest, listing
    ``figures`` (drawn by the caller) among the outputs.

    Returns:
        Every file written, sorted, the manifest included.
    """
    from object2brain.data.splits import save_split
    from object2brain.io import write_json, write_table

    out.mkdir(parents=True, exist_ok=True)
    split_path = save_split(result.rated.split, out / SPLIT_NAME)
    missing_path = _write_missing(result, out)
    written: list[Path] = [*figures]
    for fit in result.heads.values():
        written += write_head(fit, result, out, split_path)
    written += write_table(result.head_metrics, out, "head_metrics")
    written += [split_path, *([missing_path] if missing_path else [])]
    manifest = _manifest(result, out, record, split_path, written)
    manifest_path = write_json(out / MANIFEST_NAME, manifest)
    return sorted([*written, manifest_path])

"""The stages of a study, as a registry: each an entry with its name, its cache key and its work.

A :class:`Stage` says when it applies, where its outputs go, what its key is made of (its
options, its inputs by content, the keys of the stages it reads) and how it runs; ``publish``
records what later stages read (a head file, a store, the simulated brain data) whether the stage
ran or was reused. :data:`STAGES` lists them in run order, and :func:`run_stages` is the loop over
it, so adding a stage is adding one entry.

Keys: the SHA-256 of a JSON payload (:func:`digest`). Inputs enter by content, never by path, so a
moved study keeps its stages. :class:`StageCache` runs a stage, or reuses it when its folder's
``.stage.json`` holds the same key and every output it lists still exists.

Every stage is called through :mod:`object2brain.api` (the same functions as ``o2b.<stage>``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from object2brain.data.brain import brain_files
from object2brain.data.stimuli import StimulusSet
from object2brain.io import write_json
from object2brain.manifest import cached_file_sha256, output_list
from object2brain.options import DuplicateRatings, EncodeOptions, StageOptions
from object2brain.pipeline.config import ModelConfig, RunConfig

if TYPE_CHECKING:
    from object2brain.models.zoo import LoadedModel

log = logging.getLogger("object2brain.run")

STAGE_FILE = ".stage.json"
#: Files a train-head stage writes per model (``heads/<model>/...``) and once (``heads/...``).
HEAD_FILE, OUT_OF_FOLD_FILE, SPLIT_FILE = "head.safetensors", "out_of_fold.csv", "split.csv"
#: Options that change how fast a stage runs, never what it writes: not part of its key.
_SPEED_ONLY = frozenset({"num_workers", "detection_cache", "image_cache"})


def digest(payload: Any) -> str:
    """SHA-256 of ``payload`` as canonical JSON (sorted keys; paths and the like as text)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(path: Path | None) -> str | None:
    """SHA-256 of a file, or of a folder's files (relative names and contents)."""
    if path is None:
        return None
    if path.is_dir():
        return digest(
            sorted(
                (p.relative_to(path).as_posix(), cached_file_sha256(p))
                for p in path.rglob("*")
                if p.is_file()
            )
        )
    return cached_file_sha256(path)


def brain_hashes(path: Path | None) -> dict[str, str]:
    """SHA-256 of brain data, by path relative to ``path``'s folder: the file given and every
    file a YAML manifest names (in the manifest's order)."""
    if path is None:
        return {}
    return {_relative_name(f, path.parent): cached_file_sha256(f) for f in brain_files(path)}


def column_key(stimuli: StimulusSet, column: str) -> str | None:
    """SHA-256 of one column of the stimulus table, by stimulus id (None without the column)."""
    if column not in stimuli.table:
        return None
    return digest(list(zip(stimuli.ids, stimuli.table[column].astype(str), strict=True)))


def model_key(model: ModelConfig) -> dict[str, Any]:
    """A model's options, with its checkpoint's SHA-256 (a file replaced at the same path is a
    new model) or, for named weights, the torchvision version that defines them."""
    from importlib.metadata import version

    key: dict[str, Any] = model.model_dump(mode="json", exclude={"head"})
    weights = Path(model.weights)
    if weights.is_file():
        key["weights"] = cached_file_sha256(weights)  # not its path: a moved study keeps its key
    elif model.weights.lower() != "none":
        key["torchvision"] = version("torchvision")
    return key


def options_key(options: StageOptions, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A stage's options as they enter its key (options that only change speed left out)."""
    dumped: dict[str, Any] = options.model_dump(mode="json", exclude=set(_SPEED_ONLY | exclude))
    return dumped


def _relative_name(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` where it lies under it (e.g. ``sub-01/betas.nii.gz``)."""
    return path.relative_to(start).as_posix() if path.is_relative_to(start) else str(path)


class StageCache:
    """Runs stages, or reuses them; ``.stage.json`` lists outputs relative to ``out`` (a moved
    study folder keeps its stages)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.ran: list[str] = []
        self.reused: list[str] = []
        self.keys: dict[str, str] = {}
        self.outputs: list[Path] = []
        #: seconds per stage: measured when it ran, recorded in its .stage.json when reused
        self.seconds: dict[str, float] = {}

    def run(self, name: str, folder: Path, key_payload: Any, work: Callable[[], list[Path]]) -> str:
        """Run ``work`` unless ``folder/.stage.json`` has the same key and its outputs exist."""
        key = digest(key_payload)
        marker = folder / STAGE_FILE
        if marker.is_file():
            record = json.loads(marker.read_text())
            outputs = [self.out / p for p in record.get("outputs", [])]  # absolute: older runs
            inside = all(p.resolve().is_relative_to(self.out.resolve()) for p in outputs)
            if record.get("key") == key and inside and all(p.exists() for p in outputs):
                log.info("stage %s: unchanged, reusing %s", name, folder)
                self.seconds[name] = float(record.get("seconds", 0.0))
                self._record(name, key, outputs, self.reused)
                return key
        log.info("stage %s: running", name)
        started = time.time()
        folder.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        outputs = work()
        seconds = round(time.time() - started, 2)
        write_json(
            marker, {"key": key, "outputs": output_list(outputs, self.out), "seconds": seconds}
        )
        self.seconds[name] = seconds
        log.info("stage %s: done in %.1f s", name, seconds)
        self._record(name, key, outputs, self.ran)
        return key

    def _record(self, name: str, key: str, outputs: list[Path], into: list[str]) -> None:
        into.append(name)
        self.keys[name] = key
        self.outputs += outputs


@dataclass
class Study:
    """What the stages of one run share: the config, the loaded stimulus set, the stage cache,
    and what earlier stages produced for later ones."""

    config: RunConfig
    stimuli: StimulusSet
    progress: bool
    cache: StageCache
    #: the stimulus ids and image bytes (what extraction reads)
    stimuli_key: str
    #: the whole stimulus table (conditions, valence, ...)
    table_key: str | None
    brain: Path | None
    ratings: Path | None
    heads: dict[str, Path | None]
    #: stimuli the main heads trained in this run were not fitted on
    held_out: list[str] | None = None
    #: the stimuli of behavior_direct (None: all)
    rsa_held_out: list[str] | None = None
    #: model -> cross-fitted predictions (its store's 'valence' layer)
    out_of_fold: dict[str, Path] = field(default_factory=dict)
    backbone_stores: dict[str, Path] = field(default_factory=dict)
    #: model -> layer -> per batch, that layer's input in the model's extraction (the features
    #: later models' heads on the same backbone read; :mod:`object2brain.pipeline.backbone`)
    head_inputs: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    stores: dict[str, Path] = field(default_factory=dict)
    filter_tables: list[Path] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.config.out

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def device(self) -> str:
        return self.config.device

    def load(self, model: ModelConfig, head: Path | None = None) -> LoadedModel:
        """``model`` loaded (with ``head``), its random weights from the study's seed."""
        from object2brain.models.zoo import load_model

        return load_model(model.arch, model.weights, head=head, seed=self.seed, name=model.label)

    def untrained(self) -> list[ModelConfig]:
        """The models without a head given in the config."""
        return [m for m in self.config.models if m.head is None]

    def data_key(self) -> dict[str, Any]:
        """The key of the analysis data: brain, ratings, stimuli and every model's store."""
        brain = list(brain_hashes(self.brain).values()) if self.brain is not None else None
        return {
            "brain": brain,
            "ratings": fingerprint(self.ratings),
            "stimuli": self.stimuli_key,
            "stimulus_table": self.table_key,
            "extract": [self.cache.keys[f"extract:{m.label}"] for m in self.config.models],
        }


Unit = ModelConfig | None  # the model of a per-model stage; None for a stage run once


def _nothing(study: Study, model: Unit) -> None:
    """The ``publish`` of a stage that later stages do not read."""


@dataclass(frozen=True)
class Stage:
    """One entry of the registry (see the module docstring)."""

    name: str
    enabled: Callable[[Study], bool]
    folder: Callable[[Study, Unit], Path]
    key: Callable[[Study, Unit], dict[str, Any]]
    run: Callable[[Study, Unit], list[Path]]
    per_model: bool = False
    publish: Callable[[Study, Unit], None] = _nothing


def run_stages(study: Study, stages: list[Stage] | None = None) -> None:
    """Run (or reuse) every enabled stage of ``stages`` (default :data:`STAGES`) in order."""
    for stage in STAGES if stages is None else stages:
        if not stage.enabled(study):
            continue
        units: list[Unit] = list(study.config.models) if stage.per_model else [None]
        for model in units:
            name = stage.name if model is None else f"{stage.name}:{model.label}"

            def work(stage: Stage = stage, model: Unit = model) -> list[Path]:
                return stage.run(study, model)

            study.cache.run(name, stage.folder(study, model), stage.key(study, model), work)
            stage.publish(study, model)


def _model(model: Unit) -> ModelConfig:
    assert model is not None, "a per-model stage"
    return model


# --- extract ---------------------------------------------------------------------------------


def _store(study: Study, model: Unit, *, backbone: bool) -> Path:
    suffix = ".backbone.h5" if backbone else ".h5"
    return study.out / "activations" / f"{_model(model).label}{suffix}"


def _extract(study: Study, model: Unit, *, backbone: bool) -> list[Path]:
    """``model`` into its store; with its head (and cross-fitted valence) unless ``backbone``.
    A stage replaces its own store."""
    from object2brain.api.extract import extract
    from object2brain.pipeline import backbone as shared_backbone

    options, model = study.config.extract, _model(model)
    head = None if backbone else study.heads[model.label]
    path = _store(study, model, backbone=backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    loaded = study.load(model, head)
    shared = None if backbone else _shared_backbone(study, model, path, loaded)
    if shared is not None:
        return [shared]
    key = lambda each: backbone_key(study, each)  # noqa: E731
    sidecar = shared_backbone.head_inputs_file(study.out, model.label)
    capture: set[str] = set()
    kept_for_later: set[str] = set()  # written beside the store for models added later
    if not backbone:
        sidecar.unlink(missing_ok=True)
        capture, kept_for_later = shared_backbone.layers_to_capture(study, model, key, loaded)
    with shared_backbone.capturing(loaded.module, capture, kept_for_later - capture) as captured:
        store = extract(
            loaded,
            study.stimuli,
            out=path,
            layers=model.layers,
            options=options,
            device=study.device,
            seed=study.seed,
            overwrite=True,
            progress=study.progress,
            valence=None if backbone else study.out_of_fold.get(model.label),
            executor=study.config.executor.kind,
            ray_address=study.config.executor.address,
        )
    kept = shared_backbone.whole_run(captured, len(study.stimuli))
    if kept:
        study.head_inputs[model.label] = kept
        later = {layer: kept[layer] for layer in kept_for_later if layer in kept}
        shared_backbone.write_head_inputs(sidecar, later, backbone_key(study, model), store)
    return [store]


def _shared_backbone(
    study: Study, model: ModelConfig, path: Path, loaded: LoadedModel
) -> Path | None:
    """``path`` written from an earlier model's store with the same backbone (see
    :mod:`object2brain.pipeline.backbone`), or None: extract it. ``loaded``: ``model`` with its
    head."""
    import numpy as np

    from object2brain.activations.extract import plan_extraction
    from object2brain.api.extract import _resolve
    from object2brain.options import Runtime
    from object2brain.pipeline.backbone import (
        head_layer,
        head_valence,
        needs_head_pass,
        shared_source,
        write_shared,
    )

    started = time.time()
    key = lambda each: backbone_key(study, each)  # noqa: E731
    source = shared_source(study, model, key, loaded.output_layer)
    if source is None:
        return None
    supplied = study.out_of_fold.get(model.label)
    valence = None
    if supplied is not None:
        from object2brain.data.ratings import load_predicted_valence

        valence = load_predicted_valence(supplied, study.stimuli.ids)
    runtime = Runtime(seed=study.seed, device=study.device, progress=study.progress)
    plan = plan_extraction(loaded, study.stimuli, model.layers, _resolve(study.config.extract, {}),
                           runtime, valence=valence, probe=False)  # fmt: skip
    stored = None
    if valence is not None:
        stored = valence.astype(np.float32).astype(plan.storage_dtype)
    elif needs_head_pass(study, model):
        head = study.heads[model.label]
        assert head is not None
        layer = head_layer(head, loaded.output_layer)
        stored = head_valence(loaded, layer, study.head_inputs[source.stem][layer], plan)
    return write_shared(source, path, plan, stored, round(time.time() - started, 3))


def backbone_key(study: Study, model: ModelConfig) -> str:
    """SHA-256 of what a store's backbone layers depend on: the model's architecture, weights
    (by content) and layers (not its name or head; preprocessing follows from architecture and
    weights), the extraction options, the stimuli and the seed (random weights)."""
    key = model_key(model)
    key.pop("name", None)
    payload = {"model": key, "extract": options_key(study.config.extract),
               "stimuli": study.stimuli_key, "seed": study.seed}  # fmt: skip
    return digest(payload)


def _extract_key(study: Study, model: Unit, *, backbone: bool) -> dict[str, Any]:
    model = _model(model)
    payload: dict[str, Any] = {
        "stage": "extract_backbone" if backbone else "extract",
        "model": model_key(model),
        "extract": options_key(study.config.extract),
        "stimuli": study.stimuli_key,
        "seed": study.seed,
    }
    if not backbone:
        payload["head"] = fingerprint(study.heads[model.label])
        valence = study.out_of_fold.get(model.label)
        if valence is not None:
            payload["valence"] = fingerprint(valence)
    return payload


EXTRACT_BACKBONE = Stage(
    name="extract_backbone",
    # a later stage needs activations before the heads exist
    enabled=lambda study: study.config.simulate is not None,
    per_model=True,
    folder=lambda study, model: study.out / "activations" / f".{_model(model).label}.backbone",
    key=lambda study, model: _extract_key(study, model, backbone=True),
    run=lambda study, model: _extract(study, model, backbone=True),
    publish=lambda study, model: study.backbone_stores.__setitem__(
        _model(model).label, _store(study, model, backbone=True)
    ),
)

EXTRACT = Stage(
    name="extract",
    enabled=lambda study: True,
    per_model=True,
    folder=lambda study, model: study.out / "activations" / f".{_model(model).label}",
    key=lambda study, model: _extract_key(study, model, backbone=False),
    run=lambda study, model: _extract(study, model, backbone=False),
    publish=lambda study, model: study.stores.__setitem__(
        _model(model).label, _store(study, model, backbone=False)
    ),
)


# --- simulate --------------------------------------------------------------------------------


def _simulate(study: Study, model: Unit) -> list[Path]:
    from object2brain.api.simulate import simulate

    options = study.config.simulate
    assert options is not None
    result = simulate(
        study.backbone_stores[study.config.models[0].label],
        options.rois,
        out=study.out / "simulation",
        stimuli=study.stimuli,
        n_subjects=options.n_subjects,
        rating_noise=options.rating_noise,
        continuous_ratings=options.continuous_ratings,
        valence_source=options.valence_source,
        seed=study.seed,
    )
    return [result.patterns, result.brain_manifest, result.ratings, result.truth]


def _simulate_key(study: Study, model: Unit) -> dict[str, Any]:
    assert study.config.simulate is not None
    return {
        "stage": "simulate",
        "options": options_key(study.config.simulate),
        "upstream": study.cache.keys[f"extract_backbone:{study.config.models[0].label}"],
        "stimulus_table": study.table_key,  # valence and condition columns
        "seed": study.seed,
    }


def _publish_simulation(study: Study, model: Unit) -> None:
    folder = study.out / "simulation"
    study.brain, study.ratings = folder / "brain.yaml", folder / "ratings.csv"


SIMULATE = Stage(
    name="simulate",
    enabled=lambda study: study.config.simulate is not None,
    folder=lambda study, model: study.out / "simulation",
    key=_simulate_key,
    run=_simulate,
    publish=_publish_simulation,
)


# --- train_head ------------------------------------------------------------------------------


def _train_heads(study: Study, model: Unit) -> list[Path]:
    from object2brain.api.train_head import train_head

    options = study.config.train_head
    assert options is not None
    folder = study.out / "heads"
    table = _rated_table(
        study.stimuli,
        study.ratings if options.ratings == "ratings" else None,
        folder,
        study.config.duplicate_ratings(),
    )
    result = train_head(
        [study.load(m) for m in study.untrained()],
        out=folder,
        stimuli=table,
        options=options.model_copy(update={"selection_folds": study_selection_folds(study)}),
        in_study=True,
        device=study.device,
        seed=study.seed,
        progress=study.progress,
        executor=study.config.executor.kind,
        ray_address=study.config.executor.address,
    )
    return list(result.files)


def _train_head_key(study: Study, model: Unit) -> dict[str, Any]:
    options = study.config.train_head
    assert options is not None
    from_ratings = options.ratings == "ratings"
    return {
        "stage": "train_head",
        "options": options_key(options)
        | {
            "cross_fit": options.folds(in_study=True),
            "selection_folds": study_selection_folds(study),
        },
        "stimuli": study.stimuli_key,
        "valence": column_key(study.stimuli, "valence"),
        "models": [model_key(m) for m in study.untrained()],
        "seed": study.seed,
        "ratings": fingerprint(study.ratings) if from_ratings else None,
        "duplicate_ratings": study.config.duplicate_ratings() if from_ratings else None,
    }


def study_selection_folds(study: Study) -> int:
    """The selection fold heads the study's train_head fits: its ``selection_folds``, else the
    dissection's selection folds (when it explains the valence head), else none."""
    options, dissect = study.config.train_head, study.config.dissect
    if options is not None and options.selection_folds is not None:
        return options.selection_folds
    if dissect is None or dissect.target is not None or dissect.fold_heads is not None:
        return 0
    return dissect.selection_folds


def _fold_heads(study: Study, model: ModelConfig) -> Path | None:
    """The folder of ``model``'s selection fold heads, when this study trained them."""
    from object2brain.heads.io import fold_head_name

    head = study.heads.get(model.label)
    trained = head is not None and model.head is None and study_selection_folds(study) > 0
    if trained and head is not None and (head.parent / fold_head_name(0)).is_file():
        return head.parent
    return None


def _publish_heads(study: Study, model: Unit) -> None:
    """The trained heads (and their out-of-fold predictions) for extraction and dissection; the
    main heads' held-out stimuli for the direct behaviour correlation."""
    from object2brain.data.splits import held_out_ids

    assert study.config.train_head is not None
    folds = study.config.train_head.folds(in_study=True)
    folder = study.out / "heads"
    for untrained in study.untrained():
        study.heads[untrained.label] = folder / untrained.label / HEAD_FILE
        if folds:
            study.out_of_fold[untrained.label] = folder / untrained.label / OUT_OF_FOLD_FILE
    study.held_out = held_out_ids(folder / SPLIT_FILE)
    if folds:
        log.info(
            "the 'valence' layer of %s holds out-of-fold predictions of %d cross-fitted "
            "heads: predicted valence is never compared with ratings it was fitted on",
            ", ".join(study.out_of_fold),
            folds,
        )
        return
    study.rsa_held_out = study.held_out
    n_stimuli, n_held_out = len(study.stimuli), len(study.held_out)
    log.warning(
        "the valence heads were trained on this study's stimuli without cross-fitting: "
        "behavior_direct uses their %d held-out test stimuli only; the alignment of the "
        "'valence' layer with behaviour uses all %d stimuli, %d of which the heads were "
        "fitted on (optimistic; train_head.cross_fit >= 2 avoids it)",
        n_held_out,
        n_stimuli,
        n_stimuli - n_held_out,
    )


def _rated_table(
    stimuli: StimulusSet, ratings: Path | None, folder: Path, duplicates: DuplicateRatings
) -> Path | StimulusSet:
    """The stimulus set with ``valence`` = mean rating (written next to the heads) if asked;
    ``duplicates``: repeated ratings of a pair refused or averaged."""
    if ratings is None:
        return stimuli
    from object2brain.data.ratings import load_ratings

    loaded = load_ratings(ratings, stimuli.ids, duplicates=duplicates)
    table = stimuli.table.copy()
    table["valence"] = loaded.group_mean(stimuli.ids)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "stimuli_rated.csv"
    table.to_csv(path, index=False)
    return path


TRAIN_HEAD = Stage(
    name="train_head",
    enabled=lambda study: study.config.train_head is not None and bool(study.untrained()),
    folder=lambda study, model: study.out / "heads",
    key=_train_head_key,
    run=_train_heads,
    publish=_publish_heads,
)


# --- rsa -------------------------------------------------------------------------------------


def _rsa(study: Study, model: Unit) -> list[Path]:
    from object2brain.api.rsa import rsa

    options = study.config.rsa
    assert options is not None
    result = rsa(
        list(study.stores.values()),
        brain=study.brain,
        ratings=study.ratings,
        stimuli=study.config.stimuli,
        out=study.out / "rsa",
        options=options,
        seed=study.seed,
        device=study.device,
        progress=study.progress,
        behavior_ids=study.rsa_held_out,
        executor=study.config.executor.kind,
        ray_address=study.config.executor.address,
    )
    return list(result.files)


def _rsa_key(study: Study, model: Unit) -> dict[str, Any]:
    assert study.config.rsa is not None
    return {
        "stage": "rsa",
        "options": options_key(study.config.rsa),
        **study.data_key(),
        "held_out": study.rsa_held_out,
        "seed": study.seed,
    }


def _has_rsa_targets(study: Study) -> bool:
    """Brain data, ratings or a valence column: something to align the layers with."""
    targets = study.brain is not None or study.ratings is not None
    return targets or "valence" in study.stimuli.table


RSA = Stage(
    name="rsa",
    enabled=lambda study: study.config.rsa is not None and _has_rsa_targets(study),
    folder=lambda study, model: study.out / "rsa",
    key=_rsa_key,
    run=_rsa,
)


# --- dissect ---------------------------------------------------------------------------------


def _dissect_folder(study: Study, model: Unit) -> Path:
    return study.out / "dissect" / _model(model).label


def _dissect(study: Study, model: Unit) -> list[Path]:
    from object2brain.api.dissect import dissect
    from object2brain.heads.io import degenerate_reason, write_skipped_manifest

    options = study.config.dissect
    model = _model(model)
    assert options is not None
    head = study.heads.get(model.label)
    reason = degenerate_reason(head) if head is not None else None
    if head is not None and reason is not None:  # no table: lesion skips the model too
        for stale in _dissect_folder(study, model).glob("filter_objects.*"):
            stale.unlink()
        return [write_skipped_manifest(_dissect_folder(study, model), "dissect", model.label,
                                       head, reason)]  # fmt: skip
    result = dissect(
        study.load(model, study.heads[model.label]),
        study.stimuli,
        layer=options.layer_for(model.label),
        options=options,
        out=_dissect_folder(study, model),
        fold_heads=_fold_heads(study, model) or options.fold_heads,
        device=study.device,
        seed=study.seed,
        progress=study.progress,
        executor=study.config.executor.kind,
        ray_address=study.config.executor.address,
    )
    return list(result.files)


def _dissect_key(study: Study, model: Unit) -> dict[str, Any]:
    options = study.config.dissect
    model = _model(model)
    assert options is not None
    boxes = _boxes_file(options.detector)
    return {
        "stage": "dissect",
        # the groups and boxes files enter by content (below), not by path
        "options": options_key(options, frozenset({"groups", "detector"}))
        | {"detector": "boxes" if boxes else options.detector},
        "groups": fingerprint(options.groups),
        "boxes": fingerprint(boxes),
        "model": model_key(model),
        "head": fingerprint(study.heads[model.label]),
        "fold_heads": [fingerprint(p) for p in sorted(f.glob("head.fold*"))]
        if (f := _fold_heads(study, model) or options.fold_heads) is not None
        else None,
        "stimuli": study.stimuli_key,
        "seed": study.seed,
    }


def _boxes_file(detector: str) -> Path | None:
    """The box file of a ``boxes:FILE`` detector (already resolved by the config)."""
    from object2brain.explain.detectors import given_boxes_file

    boxes = given_boxes_file(detector)
    return Path(boxes) if boxes is not None else None


DISSECT = Stage(
    name="dissect",
    enabled=lambda study: study.config.dissect is not None,
    per_model=True,
    folder=_dissect_folder,
    key=_dissect_key,
    run=_dissect,
    publish=lambda study, model: study.filter_tables.append(
        _dissect_folder(study, model) / "filter_objects.csv"
    ),
)


# --- lesion ----------------------------------------------------------------------------------


def _lesion(study: Study, model: Unit) -> list[Path]:
    import pandas as pd

    from object2brain.api.lesion import lesion
    from object2brain.heads.io import degenerate_reason, write_skipped_manifest

    options = study.config.lesion
    assert options is not None
    tables = [pd.read_csv(p) for p in study.filter_tables if p.is_file()]  # skipped: no table
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["model"])
    files: list[Path] = []
    for each in study.config.models:
        head = study.heads.get(each.label)
        reason = degenerate_reason(head) if head is not None else None
        if head is not None and reason is not None:
            folder = study.out / "lesion" / each.label
            files.append(write_skipped_manifest(folder, "lesion", each.label, head, reason))
            continue
        loaded = study.load(each, study.heads[each.label]) if options.propagate else None
        result = lesion(
            study.stores[each.label],
            table[table["model"] == each.label],
            brain=study.brain,
            ratings=study.ratings,
            stimuli=study.config.stimuli,
            out=study.out / "lesion" / each.label,
            options=options,
            seed=study.seed,
            device=study.device,
            model=loaded,
            progress=study.progress,
            behavior_ids=study.held_out,
            encode_options=_lesion_encoding(study),
            folds=folds
            if (folds := _dissect_folder(study, each) / "folds.csv").is_file()
            else None,
            executor=study.config.executor.kind,
            ray_address=study.config.executor.address,
        )
        files.extend(result.files)
    return files


def _lesion_encoding(study: Study) -> EncodeOptions | None:
    """The encoding model of ``lesion.analysis = encoding | both``: the study's ``encode``
    section when it has one (so ``r_full`` is the ``encode`` table's ``r_mean``; a reduced one is
    refused by the lesion), else the default model; None for the RSA lesion alone."""
    options = study.config.lesion
    if options is None or options.analysis == "rsa":
        return None
    return study.config.encode or EncodeOptions()


def _lesion_key(study: Study, model: Unit) -> dict[str, Any]:
    assert study.config.lesion is not None
    return {
        "stage": "lesion",
        "options": options_key(study.config.lesion),  # RDM metric and comparison included
        **study.data_key(),
        "dissect": [study.cache.keys[f"dissect:{m.label}"] for m in study.config.models],
        "held_out": study.held_out,
        "seed": study.seed,
        **({"encoding": options_key(enc)} if (enc := _lesion_encoding(study)) else {}),
    }


LESION = Stage(
    name="lesion",
    enabled=lambda study: study.config.lesion is not None and bool(study.filter_tables),
    folder=lambda study, model: study.out / "lesion",
    key=_lesion_key,
    run=_lesion,
)


# --- encode ----------------------------------------------------------------------------------


def _encode(study: Study, model: Unit) -> list[Path]:
    from object2brain.api.encode import encode

    options = study.config.encode
    assert options is not None
    result = encode(
        list(study.stores.values()),
        brain=study.brain,
        ratings=study.ratings,
        stimuli=study.config.stimuli,
        out=study.out / "encode",
        options=options,
        seed=study.seed,
        device=study.device,
        progress=study.progress,
        executor=study.config.executor.kind,
        ray_address=study.config.executor.address,
    )
    return list(result.files)


def _encode_key(study: Study, model: Unit) -> dict[str, Any]:
    assert study.config.encode is not None
    return {
        "stage": "encode",
        "options": options_key(study.config.encode),
        **study.data_key(),
        "seed": study.seed,
    }


ENCODE = Stage(
    name="encode",
    # brain patterns or ratings to predict
    enabled=lambda study: (
        study.config.encode is not None and (study.brain is not None or study.ratings is not None)
    ),
    folder=lambda study, model: study.out / "encode",
    key=_encode_key,
    run=_encode,
)

#: Every stage of a study, in run order.
STAGES: list[Stage] = [
    EXTRACT_BACKBONE,
    SIMULATE,
    TRAIN_HEAD,
    EXTRACT,
    RSA,
    ENCODE,
    DISSECT,
    LESION,
]

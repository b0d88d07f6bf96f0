"""``object2brain run STUDY.yaml``: every stage of a study, cached by content hash.

Stages, in order (a stage runs only when its config section is present):

1. ``extract`` the backbone of every model (``<out>/activations/<model>.backbone.h5``) when a later
   stage needs activations before the heads exist (``simulate``), else straight to step 4;
2. ``simulate`` ratings and brain data from the first model (``<out>/simulation``);
3. ``train_head`` for every model without ``head`` (``<out>/heads``), on the stimulus table's
   ``valence`` or on the mean of the ratings, with ``cross_fit`` fold heads (default 5);
4. ``extract`` with the heads (``<out>/activations/<model>.h5``, layer ``valence`` included). For
   heads trained in the run the ``valence`` layer holds the out-of-fold predictions of the fold
   heads (``heads/<model>/out_of_fold.csv``), as the heads were fitted on these very stimuli: a
   correlation of that layer with the ratings is then not optimistic. The main head, fitted on
   the training split, is the one ``dissect`` explains and lesion ``propagate`` runs; with
   ``cross_fit: 0`` the layer holds its outputs and the direct behaviour correlation uses its
   test split only;
5. ``rsa`` (``<out>/rsa``), 6. ``dissect`` per model (``<out>/dissect/<model>``),
7. ``lesion`` (``<out>/lesion``), 8. ``report`` (``<out>/report.html``).

Every stage has a key: the SHA-256 of its options, its inputs and the keys of the stages it reads.
Inputs enter by content (SHA-256, each file read once per process): the images' bytes, the
stimulus table (the stages that read a column: simulate, RSA and lesions every column, head
training the ``valence`` column), the brain data (the manifest and every file it names), ratings,
a ``boxes:`` file, head and checkpoint files; named torchvision weights by the torchvision
version. Keys hold no paths, so a moved study keeps its stages. A finished stage writes
``.stage.json`` (key and outputs relative to ``<out>``) into its folder last; a re-run skips every
stage whose key and outputs are unchanged, so editing one option or input re-runs only the stages
it affects, each replacing its own outputs. Outputs are written atomically and extraction resumes
mid-way, so a killed run is completed by running it again.
``<out>/manifest.json`` records the config, versions, seeds, input hashes (including the weights
of every model), stage keys and every output of the run; the report shows only those outputs, so
results left in ``<out>`` by an earlier version of the study (e.g. a renamed model) stay out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from object2brain.data.brain import brain_files
from object2brain.data.stimuli import StimulusSet, load_stimuli
from object2brain.io import check_output_folder, write_json
from object2brain.manifest import build_manifest, cached_file_sha256, output_list
from object2brain.pipeline.config import ConfigError, ModelConfig, RunConfig, load_config

log = logging.getLogger("object2brain.run")

STAGE_FILE = ".stage.json"


@dataclass
class RunResult:
    """Where a run wrote its outputs, and which stages ran or were reused."""

    out: Path
    stores: dict[str, Path]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: Path | None = None


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _fingerprint(path: Path | None) -> str | None:
    """SHA-256 of a file, or of a folder's files (relative names and contents)."""
    if path is None:
        return None
    if path.is_dir():
        return _digest(
            sorted(
                (p.relative_to(path).as_posix(), cached_file_sha256(p))
                for p in path.rglob("*")
                if p.is_file()
            )
        )
    return cached_file_sha256(path)


def _brain_hashes(path: Path | None) -> dict[str, str]:
    """SHA-256 of brain data, by path relative to ``path``'s folder: the file given and every
    file a YAML manifest names (in the manifest's order)."""
    if path is None:
        return {}
    return {_relative_name(f, path.parent): cached_file_sha256(f) for f in brain_files(path)}


def _model_key(model: ModelConfig) -> dict[str, Any]:
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


class _Stages:
    """Runs stages, or reuses them; ``.stage.json`` lists outputs relative to ``out`` (a moved
    study folder keeps its stages)."""

    def __init__(self, out: Path, progress: bool) -> None:
        self.out = out
        self.result_ran: list[str] = []
        self.result_skipped: list[str] = []
        self.keys: dict[str, str] = {}
        self.outputs: list[Path] = []
        self.progress = progress

    def run(self, name: str, folder: Path, key_payload: Any, work: Callable[[], list[Path]]) -> str:
        """Run ``work`` unless ``folder/.stage.json`` has the same key and its outputs exist."""
        key = _digest(key_payload)
        marker = folder / STAGE_FILE
        if marker.is_file():
            record = json.loads(marker.read_text())
            outputs = [self.out / p for p in record.get("outputs", [])]  # absolute: older runs
            inside = all(p.resolve().is_relative_to(self.out.resolve()) for p in outputs)
            if record.get("key") == key and inside and all(p.exists() for p in outputs):
                log.info("stage %s: unchanged, reusing %s", name, folder)
                self.result_skipped.append(name)
                self.keys[name] = key
                self.outputs += outputs
                return key
        log.info("stage %s: running", name)
        started = time.time()
        folder.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        outputs = work()
        write_json(
            marker,
            {
                "key": key,
                "outputs": output_list(outputs, self.out),
                "seconds": round(time.time() - started, 2),
            },
        )
        self.result_ran.append(name)
        self.keys[name] = key
        self.outputs += outputs
        return key


def run_study(config_path: str | Path, *, progress: bool = True) -> RunResult:
    """Run the study described by a YAML config (see :mod:`object2brain.pipeline.config`)."""
    config, _base = load_config(config_path)
    return run_config(config, progress=progress)


def run_config(config: RunConfig, *, progress: bool = True) -> RunResult:
    """Run a validated :class:`RunConfig`."""
    from object2brain.api.extract import extract
    from object2brain.models.zoo import load_model

    out = config.out
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(out, progress)
    stimuli = load_stimuli(config.stimuli)
    folds = config.train_head.cross_fit if config.train_head is not None else 0
    if folds > len(stimuli) and any(m.head is None for m in config.models):
        raise ConfigError(
            f"train_head.cross_fit: {folds} folds for {len(stimuli)} stimuli; use at most "
            f"{len(stimuli)} (or 0: no cross-fitting)"
        )
    stimuli_key = stimuli.fingerprint()  # ids and image bytes: what extraction reads
    table_key = _fingerprint(config.stimuli)  # every column: conditions, valence, ...
    seed, device = config.seed, config.device
    brain, ratings = config.brain, config.ratings
    heads: dict[str, Path | None] = {m.label: m.head for m in config.models}
    held_out: list[str] | None = None  # stimuli the main heads of this run were not fitted on
    rsa_held_out: list[str] | None = None  # behavior_direct's stimuli (None: all)
    out_of_fold: dict[str, Path] = {}  # model -> cross-fitted predictions: its 'valence' layer

    def load(model: ModelConfig, head: Path | None = None) -> Any:
        return load_model(model.arch, model.weights, head=head, seed=seed, name=model.label)

    def extraction(
        model: ModelConfig, path: Path, head: Path | None = None, valence: Path | None = None
    ) -> Callable[[], list[Path]]:
        """The work of an extract stage: ``model`` (with ``head``) into the store ``path``."""

        def work() -> list[Path]:
            path.parent.mkdir(parents=True, exist_ok=True)
            store = extract(
                load(model, head),
                stimuli,
                out=path,
                layers=model.layers,
                batch_size=config.extract.batch_size,
                device=config.device,
                dtype=config.extract.dtype,
                srp=config.extract.srp,
                seed=seed,
                overwrite=True,  # a stage replaces its own store
                progress=progress,
                amp_dtype=config.extract.amp,
                channels_last=config.extract.channels_last,
                decode=config.extract.decode,
                valence=valence,
            )
            return [store]

        return work

    backbone_stores: dict[str, Path] = {}

    needs_backbone = config.simulate is not None
    if needs_backbone:
        for model in config.models:
            path = out / "activations" / f"{model.label}.backbone.h5"
            payload = {
                "stage": "extract_backbone",
                "model": _model_key(model),
                "extract": config.extract.model_dump(),
                "stimuli": stimuli_key,
                "seed": seed,
            }
            stages.run(
                f"extract_backbone:{model.label}",
                path.parent / f".{model.label}.backbone",
                payload,
                extraction(model, path),
            )
            backbone_stores[model.label] = path

    if config.simulate is not None:
        from object2brain.simulate import simulate

        first = config.models[0].label
        sim_dir = out / "simulation"
        sim = config.simulate

        def simulate_work() -> list[Path]:
            result = simulate(
                backbone_stores[first],
                sim.rois,
                out=sim_dir,
                stimuli=stimuli,
                n_subjects=sim.n_subjects,
                rating_noise=sim.rating_noise,
                valence_source=sim.valence_source,
                seed=seed,
            )
            return [result.patterns, result.brain_manifest, result.ratings, result.truth]

        stages.run(
            "simulate",
            sim_dir,
            {
                "stage": "simulate",
                "options": sim.model_dump(),
                "upstream": stages.keys[f"extract_backbone:{first}"],
                "stimulus_table": table_key,  # valence and condition columns
                "seed": seed,
            },
            simulate_work,
        )
        brain, ratings = sim_dir / "brain.yaml", sim_dir / "ratings.csv"

    untrained = [m for m in config.models if m.head is None]
    if config.train_head is not None and untrained:
        from object2brain.data.splits import held_out_ids
        from object2brain.heads.train import OUT_OF_FOLD_NAME, train_head

        options = config.train_head
        head_dir = out / "heads"

        def train_work() -> list[Path]:
            table = _rated_table(
                stimuli, ratings if options.ratings == "ratings" else None, head_dir
            )
            result = train_head(
                [load(m) for m in untrained],
                out=head_dir,
                stimuli=table,
                loss=options.loss,
                epochs=options.epochs,
                patience=options.patience,
                lr=options.lr,
                batch_size=options.batch_size,
                device=device,
                seed=seed,
                progress=progress,
                cross_fit=options.cross_fit,
            )
            return list(result.files)

        payload = {
            "stage": "train_head",
            "options": options.model_dump(),
            "stimuli": stimuli_key,
            "valence": _column_key(stimuli, "valence"),
            "models": [_model_key(m) for m in untrained],
            "seed": seed,
            "ratings": _fingerprint(ratings) if options.ratings == "ratings" else None,
        }
        stages.run("train_head", head_dir, payload, train_work)
        for model in untrained:
            heads[model.label] = head_dir / model.label / "head.safetensors"
            if options.cross_fit:
                out_of_fold[model.label] = head_dir / model.label / OUT_OF_FOLD_NAME
        held_out = held_out_ids(head_dir / "split.csv")  # the main heads' held-out stimuli
        if options.cross_fit:
            log.info(
                "the 'valence' layer of %s holds out-of-fold predictions of %d cross-fitted "
                "heads: predicted valence is never compared with ratings it was fitted on",
                ", ".join(out_of_fold),
                options.cross_fit,
            )
        else:
            rsa_held_out = held_out
            log.warning(
                "the valence heads were trained on this study's stimuli without cross-fitting: "
                "behavior_direct uses their %d held-out test stimuli only; the alignment of the "
                "'valence' layer with behaviour uses all %d stimuli, %d of which the heads were "
                "fitted on (optimistic; train_head.cross_fit >= 2 avoids it)",
                len(held_out),
                len(stimuli),
                len(stimuli) - len(held_out),
            )

    stores: dict[str, Path] = {}
    for model in config.models:
        path = out / "activations" / f"{model.label}.h5"
        head = heads[model.label]
        valence = out_of_fold.get(model.label)
        payload = {
            "stage": "extract",
            "model": _model_key(model),
            "head": _fingerprint(head),
            "extract": config.extract.model_dump(),
            "stimuli": stimuli_key,
            "seed": seed,
        }
        if valence is not None:
            payload["valence"] = _fingerprint(valence)
        stages.run(
            f"extract:{model.label}",
            path.parent / f".{model.label}",
            payload,
            extraction(model, path, head, valence),
        )
        stores[model.label] = path

    brain_hashes = _brain_hashes(brain)  # every file read once per run
    data_key = {
        "brain": list(brain_hashes.values()) if brain is not None else None,
        "ratings": _fingerprint(ratings),
        "stimuli": stimuli_key,
        "stimulus_table": table_key,
        "extract": [stages.keys[f"extract:{m.label}"] for m in config.models],
    }
    if config.rsa is not None and (
        brain is not None or ratings is not None or "valence" in stimuli.table
    ):
        from object2brain.rsa.align import run_alignment

        rsa = config.rsa

        def rsa_work() -> list[Path]:
            result = run_alignment(
                list(stores.values()),
                brain=brain,
                ratings=ratings,
                stimuli=config.stimuli,
                out=out / "rsa",
                rdm_metric=rsa.rdm,
                compare_method=rsa.compare,
                n_perm=rsa.n_perm,
                n_boot=rsa.n_boot,
                seed=seed,
                device=device,
                progress=progress,
                behavior_ids=rsa_held_out,
            )
            return list(result.files)

        stages.run(
            "rsa",
            out / "rsa",
            {
                "stage": "rsa",
                "options": rsa.model_dump(),
                **data_key,
                "held_out": rsa_held_out,
                "seed": seed,
            },
            rsa_work,
        )

    filter_tables: list[Path] = []
    if config.dissect is not None:
        from object2brain.api.dissect import dissect

        options_d = config.dissect
        for model in config.models:
            folder = out / "dissect" / model.label
            head = heads[model.label]

            def dissect_work(
                model: Any = model, folder: Path = folder, head: Path | None = head
            ) -> list[Path]:
                loaded = load(model, head)
                result = dissect(
                    loaded,
                    stimuli,
                    layer=options_d.layer_for(model.label),
                    detector=options_d.detector,
                    groups=options_d.groups,
                    direction=options_d.direction,
                    threshold=options_d.threshold,
                    min_images=options_d.min_images,
                    out=folder,
                    batch_size=options_d.batch_size,
                    device=device,
                    seed=seed,
                    cache_dir=out / "detections_cache",
                    decode=options_d.decode,
                    progress=progress,
                )
                return list(result.files)

            payload = {
                "stage": "dissect",
                # the groups and boxes files enter by content (below), not by path
                # decode: only when not the default, so that studies dissected before the
                # option existed keep their stage keys
                "options": options_d.model_dump(
                    mode="json",
                    exclude={"groups", "detector"}
                    | ({"decode"} if options_d.decode == "pil" else set()),
                )
                | {"detector": "boxes" if _boxes_file(options_d.detector) else options_d.detector},
                "groups": _fingerprint(options_d.groups),
                "boxes": _fingerprint(_boxes_file(options_d.detector)),
                "model": _model_key(model),
                "head": _fingerprint(head),
                "stimuli": stimuli_key,
                "seed": seed,
            }
            stages.run(f"dissect:{model.label}", folder, payload, dissect_work)
            filter_tables.append(folder / "filter_objects.csv")

    if config.lesion is not None and filter_tables:
        from object2brain.lesion.analysis import run_lesion

        options_l = config.lesion

        def lesion_work() -> list[Path]:
            table = pd.concat([pd.read_csv(p) for p in filter_tables], ignore_index=True)
            files: list[Path] = []
            for model in config.models:
                loaded = None
                if options_l.propagate:
                    loaded = load(model, heads[model.label])
                part = table[table["model"] == model.label]
                result = run_lesion(
                    stores[model.label],
                    part,
                    brain=brain,
                    ratings=ratings,
                    stimuli=config.stimuli,
                    out=out / "lesion" / model.label,
                    groups=options_l.groups,
                    variants=tuple(options_l.variants),
                    rdm_metric=config.rsa.rdm if config.rsa else "correlation",
                    compare_method=config.rsa.compare if config.rsa else "spearman",
                    n_null=options_l.n_null,
                    n_perm=options_l.n_perm,
                    null_subsets=options_l.null_subsets,
                    seed=seed,
                    device=device,
                    propagate=options_l.propagate,
                    model=loaded,
                    behavior_ids=held_out,
                )
                files.extend(result.files)
            return files

        payload = {
            "stage": "lesion",
            "options": options_l.model_dump(),
            **data_key,
            "dissect": [stages.keys[f"dissect:{m.label}"] for m in config.models],
            "rsa": [config.rsa.rdm, config.rsa.compare] if config.rsa else None,
            "held_out": held_out,
            "seed": seed,
        }
        stages.run("lesion", out / "lesion", payload, lesion_work)

    inputs = {"stimuli": stimuli_key, "stimulus_table": str(table_key)}
    inputs.update({f"brain:{name}": digest for name, digest in brain_hashes.items()})
    if ratings is not None:
        inputs["ratings"] = str(_fingerprint(ratings))
    for model in config.models:
        inputs[f"weights:{model.label}"] = _store_weights(stores[model.label])
        head = heads[model.label]
        if head is not None:
            inputs[f"head:{model.label}"] = cached_file_sha256(head)
    outputs = list(dict.fromkeys(stages.outputs))

    def write_manifest(files: list[Path]) -> None:
        write_json(
            out / "manifest.json",
            build_manifest(
                "run",
                config.model_dump(mode="json"),
                seeds={"seed": seed},
                inputs=inputs,
                outputs=output_list(files, out),
                extra={
                    "lists_every_output": True,  # the report shows only these (report/build.py)
                    "stages": stages.keys,
                    "ran": stages.result_ran,
                    "reused": stages.result_skipped,
                },
            ),
        )

    # the report reads the manifest to leave out results that are not this run's
    write_manifest(outputs)
    report = None
    if config.report:
        from object2brain.report.build import build_report

        report = build_report(out)
        write_manifest([*outputs, report])
    return RunResult(out, stores, stages.result_ran, stages.result_skipped, report)


def _column_key(stimuli: StimulusSet, column: str) -> str | None:
    """SHA-256 of one column of the stimulus table, by stimulus id (None without the column)."""
    if column not in stimuli.table:
        return None
    return _digest(list(zip(stimuli.ids, stimuli.table[column].astype(str), strict=True)))


def _relative_name(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` where it lies under it (e.g. ``sub-01/betas.nii.gz``)."""
    return path.relative_to(start).as_posix() if path.is_relative_to(start) else str(path)


def _boxes_file(detector: str) -> Path | None:
    """The box file of a ``boxes:FILE`` detector (already resolved by the config)."""
    from object2brain.explain.detectors import given_boxes_file

    boxes = given_boxes_file(detector)
    return Path(boxes) if boxes is not None else None


def _store_weights(store: Path) -> str:
    """The ``weights_sha256`` a store records (the weights it was extracted with)."""
    from object2brain.activations.store import ActivationStore

    with ActivationStore.open(store) as handle:
        return str(handle.attrs.get("weights_sha256", ""))


def _rated_table(stimuli: StimulusSet, ratings: Path | None, folder: Path) -> Path | StimulusSet:
    """The stimulus set with ``valence`` = mean rating (written next to the heads) if asked."""
    if ratings is None:
        return stimuli
    from object2brain.data.ratings import load_ratings

    loaded = load_ratings(ratings, stimuli.ids)
    table = stimuli.table.copy()
    table["valence"] = loaded.group_mean(stimuli.ids)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "stimuli_rated.csv"
    table.to_csv(path, index=False)
    return path

"""``object2brain run STUDY.yaml``: every stage of a study, cached by content hash.

The stages are the entries of :data:`object2brain.pipeline.stages.STAGES`; a run loads the
stimuli, loops over them and writes the run manifest and the report.

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

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from object2brain.data.image_array import is_array_file
from object2brain.data.stimuli import load_stimuli
from object2brain.io import check_output_folder, write_json
from object2brain.manifest import build_manifest, cached_file_sha256, output_list
from object2brain.pipeline.config import ConfigError, RunConfig, load_config
from object2brain.pipeline.stages import (
    STAGE_FILE,
    StageCache,
    Study,
    brain_hashes,
    fingerprint,
    run_stages,
)

__all__ = [
    "STAGE_FILE",
    "RunResult",
    "new_study",
    "once_per_run",
    "preflight",
    "run_config",
    "run_study",
]


@dataclass
class RunResult:
    """Where a run wrote its outputs, and which stages ran or were reused."""

    out: Path
    stores: dict[str, Path]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: Path | None = None
    #: seconds each stage took (stages reused: the time recorded when they ran)
    timings: dict[str, float] = field(default_factory=dict)


def run_study(config_path: str | Path, *, progress: bool = True) -> RunResult:
    """Run the study described by a YAML config (see :mod:`object2brain.pipeline.config`)."""
    config, _base = load_config(config_path)
    return run_config(config, progress=progress)


def run_config(config: RunConfig, *, progress: bool = True) -> RunResult:
    """Run a validated :class:`RunConfig`: every stage, then the manifest and the report.

    Each stage's time is logged and recorded in the manifest (``timings``, seconds); a message
    logged again with the same text during the run is shown once."""
    out = config.out
    check_output_folder(out)
    study = new_study(config, progress=progress)
    problems = preflight(study)
    if problems:
        raise ConfigError("; ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    report = None
    with once_per_run() as run_warnings:
        run_stages(study)
        outputs = list(dict.fromkeys(study.cache.outputs))
        # the report reads the manifest to leave out results that are not this run's
        _write_manifest(study, outputs, run_warnings)
        if config.report:
            from object2brain.report.build import build_report

            report = build_report(out)
            _write_manifest(study, [*outputs, report], run_warnings)
    cache = study.cache
    return RunResult(out, study.stores, cache.ran, cache.reused, report, dict(cache.seconds))


def preflight(study: Study) -> list[str]:
    """What a run checks before its first stage, beyond the config: cross-fitting folds
    against the number of stimuli."""
    config, stimuli = study.config, study.stimuli
    folds = config.train_head.folds(in_study=True) if config.train_head is not None else 0
    if folds > len(stimuli) and any(m.head is None for m in config.models):
        return [
            f"train_head.cross_fit: {folds} folds for {len(stimuli)} stimuli; use at most "
            f"{len(stimuli)} (or 0: no cross-fitting)"
        ]
    return []


def new_study(config: RunConfig, *, progress: bool) -> Study:
    """The :class:`Study` of ``config``: its stimuli loaded (images checked) and keyed; nothing
    written."""
    stimuli = load_stimuli(config.stimuli)
    return Study(
        config=config,
        stimuli=stimuli,
        progress=progress,
        cache=StageCache(config.out),
        stimuli_key=stimuli.fingerprint(),
        # an image array (tens of GB) is keyed by its rows' pixels (stimuli_key), not rehashed
        table_key=stimuli.fingerprint()
        if is_array_file(config.stimuli)
        else fingerprint(config.stimuli),
        brain=config.brain,
        ratings=config.ratings,
        heads={m.label: m.head for m in config.models},
    )


class _RunMessages(logging.Handler):
    """The messages of one run: each shown once, each distinct warning recorded once.

    Attached to the ``object2brain`` logger it records every distinct warning text, in order
    (:attr:`warnings`, the run manifest's ``warnings``); :meth:`first_time` gives the filter that
    lets a record through another handler only the first time that handler sees its level and
    text."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.warnings: list[str] = []
        self._seen: set[tuple[int, int, str]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.warnings:
            self.warnings.append(message)

    def first_time(self, handler: logging.Handler) -> Callable[[logging.LogRecord], bool]:
        """A filter for ``handler``: true the first time it sees a record's level and text."""

        def once(record: logging.LogRecord) -> bool:
            key = (id(handler), record.levelno, record.getMessage())
            if key in self._seen:
                return False
            self._seen.add(key)
            return True

        return once


@contextmanager
def once_per_run() -> Iterator[list[str]]:
    """Within the block, each log message (same level and text) and each Python warning (same
    text and category) is shown once, on every handler of the root and ``object2brain``
    loggers; yields the distinct warnings logged under ``object2brain``, in order (filled while
    the block runs)."""
    run = _RunMessages()
    handlers = [*logging.getLogger().handlers, *logging.getLogger("object2brain").handlers]
    filters = [run.first_time(handler) for handler in handlers]  # each sees every record once
    for handler, once in zip(handlers, filters, strict=True):
        handler.addFilter(once)
    package = logging.getLogger("object2brain")
    package.addHandler(run)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("once")
            yield run.warnings
    finally:
        package.removeHandler(run)
        for handler, once in zip(handlers, filters, strict=True):
            handler.removeFilter(once)


def _write_manifest(study: Study, files: list[Path], run_warnings: list[str]) -> None:
    """``<out>/manifest.json``: the config, inputs by content, stage keys and ``files``."""
    write_json(
        study.out / "manifest.json",
        build_manifest(
            "run",
            study.config.model_dump(mode="json"),
            seeds={"seed": study.seed},
            inputs=_inputs(study),
            outputs=output_list(files, study.out),
            extra={
                "lists_every_output": True,  # the report shows only these (report/build.py)
                "stages": study.cache.keys,
                "ran": study.cache.ran,
                "reused": study.cache.reused,
                "timings": study.cache.seconds,
                # each warning of the stages once, in order (the report's provenance)
                "warnings": run_warnings,
            },
        ),
    )


def _inputs(study: Study) -> dict[str, str]:
    """Every input of the run by SHA-256: stimuli, brain files, ratings, weights and heads."""
    inputs = {"stimuli": study.stimuli_key, "stimulus_table": str(study.table_key)}
    inputs.update({f"brain:{name}": digest for name, digest in brain_hashes(study.brain).items()})
    if study.ratings is not None:
        inputs["ratings"] = str(fingerprint(study.ratings))
    for model in study.config.models:
        inputs[f"weights:{model.label}"] = _store_weights(study.stores[model.label])
        head = study.heads[model.label]
        if head is not None:
            inputs[f"head:{model.label}"] = cached_file_sha256(head)
    return inputs


def _store_weights(store: Path) -> str:
    """The ``weights_sha256`` a store records (the weights it was extracted with)."""
    from object2brain.activations.store import ActivationStore

    with ActivationStore.open(store) as handle:
        return str(handle.attrs.get("weights_sha256", ""))

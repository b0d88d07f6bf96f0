"""``object2brain run STUDY.yaml --dry-run``: every problem of a study at once, and its plan.

:func:`dry_run` checks the config in one pass (:func:`~object2brain.pipeline.config.check_config`:
keys, values, files, layers, detectors, device), then what a run checks before its first stage
(the stimulus table and its images, cross-fitting folds), then loads the brain data and ratings
with the validators the stages use (each brain source on its own, so a problem in one does not
hide another's; then the ids against the stimulus set), and, when all
is well, lists the stages in run order with what a run would do with each: ``reuse`` (its
``.stage.json`` holds the same key and every output it lists exists) or ``run``, with the reason:
never run, options or inputs changed, outputs missing, or an earlier stage it reads re-runs. It
writes nothing (no output folder, no stage file).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from object2brain.errors import Object2BrainError
from object2brain.pipeline.config import RunConfig, check_config
from object2brain.pipeline.stages import (
    STAGE_FILE,
    STAGES,
    Stage,
    Study,
    Unit,
    digest,
)

#: The stand-in key of a stage that will run: its new key is known only once it ran.
_PENDING = "pending"


@dataclass(frozen=True)
class PlannedStage:
    """One stage (per model where it runs per model): ``action`` ``run`` or ``reuse``, and why."""

    name: str
    folder: Path
    action: str
    reason: str


@dataclass
class DryRun:
    """The problems of a study (empty: it can run) and, when none, its stage plan."""

    config_path: Path
    problems: list[str] = field(default_factory=list)
    plan: list[PlannedStage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """The plan as text lines, one per stage: ``run  rsa  (options or inputs changed)``."""
        width = max((len(p.name) for p in self.plan), default=0)
        return [f"{p.action:<6} {p.name:<{width}}  {p.reason}" for p in self.plan]


def dry_run(config_path: str | Path) -> DryRun:
    """Check a study without running it (module docstring)."""
    from object2brain.pipeline.run import new_study, preflight

    path = Path(config_path)
    result = DryRun(path)
    config, _base, problems = check_config(path)
    result.problems += problems
    if config is None:
        return result
    study = None
    try:
        study = new_study(config, progress=False)
        result.problems += preflight(study)
    except Object2BrainError as exc:
        result.problems.append(str(exc))
    result.problems += _data_problems(config, study)
    if result.problems or study is None:
        result.problems = list(dict.fromkeys(result.problems))
        return result
    result.plan = plan_stages(study)
    return result


def _data_problems(config: RunConfig, study: Study | None) -> list[str]:
    """The brain data and ratings loaded with the validators the stages use, each problem once:
    every source of a brain manifest on its own (shapes, stimulus ids, ROI masks on the betas'
    grid), then the ids against the stimulus set (``rsa.on_missing``); the ratings against the
    stimulus ids (``duplicate_ratings``). Missing files are the config check's problems."""
    ids = None if study is None else study.stimuli.ids
    problems = _brain_problems(config, ids)
    if config.ratings is not None and config.ratings.is_file() and ids is not None:
        from object2brain.data.ratings import load_ratings

        try:
            load_ratings(config.ratings, ids, duplicates=config.duplicate_ratings())
        except (Object2BrainError, OSError, ValueError) as exc:
            problems.append(f"ratings: {exc}")
    return problems


def _brain_problems(config: RunConfig, ids: list[str] | None) -> list[str]:
    """The brain data of ``config`` loaded source by source; ``ids``: the stimulus set's."""
    from object2brain.data.brain import BrainData, load_brain, load_source, read_manifest

    path = config.brain
    if path is None or not path.is_file():
        return []
    problems: list[str] = []
    items = []
    try:
        if path.suffix.lower() in (".h5", ".hdf5", ".hdf"):
            items = load_brain(path).items
        else:
            for number, spec in enumerate(read_manifest(path)["sources"], start=1):
                try:
                    items += load_source(path, spec, number)
                except (Object2BrainError, OSError, ValueError) as exc:
                    problems.append(f"brain: {exc}")
        if problems:
            return problems
        if not items:
            return [f"brain: {path}: the brain manifest declares no data"]
        if ids is not None:
            on_missing = config.rsa.on_missing if config.rsa is not None else "error"
            BrainData(items, path).common_ids(ids, on_missing=on_missing)
    except (Object2BrainError, OSError, ValueError) as exc:
        problems.append(f"brain: {exc}")
    return problems


def plan_stages(study: Study) -> list[PlannedStage]:
    """What a run of ``study`` would do with each enabled stage, in order, and why."""
    plan: list[PlannedStage] = []
    recorded: dict[str, str] = {}  # stage -> key of its .stage.json (the stand-in of a re-run)
    pending: list[str] = []
    for stage in STAGES:
        try:
            if not stage.enabled(study):
                continue
        except Exception:
            continue
        units: list[Unit] = list(study.config.models) if stage.per_model else [None]
        for model in units:
            name = stage.name if model is None else f"{stage.name}:{model.label}"
            folder = stage.folder(study, model)
            action, reason, key = _decide(study, stage, model, folder, recorded, pending)
            plan.append(PlannedStage(name, folder, action, reason))
            recorded[name] = key
            if action == "run":
                pending.append(name)
            study.cache.keys[name] = key
            with contextlib.suppress(Exception):  # its outputs may not exist yet
                stage.publish(study, model)
    return plan


def _decide(
    study: Study,
    stage: Stage,
    model: Unit,
    folder: Path,
    recorded: dict[str, str],
    pending: list[str],
) -> tuple[str, str, str]:
    """``(action, reason, key)`` of one stage; ``key`` its recorded key when reused."""
    marker = folder / STAGE_FILE
    record: dict[str, Any] = json.loads(marker.read_text()) if marker.is_file() else {}
    old = str(record.get("key", ""))
    try:
        study.cache.keys.update(recorded)
        key = digest(stage.key(study, model))
        study.cache.keys.update({name: _PENDING for name in pending})
        poisoned = digest(stage.key(study, model))
    except Exception:
        return "run", "reads outputs that an earlier stage will write", _PENDING
    finally:
        study.cache.keys.update(recorded)
    if poisoned != key:
        reads = [name for name in pending if _reads(study, stage, model, recorded, name)]
        return "run", f"an earlier stage it reads re-runs ({', '.join(reads)})", key
    if not record:
        return "run", f"never run (no {STAGE_FILE})", key
    if old != key:
        return "run", "options or inputs changed", key
    out = study.out
    missing = [p for p in record.get("outputs", []) if not (out / p).exists()]
    if missing:
        return "run", f"outputs missing: {', '.join(missing[:3])}", key
    return "reuse", "unchanged", key


def _reads(study: Study, stage: Stage, model: Unit, recorded: dict[str, str], name: str) -> bool:
    """Whether the key of ``stage`` holds the key of the stage ``name``."""
    study.cache.keys.update(recorded)
    before = digest(stage.key(study, model))
    study.cache.keys[name] = _PENDING
    after = digest(stage.key(study, model))
    study.cache.keys.update(recorded)
    return before != after

"""The report's provenance section: how the results were made, read from the stages' records.

Everything comes from files the stages write beside their results: ``manifest.json`` (command,
options under ``config``, ``seeds``, ``versions``, the targets and their subjects or raters and
the ROI voxel counts of ``rsa``, the ``warnings`` of an ``object2brain run``), ``.stage.json``
(seconds a stage of a run took) and ``head.json`` beside every head file (where the head came
from and its metrics), including heads given to the run from elsewhere (the run config's
``models[].head``). A record that is missing is said to be missing, never guessed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from object2brain.report import html

#: Options of a stage's ``config`` that name inputs or resources, not how results were computed.
_NOT_OPTIONS = frozenset(
    {"activations", "brain", "ratings", "stimuli", "out", "behavior_ids", "images", "store"}
    | {"device", "num_workers", "batch_size", "decode", "progress", "models", "report"}
)
#: Options shown outside the collapsed list of every option.
STATISTICS = frozenset(
    {"n_perm", "n_boot", "n_null", "n_null_assign", "folds", "inner_folds", "alphas", "n_iter"}
    | {"bootstrap", "compare_method", "rdm_metric", "brain_rdm", "fdr_family", "perm_null"}
    | {"null_subsets", "threshold", "min_images", "direction", "cross_fit", "compare_models"}
    | {"seed", "n_subjects", "rating_noise", "reduce", "perm_stop"}
)
_HEAD_FIELDS = ("arch", "loss", "epochs_run", "best_epoch", "n_train", "n_val", "n_test")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def _visible(paths: Iterable[Path], folder: Path) -> list[Path]:
    return sorted(
        p for p in paths if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def manifests(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every readable ``manifest.json`` under ``folder`` with its content (``*.manifest.json``
    of activation stores included)."""
    found = _visible(folder.rglob("*manifest.json"), folder)
    records = [(path, _read_json(path)) for path in found]
    return [(path, record) for path, record in records if record is not None]


def _compact(value: object, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in config.items():
        if key in _NOT_OPTIONS:
            continue
        if isinstance(value, dict) and key not in ("layer", "layers"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def statistics_options(records: list[tuple[Path, dict[str, Any]]], folder: Path) -> pd.DataFrame:
    """Every option each stage recorded (``config`` of its manifest, inputs left out): one row
    per (record, option). The run's own manifest, when there is one, holds every section."""
    rows = []
    for path, record in records:
        config = record.get("config")
        if not isinstance(config, dict) or not config:
            continue
        where = path.parent.relative_to(folder).as_posix() or "."
        for name, value in _flatten(config).items():
            rows.append((str(record.get("command", "?")), where, name, _compact(value)))
    return pd.DataFrame(rows, columns=["command", "folder", "option", "value"])


def versions_and_seeds(records: list[tuple[Path, dict[str, Any]]]) -> pd.DataFrame:
    """Package versions (each distinct value, with the commands that recorded it) and seeds."""
    seen: dict[tuple[str, str], list[str]] = {}
    for _, record in records:
        command = str(record.get("command", "?"))
        for kind in ("versions", "seeds"):
            values = record.get(kind)
            if not isinstance(values, dict):
                continue
            for name, value in values.items():
                label = name if kind == "versions" else f"seed: {name}"
                commands = seen.setdefault((label, _compact(value)), [])
                if command not in commands:
                    commands.append(command)
    rows = [(label, value, ", ".join(cmds)) for (label, value), cmds in seen.items()]
    return pd.DataFrame(rows, columns=["package or seed", "value", "recorded by"])


def subjects_and_voxels(records: list[tuple[Path, dict[str, Any]]]) -> pd.DataFrame:
    """Per target of each ``rsa`` record: kind, subjects (raters for behaviour) and the ROI's
    voxel count per subject after resampling and masking (``roi_voxels``; min-max over
    subjects), or why it is unknown."""
    rows = []
    for _, record in records:
        targets = record.get("targets")
        if record.get("command") != "rsa" or not isinstance(targets, dict):
            continue
        voxels = record.get("roi_voxels")
        for name, target in targets.items():
            subjects = target.get("subjects", []) if isinstance(target, dict) else []
            kind = target.get("kind", "?") if isinstance(target, dict) else "?"
            if kind == "behavior":
                count = "n/a (ratings)"
            elif not isinstance(voxels, dict):
                count = "not recorded (manifest written before voxel counts were kept)"
            elif name not in voxels or not voxels[name]:
                count = "n/a (given as RDMs)"
            else:
                values = [int(v) for v in voxels[name].values()]
                count = f"{min(values)}" if min(values) == max(values) else (
                    f"{min(values)}-{max(values)} ("
                    + ", ".join(f"{s}: {v}" for s, v in voxels[name].items()) + ")"
                )  # fmt: skip
            who = "raters" if kind == "behavior" else "subjects"
            rows.append((name, kind, f"{len(subjects)} {who}", count))
    frame = pd.DataFrame(rows, columns=["target", "kind", "subjects / raters", "voxels"])
    return frame.drop_duplicates()


def head_sources(folder: Path) -> pd.DataFrame:
    """Every head of the results: trained here (``head.json`` under ``folder``) or given to the
    run (the run config's ``models[].head``; its ``head.json`` read beside the file)."""
    found: dict[Path, str] = {}
    for path in _visible(folder.rglob("head.json"), folder):
        found[path.resolve()] = "trained in this study"
    run = _read_json(folder / "manifest.json") or {}
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    for model in (config or {}).get("models") or []:
        head = model.get("head") if isinstance(model, dict) else None
        if head:
            found.setdefault((Path(str(head)).parent / "head.json").resolve(), f"given: {head}")
    rows = [_head_row(path, source) for path, source in found.items()]
    if not rows:
        return pd.DataFrame({"heads": ["none found"]})
    frame = pd.DataFrame(rows)
    blank = frame.map(lambda v: v is None or (isinstance(v, str) and v == ""))
    empty = [c for c in frame.columns if c not in ("model", "source") and blank[c].all()]
    return frame.drop(columns=empty)  # facts no head records: left out (the page's width)


def _head_row(path: Path, source: str) -> dict[str, object]:
    """One head: model, source, training facts and validation/test metrics of its head.json."""
    record = _read_json(path)
    if record is None:
        return {"model": "?", "source": source, "arch": f"{path}: not readable"}
    row: dict[str, object] = {"model": record.get("model", record.get("arch", "?"))}
    row["source"] = source
    row.update({key: record.get(key, "") for key in _HEAD_FIELDS})
    metrics = record.get("metrics")
    for split in ("val", "test"):
        values = metrics.get(split) if isinstance(metrics, dict) else None
        if isinstance(values, dict):
            row[f"{split} pearson / mae"] = _metric(values, "pearson", "mae")
    row["degenerate"] = record.get("degenerate", "")
    return row


def _metric(values: dict[str, Any], *names: str) -> str:
    parts = []
    for name in names:
        value = values.get(name)
        parts.append(f"{value:.3f}" if isinstance(value, int | float) else "n/a")
    return " / ".join(parts)


def stage_timings(folder: Path) -> pd.DataFrame:
    """Seconds each stage of a run took (``.stage.json``), with whether the last run reused it;
    without those, the ``created`` time of each manifest."""
    run = _read_json(folder / "manifest.json") or {}
    reused = run.get("reused") if isinstance(run.get("reused"), list) else []
    rows = []
    for marker in sorted(folder.rglob(".stage.json")):
        record = _read_json(marker) or {}
        where = marker.parent.relative_to(folder).as_posix() or "."
        seconds = record.get("seconds")
        rows.append((where, "n/a" if seconds is None else f"{float(seconds):.1f}"))
    if rows:
        frame = pd.DataFrame(rows, columns=["stage folder", "seconds (when it last ran)"])
        note = ", ".join(str(s) for s in reused or []) or "none"
        frame.attrs["note"] = f"reused by the last run (not re-computed): {note}"
        return frame
    created = [
        (path.parent.relative_to(folder).as_posix() or ".", str(r.get("command")), r.get("created"))
        for path, r in manifests(folder)
    ]
    return pd.DataFrame(created, columns=["folder", "command", "manifest written (UTC)"])


def warnings_of_the_run(records: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """The ``warnings`` the manifests record, each once, in order."""
    seen: list[str] = []
    for _, record in records:
        for message in record.get("warnings") or []:
            if str(message) not in seen:
                seen.append(str(message))
    return seen


def provenance_section(folder: Path, tables: dict[str, pd.DataFrame]) -> html.Section:
    """Versions and seeds, every option, subjects, raters and voxels, heads, warnings, timings."""
    del tables
    records = manifests(folder)
    parts = ["<h3>Versions and seeds</h3>", html.table_html(versions_and_seeds(records), wrap=True)]
    targets = subjects_and_voxels(records)
    if not targets.empty:
        parts += ["<h3>Subjects, raters and ROI voxels</h3>", html.table_html(targets, wrap=True)]
    heads = head_sources(folder)
    parts += ["<h3>Valence heads</h3>", html.table_html(heads, wrap=True)]
    timings = stage_timings(folder)
    parts.append("<h3>Stage timings</h3>")
    if "note" in timings.attrs:
        parts.append(f"<p>{html.escape(timings.attrs['note'])}</p>")
    parts.append(
        html.table_html(timings, wrap=True) if not timings.empty else "<p>none recorded</p>"
    )
    warnings = warnings_of_the_run(records)
    parts.append("<h3>Warnings of the run</h3>")
    parts.append(
        "<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>"
        if warnings
        else "<p>None recorded (a run's manifest lists its warnings; stage commands run "
        "on their own do not).</p>"
    )
    options = statistics_options(records, folder)
    if (options["command"] != "run").any():  # the stages' own records: the options they used
        options = options[
            (options["command"] != "run") | ~options["option"].str.contains(".", regex=False)
        ]
    last = options["option"].str.rsplit(".", n=1).str[-1]
    parts.append("<h3>Statistics options</h3>")
    parts.append(html.table_html(options[last.isin(STATISTICS)], wrap=True))
    parts.append(
        "<details><summary>"
        f"{len(options)} options (n_perm, n_boot, n_null, n_null_assign, folds, alphas, ...)"
        "</summary>" + html.table_html(options, wrap=True) + "</details>"
    )
    return html.Section("Provenance", "".join(parts), "provenance")

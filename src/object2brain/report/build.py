"""The study report: one self-contained HTML file from a results folder.

:func:`build_report` looks for the result tables of every stage anywhere under the folder
(:data:`TABLES`; CSV, or Parquet where a folder has no CSV of that name), the figures under
``figures/`` folders (PNG), ``truth.json`` of a simulation and the ``manifest.json`` files, and
writes ``report.html`` with the sections of :data:`SECTIONS`: summary, planted truth vs recovered
(when the data are simulated), valence heads (metrics, predicted vs rated, where each head came
from), alignment per target with every model's layer curve and the noise ceiling, each model's best
layer, the across-subject inference and model comparisons, behaviour correlations per condition,
condition contrasts, encoding models, filter x group heatmaps and galleries, Object2Brain across
models and per model, provenance (:mod:`object2brain.report.provenance`), and every table as a
downloadable CSV. The figures of the alignment, contrasts, inference, encoding and Object2Brain
sections are drawn here from the tables (:mod:`object2brain.report.figures.glance`), every model
together, as inline SVG; the dissection's galleries and the lesion heatmaps are the stages' PNGs.
Images and tables are inlined (data URIs): the file needs no network and no other file, except
tables whose CSV exceeds :data:`MAX_EMBEDDED_CSV_BYTES` (e.g. the detections of a whole corpus),
which are linked by their path relative to the report instead.

When the folder is the output of ``object2brain run`` (its ``manifest.json`` has command ``run``),
only the files that manifest lists are reported: results left in the folder by an earlier version
of the study (a renamed model, a stage removed from the config) stay out, with one warning.

Every table is checked against its schema (:mod:`object2brain.tables`): a file that cannot be read
or lacks columns raises :class:`~object2brain.errors.DataError` naming the file. Tables without
rows are listed as empty and get no section. A table next to a ``manifest.json`` whose run would
have written it but does not list it in ``outputs`` is a leftover of an earlier run into the same
folder: it is ignored, with one warning naming the ignored files.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from object2brain.errors import DataError, StimulusError, listing, require_columns
from object2brain.manifest import cached_file_sha256
from object2brain.report import html
from object2brain.report.figures import glance
from object2brain.report.figures.alignment import slug
from object2brain.report.figures.lesion import summary_rows
from object2brain.report.provenance import head_sources, provenance_section
from object2brain.tables import TABLES as SCHEMAS

log = logging.getLogger("object2brain.report")

#: Figures of the report by file-name prefix (see :func:`find_figures`).
_Figures = Callable[[str], list[Path]]

#: The result tables the report looks for, in the order of its sections and downloads.
TABLES: tuple[str, ...] = tuple(SCHEMAS)

#: Tables computed from brain or rating data (compared with a simulation's planted truth).
TABLES_OF_DATA = frozenset(TABLES) - {"head_metrics", "filter_objects", "detections"}

#: Tables whose CSV is larger than this are linked (path relative to the report), not inlined.
MAX_EMBEDDED_CSV_BYTES = 8_000_000

#: The tables each command can write (the ``command`` of its ``manifest.json``): a table of one
#: of them that the manifest does not list is stale. Manifests of other commands (``extract``,
#: ``simulate``, ``run``, ...) say nothing about tables; those of unknown commands claim every
#: table when they list any.
TABLES_WRITTEN_BY: dict[str, tuple[str, ...]] = {
    stage: tuple(name for name, schema in SCHEMAS.items() if schema.stage == stage)
    for stage in dict.fromkeys(schema.stage for schema in SCHEMAS.values())
}
_SUFFIXES = (".csv", ".parquet")


def table_schemas() -> dict[str, Sequence[str]]:
    """Required columns of each result table (:data:`object2brain.tables.TABLES`).

    Tables without required columns (``propagate_*``, whose columns depend on the run) are
    shown as they are.
    """
    return {
        name: schema.required_columns for name, schema in SCHEMAS.items() if schema.required_columns
    }


def read_result_table(path: Path, name: str) -> pd.DataFrame:
    """Read a result table (CSV or Parquet) and check its columns; ``DataError`` names ``path``."""
    from object2brain.data.stimuli import read_table

    try:
        frame = read_table(path)
    except StimulusError as exc:
        raise DataError(f"{exc} (result table {name!r})") from None
    required = table_schemas().get(name)
    if required:
        require_columns(frame.columns, required, str(path), detail=f" required in {name} tables")
    return frame


def _table_files(folder: Path, name: str) -> list[Path]:
    """``<name>.csv`` per folder under ``folder`` (``<name>.parquet`` where there is no CSV)."""
    by_dir: dict[Path, Path] = {}
    for suffix in reversed(_SUFFIXES):  # CSV last: it wins over Parquet in the same folder
        for path in folder.rglob(f"{name}{suffix}"):
            if not path.is_file():
                continue
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            by_dir[path.parent] = path
    return sorted(by_dir.values())


def _read_manifest(directory: Path, *, warn: bool) -> dict[str, Any] | None:
    """``directory/manifest.json`` as a dict; None when there is none or it is unreadable (a
    warning if ``warn``: the results beside it are then reported unchecked)."""
    path = directory / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if warn:
            log.warning("%s: unreadable (%s); results beside it are reported unchecked", path, exc)
        return None
    return manifest if isinstance(manifest, dict) else None


def _run_record(directory: Path, *, warn: bool) -> tuple[object, set[str]] | None:
    """``(command, names of the files listed in outputs)`` of ``directory/manifest.json``; None
    when there is none, it is unreadable (a warning if ``warn``) or it lists no outputs.

    Outputs are matched by file name, since commands record them relative to the output folder,
    to the working directory or as absolute paths, and folders get copied or moved.
    """
    manifest = _read_manifest(directory, warn=warn)
    outputs = manifest.get("outputs") if manifest is not None else None
    if manifest is None or not isinstance(outputs, list):
        return None
    return manifest.get("command"), {Path(str(o)).name for o in outputs}


class _RunScope:
    """The files that ``folder/manifest.json`` of an ``object2brain run`` lists as its outputs;
    admits every file when the folder is not a run's output."""

    def __init__(self, folder: Path) -> None:
        self.files: set[Path] | None = None
        self.left_out: list[Path] = []
        manifest = _read_manifest(folder, warn=False)  # warned where its tables are checked
        outputs = manifest.get("outputs") if manifest is not None else None
        # earlier run manifests listed only the stores: they scope nothing
        if (
            manifest is not None
            and manifest.get("command") == "run"
            and manifest.get("lists_every_output") is True
            and isinstance(outputs, list)
        ):
            self.files = {(folder / str(o)).resolve() for o in outputs}

    def admits(self, path: Path) -> bool:
        if self.files is None or path.resolve() in self.files:
            return True
        self.left_out.append(path)
        return False

    def warn(self, folder: Path) -> None:
        if self.left_out:
            log.warning(
                "left out %d file(s) that %s does not list as outputs of the run (left by an "
                "earlier version of the study, e.g. a renamed model): %s",
                len(self.left_out),
                folder / "manifest.json",
                listing([str(p) for p in self.left_out]),
            )


def _listed_tables(directory: Path, cache: dict[Path, set[str] | None]) -> set[str] | None:
    """Tables that ``directory/manifest.json`` vouches for; None: no such (usable) manifest."""
    if directory not in cache:
        cache[directory] = _tables_vouched_for(_run_record(directory, warn=True))
    return cache[directory]


def _tables_vouched_for(record: tuple[object, set[str]] | None) -> set[str] | None:
    if record is None:
        return None
    command, names = record
    listed = {Path(n).stem for n in names if Path(n).suffix.lower() in _SUFFIXES} & set(TABLES)
    if command in TABLES_WRITTEN_BY:
        claimed = set(TABLES_WRITTEN_BY[str(command)])
    elif not listed:  # extract, simulate, run, ...: says nothing about tables
        return None
    else:
        claimed = set(TABLES)
    # tables the run could not have written stay in (they belong to another command's run)
    return listed | (set(TABLES) - claimed)


#: The files a table was read from, each with its rows.
_Sources = dict[str, list[tuple[Path, pd.DataFrame]]]


def find_tables(
    folder: Path, scope: _RunScope | None = None
) -> tuple[dict[str, pd.DataFrame], _Sources]:
    """Every known result table under ``folder`` (several files of one name are concatenated),
    and the files each was read from.

    Tables that the ``manifest.json`` beside them leaves out are skipped as stale (one warning),
    as are files outside ``scope``.

    Raises:
        DataError: a table that cannot be read or lacks columns of its schema.
    """
    found: dict[str, list[pd.DataFrame]] = {}
    files: _Sources = {}
    manifests: dict[Path, set[str] | None] = {}
    stale: list[str] = []
    for name in TABLES:
        for path in _table_files(folder, name):
            if scope is not None and not scope.admits(path):
                continue
            listed = _listed_tables(path.parent, manifests)
            if listed is not None and name not in listed:
                stale.append(str(path))
                continue
            frame = read_result_table(path, name)
            found.setdefault(name, []).append(frame)
            files.setdefault(name, []).append((path, frame))
    if stale:
        log.warning(
            "ignored %d stale table file(s) that the manifest.json beside them does not list "
            "(left over from an earlier run into the same folder): %s",
            len(stale),
            listing(stale),
        )
    return {name: _concat(frames) for name, frames in found.items()}, files


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    with_rows = [f for f in frames if not f.empty]
    return pd.concat(with_rows or frames[:1], ignore_index=True)


def find_figures(folder: Path, prefix: str, scope: _RunScope | None = None) -> list[Path]:
    """PNG figures whose name starts with ``prefix`` under any ``figures`` folder, leaving out
    those that the run's ``manifest.json`` (beside ``figures/``) does not list: leftovers of an
    earlier run into the same folder (e.g. a model no longer analysed); and those outside
    ``scope``."""
    found = sorted(
        p for p in folder.rglob(f"{prefix}*.png") if p.parent.name == "figures" and p.is_file()
    )
    return [
        path for path in found if (scope is None or scope.admits(path)) and _figure_is_current(path)
    ]


def _figure_is_current(path: Path) -> bool:
    record = _run_record(path.parent.parent, warn=False)
    if record is None or record[0] not in TABLES_WRITTEN_BY:
        return True  # nothing to check against
    # a run without figures lists none: then every figure there is older than it
    if path.name not in record[1]:
        log.warning("%s: not listed by the manifest.json beside it, left out as stale", path)
        return False
    return True


def _figure(path: Path, caption: str) -> str:
    uri = html.png_data_uri(path.read_bytes())
    return (
        f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _download(frame: pd.DataFrame, name: str, files: Sequence[Path], report_dir: Path) -> str:
    """A CSV download inlined in the page; for a table over :data:`MAX_EMBEDDED_CSV_BYTES`,
    links to its files relative to the report instead."""
    data = frame.to_csv(index=False).encode()
    if len(data) > MAX_EMBEDDED_CSV_BYTES:
        links = ", ".join(
            f'<a href="{html.escape(_relative(path, report_dir))}">'
            f"{html.escape(_relative(path, report_dir))}</a>"
            for path in files
        )
        return (
            f"{html.escape(name)} ({len(frame)} rows, {len(data) / 1e6:.0f} MB: not inlined): "
            f"{links}"
        )
    payload = base64.b64encode(data).decode("ascii")
    return (
        f'<a download="{html.escape(name)}.csv" href="data:text/csv;base64,{payload}">'
        f"{html.escape(name)}.csv</a> ({len(frame)} rows)"
    )


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


@dataclass(frozen=True)
class _Study:
    """What the report shows of a results folder.

    ``tables``: the tables with rows; ``all_tables``: every table found, empty ones included;
    ``sources``: the files each table was read from; ``truth``: a simulation's ``truth.json``
    (None: no simulation); ``truth_tables``: the tables compared with it; ``other_data``: folders
    of analyses of other data, not compared with it; ``empty``: names of tables without rows.
    """

    tables: dict[str, pd.DataFrame]
    all_tables: dict[str, pd.DataFrame]
    sources: _Sources
    truth: dict[str, Any] | None
    truth_tables: dict[str, pd.DataFrame]
    other_data: list[Path]
    empty: list[str]


def _read_study(folder: Path, scope: _RunScope) -> _Study:
    """Every result table under ``folder`` (within ``scope``) and a simulation's truth."""
    tables, sources = find_tables(folder, scope)
    truth_files = [p for p in sorted(folder.rglob("truth.json")) if scope.admits(p)]
    truth, truth_tables = None, tables
    other_data: list[Path] = []
    if truth_files:
        if len(truth_files) > 1:
            log.warning(
                "%d simulations under %s: the planted truth compared is %s",
                len(truth_files),
                folder,
                truth_files[0],
            )
        truth = _read_truth(truth_files[0])
        truth_tables, other_data = _tables_of_simulation(sources, truth_files[0])
    if not tables:
        raise DataError(
            f"{folder}: no result tables found ({', '.join(TABLES)}; as .csv or .parquet)"
        )
    empty = [name for name, frame in tables.items() if frame.empty]
    with_rows = {n: t for n, t in tables.items() if not t.empty}
    return _Study(with_rows, tables, sources, truth, truth_tables, other_data, empty)


@dataclass(frozen=True)
class _Context:
    """What a section builder reads: the study's tables, its figures (by file-name prefix), the
    results folder and the report's folder (for links)."""

    study: _Study
    figures: _Figures
    folder: Path
    report_dir: Path

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        return self.study.tables


#: Builds one section of the report, or None when its tables are absent.
SectionBuilder = Callable[[_Context], "html.Section | None"]


def _tables_section(context: _Context) -> html.Section:
    study = context.study
    downloads = (
        f"<li>{_download(t, n, [p for p, _ in study.sources[n]], context.report_dir)}</li>"
        for n, t in study.all_tables.items()
    )
    return html.Section("Tables (CSV downloads)", "<ul>" + "".join(downloads) + "</ul>", "tables")


def _when(name: str, build: Callable[[_Context, pd.DataFrame], html.Section]) -> SectionBuilder:
    """A builder that calls ``build(context, table)`` when table ``name`` has rows."""

    def section(context: _Context) -> html.Section | None:
        if name not in context.tables:
            return None
        return build(context, context.tables[name])

    return section


#: The report's sections in page order: (anchor, builder). A new section (e.g. the RDM panels
#: read from ``rdms.h5``, which belong after ``contrast``) is one entry here.
SECTIONS: list[tuple[str, SectionBuilder]] = [
    ("summary", lambda c: _summary(c.tables, c.study.truth, c.study.empty, c.study.other_data)),
    ("truth", lambda c: _truth_or_none(c)),
    ("heads", lambda c: _heads_section(c) if _has_heads(c) else None),
    ("alignment", _when("alignment", lambda c, t: _alignment_section(c, t))),
    ("inference", lambda c: _inference_section(c)),
    ("behavior", _when("behavior_direct", lambda c, t: _behavior_section(t))),
    ("contrast", _when("condition_contrast", lambda c, t: _contrast_section(t))),
    ("rdms", lambda c: _rdm_section(c.figures("rdms_") + c.figures("mds_"))),
    ("encoding", _when("encoding", lambda c, t: _encoding_section(c, t))),
    ("filters", _when("filter_objects", lambda c, t: _filters_section(c, all_images_rows(t)))),
    ("lesion", _when("object2brain", lambda c, t: _lesion_section(c, t))),
    ("provenance", lambda c: provenance_section(c.folder, c.tables)),
    ("tables", _tables_section),
]  # fmt: skip


def _sections(context: _Context) -> list[html.Section]:
    """The report's sections, in page order (:data:`SECTIONS`), for the tables present."""
    built = (build(context) for _, build in SECTIONS)
    return [section for section in built if section is not None]


def _simulated_note(study: _Study) -> str:
    """The banner that says the data are simulated ('' when they are not)."""
    if study.truth is None:
        return ""
    whose = (
        "Some of the results in this folder come from brain and rating data"
        if study.other_data
        else "The brain and rating data of this study are"
    )
    return (
        f'<p class="note"><b>Simulated data.</b> {whose} simulated with a planted ground '
        "truth (<code>truth.json</code>); the section <i>Planted truth vs recovered</i> "
        "compares the two.</p>"
    )


def build_report(
    folder: str | Path, *, out: str | Path | None = None, title: str | None = None
) -> Path:
    """Write ``report.html`` for the results under ``folder``; returns its path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: results folder not found")
    target = Path(out) if out else folder / "report.html"
    scope = _RunScope(folder)
    study = _read_study(folder, scope)

    def figures(prefix: str) -> list[Path]:
        return find_figures(folder, prefix, scope)

    sections = _sections(_Context(study, figures, folder, target.parent))
    scope.warn(folder)
    page = html.render_page(title or "object2brain report", _simulated_note(study), sections)
    return html.write_page(target, page)


def _tables_of_simulation(
    sources: _Sources, truth_path: Path
) -> tuple[dict[str, pd.DataFrame], list[Path]]:
    """The rows of the analyses of the simulation beside ``truth_path``, and the folders of the
    other analyses found.

    A table of brain or rating results belongs to the simulation when the ``manifest.json``
    beside it records, among its input hashes, the SHA-256 of a data file of the simulation
    (patterns, ratings; not the brain manifest, whose few lines any study may share), or when
    it has no manifest with inputs to tell. Tables of other kinds (heads, dissection) are kept.
    """
    simulation = truth_path.parent
    record = _run_record(simulation, warn=False)
    if record is not None and record[0] == "simulate":
        data = [simulation / name for name in record[1]]
    else:
        data = list(simulation.iterdir())
    simulated = {
        cached_file_sha256(p)  # hashed already when the report is built by `run`
        for p in data
        if p.is_file() and p.suffix.lower() in (".h5", ".csv")
    }
    kept: dict[str, pd.DataFrame] = {}
    others: set[Path] = set()
    for name, pairs in sources.items():
        frames = []
        for path, frame in pairs:
            inputs = _input_hashes(path.parent)
            if name not in TABLES_OF_DATA or inputs is None or inputs & simulated:
                frames.append(frame)
            else:
                others.add(path.parent)
        if frames:
            kept[name] = _concat(frames)
    return kept, sorted(others)


def _input_hashes(directory: Path) -> set[str] | None:
    """The input SHA-256 values of ``directory/manifest.json``; None: no manifest with inputs."""
    manifest = _read_manifest(directory, warn=False)
    inputs = manifest.get("inputs") if manifest is not None else None
    if not isinstance(inputs, dict) or not inputs:
        return None
    return {str(value) for value in inputs.values()}


def _layers_per_model(alignment: pd.DataFrame) -> str:
    """Each model's own number of layers (``valence``, the head's output, not counted)."""
    layers = alignment[alignment["layer"].astype(str) != "valence"]
    counts = layers.groupby("model", sort=False)["layer"].nunique()
    return ", ".join(f"{model}: {n}" for model, n in counts.items()) or "n/a"


def _largest(values: pd.Series) -> str:
    """The largest value as an integer, ``n/a`` when there is no number."""
    top = pd.to_numeric(values, errors="coerce").max()
    return "n/a" if pd.isna(top) else str(int(top))


def _read_truth(path: Path) -> dict[str, Any]:
    try:
        truth = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as the simulation's truth ({exc})") from None
    if not isinstance(truth, dict):
        raise DataError(f"{path}: not the simulation's truth (expected a JSON object)")
    return truth


def _summary(
    tables: dict[str, pd.DataFrame],
    truth: dict[str, Any] | None,
    empty: Sequence[str] = (),
    other_data: Sequence[Path] = (),
) -> html.Section:
    facts = []
    if "alignment" in tables:
        frame = tables["alignment"]
        in_all = frame[frame["condition"].astype(str) == "all"]
        facts += [
            ("models", ", ".join(dict.fromkeys(frame["model"].astype(str)))),
            ("layers per model", _layers_per_model(frame)),
            ("targets", ", ".join(dict.fromkeys(frame["target"].astype(str)))),
            ("conditions", ", ".join(dict.fromkeys(frame["condition"].astype(str)))),
            ("stimuli", _largest(in_all["n_stimuli"] if not in_all.empty else frame["n_stimuli"])),
            (
                "RDM / comparison",
                f"{frame['rdm_metric'].iat[0]} / {frame['compare_method'].iat[0]}",
            ),
            ("permutations", _largest(frame["n_perm"])),
        ]
    if "filter_objects" in tables:
        frame = all_images_rows(tables["filter_objects"])
        keys = ["model", "layer", "filter"]
        n_assigned = len(frame[frame["assigned"].astype(bool)].drop_duplicates(keys))
        n_filters = len(frame.drop_duplicates(keys))
        facts.append(("filters assigned to an object group", f"{n_assigned} of {n_filters}"))
    if truth is not None:
        simulated = f"simulated, {truth.get('n_subjects')} subjects, seed {truth.get('seed')}"
        if other_data:
            simulated += f"; other data in {', '.join(str(p) for p in other_data)}"
        facts.append(("data", simulated))
    if empty:
        facts.append(("empty tables (no rows, no section)", ", ".join(empty)))
    body = html.table_html(pd.DataFrame(facts, columns=["", "value"]))
    return html.Section("Study summary", body, "summary")


def best_layers(alignment: pd.DataFrame) -> pd.DataFrame:
    """Per model, target and condition: the layer with the highest group-level r."""
    rows = alignment[alignment["subject"].isin(["group"])].dropna(subset=["r"])
    best = rows.loc[rows.groupby(["model", "target", "condition"])["r"].idxmax()]
    return best[["model", "target", "condition", "layer", "layer_index", "r", "p_fdr"]]


def _truth_section(
    truth: dict[str, Any], tables: dict[str, pd.DataFrame], other_data: Sequence[Path] = ()
) -> html.Section:
    rows = []
    best = best_layers(tables["alignment"]) if "alignment" in tables else None
    lesion = tables.get("object2brain")
    for roi in truth.get("rois", []):
        recovered = []
        if best is not None:
            hit = best[(best["target"] == roi["name"]) & (best["condition"] == "all")]
            for _, row in hit.iterrows():
                recovered.append(f"{row['model']}: best layer {row['layer']} (r = {row['r']:.2f})")
        if lesion is not None:
            part = lesion[
                (lesion["target"] == roi["name"])
                & (lesion["subject"] == "group")
                & (lesion["variant"] == "lesion")
                & (lesion["condition"] == "all")
            ]
            part = part.dropna(subset=["delta_r"])
            if not part.empty:
                top = part.loc[part["delta_r"].idxmin()]
                recovered.append(
                    f"largest lesion effect: {top['group']} ({top['model']}/{top['layer']}, "
                    f"delta r = {top['delta_r']:.2f}, p_null = {top['p_null']:.3g})"
                )
        gain = roi.get("condition_gain") or {}
        planted = roi["source"] + (f"; gain {gain}" if gain else "") + f"; SNR {roi['snr']}"
        rows.append((roi["name"], planted, "; ".join(recovered) or "not analysed"))
    frame = pd.DataFrame(rows, columns=["ROI", "planted source", "recovered"])
    body = html.table_html(frame) + (
        "<p>"
        + (
            f"True valence: {html.escape(str(origin))}; "
            if (origin := truth.get("valence_origin"))
            else ""
        )
        + f"Ratings: {truth.get('n_subjects')} simulated raters with noise SD "
        f"{truth.get('rating_noise')}.</p>"
    )
    if other_data:
        body += (
            "<p>Not compared with the planted truth (their inputs are not the simulated data): "
            + html.escape(", ".join(str(p) for p in other_data))
            + ".</p>"
        )
    return html.Section("Planted truth vs recovered", body, "truth")


def _has_heads(context: _Context) -> bool:
    return "head_metrics" in context.tables or "heads" not in head_sources(context.folder)


def _truth_or_none(context: _Context) -> html.Section | None:
    study = context.study
    if study.truth is None:
        return None
    return _truth_section(study.truth, study.truth_tables, study.other_data)


def _heads_section(context: _Context) -> html.Section:
    intro = (
        "Valence heads on the frozen backbones: fit on the training split, early stopping on "
        "the validation split; the test split is held out."
    )
    metrics = context.tables.get("head_metrics")
    parts = []
    if metrics is not None:
        if "out_of_fold" in set(metrics["split"]):
            intro += (
                " Row <code>out_of_fold</code>: every stimulus predicted by a cross-fitted head "
                "that was not fitted on it (in <code>object2brain run</code>, the stores' "
                "<code>valence</code> layer)."
            )
        parts += [f"<p>{intro}</p>", html.table_html(metrics)]
    parts += [
        _figure(
            path, f"Predicted vs rated valence: {path.stem.removeprefix('predicted_vs_rated_')}"
        )
        for path in context.figures("predicted_vs_rated_")
    ]
    parts.append(
        "<p>Every head the analysis used, trained here or given (<code>head.json</code> beside "
        "each head file):</p>" + html.table_html(head_sources(context.folder), wrap=True)
    )
    return html.Section("Valence heads", "".join(parts), "heads")


def _alignment_section(context: _Context, alignment: pd.DataFrame) -> html.Section:
    tables = context.tables
    parts = []
    profile = glance.alignment_profile(
        alignment, tables.get("group_inference"), tables.get("alignment_group")
    )
    if not profile.rows.empty:
        parts.append(_svg(glance.plot_layer_profiles(
            profile, name="alignment", title="Alignment per layer (condition all)"
        )))  # fmt: skip
    conditions = [c for c in dict.fromkeys(alignment["condition"].astype(str)) if c != "all"]
    if conditions:
        by_condition = glance.alignment_profile(
            alignment, tables.get("group_inference"), tables.get("alignment_group"),
            conditions=conditions,
        )  # fmt: skip
        parts.append(_svg(glance.plot_layer_profiles(
            by_condition, name="alignment_conditions", by_condition=True,
            title="Alignment per layer and condition",
        )))  # fmt: skip
    parts.append(_svg(glance.plot_best_layers(alignment)))
    best = best_layers(alignment)
    parts.append("<p>Best layer per model, target and condition (group level):</p>")
    parts.append(html.table_html(best, wrap=True))
    return html.Section("Alignment of layers with behaviour and brain", "".join(parts), "alignment")


def _rdm_section(paths: Sequence[Path]) -> html.Section | None:
    """RDM and MDS panels of each target (the rsa stage's ``rdms_*`` and ``mds_*`` figures)."""
    if not paths:  # drawn by the rsa stage from its rdms.h5
        return None
    intro = (
        "<p>Each target's group RDM next to the RDM of the layer that aligns best with it "
        "(group level, condition all; stimuli sorted by condition, then rated valence; "
        "dissimilarities as percentiles within each RDM), and classical MDS of both. Every RDM "
        "is in <code>rsa/rdms.h5</code>; <code>object2brain export-rsatoolbox</code> writes "
        "them for rsatoolbox.</p>"
    )
    parts = [
        _figure(path, f"{'RDMs' if path.stem.startswith('rdms_') else 'MDS'}: "
                      f"{path.stem.split('_', 1)[1]} and its best layer")
        for path in sorted(paths, key=lambda p: (p.stem.split("_", 1)[1], p.stem[0] == "m"))
    ]  # fmt: skip
    return html.Section("RDMs and MDS", intro + "".join(parts), "rdms")


def _inference_section(context: _Context) -> html.Section | None:
    """The across-subject inference (two-factor bootstrap) and the paired model comparisons."""
    inference = context.tables.get("group_inference")
    comparison = context.tables.get("model_comparison")
    parts = []
    if (
        inference is not None
        and np.isfinite(pd.to_numeric(inference["ci_low"], errors="coerce")).any()
    ):
        profile = glance.inference_profile(inference[inference["condition"] == "all"])
        parts.append(_svg(glance.plot_layer_profiles(
            profile, name="group_inference",
            title=f"Mean r over subjects (bootstrap: {_values(inference, 'bootstrap')})",
        )))  # fmt: skip
    elif inference is not None:
        parts.append(
            "<p>Group inference: no bootstrap intervals (<code>n_boot</code> 0); the layer "
            "profiles above use the across-subject t-test of <code>alignment_group</code>.</p>"
        )
    if comparison is not None:
        parts.append(_svg(glance.plot_model_comparison(comparison)))
        settings = ("compare_method", "n_boot", "bootstrap", "selection")
        note, shown = constant_columns(comparison, settings)
        parts.append(note + html.table_html(shown, wrap=True))
    if not parts:
        return None
    return html.Section("Across subjects and across models", "".join(parts), "inference")


def constant_columns(frame: pd.DataFrame, settings: Sequence[str]) -> tuple[str, pd.DataFrame]:
    """A table made narrower for the page: the columns of ``settings`` (how rows were computed,
    never results) that hold one value in every row (of two or more) are said once in a
    sentence above it (``<p>Every row: n_boot 100; ...</p>``) and left out of the table; the
    CSV keeps them."""
    if len(frame) < 2:
        return "", frame
    same = [c for c in settings
            if c in frame and frame[c].astype(str).nunique(dropna=False) == 1]  # fmt: skip
    if not same:
        return "", frame
    said = "; ".join(f"{html.escape(str(c))} <b>{html.escape(str(frame[c].iat[0]))}</b>"
                     for c in same)  # fmt: skip
    return f"<p>Every row: {said}.</p>", frame.drop(columns=same)


def _values(frame: pd.DataFrame, column: str) -> str:
    return ", ".join(dict.fromkeys(frame[column].astype(str))) if column in frame else "n/a"


def _svg(drawn: glance.Drawn) -> str:
    """A drawn figure inline as SVG (closed once written)."""
    try:
        return html.svg_figure_html(
            drawn.figure, drawn.caption, name=drawn.name, attributes=drawn.attributes()
        )
    finally:
        glance.pyplot().close(drawn.figure)


def best_encoding_layers(encoding: pd.DataFrame) -> pd.DataFrame:
    """The layer with the largest ``r_mean`` per model, ROI (target, subject) and condition,
    with its noise ceiling and the fraction of it explained."""
    columns = ["model", "target", "subject", "condition", "layer", "n_voxels", "r_mean"]
    columns += ["nc_mean", "frac_nc", "p_fdr"]
    rows = encoding.dropna(subset=["r_mean"]).sort_values("r_mean", ascending=False)
    best = rows.groupby(["model", "target", "subject", "condition"], sort=False).head(1)
    return best.loc[:, columns].sort_values(["model", "target", "subject", "condition"])


def _encoding_section(context: _Context, encoding: pd.DataFrame) -> html.Section:
    parts = [_svg(glance.plot_encoding_profiles(encoding))]
    parts.append(
        "<p>Cross-validated ridge from each layer to each voxel: the mean over the ROI's voxels "
        "of the Pearson r of held-out predictions. Best layer per model, ROI and condition:</p>"
    )
    parts.append(html.table_html(best_encoding_layers(encoding), wrap=True))
    return html.Section("Encoding models", "".join(parts), "encoding")


def _behavior_section(frame: pd.DataFrame) -> html.Section:
    body = (
        "<p>Predicted valence (the head's output) against the mean rating, per condition.</p>"
        + html.table_html(frame)
    )
    return html.Section("Behaviour: predicted vs rated valence", body, "behavior")


#: Columns of the contrast table as shown in the report (renamed to say which p it is).
CONTRAST_SHOWN = {
    "model": "model",
    "layer": "layer",
    "target": "target",
    "condition_a": "a",
    "condition_b": "b",
    "r_a": "r a",
    "r_b": "r b",
    "delta_r": "delta r (a - b)",
    "ci_low": "CI low (bootstrap)",
    "ci_high": "CI high (bootstrap)",
    "p_boot_fdr": "p bootstrap, BH-FDR",
    "p_fdr": "p label permutation, BH-FDR",
}


def _contrast_section(frame: pd.DataFrame) -> html.Section:
    shown = frame[frame["subject"] == "group"] if "subject" in frame else frame
    has_boot = "p_boot_fdr" in shown and shown["p_boot_fdr"].notna().any()
    by = "p_boot_fdr" if has_boot else "p_fdr"  # tables of earlier versions lack p_boot
    shown = shown.sort_values(by).head(25)
    columns = {k: v for k, v in CONTRAST_SHOWN.items() if k in shown}
    figure = _svg(glance.plot_contrasts(frame)) if "subject" in frame else ""
    body = figure + (
        "<p>Difference in r between conditions at group level; the table lists the 25 rows "
        f"with the smallest <b>{html.escape(columns[by])}</b> (Benjamini-Hochberg over the "
        "layers x targets of one model and condition pair). The CI and the bootstrap p resample "
        "the stimuli within each condition, valid when the conditions differ in content; the "
        "label-permutation p assumes the stimuli of the two conditions are exchangeable. Every "
        "row and column is in the CSV download.</p>"
        + html.table_html(shown[list(columns)].rename(columns=columns), wrap=True)
    )
    return html.Section("Condition contrast", body, "contrast")


def _dissected(context: _Context) -> dict[Path, tuple[str, str]]:
    """Folder of each dissection -> its (model, layer), from the ``filter_objects`` read there."""
    found = {}
    for path, frame in context.study.sources.get("filter_objects", []):
        if not frame.empty:
            found[path.parent] = (str(frame["model"].iat[0]), str(frame["layer"].iat[0]))
    return found


def _filters_section(context: _Context, filters: pd.DataFrame) -> html.Section:
    counts = (
        filters[filters["assigned"].astype(bool)]
        .groupby(["model", "layer", "group"])
        .size()
        .rename("filters")
        .reset_index()
    )
    parts = [
        "<p>Filters assigned to each object group (EmoCAM++: per-filter Grad-CAM on the "
        "valence output x object detections).</p>",
        html.table_html(counts),
    ]
    where = _dissected(context)
    for path in context.figures("filter_group"):
        model, layer = where.get(path.parent.parent, ("unknown model", "unknown layer"))
        rows = filters[(filters["model"] == model) & (filters["layer"] == layer)]
        caption = f"{model} / {layer}: log2 enrichment of the top filters (rows) x object groups"
        if rows.empty or not np.isfinite(pd.to_numeric(rows["enrichment"], errors="coerce")).any():
            caption += (
                " - blank: no group was detected in enough images to score any filter "
                "(every enrichment is undefined)"
            )
        elif not rows["assigned"].astype(bool).any():
            caption += " - no filter passed the assignment rule (no outlined cell)"
        parts.append(_figure(path, caption))
    galleries = context.figures("gallery")
    if galleries:
        parts.append("<h3>Example images: filter maps and detected boxes</h3>")
        for path in galleries[:12]:
            model, layer = where.get(path.parent.parent, ("unknown model", "unknown layer"))
            group = path.stem.removeprefix("gallery_")
            parts.append(_figure(path, (
                f"{model} / {layer}, group {group}: one row per filter (f<index> = the filter's "
                "channel in the layer, * = assigned to the group, E = enrichment), its top "
                "images with the filter's Grad-CAM map and the group's boxes"
            )))  # fmt: skip
    return html.Section("Which object groups each filter attends to", "".join(parts), "filters")


def all_images_rows(filters: pd.DataFrame) -> pd.DataFrame:
    """The rows of a ``filter_objects`` table assigned on all images (empty ``fold``; the rows of
    the selection folds are for the cross-fitted lesion)."""
    if "fold" not in filters:
        return filters
    return filters[pd.to_numeric(filters["fold"], errors="coerce").isna()]


def _selection_notes(sources: _Sources) -> list[str]:
    """``selection_notes`` of the manifests next to the dissection and lesion tables (what the
    cross-fitted selection could not hold out, or why it fell back to ``same``)."""
    notes: list[str] = []
    for name in ("filter_objects", "object2brain"):
        for path, _ in sources.get(name, []):
            manifest = _read_manifest(path.parent, warn=False) or {}
            found = manifest.get("selection_notes")
            notes += [str(n) for n in found] if isinstance(found, list) else []
    return list(dict.fromkeys(notes))


#: Columns of an ``object2brain`` table left out of the report's table of effects: the level
#: shown (condition all, group), raw p-values whose FDR-adjusted values are shown, and counts of
#: resamples (in the provenance); every column is in the CSV.
_EFFECT_COLUMNS_LEFT_OUT = ("condition", "subject", "p_null", "p_perm", "p_group", "n_null",
                            "n_perm", "n_group_null", "fold")  # fmt: skip


def effects_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The starred Object2Brain rows as the report shows them: without the columns of
    :data:`_EFFECT_COLUMNS_LEFT_OUT` and without columns that hold no value."""
    shown = rows.drop(columns=[c for c in _EFFECT_COLUMNS_LEFT_OUT if c in rows])
    return shown.loc[:, shown.notna().any()]


#: The propagated-lesion tables the report shows, with what each row measures.
_PROPAGATE = {
    "propagate_behavior": "Propagated lesions: change of the direct behaviour correlation "
    "(predicted vs rated valence) when the group's filters are zeroed inside the forward pass.",
    "propagate_alignment": "Propagated lesions: change of later layers' alignment with each "
    "target when the group's filters are zeroed inside the forward pass (group level).",
}


def propagate_parts(tables: dict[str, pd.DataFrame]) -> list[str]:
    """The propagated-lesion tables (``propagate_alignment`` at the group level where it has
    group rows), each with its note; rows with ``selection = same`` are worded
    ``same (circular)`` and a note says how many there are and why they are biased."""
    parts: list[str] = []
    for name, intro in _PROPAGATE.items():
        frame = tables.get(name)
        if frame is None or frame.empty:
            continue
        if "subject" in frame and (frame["subject"].astype(str) == "group").any():
            frame = frame[frame["subject"].astype(str) == "group"]
        parts.append(f"<p>{html.escape(intro)}</p>")
        selection = frame["selection"].astype(str) if "selection" in frame else None
        if selection is not None and (selection == "same").any():
            circular = selection == "same"
            frame = frame.assign(selection=selection.where(~circular, "same (circular)"))
            parts.append(
                f"<p><strong>Circular selection:</strong> {int(circular.sum())} of {len(frame)} "
                "rows (<code>selection = same (circular)</code>) zero groups that were chosen on "
                "the same stimuli whose correlation they then measure, so their delta r is "
                "biased away from zero and is no evidence for the group; rows with "
                "<code>cross_fit</code> zero on each fold's stimuli the groups chosen without "
                "them.</p>"
            )
        parts.append(html.table_html(frame, wrap=True))
    return parts


def _lesion_section(context: _Context, table: pd.DataFrame) -> html.Section:
    notes = _selection_notes(context.study.sources)
    parts = [
        "<p>Change in correlation (delta r) when the filters of an object group are lesioned "
        "(zeroed) or kept alone, tested against filter subsets matched to the group on norm "
        "and on their single filters' alignment with the target (<code>p_group</code>, the "
        "test of the group itself) and against permuted stimulus labels of the target "
        "(<code>p_perm</code>, whether the target relates to the layer at all); * both FDR "
        "< 0.05. <code>p_null</code> (random subsets of the same size) is kept in the table: "
        "it is too liberal for groups atypical of the layer.</p>"
    ]
    if "selection" in table and (table["selection"].astype(str) == "same").any():
        parts.append(
            "<p><strong>Circular selection:</strong> rows with <code>selection = same</code> "
            "test groups chosen on the same stimuli; their effects are biased upwards. Run the "
            "dissection per selection fold for cross-fitted groups.</p>"
        )
    if notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        parts.append(f"<p><strong>Selection notes:</strong></p><ul>{items}</ul>")
    across = glance.plot_object2brain_models(table)
    if across is not None:
        parts.append(_svg(across))
    pairs = table[["model", "layer"]].drop_duplicates().astype(str).itertuples(index=False)
    names = {f"lesion_{slug(model)}_{slug(layer)}": (model, layer) for model, layer in pairs}
    _, rule = glance.object2brain_marks(table)
    for path in context.figures("lesion_"):
        if path.stem not in names:  # lesion_models_*: the figure across models above
            continue
        model, layer = names[path.stem]
        parts.append(_figure(path, (
            f"{model} / {layer}: delta r per object group (rows) and target (columns), "
            f"condition all, group level; * where {rule} (** below 0.01)"
        )))  # fmt: skip
    group = summary_rows(table)
    marks, _ = glance.object2brain_marks(group)
    significant = group[marks.to_numpy(bool)].drop(columns="q").sort_values("delta_r")
    if not significant.empty:
        parts.append(f"<p>Effects where {html.escape(rule)} (condition all, group level):</p>")
        parts.append(html.table_html(effects_table(significant), wrap=True))
    parts += propagate_parts(context.tables)
    return html.Section(
        "Object2Brain: object groups behind the alignment", "".join(parts), "lesion"
    )

"""The study report: one self-contained HTML file from a results folder.

:func:`build_report` looks for the result tables of every stage anywhere under the folder
(:data:`TABLES`; CSV, or Parquet where a folder has no CSV of that name), the figures under
``figures/`` folders (PNG), ``truth.json`` of a simulation and the ``manifest.json`` files, and
writes ``report.html``: summary, planted truth vs recovered (when the data are simulated), valence
heads (metrics, predicted vs rated), layer curves with noise ceilings, behaviour correlations per
condition, condition contrasts, filter x group heatmaps, Object2Brain heatmaps, example images with
filter maps and boxes, and every table as a downloadable CSV. Images and tables are inlined (data
URIs): the file needs no network and no other file, except tables whose CSV exceeds
:data:`MAX_EMBEDDED_CSV_BYTES` (e.g. the detections of a whole corpus), which are linked by their
path relative to the report instead.

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

import pandas as pd

from object2brain.errors import DataError, StimulusError, listing, require_columns
from object2brain.manifest import cached_file_sha256
from object2brain.report import html
from object2brain.report.figures.lesion import summary_rows
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


def _sections(study: _Study, figures: _Figures, report_dir: Path) -> list[html.Section]:
    """The report's sections, in page order, for the tables present."""
    tables = study.tables
    sections = [_summary(tables, study.truth, study.empty, study.other_data)]
    if study.truth is not None:
        sections.append(_truth_section(study.truth, study.truth_tables, study.other_data))
    if "head_metrics" in tables:
        sections.append(_heads_section(figures, tables["head_metrics"]))
    if "alignment" in tables:
        sections.append(_alignment_section(figures, tables["alignment"]))
    if "behavior_direct" in tables:
        sections.append(_behavior_section(tables["behavior_direct"]))
    if "condition_contrast" in tables:
        sections.append(_contrast_section(tables["condition_contrast"]))
    if "encoding" in tables:
        sections.append(_encoding_section(figures, tables["encoding"]))
    if "filter_objects" in tables:
        sections.append(_filters_section(figures, all_images_rows(tables["filter_objects"])))
    if "object2brain" in tables:
        notes = _selection_notes(study.sources)
        sections.append(_lesion_section(figures, tables["object2brain"], tables, notes))
    downloads = (
        f"<li>{_download(t, n, [p for p, _ in study.sources[n]], report_dir)}</li>"
        for n, t in study.all_tables.items()
    )
    sections.append(
        html.Section("Tables (CSV downloads)", "<ul>" + "".join(downloads) + "</ul>", "tables")
    )
    return sections


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

    sections = _sections(study, figures, target.parent)
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
            ("layers per model", _largest(frame.groupby("model")["layer"].nunique())),
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
                    f"delta r = {top['delta_r']:.2f}, p = {top['p_null']:.3g})"
                )
        gain = roi.get("condition_gain") or {}
        planted = roi["source"] + (f"; gain {gain}" if gain else "") + f"; SNR {roi['snr']}"
        rows.append((roi["name"], planted, "; ".join(recovered) or "not analysed"))
    frame = pd.DataFrame(rows, columns=["ROI", "planted source", "recovered"])
    body = html.table_html(frame) + (
        f"<p>True valence: {html.escape(truth.get('valence_origin', ''))}; ratings: "
        f"{truth.get('n_subjects')} simulated raters with noise SD "
        f"{truth.get('rating_noise')}.</p>"
    )
    if other_data:
        body += (
            "<p>Not compared with the planted truth (their inputs are not the simulated data): "
            + html.escape(", ".join(str(p) for p in other_data))
            + ".</p>"
        )
    return html.Section("Planted truth vs recovered", body, "truth")


def _heads_section(figures: _Figures, metrics: pd.DataFrame) -> html.Section:
    intro = (
        "Valence heads on the frozen backbones: fit on the training split, early stopping on "
        "the validation split; the test split is held out."
    )
    if "out_of_fold" in set(metrics["split"]):
        intro += (
            " Row <code>out_of_fold</code>: every stimulus predicted by a cross-fitted head that "
            "was not fitted on it (in <code>object2brain run</code>, the stores' "
            "<code>valence</code> layer)."
        )
    parts = [f"<p>{intro}</p>", html.table_html(metrics)]
    parts += [
        _figure(
            path, f"Predicted vs rated valence: {path.stem.removeprefix('predicted_vs_rated_')}"
        )
        for path in figures("predicted_vs_rated_")
    ]
    return html.Section("Valence heads", "".join(parts), "heads")


def _alignment_section(figures: _Figures, alignment: pd.DataFrame) -> html.Section:
    parts = [
        _figure(path, f"Alignment per layer: {path.stem.removeprefix('alignment_')}")
        for path in figures("alignment_")
    ]
    best = best_layers(alignment)
    parts.append("<p>Best layer per model, target and condition (group level):</p>")
    parts.append(html.table_html(best))
    return html.Section("Alignment of layers with behaviour and brain", "".join(parts), "alignment")


def best_encoding_layers(encoding: pd.DataFrame) -> pd.DataFrame:
    """The layer with the largest ``r_mean`` per model, ROI (target, subject) and condition,
    with its noise ceiling and the fraction of it explained."""
    columns = ["model", "target", "subject", "condition", "layer", "n_voxels", "r_mean"]
    columns += ["nc_mean", "frac_nc", "p_fdr"]
    rows = encoding.dropna(subset=["r_mean"]).sort_values("r_mean", ascending=False)
    best = rows.groupby(["model", "target", "subject", "condition"], sort=False).head(1)
    return best.loc[:, columns].sort_values(["model", "target", "subject", "condition"])


def _encoding_section(figures: _Figures, encoding: pd.DataFrame) -> html.Section:
    parts = [
        _figure(path, f"Encoding per layer: {path.stem.removeprefix('encoding_')}")
        for path in figures("encoding_")
    ]
    parts.append(
        "<p>Cross-validated ridge from each layer to each voxel: the mean over the ROI's voxels "
        "of the Pearson r of held-out predictions (dashed: the ROI's split-half noise ceiling "
        "where run-wise data exist). Best layer per model, ROI and condition:</p>"
    )
    parts.append(html.table_html(best_encoding_layers(encoding)))
    return html.Section("Encoding models", "".join(parts), "encoding")


def _behavior_section(frame: pd.DataFrame) -> html.Section:
    body = (
        "<p>Predicted valence (the head's output) against the mean rating, per condition.</p>"
        + html.table_html(frame)
    )
    return html.Section("Behaviour: predicted vs rated valence", body, "behavior")


def _contrast_section(frame: pd.DataFrame) -> html.Section:
    shown = frame[frame["subject"] == "group"] if "subject" in frame else frame
    by = "p_boot" if "p_boot" in shown else "p_perm"  # tables of earlier versions lack p_boot
    shown = shown.sort_values(by).head(25)
    body = (
        "<p>Difference in r between conditions (the 25 smallest p-values at group level). "
        "<code>ci_low</code>, <code>ci_high</code>, <code>p_boot</code>: bootstrap resampling "
        "the stimuli within each condition, valid when the conditions differ in content; "
        "<code>p_perm</code> permutes condition labels and assumes the stimuli of the two "
        "conditions are exchangeable.</p>" + html.table_html(shown)
    )
    return html.Section("Condition contrast", body, "contrast")


def _filters_section(figures: _Figures, filters: pd.DataFrame) -> html.Section:
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
    for path in figures("filter_group"):
        parts.append(_figure(path, f"Filter x group enrichment: {path.stem}"))
    galleries = figures("gallery")
    if galleries:
        parts.append("<h3>Example images: filter maps and detected boxes</h3>")
        parts.extend(_figure(path, path.stem) for path in galleries[:12])
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


def _lesion_section(
    figures: _Figures,
    table: pd.DataFrame,
    tables: dict[str, pd.DataFrame],
    notes: Sequence[str] = (),
) -> html.Section:
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
    parts.extend(_figure(path, path.stem) for path in figures("lesion_"))
    group = summary_rows(table)
    significant = group[group["q"] < 0.05].drop(columns="q").sort_values("delta_r")
    if not significant.empty:
        parts.append("<p>Significant effects (condition all, group level):</p>")
        parts.append(html.table_html(significant.drop(columns=["condition", "subject"])))
    if "propagate_behavior" in tables:
        parts.append("<p>Propagated lesions: change of the direct behaviour correlation.</p>")
        parts.append(html.table_html(tables["propagate_behavior"]))
    return html.Section(
        "Object2Brain: object groups behind the alignment", "".join(parts), "lesion"
    )

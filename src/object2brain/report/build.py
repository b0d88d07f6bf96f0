"""The study report: one self-contained HTML file from a results folder.

:func:`build_report` looks for the result tables of every stage anywhere under the folder
(``alignment``, ``behavior_direct``, ``condition_contrast``, ``filter_objects``, ``object2brain``,
``propagate_behavior``; CSV), the figures under ``figures/`` folders (PNG), ``truth.json`` of a
simulation and the ``manifest.json`` files, and writes ``report.html``: summary, planted truth vs
recovered (when the data are simulated), layer curves with noise ceilings, behaviour correlations
per condition, condition contrasts, filter x group heatmaps, Object2Brain heatmaps, example images
with filter maps and boxes, and every table as a downloadable CSV. Images and tables are inlined
(data URIs): the file needs no network and no other file.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pandas as pd

from object2brain.errors import DataError
from object2brain.report import html

TABLES = (
    "alignment",
    "behavior_direct",
    "condition_contrast",
    "filter_objects",
    "object2brain",
    "propagate_behavior",
    "propagate_alignment",
)


def find_tables(folder: Path) -> dict[str, pd.DataFrame]:
    """Every known result table under ``folder`` (several files of one name are concatenated)."""
    found: dict[str, list[pd.DataFrame]] = {}
    for name in TABLES:
        for path in sorted(folder.rglob(f"{name}.csv")):
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            found.setdefault(name, []).append(pd.read_csv(path))
    return {name: pd.concat(frames, ignore_index=True) for name, frames in found.items()}


def find_figures(folder: Path, prefix: str) -> list[Path]:
    """PNG figures whose name starts with ``prefix`` under any ``figures`` folder."""
    return sorted(
        p for p in folder.rglob(f"{prefix}*.png") if p.parent.name == "figures" and p.is_file()
    )


def _figure(path: Path, caption: str) -> str:
    uri = html.png_data_uri(path.read_bytes())
    return (
        f'<figure><img src="{uri}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _download(frame: pd.DataFrame, name: str) -> str:
    payload = base64.b64encode(frame.to_csv(index=False).encode()).decode("ascii")
    return (
        f'<a download="{html.escape(name)}.csv" href="data:text/csv;base64,{payload}">'
        f"{html.escape(name)}.csv</a> ({len(frame)} rows)"
    )


def build_report(
    folder: str | Path, *, out: str | Path | None = None, title: str | None = None
) -> Path:
    """Write ``report.html`` for the results under ``folder``; returns its path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: results folder not found")
    tables = find_tables(folder)
    truth_files = sorted(folder.rglob("truth.json"))
    truth = json.loads(truth_files[0].read_text()) if truth_files else None
    if not tables:
        raise DataError(
            f"{folder}: no result tables found ({', '.join(t + '.csv' for t in TABLES)})"
        )
    sections = [_summary(tables, truth)]
    if truth is not None:
        sections.append(_truth_section(truth, tables))
    if "alignment" in tables:
        sections.append(_alignment_section(folder, tables["alignment"]))
    if "behavior_direct" in tables:
        sections.append(_behavior_section(tables["behavior_direct"]))
    if "condition_contrast" in tables:
        sections.append(_contrast_section(tables["condition_contrast"]))
    if "filter_objects" in tables:
        sections.append(_filters_section(folder, tables["filter_objects"]))
    if "object2brain" in tables:
        sections.append(_lesion_section(folder, tables["object2brain"], tables))
    sections.append(
        html.Section(
            "Tables (CSV downloads)",
            "<ul>" + "".join(f"<li>{_download(t, n)}</li>" for n, t in tables.items()) + "</ul>",
            "tables",
        )
    )
    note = (
        '<p class="note"><b>Simulated data.</b> The brain and rating data of this study are '
        "simulated with a planted ground truth (<code>truth.json</code>); the section "
        "<i>Planted truth vs recovered</i> compares the two.</p>"
        if truth is not None
        else ""
    )
    page = html.render_page(title or "object2brain report", note, sections)
    return html.write_page(Path(out) if out else folder / "report.html", page)


def _summary(tables: dict[str, pd.DataFrame], truth: dict[str, Any] | None) -> html.Section:
    facts = []
    if "alignment" in tables:
        frame = tables["alignment"]
        facts += [
            ("models", ", ".join(dict.fromkeys(frame["model"].astype(str)))),
            ("layers per model", str(frame.groupby("model")["layer"].nunique().max())),
            ("targets", ", ".join(dict.fromkeys(frame["target"].astype(str)))),
            ("conditions", ", ".join(dict.fromkeys(frame["condition"].astype(str)))),
            ("stimuli", str(int(frame.loc[frame["condition"] == "all", "n_stimuli"].max()))),
            (
                "RDM / comparison",
                f"{frame['rdm_metric'].iat[0]} / {frame['compare_method'].iat[0]}",
            ),
            ("permutations", str(int(frame["n_perm"].max()))),
        ]
    if "filter_objects" in tables:
        frame = tables["filter_objects"]
        keys = ["model", "layer", "filter"]
        n_assigned = len(frame[frame["assigned"].astype(bool)].drop_duplicates(keys))
        n_filters = len(frame.drop_duplicates(keys))
        facts.append(("filters assigned to an object group", f"{n_assigned} of {n_filters}"))
    if truth is not None:
        facts.append(
            ("data", f"simulated, {truth.get('n_subjects')} subjects, seed {truth.get('seed')}")
        )
    body = html.table_html(pd.DataFrame(facts, columns=["", "value"]))
    return html.Section("Study summary", body, "summary")


def best_layers(alignment: pd.DataFrame) -> pd.DataFrame:
    """Per model, target and condition: the layer with the highest group-level r."""
    rows = alignment[alignment["subject"].isin(["group"])].dropna(subset=["r"])
    best = rows.loc[rows.groupby(["model", "target", "condition"])["r"].idxmax()]
    return best[["model", "target", "condition", "layer", "layer_index", "r", "p_fdr"]]


def _truth_section(truth: dict[str, Any], tables: dict[str, pd.DataFrame]) -> html.Section:
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
    return html.Section("Planted truth vs recovered", body, "truth")


def _alignment_section(folder: Path, alignment: pd.DataFrame) -> html.Section:
    parts = [
        _figure(path, f"Alignment per layer: {path.stem.removeprefix('alignment_')}")
        for path in find_figures(folder, "alignment_")
    ]
    best = best_layers(alignment)
    parts.append("<p>Best layer per model, target and condition (group level):</p>")
    parts.append(html.table_html(best))
    return html.Section("Alignment of layers with behaviour and brain", "".join(parts), "alignment")


def _behavior_section(frame: pd.DataFrame) -> html.Section:
    body = (
        "<p>Predicted valence (the head's output) against the mean rating, per condition.</p>"
        + html.table_html(frame)
    )
    return html.Section("Behaviour: predicted vs rated valence", body, "behavior")


def _contrast_section(frame: pd.DataFrame) -> html.Section:
    shown = frame[frame["subject"] == "group"] if "subject" in frame else frame
    shown = shown.sort_values("p_perm").head(25)
    body = (
        "<p>Difference in r between conditions, tested by permuting condition labels "
        "(the 25 smallest p-values at group level).</p>" + html.table_html(shown)
    )
    return html.Section("Condition contrast", body, "contrast")


def _filters_section(folder: Path, filters: pd.DataFrame) -> html.Section:
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
    for path in find_figures(folder, "filter_group"):
        parts.append(_figure(path, f"Filter x group enrichment: {path.stem}"))
    galleries = find_figures(folder, "gallery")
    if galleries:
        parts.append("<h3>Example images: filter maps and detected boxes</h3>")
        parts.extend(_figure(path, path.stem) for path in galleries[:12])
    return html.Section("Which object groups each filter attends to", "".join(parts), "filters")


def _lesion_section(
    folder: Path, table: pd.DataFrame, tables: dict[str, pd.DataFrame]
) -> html.Section:
    parts = [
        "<p>Change in correlation (delta r) when the filters of an object group are lesioned "
        "(zeroed) or kept alone, against random filter subsets of the same size; * FDR < 0.05.</p>"
    ]
    parts.extend(_figure(path, path.stem) for path in find_figures(folder, "lesion_"))
    group = table[(table["subject"] == "group") & (table["condition"] == "all")]
    significant = group[group["p_fdr"] < 0.05].sort_values("delta_r")
    if not significant.empty:
        parts.append("<p>Significant effects (condition all, group level):</p>")
        parts.append(html.table_html(significant.drop(columns=["condition", "subject"])))
    if "propagate_behavior" in tables:
        parts.append("<p>Propagated lesions: change of the direct behaviour correlation.</p>")
        parts.append(html.table_html(tables["propagate_behavior"]))
    return html.Section(
        "Object2Brain: object groups behind the alignment", "".join(parts), "lesion"
    )

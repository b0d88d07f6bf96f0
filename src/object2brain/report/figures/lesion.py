"""Figures of the Object2Brain lesion analysis (PNG and SVG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from object2brain.report.figures.alignment import pyplot, save_figure, slug


def summary_rows(table: pd.DataFrame, condition: str = "all") -> pd.DataFrame:
    """Rows shown in figures: one condition, the group level of every target, with ``q``: the
    larger of the FDR-adjusted p-values of the starred rule, ``p_group_fdr`` (against filter
    subsets matched to the group) and ``p_perm_fdr`` (against permuted stimulus labels), so a
    mark needs both. Tables without ``p_group`` values (written before it existed) use ``p_fdr``
    (random subsets), as the report's rule in words says."""
    rows = table[(table["condition"] == condition) & (table["subject"] == "group")].copy()
    has_group = (
        "p_group_fdr" in rows and pd.to_numeric(rows["p_group_fdr"], errors="coerce").notna().any()
    )
    first = "p_group_fdr" if has_group else "p_fdr"
    q = pd.to_numeric(rows[first], errors="coerce").to_numpy(dtype=float)
    if "p_perm_fdr" in rows:  # NaN where not computed (n_perm 0, tau-a): the first alone
        perm = rows["p_perm_fdr"].to_numpy(dtype=float)
        q = np.where(np.isnan(perm), q, np.maximum(q, perm))  # NaN first stays NaN
    rows["q"] = q
    return rows


def plot_lesion_heatmaps(table: pd.DataFrame, folder: Path) -> list[Path]:
    """Group x target heatmap of ``delta_r`` per model, layer and variant.

    Cells with ``q < 0.05`` (:func:`summary_rows`) are marked ``*`` (``**`` below 0.01). Files:
    ``lesion_<model>_<layer>.png|svg``.
    """
    plt = pyplot()
    rows = summary_rows(table)
    paths: list[Path] = []
    for (model, layer), block in rows.groupby(["model", "layer"], sort=False):
        variants = list(dict.fromkeys(block["variant"]))
        groups = list(dict.fromkeys(block["group"]))
        targets = list(dict.fromkeys(block["target"]))
        finite = np.abs(block["delta_r"].to_numpy(dtype=float))
        finite = finite[np.isfinite(finite)]
        limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        fig, axes = plt.subplots(
            1,
            len(variants),
            figsize=(2.5 + 1.2 * len(targets) * len(variants), 1.5 + 0.45 * len(groups)),
            squeeze=False,
        )
        for ax, variant in zip(axes[0], variants, strict=True):
            part = block[block["variant"] == variant]
            delta = part.pivot(index="group", columns="target", values="delta_r").reindex(
                index=groups, columns=targets
            )
            q = part.pivot(index="group", columns="target", values="q").reindex(
                index=groups, columns=targets
            )
            image = ax.imshow(
                delta.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto"
            )
            for i in range(len(groups)):
                for j in range(len(targets)):
                    value = q.iat[i, j]
                    mark = "**" if value < 0.01 else "*" if value < 0.05 else ""
                    if mark:  # white on the dark ends of the colour scale
                        dark = abs(float(delta.iat[i, j])) > 0.6 * limit
                        ax.text(j, i, mark, ha="center", va="center", fontsize=11,
                                color="white" if dark else "black")  # fmt: skip
            ax.set_xticks(range(len(targets)), targets, rotation=45, ha="right")
            ax.set_yticks(range(len(groups)), groups if ax is axes[0][0] else [])
            ax.set_title(variant)
        fig.colorbar(image, ax=axes[0].tolist(), label="delta r (variant - full)", shrink=0.8)
        fig.suptitle(f"{model} / {layer}: change in correlation per object group", y=1.04)
        paths.extend(
            save_figure(fig, folder, f"lesion_{slug(str(model))}_{slug(str(layer))}", dpi=120)
        )
        plt.close(fig)
    return paths


def plot_model_comparison(table: pd.DataFrame, folder: Path, variant: str = "lesion") -> list[Path]:
    """Per target, ``delta_r`` of each group as bars, one colour per model (and layer).

    Shows whether architectures with similar overall alignment rely on different object groups.
    File: ``lesion_models_<variant>.png|svg``.
    """
    plt = pyplot()
    rows = summary_rows(table)
    rows = rows[rows["variant"] == variant]
    if rows.empty:
        return []
    rows = rows.assign(series=rows["model"] + " / " + rows["layer"])
    targets = list(dict.fromkeys(rows["target"]))
    groups = list(dict.fromkeys(rows["group"]))
    series = list(dict.fromkeys(rows["series"]))
    fig, axes = plt.subplots(
        len(targets),
        1,
        figsize=(max(6.0, 0.9 * len(groups) * max(1, len(series)) / 2), 2.4 * len(targets)),
        squeeze=False,
        sharex=True,
    )
    width = 0.8 / len(series)
    for ax, target in zip(axes[:, 0], targets, strict=True):
        for s, name in enumerate(series):
            part = rows[(rows["target"] == target) & (rows["series"] == name)].set_index("group")
            values = part["delta_r"].reindex(groups).to_numpy()
            q = part["q"].reindex(groups).to_numpy()
            x = np.arange(len(groups)) + (s - (len(series) - 1) / 2) * width
            bars = ax.bar(x, values, width, label=name)
            for xi, vi, qi in zip(x, values, q, strict=True):
                if np.isfinite(qi) and qi < 0.05:
                    ax.text(xi, vi, "*", ha="center", va="bottom" if vi >= 0 else "top")
            del bars
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{target}\ndelta r")
    axes[-1, 0].set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.suptitle(f"Object-group sensitivity across models ({variant}; * both FDR < 0.05)")
    paths = save_figure(fig, folder, f"lesion_models_{variant}", dpi=120)
    plt.close(fig)
    return paths


def lesion_figures(table: pd.DataFrame, folder: Path) -> list[Path]:
    """The heatmaps and the model comparison of an ``object2brain`` table (none when empty)."""
    if table.empty:
        return []
    return plot_lesion_heatmaps(table, folder) + plot_model_comparison(table, folder)

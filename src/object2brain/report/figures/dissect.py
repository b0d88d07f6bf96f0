"""Figures of the EmoCAM++ dissection (matplotlib, Agg backend), each written as PNG and SVG.

- :func:`plot_filter_group_heatmap`: enrichment of filters (rows) x object groups (columns) for the
  filters with the largest enrichment, assigned filters marked;
- :func:`plot_group_gallery`: for the top filters of one group, the images where the filter is
  most important on that group, its map overlaid and the group's boxes drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from object2brain.report.figures.alignment import pyplot, save_figure, slug


@dataclass
class GalleryPanel:
    """One gallery image: the model input ``(S, S, 3)`` uint8, filter map ``(S, S)``, boxes."""

    group: str
    filter: int
    stimulus_id: str
    image: np.ndarray
    heat: np.ndarray
    boxes: list[tuple[int, ...]]
    enrichment: float
    assigned: bool


def plot_filter_group_heatmap(
    table: pd.DataFrame, out_dir: str | Path, *, max_filters: int = 40
) -> list[Path]:
    """``filter_group_heatmap.png/.svg``: log2 enrichment of the top filters x groups.

    Rows: the ``max_filters`` filters with the largest enrichment in any group, sorted by their
    assigned group then enrichment; assigned cells are outlined.
    """
    plt = pyplot()

    groups = list(dict.fromkeys(table["group"]))
    wide = table.pivot(index="filter", columns="group", values="enrichment")[groups]
    assigned = table.pivot(index="filter", columns="group", values="assigned")[groups]
    best = wide.max(axis=1, skipna=True).fillna(-np.inf)
    chosen = best.sort_values(ascending=False).index[:max_filters]
    flags_chosen = assigned.loc[chosen].to_numpy(dtype=bool)
    home = [int(v) for v in flags_chosen.argmax(axis=1)]
    has_home = [bool(v) for v in np.asarray(flags_chosen.sum(axis=1) > 0)]
    order = sorted(
        range(len(chosen)),
        key=lambda i: (not has_home[i], home[i] if has_home[i] else 0, -best[chosen[i]]),
    )
    rows = [chosen[i] for i in order]
    values = np.log2(np.clip(wide.loc[rows].to_numpy(dtype=float), 1.0 / 16, 16.0))
    flags = assigned.loc[rows].to_numpy(dtype=bool)
    model = str(table["model"].iloc[0]) if len(table) else ""
    layer = str(table["layer"].iloc[0]) if len(table) else ""
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(groups), 1.5 + 0.22 * len(rows)))
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for r, c in zip(*np.nonzero(flags), strict=True):
        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=1.5, ec="k"))
    ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
    ax.set_ylabel("filter")
    ax.set_title(f"{model} {layer}: enrichment (log2); boxes = assigned", fontsize=9)
    fig.colorbar(image, ax=ax, label="log2 enrichment")
    try:
        return save_figure(fig, out_dir, "filter_group_heatmap", dpi=120)
    finally:
        plt.close(fig)


def plot_group_gallery(
    panels: Sequence[GalleryPanel], out_dir: str | Path, group: str
) -> list[Path]:
    """``gallery_<group>.png/.svg``: one row per filter, its top images with map and boxes."""
    plt = pyplot()

    filters = list(dict.fromkeys(p.filter for p in panels))
    per_row = max(sum(1 for p in panels if p.filter == k) for k in filters)
    fig, axes = plt.subplots(
        len(filters), per_row, figsize=(2.0 * per_row, 2.2 * len(filters)), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for r, k in enumerate(filters):
        row = [p for p in panels if p.filter == k]
        for c, panel in enumerate(row):
            ax = axes[r, c]
            ax.imshow(panel.image)
            heat = panel.heat / (panel.heat.max() + 1e-12)
            ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            for x0, y0, x1, y1 in panel.boxes:
                ax.add_patch(
                    plt.Rectangle(
                        (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.2, ec="w"
                    )
                )
            mark = "*" if panel.assigned else ""
            ax.set_title(f"f{k}{mark} E={panel.enrichment:.2f}\n{panel.stimulus_id}", fontsize=7)
    fig.suptitle(f"{group}: top filters (* = assigned)", fontsize=9)
    try:
        return save_figure(fig, out_dir, f"gallery_{slug(group)}", dpi=120)
    finally:
        plt.close(fig)

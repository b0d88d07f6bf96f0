"""Figures of the result tables (matplotlib, Agg backend), each written as PNG and SVG."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from object2brain.io import atomic_path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slug(text: str) -> str:
    """``text`` made safe for a file name: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(text)).strip("_") or "figure"


def save_figure(fig: Any, out_dir: str | Path, stem: str, *, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``<out_dir>/<stem>.png`` and ``.svg``, each atomically; returns both."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for fmt in ("png", "svg"):
        path = folder / f"{stem}.{fmt}"
        with atomic_path(path) as temp:
            fig.savefig(temp, format=fmt, dpi=dpi, bbox_inches="tight")
        files.append(path)
    return files


def plot_alignment(
    alignment: pd.DataFrame,
    model: str,
    out_dir: str | Path,
    subject: str = "group",
    alpha: float = 0.05,
) -> list[Path]:
    """Layer-by-target figure of one model: ``figures/alignment_<model>.png`` and ``.svg``.

    One panel per condition; x = layers in network order, y = r (rows with ``subject``), one line
    per target, the target's noise ceiling as a band ``[nc_low, nc_high]`` in its colour, and
    points with ``p_fdr < alpha`` filled (others hollow).
    """
    plt = pyplot()
    rows = alignment[(alignment["model"] == model) & (alignment["subject"] == subject)]
    conditions = list(dict.fromkeys(rows["condition"])) or ["all"]
    layers = (
        rows[["layer", "layer_index"]]
        .drop_duplicates()
        .sort_values("layer_index")["layer"]
        .tolist()
    )
    position = {layer: i for i, layer in enumerate(layers)}
    width = max(4.0, 0.55 * len(layers) + 2.5)
    n_cols = min(2, len(conditions))
    n_rows = -(-len(conditions) // n_cols)
    fig, grid = plt.subplots(
        n_rows, n_cols, figsize=(width * n_cols, 4.0 * n_rows), squeeze=False, sharey=True
    )
    panels = list(grid.ravel())
    for unused in panels[len(conditions) :]:
        unused.axis("off")
    colours = plt.get_cmap("tab10")
    targets = list(dict.fromkeys(rows["target"]))
    for ax, condition in zip(panels, conditions, strict=False):
        panel = rows[rows["condition"] == condition]
        for t, target in enumerate(targets):
            colour = colours(t % 10)
            data = panel[panel["target"] == target].sort_values("layer_index")
            if data.empty:
                continue
            x = np.asarray([position[layer] for layer in data["layer"]])
            r = data["r"].to_numpy(np.float64)
            ax.plot(x, r, color=colour, label=target, linewidth=1.5)
            significant = data["p_fdr"].to_numpy(np.float64) < alpha
            ax.scatter(x[significant], r[significant], color=colour, s=28, zorder=3)
            ax.scatter(
                x[~significant],
                r[~significant],
                facecolors="white",
                edgecolors=[colour],
                s=28,
                zorder=3,
            )
            low, high = data["nc_low"].iloc[0], data["nc_high"].iloc[0]
            if np.isfinite(low) and np.isfinite(high):
                ax.axhspan(low, high, color=colour, alpha=0.15, linewidth=0)
        ax.axhline(0, color="0.6", linewidth=0.8)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{model} - {condition}")
        ax.set_xlabel("layer")
    for row in grid:
        row[0].set_ylabel(f"r ({subject})")
    fig.text(
        0.01,
        0.0,
        f"filled: FDR-adjusted p < {alpha:g}; band: noise ceiling",
        fontsize=8,
        color="0.3",
    )
    panels[0].legend(fontsize=8, frameon=False, loc="best")
    fig.tight_layout()
    try:
        return save_figure(fig, out_dir, f"alignment_{slug(model)}")
    finally:
        plt.close(fig)


def alignment_figures(alignment: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Every model's alignment figure (:func:`plot_alignment`) from the ``alignment`` table."""
    files: list[Path] = []
    for model in dict.fromkeys(alignment["model"]):
        files += plot_alignment(alignment, str(model), out_dir)
    return files

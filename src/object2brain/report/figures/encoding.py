"""Figures of the ``encoding`` table: the layer profile of each ROI with its noise ceiling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from object2brain.report.figures.alignment import pyplot, save_figure, slug


def plot_encoding_profile(
    encoding: pd.DataFrame, model: str, out_dir: str | Path, alpha: float = 0.05
) -> list[Path]:
    """Layer profile of one model: ``figures/encoding_<model>.png`` and ``.svg``.

    Rows with ``condition == "all"``, one line per target (ROI): x = layers in the table's order
    (network order; banded models last), y = ``r_mean`` (mean out-of-fold Pearson r over the
    ROI's voxels) averaged over subjects, with a band of +-1 standard error over subjects when
    there are several; the target's mean noise ceiling ``nc_mean`` (where known) as a dashed line
    in its colour; points filled where ``p_fdr < alpha`` in every subject, else hollow.
    """
    plt = pyplot()
    rows = encoding[(encoding["model"] == model) & (encoding["condition"] == "all")]
    layers = list(dict.fromkeys(rows["layer"]))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(layers) + 3.5), 3.6))
    for target, roi in rows.groupby("target", sort=False):
        by_layer = roi.groupby("layer", sort=False)
        mean = by_layer["r_mean"].mean().reindex(layers)
        sem = by_layer["r_mean"].sem().reindex(layers).fillna(0.0)
        significant = (by_layer["p_fdr"].max() < alpha).reindex(layers, fill_value=False)
        x = np.arange(len(layers))
        line = ax.plot(x, mean, "-", lw=1.2, label=str(target))[0]
        colour = line.get_color()
        ax.fill_between(x, mean - sem, mean + sem, color=colour, alpha=0.15, lw=0)
        filled = significant.to_numpy(dtype=bool)
        ax.scatter(x[filled], mean[filled], color=colour, s=22, zorder=3)
        ax.scatter(x[~filled], mean[~filled], facecolors="none", edgecolors=colour, s=22)
        ceiling = roi["nc_mean"].dropna()
        if not ceiling.empty:
            ax.axhline(float(ceiling.mean()), color=colour, ls="--", lw=0.8)
    ax.axhline(0.0, color="0.6", lw=0.6)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("mean out-of-fold r (mean over subjects)")
    ax.set_title(
        f"{model}: encoding (filled: FDR p < {alpha:g} in every subject; dashed: noise ceiling)",
        fontsize=8,
    )
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    try:
        return save_figure(fig, out_dir, f"encoding_{slug(model)}")
    finally:
        plt.close(fig)


def encoding_figures(encoding: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """:func:`plot_encoding_profile` for every model of the table."""
    files: list[Path] = []
    for model in dict.fromkeys(encoding["model"]):
        files += plot_encoding_profile(encoding, str(model), out_dir)
    return files

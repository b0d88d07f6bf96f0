"""Figures of the ``encoding`` table: the layer profile of each ROI with its noise ceiling."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from object2brain.report.figures.alignment import pyplot, save_figure, slug


def plot_encoding_profile(
    encoding: pd.DataFrame, model: str, out_dir: str | Path, alpha: float = 0.05
) -> list[Path]:
    """Layer profile of one model: ``figures/encoding_<model>.png`` and ``.svg``.

    Rows with ``condition == "all"``, one line per ROI (``target/subject``): x = layers in the
    table's order (network order; banded models last), y = ``r_mean`` (mean out-of-fold Pearson r
    over the ROI's voxels); the ROI's mean noise ceiling ``nc_mean`` (where known) as a dashed
    line in its colour; points with ``p_fdr < alpha`` filled, others hollow.
    """
    plt = pyplot()
    rows = encoding[(encoding["model"] == model) & (encoding["condition"] == "all")]
    layers = list(dict.fromkeys(rows["layer"]))
    position = {layer: i for i, layer in enumerate(layers)}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(layers) + 2.5), 3.6))
    for (target, subject), roi in rows.groupby(["target", "subject"], sort=False):
        x = [position[layer] for layer in roi["layer"]]
        line = ax.plot(x, roi["r_mean"], "-", lw=1.2, label=f"{target}/{subject}")[0]
        significant = roi["p_fdr"].to_numpy() < alpha
        colour = line.get_color()
        xs, ys = pd.Series(x), roi["r_mean"].reset_index(drop=True)
        ax.scatter(xs[significant], ys[significant], color=colour, s=22, zorder=3)
        ax.scatter(xs[~significant], ys[~significant], facecolors="none", edgecolors=colour, s=22)
        ceiling = roi["nc_mean"].dropna()
        if not ceiling.empty:
            ax.axhline(float(ceiling.iloc[0]), color=colour, ls="--", lw=0.8)
    ax.axhline(0.0, color="0.6", lw=0.6)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("mean out-of-fold r")
    ax.set_title(
        f"{model}: encoding (filled: FDR p < {alpha:g}; dashed: noise ceiling)", fontsize=9
    )
    ax.legend(fontsize=7, frameon=False, loc="best")
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

"""Figures of the result tables (matplotlib, Agg backend), each written as PNG and SVG."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from object2brain.report.figures.base import pyplot, save_figure, slug

__all__ = ["alignment_figures", "plot_alignment", "pyplot", "save_figure", "slug"]


def plot_alignment(
    alignment: pd.DataFrame,
    model: str,
    out_dir: str | Path,
    subject: str = "group",
    alpha: float = 0.05,
) -> list[Path]:
    """Layer profile of one model: ``figures/alignment_<model>.png`` and ``.svg``.

    One panel per target; x = layers in network order, y = r of the rows with ``subject``, one
    line per condition, the bootstrap interval ``[ci_low, ci_high]`` as a vertical line, the
    target's noise ceiling ``[nc_low, nc_high]`` as one grey band, points with ``p_fdr < alpha``
    filled (others hollow). The report draws the same figure with every model and the
    group-level tests (:mod:`object2brain.report.figures.glance`).
    """
    from object2brain.report.figures import glance

    rows = alignment[(alignment["model"] == model) & (alignment["subject"] == subject)]
    rows = rows.reset_index(drop=True)
    significant = pd.to_numeric(rows["p_fdr"], errors="coerce") < alpha
    test = dict.fromkeys(rows["target"].astype(str), "p_fdr (Mantel permutation)")
    profile = glance.Profile(rows, "r", significant, test, f"r ({subject})")
    drawn = glance.plot_layer_profiles(
        profile, name="alignment", title=f"{model}: alignment per layer", by_condition=True
    )
    drawn.figure.text(0.01, -0.02, drawn.caption, fontsize=6, color="0.3", wrap=True)
    try:
        return save_figure(drawn.figure, out_dir, f"alignment_{slug(model)}")
    finally:
        pyplot().close(drawn.figure)


def alignment_figures(alignment: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Every model's alignment figure (:func:`plot_alignment`) from the ``alignment`` table."""
    files: list[Path] = []
    for model in dict.fromkeys(alignment["model"]):
        files += plot_alignment(alignment, str(model), out_dir)
    return files

"""Figures of the result tables (matplotlib, Agg backend), each written as PNG and SVG."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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

"""Figures of valence-head training (matplotlib, Agg backend), each written as PNG and SVG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from object2brain.report.figures.alignment import pyplot, save_figure


def plot_predicted_vs_rated(
    predictions: pd.DataFrame,
    out_dir: str | Path,
    name: str,
    *,
    metrics: dict[str, Any] | None = None,
    split: str = "test",
    seed: int = 0,
) -> list[Path]:
    """Predicted vs rated valence of one model: ``<out_dir>/predicted_vs_rated_<name>.png|.svg``.

    Args:
        predictions: ``stimulus_id, split, valence, predicted`` (``predictions.csv``).
        out_dir: folder of the figures (created).
        name: model label (title and file name).
        metrics: ``metrics.json`` content; the ``split`` entry is printed in the panel.
        split: which split to show in colour; the training images are drawn in light grey.
        seed: seed of the horizontal jitter that separates integer ratings.

    Rated values get a small horizontal jitter (+-0.12) so images of one level do not overlap;
    the diagonal is ``predicted = rated``; a box plot per integer level summarises the split.
    """
    plt = pyplot()

    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = predictions[predictions["split"] == split]
    train = predictions[predictions["split"] == "train"]
    fig, ax = plt.subplots(figsize=(5.0, 4.6))
    for frame, colour, label, size in (
        (train, "0.82", f"train (n={len(train)})", 8),
        (shown, "tab:blue", f"{split} (n={len(shown)})", 16),
    ):
        if frame.empty:
            continue
        x = frame["valence"].to_numpy(float) + rng.uniform(-0.12, 0.12, len(frame))
        ax.scatter(x, frame["predicted"].to_numpy(float), s=size, c=colour, label=label, lw=0)
    if not shown.empty:
        levels = np.floor(shown["valence"].to_numpy(float) + 0.5).astype(int)
        groups = [shown["predicted"].to_numpy(float)[levels == v] for v in np.unique(levels)]
        ax.boxplot(
            groups,
            positions=np.unique(levels),
            widths=0.35,
            showfliers=False,
            manage_ticks=False,
            medianprops={"color": "tab:orange"},
        )
    values = predictions[["valence", "predicted"]].to_numpy(float)
    low, high = float(np.nanmin(values)) - 0.3, float(np.nanmax(values)) + 0.3
    ax.plot([low, high], [low, high], color="0.4", lw=0.8, ls="--", label="predicted = rated")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("rated valence")
    ax.set_ylabel("predicted valence")
    ax.set_title(f"{name}: predicted vs rated valence")
    if metrics and isinstance(metrics.get(split), dict):
        m = metrics[split]
        text = "\n".join(
            f"{key} = {m[key]:.3f}" if isinstance(m.get(key), int | float) else f"{key} = n/a"
            for key in ("spearman", "pearson", "r2", "mae", "rmse")
        )
        ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", fontsize=8, family="monospace")
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    files = save_figure(fig, out, f"predicted_vs_rated_{name}")
    plt.close(fig)
    return files

"""RDM and MDS figures of an alignment, drawn from its RDMs (``rdms.h5``) and its table.

For every target (each ROI, and behaviour) of an :class:`~object2brain.rdm_file.RdmSet`:

- ``figures/rdms_<target>.png``: the target's group RDM next to the RDM of the layer that
  aligns best with it (highest group-level r over all models, condition ``all``). Stimuli are
  sorted by condition (order of appearance), then by group-mean rated valence; dissimilarities
  are shown as percentiles within each RDM (ranks / number of pairs), so the two panels share one
  colour scale whatever their metrics. Thin lines mark the condition boundaries.
- ``figures/mds_<target>.png``: classical (Torgerson) multidimensional scaling of the same two
  RDMs in two dimensions: ``B = -1/2 J D^2 J`` (``J`` the centring matrix), coordinates the two
  leading eigenvectors scaled by the square roots of their eigenvalues; points coloured by rated
  valence (else by condition). Deterministic (no random start).
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from object2brain.rdm_file import Rdm, RdmSet
from object2brain.report.figures.alignment import pyplot, save_figure, slug


def stimulus_order(rdms: RdmSet) -> np.ndarray:
    """Row order ``(n,)``: by condition (order of first appearance, unlabelled last), then by
    valence (ascending, unknown last), then by position."""
    n = len(rdms.stimulus_ids)
    conditions = rdms.conditions or [""] * n
    rank = {c: i for i, c in enumerate(dict.fromkeys(c for c in conditions if c != ""))}
    first = np.array([rank.get(c, len(rank)) for c in conditions], dtype=np.float64)
    valence = rdms.valence if rdms.valence is not None else np.full(n, np.nan)
    second = np.where(np.isfinite(valence), valence, np.inf)
    return np.lexsort((np.arange(n), second, first))


def percentiles(vector: np.ndarray) -> np.ndarray:
    """Dissimilarities ``(m,)`` as percentiles of their ranks (ties averaged), in ``(0, 100]``."""
    from scipy.stats import rankdata

    return np.asarray(rankdata(vector) / max(len(vector), 1) * 100.0)


def classical_mds(square: np.ndarray, dims: int = 2) -> np.ndarray:
    """Classical MDS coordinates ``(n, dims)`` of a dissimilarity matrix ``(n, n)``.

    ``B = -1/2 J D∘D J`` with ``J = I - 11ᵀ/n``; coordinates ``V_k sqrt(max(λ_k, 0))`` of the
    ``dims`` largest eigenvalues; each axis' sign fixed so that its largest |value| is positive.
    """
    n = square.shape[0]
    centring = np.eye(n) - np.ones((n, n)) / n
    b = -0.5 * centring @ (square**2) @ centring
    values, vectors = np.linalg.eigh((b + b.T) / 2)
    top = np.argsort(values)[::-1][:dims]
    coords = vectors[:, top] * np.sqrt(np.clip(values[top], 0.0, None))
    signs = np.sign(coords[np.abs(coords).argmax(axis=0), np.arange(coords.shape[1])])
    return np.asarray(coords * np.where(signs == 0, 1.0, signs))


def best_layer_rdm(rdms: RdmSet, alignment: pd.DataFrame, target: str) -> tuple[Rdm, float]:
    """The model RDM with the highest group-level r with ``target`` (condition ``all``) and
    that r; without alignment rows, the first model's last layer and NaN."""
    models = rdms.select("model")
    if not models:
        raise ValueError("the RDM set holds no model RDM")
    rows = alignment
    if not rows.empty:
        rows = rows[
            (rows["target"] == target) & (rows["subject"] == "group") & (rows["condition"] == "all")
        ].dropna(subset=["r"])
    for _, row in rows.sort_values("r", ascending=False).iterrows():
        for rdm in models:
            if rdm.name == str(row["model"]) and rdm.label == str(row["layer"]):
                return rdm, float(row["r"])
    return models[-1], float("nan")


def _target_rdm(rdms: RdmSet, kind: str, name: str) -> Rdm:
    """The group RDM of a target (pooled, or its only group-level RDM), else its first."""
    found = rdms.select(kind, name)
    group = [r for r in found if r.label == "group"]
    return (group or found)[0]


def _boundaries(rdms: RdmSet, order: np.ndarray) -> list[float]:
    if rdms.conditions is None:
        return []
    labels = [rdms.conditions[i] for i in order]
    return [i - 0.5 for i in range(1, len(labels)) if labels[i] != labels[i - 1]]


def _blocks(rdms: RdmSet, order: np.ndarray) -> tuple[list[float], list[str]]:
    """The centre of each condition's block of rows in ``order`` and its name (none without
    conditions)."""
    if rdms.conditions is None:
        return [], []
    labels = [rdms.conditions[i] or "none" for i in order]
    starts = [0, *(int(edge + 0.5) for edge in _boundaries(rdms, order)), len(labels)]
    centres = [(a + b - 1) / 2 for a, b in pairwise(starts)]
    return centres, [labels[a] for a in starts[:-1]]


def _describe(rdm: Rdm) -> str:
    if rdm.kind == "model":
        return f"{rdm.name} {rdm.label}"
    return f"{rdm.name} ({rdm.label})"


def rdm_figures(rdms: RdmSet, alignment: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """``rdms_<target>`` and ``mds_<target>`` (PNG and SVG) for every brain and behaviour
    target of ``rdms`` (module docstring); returns the files written."""
    files: list[Path] = []
    order = stimulus_order(rdms)
    targets = [(kind, name) for kind in ("brain", "behaviour")
               for name in dict.fromkeys(r.name for r in rdms.select(kind))]  # fmt: skip
    if not rdms.select("model"):
        return files
    for kind, name in targets:
        target = _target_rdm(rdms, kind, name)
        layer, r = best_layer_rdm(rdms, alignment, name)
        pair = [target, layer]
        titles = [
            f"{_describe(target)}",
            f"best layer: {_describe(layer)}" + (f" (r = {r:.3f})" if np.isfinite(r) else ""),
        ]
        files += _rdm_panels(rdms, pair, titles, order, out_dir, f"rdms_{slug(name)}")
        files += _mds_panels(rdms, pair, titles, out_dir, f"mds_{slug(name)}")
    return files


def _rdm_panels(
    rdms: RdmSet,
    pair: list[Rdm],
    titles: list[str],
    order: np.ndarray,
    out_dir: str | Path,
    stem: str,
) -> list[Path]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.6))
    image: Any = None
    for ax, rdm, title in zip(axes, pair, titles, strict=True):
        square = Rdm(rdm.kind, rdm.name, rdm.label, percentiles(rdm.vector)).square()
        square = square[np.ix_(order, order)]
        np.fill_diagonal(square, np.nan)
        image = ax.imshow(square, cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
        for edge in _boundaries(rdms, order):
            ax.axhline(edge, color="white", linewidth=0.6)
            ax.axvline(edge, color="white", linewidth=0.6)
        ax.set_title(title, fontsize=9)
        centres, names = _blocks(rdms, order)  # each condition's block named on the axes
        ax.set_xticks(centres, names, fontsize=8)
        ax.set_yticks(centres, names, fontsize=8, rotation=90, va="center")
        ax.tick_params(length=0)
        ax.set_xlabel("stimuli by condition, then valence")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="dissimilarity percentile")
    files = save_figure(fig, out_dir, stem)
    plt.close(fig)
    return files


def _mds_panels(
    rdms: RdmSet, pair: list[Rdm], titles: list[str], out_dir: str | Path, stem: str
) -> list[Path]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.6))
    n = len(rdms.stimulus_ids)
    conditions = rdms.conditions or [""] * n
    names = list(dict.fromkeys(conditions))
    markers = "osD^vP*Xh<>"
    points: Any = None
    for ax, rdm, title in zip(axes, pair, titles, strict=True):
        coords = classical_mds(rdm.square())
        for c, condition in enumerate(names):
            rows = np.array([i for i, label in enumerate(conditions) if label == condition])
            style: dict[str, Any] = {"marker": markers[c % len(markers)], "s": 22}
            if rdms.valence is not None:
                low, high = np.nanmin(rdms.valence), np.nanmax(rdms.valence)
                style |= {"c": rdms.valence[rows], "cmap": "coolwarm", "vmin": low, "vmax": high}
            points = ax.scatter(coords[rows, 0], coords[rows, 1], label=condition or "none",
                                edgecolors="black", linewidths=0.3, **style)  # fmt: skip
        ax.set_title(f"MDS: {title}", fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")  # distances as in the RDM, both axes
        ax.set_xlabel("dimension 1")
    axes[0].set_ylabel("dimension 2")
    if rdms.valence is not None:
        fig.colorbar(points, ax=list(axes), shrink=0.8, label="rated valence")
    if len(names) > 1 or names != [""]:  # one legend below the panels: shapes, not colours
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], linestyle="", marker=markers[c % len(markers)], color="0.6",
                          markeredgecolor="black", markeredgewidth=0.3, markersize=5)
                   for c in range(len(names))]  # fmt: skip
        fig.legend(handles, [n or "none" for n in names], title="condition", fontsize=7,
                   title_fontsize=7, loc="upper center", bbox_to_anchor=(0.45, 0.02),
                   ncol=min(len(names), 6), frameon=False)  # fmt: skip
    files = save_figure(fig, out_dir, stem)
    plt.close(fig)
    return files

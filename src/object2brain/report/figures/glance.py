"""The report's figures at a glance, drawn from the study's tables (every model together).

Each function returns a :class:`Drawn`: the matplotlib figure, its caption (which names the test
behind filled markers and where every interval comes from) and per panel how many noise-ceiling
bands it holds. The report inlines them as SVG; parts are tagged (``gid="o2b-<kind>-<panel>"``:
``ceiling`` bands, ``ci`` error bars, ``null`` the z_null band and ``nullq`` the null's
quantile bars of the Object2Brain figure) so that the page can be checked for what was drawn.

- :func:`plot_layer_profiles`: one panel per target, layers in network order on x, one line per
  model (and condition), bootstrap CI error bars, one grey noise-ceiling band, markers filled
  where the group-level test passes (``alignment`` and ``group_inference`` tables);
- :func:`plot_best_layers`: per target, each model's best layer r with its CI, against the ceiling;
- :func:`plot_contrasts`: per target, ``delta_r`` of each condition pair per layer with its CI;
- :func:`plot_model_comparison`: the paired model comparisons as a forest plot;
- :func:`plot_encoding_profiles`: the encoding models' layer profiles in the same style;
- :func:`plot_object2brain_models`: every model's object groups in one figure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from object2brain.report.figures.base import pyplot

__all__ = ["Drawn", "Profile", "pyplot"]

ALPHA = 0.05
_GREY = "0.55"


@dataclass
class Drawn:
    """A figure drawn for the report: ``panels`` titles in order, ``ceilings[i]`` the number of
    noise-ceiling bands drawn in panel ``i`` (0 where the target has no ceiling)."""

    figure: Any
    caption: str
    name: str
    panels: list[str] = field(default_factory=list)
    ceilings: list[int] = field(default_factory=list)

    def attributes(self) -> dict[str, object]:
        """``data-`` attributes of the figure element (see :func:`html.svg_figure_html`)."""
        return {"panels": len(self.panels), "ceilings": ",".join(map(str, self.ceilings))}


@dataclass(frozen=True)
class Profile:
    """What :func:`plot_layer_profiles` draws from a table: ``value`` with ``ci_low``/``ci_high``
    per (model, layer, target, condition), ``nc_low``/``nc_high`` per target; ``significant``
    (bool per row, aligned with ``rows``) and ``test`` (the test's name per target)."""

    rows: pd.DataFrame
    value: str
    significant: pd.Series
    test: dict[str, str]
    ylabel: str


def _layer_positions(rows: pd.DataFrame) -> tuple[dict[tuple[str, str], int], list[str] | None]:
    """x of each (model, layer): its rank in the model's own network order; the shared tick
    labels when every model has the same layers (None: positions only)."""
    order = rows[["model", "layer", "layer_index"]].drop_duplicates(["model", "layer"])
    order = order.sort_values(["model", "layer_index"], kind="stable")
    position: dict[tuple[str, str], int] = {}
    names: dict[str, list[str]] = {}
    for model, block in order.groupby("model", sort=False):
        names[str(model)] = [str(layer) for layer in block["layer"]]
        for rank, layer in enumerate(block["layer"]):
            position[(str(model), str(layer))] = rank
    lists = list(names.values())
    shared = lists[0] if lists and all(names_ == lists[0] for names_ in lists) else None
    return position, shared


def _layer_names(rows: pd.DataFrame) -> dict[str, list[str]]:
    """Each model's layers in its network order (what the ranks on x stand for)."""
    order = rows[["model", "layer", "layer_index"]].drop_duplicates(["model", "layer"])
    order = order.sort_values(["model", "layer_index"], kind="stable")
    return {str(m): [str(x) for x in block["layer"]] for m, block in order.groupby("model")}


def _panel_grid(
    n: int, width: float, height: float = 3.4, columns: int = 3
) -> tuple[Any, list[Any]]:
    plt = pyplot()
    n_cols = max(1, min(columns, n))
    n_rows = max(1, -(-n // n_cols))
    fig, grid = plt.subplots(
        n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False
    )
    axes = list(grid.ravel())
    for unused in axes[n:]:
        unused.axis("off")
    return fig, axes[:n]


def _ceiling(
    ax: Any, rows: pd.DataFrame, panel: int, low: str = "nc_low", high: str = "nc_high"
) -> int:
    """The target's noise ceiling ``[low, high]`` as one grey band; returns the bands drawn."""
    bounds = rows[[low, high]].apply(pd.to_numeric, errors="coerce").dropna()
    if bounds.empty:
        return 0
    band = ax.axhspan(
        float(bounds[low].iloc[0]), float(bounds[high].iloc[0]), color=_GREY, alpha=0.25, lw=0
    )
    band.set_gid(f"o2b-ceiling-{panel}")
    return 1


def _series(
    ax: Any,
    x: np.ndarray,
    y: np.ndarray,
    interval: tuple[np.ndarray, np.ndarray] | None,
    filled: np.ndarray,
    *,
    colour: Any,
    label: str,
    panel: int,
    linestyle: str = "-",
) -> None:
    """A line with CI error bars (where finite) and markers filled where ``filled``."""
    ax.plot(x, y, linestyle, color=colour, lw=1.4, label=label)
    if interval is not None:
        low, high = interval
        ok = np.isfinite(low) & np.isfinite(high) & np.isfinite(y)
        if ok.any():  # a percentile interval need not contain the estimate: drawn as is
            ax.vlines(x[ok], low[ok], high[ok], colors=[colour], lw=1.0, gid=f"o2b-ci-{panel}")
    ax.scatter(x[filled], y[filled], color=colour, s=26, zorder=3)
    ax.scatter(x[~filled], y[~filled], facecolors="white", edgecolors=[colour], s=26, zorder=3)


def _profile_lines(
    ax: Any, panel: pd.DataFrame, profile: Profile, index: int, *, by_condition: bool
) -> None:
    """The lines of one panel: one per model (and condition), x from ``panel["_x"]``, each
    line shifted a little (the same shift in every panel) so that overlapping error bars of
    different lines stay apart."""
    colours = pyplot().get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    models = [str(m) for m in dict.fromkeys(profile.rows["model"])]
    conditions = [str(c) for c in dict.fromkeys(profile.rows["condition"])]
    keys = profile.rows[["model", "condition"]].astype(str).drop_duplicates()
    lines = list(keys.itertuples(index=False, name=None))
    step = min(0.08, 0.5 / max(1, len(lines)))
    for (model, condition), line in panel.groupby(["model", "condition"], sort=False):
        line = line.sort_values("layer_index")
        shift = (lines.index((str(model), str(condition))) - (len(lines) - 1) / 2) * step
        _series(
            ax,
            line["_x"].to_numpy(float) + shift,
            line[profile.value].to_numpy(float),
            (line["ci_low"].to_numpy(float), line["ci_high"].to_numpy(float)),
            line["_significant"].to_numpy(bool),
            colour=colours(models.index(str(model)) % 10),
            label=f"{model} ({condition})" if by_condition else str(model),
            panel=index,
            linestyle=styles[conditions.index(str(condition)) % 4] if by_condition else "-",
        )


def _tests_in_words(profile: Profile, targets: Sequence[str]) -> str:
    by_test: dict[str, list[str]] = {}
    for target in targets:
        by_test.setdefault(profile.test.get(target, "none"), []).append(target)
    return "; ".join(f"{test} ({', '.join(names)})" for test, names in by_test.items())


def plot_layer_profiles(
    profile: Profile, *, name: str, title: str, by_condition: bool = False
) -> Drawn:
    """One panel per target: ``profile.value`` per layer, one line per model (and condition
    when ``by_condition``: line style per condition), error bars ``[ci_low, ci_high]``, the
    target's ceiling as one grey band, markers filled where ``profile.significant``."""
    position, shared = _layer_positions(profile.rows)
    x = [position[(str(m), str(layer))] for m, layer in profile.rows[["model", "layer"]].values]
    rows = profile.rows.assign(_significant=profile.significant.to_numpy(dtype=bool), _x=x)
    targets = [str(t) for t in dict.fromkeys(rows["target"])]
    n_x = 1 + max(position.values(), default=0)
    fig, axes = _panel_grid(len(targets), max(3.6, 0.32 * n_x + 2.2))
    drawn = Drawn(fig, "", name, targets, [])
    for i, (ax, target) in enumerate(zip(axes, targets, strict=True)):
        panel = rows[rows["target"].astype(str) == target]
        drawn.ceilings.append(_ceiling(ax, panel, i))
        _profile_lines(ax, panel, profile, i, by_condition=by_condition)
        ax.axhline(0, color="0.7", lw=0.7)
        ax.set_title(target, fontsize=10)
        if shared is not None:
            ax.set_xticks(range(len(shared)), shared, rotation=60, ha="right", fontsize=7)
        else:
            ax.set_xticks(range(n_x))
        ax.set_xlabel("layer (network order)" if shared else "layer rank in its model")
        ax.set_ylabel(profile.ylabel, fontsize=8)
    if axes and axes[0].get_legend_handles_labels()[1]:
        axes[0].legend(fontsize=7, frameon=False, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    drawn.caption = (
        f"{title}. Error bars: 95% interval (ci_low, ci_high); grey band: the target's noise "
        f"ceiling (lower to upper); markers filled where {_tests_in_words(profile, targets)} "
        f"< {ALPHA:g}."
    )
    if shared is None:
        drawn.caption += (
            " Models differ in their layers: x is each layer's rank in its own model ("
            + "; ".join(f"{model}: {', '.join(layers)}" for model, layers in
                        _layer_names(profile.rows).items())
            + ")."
        )  # fmt: skip
    return drawn


def alignment_profile(
    alignment: pd.DataFrame,
    group_inference: pd.DataFrame | None,
    alignment_group: pd.DataFrame | None,
    *,
    conditions: Sequence[str] = ("all",),
) -> Profile:
    """The group rows of ``alignment`` (``subject == "group"``) in ``conditions``, each filled by
    the group-level test: ``group_inference`` ``p_fdr`` (its test of r > 0, named after the
    target's bootstrap mode by :func:`group_test_name`) where it has a finite value for the
    target, else ``alignment_group`` ``p_t_fdr`` (one-sample t-test of
    the per-subject r), else the Mantel permutation ``p_fdr`` of the group row itself."""
    rows = alignment[
        (alignment["subject"].astype(str) == "group")
        & alignment["condition"].astype(str).isin(list(conditions))
    ].reset_index(drop=True)
    keys = ["model", "layer", "target", "condition"]
    sources: list[tuple[pd.DataFrame | None, str, str]] = [
        (group_inference, "p_fdr", "group_inference p_fdr"),
        (alignment_group, "p_t_fdr", "alignment_group p_t_fdr (t-test of the per-subject r)"),
    ]
    p = pd.Series(np.nan, index=rows.index)
    test: dict[str, str] = {}
    for target in dict.fromkeys(rows["target"].astype(str)):
        mask = rows["target"].astype(str) == target
        chosen = rows.loc[mask, "p_fdr"].astype(float)
        test[target] = "alignment p_fdr (Mantel permutation, group RDM)"
        for table, column, label in sources:
            if table is None or column not in table:
                continue
            merged = rows.loc[mask, keys].merge(
                table[[*keys, column]].drop_duplicates(keys), on=keys, how="left"
            )
            values = pd.to_numeric(merged[column], errors="coerce").to_numpy()
            if np.isfinite(values).any():
                chosen = pd.Series(values, index=rows.index[mask])
                test[target] = label
                if table is group_inference and "bootstrap" in table:
                    modes = table.loc[table["target"].astype(str) == target, "bootstrap"]
                    test[target] = f"{label} ({group_test_name(modes.astype(str))})"
                break
        p[mask] = chosen.to_numpy(float)
    return Profile(rows, "r", p < ALPHA, test, "r (group)")


#: The test behind ``group_inference``'s ``p`` per bootstrap mode (``rsa.group.group_p``; the
#: exception, ``--n-perm 0`` (score test for ``stimuli``, t-test for Kendall's tau-a under
#: ``both``), is in docs/methods.md).
GROUP_TESTS = {
    "both": "score test of r > 0",
    "stimuli": "relabelling test of r > 0",
    "subjects": "t-test of r > 0 over subjects",
}


def group_test_name(modes: Iterable[str]) -> str:
    """The name of the test of r > 0 behind ``group_inference``'s ``p`` in the given bootstrap
    modes (the rows of one target): one name, or several joined by ``/``."""
    names = [GROUP_TESTS.get(mode, f"{mode} test of r > 0") for mode in dict.fromkeys(modes)]
    return " / ".join(names) if names else "test of r > 0"


def inference_profile(group_inference: pd.DataFrame) -> Profile:
    """``mean_r`` of ``group_inference`` with its t interval, filled where ``p_fdr < ALPHA``."""
    rows = group_inference.reset_index(drop=True)
    significant = pd.to_numeric(rows["p_fdr"], errors="coerce") < ALPHA
    test = dict.fromkeys(rows["target"].astype(str), "group_inference p_fdr")
    return Profile(rows, "mean_r", significant, test, "mean r over subjects")


def plot_best_layers(alignment: pd.DataFrame, condition: str = "all") -> Drawn:
    """Per target (x), each model's best layer (largest group r in ``condition``) with its
    bootstrap CI, the target's ceiling as a grey box behind the target's points."""
    plt = pyplot()
    rows = alignment[
        (alignment["subject"].astype(str) == "group") & (alignment["condition"] == condition)
    ].dropna(subset=["r"])
    best = rows.loc[rows.groupby(["model", "target"], sort=False)["r"].idxmax()]
    targets = [str(t) for t in dict.fromkeys(rows["target"])]
    models = [str(m) for m in dict.fromkeys(rows["model"])]
    fig, ax = plt.subplots(
        figsize=(max(4.5, 1.3 * len(targets) * max(1, len(models)) ** 0.5 + 2), 3.8)
    )
    colours = plt.get_cmap("tab10")
    width = 0.7 / max(1, len(models))
    drawn = Drawn(fig, "", "best_layers", targets, [])
    for t, target in enumerate(targets):
        bounds = rows[rows["target"] == target][["nc_low", "nc_high"]].dropna()
        if not bounds.empty:
            low, high = float(bounds["nc_low"].iloc[0]), float(bounds["nc_high"].iloc[0])
            box = ax.add_patch(
                plt.Rectangle((t - 0.42, low), 0.84, high - low, color=_GREY, alpha=0.25, lw=0)
            )
            box.set_gid(f"o2b-ceiling-{t}")
        drawn.ceilings.append(0 if bounds.empty else 1)
        for m, model in enumerate(models):
            hit = best[(best["target"] == target) & (best["model"] == model)]
            if hit.empty:
                continue
            row = hit.iloc[0]
            x = t + (m - (len(models) - 1) / 2) * width
            r, low_ci, high_ci = float(row["r"]), float(row["ci_low"]), float(row["ci_high"])
            if np.isfinite(low_ci) and np.isfinite(high_ci):
                ax.vlines([x], [low_ci], [high_ci], colors=[colours(m % 10)], gid=f"o2b-ci-{t}")
            labelled = model in ax.get_legend_handles_labels()[1]
            ax.scatter(
                [x], [r], color=colours(m % 10), s=34, zorder=3, label=None if labelled else model
            )
            ax.annotate(
                str(row["layer"]), (x, r), xytext=(3, 3), textcoords="offset points", fontsize=6
            )
    ax.axhline(0, color="0.7", lw=0.7)
    ax.set_xticks(range(len(targets)), targets)
    ax.set_ylabel(f"best layer r (group, condition {condition})")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7, frameon=False, loc="best")
    fig.tight_layout()
    drawn.caption = (
        f"Best layer per model and target (largest group-level r, condition {condition}; the "
        "layer is written beside each point): error bars the stimulus-bootstrap 95% interval "
        "(ci_low, ci_high; none where n_boot is 0), grey box the target's noise ceiling. The "
        "best layer is picked on the same data, so its r is optimistic."
    )
    return drawn


def plot_contrasts(contrast: pd.DataFrame) -> Drawn:
    """One panel per target: group-level ``delta_r = r_a - r_b`` per layer for each model and
    condition pair, bootstrap CI bars, filled where ``p_boot_fdr`` (else ``p_fdr``) < ALPHA."""
    rows = contrast[contrast["subject"].astype(str) == "group"].copy()
    rows["condition"] = rows["condition_a"].astype(str) + " - " + rows["condition_b"].astype(str)
    rows = rows.reset_index(drop=True)
    boot = pd.to_numeric(
        rows.get("p_boot_fdr", pd.Series(np.nan, index=rows.index)), errors="coerce"
    )
    perm = pd.to_numeric(rows["p_fdr"], errors="coerce")
    test = {}
    for target in dict.fromkeys(rows["target"].astype(str)):
        mask = rows["target"].astype(str) == target
        test[target] = (
            "p_boot_fdr (stimulus bootstrap, BH)"
            if np.isfinite(boot[mask]).any()
            else "p_fdr (condition-label permutation, BH)"
        )
    use_boot = rows["target"].astype(str).map(lambda t: test[t].startswith("p_boot"))
    p = boot.where(use_boot, perm)
    rows = rows.assign(nc_low=np.nan, nc_high=np.nan)
    profile = Profile(rows, "delta_r", p < ALPHA, test, "delta r (a - b), group")
    drawn = plot_layer_profiles(
        profile, name="contrast", title="Condition contrasts per layer", by_condition=True
    )
    drawn.caption = drawn.caption.replace(
        "; grey band: the target's noise ceiling (lower to upper)", ""
    )
    return drawn


def plot_model_comparison(comparison: pd.DataFrame) -> Drawn:
    """Forest plot: one row per pair ``model_a/layer_a - model_b/layer_b`` and target, its
    ``delta_r`` with the 95% interval; filled where ``p_fdr < ALPHA``."""
    plt = pyplot()
    rows = comparison.reset_index(drop=True)
    labels = (
        rows["model_a"].astype(str) + "/" + rows["layer_a"].astype(str) + " - "
        + rows["model_b"].astype(str) + "/" + rows["layer_b"].astype(str)
        + " | " + rows["target"].astype(str) + " (" + rows["condition"].astype(str) + ")"
    )  # fmt: skip
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.3 * len(rows)))
    y = np.arange(len(rows))[::-1].astype(float)
    delta = rows["delta_r"].to_numpy(float)
    low, high = rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float)
    ok = np.isfinite(low) & np.isfinite(high)
    if ok.any():
        ax.hlines(y[ok], low[ok], high[ok], colors="tab:blue", gid="o2b-ci-0")
    filled = (pd.to_numeric(rows["p_fdr"], errors="coerce") < ALPHA).to_numpy(bool)
    ax.scatter(delta[filled], y[filled], color="tab:blue", s=26, zorder=3)
    ax.scatter(
        delta[~filled], y[~filled], facecolors="white", edgecolors="tab:blue", s=26, zorder=3
    )
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set_yticks(y, labels.tolist(), fontsize=7)
    ax.set_xlabel("delta r (mean over subjects of r_a - r_b)")
    fig.tight_layout()
    caption = (
        "Paired model comparisons: delta r with its 95% Student-t interval from the corrected "
        f"bootstrap standard error; markers filled where p_fdr (two-sided t-test, BH over pairs "
        f"x targets) < {ALPHA:g}. Selection of the layers: "
        + ", ".join(dict.fromkeys(rows.get("selection", pd.Series(["n/a"])).astype(str)))
        + "."
    )
    return Drawn(fig, caption, "model_comparison", ["comparisons"], [0])


def plot_encoding_profiles(encoding: pd.DataFrame) -> Drawn:
    """One panel per ROI: ``r_mean`` per layer (condition ``all``; mean over subjects, error bars
    +-1 SEM over subjects), one line per model, the range of the subjects' ``nc_mean`` as the
    grey band, filled where ``p_fdr < ALPHA`` in every subject. Banded models are left out."""
    rows = encoding[
        (encoding["condition"].astype(str) == "all")
        & ~encoding["layer"].astype(str).str.startswith("banded:")
    ]
    grouped = rows.groupby(["model", "layer", "target"], sort=False)
    summary = grouped.agg(
        value=("r_mean", "mean"), sem=("r_mean", "sem"), p_max=("p_fdr", "max"),
        nc_low=("nc_mean", "min"), nc_high=("nc_mean", "max"),
    ).reset_index()  # fmt: skip
    first = rows.drop_duplicates(["model", "layer"])
    rank = {
        (str(m), str(layer)): i
        for i, (m, layer) in enumerate(first[["model", "layer"]].itertuples(index=False))
    }
    summary["layer_index"] = [
        rank[(str(m), str(layer))]
        for m, layer in summary[["model", "layer"]].itertuples(index=False)
    ]
    sem = summary["sem"].fillna(0.0)
    summary["ci_low"] = summary["value"] - sem
    summary["ci_high"] = summary["value"] + sem
    # one band per ROI: the range of its subjects' ceilings (the same for every layer)
    summary["nc_low"] = summary.groupby("target")["nc_low"].transform("min")
    summary["nc_high"] = summary.groupby("target")["nc_high"].transform("max")
    summary["condition"] = "all"
    test = dict.fromkeys(summary["target"].astype(str), "p_fdr (permutation, BH) in every subject")
    profile = Profile(summary, "value", summary["p_max"] < ALPHA, test, "mean out-of-fold r")
    drawn = plot_layer_profiles(profile, name="encoding", title="Encoding models per layer")
    drawn.caption = drawn.caption.replace(
        "Error bars: 95% interval (ci_low, ci_high); grey band: the target's noise ceiling "
        "(lower to upper)",
        "Points: mean over subjects of r_mean (mean over the ROI's voxels of the out-of-fold "
        "Pearson r); error bars +-1 standard error over subjects; grey band: the range over "
        "subjects of the split-half noise ceiling nc_mean (none without run-wise data)",
    )
    return drawn


def object2brain_marks(rows: pd.DataFrame) -> tuple[pd.Series, str]:
    """Which group rows carry the alignment, and the rule in words: the table's ``significant``
    column where it has values (the starred rule of the lesion stage, ``p_group_fdr``), else both
    ``p_fdr`` (random filter subsets) and ``p_perm_fdr`` (permuted stimulus labels) below ALPHA
    (``p_perm_fdr`` NaN: ``p_fdr`` alone)."""
    if "significant" in rows and rows["significant"].notna().any():
        marks = rows["significant"].astype(str).str.lower().isin(["true", "1", "1.0"])
        return marks, "the lesion stage's starred rule (column significant)"
    q = pd.to_numeric(rows["p_fdr"], errors="coerce").to_numpy(float)
    if "p_perm_fdr" in rows:
        perm = pd.to_numeric(rows["p_perm_fdr"], errors="coerce").to_numpy(float)
        q = np.where(np.isnan(perm), q, np.maximum(q, perm))
    rule = f"p_fdr and p_perm_fdr both < {ALPHA:g} (random filter subsets; permuted labels)"
    return pd.Series(q < ALPHA, index=rows.index), rule


def has_null_quantiles(rows: pd.DataFrame) -> bool:
    """Whether an ``object2brain`` table records the null's quantiles: columns ``null_low`` and
    ``null_high`` with at least one value each (tables written before them do not)."""
    return all(
        c in rows and pd.to_numeric(rows[c], errors="coerce").notna().any()
        for c in ("null_low", "null_high")
    )


def _object2brain_points(
    ax: Any,
    part: pd.DataFrame,
    x: np.ndarray,
    value: str,
    marks: np.ndarray,
    *,
    colour: Any,
    label: str | None,
    panel: int,
) -> None:
    """One model / layer's groups in a panel: points, the null's interval when the table has
    one (``null_low``/``null_high``; tagged ``o2b-nullq-<panel>``), ``*`` where ``marks``."""
    y = pd.to_numeric(part[value], errors="coerce").to_numpy(float)
    if value == "delta_r":
        low = pd.to_numeric(part["null_low"], errors="coerce").to_numpy(float)
        high = pd.to_numeric(part["null_high"], errors="coerce").to_numpy(float)
        ok = np.isfinite(low) & np.isfinite(high)
        if ok.any():
            ax.vlines(x[ok], low[ok], high[ok], colors=[colour], alpha=0.45, lw=3,
                      gid=f"o2b-nullq-{panel}")  # fmt: skip
    ax.scatter(x, y, color=colour, s=24, zorder=3, label=label)
    for xi, yi in zip(x[marks], y[marks], strict=True):
        if np.isfinite(yi):
            ax.annotate("*", (xi, yi), xytext=(0, 3), textcoords="offset points", ha="center",
                        fontsize=11)  # fmt: skip


def plot_object2brain_models(table: pd.DataFrame, variant: str = "lesion") -> Drawn | None:
    """Every model's object groups in one figure: one panel per target, groups on x, one colour
    per model / layer; ``*`` where :func:`object2brain_marks` passes.

    y is ``delta_r`` with the null's central 95% (``null_low`` to ``null_high``, the 2.5% and
    97.5% quantiles of the random-subset null's delta_r) as an interval when the table records
    them (:func:`has_null_quantiles`); otherwise (older tables) ``z_null`` (delta_r in standard
    deviations of the random-subset null, whose spread is then the grey band -1.96 to 1.96)."""
    plt = pyplot()
    rows = table[
        (table["condition"].astype(str) == "all")
        & (table["subject"].astype(str) == "group")
        & (table["variant"].astype(str) == variant)
    ].reset_index(drop=True)
    if rows.empty:
        return None
    marks, rule = object2brain_marks(rows)
    on_delta = has_null_quantiles(rows)
    value = "delta_r" if on_delta else "z_null"
    series = rows["model"].astype(str) + " / " + rows["layer"].astype(str)
    if "analysis" in rows:  # `lesion --analysis both`: encoding rows are a series of their own
        kind = rows["analysis"].astype(str).where(rows["analysis"].notna(), "rsa")
        series = series.where(kind == "rsa", series + " (" + kind + ")")
    names = list(dict.fromkeys(series))
    groups = [str(g) for g in dict.fromkeys(rows["group"])]
    targets = [str(t) for t in dict.fromkeys(rows["target"])]
    fig, axes = _panel_grid(
        len(targets), max(4.0, 0.5 * len(groups) * max(1, len(names)) ** 0.5 + 2), columns=2
    )
    colours = plt.get_cmap("tab10")
    width = 0.75 / max(1, len(names))
    drawn = Drawn(fig, "", "object2brain_models", targets, [])
    for i, (ax, target) in enumerate(zip(axes, targets, strict=True)):
        if not on_delta:
            band = ax.axhspan(-1.96, 1.96, color=_GREY, alpha=0.2, lw=0)
            band.set_gid(f"o2b-null-{i}")
        for s, name in enumerate(names):
            part = rows[(rows["target"].astype(str) == target) & (series == name)]
            x = np.asarray([groups.index(str(g)) for g in part["group"]], float)
            x += (s - (len(names) - 1) / 2) * width
            _object2brain_points(
                ax, part, x, value, marks[part.index].to_numpy(bool), colour=colours(s % 10),
                label=name if name not in ax.get_legend_handles_labels()[1] else None, panel=i,
            )  # fmt: skip
        ax.axhline(0, color="0.5", lw=0.7)
        turn = {"rotation": 35, "ha": "right", "rotation_mode": "anchor"} if len(groups) > 4 else {}
        ax.set_xticks(range(len(groups)), groups, fontsize=7, **turn)
        ax.set_title(target, fontsize=10)
        ax.set_ylabel("delta r (variant - full)" if on_delta else "z_null of delta r", fontsize=8)
        drawn.ceilings.append(0)
    if axes and axes[0].get_legend_handles_labels()[1]:
        axes[0].legend(fontsize=7, frameon=False, loc="best")
    fig.tight_layout()
    spread = (
        "y: delta_r; bars: the random-subset null's central 95% (null_low to null_high, its "
        "2.5% and 97.5% quantiles of delta r), so a point outside its bar lies outside the null"
        if on_delta
        else "y: z_null = (delta r - mean of the random-subset null) / its SD, so the null's "
        "spread is the grey band (-1.96 to 1.96; the table records no null quantiles)"
    )
    drawn.caption = (
        f"Object2Brain across models ({variant}: the group's filters zeroed; condition all, "
        f"group level): one colour per model / layer; {spread}; * where {rule}."
    )
    return drawn

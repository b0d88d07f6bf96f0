"""The alignment: every layer of every model against behaviour and every brain ROI.

:func:`compute_alignment` (behind ``object2brain rsa`` and ``o2b.rsa``) computes, for every model
(activation store attribute ``model``), layer (store ``order``, including the predicted
``valence`` layer when present), target (each ROI, and ``behavior``), subject and condition of an
:class:`~object2brain.rsa.targets.AnalysisSet`, one row of the ``alignment`` table (columns:
:data:`object2brain.tables.ALIGNMENT`).

Subject levels of a target with per-subject data (brain subjects; raters who rated every analysed
stimulus):

- ``<subject id>``: r between the layer RDM and that subject's RDM;
- ``group``: the mean of the per-subject r (subjects with an undefined r left out). Its
  permutation p and bootstrap CI come from the same permutations / resamples applied to every
  subject, so the mean has its own exact null; its standard error over subjects and a t-test
  across subjects are in the table ``alignment_group``;
- ``group_rdm``: r against the group-mean RDM (for ROIs the subjects' RDMs averaged on the
  comparison's scale, ranks or z-scores: :func:`~object2brain.rsa.inference.pool_rdms`; for
  behaviour the RDM ``|v_i - v_j|`` of the group-mean ratings).

A target with group-level data only (an RDM file whose only subject is ``group``, or behaviour
from the stimulus table's ``valence`` column) has one row, ``group``.

``p_perm`` is the one-sided Mantel p (``(1 + #{r_perm >= r}) / (1 + n_perm)``); ``p_fdr`` the
Benjamini-Hochberg adjustment over all (layer, target) tests of one model, condition and subject
level (``fdr_family`` ``model``, the default; ``models``: all models of one condition and subject
level together; ``study``: every row of the table, :data:`FDR_FAMILIES`); ``ci_low``/``ci_high``
the 95% stimulus-bootstrap interval; ``nc_low``/``nc_high`` the noise ceiling of the target in
that condition (NaN with fewer than two subjects).

The other tables:

- ``behavior_direct`` (a store with a ``valence`` layer, and rated valence): predicted vs
  group-mean rated valence on the held-out stimuli, Pearson and Spearman, two-sided permutation
  p, bootstrap CI (:func:`~object2brain.rsa.inference.correlation_test`);
- ``condition_contrast`` (at least two conditions): for every pair of conditions ``(a, b)`` in
  order of appearance, ``delta_r = r_a - r_b`` tested by permuting condition labels (two-sided)
  and by a stimulus bootstrap; FDR as for ``alignment``, per pair;
- ``alignment_group``: mean, SEM and one-sample t-test over subjects of the per-subject r.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import torch

from object2brain.activations.store import ActivationStore
from object2brain.data import ALL_CONDITION, GROUP_RDM_SUBJECT, GROUP_SUBJECT
from object2brain.devices import resolve_device
from object2brain.errors import DataError
from object2brain.executors import Executor, executor_for
from object2brain.options import RsaOptions, Runtime
from object2brain.rsa.group import ModelRdms, group_tables
from object2brain.rsa.inference import (
    ConditionResamples,
    TestResult,
    bootstrap_ci,
    condition_difference_bootstrap,
    condition_difference_test,
    correlation_test,
    mantel_test,
    noise_ceiling,
    with_fdr,
)
from object2brain.rsa.rdm import rdm_from_store, upper_triangle
from object2brain.rsa.targets import (
    MIN_CORRELATION_VALUES,
    AnalysisSet,
    Condition,
    TargetColumns,
)
from object2brain.rsa.within import (
    check_within_method,
    within_bootstrap_ci,
    within_mantel_test,
    within_pairs,
)
from object2brain.tables import ALIGNMENT, ALIGNMENT_GROUP, BEHAVIOR_DIRECT, CONDITION_CONTRAST

log = logging.getLogger(__name__)

#: ``progress(done, total)``: called after each unit of work (a condition or a contrast of a model).
Progress = Callable[[int, int], None]


@dataclass
class AlignmentResult:
    """Tables of one alignment run, what its manifest records, and the files written.

    ``summary``: ``n_stimuli``, ``conditions`` and ``targets`` (name -> kind and subjects).
    ``files`` is filled by the writer (empty when nothing was written).
    """

    alignment: pd.DataFrame
    behavior_direct: pd.DataFrame
    condition_contrast: pd.DataFrame
    alignment_group: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    group_inference: pd.DataFrame = field(default_factory=pd.DataFrame)
    model_comparison: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: every model's analysed layers and their RDMs over the analysis set (for ``rdms.h5``)
    model_rdms: list[ModelRdms] = field(default_factory=list)


@dataclass(frozen=True)
class ModelLayers:
    """One model's activation store and the layers analysed, with their network positions."""

    name: str
    store: ActivationStore
    layers: list[str]

    @property
    def layer_index(self) -> list[int]:
        """0-based position of each analysed layer in the store's network order."""
        order = self.store.layers
        return [order.index(layer) for layer in self.layers]


@dataclass(frozen=True)
class _Context:
    """What every block of rows of one run shares."""

    analysis: AnalysisSet
    columns: TargetColumns
    options: RsaOptions
    seed: int
    device: torch.device
    ceilings: dict[tuple[int, str], tuple[float, float]]
    executor: Executor | None = None  # where permutation blocks and resamples run (None: here)


def select_models(
    stores: Sequence[ActivationStore], layers: Sequence[str] | None
) -> list[ModelLayers]:
    """Name every store (attribute ``model``, else the file stem) and pick its layers.

    Raises:
        DataError: two stores with one model name; none of ``layers`` in a store.
    """
    models: list[ModelLayers] = []
    for store in stores:
        path = Path(store.path)
        name = str(store.attrs.get("model") or path.stem)
        if any(name == m.name for m in models):
            raise DataError(
                f"{path}: model name {name!r} is used by two activation stores "
                "(extract them with distinct --name labels)"
            )
        names = store.layers
        if layers is not None:
            if not any(layer in names for layer in layers):
                raise DataError(f"{path}: none of the layers {', '.join(layers)} is in the store")
            names = [layer for layer in names if layer in layers]
        models.append(ModelLayers(name, store, names))
    return models


def compute_alignment(
    stores: Sequence[ActivationStore],
    analysis: AnalysisSet,
    options: RsaOptions,
    runtime: Runtime,
    *,
    progress: Progress | None = None,
) -> AlignmentResult:
    """Align every layer of every store with the targets of ``analysis`` (module docstring).

    Pure: reads the stores, writes nothing. ``progress(done, total)`` is called after each
    condition and contrast of each model.
    """
    device = resolve_device(runtime.device)
    models = select_models(stores, options.layers)
    method = options.compare_method
    n = len(analysis.ids)
    if options.pairs == "within":
        check_within_pairs(analysis, method)
    if method == "kendall_tau_a" and options.n_perm * n * n > 10**8:
        log.warning("kendall_tau_a costs O(m^2) per permutation: this run will be slow")
    context = _Context(
        analysis,
        analysis.columns(group_rdm=True),
        options,
        runtime.seed,
        device,
        noise_ceilings(analysis, method, device, options.pairs),
        executor_for(runtime),
    )
    total = len(models) * (len(analysis.conditions) + len(analysis.contrasts))
    done = 0
    alignment: list[dict[str, Any]] = []
    contrasts: list[dict[str, Any]] = []
    direct: list[dict[str, Any]] = []
    kept: list[ModelRdms] = []
    for model in models:
        model_rdms = torch.stack(
            [
                rdm_from_store(model.store, layer, analysis.ids, options.rdm_metric, device)
                for layer in model.layers
            ]
        )
        kept.append(ModelRdms(model.name, model.layers, model.layer_index, model_rdms))
        for step in _model_steps(context, model, model_rdms, alignment, contrasts):
            done += step
            if progress is not None:
                progress(done, total)
        direct += _direct_rows(context, model)
    result = _tables(alignment, contrasts, direct, analysis, options.fdr_family)
    result.group_inference, result.model_comparison = group_tables(
        kept, analysis, options, runtime.seed, context.ceilings, context.executor,
        context.device,
    )  # fmt: skip
    result.model_rdms = kept
    return result


def _model_steps(
    context: _Context,
    model: ModelLayers,
    model_rdms: torch.Tensor,
    alignment: list[dict[str, Any]],
    contrasts: list[dict[str, Any]],
) -> Iterator[int]:
    """Append one model's alignment and contrast rows, yielding 1 after each unit of work."""
    for condition in context.analysis.conditions:
        alignment += _condition_rows(context, model, model_rdms, condition)
        yield 1
    # bootstrap resamples of this model's RDMs, per condition
    cache: dict[tuple[str, int], ConditionResamples] = {}
    for pair in context.analysis.contrasts:
        contrasts += _contrast_rows(context, model, model_rdms, pair, cache)
        yield 1


def check_within_pairs(analysis: AnalysisSet, method: str) -> None:
    """Raise :class:`DataError` when ``pairs = within`` cannot run: no ``condition`` column,
    no condition of 2 or more stimuli, or a comparison it does not support."""
    if analysis.labels is None:
        raise DataError(
            f"{analysis.where}: --pairs within needs a 'condition' column in the stimulus table"
        )
    check_within_method(method)
    within_pairs(analysis.labels.tolist())


def noise_ceilings(
    analysis: AnalysisSet, method: str, device: torch.device, pairs: str = "all"
) -> dict[tuple[int, str], tuple[float, float]]:
    """Lower and upper noise ceiling per (target index, condition name); NaN for group-level
    targets (:func:`~object2brain.rsa.inference.noise_ceiling`). With ``pairs = within`` the
    ``all`` ceilings are those of the within-condition pairs."""
    ceilings: dict[tuple[int, str], tuple[float, float]] = {}
    for condition in analysis.conditions:
        rows = torch.as_tensor(condition.rows, device=device)
        within = pairs == "within" and condition.name == ALL_CONDITION
        for index, target in enumerate(analysis.targets):
            if target.group_only:
                ceilings[(index, condition.name)] = (float("nan"), float("nan"))
                continue
            if within:
                assert analysis.labels is not None  # checked by check_within_pairs
                chosen = within_pairs(analysis.labels.tolist(), target.rdms.device)
                vectors = target.rdms[:, chosen.rows, chosen.cols]
            else:
                vectors = upper_triangle(_sub(target.rdms, rows))
            ceilings[(index, condition.name)] = noise_ceiling(vectors.cpu(), method)
    return ceilings


def _sub(rdms: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return rdms[:, rows][:, :, rows]


def _cells(
    model: ModelLayers, columns: TargetColumns, options: RsaOptions
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """``(k, q, row keys)`` of every layer ``k`` and target column ``q`` of a block of rows."""
    for k, (layer, index) in enumerate(zip(model.layers, model.layer_index, strict=True)):
        for q, (target, kind, subject) in enumerate(columns.labels):
            yield (
                k,
                q,
                {
                    "model": model.name,
                    "layer": layer,
                    "layer_index": index,
                    "target": target,
                    "target_kind": kind,
                    "subject": subject,
                    "rdm_metric": options.rdm_metric,
                    "compare_method": options.compare_method,
                },
            )


def _condition_rows(
    context: _Context, model: ModelLayers, model_rdms: torch.Tensor, condition: Condition
) -> list[dict[str, Any]]:
    """Rows of one model and condition: Mantel r and p, bootstrap CI, noise ceilings."""
    options, columns = context.options, context.columns
    if options.pairs == "within" and condition.name == ALL_CONDITION:
        test, low, high, n_stimuli = _within_statistics(context, model_rdms)
    else:
        test, low, high = _statistics(context, model_rdms, condition)
        n_stimuli = condition.size
    block = []
    for k, q, keys in _cells(model, columns, options):
        nc_low, nc_high = context.ceilings[(columns.owner[q], condition.name)]
        block.append(
            keys
            | {
                "condition": condition.name,
                "r": float(test.r[k, q]),
                "p_perm": float(test.p[k, q]),
                "p_fdr": np.nan,
                "ci_low": float(low[k, q]),
                "ci_high": float(high[k, q]),
                "nc_low": nc_low,
                "nc_high": nc_high,
                "n_stimuli": n_stimuli,
                "n_perm": options.n_perm,
            }
        )
    return block


def _statistics(
    context: _Context, model_rdms: torch.Tensor, condition: Condition
) -> tuple[TestResult, np.ndarray, np.ndarray]:
    """Mantel test and bootstrap interval of the stimuli of ``condition`` (all their pairs)."""
    options, columns = context.options, context.columns
    rows = torch.as_tensor(condition.rows, device=context.device)
    models, targets = _sub(model_rdms, rows), _sub(columns.rdms, rows)
    method = options.compare_method
    test = mantel_test(
        upper_triangle(models), upper_triangle(targets), method, options.n_perm, context.seed,
        context.device, columns.combine, executor=context.executor,
    )  # fmt: skip
    low, high = bootstrap_ci(
        models, targets, method, options.n_boot, context.seed, context.device, columns.combine,
        executor=context.executor,
    )  # fmt: skip
    return test, low, high


def _within_statistics(
    context: _Context, model_rdms: torch.Tensor
) -> tuple[TestResult, np.ndarray, np.ndarray, int]:
    """Stratified Mantel test and bootstrap interval of the within-condition pairs of all
    stimuli (:mod:`object2brain.rsa.within`), and the number of stimuli in them."""
    options, columns = context.options, context.columns
    assert context.analysis.labels is not None  # checked by check_within_pairs
    labels = context.analysis.labels.tolist()
    method, combine = options.compare_method, columns.combine
    targets = columns.rdms.to(context.device)
    test = within_mantel_test(
        model_rdms, targets, labels, method, options.n_perm, context.seed, combine,
        executor=context.executor,
    )  # fmt: skip
    low, high = within_bootstrap_ci(
        model_rdms, targets, labels, method, options.n_boot, context.seed, combine,
        executor=context.executor,
    )  # fmt: skip
    return test, low, high, within_pairs(labels).n_stimuli


def _contrast_rows(
    context: _Context,
    model: ModelLayers,
    model_rdms: torch.Tensor,
    pair: tuple[Condition, Condition],
    cache: dict[tuple[str, int], ConditionResamples],
) -> list[dict[str, Any]]:
    """Rows of one model and pair of conditions: ``delta_r = r_a - r_b`` (``contrast_scale``
    ``noise_ceiling``: ``r_a / nc_a - r_b / nc_b``, upper ceilings; the label permutation,
    a test of the raw difference, is then not reported), its bootstrap interval and p."""
    options, columns = context.options, context.columns
    assert context.analysis.labels is not None  # there are conditions
    labels = context.analysis.labels.tolist()
    a, b = pair[0].name, pair[1].name
    shared = (options.compare_method,)
    res = condition_difference_test(
        model_rdms, columns.rdms, labels, a, b, *shared, options.n_perm, context.seed,
        context.device, columns.combine,
    )  # fmt: skip
    by_ceiling = options.contrast_scale == "noise_ceiling"
    ceilings = (_upper_ceilings(context, a), _upper_ceilings(context, b)) if by_ceiling else None
    interval = condition_difference_bootstrap(
        model_rdms, columns.rdms, labels, a, b, *shared, options.n_boot, context.seed,
        context.device, columns.combine, cache=cache, ceilings=ceilings,
        executor=context.executor,
    )  # fmt: skip
    delta = res.delta
    if ceilings is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = res.r_a / ceilings[0] - res.r_b / ceilings[1]
    return [
        keys
        | {
            "condition_a": a,
            "condition_b": b,
            "r_a": float(res.r_a[k, q]),
            "r_b": float(res.r_b[k, q]),
            "delta_r": float(delta[k, q]),
            "p_perm": np.nan if by_ceiling else float(res.p[k, q]),
            "p_fdr": np.nan,
            "ci_low": float(interval.low[k, q]),
            "ci_high": float(interval.high[k, q]),
            "p_boot": float(interval.p[k, q]),
            "p_boot_fdr": np.nan,
            "n_a": res.n_a,
            "n_b": res.n_b,
            "n_perm": res.n_perm,
            "n_boot": interval.n_boot,
            "contrast_scale": options.contrast_scale,
        }
        for k, q, keys in _cells(model, columns, options)
    ]


def _upper_ceilings(context: _Context, condition: str) -> np.ndarray:
    """The upper noise ceiling of each target column's target in ``condition`` ``(T + G,)``
    (NaN for a target of one subject)."""
    owner = context.columns.owner
    return np.array([context.ceilings[(owner[q], condition)][1] for q in range(len(owner))])


def _direct_rows(context: _Context, model: ModelLayers) -> list[dict[str, Any]]:
    """Predicted (layer ``valence``) vs rated valence on the held-out stimuli of each
    condition, Pearson and Spearman; NaN with fewer than ``MIN_CORRELATION_VALUES`` stimuli."""
    analysis, options = context.analysis, context.options
    if "valence" not in model.store.layers or analysis.rated is None:
        return []
    predicted, rated = predicted_valence(model.store, analysis.ids), analysis.rated
    rows = []
    for condition in analysis.conditions:
        idx = condition.rows[analysis.held_out[condition.rows]]
        for how in ("pearson", "spearman"):
            r, p, low, high = (np.nan, np.nan, np.nan, np.nan)
            if idx.size >= MIN_CORRELATION_VALUES:
                r, p, low, high = correlation_test(
                    predicted[idx], rated[idx], how, options.n_perm, options.n_boot, context.seed
                )
            rows.append(
                {"model": model.name, "condition": condition.name, "method": how, "r": r, "p": p}
                | {"ci_low": low, "ci_high": high, "n": int(idx.size)}
            )
    return rows


def predicted_valence(store: ActivationStore, ids: list[str]) -> np.ndarray:
    """The store's ``valence`` layer ``(n,)`` for ``ids``.

    Raises:
        DataError: the layer holds more than one value per stimulus.
    """
    values = np.asarray(store.read("valence", ids), dtype=np.float64).reshape(len(ids), -1)
    if values.shape[1] != 1:
        raise DataError(f"{store.path}: layer 'valence' should hold one value per stimulus")
    return values[:, 0]


#: The columns whose rows share one Benjamini-Hochberg family, per table and ``fdr_family``:
#: ``model`` (every layer x target of one model, condition and subject level), ``models`` (all
#: models together, per condition and subject level), ``study`` (the whole table).
FDR_FAMILIES: dict[str, dict[str, list[str]]] = {
    "model": {
        "alignment": ["model", "condition", "subject"],
        "condition_contrast": ["model", "condition_a", "condition_b", "subject"],
        "alignment_group": ["model", "condition"],
    },
    "models": {
        "alignment": ["condition", "subject"],
        "condition_contrast": ["condition_a", "condition_b", "subject"],
        "alignment_group": ["condition"],
    },
    "study": {"alignment": [], "condition_contrast": [], "alignment_group": []},
}


def fdr_within(
    frame: pd.DataFrame, family: list[str], columns: Sequence[tuple[str, str]]
) -> pd.DataFrame:
    """:func:`~object2brain.rsa.inference.with_fdr` over the families of ``family`` columns;
    an empty list: the whole table is one family."""
    if family or frame.empty:
        return with_fdr(frame, family, columns)
    marked = frame.assign(_family=0)
    return with_fdr(marked, ["_family"], columns).drop(columns="_family")


def _tables(
    alignment: list[dict[str, Any]],
    contrasts: list[dict[str, Any]],
    direct: list[dict[str, Any]],
    analysis: AnalysisSet,
    fdr_family: str = "model",
) -> AlignmentResult:
    families = FDR_FAMILIES[fdr_family]
    aligned = fdr_within(
        pd.DataFrame(alignment, columns=ALIGNMENT.column_names),
        families["alignment"],
        [("p_perm", "p_fdr")],
    )
    contrast = fdr_within(
        pd.DataFrame(contrasts, columns=CONDITION_CONTRAST.column_names),
        families["condition_contrast"],
        [("p_perm", "p_fdr"), ("p_boot", "p_boot_fdr")],
    )
    summary = {
        "n_stimuli": len(analysis.ids),
        "conditions": analysis.condition_names,
        "targets": {t.name: {"kind": t.kind, "subjects": t.subjects} for t in analysis.targets},
    }
    return AlignmentResult(
        aligned,
        pd.DataFrame(direct, columns=BEHAVIOR_DIRECT.column_names),
        contrast,
        group_summary(aligned, families["alignment_group"]),
        summary,
    )


def group_summary(
    alignment: pd.DataFrame, family: Sequence[str] = ("model", "condition")
) -> pd.DataFrame:
    """Mean and SEM over subjects of per-subject r (``alignment_group`` table), and a one-sided
    one-sample t-test of the mean r > 0 across subjects, ``t = mean / sem`` with ``S - 1``
    degrees of freedom (``p_t``; BH-FDR ``p_t_fdr`` over the rows sharing the ``family``
    columns, by default layers x targets per model and condition).

    The ``group`` rows of the alignment test these subjects (their p and CI come from stimulus
    permutations and resamples, the same for every subject: fixed effects); ``p_t`` treats the
    subjects as a sample of a population (random effects), the usual claim of a study.
    """
    columns = ALIGNMENT_GROUP.column_names
    subjects = alignment[~alignment["subject"].isin([GROUP_SUBJECT, GROUP_RDM_SUBJECT])]
    if subjects.empty:
        return pd.DataFrame(columns=columns)
    keys = ["model", "layer", "layer_index", "target", "target_kind", "condition"]
    grouped = subjects.groupby(keys, sort=False)["r"]
    summary = grouped.agg(mean_r="mean", sd="std", n_subjects="count").reset_index()
    summary["sem"] = summary["sd"] / np.sqrt(summary["n_subjects"])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = summary["mean_r"] / summary["sem"]
    dof = summary["n_subjects"] - 1
    summary["t"] = t.where(dof >= 1)
    summary["p_t"] = scipy.stats.t.sf(summary["t"], dof.clip(lower=1)).astype(float)
    summary.loc[summary["t"].isna(), "p_t"] = np.nan
    summary["p_t_fdr"] = np.nan
    summary = fdr_within(summary, list(family), [("p_t", "p_t_fdr")])
    return summary[columns]

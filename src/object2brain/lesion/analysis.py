"""Object2Brain: how much each object group's filters carry the model-to-human correlation.

For every model, layer ``L`` and object group ``g`` of the EmoCAM++ filter assignment
(``filter_objects`` table; plus the group ``unassigned`` of filters assigned to no group):

- **lesion**: zero the filters of ``g``; **keep**: zero every other filter of ``L``;
- recompute the layer's RDM and its correlation ``r_variant`` with every target (behaviour, each
  ROI; each subject, and ``group`` = the mean over the subjects whose r is defined) in every
  condition; ``delta_r = r_variant - r_full``;
- null: ``n_null`` random subsets of the same number of filters of ``L`` (seeded; lesion zeroes
  them, keep keeps them); ``z = (delta_r - mean(null)) / sd(null)`` and the two-sided
  ``p = (1 + #{|null - mean(null)| >= |delta_r - mean(null)|}) / (1 + n_null)``. Groups of the same
  size share the same null draws. With ``null_subsets="matched"`` the subsets are drawn stratum by
  stratum of the filters' activation norms, as many from each as the group has there
  (:func:`~object2brain.lesion.engine.norm_strata`): the null then asks whether the group
  matters more than filters *as strong as its own*, where a uniform draw also counts their
  strength (a group of unusually strong filters changes the RDM more whatever it encodes).
- ``p_fdr``: Benjamini-Hochberg over groups x targets within model, layer, variant, condition and
  subject level;
- ``p_perm``: permuting the targets' stimulus labels (the Mantel null of ``delta_r``).

Columns: :data:`object2brain.tables.OBJECT2BRAIN`. Stimuli, conditions and target RDMs come from
the shared analysis set (:class:`~object2brain.rsa.targets.AnalysisSet`).

RDMs of all subsets come from per-filter sufficient statistics (:mod:`object2brain.lesion.engine`),
so the null costs one matrix product per chunk of subsets.

Option ``propagate`` (needs the model and the stimulus images): the filters are zeroed *inside*
the forward pass (a hook on ``L``), so later layers and the valence output change too. Reported:
the change of the direct behaviour correlation (predicted vs rated valence, table
``propagate_behavior``) and of later layers' alignment (table ``propagate_alignment``). No null
is computed there (each subset would need its own forward pass).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from object2brain.activations.store import ActivationStore
from object2brain.data.stimuli import parse_booleans, read_table
from object2brain.devices import Chunking, resolve_device
from object2brain.errors import DataError, ModelError, listing, require_columns
from object2brain.lesion.engine import (
    FilterStats,
    condensed_subset,
    filter_norms,
    matched_subset_masks,
    norm_strata,
    random_subset_masks,
)
from object2brain.lesion.propagate import propagate_layer
from object2brain.models.zoo import LoadedModel
from object2brain.options import LesionOptions, Runtime
from object2brain.rsa.compare import correlate_prepared, prepare
from object2brain.rsa.inference import linear_permutation_test, with_fdr
from object2brain.rsa.targets import AnalysisSet, Condition, TargetColumns
from object2brain.tables import OBJECT2BRAIN

log = logging.getLogger("object2brain.lesion.analysis")

UNASSIGNED = "unassigned"
FILTER_COLUMNS = ("model", "layer", "filter", "group", "assigned")
#: Values of the variant-minus-full difference vectors tested at once for ``p_perm`` (256 MB).
DIFFERENCE_BLOCK_VALUES = 1 << 25


@dataclass
class LesionResult:
    """Tables of a lesion run and the files written (filled by the writer)."""

    object2brain: pd.DataFrame
    propagate_behavior: pd.DataFrame = field(default_factory=pd.DataFrame)
    propagate_alignment: pd.DataFrame = field(default_factory=pd.DataFrame)
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class FilterTable:
    """A ``filter_objects`` table (the dissection's filter-to-group assignment) and its origin."""

    frame: pd.DataFrame
    where: str = "filter table"


@dataclass(frozen=True)
class LayerFilters:
    """One layer to lesion: its model, name, per-filter statistics of the analysed stimuli
    (:class:`~object2brain.lesion.engine.FilterStats`) and the filters ``(k,)`` of each group."""

    model: str
    layer: str
    stats: FilterStats
    groups: dict[str, np.ndarray]


def group_filters(
    filters: pd.DataFrame, model: str, layer: str, n_filters: int, *, where: str = "filter table"
) -> dict[str, np.ndarray]:
    """Filter indices of every assigned group of ``model``/``layer``, plus ``unassigned``.

    Raises:
        DataError: no rows for this model/layer, filter indices outside ``0..n_filters-1``,
            an ``assigned`` value other than true/false/1/0, or a filter in two groups.
    """
    rows = filters[
        (filters["model"].astype(str) == model) & (filters["layer"].astype(str) == layer)
    ]
    if rows.empty:
        known = sorted(
            {f"{m}/{lay}" for m, lay in zip(filters["model"], filters["layer"], strict=True)}
        )
        raise DataError(
            f"{where}: no rows for model {model!r}, layer {layer!r} "
            f"(the table has: {', '.join(known) or 'nothing'}); is it for another model or layer?"
        )
    indices = rows["filter"].astype(int)
    bad = sorted(set(indices[(indices < 0) | (indices >= n_filters)]))
    if bad:
        raise DataError(
            f"{where}: filter(s) {', '.join(map(str, bad[:10]))} of {model}/{layer} do not exist: "
            f"the layer has {n_filters} filters (0..{n_filters - 1})"
        )
    flags = parse_booleans(rows["assigned"], where, "assigned")
    _refuse_double_assignment(rows.assign(assigned=flags), where)
    assigned = rows[flags.to_numpy()]
    groups = {
        str(group): np.unique(block["filter"].astype(int).to_numpy())
        for group, block in assigned.groupby("group", sort=True)
    }
    taken = np.zeros(n_filters, dtype=bool)
    for members in groups.values():
        taken[members] = True
    if not groups:
        log.warning(
            "%s: no filter of %s/%s is assigned to an object group: nothing to lesion",
            where,
            model,
            layer,
        )
    elif (~taken).any():
        groups[UNASSIGNED] = np.flatnonzero(~taken)
    return groups


def load_filter_table(source: str | Path | pd.DataFrame) -> FilterTable:
    """Read a ``filter_objects`` table and check its columns."""
    frame = source.copy() if isinstance(source, pd.DataFrame) else read_table(Path(source))
    where = "filter table" if isinstance(source, pd.DataFrame) else str(source)
    require_columns(frame.columns, FILTER_COLUMNS, where, detail=" of a filter_objects table")
    if frame.empty:
        raise DataError(f"{where}: the filter table has no rows")
    frame["assigned"] = parse_booleans(frame["assigned"], where, "assigned")
    _refuse_double_assignment(frame, where)
    return FilterTable(frame, where)


def _refuse_double_assignment(frame: pd.DataFrame, where: str) -> None:
    """A filter belongs to one group at most (the dissection assigns each filter to its group of
    largest enrichment): a table assigning a filter of a layer to two groups was edited or merged
    by hand, and lesioning it twice would count it in both groups, so it is refused.

    Raises:
        DataError: naming the model, layer, filter and its groups.
    """
    assigned = frame[frame["assigned"].to_numpy(dtype=bool)]
    keys = [assigned["model"].astype(str), assigned["layer"].astype(str), assigned["filter"]]
    groups = assigned["group"].astype(str).groupby(keys, sort=True).unique()
    doubled = [
        f"{key[0]}/{key[1]} filter {key[2]} ({', '.join(sorted(names))})"  # type: ignore[index]
        for key, names in groups.items()
        if len(names) > 1
    ]
    if doubled:
        raise DataError(
            f"{where}: {len(doubled)} filter(s) are assigned to more than one group: "
            f"{listing(doubled, limit=5)}; a filter belongs to one group at most"
        )


def store_model(store: ActivationStore) -> str:
    """The model label of a store: its attribute ``model``, else the file stem."""
    return str(store.attrs.get("model", Path(store.path).stem))


def compute_lesion(
    stores: Sequence[ActivationStore],
    filters: FilterTable,
    analyses: Sequence[AnalysisSet],
    options: LesionOptions,
    runtime: Runtime,
    *,
    model: LoadedModel | None = None,
) -> LesionResult:
    """Lesion / keep-only analysis of every object group of every store (module docstring).

    ``analyses[i]`` is the analysis set of ``stores[i]`` (the same object for stores of the same
    stimuli). With ``options.propagate``, ``model`` is re-run with each group's filters zeroed
    inside the forward pass (its analysis set must hold the stimulus images). Pure: reads the
    stores, writes nothing.
    """
    device = resolve_device(runtime.device)
    rows: list[dict[str, Any]] = []
    behavior: list[pd.DataFrame] = []
    later: list[pd.DataFrame] = []
    for store, analysis in zip(stores, analyses, strict=True):
        name = store_model(store)
        for layer in _layers_of(store, filters.frame, name, options.layers, str(store.path)):
            task = load_layer(store, layer, name, filters, analysis.ids, options.groups, device)
            rows += lesion_layer(task, analysis, options, seed=runtime.seed, device=device)
            if options.propagate:
                assert model is not None  # checked by the caller
                parts = propagate_layer(model, store, layer, task.groups, analysis, options, device)
                behavior.append(parts[0])
                later.append(parts[1])
    frame = with_fdr(
        pd.DataFrame(rows, columns=OBJECT2BRAIN.column_names).assign(analysis="rsa"),
        ["model", "layer", "variant", "condition", "subject"],  # as the alignment's
        [("p_null", "p_fdr"), ("p_perm", "p_perm_fdr")],
    )
    return LesionResult(
        frame,
        pd.concat(behavior, ignore_index=True) if behavior else pd.DataFrame(),
        pd.concat(later, ignore_index=True) if later else pd.DataFrame(),
    )


def load_layer(
    store: ActivationStore,
    layer: str,
    model: str,
    filters: FilterTable,
    ids: list[str],
    groups: Sequence[str] | None,
    device: torch.device,
) -> LayerFilters:
    """The statistics of ``layer`` for ``ids`` and its groups' filters (``groups``: only those)."""
    stats = FilterStats.from_store(store, layer, ids, device=device)
    members = group_filters(filters.frame, model, layer, stats.n_filters, where=filters.where)
    return LayerFilters(model, layer, stats, _select_groups(members, groups, model, layer))


def _layers_of(
    store: ActivationStore,
    table: pd.DataFrame,
    model: str,
    layers: Sequence[str] | None,
    where: str,
) -> list[str]:
    in_table = set(table.loc[table["model"].astype(str) == model, "layer"].astype(str))
    if not in_table:
        models = sorted(set(table["model"].astype(str)))
        raise DataError(
            f"the filter table has no rows for model {model!r} of {where} "
            f"(it has: {', '.join(models)}); is it for another model?"
        )
    wanted = list(layers) if layers else [name for name in store.layers if name in in_table]
    for layer in wanted:
        if layer not in store.layers:
            raise DataError(f"{where}: no layer {layer!r} in the activation store")
        if layer not in in_table:
            raise DataError(f"the filter table has no rows for {model}/{layer}")
    if not wanted:
        raise DataError(
            f"none of the filter table's layers ({', '.join(sorted(in_table))}) is in {where}"
        )
    return wanted


def _select_groups(
    members: dict[str, np.ndarray], groups: Sequence[str] | None, model: str, layer: str
) -> dict[str, np.ndarray]:
    if not groups:
        return members
    empty = [g for g in groups if g not in members]
    if empty:
        raise DataError(
            f"group(s) {', '.join(empty)} have no filters assigned in {model}/{layer} "
            f"(groups with filters: {', '.join(sorted(members))})"
        )
    return {g: members[g] for g in groups}


def check_same_weights(store: ActivationStore, model: LoadedModel) -> None:
    """``--propagate`` re-runs the network: it must be the one that wrote the activations."""
    stored = store.attrs.get("weights_sha256")
    if stored and stored != model.weights_sha256:
        raise ModelError(
            f"{store.path}: the activations come from {store.attrs.get('weights')!r} weights "
            f"(SHA-256 {str(stored)[:12]}...), but --model {model.name} has {model.weights!r} "
            f"(SHA-256 {model.weights_sha256[:12]}...): --propagate must run the same network "
            "(same --weights, and --seed for random weights)"
        )


@dataclass(frozen=True)
class _Scorer:
    """Correlations of filter-subset RDMs with the targets within one condition.

    ``stats``: the filters' statistics of the condition's stimuli; ``target`` ``(Q, m)``: the
    targets' condensed RDMs of those stimuli, prepared (ranked / standardised) once.
    """

    stats: FilterStats
    target: torch.Tensor
    columns: TargetColumns
    metric: str
    method: str
    device: torch.device

    @classmethod
    def of(
        cls,
        task: LayerFilters,
        analysis: AnalysisSet,
        condition: Condition,
        options: LesionOptions,
        device: torch.device,
    ) -> _Scorer:
        columns = analysis.columns(group_rdm=False)
        stats = task.stats
        if condition.size != len(analysis.ids):
            stats = stats.subset(condition.rows)
        vectors = columns.vectors()
        pairs = torch.as_tensor(
            condensed_subset(len(analysis.ids), condition.rows), device=vectors.device
        )
        target = prepare(vectors[:, pairs], options.compare_method).to(device)
        return cls(stats, target, columns, options.rdm_metric, options.compare_method, device)

    def correlations(self, masks: np.ndarray) -> np.ndarray:
        """r ``(N, Q + G)`` of the RDMs of filter subsets ``masks`` ``(N, K)`` with every target
        column, group columns included; NaN where a subset's RDM is undefined (silent)."""
        size = max(1, self.stats.subsets_per_chunk(self.device))

        def chunk_r(start: int, stop: int) -> np.ndarray:
            rdms = self.stats.rdms(masks[start:stop], self.metric, device=self.device, strict=False)
            valid = torch.isfinite(rdms).all(dim=1)
            r = torch.full((rdms.shape[0], self.target.shape[0]), float("nan"), dtype=torch.float64)
            if bool(valid.any()):
                variant = prepare(rdms[valid], self.method)
                r[valid.cpu()] = correlate_prepared(variant, self.target, self.method).cpu()
            return r.numpy()

        chunks = Chunking(size).run(len(masks), chunk_r, device=self.device)
        return self.columns.with_group(np.concatenate([r for _, _, r in chunks]))

    def prepared(self, mask: np.ndarray) -> torch.Tensor:
        """The prepared condensed RDM ``(m,)`` of one subset (NaN when silent: no r, no p)."""
        rdm = self.stats.rdms(mask[None], self.metric, device=self.device, strict=False)
        return prepare(rdm, self.method)[0]


@dataclass(frozen=True)
class _Estimate:
    """One group and variant in one condition: its mask ``(K,)``, r, delta and null p and z
    (each ``(Q + G,)``)."""

    group: str
    n_filters: int
    variant: str
    mask: np.ndarray
    r_variant: np.ndarray
    delta: np.ndarray
    p_null: np.ndarray
    z_null: np.ndarray


def lesion_layer(
    task: LayerFilters,
    analysis: AnalysisSet,
    options: LesionOptions,
    *,
    seed: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Rows of the ``object2brain`` table of one layer (``p_fdr``, ``p_perm_fdr`` not yet
    filled): every group x variant x target column x analysed condition of ``analysis``."""
    norms = filter_norms(task.stats) if options.null_subsets == "matched" else None
    rows: list[dict[str, Any]] = []
    for condition in analysis.conditions:
        scorer = _Scorer.of(task, analysis, condition, options, device)
        r_full = scorer.correlations(np.ones((1, task.stats.n_filters), dtype=bool))[0]
        estimates = _estimates(task, scorer, r_full, options, seed, norms)
        linear = options.n_perm > 0 and options.compare_method != "kendall_tau_a"
        p_perm = _label_permutation_p(scorer, estimates, options.n_perm, seed, linear)
        common = {"model": task.model, "layer": task.layer, "condition": condition.name}
        for estimate, p_labels in zip(estimates, p_perm, strict=True):
            rows += _rows(common, scorer.columns, estimate, p_labels, options, r_full, linear)
    return rows


def _estimates(
    task: LayerFilters,
    scorer: _Scorer,
    r_full: np.ndarray,
    options: LesionOptions,
    seed: int,
    norms: np.ndarray | None,
) -> list[_Estimate]:
    """r, delta and null p and z of every group and variant. Null subsets of the same variant,
    size (and, matched, counts per norm stratum) are drawn once and shared."""
    K = task.stats.n_filters
    nulls: dict[tuple[str, int, tuple[int, ...]], np.ndarray] = {}
    estimates = []
    for group, filters in task.groups.items():
        strata = None if norms is None else norm_strata(norms, filters)
        counts = _stratum_counts(strata, filters)
        for variant in options.variants:
            mask = np.full(K, variant == "lesion")
            mask[filters] = variant == "keep"
            r_variant = scorer.correlations(mask[None])[0]
            delta = r_variant - r_full
            key = (variant, len(filters), counts)
            if options.n_null and key not in nulls:
                draws = _null_draws(K, filters, strata, options.n_null, seed + len(filters))
                null_masks = ~draws if variant == "lesion" else draws
                nulls[key] = scorer.correlations(null_masks) - r_full[None]
            p, z = _null_stats(delta, nulls.get(key))
            estimates.append(_Estimate(group, len(filters), variant, mask, r_variant, delta, p, z))
    return estimates


def _null_draws(
    K: int, filters: np.ndarray, strata: np.ndarray | None, n_null: int, seed: int
) -> np.ndarray:
    """``(n_null, K)`` random subsets of the group's size: uniform, or norm-matched."""
    if strata is None:
        return random_subset_masks(K, len(filters), n_null, seed=seed)
    return matched_subset_masks(strata, filters, n_null, seed=seed)


def _label_permutation_p(
    scorer: _Scorer, estimates: list[_Estimate], n_perm: int, seed: int, linear: bool
) -> np.ndarray:
    """Two-sided ``p_perm`` ``(E, Q + G)`` of every estimate's ``delta_r``.

    ``delta_r = (prepare(variant) - prepare(full)) . target``: permuting the targets' stimulus
    labels gives its null when the target is unrelated to the model. Rows in blocks of
    :data:`DIFFERENCE_BLOCK_VALUES` values, so many groups do not hold every difference vector
    at once. NaN when not ``linear`` (no permutations, or Kendall tau-a: not a dot product).
    """
    p_perm = np.full((len(estimates), len(scorer.columns.labels)), np.nan)
    if not linear:
        return p_perm
    full = scorer.prepared(np.ones(scorer.stats.n_filters, dtype=bool))
    block = max(1, DIFFERENCE_BLOCK_VALUES // full.numel())
    masks = [estimate.mask for estimate in estimates]
    for first in range(0, len(masks), block):
        differences = torch.stack([scorer.prepared(m) - full for m in masks[first : first + block]])
        p_perm[first : first + len(differences)] = linear_permutation_test(
            differences, scorer.target, n_perm, seed, scorer.columns.combine
        ).p
    return p_perm


def _rows(
    common: dict[str, Any],
    columns: TargetColumns,
    estimate: _Estimate,
    p_labels: np.ndarray,
    options: LesionOptions,
    r_full: np.ndarray,
    linear: bool,
) -> list[dict[str, Any]]:
    return [
        common
        | {
            "group": estimate.group,
            "variant": estimate.variant,
            "target": target,
            "subject": subject,
            "n_filters": estimate.n_filters,
            "r_full": r_full[c],
            "r_variant": estimate.r_variant[c],
            "delta_r": estimate.delta[c],
            "p_null": estimate.p_null[c],
            "z_null": estimate.z_null[c],
            "n_null": options.n_null,
            "p_perm": p_labels[c],
            "n_perm": options.n_perm if linear else 0,
        }
        for c, (target, _kind, subject) in enumerate(columns.labels)
    ]


def _stratum_counts(strata: np.ndarray | None, filters: np.ndarray) -> tuple[int, ...]:
    """What a matched null depends on: the number of strata and the group's count in each."""
    if strata is None:
        return ()
    n_strata = int(strata.max()) + 1
    return (n_strata, *np.bincount(strata[filters], minlength=n_strata).tolist())


def _null_stats(delta: np.ndarray, null: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided p and z of ``delta`` ``(T,)`` against ``null`` ``(N, T)``.

    Null subsets whose RDM is undefined (a silent pattern; NaN rows) are left out of the count.
    z is NaN where the null does not vary (spread <= 1e-12 of max(1, |centre|)).
    """
    if null is None or len(null) == 0:
        nan = np.full_like(delta, np.nan)
        return nan, nan
    finite = np.isfinite(null)
    count = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as wanted
        centre = np.nanmean(np.where(finite, null, np.nan), axis=0)
        spread = np.nanstd(np.where(finite, null, np.nan), axis=0, ddof=1)
        extreme = (np.abs(null - centre) >= np.abs(delta - centre)[None] - 1e-12) & finite
        p = np.where(count > 0, (1 + extreme.sum(axis=0)) / (1 + count), np.nan)
    p = np.where(np.isfinite(delta), p, np.nan)
    # a constant null (e.g. keep-only of a group holding every filter) has a rounding-noise spread
    varies = spread > 1e-12 * np.maximum(1.0, np.abs(centre))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(varies, (delta - centre) / spread, np.nan)
    return p, z


# --- shared with the encoding lesion (object2brain.lesion.encoding) -----------------------


def layers_to_lesion(
    store: ActivationStore, table: pd.DataFrame, model: str, layers: Sequence[str] | None
) -> list[str]:
    """The layers of ``store`` the lesion analyses: ``layers`` (checked), else every layer of the
    store that the filter table has rows for (as the RSA lesion)."""
    return _layers_of(store, table, model, layers, str(store.path))


def null_subset_masks(
    n_filters: int,
    filters: np.ndarray,
    strata: np.ndarray | None,
    n_null: int,
    seed: int,
    variant: str,
) -> np.ndarray:
    """The null filter subsets ``(n_null, K)`` (True = filter kept) of one group and variant,
    drawn exactly as the RSA lesion draws them (seed ``seed + group size``; uniform, or
    norm-matched with ``strata``), so both analyses test against the same subsets."""
    draws = _null_draws(n_filters, filters, strata, n_null, seed + len(filters))
    return ~draws if variant == "lesion" else draws


def null_p_z(delta: np.ndarray, null: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided p and z of ``delta`` ``(T,)`` against ``null`` ``(N, T)``, as the RSA lesion's
    ``p_null`` and ``z_null``."""
    return _null_stats(delta, null)


def stratum_counts(strata: np.ndarray | None, filters: np.ndarray) -> tuple[int, ...]:
    """What a (matched) null depends on besides the group size (shared null draws)."""
    return _stratum_counts(strata, filters)

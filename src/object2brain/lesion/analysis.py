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
is computed there (each subset would need its own forward pass). Cross-fitted selection zeroes
fold ``k``'s groups on fold ``k``'s stimuli and combines over folds
(:func:`~object2brain.lesion.propagate.propagate_layer`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from object2brain.activations.store import ActivationStore
from object2brain.data.splits import condition_folds
from object2brain.data.stimuli import parse_booleans, read_table
from object2brain.devices import Chunking, resolve_device
from object2brain.errors import DataError, ModelError, listing, require_columns
from object2brain.executors import Executor, executor_for
from object2brain.lesion.engine import (
    FilterStats,
    alignment_bins,
    condensed_subset,
    filter_norms,
    norm_strata,
)
from object2brain.lesion.nulls import NullJob, NullRequest, request_masks, run_nulls
from object2brain.lesion.propagate import propagate_layer
from object2brain.models.zoo import LoadedModel
from object2brain.options import LesionOptions, Runtime
from object2brain.rsa.compare import correlate_prepared, prepare
from object2brain.rsa.inference import linear_permutation_test, with_fdr
from object2brain.rsa.targets import (
    MIN_CONDITION_STIMULI,
    AnalysisSet,
    Condition,
    TargetColumns,
)
from object2brain.tables import OBJECT2BRAIN

log = logging.getLogger("object2brain.lesion.analysis")

UNASSIGNED = "unassigned"
FILTER_COLUMNS = ("model", "layer", "filter", "group", "assigned")
#: Optional column of a filter table: the selection fold whose stimuli its assignment left out.
FOLD_COLUMN = "fold"
#: Level of the starred rule (FDR-adjusted p below it).
ALPHA = 0.05
#: Values of the variant-minus-full difference vectors tested at once for ``p_perm`` (256 MB).
DIFFERENCE_BLOCK_VALUES = 1 << 25


@dataclass
class LesionResult:
    """Tables of a lesion run and the files written (filled by the writer)."""

    object2brain: pd.DataFrame
    propagate_behavior: pd.DataFrame = field(default_factory=pd.DataFrame)
    propagate_alignment: pd.DataFrame = field(default_factory=pd.DataFrame)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FilterTable:
    """A ``filter_objects`` table (the dissection's filter-to-group assignment) and its origin;
    ``folds``: the dissection's selection folds (``stimulus_id, fold``, its ``folds.csv``) read
    from ``folds_where``, or ``None`` when not known."""

    frame: pd.DataFrame
    where: str = "filter table"
    folds: pd.DataFrame | None = None
    folds_where: str = ""


#: The dissection's record of its selection folds, next to its ``filter_objects`` table.
FOLDS_FILE = "folds.csv"


def load_fold_definition(path: str | Path) -> pd.DataFrame:
    """A dissection's ``folds.csv`` (``stimulus_id, fold``; ids exactly as written).

    Raises:
        DataError: unreadable, missing columns, duplicate ids or non-integer folds.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"stimulus_id": str}, keep_default_na=False)
    except Exception as exc:  # pandas raises many types for malformed files
        raise DataError(f"{path}: cannot be read as a selection fold file ({exc})") from None
    require_columns(frame.columns, ("stimulus_id", "fold"), str(path))
    folds = pd.to_numeric(frame["fold"], errors="coerce")
    if folds.isna().any() or (folds < 0).any() or not np.allclose(folds, folds.round()):
        raise DataError(f"{path}: column fold must hold fold numbers 0, 1, ...")
    duplicated = frame["stimulus_id"][frame["stimulus_id"].duplicated()]
    if len(duplicated):
        raise DataError(f"{path}: stimulus_id {duplicated.iloc[0]!r} is listed twice")
    return pd.DataFrame({"stimulus_id": frame["stimulus_id"], "fold": folds.astype(np.int64)})


def recorded_folds(filters: FilterTable, ids: Sequence[str], k: int) -> np.ndarray:
    """The selection fold ``(n,)`` of every analysed stimulus ``ids`` as the dissection recorded
    it (``filters.folds``): the lesion measures fold ``k``'s groups on exactly the stimuli the
    dissection held out of fold ``k``'s selection.

    Raises:
        DataError: naming the fold file and the first analysed stimulus it does not hold (the
            dissection saw other stimuli), or another number of folds than ``k``.
    """
    assert filters.folds is not None
    where = filters.folds_where or "the dissection's selection folds"
    fold_of = dict(
        zip(filters.folds["stimulus_id"].astype(str), filters.folds["fold"], strict=True)
    )
    missing = [sid for sid in ids if sid not in fold_of]
    if missing:
        raise DataError(
            f"{where}: the lesion measures stimulus {missing[0]!r}, which the dissection's "
            f"selection folds do not hold ({len(missing)} such stimuli): the groups were chosen "
            "on other stimuli; dissect the stimuli the lesion analyses"
        )
    n_folds = int(filters.folds["fold"].max()) + 1
    if n_folds != k:
        raise DataError(f"{where}: {n_folds} selection folds, but --selection-folds {k}")
    return np.asarray([fold_of[sid] for sid in ids], dtype=np.int64)


@dataclass(frozen=True)
class LayerFilters:
    """One layer to lesion: its model, name, per-filter statistics of the analysed stimuli
    (:class:`~object2brain.lesion.engine.FilterStats`) and the filters ``(k,)`` of each group.

    Cross-fitted selection: ``folds`` ``(n,)`` is the selection fold of every analysed stimulus
    and ``fold_groups[k]`` the groups chosen without fold ``k``'s stimuli; None / empty for
    ``same`` (``groups`` chosen on all stimuli).
    """

    model: str
    layer: str
    stats: FilterStats
    groups: dict[str, np.ndarray]
    folds: np.ndarray | None = None
    fold_groups: tuple[dict[str, np.ndarray], ...] = ()


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


def load_filter_table(
    source: str | Path | pd.DataFrame, folds: str | Path | None = None
) -> FilterTable:
    """Read a ``filter_objects`` table and check its columns; with it the dissection's
    selection folds: ``folds``, else the :data:`FOLDS_FILE` next to a table file, if any."""
    frame = source.copy() if isinstance(source, pd.DataFrame) else read_table(Path(source))
    where = "filter table" if isinstance(source, pd.DataFrame) else str(source)
    if folds is None and not isinstance(source, pd.DataFrame):
        beside = Path(source).parent / FOLDS_FILE
        folds = beside if beside.is_file() else None
    definition = None if folds is None else load_fold_definition(folds)
    require_columns(frame.columns, FILTER_COLUMNS, where, detail=" of a filter_objects table")
    if frame.empty:
        raise DataError(f"{where}: the filter table has no rows")
    frame["assigned"] = parse_booleans(frame["assigned"], where, "assigned")
    _refuse_double_assignment(frame, where)
    return FilterTable(frame, where, definition, "" if folds is None else str(folds))


def _refuse_double_assignment(frame: pd.DataFrame, where: str) -> None:
    """A filter belongs to one group at most (the dissection assigns each filter to its group of
    largest enrichment): a table assigning a filter of a layer to two groups was edited or merged
    by hand, and lesioning it twice would count it in both groups, so it is refused.

    Raises:
        DataError: naming the model, layer, filter and its groups.
    """
    assigned = frame[frame["assigned"].to_numpy(dtype=bool)]
    keys = [assigned["model"].astype(str), assigned["layer"].astype(str), assigned["filter"]]
    if FOLD_COLUMN in assigned:  # per-fold assignments are separate tables
        keys.append(pd.to_numeric(assigned[FOLD_COLUMN], errors="coerce").fillna(-1))
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
    executor: Executor | None = None,
) -> LesionResult:
    """Lesion / keep-only analysis of every object group of every store (module docstring).

    ``analyses[i]`` is the analysis set of ``stores[i]`` (the same object for stores of the same
    stimuli). With ``options.propagate``, ``model`` is re-run with each group's filters zeroed
    inside the forward pass (its analysis set must hold the stimulus images). ``executor``:
    where the chunks of null subsets and permutations run (default: the one of
    ``runtime.executor``); the table is the same for every executor and number of workers.
    Pure: reads the stores, writes nothing.
    """
    device = resolve_device(runtime.device)
    executor = executor or executor_for(runtime)
    rows: list[dict[str, Any]] = []
    behavior: list[pd.DataFrame] = []
    later: list[pd.DataFrame] = []
    notes: list[str] = []
    for store, analysis in zip(stores, analyses, strict=True):
        name = store_model(store)
        for layer in _layers_of(store, filters.frame, name, options.layers, str(store.path)):
            task = load_layer(store, layer, name, filters, analysis.ids, options.groups, device)
            task, note = with_selection(task, filters, analysis, options, runtime.seed)
            notes += [note] if note else []
            rows += lesion_layer(
                task, analysis, options, seed=runtime.seed, device=device, executor=executor
            )
            if options.propagate:
                assert model is not None  # checked by the caller
                parts = propagate_layer(
                    model, store, layer, task.groups, analysis, options, device,
                    folds=task.folds, fold_groups=task.fold_groups,
                )  # fmt: skip
                behavior.append(parts[0])
                later.append(parts[1])
    frame = with_fdr(
        pd.DataFrame(rows, columns=OBJECT2BRAIN.column_names).assign(analysis="rsa"),
        ["model", "layer", "variant", "condition", "subject"],  # as the alignment's
        [("p_null", "p_fdr"), ("p_perm", "p_perm_fdr"), ("p_group", "p_group_fdr")],
    )
    frame["significant"] = starred(frame)
    return LesionResult(
        frame,
        pd.concat(behavior, ignore_index=True) if behavior else pd.DataFrame(),
        pd.concat(later, ignore_index=True) if later else pd.DataFrame(),
        notes=notes,
    )


def starred(frame: pd.DataFrame, alpha: float = ALPHA) -> pd.Series:
    """The starred rule ``(N,)`` bool: ``p_group_fdr < alpha`` (the group beats filter subsets
    matched to it on norm and single-filter alignment) and ``p_perm_fdr < alpha`` (the target
    relates to the layer's change at all; where no permutations were run, ``p_group_fdr``
    alone)."""
    group = frame["p_group_fdr"].to_numpy(dtype=float) < alpha
    perm = frame["p_perm_fdr"].to_numpy(dtype=float)
    return pd.Series(group & (np.isnan(perm) | (perm < alpha)), index=frame.index, dtype=bool)


def selection_folds(analysis: AnalysisSet, k: int, seed: int) -> np.ndarray:
    """Selection fold ``(n,)`` in ``0 .. k - 1`` of every analysed stimulus, stratified by
    condition: :func:`~object2brain.data.splits.condition_folds` of the analysis set's stimuli
    (in their order), their condition labels and ``seed``. The dissection that chooses fold
    ``k``'s groups (``dissect --selection-folds``) holds out exactly these stimuli when its
    stimulus set is the analysis set (same ids, order and conditions) and its seed is the
    same."""
    return condition_folds(analysis.labels, len(analysis.ids), k, seed=seed)


def with_selection(
    task: LayerFilters,
    filters: FilterTable,
    analysis: AnalysisSet,
    options: LesionOptions,
    seed: int,
) -> tuple[LayerFilters, str]:
    """``task`` with its cross-fitted groups (``options.selection == "cross_fit"``), and a note
    for the manifest when the selection falls back to ``same``.

    Cross-fitting needs the filter table's column ``fold``: rows with ``fold = k`` hold the
    assignment made without fold ``k``'s stimuli (:func:`selection_folds`), rows with an empty
    ``fold`` the assignment on all stimuli. A table without fold rows for the layer falls back
    to ``same`` (its groups saw every stimulus: circular), with a warning and the note.

    Raises:
        DataError: fold values outside ``0 .. K - 1`` or a fold without rows.
    """
    if options.selection == "same":
        return task, ""
    frame = filters.frame
    rows = frame[
        (frame["model"].astype(str) == task.model) & (frame["layer"].astype(str) == task.layer)
    ]
    folds = rows[FOLD_COLUMN] if FOLD_COLUMN in rows else pd.Series(dtype=float)
    folds = pd.to_numeric(folds, errors="coerce").dropna()
    if folds.empty:
        note = (
            f"{task.model}/{task.layer}: --selection cross_fit needs a filter table with "
            "per-fold assignments (column fold); this one was assigned on all stimuli, so the "
            "rows are selection = same (circular: groups chosen on the stimuli they are tested on)"
        )
        log.warning(note)
        return task, note
    k = options.selection_folds
    wanted = set(range(k))
    if set(folds.astype(int)) != wanted or not np.allclose(folds, folds.round()):
        raise DataError(
            f"{filters.where}: column fold of {task.model}/{task.layer} holds "
            f"{sorted(set(folds.tolist()))}; --selection-folds {k} needs folds 0..{k - 1}"
        )
    fold_groups = []
    for fold in range(k):
        part = rows.loc[folds.index[folds.astype(int) == fold]]
        members = group_filters(
            part,
            task.model,
            task.layer,
            task.stats.n_filters,
            where=f"{filters.where} (fold {fold})",
        )
        wanted_groups = options.groups or list(members)
        fold_groups.append({g: members[g] for g in wanted_groups if g in members})
    if filters.folds is not None:
        fold_of = recorded_folds(filters, analysis.ids, k)
    else:
        log.warning(
            "%s: no record of the dissection's selection folds (%s): the folds are drawn again "
            "from the analysed stimuli, which matches the dissection only if it dissected these "
            "stimuli (same ids, order, conditions) with the same seed",
            filters.where,
            FOLDS_FILE,
        )
        fold_of = selection_folds(analysis, k, seed)
    return replace(task, folds=fold_of, fold_groups=tuple(fold_groups)), ""


def load_layer(
    store: ActivationStore,
    layer: str,
    model: str,
    filters: FilterTable,
    ids: list[str],
    groups: Sequence[str] | None,
    device: torch.device,
) -> LayerFilters:
    """The statistics of ``layer`` for ``ids`` and its groups' filters (``groups``: only those)
    as assigned on all stimuli (rows with an empty ``fold``; none when the table has only
    per-fold rows for the layer)."""
    stats = FilterStats.from_store(store, layer, ids, device=device)
    frame = filters.frame
    if FOLD_COLUMN in frame:
        unfolded = pd.to_numeric(frame[FOLD_COLUMN], errors="coerce").isna().to_numpy()
        here = (frame["model"].astype(str) == model) & (frame["layer"].astype(str) == layer)
        if not (unfolded & here.to_numpy()).any():
            return LayerFilters(model, layer, stats, {})
        frame = frame[unfolded]
    members = group_filters(frame, model, layer, stats.n_filters, where=filters.where)
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
    """Correlations of filter-subset RDMs with the targets on one set of stimuli.

    ``stats``: the filters' statistics of those stimuli; ``target`` ``(Q, m)``: the targets'
    condensed RDMs of those stimuli, prepared (ranked / standardised) once.
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
        rows: np.ndarray,
        options: LesionOptions,
        device: torch.device,
    ) -> _Scorer:
        """The scorer of the analysis set's stimuli ``rows`` ``(n_r,)`` (ascending)."""
        columns = analysis.columns(group_rdm=False)
        stats = task.stats
        if len(rows) != len(analysis.ids):
            stats = stats.subset(rows)
        vectors = columns.vectors()
        pairs = torch.as_tensor(condensed_subset(len(analysis.ids), rows), device=vectors.device)
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

    def on_cpu(self) -> _Scorer:
        """A copy on the CPU (for an executor's workers), without the targets' full RDMs
        (``columns.rdms``: the scorer uses only its prepared ``target``)."""
        combine = self.columns.combine
        columns = replace(
            self.columns,
            rdms=self.columns.rdms[:0].cpu(),
            combine=None if combine is None else combine.cpu(),
        )
        cpu = torch.device("cpu")
        return replace(self, stats=self.stats.to(cpu), target=self.target.cpu(),
                       columns=columns, device=cpu)  # fmt: skip

    def prepared(self, mask: np.ndarray) -> torch.Tensor:
        """The prepared condensed RDM ``(m,)`` of one subset (NaN when silent: no r, no p)."""
        rdm = self.stats.rdms(mask[None], self.metric, device=self.device, strict=False)
        return prepare(rdm, self.method)[0]

    def alignment(self) -> np.ndarray:
        """Single-filter alignment ``(K, T)``: r of each filter's own RDM with the column that
        summarises each of the ``T`` targets (its ``group`` column, or its only column)."""
        r = self.correlations(np.eye(self.stats.n_filters, dtype=bool))
        return r[:, _summary_columns(self.columns)]


def _summary_columns(columns: TargetColumns) -> list[int]:
    """Per target (in order of ``columns.owner``), its last column: the derived ``group``
    column of a target with subjects, or the single column of a group-level target."""
    last: dict[int, int] = {}
    for c, owner in enumerate(columns.owner):
        last[owner] = c
    return [last[t] for t in sorted(last)]


@dataclass(frozen=True)
class _Part:
    """One selection fold of one condition: the rows ``test`` (ascending indices into the
    analysis set's ids) on which effects are measured, the rows ``select`` on which the groups
    were chosen and single-filter alignment is measured, the groups so chosen, and the weight
    of the fold (its share of the condition's tested stimuli)."""

    index: int
    test: np.ndarray
    select: np.ndarray
    groups: dict[str, np.ndarray]
    weight: float


@dataclass(frozen=True)
class _Estimate:
    """One group and variant on one part (or combined over parts): its mask ``(K,)`` (of the
    first part), r, delta ``(Q + G,)`` and its null draws: random subsets ``(N, Q + G)``,
    matched subsets ``(M, Q + G)`` and label permutations ``(P, Q + G)`` (None: not drawn)."""

    group: str
    n_filters: float
    variant: str
    mask: np.ndarray
    r_full: np.ndarray
    r_variant: np.ndarray
    delta: np.ndarray
    null_random: np.ndarray | None
    null_group: np.ndarray | None
    null_perm: np.ndarray | None = None


def lesion_layer(
    task: LayerFilters,
    analysis: AnalysisSet,
    options: LesionOptions,
    *,
    seed: int,
    device: torch.device,
    executor: Executor | None = None,
) -> list[dict[str, Any]]:
    """Rows of the ``object2brain`` table of one layer (the ``*_fdr`` columns not yet filled):
    every group x variant x target column x analysed condition of ``analysis``.

    With ``task.folds`` (cross-fitted selection) each condition's effects are measured fold by
    fold on the fold's stimuli, with the groups chosen without them, and combined over folds
    (:func:`_combine`); else on all of the condition's stimuli with ``task.groups``.
    """
    linear = options.n_perm > 0 and options.compare_method != "kendall_tau_a"
    selection = "cross_fit" if task.folds is not None else "same"
    rows: list[dict[str, Any]] = []
    for condition in analysis.conditions:
        parts = _parts(task, condition)
        if not parts:
            log.warning(
                "%s/%s: condition %r has too few stimuli per selection fold: no lesion rows",
                task.model,
                task.layer,
                condition.name,
            )
            continue
        per_part = [
            _part_estimates(task, analysis, part, options, seed, linear, device, executor)
            for part in parts
        ]
        columns = analysis.columns(group_rdm=False)
        common = {"model": task.model, "layer": task.layer, "condition": condition.name}
        if selection == "same":
            scorer = _Scorer.of(task, analysis, condition.rows, options, device)
            estimates = per_part[0]
            p_perm = _label_permutation_p(scorer, estimates, options.n_perm, seed, linear, executor)
        else:
            estimates = _combine(parts, per_part)
            p_perm = np.stack([_perm_p(e) for e in estimates]) if estimates else np.zeros((0,))
        for estimate, p_labels in zip(estimates, p_perm, strict=True):
            rows += _rows(
                common | {"selection": selection}, columns, estimate, p_labels, options, linear
            )
    return rows


def _parts(task: LayerFilters, condition: Condition) -> list[_Part]:
    """The parts of one condition: all its stimuli (``same``) or one per selection fold."""
    if task.folds is None:
        return [_Part(0, condition.rows, condition.rows, task.groups, 1.0)]
    fold_of = task.folds[condition.rows]
    parts = []
    for k, groups in enumerate(task.fold_groups):
        test = condition.rows[fold_of == k]
        select = condition.rows[fold_of != k]
        if len(test) < MIN_CONDITION_STIMULI or len(select) < MIN_CONDITION_STIMULI:
            return []
        parts.append(_Part(k, test, select, groups, len(test) / condition.size))
    return parts


def _part_estimates(
    task: LayerFilters,
    analysis: AnalysisSet,
    part: _Part,
    options: LesionOptions,
    seed: int,
    linear: bool,
    device: torch.device,
    executor: Executor | None = None,
) -> list[_Estimate]:
    """r, delta and the null draws of every group and variant of one part. Null subsets of
    the same variant, size (and cell counts) are drawn once and shared between groups. The
    nulls' chunks run on ``executor`` (:mod:`object2brain.lesion.nulls`)."""
    scorer = _Scorer.of(task, analysis, part.test, options, device)
    K = task.stats.n_filters
    r_full = scorer.correlations(np.ones((1, K), dtype=bool))[0]
    norms = filter_norms(task.stats.subset(part.select))
    alignment = None
    if options.n_group_null:
        chooser = _Scorer.of(task, analysis, part.select, options, device)
        alignment = chooser.alignment()
    shift = 0 if task.folds is None else fold_seed_shift(part.index)
    requests: dict[tuple[Any, ...], NullRequest] = {}
    pending = []
    for group, filters in part.groups.items():
        group_strata = None
        if options.null_subsets == "matched":  # norms of all stimuli, as before cross-fitting
            group_strata = norm_strata(filter_norms(task.stats), filters)
        counts = _stratum_counts(group_strata, filters)
        for variant in options.variants:
            mask = np.full(K, variant == "lesion")
            mask[filters] = variant == "keep"
            r_variant = scorer.correlations(mask[None])[0]
            key = ("random", variant, len(filters), counts)
            if options.n_null and key not in requests:
                requests[key] = NullRequest(
                    "random", seed + len(filters) + shift, options.n_null, K, filters,
                    variant == "lesion", strata=group_strata,
                )  # fmt: skip
            keys: list[tuple[Any, ...]] = [key] if options.n_null else []
            if alignment is not None:
                keys.append(("group", group, variant))
                requests |= _group_requests(
                    scorer, norms, alignment, filters, variant == "lesion",
                    options.n_group_null, seed + len(filters) + shift, keys[-1],
                )  # fmt: skip
            if linear and task.folds is not None:
                keys.append(("perm", group, variant))
                requests[keys[-1]] = NullRequest(
                    "perm", seed + shift, options.n_perm, K, filters, variant == "lesion",
                    mask=mask,
                )  # fmt: skip
            pending.append((group, filters, variant, mask, r_variant, keys))
    stage = f"lesion {task.model}/{task.layer} nulls"
    drawn = run_nulls(NullJob(scorer, r_full), list(requests.values()), executor, stage=stage)
    nulls = _assembled(requests, drawn)
    estimates = []
    for group, filters, variant, mask, r_variant, keys in pending:
        estimates.append(
            _Estimate(
                group,
                float(len(filters)),
                variant,
                mask,
                r_full,
                r_variant,
                r_variant - r_full,
                nulls.get(keys[0]) if options.n_null else None,
                nulls.get(("group", group, variant)),
                nulls.get(("perm", group, variant)),
            )
        )
    return estimates


def _group_requests(
    scorer: _Scorer,
    norms: np.ndarray,
    alignment: np.ndarray,
    filters: np.ndarray,
    lesion: bool,
    n_draws: int,
    seed: int,
    key: tuple[Any, ...],
) -> dict[tuple[Any, ...], NullRequest]:
    """The nulls of ``p_group``: per target ``t``, ``n_draws`` filter subsets matched to the
    group filter by filter on norm (a caliper) and single-filter alignment with ``t`` (quantile
    bins, :func:`~object2brain.lesion.engine.swap_subset_masks`; root seed
    ``seed + 7919 (t + 1)``), scored on ``t``'s columns (keys ``(*key, t)``)."""
    owners = np.asarray(scorer.columns.owner)
    out = {}
    for t, target in enumerate(sorted(set(scorer.columns.owner))):
        bins = alignment_bins(alignment[:, t], filters)
        out[(*key, t)] = NullRequest(
            "group", seed + 7_919 * (t + 1), n_draws, scorer.stats.n_filters, filters, lesion,
            norms=norms, bins=bins, own=owners == target,
        )  # fmt: skip
    return out


def _assembled(
    requests: dict[tuple[Any, ...], NullRequest], drawn: list[np.ndarray]
) -> dict[tuple[Any, ...], np.ndarray]:
    """Nulls by key; the per-target ``group`` nulls ``(*key, t)`` merged into one ``(M, Q + G)``
    array under ``key`` (each target's columns ``own`` from its own draws)."""
    nulls: dict[tuple[Any, ...], np.ndarray] = {}
    for (key, request), values in zip(requests.items(), drawn, strict=True):
        if request.kind != "group":
            nulls[key] = values
            continue
        assert request.own is not None
        merged = nulls.setdefault(key[:-1], np.full_like(values, np.nan))
        merged[:, request.own] = values[:, request.own]
    return nulls


def _combine(parts: list[_Part], per_part: list[list[_Estimate]]) -> list[_Estimate]:
    """Per group and variant, the fold-size weighted mean over the folds where the group has
    filters (weights renormalised over those folds) of r, delta and of every null draw, draw
    by draw: the combined statistic and its combined null."""
    keys = dict.fromkeys((e.group, e.variant) for estimates in per_part for e in estimates)
    combined = []
    for group, variant in keys:
        found = [
            (part.weight, e)
            for part, estimates in zip(parts, per_part, strict=True)
            for e in estimates
            if (e.group, e.variant) == (group, variant)
        ]
        weights = np.array([w for w, _ in found]) / sum(w for w, _ in found)
        pick = [e for _, e in found]
        first = pick[0]
        combined.append(
            _Estimate(
                group,
                float(_weighted([e.n_filters for e in pick], weights)),
                variant,
                first.mask,
                _weighted([e.r_full for e in pick], weights),
                _weighted([e.r_variant for e in pick], weights),
                _weighted([e.delta for e in pick], weights),
                _weighted([e.null_random for e in pick], weights),
                _weighted([e.null_group for e in pick], weights),
                _weighted([e.null_perm for e in pick], weights),
            )
        )
    return combined


def _weighted(values: Sequence[Any], weights: np.ndarray) -> Any:
    """``sum_k w_k values_k`` (None when any value is None: that null was not drawn)."""
    if any(v is None for v in values):
        return None
    return sum(w * np.asarray(v, dtype=float) for w, v in zip(weights, values, strict=True))


def _perm_p(estimate: _Estimate) -> np.ndarray:
    """Two-sided ``(1 + #{|s_perm| >= |s|}) / (1 + P)`` of ``delta`` against ``null_perm``."""
    if estimate.null_perm is None:
        return np.full_like(estimate.delta, np.nan)
    null = estimate.null_perm
    extreme = (np.abs(null) >= np.abs(estimate.delta)[None] - 1e-12) & np.isfinite(null)
    p = (1 + extreme.sum(axis=0)) / (1 + len(null))
    return np.where(np.isfinite(estimate.delta), p, np.nan)


def _label_permutation_p(
    scorer: _Scorer,
    estimates: list[_Estimate],
    n_perm: int,
    seed: int,
    linear: bool,
    executor: Executor | None = None,
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
            differences, scorer.target, n_perm, seed, scorer.columns.combine, executor=executor
        ).p
    return p_perm


def _rows(
    common: dict[str, Any],
    columns: TargetColumns,
    estimate: _Estimate,
    p_labels: np.ndarray,
    options: LesionOptions,
    linear: bool,
) -> list[dict[str, Any]]:
    p_null, z_null = _null_stats(estimate.delta, estimate.null_random)
    p_group, _ = _null_stats(estimate.delta, estimate.null_group)
    null_low, null_high = null_interval(estimate.null_random, len(estimate.delta))
    return [
        common
        | {
            "group": estimate.group,
            "variant": estimate.variant,
            "target": target,
            "subject": subject,
            "n_filters": round(estimate.n_filters),
            "r_full": estimate.r_full[c],
            "r_variant": estimate.r_variant[c],
            "delta_r": estimate.delta[c],
            "p_null": p_null[c],
            "z_null": z_null[c],
            "n_null": options.n_null,
            "null_low": null_low[c],
            "null_high": null_high[c],
            "p_perm": p_labels[c],
            "n_perm": options.n_perm if linear else 0,
            "p_group": p_group[c],
            "n_group_null": options.n_group_null,
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


#: Quantiles of the null of ``delta_r`` reported as ``null_low`` and ``null_high``.
NULL_QUANTILES = (0.025, 0.975)


def null_interval(null: np.ndarray | None, n_columns: int) -> tuple[np.ndarray, np.ndarray]:
    """``null_low`` and ``null_high`` ``(T,)``: the 2.5% and 97.5% quantiles (numpy's linear
    interpolation) of each column's finite null draws of ``delta_r`` ``(N, T)``; NaN where a
    column has none or no null was drawn. The central 95% of the draws a ``delta_r`` is
    compared with by ``p_null``."""
    if null is None or len(null) == 0:
        nan = np.full(n_columns, np.nan)
        return nan, nan.copy()
    values = np.where(np.isfinite(null), null, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as wanted
        low, high = np.nanquantile(values, NULL_QUANTILES, axis=0)
    return np.asarray(low, dtype=float), np.asarray(high, dtype=float)


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
    drawn exactly as the RSA lesion draws them (root seed ``seed + group size``, in chunks of
    :data:`~object2brain.lesion.nulls.NULL_CHUNK`; uniform, or norm-matched with ``strata``),
    so both analyses test against the same subsets."""
    request = NullRequest(
        "random", seed + len(filters), n_null, n_filters, filters, variant == "lesion",
        strata=strata,
    )  # fmt: skip
    return request_masks(request)


def null_p_z(delta: np.ndarray, null: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided p and z of ``delta`` ``(T,)`` against ``null`` ``(N, T)``, as the RSA lesion's
    ``p_null`` and ``z_null``."""
    return _null_stats(delta, null)


def stratum_counts(strata: np.ndarray | None, filters: np.ndarray) -> tuple[int, ...]:
    """What a (matched) null depends on besides the group size (shared null draws)."""
    return _stratum_counts(strata, filters)


def fold_seed_shift(index: int) -> int:
    """What selection fold ``index``'s null subsets add to the root seed (cross-fitted
    selection): each fold draws its own subsets, the same in the RSA and encoding lesions."""
    return 100_003 * (index + 1)

"""``o2b.rsa`` (``object2brain rsa``): load the inputs -> compute the alignment -> write the tables
and ``manifest.json`` -> draw the figures.

The computation is :func:`object2brain.rsa.align.compute_alignment` on the shared analysis set
(:func:`object2brain.rsa.targets.build_analysis_set`); the options are
:class:`object2brain.options.RsaOptions`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from object2brain.activations.store import ActivationStore
from object2brain.data.brain import BrainData, load_brain
from object2brain.data.ratings import Ratings, load_ratings
from object2brain.data.stimuli import StimulusSet, load_stimuli
from object2brain.devices import resolve_device
from object2brain.errors import DataError
from object2brain.io import (
    check_output_folder,
    optional_staging,
    write_json,
    write_tables,
)
from object2brain.manifest import build_manifest, cached_file_sha256, output_list
from object2brain.options import OnMissing, RsaOptions, Runtime, resolve_options
from object2brain.rdm_file import RDM_FILE, RdmSet, write_rdm_file
from object2brain.rsa.align import AlignmentResult, Progress, compute_alignment
from object2brain.rsa.compare import check_method
from object2brain.rsa.rdm import check_metric
from object2brain.rsa.rdmset import analysis_rdms
from object2brain.rsa.targets import AnalysisSet, build_analysis_set

ActivationsArg = Sequence[str | Path] | str | Path
BrainArg = str | Path | BrainData | None
RatingsArg = str | Path | pd.DataFrame | Ratings | None
StimuliArg = str | Path | pd.DataFrame | StimulusSet | None


def rsa(
    activations: ActivationsArg,
    *,
    brain: BrainArg = None,
    ratings: RatingsArg = None,
    stimuli: StimuliArg = None,
    out: str | Path | None = None,
    options: RsaOptions | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    executor: str = "local",
    ray_address: str | None = None,
    figures: bool = True,
    behavior_ids: Sequence[str] | None = None,
    rdm_metric: str | None = None,
    compare_method: str | None = None,
    n_perm: int | None = None,
    n_boot: int | None = None,
    layers: Sequence[str] | None = None,
    on_missing: OnMissing | None = None,
    bootstrap: str | None = None,
    compare_models: str | Sequence[str] | None = None,
    brain_rdm: str | None = None,
    fdr_family: str | None = None,
    pairs: str | None = None,
    save_rdms: bool | None = None,
    contrast_scale: str | None = None,
    duplicate_ratings: str | None = None,
) -> AlignmentResult:
    """Align every layer of every model with behaviour and brain ROIs by RSA.

    Args:
        activations: one or more activation stores (.h5), one model each.
        brain: brain manifest (YAML), patterns/RDMs HDF5, or loaded :class:`BrainData`.
        ratings: long ratings table (``subject, stimulus_id, valence``).
        stimuli: stimulus table (``stimulus_id``, optional ``condition``, ``valence``); images
            are not opened. Default: the first store's ids, no conditions.
        out: output folder for tables, figures and ``manifest.json`` (nothing written if None).
        options: :class:`RsaOptions`; the option keywords below (when given) override it.
        seed: seed of every permutation and resample.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        progress: show a progress bar.
        executor: ``local`` | ``ray``: the blocks of Mantel permutations as tasks of a Ray
            cluster at ``ray_address`` (same p-values; :mod:`object2brain.executors`).
        figures: write the figures (when ``out`` is given).
        behavior_ids: the stimuli of the direct correlation of predicted with rated valence
            (``behavior_direct``; default: every analysed stimulus). When a valence head was
            fitted on some of the analysed stimuli, give the held-out ones (e.g. the ``test``
            split): on its own training stimuli a head's r is optimistic. Fewer than 3 in a
            condition give a NaN row.
        rdm_metric, compare_method, n_perm, n_boot, layers, on_missing, bootstrap,
            compare_models, brain_rdm, fdr_family, pairs, contrast_scale, save_rdms,
            duplicate_ratings: the fields of
            :class:`RsaOptions` (None: not given); ``save_rdms`` writes ``rdms.h5`` (every RDM
            of the analysis, :mod:`object2brain.rdm_file`) into ``out``.
    Returns:
        :class:`AlignmentResult` with the ``alignment``, ``behavior_direct``,
        ``condition_contrast``, ``alignment_group``, ``group_inference`` and
        ``model_comparison`` tables, and the files written.
    """
    given = {
        "rdm_metric": rdm_metric,
        "compare_method": compare_method,
        "n_perm": n_perm,
        "n_boot": n_boot,
        "layers": None if layers is None else list(layers),
        "on_missing": on_missing,
        "bootstrap": bootstrap,
        "compare_models": compare_models
        if compare_models is None or isinstance(compare_models, str)
        else list(compare_models),
        "brain_rdm": brain_rdm,
        "fdr_family": fdr_family,
        "pairs": pairs,
        "save_rdms": save_rdms,
        "contrast_scale": contrast_scale,
        "duplicate_ratings": duplicate_ratings,
    }
    check_counts(given, ("n_perm", "n_boot"))
    opts = resolve_rsa_options(options, given)
    runtime = Runtime(
        seed=seed, device=str(device), progress=progress, executor=executor,
        ray_address=ray_address,
    )  # fmt: skip
    if runtime.executor == "ray":
        from object2brain.executors import require_ray

        require_ray()  # before anything is read: one clear error without the extra
    if out is not None:
        check_output_folder(out)
    paths = store_paths(activations)
    with optional_staging(out) as staging, ExitStack() as stack:
        stores = [stack.enter_context(ActivationStore.open(p)) for p in paths]
        stimulus_set = stimulus_table(stimuli)
        table_ids = stimulus_set.ids if stimulus_set is not None else stores[0].stimulus_ids
        brain_data = load_brain(brain) if brain is not None else None
        analysis = build_analysis_set(
            stimulus_set,
            stores[0].stimulus_ids,
            brain=brain_data,
            ratings=load_ratings(ratings, table_ids, duplicates=opts.duplicate_ratings)
            if ratings is not None
            else None,
            rdm_metric=opts.rdm_metric,
            compare_method=opts.compare_method,
            device=resolve_device(runtime.device),
            on_missing=opts.on_missing,
            behavior_ids=behavior_ids,
            brain_rdm=opts.brain_rdm,
        )
        with progress_bar("rsa", progress) as bar:
            result = compute_alignment(stores, analysis, opts, runtime, progress=bar)
        if staging is not None:  # tables, figures, manifest: swapped in as a whole
            sources = {"brain": brain, "ratings": ratings, "stimuli": stimuli}
            config = _config(paths, sources, analysis, opts, str(device), behavior_ids)
            inputs = input_hashes(paths, sources.values(), _brain_sources(brain_data))
            result.summary["roi_voxels"] = roi_voxels(brain_data)  # the report's provenance
            rdms = analysis_rdm_set(result, analysis, opts, brain_data) if opts.save_rdms else None
            files = write_alignment(
                result, staging.folder, config, inputs, seed, figures=figures, rdms=rdms
            )
            result.files = staging.final(files)
    return result


def write_alignment(
    result: AlignmentResult,
    out: Path,
    config: dict[str, Any],
    inputs: dict[str, str],
    seed: int,
    *,
    figures: bool,
    rdms: RdmSet | None = None,
) -> list[Path]:
    """Write the four tables (``condition_contrast`` when not empty), ``rdms.h5`` (when
    ``rdms`` is given), the figures (via :mod:`object2brain.report.figures.alignment` and
    ``.rdms``) and ``manifest.json``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    optional = ("condition_contrast", "group_inference", "model_comparison")
    files = write_tables(
        out,
        {name: getattr(result, name) for name in ("alignment", "behavior_direct",
                                                   "alignment_group", *optional)},
        unless_empty=optional,
    )  # fmt: skip
    if figures:
        from object2brain.report.figures.alignment import alignment_figures

        files += alignment_figures(result.alignment, out / "figures")
    if rdms is not None:
        files.append(write_rdm_file(out / RDM_FILE, rdms))
        if figures:
            from object2brain.report.figures.rdms import rdm_figures

            files += rdm_figures(rdms, result.alignment, out / "figures")
    manifest = build_manifest(
        "rsa",
        config,
        seeds={"permutation": seed, "bootstrap": seed},
        inputs=inputs,
        outputs=output_list(files, out),
        extra=result.summary,
    )
    files.append(write_json(out / "manifest.json", manifest))
    return files


def analysis_rdm_set(
    result: AlignmentResult, analysis: AnalysisSet, options: RsaOptions, brain: BrainData | None
) -> RdmSet:
    """The RDMs of ``result`` for ``rdms.h5``, with each pattern ROI's voxel count."""
    voxels = {
        (item.subject, item.roi): int(item.data.shape[1])
        for item in (brain.items if brain is not None else [])
        if item.kind == "patterns"
    }
    return analysis_rdms(
        analysis,
        result.model_rdms,
        rdm_metric=options.rdm_metric,
        compare_method=options.compare_method,
        n_voxels=voxels,
    )


# --- shared by the edges of the RSA stages (rsa, lesion) ----------------------------------------


def roi_voxels(brain: BrainData | None) -> dict[str, dict[str, int]]:
    """ROI -> subject -> voxels analysed (after resampling, masking and dropping non-finite or
    constant voxels); ROIs given as RDMs have no voxel count and are left out."""
    counts: dict[str, dict[str, int]] = {}
    for item in brain.items if brain is not None else []:
        if item.kind == "patterns":
            counts.setdefault(item.roi, {})[item.subject] = int(item.data.shape[1])
    return counts


def check_counts(values: dict[str, Any], names: Sequence[str]) -> None:
    """The messages of negative resampling counts, before the options model sees them."""
    if any(values.get(name) is not None and values[name] < 0 for name in names):
        flags = " and ".join("--" + name.replace("_", "-") for name in names)
        raise DataError(f"{flags} must be >= 0")


def resolve_rsa_options(options: RsaOptions | None, given: dict[str, Any]) -> RsaOptions:
    """``options`` with the keywords given (not None), the RDM metric and comparison checked
    with their own messages first."""
    values = {key: value for key, value in given.items() if value is not None}
    if "rdm_metric" in values:
        check_metric(values["rdm_metric"])
    if "compare_method" in values:
        check_method(values["compare_method"])
    return resolve_options(RsaOptions, options, **values)


def store_paths(activations: ActivationsArg) -> list[Path]:
    """The activation store paths of ``activations`` (one path or several)."""
    if isinstance(activations, str | Path):
        return [Path(activations)]
    paths = [Path(p) for p in activations]
    if not paths:
        raise DataError("no activation stores given (--activations)")
    return paths


def stimulus_table(source: StimuliArg) -> StimulusSet | None:
    """The stimulus table of ``source`` (file, DataFrame or set; images not opened)."""
    if source is None or isinstance(source, StimulusSet):
        return source
    return load_stimuli(source, check="table")


@contextmanager
def progress_bar(name: str, enabled: bool) -> Iterator[Progress | None]:
    """A ``progress(done, total)`` callback drawing a tqdm bar (None when disabled)."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(desc=name, unit="analysis")

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def describe_source(source: object) -> str | None:
    """A path as text, or the ``source`` of a loaded object, or its type name."""
    if source is None:
        return None
    if isinstance(source, str | Path):
        return str(source)
    origin = getattr(source, "source", None)
    return str(origin) if origin is not None else type(source).__name__


def input_hashes(
    paths: Sequence[Path], sources: Iterable[object], more: Sequence[Path] = ()
) -> dict[str, str]:
    """SHA-256 of every input file: ``paths``, the ``sources`` given as existing file paths,
    then ``more`` (e.g. the files behind a brain manifest)."""
    files = list(paths)
    for source in sources:
        if isinstance(source, str | Path) and Path(source).is_file():
            files.append(Path(source))
    files += more
    return {str(p): cached_file_sha256(p) for p in dict.fromkeys(files) if p.is_file()}


def _brain_sources(brain: BrainData | None) -> list[Path]:
    if brain is None:
        return []
    return [Path(s) for s in dict.fromkeys(item.source for item in brain.items)]


def _config(
    paths: list[Path],
    sources: dict[str, Any],
    analysis: AnalysisSet,
    options: RsaOptions,
    device: str,
    behavior_ids: Sequence[str] | None,
) -> dict[str, Any]:
    return {
        "activations": [str(p) for p in paths],
        "brain": describe_source(sources["brain"]),
        "ratings": describe_source(sources["ratings"]),
        "stimuli": analysis.where,
        "rdm_metric": options.rdm_metric,
        "compare_method": options.compare_method,
        "n_perm": options.n_perm,
        "n_boot": options.n_boot,
        "device": device,
        "layers": list(options.layers) if options.layers is not None else "all",
        "on_missing": options.on_missing,
        "bootstrap": options.bootstrap,
        "compare_models": options.compare_models,
        "behavior_ids": None if behavior_ids is None else sorted(behavior_ids),
    } | _new_options(options)


def _new_options(options: RsaOptions) -> dict[str, Any]:
    """Options recorded in the manifest only when they differ from their default (so the
    manifests of analyses that do not use them stay as they were)."""
    defaults = RsaOptions()
    names = ("brain_rdm", "fdr_family", "pairs", "save_rdms", "contrast_scale", "duplicate_ratings")
    return {
        name: getattr(options, name)
        for name in names
        if getattr(options, name) != getattr(defaults, name)
    }

"""Every stage option, declared once.

One frozen pydantic model per stage is the only place where an option's name, type, allowed
values, default and help text are written. Everything else is derived from these models:

- the study config (``object2brain run STUDY.yaml``): a stage's section *is* its options model
  (:mod:`object2brain.pipeline.config`);
- the command line: one ``--flag`` per field (:mod:`object2brain.cli`), the flag being the field
  name with dashes, or the ``cli`` name given in the field's ``json_schema_extra``;
- the Python API: keyword arguments of ``o2b.<stage>(...)`` are validated by the same model
  (:func:`resolve_options`).

The run context that every stage shares (random seed, compute device, progress bars) is
:class:`Runtime`, not an option of a stage. Inputs (files, models, stimuli) are not options either:
they are the arguments of the stages.

This module imports nothing heavy (no torch, no numpy), so ``object2brain --help`` stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from object2brain.errors import Object2BrainError

# --- vocabularies (every list of allowed values lives here) --------------------------------

RdmMetric = Literal["correlation", "euclidean", "cosine"]
CompareMethod = Literal[
    "spearman", "pearson", "kendall_tau_a", "rho_a", "cosine", "corr_cov", "cosine_cov"
]
StorageDtype = Literal["float32", "float16"]
AmpDtype = Literal["bfloat16", "float16"]
DecodeMode = Literal["pil", "torch", "auto"]
LossName = Literal["weighted_mse", "mse"]
Direction = Literal["positive", "negative", "abs"]
Variant = Literal["lesion", "keep"]
NullKind = Literal["random", "matched"]
#: How lesion groups are selected relative to the stimuli their effects are measured on.
Selection = Literal["cross_fit", "same"]
OnMissing = Literal["error", "intersect"]
ExecutorKind = Literal["local", "ray"]
ValenceSource = Literal["stimuli", "ratings"]
PermNull = Literal["predictions", "refit", "fixed_alpha", "refit_tail"]
LesionAnalysis = Literal["rsa", "encoding", "both"]
BrainRdm = Literal["crossnobis", "crossvalidated_euclidean"]
FdrFamily = Literal["model", "models", "study"]
Pairs = Literal["all", "within"]
ContrastScale = Literal["raw", "noise_ceiling"]
DuplicateRatings = Literal["error", "mean"]

RDM_METRICS: tuple[str, ...] = get_args(RdmMetric)
COMPARE_METHODS: tuple[str, ...] = get_args(CompareMethod)
DECODE_MODES: tuple[str, ...] = get_args(DecodeMode)
LOSSES: tuple[str, ...] = get_args(LossName)
VARIANTS: tuple[str, ...] = get_args(Variant)
NULL_KINDS: tuple[str, ...] = get_args(NullKind)
SELECTIONS: tuple[str, ...] = get_args(Selection)


def _known(noun: str, allowed: tuple[str, ...]) -> BeforeValidator:
    """A validator naming what a value is when it is not one of ``allowed``."""

    def check(value: Any) -> Any:
        if isinstance(value, str) and value not in allowed:
            raise ValueError(f"unknown {noun} {value!r}; choose one of {', '.join(allowed)}")
        return value

    return BeforeValidator(check)


#: Option types of the vocabularies whose unknown values are named in the error message.
RdmMetricOption = Annotated[RdmMetric, _known("RDM metric", RDM_METRICS)]
CompareMethodOption = Annotated[CompareMethod, _known("comparison method", COMPARE_METHODS)]


#: Upper bound of resampling counts (permutations, bootstrap resamples, null subsets): beyond it a
#: run would not finish in a lifetime on any machine, so a larger value is a typo.
MAX_RESAMPLES = 10_000_000


class OptionsError(Object2BrainError):
    """Options that cannot be used (names the option and the problem)."""


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read true as 1
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def _finite(value: float) -> float:
    """After parsing, so that ``"nan"``, ``"-inf"`` and ``1e400`` (text from a YAML file or an API
    call, parsed by pydantic) are refused like the float ``nan``."""
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    return value


Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean), AfterValidator(_finite)]
Count = Annotated[Int, Field(ge=0, le=MAX_RESAMPLES)]


def _cli(flag: str | None) -> dict[str, Any]:
    """``json_schema_extra`` naming a field's command-line flag (``None``: no flag)."""
    return {"cli": flag}


class StageOptions(BaseModel):
    """Base of the stage models: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RatingsOptions(StageOptions):
    """What the stages reading a ratings table (rsa, lesion, encode; a study's train-head with
    ``ratings: ratings``) share: how repeated ratings are treated."""

    duplicate_ratings: DuplicateRatings = Field(
        "error",
        description=(
            "Rows repeating a (subject, stimulus_id) pair in the ratings: error (default; a "
            "repeat is usually a merge mistake) | mean (average them)."
        ),
    )


class Runtime(BaseModel):
    """What every stage shares: the root seed, the compute device, progress bars."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: Int = Field(0, description="Random seed (random weights, projections, statistics).")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    progress: bool = Field(True, description="Progress bars.", json_schema_extra=_cli(None))
    executor: ExecutorKind = Field(
        "local",
        description=(
            "Where independent chunks run: local (this process) | ray (a Ray cluster; needs "
            "the extra 'ray' of object2brain)."
        ),
    )
    ray_address: str | None = Field(
        None,
        description=(
            "Ray cluster address with --executor ray: auto (the cluster of this machine), "
            "ray://HOST:10001; default: start a local one."
        ),
    )


class ExtractOptions(StageOptions):
    """``extract``: activations of every stimulus into an activation store."""

    batch_size: Int = Field(32, ge=1, description="Images per batch.")
    dtype: StorageDtype = Field("float32", description="Storage precision.")
    srp: Int | None = Field(
        None, ge=1, description="Sparse random projection of each layer to DIM features."
    )
    amp: AmpDtype | None = Field(
        None,
        validation_alias=AliasChoices("amp", "amp_dtype"),
        description="Mixed precision on CUDA (values stored as float32 / --dtype).",
    )
    channels_last: bool = Field(
        True,
        description=(
            "Network and inputs in the channels_last memory format (faster convolutions on CPUs "
            "and tensor-core GPUs); --no-channels-last: the contiguous layout (values differ by "
            "float rounding, ~3e-6 of a layer's largest value)."
        ),
    )
    fold_batchnorm: bool = Field(
        False,
        description=(
            "Fold eval-mode batch norms into the convolutions before them (faster; values "
            "equal up to float rounding, ~2e-6 of a layer's largest value on resnet18)."
        ),
    )
    quantize: Literal["none", "int8"] = Field(
        "none",
        description=(
            "none | int8: post-training static int8 quantization on the CPU (x86 backend, "
            "calibrated on the first 64 stimuli by id; recorded layers dequantized to float32; "
            "faster, values differ by a few % of a layer's largest value, docs/methods.md)."
        ),
    )
    decode: DecodeMode = Field("pil", description="pil | torch (plain JPEGs on the device) | auto.")
    num_workers: Int | None = Field(
        None,
        ge=0,
        description="Image decoding worker processes (0: in the main process; default: by cores).",
        json_schema_extra=_cli("--workers"),
    )
    image_cache: Path | None = Field(
        None,
        description=(
            "Decoded-image cache folder: model-resolution pixels kept across runs "
            "(same preprocessing: no decoding)."
        ),
    )


class TrainHeadOptions(StageOptions):
    """``train-head``: a one-output valence head on a frozen backbone."""

    loss: LossName = Field("weighted_mse", description="weighted_mse | mse")
    augment: bool = Field(
        False, description="Random crop + flip (features recomputed every epoch)."
    )
    epochs: Int = Field(100, ge=1, description="Maximum epochs.")
    patience: Int = Field(10, ge=1, description="Early-stopping patience (epochs).")
    lr: Float = Field(1e-3, gt=0, description="Adam learning rate.")
    weight_decay: Float = Field(
        0.0, ge=0, description="Adam's L2 penalty on the head.", json_schema_extra=_cli(None)
    )
    batch_size: Int = Field(32, ge=1, description="Images per batch.")
    fractions: tuple[Float, Float, Float] = Field(
        (0.8, 0.1, 0.1),
        description="Train, val and test shares of a new split (stratified by valence level).",
        json_schema_extra=_cli(None),
    )
    cache: bool = Field(
        True,
        description=(
            "Compute the penultimate features once and keep them in an activation store "
            "(<out>/<model>/features.h5); off: through the backbone every epoch."
        ),
        json_schema_extra=_cli(None),
    )
    num_workers: Int | None = Field(
        None,
        ge=0,
        description="Image decoding worker processes (0: in the main process; default: by cores).",
        json_schema_extra=_cli(None),
    )
    image_cache: Path | None = Field(
        None,
        description=(
            "Decoded-image cache folder for the backbone's feature pass (as extract's; "
            "not used for augmented training images)."
        ),
    )
    cross_fit: Int | None = Field(
        None,
        ge=0,
        description=(
            "K >= 2: also K fold heads whose out-of-fold predictions are written "
            "(out_of_fold.csv); 0: off. Default: 5 in a study (heads fitted on the study's own "
            "stimuli), 0 for train-head alone."
        ),
    )
    selection_folds: Int | None = Field(
        None,
        ge=0,
        description=(
            "K >= 2: also K selection fold heads, head k fitted without the stimuli of selection "
            "fold k (folds stratified by condition, as dissect --selection-folds with the same "
            "seed), saved as <model>/head.fold<k>.safetensors for dissect --fold-heads; 0: none. "
            "Default: in a study with a cross-fitted dissection, its selection folds; else 0."
        ),
    )
    ratings: ValenceSource = Field(
        "stimuli",
        description="In a study: train on the stimulus table's valence or the mean rating.",
        json_schema_extra=_cli(None),
    )

    @field_validator("cross_fit", "selection_folds")
    @classmethod
    def _folds(cls, value: int | None) -> int | None:
        if value == 1:
            raise ValueError("use 0 (off) or 2 or more folds")
        return value

    def folds(self, *, in_study: bool) -> int:
        """The number of cross-fitting folds: the option, or its default for the context."""
        if self.cross_fit is not None:
            return self.cross_fit
        return 5 if in_study else 0


class RsaOptions(RatingsOptions):
    """``rsa``: every layer against behaviour and brain ROIs."""

    rdm_metric: RdmMetricOption = Field(
        "correlation",
        validation_alias=AliasChoices("rdm_metric", "rdm"),
        description="correlation | euclidean | cosine",
        json_schema_extra=_cli("--rdm"),
    )
    compare_method: CompareMethodOption = Field(
        "spearman",
        validation_alias=AliasChoices("compare_method", "compare"),
        description="spearman | pearson | kendall_tau_a | rho_a | cosine | corr_cov | cosine_cov",
        json_schema_extra=_cli("--compare"),
    )
    brain_rdm: BrainRdm | None = Field(
        None,
        description=(
            "crossnobis | crossvalidated_euclidean: ROI RDMs cross-validated over the runs of "
            "run-wise patterns (default: --rdm of each stimulus' mean pattern)."
        ),
    )
    n_perm: Count = Field(
        10_000,
        description=(
            "Permutations (Mantel p_perm; relabellings of group_inference's p in stimuli rows, "
            "0: its score test)."
        ),
    )
    n_boot: Count = Field(1_000, description="Bootstrap resamples.")
    pairs: Pairs = Field(
        "all",
        description=(
            "all | within: the 'all' rows compare only pairs of stimuli of the same condition "
            "(stratified permutations and resamples)."
        ),
    )
    fdr_family: FdrFamily = Field(
        "model",
        description=(
            "Benjamini-Hochberg families: model (layers x targets of one model, condition and "
            "subject level) | models (all models together) | study (the whole table: models, "
            "conditions and subject levels together)."
        ),
    )
    layers: list[str] | None = Field(
        None, description="Layers to analyse (default: all).", json_schema_extra=_cli(None)
    )
    on_missing: OnMissing = Field(
        "error",
        description="Stimuli missing from brain data: error | intersect.",
        json_schema_extra=_cli(None),
    )
    # group inference (two-factor bootstrap, model comparisons)
    bootstrap: Literal["stimuli", "subjects", "both"] | None = Field(
        None,
        description=(
            "Group inference resamples stimuli | subjects | both (default: both for a target "
            "with >= 3 subjects, else stimuli)."
        ),
    )
    save_rdms: bool = Field(
        True,
        description=(
            "Write rdms.h5 (every RDM of the analysis, float64 upper triangles: "
            "8 n (n - 1) / 2 bytes each, 4 MB per RDM at n = 1000)."
        ),
    )
    compare_models: str | list[str] = Field(
        "best",
        description=(
            "Model comparisons: best (each model's best layer by 5-fold cross-validation over "
            "stimuli: chosen on the training folds, scored on the held-out fold) | valence | "
            "model:layer,model:layer,..."
        ),
    )
    contrast_scale: ContrastScale = Field(
        "raw",
        description=(
            "Condition contrasts: raw (r_a - r_b) | noise_ceiling (r_a / nc_a - r_b / nc_b, each "
            "r over its condition's upper noise ceiling; p_perm is then NaN)."
        ),
    )


class DissectOptions(StageOptions):
    """``dissect``: per-filter Grad-CAM x object detections (EmoCAM++)."""

    layer: str | dict[str, str] = Field(
        description=(
            "Layer with spatial maps (dotted name); in a study, one per model: {model: layer}."
        )
    )
    detector: str = Field(
        "opencv", description="opencv | fasterrcnn | retinanet | fcos | ssdlite | boxes:FILE"
    )
    groups: Path | None = Field(None, description="Class -> group map (YAML).")
    direction: Direction = Field("positive", description="positive | negative | abs")
    target: Int | None = Field(
        None, description="Output unit to explain without a head (e.g. ImageNet class)."
    )
    threshold: Float = Field(1.5, description="Minimum enrichment for an assignment.")
    min_images: Int = Field(5, ge=1, description="Images a group must be detected in.")
    n_null_assign: Int = Field(
        1000,
        ge=1,
        le=MAX_RESAMPLES,
        description="Null draws of the assignment test (boxes of other images; p_assign).",
    )
    selection_folds: Int = Field(
        2,
        ge=0,
        description=(
            "Also assign filters once per selection fold without that fold's images (rows with "
            "fold = k, for lesion --selection cross_fit; same folds as lesion --selection-folds "
            "and the same seed); 0: only the all-images rows."
        ),
    )
    batch_size: Int = Field(16, ge=1, description="Images per batch.")
    decode: DecodeMode = Field("pil", description="pil | torch (plain JPEGs on the device) | auto.")
    num_workers: Int | None = Field(
        None,
        ge=0,
        description="Image decoding worker processes (default: by cores).",
        json_schema_extra=_cli("--workers"),
    )
    detection_cache: Path | None = Field(
        None,
        description=(
            "Folder of the detection cache (keyed by image content and detector settings; "
            "default: $XDG_CACHE_HOME/object2brain/detections, else "
            "~/.cache/object2brain/detections)."
        ),
    )
    image_cache: Path | None = Field(
        None,
        description=(
            "Decoded-image cache folder: model-resolution pixels kept across runs "
            "(same preprocessing: no decoding)."
        ),
    )
    fold_heads: Path | None = Field(
        None,
        description=(
            "Folder of selection fold heads (head.fold<k>.safetensors with sidecars naming the "
            "held-out stimuli, from train-head --selection-folds): fold k's Grad-CAM maps come "
            "from the head that did not see fold k, and the selection folds are the heads' folds."
        ),
    )
    gallery_filters: Int = Field(
        3,
        ge=0,
        description="Filters per group in the gallery figure.",
        json_schema_extra=_cli(None),
    )
    gallery_images: Int = Field(
        4,
        ge=0,
        description="Images per filter in the gallery figure.",
        json_schema_extra=_cli(None),
    )

    @field_validator("selection_folds")
    @classmethod
    def _selection_folds(cls, value: int) -> int:
        if value == 1:
            raise ValueError("use 0 (off) or 2 or more folds")
        return value

    def layer_for(self, model: str) -> str:
        """The layer to dissect in ``model``."""
        if isinstance(self.layer, str):
            return self.layer
        if model not in self.layer:
            raise OptionsError(f"dissect.layer: no layer given for model {model!r}")
        return self.layer[model]


_BOTH_VARIANTS: tuple[Variant, Variant] = ("lesion", "keep")


class LesionOptions(RatingsOptions):
    """``lesion``: Object2Brain, lesion or keep only each object group's filters."""

    variants: list[Variant] = Field(
        default_factory=lambda: list(_BOTH_VARIANTS),
        min_length=1,
        description="lesion and/or keep.",
        json_schema_extra=_cli("--variant"),
    )
    n_null: Count = Field(1000, description="Random filter subsets (p_null).")
    null_subsets: NullKind = Field(
        "random", description="random | matched (null subsets matched on filter norm)."
    )
    n_perm: Count = Field(1000, description="Stimulus-label permutations (p_perm).")
    n_group_null: Count = Field(
        1000,
        description=(
            "Filter subsets matched to the group on norm and single-filter alignment (p_group)."
        ),
    )
    selection: Selection = Field(
        "cross_fit",
        description=(
            "cross_fit: groups chosen without the held-out fold's stimuli, effects measured on "
            "it (needs a filter table with a fold column, else falls back to same); same: "
            "groups and effects on the same stimuli (circular)."
        ),
    )
    selection_folds: Int = Field(
        2, ge=2, description="Folds of stimuli for --selection cross_fit (stratified by condition)."
    )
    propagate: bool = Field(False, description="Zero the filters inside the forward pass.")
    groups: list[str] | None = Field(
        None, description="Restrict to these object groups.", json_schema_extra=_cli("--group")
    )
    layers: list[str] | None = Field(
        None, description="Layer(s) to analyse (default: all).", json_schema_extra=_cli("--layer")
    )
    rdm_metric: RdmMetricOption = Field(
        "correlation",
        validation_alias=AliasChoices("rdm_metric", "rdm"),
        description="correlation | euclidean | cosine",
        json_schema_extra=_cli("--rdm"),
    )
    compare_method: CompareMethodOption = Field(
        "spearman",
        validation_alias=AliasChoices("compare_method", "compare"),
        description="spearman | pearson | kendall_tau_a | rho_a | cosine | corr_cov | cosine_cov",
        json_schema_extra=_cli("--compare"),
    )
    batch_size: Int = Field(32, ge=1, description="Images per batch (with --propagate).")
    image_cache: Path | None = Field(
        None,
        description="Decoded-image cache folder for --propagate's forward passes (as extract's).",
    )
    analysis: LesionAnalysis = Field(
        "rsa",
        description=(
            "rsa | encoding | both: lesion the RSA (RDM correlation) and/or the encoding models "
            "(ROI mean r of out-of-fold ridge predictions; needs brain patterns or ratings)."
        ),
    )


class SimulateOptions(StageOptions):
    """``simulate``: ratings and ROI patterns with a planted truth from an activation store."""

    rois: list[str] = Field(
        min_length=1,
        description=(
            "NAME=SOURCE[;snr=X;voxels=N;gain.COND=G], SOURCE = layer:L | filters:L:k1,k2 | "
            "valence | condition:C. Repeat for several ROIs."
        ),
        json_schema_extra=_cli("--roi"),
    )
    n_subjects: Int = Field(
        8, ge=1, description="Simulated subjects.", json_schema_extra=_cli("--subjects")
    )
    rating_noise: Float = Field(1.0, ge=0, description="SD of each rater's noise.")
    continuous_ratings: bool = Field(
        False,
        description="Keep ratings continuous (no -3..3 rounding).",
        json_schema_extra=_cli("--continuous"),
    )
    valence_source: str | None = Field(
        None, description="layer:L or valence, when the stimulus table has none."
    )


class FetchOptions(StageOptions):
    """``findingemo fetch``: download FindingEmo's images from their published URLs."""

    workers: Int = Field(8, ge=1, description="Download threads.")
    timeout: Float = Field(
        20.0, gt=0, description="Socket timeout in seconds, per connection and per read."
    )
    retries: Int = Field(
        2,
        ge=0,
        description="Extra attempts per URL after a transient failure (timeout, 429, 5xx).",
    )
    per_host: Int = Field(2, ge=1, description="Most concurrent requests to one host.")
    backoff: Float = Field(
        1.0, ge=0, description="Base of the exponential backoff between retries (seconds)."
    )
    archive_fallback: bool = Field(
        False,
        description="After every listed URL of an image failed, try the Wayback Machine's copy.",
    )


#: Every stage's options model by stage name (the pipeline's and the CLI's names).
STAGE_OPTIONS: dict[str, type[StageOptions]] = {
    "extract": ExtractOptions,
    "train_head": TrainHeadOptions,
    "rsa": RsaOptions,
    "dissect": DissectOptions,
    "lesion": LesionOptions,
    "simulate": SimulateOptions,
}

OptionsT = TypeVar("OptionsT", bound=BaseModel)


def cli_flag(model: type[BaseModel], name: str) -> str | None:
    """The command-line flag of field ``name``: ``json_schema_extra["cli"]`` when given (``None``:
    the field has no flag), else ``--`` + the name with dashes."""
    info = model.model_fields.get(name)
    extra = info.json_schema_extra if info is not None else None
    if isinstance(extra, dict) and "cli" in extra:
        flag = extra["cli"]
        return flag if isinstance(flag, str) else None
    return "--" + name.replace("_", "-")


def as_flags(model: type[BaseModel], message: str) -> str:
    """An :class:`OptionsError` message with each field named by its flag:
    ``num_workers: problem; srp: problem`` -> ``--workers: problem; --srp: problem``."""
    parts = []
    for part in message.split("; "):
        key, _, problem = part.partition(": ")
        parts.append(f"{cli_flag(model, key) or key}: {problem}")
    return "; ".join(parts)


def describe_error(error: Mapping[str, Any]) -> str:
    """One pydantic error as ``key.path: problem``."""
    location = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{location}: {message}"


def resolve_options(
    model: type[OptionsT], options: OptionsT | None = None, /, **values: Any
) -> OptionsT:
    """``options`` updated by ``values`` (keyword arguments of an API call), validated.

    Raises:
        OptionsError: naming each option at fault, all at once.
    """
    try:
        if options is None:
            return model.model_validate(values)
        if not values:
            return options
        return model.model_validate({**options.model_dump(), **values})
    except ValidationError as exc:
        raise OptionsError("; ".join(describe_error(e) for e in exc.errors())) from None


def _default_alphas() -> list[float]:
    """``logspace(-2, 7, 19)``: 10^-2, 10^-1.5, ..., 10^7."""
    return [10.0 ** (-2.0 + 0.5 * i) for i in range(19)]


class EncodeOptions(RatingsOptions):
    """``encode``: cross-validated ridge from every layer to every voxel (encoding models)."""

    folds: Int = Field(5, ge=2, description="Outer cross-validation folds over stimuli.")
    inner_folds: Int = Field(
        5, ge=2, description="Inner folds (inside each training set) that choose the penalty."
    )
    alphas: list[Float] = Field(
        default_factory=_default_alphas,
        min_length=1,
        description="Ridge penalties to choose from, per voxel (default logspace(-2, 7, 19)).",
    )
    reduce: str = Field(
        "none",
        description="none | srp:DIM | pca:DIM (PCA fitted on the training folds only).",
    )
    banded: list[str] | None = Field(
        None,
        description="Layers of a banded ridge across layers (2 or more, or 'all'); default off.",
    )
    n_iter: Int = Field(
        100, ge=1, description="Random-search samples of the band weights (banded ridge)."
    )
    n_perm: Count = Field(1000, description="Permutations of the ROI's mean r.")
    perm_null: PermNull = Field(
        "predictions",
        description=(
            "predictions: permute the out-of-fold predictions within folds (fast, conservative) "
            "| refit: relabel the responses and rerun the cross-validation (exact, calibrated; up "
            "to n_perm refits per layer and ROI, from precomputed maps on --device in float64; "
            "see perm_stop) | fixed_alpha: relabel the responses and refit each voxel with the "
            "alphas its real responses chose (no inner alpha search; measured conservative like "
            "predictions: validation/encoding_fixed_alpha_null.md) | refit_tail: refit, and a p at "
            "its floor 1/(n_perm+1) (no refit reached the observed r) extended by a normal fit of "
            "the same refits (Student t); meant for a small n_perm such as 59 (exact at levels "
            ">= 1/(n_perm+1))."
        ),
    )
    perm_stop: Count = Field(
        10,
        description=(
            "refit, fixed_alpha, refit_tail: sequential p (Besag & Clifford 1991): stop a "
            "test's refits once this many null values reach the observed mean r, p = stop / "
            "refits (0: all n_perm)."
        ),
    )
    standardize: bool = Field(
        False,
        description=(
            "z-score each feature with the mean and sd of the training folds only (before PCA)."
        ),
        json_schema_extra=_cli("--standardize/--no-standardize"),
    )
    keep_weights: bool = Field(
        False,
        description=(
            "Keep every fold's fitted weights (features x voxels, per layer and ROI) in the "
            "result (API only; nothing written needs them)."
        ),
        json_schema_extra=_cli(None),
    )
    layers: list[str] | None = Field(
        None, description="Layers to analyse (default: all).", json_schema_extra=_cli(None)
    )

    @field_validator("alphas")
    @classmethod
    def _positive_alphas(cls, value: list[float]) -> list[float]:
        if any(a <= 0 for a in value):
            raise ValueError("every alpha must be > 0")
        return sorted(set(value))

    @field_validator("reduce")
    @classmethod
    def _reduction(cls, value: str) -> str:
        kind, _, dim = value.strip().lower().partition(":")
        if kind == "none" and not dim:
            return "none"
        if kind in ("srp", "pca") and dim.isdigit() and int(dim) >= 1:
            return f"{kind}:{int(dim)}"
        raise ValueError(f"expected none, srp:DIM or pca:DIM (DIM >= 1), got {value!r}")

    @field_validator("banded", mode="before")
    @classmethod
    def _split_bands(cls, value: Any) -> Any:
        """``l1,l2`` (one comma-separated flag or string) as well as a list or repeated flags."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        return value

    @field_validator("banded")
    @classmethod
    def _bands(cls, value: list[str] | None) -> list[str] | None:
        if value is None or value == ["all"]:
            return value
        if len(value) < 2 or len(set(value)) != len(value):
            raise ValueError("give 2 or more distinct layers, or 'all'")
        return value

    def reduction(self) -> tuple[str, int | None]:
        """``("none", None)``, ``("srp", DIM)`` or ``("pca", DIM)``."""
        kind, _, dim = self.reduce.partition(":")
        return kind, (int(dim) if dim else None)

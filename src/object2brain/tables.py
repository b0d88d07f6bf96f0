"""Every result table's schema: name, columns in order, and what each column means.

Stages build their tables with these column lists, :mod:`object2brain.report` reads them through
this module (never through a stage), and ``docs/formats.md`` is generated from it
(``python -m object2brain.reference``), so the three cannot drift apart.

Tables are written as ``<name>.csv`` and ``<name>.parquet`` into a command's ``--out`` folder:
tidy, one row per estimate. Column types are ``str``, ``int``, ``float`` or ``bool``; a ``float``
that cannot be computed (too few stimuli or subjects, a constant RDM) is NaN (an empty CSV cell).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """One column: its name, type (``str``, ``int``, ``float``, ``bool``) and meaning."""

    name: str
    dtype: str
    description: str


@dataclass(frozen=True)
class TableSchema:
    """One result table: its file name (without suffix), the stage that writes it, what one row
    is, and its columns in order.

    ``required`` names the columns a reader (the report) insists on, when that is fewer than all
    of them; ``None``: every column but those in ``added`` (columns later versions added, which
    tables written by earlier versions lack).
    """

    name: str
    stage: str
    row: str
    columns: tuple[Column, ...]
    required: tuple[str, ...] | None = None
    added: tuple[str, ...] = ()

    @property
    def column_names(self) -> list[str]:
        """The column names, in order."""
        return [column.name for column in self.columns]

    @property
    def required_columns(self) -> list[str]:
        """The columns a reader of this table requires, in order."""
        if self.required is not None:
            return list(self.required)
        return [name for name in self.column_names if name not in self.added]


def _c(name: str, dtype: str, description: str) -> Column:
    return Column(name, dtype, description)


_MODEL = _c("model", "str", "model label (activation store attribute `model`)")
_LAYER = _c("layer", "str", "dotted module name of the layer, or `valence` (predicted valence)")
_LAYER_INDEX = _c("layer_index", "int", "0-based position of the layer in network order")
_TARGET = _c("target", "str", "ROI name, or `behavior` (valence ratings)")
_TARGET_KIND = _c("target_kind", "str", "`roi` or `behavior`")
_SUBJECT = _c(
    "subject",
    "str",
    "subject or rater id; `group` = mean over subjects; `group_rdm` = vs the group RDM",
)
_LESION_SUBJECT = _c(
    "subject", "str", "subject or rater id; `group` = mean over the subjects with a defined r"
)
_CONDITION = _c("condition", "str", "`all` (every stimulus) or a value of the `condition` column")
_RDM_METRIC = _c("rdm_metric", "str", "dissimilarity of the model RDM and brain RDMs")
_COMPARE = _c("compare_method", "str", "RDM comparison (upper triangles)")
_N_PERM = _c("n_perm", "int", "permutations behind the permutation p")

ALIGNMENT = TableSchema(
    "alignment",
    "rsa",
    "one model layer against one target, subject level and condition",
    (
        _MODEL,
        _LAYER,
        _LAYER_INDEX,
        _TARGET,
        _TARGET_KIND,
        _SUBJECT,
        _CONDITION,
        _RDM_METRIC,
        _COMPARE,
        _c("r", "float", "correlation of the layer RDM with the target RDM"),
        _c("p_perm", "float", "one-sided Mantel p, (1 + #{r_perm >= r}) / (1 + n_perm)"),
        _c(
            "p_fdr",
            "float",
            "Benjamini-Hochberg over the (layer, target) tests of one model, condition and "
            "subject level",
        ),
        _c(
            "ci_low",
            "float",
            "lower bound of the 95% interval r - t_(n-1) se, se from the stimulus bootstrap "
            "with its pair excess removed (jackknife-corrected; stratified by condition with "
            "--pairs within)",
        ),
        _c("ci_high", "float", "upper bound of that interval, r + t_(n-1) se"),
        _c("nc_low", "float", "lower noise ceiling of the target (NaN with < 2 subjects)"),
        _c("nc_high", "float", "upper noise ceiling of the target (NaN with < 2 subjects)"),
        _c("n_stimuli", "int", "stimuli in the condition"),
        _N_PERM,
    ),
)

ALIGNMENT_GROUP = TableSchema(
    "alignment_group",
    "rsa",
    "the per-subject r of one layer, target and condition summarised over subjects",
    (
        _MODEL,
        _LAYER,
        _LAYER_INDEX,
        _TARGET,
        _TARGET_KIND,
        _CONDITION,
        _c("mean_r", "float", "mean of the per-subject r"),
        _c("sem", "float", "standard error of that mean, sd / sqrt(n_subjects)"),
        _c("n_subjects", "int", "subjects with a defined r"),
        _c("t", "float", "one-sample t statistic of the per-subject r against 0"),
        _c("p_t", "float", "one-sided p of that t test (r > 0)"),
        _c("p_t_fdr", "float", "Benjamini-Hochberg of p_t over layers x targets"),
    ),
)

BEHAVIOR_DIRECT = TableSchema(
    "behavior_direct",
    "rsa",
    "predicted valence (layer `valence`) against the group-mean rated valence",
    (
        _MODEL,
        _CONDITION,
        _c("method", "str", "`pearson` or `spearman`"),
        _c("r", "float", "correlation of predicted and rated valence"),
        _c("p", "float", "two-sided permutation p"),
        _c("ci_low", "float", "2.5% percentile of the stimulus bootstrap"),
        _c("ci_high", "float", "97.5% percentile of the stimulus bootstrap"),
        _c("n", "int", "stimuli"),
    ),
)

CONDITION_CONTRAST = TableSchema(
    "condition_contrast",
    "rsa",
    "the difference r_a - r_b between two conditions for one layer, target and subject level",
    (
        _MODEL,
        _LAYER,
        _LAYER_INDEX,
        _TARGET,
        _TARGET_KIND,
        _SUBJECT,
        _c("condition_a", "str", "first condition (order of appearance)"),
        _c("condition_b", "str", "second condition"),
        _RDM_METRIC,
        _COMPARE,
        _c("r_a", "float", "r within condition a"),
        _c("r_b", "float", "r within condition b"),
        _c("delta_r", "float", "r_a - r_b (see contrast_scale)"),
        _c("p_perm", "float", "two-sided p from permuting condition labels"),
        _c("p_fdr", "float", "Benjamini-Hochberg of p_perm, as for `alignment`, per pair"),
        _c(
            "ci_low",
            "float",
            "lower bound of the 95% interval of delta_r (within-condition "
            "stimulus bootstrap, pair-corrected variance, Welch t)",
        ),
        _c("ci_high", "float", "upper bound of the 95% interval of delta_r"),
        _c(
            "p_boot",
            "float",
            "two-sided t-test p of delta_r = 0 from the corrected bootstrap variance",
        ),
        _c("p_boot_fdr", "float", "Benjamini-Hochberg of p_boot"),
        _c("n_a", "int", "stimuli in condition a"),
        _c("n_b", "int", "stimuli in condition b"),
        _N_PERM,
        _c("n_boot", "int", "bootstrap resamples"),
        _c(
            "contrast_scale",
            "str",
            "raw: delta_r = r_a - r_b; noise_ceiling: delta_r = r_a / nc_a - r_b / nc_b (each "
            "condition's upper noise ceiling of the target; r_a, r_b stay raw; p_perm NaN)",
        ),
    ),
)

FILTER_OBJECTS = TableSchema(
    "filter_objects",
    "dissect",
    "one filter of the dissected layer and one object group",
    (
        _MODEL,
        _LAYER,
        _c("filter", "int", "channel index in the layer"),
        _c("group", "str", "object group"),
        _c("importance", "float", "mean of the filter's Grad-CAM map inside the group's boxes"),
        _c("enrichment", "float", "importance / mean of the map over the whole image"),
        _c(
            "p_assign",
            "float",
            "one-sided p of the enrichment against the null that scores each image's maps on the "
            "boxes of other images (n_null_assign draws)",
        ),
        _c(
            "p_assign_fdr",
            "float",
            "Benjamini-Hochberg of p_assign over the layer's filters x groups",
        ),
        _c("n_images", "int", "images in which the group was detected"),
        _c(
            "assigned",
            "bool",
            "the filter belongs to this group (its largest enrichment, >= threshold, group "
            "detected in >= min_images images, and p_assign_fdr < 0.05)",
        ),
        _c(
            "fold",
            "int",
            "empty: assigned on all images; k: assigned without selection fold k's images "
            "(every column of the row, the null included, from the other folds' images), the "
            "groups `lesion --selection cross_fit` tests on fold k",
        ),
    ),
    # tables written before the assignment test and the selection folds still load
    added=("p_assign", "p_assign_fdr", "fold"),
)

OBJECT2BRAIN = TableSchema(
    "object2brain",
    "lesion",
    "one object group's filters lesioned (or kept alone) against one target, subject, condition",
    (
        _MODEL,
        _LAYER,
        _c(
            "analysis",
            "str",
            "`rsa` (the layer's RDM against the target's) or `encoding` (the ROI's mean r of the "
            "out-of-fold ridge predictions, fitted weights, no refit; p_perm NaN, n_perm 0)",
        ),
        _c("group", "str", "object group (or `unassigned`)"),
        _c("variant", "str", "`lesion` (group's filters zeroed) or `keep` (only them kept)"),
        _TARGET,
        _LESION_SUBJECT,
        _CONDITION,
        _c("n_filters", "int", "filters of the group"),
        _c("r_full", "float", "r of the intact layer"),
        _c("r_variant", "float", "r with the group's filters zeroed / kept"),
        _c("delta_r", "float", "r_variant - r_full"),
        _c(
            "p_null",
            "float",
            "two-sided p against random filter subsets of the same size (does the group matter "
            "more than any filters of its size; too liberal for groups atypical of the layer)",
        ),
        _c("z_null", "float", "(delta_r - mean of the null) / sd of the null"),
        _c("n_null", "int", "random filter subsets"),
        _c(
            "null_low",
            "float",
            "2.5% quantile of the random-subset null of delta_r (the p_null draws; cross_fit: "
            "of the fold-weighted null combined draw by draw)",
        ),
        _c("null_high", "float", "97.5% quantile of the same null of delta_r"),
        _c("p_fdr", "float", "Benjamini-Hochberg of p_null"),
        _c(
            "p_perm",
            "float",
            "two-sided stimulus-label permutation p of delta_r (does the target relate to the "
            "layer at all; not a test of the group)",
        ),
        _c("p_perm_fdr", "float", "Benjamini-Hochberg of p_perm"),
        _N_PERM,
        _c(
            "p_group",
            "float",
            "two-sided p of delta_r against filter subsets matched to the group on norm and "
            "single-filter alignment with the target, measured on the selection stimuli "
            "(the test of the group itself)",
        ),
        _c("p_group_fdr", "float", "Benjamini-Hochberg of p_group, over the family of p_fdr"),
        _c("n_group_null", "int", "matched filter subsets (p_group)"),
        _c(
            "significant",
            "bool",
            "starred: p_group_fdr < 0.05 and p_perm_fdr < 0.05 (p_group_fdr alone where no "
            "permutations ran)",
        ),
        _c(
            "selection",
            "str",
            "`cross_fit` (groups chosen without the stimuli their effect is measured on, "
            "combined over folds) or `same` (groups chosen on the same stimuli: circular)",
        ),
    ),
    # tables written before the group null, cross-fitting and the encoding lesion (no column
    # analysis: all rows rsa) still load
    added=(
        "analysis",
        "p_group",
        "p_group_fdr",
        "n_group_null",
        "significant",
        "selection",
        "null_low",
        "null_high",
    ),
)

HEAD_METRICS = TableSchema(
    "head_metrics",
    "train-head",
    "one valence head on one split of its stimuli",
    (
        _MODEL,
        _c("split", "str", "`train`, `val`, `test` or `out_of_fold`"),
        _c("n", "int", "stimuli"),
        _c("mae", "float", "mean absolute error (rating units)"),
        _c("rmse", "float", "root mean squared error (rating units)"),
        _c("pearson", "float", "Pearson r of predicted and rated valence"),
        _c("spearman", "float", "Spearman rho of predicted and rated valence"),
        _c("r2", "float", "coefficient of determination, 1 - SS_residual / SS_total"),
        _c(
            "degenerate",
            "bool",
            "the head is degenerate (best epoch 0, zero weights or constant test predictions); "
            "later stages skip its model",
        ),
        _c("degenerate_reason", "str", "why the head is degenerate (empty when it is not)"),
    ),
    required=("model", "split", "n"),
)

_COORD = "float"
DETECTIONS = TableSchema(
    "detections",
    "dissect",
    "one box of one detector on one stimulus, with what became of it",
    (
        _c("stimulus_id", "str", "stimulus"),
        _c("label", "str", "detector class"),
        _c("group", "str", "object group of the class (empty: the class is in no group)"),
        _c("score", "float", "detector confidence (1.0 where none is given)"),
        _c("x0", _COORD, "left edge in image pixels (x1, y1 exclusive), clipped to the image"),
        _c("y0", _COORD, "top edge in image pixels, clipped to the image"),
        _c("x1", _COORD, "right edge in image pixels, clipped to the image"),
        _c("y1", _COORD, "bottom edge in image pixels, clipped to the image"),
        _c(
            "input_x0",
            "int",
            "left edge in the model input frame (after resize and crop); -1 if unused",
        ),
        _c("input_y0", "int", "top edge in the model input frame; -1 if unused"),
        _c("input_x1", "int", "right edge in the model input frame; -1 if unused"),
        _c("input_y1", "int", "bottom edge in the model input frame; -1 if unused"),
        _c("clipped", "bool", "the box reached outside the image and was clipped"),
        _c(
            "status",
            "str",
            "`used`, `unmapped` (class in no group), `outside_image` or `outside_crop`",
        ),
    ),
    required=("stimulus_id", "label", "group", "status"),
)

PROPAGATE_BEHAVIOR = TableSchema(
    "propagate_behavior",
    "lesion",
    "one group's filters zeroed inside the forward pass (`lesion --propagate`): the change of the "
    "direct behaviour correlation of the predicted valence",
    (
        _MODEL,
        _LAYER,
        _c(
            "analysis",
            "str",
            "`rsa` (the layer's RDM against the target's) or `encoding` (the ROI's mean r of the "
            "out-of-fold ridge predictions, fitted weights, no refit; p_perm NaN, n_perm 0)",
        ),
        _c("group", "str", "object group (or `unassigned`)"),
        _c("variant", "str", "`lesion` or `keep`"),
        _c(
            "selection",
            "str",
            "`cross_fit` (fold k's groups zeroed on fold k's stimuli, combined over folds "
            "weighted by the fold's stimuli in the correlation) or `same` (groups chosen on "
            "all stimuli: circular)",
        ),
        _CONDITION,
        _c("method", "str", "`pearson` or `spearman`"),
        _c("r_full", "float", "predicted vs rated valence, intact network"),
        _c("r_variant", "float", "the same with the group's filters zeroed / kept"),
        _c("delta_r", "float", "r_variant - r_full"),
        _c("n", "int", "stimuli"),
    ),
    required=(),
)

PROPAGATE_ALIGNMENT = TableSchema(
    "propagate_alignment",
    "lesion",
    "one group's filters zeroed inside the forward pass: the change of a later layer's alignment "
    "with one target and subject level",
    (
        _MODEL,
        _LAYER,
        _c(
            "analysis",
            "str",
            "`rsa` (the layer's RDM against the target's) or `encoding` (the ROI's mean r of the "
            "out-of-fold ridge predictions, fitted weights, no refit; p_perm NaN, n_perm 0)",
        ),
        _c("group", "str", "object group (or `unassigned`)"),
        _c("variant", "str", "`lesion` or `keep`"),
        _c(
            "selection",
            "str",
            "`cross_fit` (fold k's groups zeroed on fold k's stimuli, combined over folds "
            "weighted by the fold's stimuli in the correlation) or `same` (groups chosen on "
            "all stimuli: circular)",
        ),
        _c("later_layer", "str", "a layer after the lesioned one in network order"),
        _TARGET,
        _LESION_SUBJECT,
        _CONDITION,
        _c("r_full", "float", "r of the later layer, intact network"),
        _c("r_variant", "float", "r of the later layer with the group's filters zeroed / kept"),
        _c("delta_r", "float", "r_variant - r_full"),
    ),
    required=(),
)

_BOOTSTRAP = _c(
    "bootstrap", "str", "what was resampled: `stimuli`, `subjects` or `both` (two-factor)"
)
_N_BOOT = _c("n_boot", "int", "bootstrap resamples")

GROUP_INFERENCE = TableSchema(
    "group_inference",
    "rsa",
    "the mean over subjects of r of one layer, target and condition, with an interval that "
    "generalises over the resampled factors (two-factor bootstrap, corrected variance)",
    (
        _MODEL,
        _LAYER,
        _LAYER_INDEX,
        _TARGET,
        _CONDITION,
        _COMPARE,
        _c("mean_r", "float", "mean over subjects of r (subjects with a defined r)"),
        _c("se", "float", "corrected bootstrap standard error of mean_r"),
        _c("ci_low", "float", "lower bound of the 95% Student-t interval mean_r - t se"),
        _c("ci_high", "float", "upper bound of that interval"),
        _c("p", "float", "one-sided p of mean_r > 0 under no association (test: methods)"),
        _c("p_fdr", "float", "Benjamini-Hochberg of p over layers x targets per model, condition"),
        _c("nc_low", "float", "lower noise ceiling (NaN with fewer than two subjects)"),
        _c("nc_high", "float", "upper noise ceiling"),
        _c("p_below_nc", "float", "one-sided p of mean_r below the lower noise ceiling"),
        _c("n_subjects", "int", "subjects of the target"),
        _c("n_stimuli", "int", "stimuli in the condition"),
        _N_BOOT,
        _BOOTSTRAP,
    ),
)

MODEL_COMPARISON = TableSchema(
    "model_comparison",
    "rsa",
    "a paired comparison of two (model, layer) picks on one target and condition",
    (
        _c("model_a", "str", "model of the first pick"),
        _c("layer_a", "str", "layer of the first pick"),
        _c("model_b", "str", "model of the second pick"),
        _c("layer_b", "str", "layer of the second pick"),
        _TARGET,
        _CONDITION,
        _COMPARE,
        _c("delta_r", "float", "mean over subjects of r_a - r_b"),
        _c("se", "float", "corrected bootstrap standard error of delta_r (same resamples)"),
        _c("ci_low", "float", "lower bound of the 95% Student-t interval"),
        _c("ci_high", "float", "upper bound of that interval"),
        _c("p", "float", "two-sided t-test p of delta_r != 0"),
        _c("p_fdr", "float", "Benjamini-Hochberg of p over the pairs x targets per condition"),
        _N_BOOT,
        _BOOTSTRAP,
        _c(
            "selection",
            "str",
            "how the layers were picked: `listed`, `valence`, or `best on "
            "N other stimuli` (chosen on a random half, tested on the other half)",
        ),
    ),
)

_ROI_TARGET = _c("target", "str", "ROI name, or `behavior` (ratings: one voxel per rater)")
_ROI_SUBJECT = _c("subject", "str", "subject; `group` for the ratings (one voxel per rater)")

ENCODING = TableSchema(
    "encoding",
    "encode",
    "the encoding model of one layer (or banded model) for one ROI, subject and condition",
    (
        _MODEL,
        _c("layer", "str", "dotted module name of the layer, or `banded:l1+l2+...`"),
        _ROI_TARGET,
        _ROI_SUBJECT,
        _CONDITION,
        _c("n_voxels", "int", "voxels (or raters) of the ROI"),
        _c("feature_dim", "int", "model features per fold after reduction (sum over bands)"),
        _c("r_mean", "float", "mean over voxels of the Pearson r of out-of-fold predictions"),
        _c("r_median", "float", "median over voxels of that r"),
        _c("r2_mean", "float", "mean over voxels of R^2 = 1 - SSE / SST (out of fold)"),
        _c(
            "nc_mean",
            "float",
            "mean split-half noise ceiling on r (Spearman-Brown; NaN without run-wise data)",
        ),
        _c("frac_nc", "float", "r_mean / nc_mean"),
        _c(
            "p_perm",
            "float",
            "one-sided permutation p of r_mean, (1 + #{null >= r_mean}) / (1 + n_perm); "
            "sequential refit test stopped early: perm_stop / n_perm",
        ),
        _c(
            "p_fdr",
            "float",
            "Benjamini-Hochberg of p_perm over layers x ROIs, per model and condition",
        ),
        _c(
            "n_perm",
            "int",
            "permutations behind p_perm (fewer than requested where a sequential test stopped)",
        ),
        _c("n_stimuli", "int", "stimuli in the condition"),
        _c("n_folds", "int", "outer cross-validation folds"),
        _c("alpha_median", "float", "median over voxels of the chosen penalty (NaN: banded)"),
    ),
)

ENCODING_VOXELS = TableSchema(
    "encoding_voxels",
    "encode",
    "one voxel (or rater) of one ROI under the encoding model of one layer, all stimuli",
    (
        _MODEL,
        _c("layer", "str", "dotted module name of the layer, or `banded:l1+l2+...`"),
        _ROI_TARGET,
        _ROI_SUBJECT,
        _c("voxel", "int", "0-based voxel index within the ROI (rater index for `behavior`)"),
        _c("i", "float", "voxel index on the betas' first axis (NIfTI sources; else NaN)"),
        _c("j", "float", "voxel index on the second axis (NIfTI sources; else NaN)"),
        _c("k", "float", "voxel index on the third axis (NIfTI sources; else NaN)"),
        _c("r", "float", "Pearson r of the out-of-fold predictions"),
        _c("r2", "float", "R^2 of the out-of-fold predictions"),
        _c("alpha", "float", "median over outer folds of the chosen penalty (NaN: banded)"),
    ),
)

ENCODING_BANDS = TableSchema(
    "encoding_bands",
    "encode",
    "one layer (band) of a banded ridge model across layers, for one ROI and subject",
    (
        _MODEL,
        _c("bands", "str", "the banded model, `banded:l1+l2+...`"),
        _c("layer", "str", "the band (layer)"),
        _ROI_TARGET,
        _ROI_SUBJECT,
        _c("n_voxels", "int", "voxels of the ROI"),
        _c("r2_joint_mean", "float", "mean over voxels of the joint model's R^2"),
        _c("r2_share_mean", "float", "mean over voxels of this band's share of it (split R^2)"),
        _c("alpha_median", "float", "median over voxels and folds of the band's penalty"),
    ),
)

#: Every table by name, in the order the documentation lists them.
TABLES: dict[str, TableSchema] = {
    schema.name: schema
    for schema in (
        ALIGNMENT,
        ALIGNMENT_GROUP,
        BEHAVIOR_DIRECT,
        CONDITION_CONTRAST,
        GROUP_INFERENCE,
        MODEL_COMPARISON,
        HEAD_METRICS,
        FILTER_OBJECTS,
        DETECTIONS,
        OBJECT2BRAIN,
        PROPAGATE_BEHAVIOR,
        PROPAGATE_ALIGNMENT,
        ENCODING,
        ENCODING_VOXELS,
        ENCODING_BANDS,
    )
}

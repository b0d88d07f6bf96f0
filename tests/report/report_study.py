"""A small results folder as the stages write it: two models of different depth, two ROIs and
behaviour, three conditions, two subjects, group inference, model comparisons, contrasts,
encoding, Object2Brain lesions with their heatmaps, a trained and a given head, the run's
manifest (warnings, config), stage records and a simulation's truth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from object2brain.tables import TABLES

MODELS = {"alexnet": ["features.2", "features.5", "features.12"], "resnet18": ["layer1", "layer4"]}
ROIS = ("EVC", "FFA")
TARGETS = (*ROIS, "behavior")
CONDITIONS = ("all", "pos", "neg")
SUBJECTS = ("sub-01", "sub-02")
CEILING = {"EVC": (0.40, 0.60), "FFA": (0.20, 0.35), "behavior": (0.50, 0.70)}
VOXELS = {"EVC": {"sub-01": 812, "sub-02": 790}, "FFA": {"sub-01": 120, "sub-02": 131}}
WARNING = "resampled the ROI masks of sub-01 to the betas' grid"


def _frame(name: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=TABLES[name].column_names)


def alignment_rows(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for model, layers in MODELS.items():
        for index, layer in enumerate(layers):
            for target in TARGETS:
                for condition in CONDITIONS:
                    for subject in (*SUBJECTS, "group"):
                        r = 0.1 + 0.1 * index + rng.uniform(0, 0.05)
                        rows.append({
                            "model": model, "layer": layer, "layer_index": index,
                            "target": target, "subject": subject, "condition": condition,
                            "target_kind": "behavior" if target == "behavior" else "roi",
                            "rdm_metric": "correlation", "compare_method": "spearman",
                            "r": r, "p_perm": 0.01, "p_fdr": 0.02 if index else 0.3,
                            "ci_low": r - 0.05, "ci_high": r + 0.05,
                            "nc_low": CEILING[target][0], "nc_high": CEILING[target][1],
                            "n_stimuli": 40, "n_perm": 199,
                        })  # fmt: skip
    return _frame("alignment", rows)


def tables(rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """Every table of the study (rsa, lesion and encode)."""
    alignment = alignment_rows(rng)
    group = alignment[alignment["subject"] == "group"]
    keys = ["model", "layer", "layer_index", "target", "target_kind", "condition"]
    summary = group[keys].assign(mean_r=group["r"], sem=0.02, n_subjects=2, t=3.0)
    summary = summary.assign(p_t=0.01, p_t_fdr=np.where(group["layer_index"] == 0, 0.5, 0.01))
    inference = group[["model", "layer", "layer_index", "target", "condition"]].assign(
        compare_method="spearman", mean_r=group["r"], se=0.03, ci_low=group["r"] - 0.06,
        ci_high=group["r"] + 0.06, p=0.01, p_fdr=np.where(group["layer"] == "layer4", 0.01, 0.4),
        nc_low=group["nc_low"], nc_high=group["nc_high"], p_below_nc=0.5, n_subjects=2,
        n_stimuli=40, n_boot=100, bootstrap="both",
    )  # fmt: skip
    inference = inference[inference["target"] != "behavior"]
    comparison = [{
        "model_a": "alexnet", "layer_a": "features.12", "model_b": "resnet18", "layer_b": "layer4",
        "target": target, "condition": "all", "compare_method": "spearman", "delta_r": 0.05,
        "se": 0.02, "ci_low": 0.01, "ci_high": 0.09, "p": 0.01, "p_fdr": 0.02, "n_boot": 100,
        "bootstrap": "both", "selection": "best on 20 other stimuli",
    } for target in ROIS]  # fmt: skip
    contrast = []
    for model, layers in MODELS.items():
        for index, layer in enumerate(layers):
            for target in TARGETS:
                for subject in (*SUBJECTS, "group"):
                    contrast.append({
                        "model": model, "layer": layer, "layer_index": index, "target": target,
                        "target_kind": "behavior" if target == "behavior" else "roi",
                        "subject": subject, "condition_a": "pos", "condition_b": "neg",
                        "rdm_metric": "correlation", "compare_method": "spearman",
                        "r_a": 0.3, "r_b": 0.2, "delta_r": 0.1, "p_perm": 0.02, "p_fdr": 0.04,
                        "ci_low": 0.02, "ci_high": 0.18, "p_boot": 0.01, "p_boot_fdr": 0.03,
                        "n_a": 20, "n_b": 20, "n_perm": 199, "n_boot": 100,
                    })  # fmt: skip
    direct = [{"model": m, "condition": "all", "method": "spearman", "r": 0.5, "p": 0.01,
               "ci_low": 0.3, "ci_high": 0.7, "n": 40} for m in MODELS]  # fmt: skip
    lesion = []
    for model, layers in MODELS.items():
        for group_name in ("Faces", "Humans", "unassigned"):
            for variant in ("lesion", "keep"):
                for target in TARGETS:
                    hit = model == "resnet18" and group_name == "Faces" and target == "FFA"
                    lesion.append({
                        "model": model, "layer": layers[-1], "group": group_name,
                        "variant": variant, "target": target, "subject": "group",
                        "condition": "all", "n_filters": 5, "r_full": 0.3,
                        "r_variant": 0.1 if hit else 0.29, "delta_r": -0.2 if hit else -0.01,
                        "p_null": 0.001 if hit else 0.6, "z_null": -4.0 if hit else 0.3,
                        "n_null": 100, "p_fdr": 0.003 if hit else 0.7,
                        "p_perm": 0.001 if hit else 0.5, "p_perm_fdr": 0.004 if hit else 0.6,
                        "n_perm": 199,
                    })  # fmt: skip
    encoding = []
    for model, layers in MODELS.items():
        for layer in layers:
            for target in ROIS:
                for subject in SUBJECTS:
                    encoding.append({
                        "model": model, "layer": layer, "target": target, "subject": subject,
                        "condition": "all", "n_voxels": VOXELS[target][subject],
                        "feature_dim": 64, "r_mean": 0.2, "r_median": 0.2, "r2_mean": 0.04,
                        "nc_mean": 0.5 if subject == "sub-01" else 0.6, "frac_nc": 0.4,
                        "p_perm": 0.01, "p_fdr": 0.02, "n_perm": 99, "n_stimuli": 40,
                        "n_folds": 5, "alpha_median": 10.0,
                    })  # fmt: skip
    behaviour, later = [], []
    for selection in ("cross_fit", "same"):
        for group in ("Faces", "Humans"):
            common = {"model": "resnet18", "layer": "layer1", "analysis": "rsa", "group": group,
                      "variant": "lesion", "selection": selection, "condition": "all",
                      "r_full": 0.4, "r_variant": 0.3, "delta_r": -0.1}  # fmt: skip
            behaviour.append({**common, "method": "pearson", "n": 40})
            for subject in (*SUBJECTS, "group"):
                later.append({**common, "later_layer": "layer4", "target": "FFA",
                              "subject": subject})  # fmt: skip
    return {
        "lesion/propagate_behavior": _frame("propagate_behavior", behaviour),
        "lesion/propagate_alignment": _frame("propagate_alignment", later),
        "rsa/alignment": alignment,
        "rsa/alignment_group": summary[TABLES["alignment_group"].column_names],
        "rsa/group_inference": inference[TABLES["group_inference"].column_names],
        "rsa/model_comparison": _frame("model_comparison", comparison),
        "rsa/condition_contrast": _frame("condition_contrast", contrast),
        "rsa/behavior_direct": _frame("behavior_direct", direct),
        "lesion/object2brain": _frame("object2brain", lesion),
        "encode/encoding": _frame("encoding", encoding),
    }


def _manifest(folder: Path, command: str, outputs: list[str], **extra: Any) -> None:
    payload = {
        "command": command, "outputs": sorted(outputs), "seeds": {"permutation": 7},
        "versions": {"python": "3.11.7", "numpy": "2.4.6", "object2brain": "0.1.0"},
        "created": "2026-01-01T00:00:00+00:00", **extra,
    }  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(payload))


def write_study(folder: Path, given_head: Path) -> Path:
    """The study under ``folder``; ``given_head``: a head trained elsewhere (its head.json)."""
    from object2brain.report.figures.lesion import lesion_figures

    rng = np.random.default_rng(0)
    outputs: dict[str, list[str]] = {}
    for name, frame in tables(rng).items():
        path = folder / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)
        outputs.setdefault(path.parent.name, []).append(path.name)
    lesion = folder / "lesion"
    figures = lesion_figures(pd.read_csv(lesion / "object2brain.csv"), lesion / "figures")
    outputs["lesion"] += [p.relative_to(lesion).as_posix() for p in figures]
    outputs["rsa"] += _rdm_figures(
        folder / "rsa", tables(np.random.default_rng(0))["rsa/alignment"]
    )
    rsa_extra = {
        "config": {"n_perm": 199, "n_boot": 100, "compare_method": "spearman", "stimuli": "x"},
        "targets": {
            **{roi: {"kind": "roi", "subjects": list(SUBJECTS)} for roi in ROIS},
            "behavior": {"kind": "behavior", "subjects": ["r1", "r2", "r3"]},
        },
        "roi_voxels": VOXELS,
        "warnings": [WARNING],
    }
    _manifest(folder / "rsa", "rsa", outputs["rsa"], **rsa_extra)
    _manifest(lesion, "lesion", outputs["lesion"], config={"n_null": 100, "n_perm": 199})
    _manifest(folder / "encode", "encode", outputs["encode"], config={"folds": 5, "alphas": [1.0]})
    heads = folder / "heads" / "alexnet"
    heads.mkdir(parents=True)
    head_record = {"model": "alexnet", "arch": "alexnet", "loss": "mse", "best_epoch": 3,
                   "metrics": {"test": {"pearson": 0.61, "mae": 0.9}}}  # fmt: skip
    (heads / "head.json").write_text(json.dumps(head_record))
    given_head.parent.mkdir(parents=True, exist_ok=True)
    given_record = {"model": "resnet18", "arch": "resnet18", "loss": "weighted_mse",
                    "metrics": {"test": {"pearson": 0.77, "mae": 0.7}}}  # fmt: skip
    (given_head.parent / "head.json").write_text(json.dumps(given_record))
    for stage, seconds in (("rsa", 12.5), ("lesion", 40.25)):
        (folder / stage / ".stage.json").write_text(json.dumps({"key": "k", "seconds": seconds}))
    _dissections(folder)
    simulation = folder / "simulation"
    simulation.mkdir()
    truth = {"simulated": True, "n_subjects": 2, "seed": 0, "rating_noise": 1.0,
             "rois": [{"name": "EVC", "source": "layer:features.2", "snr": 1.0}]}  # fmt: skip
    (simulation / "truth.json").write_text(json.dumps(truth))
    run_config = {"models": [{"arch": "alexnet", "head": None},
                             {"arch": "resnet18", "head": str(given_head)}]}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps({
        "command": "run", "config": run_config, "seeds": {"seed": 0},
        "reused": ["rsa"], "warnings": [WARNING, "stimulus s3 has no rating"],
    }))  # fmt: skip
    return folder


def _rdm_figures(rsa: Path, alignment: pd.DataFrame) -> list[str]:
    """The rsa stage's RDM and MDS figures of a synthetic RDM set: 24 stimuli in two conditions
    with a valence gradient; each model layer, each ROI's group RDM and behaviour's RDM mix a
    condition/valence structure with noise."""
    from object2brain.rdm_file import Rdm, RdmSet, condensed
    from object2brain.report.figures.rdms import rdm_figures

    rng = np.random.default_rng(1)
    n = 24
    conditions = ["pos" if i % 2 else "neg" for i in range(n)]
    valence = np.where(np.arange(n) % 2, 1.0, -1.0) + rng.normal(0, 0.5, n)
    signal = np.abs(valence[:, None] - valence[None, :])

    def rdm(kind: str, name: str, label: str, weight: float) -> Rdm:
        noise = rng.random((n, n))
        square = weight * signal + (noise + noise.T)
        np.fill_diagonal(square, 0.0)
        return Rdm(kind, name, label, condensed(square), {"n_stimuli": n})

    rdms = [rdm("model", m, layer, 0.2 + 0.3 * k) for m, layers in MODELS.items()
            for k, layer in enumerate(layers)]  # fmt: skip
    rdms += [rdm("brain", roi, "group", 1.0) for roi in ROIS]
    rdms.append(rdm("behaviour", "behavior", "group", 2.0))
    ids = [f"s{i:02d}" for i in range(n)]
    files = rdm_figures(RdmSet(ids, rdms, conditions, valence), alignment, rsa / "figures")
    return [p.relative_to(rsa).as_posix() for p in files]


def _dissections(folder: Path) -> None:
    """``dissect/<model>/``: filter_objects, a gallery and the filter heatmap (PNG); alexnet's
    groups were never detected in enough images (every enrichment NaN: a blank heatmap)."""
    from PIL import Image

    for model, layers in MODELS.items():
        out = folder / "dissect" / model
        (out / "figures").mkdir(parents=True)
        blank = model == "alexnet"
        rows = [{
            "model": model, "layer": layers[-1], "filter": k, "group": group,
            "importance": 0.5, "enrichment": np.nan if blank else 1.0 + k,
            "p_assign": 0.01, "p_assign_fdr": 0.02, "n_images": 1 if blank else 9,
            "assigned": (not blank) and k == 1 and group == "Faces",
        } for k in range(3) for group in ("Faces", "Humans")]  # fmt: skip
        _frame("filter_objects", rows).to_csv(out / "filter_objects.csv", index=False)
        figures = ["figures/gallery_Faces.png", "figures/filter_group_heatmap.png"]
        for name in figures:
            Image.new("RGB", (8, 8), "white").save(out / name)
        _manifest(out, "dissect", ["filter_objects.csv", *figures])

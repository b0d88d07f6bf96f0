"""The embedded default study: no network, no user data, a planted truth to recover.

1. **Stimuli** built only from photos shipped with installed packages (nothing downloaded):
   context scenes (scikit-image, scikit-learn) with a planted context valence, and composites
   that paste a face (the smiling astronaut of scikit-image = pleasant, Grace Hopper of
   matplotlib = stern, unpleasant) into a pleasant or unpleasant context. Face and context of
   the same sign form the ``congruent`` condition, opposite signs ``incongruent``; contexts
   without a face form ``scene``. True valence = 1.5 x context + 1.0 x face. The pasted boxes are
   kept as ground truth (``stimuli/boxes.csv``).
2. **Models**: ``efficientnet_lite0`` with its real bundled weights, plus alexnet / vgg16 /
   resnet18 when their real weights are already in the local torch cache.
3. **Simulated data** (clearly labelled as such): ratings of 8 raters (true valence + noise) and
   three ROIs: ``EVC`` from an early layer, ``FFA`` from the face-selective filters of a late
   layer (chosen from the ground truth: face present vs absent, before any dissection), and
   ``VAL`` from the valence, responding at 30% gain in incongruent scenes.
4. **Stages**: the study runs through :func:`object2brain.pipeline.run.run_config` (extraction,
   simulation, valence head trained on the simulated ratings, RSA, EmoCAM++ dissection with the
   OpenCV face detector, Object2Brain lesions, encoding models, report). The encoding models
   (cross-validated ridge from every layer to every simulated voxel) use 3 folds, penalties at
   whole decades and a sparse random projection of each layer to 256 features, so that they stay
   fast.

Expected recovery: the best layer of ``EVC`` is early (by RSA and by encoding), and the largest
lesion effect on ``FFA`` comes from the ``Faces`` group; :func:`recovered_truth` checks them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from object2brain.data.stimuli import StimulusSet, load_stimuli
from object2brain.io import check_output_folder, output_lock, staged_output
from object2brain.pipeline.config import RunConfig

log = logging.getLogger("object2brain.demo")

DEMO_MODEL = "efficientnet_lite0"
EARLY_LAYER = "_blocks.2"
FACE_LAYER = "_blocks.14"
N_FACE_FILTERS = 24
#: Features per layer of the demo's encoding models: a PCA of each training fold (fitted once per
#: layer and fold, shared by the ROIs). With the full demo's 173 training stimuli per fold it is
#: lossless (ridge only uses the span of the training rows); a sparse random projection to 256
#: adds enough noise to the stimuli's kernel to blur the planted early layer's small margin.
ENCODE_PCA_DIM = 256
# Context photos and their planted valence (+1 pleasant, -1 unpleasant).
CONTEXTS: dict[str, float] = {
    "coffee": 1.0,
    "chelsea": 1.0,
    "flower": 1.0,
    "china": 1.0,
    "horse": 1.0,
    "gravel": -1.0,
    "brick": -1.0,
    "moon": -1.0,
    "retina": -1.0,
    "page": -1.0,
}
# Face crops (x, y, w, h), found once with OpenCV's frontal-face cascade, widened below.
FACES: dict[str, tuple[float, tuple[int, int, int, int]]] = {
    "astronaut": (1.0, (177, 66, 95, 95)),
    "grace_hopper": (-1.0, (155, 105, 222, 222)),
}
CANVAS = (320, 240)


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is (``full`` for ``make demo``; ``quick`` for tests)."""

    per_condition: int
    scenes: int
    n_perm: int
    n_boot: int
    n_null: int
    epochs: int


SIZES = {
    "full": DemoSize(per_condition=100, scenes=60, n_perm=1000, n_boot=100, n_null=500, epochs=150),
    "quick": DemoSize(per_condition=36, scenes=24, n_perm=200, n_boot=0, n_null=200, epochs=80),
}


def _context_photo(name: str) -> Image.Image:
    if name in ("flower", "china"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg")).convert("RGB")
    from skimage import data as skdata

    array = np.asarray(getattr(skdata, name)())
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def _face_photo(name: str) -> Image.Image:
    if name == "grace_hopper":
        import matplotlib.cbook as cbook

        path = Path(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
        photo = Image.open(path).convert("RGB")
    else:
        from skimage import data as skdata

        array = np.asarray(skdata.astronaut())  # type: ignore[no-untyped-call]
        photo = Image.fromarray(array).convert("RGB")
    x, y, w, h = FACES[name][1]
    margin = 0.35
    box = (
        max(0, int(x - margin * w)),
        max(0, int(y - margin * h)),
        min(photo.width, int(x + (1 + margin) * w)),
        min(photo.height, int(y + (1 + margin) * h)),
    )
    return photo.crop(box)


def _random_context(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = photo.size
    scale = rng.uniform(0.6, 1.0)
    crop_w = int(min(width, height * CANVAS[0] / CANVAS[1]) * scale)
    crop_h = int(crop_w * CANVAS[1] / CANVAS[0])
    x0 = int(rng.integers(0, width - crop_w + 1))
    y0 = int(rng.integers(0, height - crop_h + 1))
    image = photo.crop((x0, y0, x0 + crop_w, y0 + crop_h)).resize(CANVAS, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def build_demo_stimuli(folder: Path, size: DemoSize, seed: int = 0) -> StimulusSet:
    """Write the demo images, ``stimuli.csv`` and ground-truth ``boxes.csv``; load the set.

    The folder is written as a whole (:func:`object2brain.io.staged_output`): a kill or a full
    disk leaves the previous set of images and tables or the new one, never a mix."""
    with staged_output(folder) as staging:
        _write_demo_stimuli(staging.folder, size, seed)
    return load_stimuli(folder / "stimuli.csv")


def _write_demo_stimuli(folder: Path, size: DemoSize, seed: int) -> None:
    """The images and tables of :func:`build_demo_stimuli` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    contexts = {name: _context_photo(name) for name in CONTEXTS}
    faces = {name: _face_photo(name) for name in FACES}
    rows: list[dict[str, Any]] = []
    boxes: list[dict[str, Any]] = []
    plan = [
        ("congruent", size.per_condition),
        ("incongruent", size.per_condition),
        ("scene", size.scenes),
    ]
    for condition, count in plan:
        for i in range(count):
            context = list(CONTEXTS)[int(rng.integers(len(CONTEXTS)))]
            image = _random_context(contexts[context], rng)
            valence = 1.5 * CONTEXTS[context]
            face_name = ""
            if condition != "scene":
                wanted = CONTEXTS[context] if condition == "congruent" else -CONTEXTS[context]
                face_name = next(n for n, (v, _) in FACES.items() if v == wanted)
                face = faces[face_name]
                side = int(rng.integers(80, 130))
                pasted = face.resize(
                    (side, int(side * face.height / face.width)), Image.Resampling.BICUBIC
                )
                x0 = int(rng.integers(0, CANVAS[0] - pasted.width + 1))
                y0 = int(rng.integers(0, CANVAS[1] - pasted.height + 1))
                image.paste(pasted, (x0, y0))
                valence += FACES[face_name][0]
                stimulus_id = f"{condition}_{i:03d}"
                boxes.append(
                    {
                        "stimulus_id": stimulus_id,
                        "x0": x0,
                        "y0": y0,
                        "x1": x0 + pasted.width,
                        "y1": y0 + pasted.height,
                        "label": "face",
                    }
                )
            stimulus_id = f"{condition}_{i:03d}"
            path = folder / f"{stimulus_id}.jpg"
            image.save(path, quality=92)
            rows.append(
                {
                    "stimulus_id": stimulus_id,
                    "path": path.name,
                    "condition": condition,
                    "valence": valence,
                    "context": context,
                    "face": face_name,
                }
            )
    pd.DataFrame(rows).to_csv(folder / "stimuli.csv", index=False)
    pd.DataFrame(boxes).to_csv(folder / "boxes.csv", index=False)


def face_selective_filters(
    store_path: Path, stimuli: StimulusSet, boxes_csv: Path, layer: str, n: int
) -> list[int]:
    """The ``n`` filters of ``layer`` whose activity is most concentrated in the pasted faces.

    Ground truth only (the pasted boxes, not a detector): for every composite, the mean of
    ``|A_k|`` (bilinearly upsampled to the model input) inside the face box divided by its mean
    over the input, averaged over composites. This is the enrichment EmoCAM++ measures with
    ``direction = abs`` (the per-image Grad-CAM weight cancels in the ratio), so the dissection
    can find these filters again from OpenCV's detections.
    """
    import torch

    from object2brain.activations.store import ActivationStore
    from object2brain.explain.dissect import InputGeometry, box_importance, image_means
    from object2brain.models.zoo import preprocessing_for

    boxes = pd.read_csv(boxes_csv).set_index("stimulus_id")
    ids = [sid for sid in stimuli.ids if sid in boxes.index]
    with ActivationStore.open(store_path) as store:
        maps = torch.from_numpy(np.abs(store.read(layer, ids=ids))).double()
    pre = preprocessing_for(DEMO_MODEL)
    geometry = InputGeometry.of(CANVAS[0], CANVAS[1], pre.resize_size, pre.crop_size)
    pixel_boxes = []
    for sid in ids:
        x0, y0, x1, y1 = geometry.to_input(*boxes.loc[sid, ["x0", "y0", "x1", "y1"]].astype(float))
        pixel_boxes.append(
            [
                max(0, int(x0)),
                max(0, int(y0)),
                min(pre.crop_size, int(np.ceil(x1))),
                min(pre.crop_size, int(np.ceil(y1))),
            ]
        )
    size = (pre.crop_size, pre.crop_size)
    inside = box_importance(maps, torch.tensor(pixel_boxes), torch.arange(len(ids)), size)
    overall = image_means(maps, size)
    enrichment = (inside / overall.clamp_min(1e-12)).mean(dim=0).numpy()
    return sorted(int(k) for k in np.argsort(enrichment)[::-1][:n])


def cached_models() -> list[str]:
    """Other demo models whose real default weights are already in the torch cache."""
    from torch.hub import get_dir
    from torchvision.models import get_model_weights

    found = []
    for arch in ("alexnet", "vgg16", "resnet18"):
        url = get_model_weights(arch).DEFAULT.url
        if (Path(get_dir()) / "checkpoints" / Path(url).name).is_file():
            found.append(arch)
    return found


def demo_config(
    out: Path, stimuli_table: Path, face_filters: list[int], size: DemoSize, device: str
) -> RunConfig:
    """The run configuration of the demo study."""
    faces = ",".join(map(str, face_filters))
    models = [{"arch": DEMO_MODEL, "weights": "default"}]
    models += [{"arch": arch, "weights": "default"} for arch in cached_models()]
    return RunConfig.model_validate(
        {
            "out": out,
            "seed": 0,
            "device": device,
            "stimuli": stimuli_table,
            "models": models,
            "simulate": {
                "rois": [
                    f"EVC=layer:{EARLY_LAYER};snr=1.0;voxels=200",
                    f"FFA=filters:{FACE_LAYER}:{faces};snr=1.0;voxels=200",
                    "VAL=valence;snr=1.0;voxels=200;gain.incongruent=0.3",
                ],
                "n_subjects": 8,
                "rating_noise": 1.0,
            },
            "extract": {"batch_size": 16},
            "train_head": {"epochs": size.epochs, "patience": 20, "ratings": "ratings"},
            "rsa": {"n_perm": size.n_perm, "n_boot": size.n_boot},
            "dissect": {
                "layer": {
                    DEMO_MODEL: FACE_LAYER,
                    "alexnet": "features.12",
                    "vgg16": "features.30",
                    "resnet18": "layer4",
                },
                "detector": "opencv",
                "direction": "abs",
                "min_images": 5,
            },
            "lesion": {"variants": ["lesion", "keep"], "n_null": size.n_null},
            "encode": {
                "folds": 3,
                "inner_folds": 3,
                "reduce": f"pca:{ENCODE_PCA_DIM}",
                "alphas": [10.0**k for k in range(-1, 8)],  # decades: half the default grid
                "n_perm": size.n_perm,
            },
            "report": False,
        }
    )


def run_demo(
    out: str | Path,
    *,
    size: str = "full",
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Build the demo study in ``out``, run every stage and return the report path.

    One demo per folder at a time (:func:`object2brain.io.output_lock` on ``out``; a second is
    refused with one line). Each part is written as a whole: the stimulus folder is swapped in
    complete, the store is extracted through its resumable partial file, each stage's result
    folder is swapped in complete and the report is written atomically; a kill or a full disk
    therefore leaves each part old or new, and a rerun finishes the study.
    """
    if size not in SIZES:
        raise ValueError(f"size {size!r}: use {', '.join(SIZES)}")
    out = Path(out).resolve()
    check_output_folder(out)
    with output_lock(out):
        return _run_demo(out, SIZES[size], batch_size, device, progress)


def _run_demo(out: Path, chosen: DemoSize, batch_size: int, device: str, progress: bool) -> Path:
    """The stages of :func:`run_demo` (under its lock)."""
    from object2brain.api.extract import extract
    from object2brain.models.zoo import load_model
    from object2brain.pipeline.run import run_config

    stimuli = build_demo_stimuli(out / "stimuli", chosen)
    backbone = out / "results" / "activations" / f"{DEMO_MODEL}.backbone.h5"
    backbone.parent.mkdir(parents=True, exist_ok=True)
    model = load_model(DEMO_MODEL, "default")
    extract(model, stimuli, out=backbone, batch_size=batch_size, device=device, progress=progress)
    face_filters = face_selective_filters(
        backbone, stimuli, out / "stimuli" / "boxes.csv", FACE_LAYER, N_FACE_FILTERS
    )
    config = demo_config(
        out / "results", out / "stimuli" / "stimuli.csv", face_filters, chosen, device
    )
    config = config.model_copy(
        update={"extract": config.extract.model_copy(update={"batch_size": batch_size})}
    )
    result = run_config(config, progress=progress)
    from object2brain.report.build import build_report

    report = build_report(
        out / "results",
        out=out / "report.html",
        title="object2brain demo: EfficientNet-Lite0, shipped photos, simulated brain and ratings",
    )
    log.info("demo stages ran: %s", ", ".join(result.ran))
    return report


def recovered_truth(results: str | Path) -> dict[str, Any]:
    """What the demo recovered: EVC's best layer by RSA and by encoding (each with its position
    in network order) and FFA's top lesion group (RSA lesion: its ``delta_r``, ``p_group`` (the
    test of the group itself, against filter subsets matched to it), whether it is starred
    (``significant``) and, for comparison, ``p_null`` (random subsets of its size: too liberal
    for a group atypical of the layer))."""
    folder = Path(results)
    alignment = pd.read_csv(folder / "rsa" / "alignment.csv")
    rows = alignment[
        (alignment["model"] == DEMO_MODEL)
        & (alignment["subject"] == "group")
        & (alignment["condition"] == "all")
        & (alignment["layer"] != "valence")
    ]
    evc = rows[rows["target"] == "EVC"].sort_values("r", ascending=False).iloc[0]
    n_layers = rows["layer"].nunique()
    lesion = pd.read_csv(folder / "lesion" / DEMO_MODEL / "object2brain.csv")
    if "analysis" in lesion:
        lesion = lesion[lesion["analysis"] == "rsa"]
    ffa = lesion[
        (lesion["target"] == "FFA")
        & (lesion["subject"] == "group")
        & (lesion["variant"] == "lesion")
        & (lesion["condition"] == "all")
    ]
    top = ffa.dropna(subset=["delta_r"]).sort_values("delta_r").iloc[0]
    encoding = pd.read_csv(folder / "encode" / "encoding.csv")
    profile = (
        encoding[
            (encoding["model"] == DEMO_MODEL)
            & (encoding["target"] == "EVC")
            & (encoding["condition"] == "all")
            & ~encoding["layer"].str.startswith("banded:")
        ]
        .groupby("layer", sort=False)["r_mean"]
        .mean()  # over subjects; the table's layer order is network order
    )
    return {
        "evc_encoding_best_layer": str(profile.idxmax()),
        "evc_encoding_best_layer_index": int(list(profile.index).index(profile.idxmax())),
        "evc_encoding_best_r": float(profile.max()),
        "evc_best_layer": str(evc["layer"]),
        "evc_best_layer_index": int(evc["layer_index"]),
        "n_layers": int(n_layers),
        "ffa_top_lesion_group": str(top["group"]),
        "ffa_top_lesion_delta_r": float(top["delta_r"]),
        "ffa_top_lesion_p_group": float(top["p_group"]),
        "ffa_top_lesion_significant": bool(top["significant"]),
        "ffa_top_lesion_p_null": float(top["p_null"]),
    }

"""A full study run on NSD-shaped data: the stimuli are rows of ``nsd_stimuli.hdf5`` (never
written as image files), the brain is the published NSD layout for two subjects."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml
from PIL import Image
from scipy.io import savemat
from test_nsd import _release

import object2brain as o2b
from object2brain.data.nsd import nsd_stimulus_id
from object2brain.data.stimuli import IMAGE_SUFFIXES

N_IMAGES, SIZE = 24, 32
SEEN = {1: range(1, 21), 2: range(5, 25)}  # 1-based 73k indices each subject saw


def _nsd_study(folder: Path) -> Path:
    """The stimulus array, the NSD release (3 sessions, 2 subjects), a stimulus table restricted
    to the 16 images both subjects saw, with conditions and valence, a brain manifest and the
    study config."""
    rng = np.random.default_rng(3)
    # smooth-ish pictures, so that the features differ between images
    base = rng.integers(0, 256, size=(N_IMAGES, 8, 8, 3)).astype(np.uint8)
    pixels = np.stack(
        [
            np.asarray(Image.fromarray(b).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
            for b in base
        ]
    )
    # a bright patch at a place of its own in each image, under that image's "face" box: the
    # assignment test (boxes shuffled across images) then has something real to find
    corners = [(2 + (i * 5) % (SIZE - 14), 3 + (i * 7) % (SIZE - 14)) for i in range(N_IMAGES)]
    for image, (x0, y0) in zip(pixels, corners, strict=True):
        image[y0 : y0 + 12, x0 : x0 + 12] = 255
    with h5py.File(folder / "nsd_stimuli.hdf5", "w") as f:
        f.create_dataset("imgBrick", data=pixels)

    root = folder / "nsd"
    written = _release(root, seed=1, order_max=20)  # every trial shows one of 20 images
    subjectim = written["subjectim"].copy()
    for subject, seen in SEEN.items():
        subjectim[subject - 1, :20] = list(seen)
    savemat(
        root / "nsddata/experiments/nsd/nsd_expdesign.mat",
        {"masterordering": written["order"][None, :].astype(np.float64), "subjectim": subjectim},
    )
    (folder / "brain.yaml").write_text(
        "sources:\n  - kind: nsd\n    root: nsd\n    subjects: [1, 2]\n"
        "    rois: [nsdgeneral, {name: V1, file: prf-visualrois, labels: [1, 2]}]\n"
    )

    rows = list(range(4, 20))  # the images of the study: those both subjects saw (5..20)
    pd.DataFrame(
        {
            "stimulus_id": [nsd_stimulus_id(r + 1) for r in rows],
            "path": [f"nsd_stimuli.hdf5#{r}" for r in rows],
            "condition": ["indoor" if r % 2 else "outdoor" for r in rows],
            "valence": rng.uniform(-2.5, 2.5, size=len(rows)).round(3),
        }
    ).to_csv(folder / "stimuli.csv", index=False)
    pd.DataFrame(
        {
            "stimulus_id": [nsd_stimulus_id(r + 1) for r in rows],
            "x0": [corners[r][0] for r in rows],
            "y0": [corners[r][1] for r in rows],
            "x1": [corners[r][0] + 12 for r in rows],
            "y1": [corners[r][1] + 12 for r in rows],
            "label": "face",
        }
    ).to_csv(folder / "boxes.csv", index=False)
    config = {
        "out": "results",
        "seed": 0,
        "device": "cpu",
        "stimuli": "stimuli.csv",
        "models": [{"arch": "resnet18", "weights": "none", "layers": ["layer3", "layer4"]}],
        "brain": "brain.yaml",
        "extract": {"batch_size": 8},
        "train_head": {"epochs": 3, "patience": 2, "batch_size": 4},
        "rsa": {"n_perm": 10, "n_boot": 5},
        "dissect": {
            "layer": "layer4",
            "detector": "boxes:boxes.csv",
            "min_images": 1,
            "direction": "abs",
            "threshold": 1.2,
        },
        "lesion": {"n_null": 5, "variants": ["lesion"]},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _image_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def test_full_run_on_an_nsd_shaped_study(tmp_path: Path) -> None:
    config = _nsd_study(tmp_path)
    assert _image_files(tmp_path) == []
    result = o2b.run_study(config, progress=False)
    assert {"train_head", "rsa", "lesion"} <= set(result.ran)
    assert any(stage.startswith("dissect") for stage in result.ran)

    out = tmp_path / "results"
    alignment = pd.read_csv(out / "rsa" / "alignment.csv")
    brain = alignment[alignment["target"].isin(["nsdgeneral", "V1"])]
    assert set(brain["target"]) == {"nsdgeneral", "V1"}
    assert {"subj01", "subj02"} <= set(brain["subject"])
    assert {"layer3", "layer4"} <= set(brain["layer"])
    assert set(brain.loc[brain["condition"] == "all", "n_stimuli"]) == {16}
    filters = pd.read_csv(out / "dissect" / "resnet18" / "filter_objects.csv")
    assert filters["assigned"].any()  # Grad-CAM on the array's pixels found the boxes
    # lesions propagated through the network on the array's images, per subject and ROI
    lesion = pd.read_csv(out / "lesion" / "resnet18" / "object2brain.csv")
    faces = lesion[(lesion["group"] == "Faces") & lesion["subject"].isin(["subj01", "subj02"])]
    assert set(faces["target"]) == {"nsdgeneral", "V1"} and faces["r_variant"].notna().all()
    assert (out / "report.html").is_file()

    # no stimulus was written as an image file: the only pictures are the figures
    written = _image_files(tmp_path)
    assert written and all("figures" in p.relative_to(tmp_path).parts for p in written)
    for path in written:
        with Image.open(path) as figure:
            assert figure.size != (SIZE, SIZE), path

    assert o2b.run_study(config, progress=False).ran == []  # the stimulus key is stable

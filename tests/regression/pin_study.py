"""A small, fully seeded study whose result tables are pinned (tests/regression/pinned/).

The study is built from arrays written with numpy and h5py (no CNN), so its statistics tables are
the same on every machine to the last bit of float64; only ``filter_objects`` comes from a
network (a random-weight resnet18 on tiny images, float32 convolutions), whose values may differ
in the last float32 digits between CPU instruction sets.

Run ``python tests/regression/pin_study.py`` to (re)write the pins: only when a change of results
is intended and explained in its commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

PINNED = Path(__file__).parent / "pinned"
#: Tables pinned, with the stage that writes each.
TABLES = {
    "alignment": "rsa",
    "alignment_group": "rsa",
    "behavior_direct": "rsa",
    "condition_contrast": "rsa",
    "object2brain": "lesion",
    "filter_objects": "dissect",
}
N_STIMULI = 24
LAYERS = {"conv1": (8, 4, 4), "conv2": (16, 3, 3), "fc": (10,)}


def _write_store(path: Path, model: str, ids: list[str], rng: np.random.Generator) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "stimulus_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype()
        )
        group = f.create_group("layers")
        for name, shape in LAYERS.items():
            group.create_dataset(name, data=rng.normal(size=(len(ids), *shape)))
        group.create_dataset("valence", data=rng.normal(size=len(ids)))
        f.attrs.update(
            model=model,
            arch=model,
            weights="none",
            weights_sha256="none",
            preprocessing=json.dumps({}),
            object2brain_version="0.1.0",
            order=json.dumps([*LAYERS, "valence"]),
            complete=True,
        )


def build_inputs(folder: Path) -> dict[str, Path]:
    """Write the study's inputs into ``folder``; returns their paths by name."""
    rng = np.random.default_rng(20261204)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"stim{i:02d}" for i in range(N_STIMULI)]
    images = folder / "images"
    images.mkdir(exist_ok=True)
    for i, sid in enumerate(ids):
        pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
        pixels[8:28, 10 + i % 20 : 30 + i % 20] = 255  # a bright patch the boxes point at
        Image.fromarray(pixels).save(images / f"{sid}.png")
    conditions = ["congruent" if i % 2 else "incongruent" for i in range(N_STIMULI)]
    valence = rng.integers(-3, 4, size=N_STIMULI).astype(float)
    stimuli = folder / "stimuli.csv"
    pd.DataFrame(
        {
            "stimulus_id": ids,
            "path": [f"images/{sid}.png" for sid in ids],
            "condition": conditions,
            "valence": valence,
        }
    ).to_csv(stimuli, index=False)
    stores = []
    for model in ("model_a", "model_b"):
        store = folder / f"{model}.h5"
        _write_store(store, model, ids, rng)
        stores.append(store)
    # ROIs: EVC from model_a's conv1, FFA from filters 0-3 of model_a's conv2, plus noise.
    with h5py.File(stores[0], "r") as f:
        conv1 = f["layers/conv1"][()].reshape(N_STIMULI, -1)
        conv2 = f["layers/conv2"][()]
    patterns = folder / "patterns.h5"
    with h5py.File(patterns, "w") as f:
        f.attrs["kind"] = "patterns"
        f.create_dataset(
            "stimulus_ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype()
        )
        for subject in ("sub-01", "sub-02", "sub-03"):
            evc = conv1[:, :40] + rng.normal(scale=1.5, size=(N_STIMULI, 40))
            ffa = conv2[:, :4].reshape(N_STIMULI, -1) + rng.normal(size=(N_STIMULI, 36))
            f.create_dataset(f"{subject}/EVC", data=evc)
            f.create_dataset(f"{subject}/FFA", data=ffa)
    ratings = folder / "ratings.csv"
    pd.DataFrame(
        [
            {"subject": f"r{s}", "stimulus_id": sid, "valence": float(v + rng.normal())}
            for s in range(4)
            for sid, v in zip(ids, valence, strict=True)
        ]
    ).to_csv(ratings, index=False)
    filters = folder / "filters.csv"
    groups = ["Faces"] * 4 + ["Animals"] * 3 + [""] * 9
    pd.DataFrame(
        {
            "model": "model_a",
            "layer": "conv2",
            "filter": range(16),
            "group": groups,
            "importance": rng.random(16),
            "enrichment": 1 + rng.random(16),
            "n_images": 10,
            "assigned": [g != "" for g in groups],
        }
    ).to_csv(filters, index=False)
    boxes = folder / "boxes.csv"
    pd.DataFrame(
        [
            {"stimulus_id": sid, "x0": 10 + i % 20, "y0": 8, "x1": 30 + i % 20, "y1": 28}
            | {"label": "Human face" if i % 3 else "Dog", "score": 0.9}
            for i, sid in enumerate(ids)
        ]
    ).to_csv(boxes, index=False)
    return {
        "stimuli": stimuli,
        "store_a": stores[0],
        "store_b": stores[1],
        "patterns": patterns,
        "ratings": ratings,
        "filters": filters,
        "boxes": boxes,
    }


def run_study(folder: Path) -> dict[str, pd.DataFrame]:
    """Run rsa, lesion and dissect of the pinned study; returns the six tables by name."""
    import object2brain as o2b

    inputs = build_inputs(folder / "inputs")
    common = {
        "brain": inputs["patterns"],
        "ratings": inputs["ratings"],
        "stimuli": inputs["stimuli"],
        "seed": 7,
        "device": "cpu",
    }
    rsa = o2b.rsa(
        [inputs["store_a"], inputs["store_b"]],
        out=folder / "rsa",
        n_perm=199,
        n_boot=99,
        progress=False,
        **common,
    )
    o2b.lesion(
        [inputs["store_a"]],
        inputs["filters"],
        out=folder / "lesion",
        n_null=99,
        n_perm=99,
        **common,
    )
    model = o2b.load_model("resnet18", weights="none", seed=3, head=None)
    o2b.dissect(
        model,
        inputs["stimuli"],
        layer="layer3",
        detector=f"boxes:{inputs['boxes']}",
        target=0,
        min_images=2,
        out=folder / "dissect",
        device="cpu",
        seed=3,
        progress=False,
    )
    del rsa
    return {
        name: pd.read_csv(folder / stage / f"{name}.csv", keep_default_na=False, na_values=[""])
        for name, stage in TABLES.items()
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tables = run_study(Path(tmp))
        PINNED.mkdir(exist_ok=True)
        for name, table in tables.items():
            table.to_csv(PINNED / f"{name}.csv", index=False, float_format="%.17g")
            print(f"{name}: {len(table)} rows", file=sys.stderr)

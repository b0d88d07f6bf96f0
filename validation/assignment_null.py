"""Validation of the assignment test of the dissection (``p_assign``, ``assigned``).

Four simulations, results written to ``validation/assignment_null.json`` with the machine and
the run time (``python validation/assignment_null.py``; about 15-30 minutes on 2 CPU cores):

1. ``calibration``: 200 datasets of peaky noise maps (64 filters, 7 x 7) and random boxes in 3
   groups, maps unrelated to the boxes: the rate of ``p_assign <= 0.05`` (binomial 95% interval
   around 0.05) and the share of filters assigned with the enrichment rule alone (old) and with
   the test (new).
2. ``power``: 200 datasets where 8 of the 64 filters respond inside the boxes of group 0: the
   share of them assigned to it (1,000 null draws, the default), and of the others assigned.
3. ``noise_images``: a random-weight resnet18 on noise images with random boxes (given boxes),
   layers ``layer3`` and ``layer4``, several seeds: filters assigned, old rule vs new.
4. ``random_network_opencv``: a random-weight resnet18 on the shipped photos (coins, horse, ...,
   random crops) with the OpenCV detectors, several seeds: filters assigned, old rule vs new.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.stats import binom

from object2brain.explain.nullsim import assigned_filters, random_dataset, simulate_scores

HERE = Path(__file__).parent
N_DATASETS = 200
SEEDS = (0, 1, 2)
PHOTOS = ("coins", "horse", "coffee", "chelsea", "astronaut", "camera", "rocket", "cat")


def calibration(n: int) -> dict[str, object]:
    hits = total = 0
    old = new = filters = 0
    for seed in range(n):
        data = random_dataset(np.random.default_rng(seed), n_images=20)
        data.maps[:] = np.random.default_rng(seed + 10_000).gamma(0.2, 1.0, size=data.maps.shape)
        scores = simulate_scores(data, n_draws=200, seed=seed)
        p = scores.p_assign[np.isfinite(scores.p_assign)]
        hits += int((p <= 0.05).sum())
        total += p.size
        old += int((assigned_filters(scores, test=False) >= 0).sum())
        new += int((assigned_filters(scores) >= 0).sum())
        filters += data.maps.shape[1]
    low, high = binom.interval(0.95, total, 0.05)
    return {
        "datasets": n,
        "p_values": total,
        "rate_p_le_0.05": hits / total,
        "binomial_95_interval": [low / total, high / total],
        "assigned_share_old_rule": old / filters,
        "assigned_share_new_rule": new / filters,
    }


def power(n: int) -> dict[str, object]:
    found, spurious = [], []
    for seed in range(n):
        data = random_dataset(
            np.random.default_rng(50_000 + seed), n_images=30, planted=8, gain=1.0
        )
        assignment = assigned_filters(simulate_scores(data, n_draws=1000, seed=seed))
        found.append(float((assignment[:8] == 0).mean()))
        spurious.append(float((assignment[8:] >= 0).mean()))
    return {
        "datasets": n,
        "planted_filters": 8,
        "filters": 64,
        "planted_assigned_share": float(np.mean(found)),
        "datasets_with_all_planted_assigned": float(np.mean(np.asarray(found) == 1.0)),
        "other_filters_assigned_share": float(np.mean(spurious)),
    }


def _stimuli(folder: Path, images: list[Image.Image]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, image in enumerate(images):
        image.save(folder / f"s{i:03d}.png")
        rows.append({"stimulus_id": f"s{i:03d}", "path": f"s{i:03d}.png"})
    pd.DataFrame(rows).to_csv(folder / "stimuli.csv", index=False)
    return folder / "stimuli.csv"


def _rate(result: object, n_filters: int) -> dict[str, float]:
    summary = result.summary  # type: ignore[attr-defined]
    return {
        "filters": n_filters,
        "assigned_old_rule": summary["n_above_threshold"] / n_filters,
        "assigned_new_rule": sum(summary["n_assigned"].values()) / n_filters,
    }


def noise_images(folder: Path) -> list[dict[str, object]]:
    import object2brain as o2b

    rows = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        images = [
            Image.fromarray(rng.integers(0, 256, size=(160, 160, 3), dtype=np.uint8))
            for _ in range(40)
        ]
        stimuli = _stimuli(folder / f"noise{seed}", images)
        boxes = []
        for i in range(40):
            for _ in range(int(rng.integers(1, 4))):
                w, h = rng.integers(30, 90, size=2)
                x0, y0 = rng.integers(0, 160 - w), rng.integers(0, 160 - h)
                label = ["person", "dog", "car"][int(rng.integers(3))]
                boxes.append([f"s{i:03d}", x0, y0, x0 + w, y0 + h, label])
        box_file = folder / f"noise{seed}" / "boxes.csv"
        pd.DataFrame(boxes, columns=["stimulus_id", "x0", "y0", "x1", "y1", "label"]).to_csv(
            box_file, index=False
        )
        model = o2b.load_model("resnet18", "none", seed=seed)
        for layer, k in (("layer3", 256), ("layer4", 512)):
            detector = f"boxes:{box_file}"
            result = o2b.dissect(model, stimuli, layer=layer, target=0, detector=detector,
                                 device="cpu", seed=seed, progress=False)  # fmt: skip
            rows.append({"seed": seed, "layer": layer, **_rate(result, k)})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def random_network_opencv(folder: Path) -> list[dict[str, object]]:
    from skimage import data

    import object2brain as o2b

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    rows = []
    for seed in SEEDS:
        rng = np.random.default_rng(100 + seed)
        images = []
        for i in range(40):
            photo = photos[i % len(photos)]
            scale = rng.uniform(0.6, 1.0)
            w, h = int(photo.width * scale), int(photo.height * scale)
            x0, y0 = (
                int(rng.integers(0, photo.width - w + 1)),
                int(rng.integers(0, photo.height - h + 1)),
            )
            crop = photo.crop((x0, y0, x0 + w, y0 + h))
            images.append(
                crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop
            )
        stimuli = _stimuli(folder / f"photos{seed}", images)
        model = o2b.load_model("resnet18", "none", seed=seed)
        for layer, k in (("layer3", 256), ("layer4", 512)):
            result = o2b.dissect(model, stimuli, layer=layer, target=0, detector="opencv",
                                 device="cpu", seed=seed, progress=False,
                                 cache_dir=folder / "cache")  # fmt: skip
            rows.append(
                {
                    "seed": seed,
                    "layer": layer,
                    **_rate(result, k),
                    "images_per_group": result.summary["n_images_per_group"],
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    """Run the four parts, networks first; the JSON is rewritten after each part, so a part
    not yet run is absent from it."""
    started = time.time()
    record: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.processor()}, "
        f"{os.cpu_count()} cores visible (shared), python {platform.python_version()}",
    }
    out = HERE / "assignment_null.json"
    with tempfile.TemporaryDirectory() as tmp:
        parts = {
            "noise_images": lambda: noise_images(Path(tmp)),
            "random_network_opencv": lambda: random_network_opencv(Path(tmp)),
            "calibration": lambda: calibration(N_DATASETS),
            "power": lambda: power(N_DATASETS),
        }
        for name, run in parts.items():
            record[name] = run()
            record["seconds"] = round(time.time() - started, 1)
            print(name, record[name], file=sys.stderr, flush=True)
            out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

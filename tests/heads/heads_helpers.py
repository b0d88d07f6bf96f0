"""Generated rated image sets and a tiny frozen backbone for the valence-head tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw
from torch import nn

from object2brain.models.zoo import LoadedModel, Preprocessing, state_dict_sha256

LEVELS = (-3, -2, -1, 0, 1, 2, 3)


def colour_of(valence: float) -> tuple[int, int, int]:
    """Blue at -3, through purple, to red at +3: valence is a known function of the colour."""
    t = (valence + 3.0) / 6.0
    return int(30 + 200 * t), 40, int(230 - 200 * t)


def make_image(valence: float, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A ``size`` px image: background colour encodes valence; random grey shapes and noise."""
    base = np.array(colour_of(valence), dtype=np.float64)
    pixels = base + rng.normal(0, 12, size=(size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = rng.integers(0, size - 16, 2)
        w, h = rng.integers(8, 24, 2)
        grey = int(rng.integers(60, 200))
        draw.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=(grey, grey, grey))
    return image


def write_rated_set(folder: Path, per_level: int, seed: int = 0, size: int = 64) -> pd.DataFrame:
    """``per_level`` images per level -3..3 in ``folder``: ``stimulus_id, path, valence``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for level in LEVELS:
        for k in range(per_level):
            sid = f"v{level:+d}_{k:02d}"
            make_image(level, rng, size).save(folder / f"{sid}.png")
            rows.append({"stimulus_id": sid, "path": f"{sid}.png", "valence": level})
    return pd.DataFrame(rows)


def write_table(folder: Path, per_level: int, seed: int = 0) -> Path:
    """A stimulus table ``stimuli.csv`` with a ``valence`` column, images beside it."""
    frame = write_rated_set(folder, per_level, seed)
    path = folder / "stimuli.csv"
    frame.to_csv(path, index=False)
    return path


def write_findingemo(folder: Path, per_level: int, n_absent: int, seed: int = 0) -> Path:
    """A FindingEmo-format annotation file over ``folder/images``; ``n_absent`` rows lack files."""
    images = folder / "images" / "Run_1" / "Generated scenes"
    frame = write_rated_set(images, per_level, seed)
    rows = []
    for i, row in frame.iterrows():
        rows.append(
            {
                "index": i,
                "user": "u1",
                "image_path": f"/Run_1/Generated scenes/{row['path']}",
                "tags": "Undefined",
                "age": "Adults",
                "valence": int(row["valence"]),
                "arousal": 3,
                "emotion": "Joy",
                "dec_factors": "FacialExpression",
                "ambiguity": 1,
                "datetime": "2023-09-01 00:00:00.000000",
            }
        )
    for j in range(n_absent):
        rows.append({**rows[0], "index": 10_000 + j, "image_path": f"/Run_2/gone/lost_{j}.jpg"})
    path = folder / "annotations_single.ann"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


class TinyNet(nn.Sequential):
    """conv(3->8, stride 2) -> ReLU -> global mean -> flatten -> linear(8 -> 5)."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 8, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 5),
        )


def tiny_model(seed: int = 0) -> LoadedModel:
    """A frozen :class:`TinyNet` as a :class:`LoadedModel` (32 px inputs; output layer ``4``)."""
    torch.manual_seed(seed)
    module = TinyNet().eval().requires_grad_(False)
    return LoadedModel(
        module=module,
        arch="tinynet",
        weights="none",
        weights_sha256=state_dict_sha256(module),
        preprocessing=Preprocessing(resize_size=36, crop_size=32),
    )


def run_cli(argv: list[str]) -> int:
    """The exit status of ``object2brain ARGV`` run in this process."""
    from object2brain.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0

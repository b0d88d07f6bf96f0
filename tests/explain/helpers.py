"""Shared builders of the explain tests: planted face model, composites, tiny models with heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from object2brain.models.zoo import LoadedModel, Preprocessing

INPUT = 120  # model input size of the planted model (resize = crop = 120)
COMPOSITE = (320, 240)  # composite image size (width, height)
FACE = 96  # pasted face size in composite pixels (48 in the model input)
FACE_POSITIONS = ((50, 30), (170, 120), (100, 60), (60, 130), (180, 20), (120, 100))
BACKGROUNDS = ("coffee", "chelsea", "horse", "camera", "hubble_deep_field", "immunohistochemistry")
PLANTED = Preprocessing(resize_size=INPUT, crop_size=INPUT, mean=(0.5,) * 3, std=(0.5,) * 3)
FACE_CHANNEL = 2


def photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def astronaut_face() -> Image.Image:
    """The astronaut's face, square crop."""
    return photo("astronaut").crop((165, 45, 300, 180))


def make_composites(folder: Path, n: int = 6, *, with_face: bool = True) -> list[Path]:
    """Composite photos with the face pasted at FACE_POSITIONS (boxes known)."""
    folder.mkdir(parents=True, exist_ok=True)
    face = astronaut_face().resize((FACE, FACE), Image.Resampling.BICUBIC)
    paths = []
    for i in range(n):
        background = photo(BACKGROUNDS[i % len(BACKGROUNDS)]).resize(COMPOSITE)
        if with_face:
            background.paste(face, FACE_POSITIONS[i % len(FACE_POSITIONS)])
        path = folder / f"comp{i:02d}.png"
        background.save(path)
        paths.append(path)
    return paths


class PlantedFeatures(nn.Module):
    """(B, 3, 120, 120) -> (B, 4, 60, 60): channel FACE_CHANNEL = normalised cross-correlation with
    the face template (ReLU above 0.6); other channels = ReLU(brightness + 2), nearly uniform."""

    def __init__(self, template: torch.Tensor) -> None:
        super().__init__()
        t = template - template.mean()
        self.register_buffer("template", (t / t.norm())[None])
        self.register_buffer("ones", torch.ones(1, 3, *template.shape[1:]))
        self.size = template.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, 2)
        pad = self.size // 2
        n = float(self.ones.numel())
        corr = F.conv2d(x, self.template, padding=pad)
        local_sum = F.conv2d(x, self.ones, padding=pad)
        local_sq = F.conv2d(x * x, self.ones, padding=pad)
        var = (local_sq - local_sum**2 / n).clamp_min(1e-4)
        face = (corr / var.sqrt() - 0.6).clamp_min(0.0) * 5.0
        bright = (x.mean(dim=1, keepdim=True) + 2.0).clamp_min(0.0)
        channels = [bright, bright * 0.5, bright * 0.8]
        channels.insert(FACE_CHANNEL, face)
        return torch.cat(channels, dim=1)


class PlantedNet(nn.Module):
    """Valence = 5 x mean face response + 0.1 x the others (output unit 0 of ``outputs``)."""

    def __init__(self, template: torch.Tensor, outputs: int = 1) -> None:
        super().__init__()
        self.features = PlantedFeatures(template)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, outputs)
        with torch.no_grad():
            self.fc.weight.fill_(0.1)
            self.fc.weight[0, FACE_CHANNEL] = 5.0
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def face_template() -> torch.Tensor:
    """The face as the planted model sees it after its 2x pooling: (3, 23, 23)."""
    face = astronaut_face().resize((FACE, FACE), Image.Resampling.BICUBIC)
    small = face.resize((FACE // 2, FACE // 2), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)
    tensor = (tensor - 0.5) / 0.5
    pooled = F.avg_pool2d(tensor[None], 2)[0]
    return pooled[:, :23, :23].contiguous()


def planted_model(outputs: int = 1) -> LoadedModel:
    """The planted face model; ``outputs > 1`` gives a model without valence head."""
    module = PlantedNet(face_template(), outputs).eval()
    module.requires_grad_(False)
    return LoadedModel(
        module=module,
        arch="planted",
        weights="planted",
        weights_sha256="0" * 64,
        preprocessing=PLANTED,
        name="planted",
        head={"planted": True} if outputs == 1 else None,
    )


def stimulus_csv(paths: list[Path], folder: Path) -> Path:
    import pandas as pd

    table = folder / "stimuli.csv"
    pd.DataFrame({"stimulus_id": [p.stem for p in paths], "path": [str(p) for p in paths]}).to_csv(
        table, index=False
    )
    return table

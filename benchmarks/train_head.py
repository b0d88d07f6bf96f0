"""Benchmark: head training on cached penultimate features vs recomputing them every epoch.

A rated set of N generated images (valence encoded by colour, ``tests/heads/heads_helpers.py``
style) and the real ``efficientnet_lite0`` backbone (bundled ImageNet weights). Three runs of
``train_head`` with the same seed, split and ``--epochs 20`` (patience 20, so all 20 epochs run):

1. cached, cold: the backbone runs once over all images, features go to the feature store
   ``features.h5`` (an activation store), then 20
   epochs touch only the head;
2. cached, warm: a rerun that finds the feature cache and skips the backbone entirely;
3. uncached: every batch of every epoch (training and validation) goes through the frozen
   backbone (``cache=False``), as a plain fine-tuning loop with a frozen body would.

Prints wall times, the ratio uncached / cached, and the largest difference between the heads.

Run: ``.venv/bin/python benchmarks/train_head.py [--n-images 70] [--epochs 20]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw


def make_rated_set(folder: Path, n: int, seed: int = 0, size: int = 96) -> Path:
    """``n`` images, levels -3..3 in turn; background blue (-3) .. red (+3), grey distractors."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        level = i % 7 - 3
        t = (level + 3) / 6
        base = np.array([30 + 200 * t, 40, 230 - 200 * t])
        pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = (int(v) for v in rng.integers(0, size - 24, 2))
            grey = int(rng.integers(60, 200))
            draw.ellipse([x0, y0, x0 + 20, y0 + 16], fill=(grey, grey, grey))
        name = f"img{i:04d}.png"
        image.save(folder / name)
        rows.append({"stimulus_id": f"img{i:04d}", "path": name, "valence": level})
    table = folder / "stimuli.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=70)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run(args.n_images, args.epochs, args.batch_size, args.device)


def run(
    n_images: int = 70, epochs: int = 20, batch_size: int = 32, device: str = "cpu"
) -> dict[str, object]:
    """The three runs; returns wall times and ratios as a dict."""
    from object2brain.api.train_head import train_head
    from object2brain.heads.io import load_head

    args = argparse.Namespace(
        n_images=n_images, epochs=epochs, batch_size=batch_size, device=device
    )

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}"
    )
    print(
        f"efficientnet_lite0 (bundled ImageNet weights), {args.n_images} images, "
        f"{args.epochs} epochs, batch {args.batch_size}"
    )
    with tempfile.TemporaryDirectory(prefix="o2b-bench-head-") as tmp:
        root = Path(tmp)
        table = make_rated_set(root / "images", args.n_images)
        common = {
            "stimuli": table,
            "epochs": args.epochs,
            "patience": args.epochs,
            "batch_size": args.batch_size,
            "device": args.device,
            "seed": 0,
            "progress": False,
            "figures": False,
        }
        times: dict[str, float] = {}
        heads = {}
        for label, out, cache in (
            ("cached (cold: extract once + train)", root / "cached", True),
            ("cached (warm: reuse features.h5)", root / "cached", True),
            ("uncached (backbone every epoch)", root / "uncached", False),
        ):
            start = time.perf_counter()
            result = train_head("efficientnet_lite0", out=out, cache=cache, **common)  # type: ignore[arg-type]
            times[label] = time.perf_counter() - start
            head = result.models["efficientnet_lite0"]
            heads[label] = load_head(head.head_path)[0]
            print(
                f"  {label:<38} {times[label]:8.2f} s   test spearman "
                f"{head.metrics['test']['spearman']:.3f}   features reused: {head.features_reused}"
            )
    cold, warm, uncached = times.values()
    a, _, c = heads.values()
    with torch.no_grad():
        diff = max(float((a.weight - c.weight).abs().max()), float((a.bias - c.bias).abs().max()))
    print(f"ratio uncached / cached cold: {uncached / cold:6.1f}x")
    print(f"ratio uncached / cached warm: {uncached / warm:6.1f}x")
    print(f"largest |difference| between the cached and uncached heads: {diff:.2e}")
    return {
        "scenario": f"efficientnet_lite0, {n_images} images, {epochs} epochs, batch {batch_size}",
        "cached_cold_s": cold,
        "cached_warm_s": warm,
        "uncached_s": uncached,
        "ratio_cold": uncached / cold,
        "ratio_warm": uncached / warm,
        "max_abs_diff_heads": diff,
    }


if __name__ == "__main__":
    main()

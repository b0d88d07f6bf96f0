"""Benchmark: per-filter Grad-CAM + box importances vs pytorch-grad-cam, and flat memory.

1. Throughput on the same model, layer and batches: ours = ``filter_cams`` (all K per-filter maps
   from one forward + one backward) + ``box_importance`` for every box and filter (integral
   images) + whole-image means; theirs = pytorch-grad-cam's ``GradCAM`` (one summed, upsampled,
   normalised map per image). The model is frozen (as object2brain loads it), so the input
   is given ``requires_grad`` for pytorch-grad-cam to see gradients. Prints images/s and the ratio
   (goal: ours >= 0.5x theirs while producing K maps and K x boxes importances per image).
2. Memory: ``o2b.dissect`` (boxes from a CSV, so detection time does not count) over N generated
   images while a thread samples the process's resident memory; prints the peak RSS of each
   quarter of the run (flat = no growth with the number of images).

Run: ``.venv/bin/python benchmarks/dissect.py [--arch resnet18 --layer layer4] [--n-images 64]
[--memory-images 400]`` (``--memory-images 2000`` for the full check).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

HEAD_IN = {"resnet18": 512, "resnet50": 2048, "efficientnet_lite0": 1280, "vgg16": 4096}


def model_with_head(arch: str, weights: str, folder: Path) -> object:
    from object2brain.heads.io import save_head
    from object2brain.models.zoo import OUTPUT_LAYERS, load_model

    torch.manual_seed(0)
    path = save_head(
        nn.Linear(HEAD_IN[arch], 1),
        folder / "head.safetensors",
        {"arch": arch, "replaced_layer": OUTPUT_LAYERS[arch]},
    )
    return load_model(arch, weights, head=path)


def throughput(
    model: object, layer: str, n_images: int, batch_size: int, n_boxes: int
) -> dict[str, float]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from object2brain.explain.dissect import box_importance, image_means
    from object2brain.explain.filtercam import filter_cams

    module = model.module  # type: ignore[attr-defined]
    size = model.preprocessing.crop_size  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(batch_size, 3, size, size, generator=generator)
        for _ in range(max(1, n_images // batch_size))
    ]
    rng = np.random.default_rng(0)

    def boxes_for(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        corners = np.sort(rng.integers(0, size, size=(batch * n_boxes, 2, 2)), axis=1)
        corners[:, 1] += 1
        boxes = torch.from_numpy(corners.transpose(0, 2, 1).reshape(-1, 4)[:, [0, 2, 1, 3]])
        return boxes, torch.arange(batch).repeat_interleave(n_boxes)

    box_sets = [boxes_for(len(b)) for b in batches]

    def ours() -> int:
        k = 0
        for x, (boxes, owners) in zip(batches, box_sets, strict=True):
            cams = filter_cams(module, layer, x, direction="positive")
            importance = box_importance(cams.maps, boxes, owners, (size, size))
            image_means(cams.maps, (size, size))
            k = importance.shape[1]
        return k

    target_layer = module.get_submodule(layer)

    def theirs() -> None:
        with GradCAM(model=module, target_layers=[target_layer]) as cam:
            for x in batches:
                cam(
                    input_tensor=x.clone().requires_grad_(True),
                    targets=[ClassifierOutputTarget(0)] * len(x),
                )

    # Warm up both, then time alternately (2 rounds each, best of).
    filter_cams(module, layer, batches[0][:2])
    theirs_t, ours_t, K = [], [], 0
    for _ in range(2):
        start = time.perf_counter()
        theirs()
        theirs_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        K = ours()
        ours_t.append(time.perf_counter() - start)
    n = sum(len(b) for b in batches)
    ours_rate, theirs_rate = n / min(ours_t), n / min(theirs_t)
    print(f"images: {n} in batches of {batch_size}, {n_boxes} boxes per image, input {size}px")
    print(f"pytorch-grad-cam GradCAM (1 summed map/image):     {theirs_rate:8.2f} images/s")
    print(
        f"object2brain filter_cams + box_importance (K={K}): {ours_rate:8.2f} images/s "
        f"({K} maps + {K * n_boxes} box importances per image)"
    )
    print(f"ratio ours / theirs: {ours_rate / theirs_rate:.2f}x (goal >= 0.5x)")
    return {
        "images": n,
        "filters": K,
        "boxes_per_image": n_boxes,
        "ours_images_per_s": ours_rate,
        "pytorch_grad_cam_images_per_s": theirs_rate,
        "ratio": ours_rate / theirs_rate,
    }


def make_images(folder: Path, n: int) -> list[Path]:
    from skimage import data

    sources = [
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((200, 150))
        for name in ("astronaut", "coffee", "chelsea", "rocket")
    ]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:05d}.jpg"
        image = sources[i % len(sources)].rotate(i % 7)
        image.save(path, quality=85)
        paths.append(path)
    return paths


def memory(
    model: object, layer: str, n_images: int, batch_size: int, folder: Path
) -> dict[str, object]:
    import pandas as pd
    import psutil

    from object2brain.api.dissect import dissect

    paths = make_images(folder / "images", n_images)
    table = folder / "stimuli.csv"
    pd.DataFrame({"stimulus_id": [p.stem for p in paths], "path": [str(p) for p in paths]}).to_csv(
        table, index=False
    )
    labels = ["person", "Human face", "Car", "Dog", "Chair"]
    rows = [
        f"{p.stem},{10 + i % 50},{5 + i % 40},{120 + i % 60},{100 + i % 40},{labels[i % 5]}"
        for i, p in enumerate(paths)
    ]
    boxes = folder / "boxes.csv"
    boxes.write_text("stimulus_id,x0,y0,x1,y1,label\n" + "\n".join(rows) + "\n")

    process = psutil.Process(os.getpid())
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), process.memory_info().rss))
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        dissect(
            model,
            table,
            layer=layer,
            detector=f"boxes:{boxes}",
            min_images=1,
            batch_size=batch_size,
            device="cpu",
            num_workers=0,
            progress=False,
        )
    finally:
        done.set()
        thread.join()
    elapsed = time.perf_counter() - start
    times = np.array([t for t, _ in samples]) - start
    rss = np.array([r for _, r in samples]) / 2**20
    quarters = np.array_split(np.arange(len(rss)), 4)
    peaks = [float(rss[q].max()) for q in quarters if len(q)]
    print(f"dissect over {n_images} images ({elapsed:.1f} s, {n_images / elapsed:.1f} images/s)")
    print("peak RSS per quarter of the run (MiB): " + ", ".join(f"{p:.0f}" for p in peaks))
    print(f"growth last vs first quarter: {peaks[-1] - peaks[0]:+.0f} MiB")
    del times
    return {
        "images": n_images,
        "seconds": elapsed,
        "images_per_s": n_images / elapsed,
        "peak_rss_mib_per_quarter": peaks,
        "growth_mib": peaks[-1] - peaks[0],
    }


def run(
    arch: str = "resnet18",
    weights: str = "none",
    layer: str = "layer4",
    n_images: int = 64,
    batch_size: int = 16,
    boxes: int = 5,
    memory_images: int = 400,
) -> dict[str, object]:
    """Throughput vs pytorch-grad-cam and (if ``memory_images``) the memory run, as a dict."""
    result: dict[str, object] = {"model": f"{arch} ({weights})", "layer": layer}
    with tempfile.TemporaryDirectory() as tmp:
        model = model_with_head(arch, weights, Path(tmp))
        result["throughput"] = throughput(model, layer, n_images, batch_size, boxes)
        if memory_images:
            result["memory"] = memory(model, layer, memory_images, batch_size, Path(tmp))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--boxes", type=int, default=5, help="boxes per image")
    parser.add_argument("--memory-images", type=int, default=400, help="0 skips the memory run")
    args = parser.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {os.cpu_count()} CPU, torch {torch.__version__}")
    print(f"model {args.arch} ({args.weights}), layer {args.layer}")
    run(args.arch, args.weights, args.layer, args.n_images, args.batch_size, args.boxes,
        args.memory_images)  # fmt: skip


if __name__ == "__main__":
    main()

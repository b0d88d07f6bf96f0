"""Benchmark: batched extraction vs a one-image-at-a-time loop, and memory bounded by one batch.

1. resnet18 (random weights), all canonical layers, N images (default 256): ``o2b.extract``
   (batched, DataLoader workers, HDF5 store) vs a naive loop that decodes, preprocesses and runs
   one image at a time through the same hooks and writes each image's activations to an ``.npz``
   file. Prints images/s of both and the ratio.
2. The same batched run with ``channels_last=True`` and with ``amp_dtype="bfloat16"`` +
   ``channels_last`` (the GPU options also work on a CPU): images/s, ratio against the default
   float32 run, and the largest difference of any layer, relative to that layer's largest value.
3. Peak resident memory while extracting all canonical layers of vgg16 for 100 and for 500 images
   (each in a fresh process): bounded by one batch, it must not grow with the number of images.

Run: ``.venv/bin/python benchmarks/extract.py [--n-images 256] [--vgg-images 100 500]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEG photos of 500x375 cut from images shipped with scikit-image."""
    from skimage import data

    sources = [
        Image.fromarray(getattr(data, name)()).convert("RGB")
        for name in ("astronaut", "coffee", "chelsea", "rocket", "horse", "camera")
    ]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        source = sources[i % len(sources)]
        scale = rng.uniform(1.0, 1.6)
        w, h = source.size
        crop_w, crop_h = int(w / scale), int(h / scale)
        x0, y0 = rng.integers(0, w - crop_w + 1), rng.integers(0, h - crop_h + 1)
        image = source.crop((x0, y0, x0 + crop_w, y0 + crop_h)).resize((500, 375))
        image.save(folder / f"img{i:05d}.jpg", quality=90)
    return folder


def naive_loop(model: object, paths: list[Path], layers: list[str], out: Path) -> None:
    """The baseline: one image at a time, hooks, one file per image."""
    from object2brain.data.images import load_image
    from object2brain.models.layers import LayerRecorder

    network = model.module  # type: ignore[attr-defined]
    transform = model.preprocessing.transform()  # type: ignore[attr-defined]
    out.mkdir(parents=True, exist_ok=True)
    with LayerRecorder(network, layers) as recorder, torch.inference_mode():
        for i, path in enumerate(paths):
            recorder.reset()
            network(transform(load_image(path))[None])
            np.savez(out / f"{i}.npz", **{k: v.numpy() for k, v in recorder.outputs.items()})


def bench_throughput(n_images: int, batch_size: int, workdir: Path) -> dict[str, float]:
    import object2brain as o2b

    images = make_images(workdir / "images", n_images)
    stimuli = o2b.load_stimuli(images)
    model = o2b.load_model("resnet18", "none")
    layers = [info.name for info in o2b.list_layers(model)]
    start = time.perf_counter()
    o2b.extract(model, stimuli, out=workdir / "batched.h5", batch_size=batch_size, progress=False)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    naive_loop(model, stimuli.paths, layers, workdir / "naive")
    naive = time.perf_counter() - start
    options = {}
    for name, kwargs in (
        ("channels_last", {"channels_last": True}),
        ("bfloat16_channels_last", {"channels_last": True, "amp_dtype": "bfloat16"}),
    ):
        out = workdir / f"{name}.h5"
        start = time.perf_counter()
        o2b.extract(model, stimuli, out=out, batch_size=batch_size, progress=False, **kwargs)
        seconds = time.perf_counter() - start
        options[name] = {
            "images_per_s": n_images / seconds,
            "ratio_vs_default": batched / seconds,
            "max_relative_difference": _max_relative_difference(workdir / "batched.h5", out),
        }
    return {
        "n_images": n_images,
        "batched_images_per_s": n_images / batched,
        "naive_images_per_s": n_images / naive,
        "speedup": naive / batched,
        "cpu_options": options,
    }


def _max_relative_difference(reference: Path, other: Path) -> float:
    """Largest ``max |a - b| / max |a|`` over the layers of two stores of the same stimuli."""
    from object2brain.activations.store import ActivationStore

    worst = 0.0
    with ActivationStore.open(reference) as a, ActivationStore.open(other) as b:
        for layer in a.layers:
            x, y = a.read(layer).astype(np.float64), b.read(layer).astype(np.float64)
            worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)))
    return worst


def rss_child(n_images: int, batch_size: int, workdir: Path) -> None:
    """Run in a fresh process: extract vgg16, print peak RSS (MiB) as JSON."""
    import object2brain as o2b

    images = workdir / f"vgg_images_{n_images}"
    make_images(images, n_images, seed=1)
    stimuli = o2b.load_stimuli(images, check="header")
    model = o2b.load_model("vgg16", "none")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    out = o2b.extract(
        model,
        stimuli,
        out=workdir / f"vgg_{n_images}.h5",
        batch_size=batch_size,
        num_workers=0,
        progress=False,
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = out.stat().st_size / 2**20
    out.unlink()
    print(
        json.dumps(
            {
                "n_images": n_images,
                "peak_rss_mib": peak,
                "rss_after_model_mib": before,
                "store_mib": size,
                "seconds": seconds,
            }
        )
    )


def run(
    n_images: int = 256,
    batch_size: int = 32,
    vgg_images: tuple[int, ...] = (100, 500),
    vgg_batch_size: int = 16,
) -> dict[str, object]:
    """Throughput (and, for each of ``vgg_images``, peak RSS in a fresh process) as a dict."""
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="o2b-bench-") as tmp:
        workdir = Path(tmp)
        if n_images:
            result.update(bench_throughput(n_images, batch_size, workdir))
            print(f"resnet18, all canonical layers, {n_images} JPEGs 500x375:")
            print(f"  batched o2b.extract : {result['batched_images_per_s']:8.1f} images/s")
            print(f"  one-at-a-time loop  : {result['naive_images_per_s']:8.1f} images/s")
            print(f"  ratio               : {result['speedup']:8.2f}x")
            for name, row in result["cpu_options"].items():  # type: ignore[attr-defined]
                print(
                    f"  {name:<20}: {row['images_per_s']:8.1f} images/s "
                    f"({row['ratio_vs_default']:.2f}x the default; largest difference "
                    f"{row['max_relative_difference']:.1e} of a layer's largest value)"
                )
        rows = [_rss_in_child(n, vgg_batch_size, workdir) for n in vgg_images]
        if rows:
            result["vgg16_peak_rss"] = rows
    return result


def _rss_in_child(n: int, vgg_batch_size: int, workdir: Path) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(n), "--workdir", str(workdir),
         "--vgg-batch-size", str(vgg_batch_size)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    row: dict[str, float] = json.loads(output.stdout.strip().splitlines()[-1])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vgg-images", type=int, nargs="*", default=[100, 500])
    parser.add_argument("--vgg-batch-size", type=int, default=16)
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.vgg_batch_size, args.workdir)
        return

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, device cpu"
    )
    result = run(args.n_images, args.batch_size, tuple(args.vgg_images), args.vgg_batch_size)
    rows: list[dict[str, float]] = result.get("vgg16_peak_rss", [])  # type: ignore[assignment]
    if rows:
        print(f"vgg16, all canonical layers, batch {args.vgg_batch_size}, peak RSS:")
        for row in rows:
            print(
                f"  {row['n_images']:5d} images: peak {row['peak_rss_mib']:7.0f} MiB "
                f"(model loaded: {row['rss_after_model_mib']:.0f} MiB; store "
                f"{row['store_mib']:.0f} MiB on disk; {row['seconds']:.0f} s)"
            )
        if len(rows) > 1:
            growth = rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]
            print(
                f"  growth from {rows[0]['n_images']} to {rows[-1]['n_images']} images: "
                f"{growth:+.0f} MiB (store grew by "
                f"{rows[-1]['store_mib'] - rows[0]['store_mib']:.0f} MiB)"
            )


if __name__ == "__main__":
    main()

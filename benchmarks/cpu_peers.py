"""CPU peers: ``o2b.extract`` against what a user would otherwise write or pick, on the same images.

Images: ``--n`` (default 256) baseline JPEGs of 500 x 375 cut from scikit-image photos.
Model: torchvision resnet18 with random weights (``o2b.load_model("resnet18", "none", seed=0)``;
the same state dict is loaded by every peer), all canonical layers (maxpool, layer1-4, avgpool,
fc), batch size ``--batch`` (32). Every run is timed end to end from the image files to the
activations in memory (peers) or in the activation store on disk (ours); the model is built
before the clock starts. Each run is repeated ``--repeats`` times, interleaved (every run once,
then every run again), and the best (shortest) is kept, because the machine is shared.

- ``ours_float32``: ``o2b.extract`` with its defaults, writing the float32 store (Pillow decoding,
  default workers, channels_last layout, two CPU lanes on two or more threads);
- ``ours_float32_contiguous``: the same with ``channels_last=False`` (the contiguous layout, the
  default before 2026-12-06; its error against ours_float32 stated);
- ``ours_float32_one_lane``: the defaults with one batch at a time over all intra-op threads
  (``extract.MAX_CPU_LANES = 1``, the extraction before 2026-12-06 in the channels_last layout;
  bit for bit ours_float32's values);
- ``ours_fast``: our fastest numerics option on the CPU, batch norms folded into the
  convolutions (``fold_batchnorm=True``) in the channels_last layout, float32 throughout; its
  error against ours_float32 per layer (max abs and relative) in ``error_per_layer_all_images``;
- ``ours_int8``: ``quantize="int8"`` with channels_last inputs (post-training static int8,
  x86 backend; calibrated on the first 64 images by id inside the timed run: its calibration
  seconds are in ``quantize_s``, and ``images_per_s_after_calibration`` is the rate without
  them); its error against ours_float32 per layer (max and median relative to the layer's
  largest value) and what it does to an RSA (``rsa_r_vs_float32``: Pearson r between the
  float32 and int8 correlation-distance RDMs of each layer over all images); its calibration
  cache (``<out>.int8.safetensors``) is removed before each run, so every run calibrates;
- ``ours_int8_cached``: the same with the calibration read from its cache (filled by a first run,
  not timed): what a rerun or a Ray shard pays;
- ``ours_bf16_channels_last``: ``amp="bfloat16"``, ``channels_last=True`` (slower than float32 on
  CPUs without bf16 instructions; ``--skip bf16`` leaves it out);
- ``ours_torch_decode``: ``decode="torch"`` (the pipelined path: threads read the files,
  torchvision decodes the JPEGs), float32;
- ``ours_from_cache``: float32 again with ``--image-cache`` filled by a first run (not timed);
- ``torchvision``: the hand-written baseline, ``create_feature_extractor`` + ``DataLoader`` over
  a Pillow dataset (Resize 256, CenterCrop 224, ToTensor, Normalize), ``inference_mode``,
  outputs copied into preallocated arrays; its best configuration over ``num_workers`` in
  {0, 2, cores} and channels_last off/on;
- ``thingsvision``: THINGSvision 2.7.3 (``get_extractor_from_model`` with its own
  ``ImageDataset`` and ``DataLoader``, all layers in one ``extract_features`` call), run by
  ``--thingsvision-python`` (a separate environment); see the JSON's ``thingsvision.note``.

Rates are given per wall-clock second and per CPU second (user + system of the process and its
loader workers): on a shared machine the wall-clock rate of a run with more processes includes
the larger share of the machine they take from other users; the CPU-second rate does not.

Outputs are checked equal on the first ``--check`` images: each peer's layers against ours
(largest difference relative to the layer's largest value).

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/cpu_peers.py [--n 256] [--repeats 2]
[--thingsvision-python /tmp/tv/bin/python] [--json benchmarks/results/DATE-cpu-peers.json]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

LAYERS = ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (loader workers)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds of a block (``wall``, ``cpu``)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def make_images(folder: Path, n: int) -> list[Path]:
    """``n`` baseline JPEGs of 500 x 375 cut from photos shipped with scikit-image."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:05d}.jpg" for i in range(n)]
    if all(p.exists() for p in paths):
        return paths
    sources = [
        Image.fromarray(getattr(data, name)()).convert("RGB")
        for name in ("astronaut", "coffee", "chelsea", "rocket", "horse", "camera")
    ]
    for i, path in enumerate(paths):
        rng = np.random.default_rng(i)
        source = sources[i % len(sources)]
        w, h = source.size
        scale = rng.uniform(1.0, 1.6)
        cw, ch = int(w / scale), int(h / scale)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = source.crop((x0, y0, x0 + cw, y0 + ch))
        crop.resize((500, 375), Image.Resampling.BILINEAR).save(path, quality=90)
    return paths


def torch_model(state: Path) -> Any:
    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(state, weights_only=True))
    return model.eval()


class PillowImages:
    """What a user writes: a Pillow dataset with torchvision's classic transforms."""

    def __init__(self, paths: list[Path]) -> None:
        from torchvision import transforms as T

        self.paths = paths
        self.transform = T.Compose(
            [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))


def run_torchvision(
    paths: list[Path], state: Path, batch: int, workers: int, channels_last: bool
) -> tuple[float, dict[str, np.ndarray]]:
    """The hand-written baseline: seconds and the activations ``{layer: (n, ...)}``."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.models.feature_extraction import create_feature_extractor

    model = torch_model(state)
    extractor = create_feature_extractor(model, return_nodes={n: n for n in LAYERS})
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    extractor = extractor.to(memory_format=fmt)
    loader = DataLoader(PillowImages(paths), batch_size=batch, num_workers=workers,
                        persistent_workers=False)  # fmt: skip
    out: dict[str, np.ndarray] = {}
    row = 0
    with Clock() as clock, torch.inference_mode():
        for images in loader:
            features = extractor(images.contiguous(memory_format=fmt))
            for name, value in features.items():
                if name not in out:
                    out[name] = np.empty((len(paths), *value.shape[1:]), dtype=np.float32)
                out[name][row : row + len(images)] = value.numpy()
            row += len(images)
        del loader  # its workers are reaped inside the clock (their CPU time counts)
    return clock, out


def run_ours(
    paths: list[Path],
    folder: Path,
    out: Path,
    batch: int,
    *,
    calibrated: bool = False,
    lanes: int | None = None,
    **options: Any,
) -> tuple[float, dict[str, np.ndarray]]:
    import object2brain as o2b
    from object2brain.activations import extract as extraction
    from object2brain.activations.store import ActivationStore
    from object2brain.models import timing

    model = o2b.load_model("resnet18", "none", seed=0)
    stale = [out, out.with_name(out.stem + ".manifest.json")]
    if not calibrated:  # int8: calibrate in the timed run (no calibration cache)
        stale.append(out.with_name(out.name + ".int8.safetensors"))
    for path in stale:
        path.unlink(missing_ok=True)
    default_lanes = extraction.MAX_CPU_LANES
    extraction.MAX_CPU_LANES = default_lanes if lanes is None else lanes
    try:
        with Clock() as clock, timing.profile_stages() as stages:
            o2b.extract(model, folder, out=out, layers="all", device="cpu", batch_size=batch,
                        progress=False, **options)  # fmt: skip
    finally:
        extraction.MAX_CPU_LANES = default_lanes
    clock.quantize = stages.seconds.get("quantize", 0.0)  # type: ignore[attr-defined]
    with ActivationStore.open(out) as store:
        return clock, {layer: store.read(layer) for layer in LAYERS}


def scaled_error(reference: np.ndarray, other: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    return float(np.abs(ref - other).max() / max(np.abs(ref).max(), 1e-30))


def max_error(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rows: int | None) -> float:
    sel = slice(None) if rows is None else slice(0, rows)
    return max(scaled_error(a[k][sel], b[k][sel].reshape(a[k][sel].shape)) for k in LAYERS)


def layer_error(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per layer, over all images: the largest absolute difference, that difference and the
    median one relative to the layer's largest ``|value|`` (float32 reference)."""
    out = {}
    for k in LAYERS:
        ref = reference[k].astype(np.float64)
        diffs = np.abs(ref - other[k].reshape(ref.shape))
        diff, median = float(diffs.max()), float(np.median(diffs))
        scale = max(float(np.abs(ref).max()), 1e-30)
        out[k] = {"max_abs": float(f"{diff:.3g}"), "max_rel": float(f"{diff / scale:.3g}"),
                  "median_rel": float(f"{median / scale:.3g}")}  # fmt: skip
    return out


def rdm_agreement(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per layer: Pearson r between the correlation-distance RDMs (1 - r between images' flattened
    activations, upper triangle) of ``reference`` and ``other``."""
    out = {}
    for k in LAYERS:
        rdms = []
        for acts in (reference[k], other[k]):
            flat = acts.reshape(acts.shape[0], -1).astype(np.float64)
            rdm = 1.0 - np.corrcoef(flat)
            rdms.append(rdm[np.triu_indices(len(flat), k=1)])
        out[k] = float(f"{np.corrcoef(rdms[0], rdms[1])[0, 1]:.6f}")
    return out


# --- THINGSvision (run in its own environment) -------------------------------------------------

TF_STUB = """
import importlib.abc, importlib.machinery, sys, types
class _Any(type):
    def __getattr__(cls, name): return _Any(name, (), {})
    def __call__(cls, *a, **k): return cls
    def __getitem__(cls, item): return cls
    def __iter__(cls): return iter(())
    def __bool__(cls): return False
class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"): raise AttributeError(name)
        return _Any(name, (), {})
class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in ("tensorflow", "keras"):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    def create_module(self, spec):
        m = _Module(spec.name); m.__path__ = []; return m
    def exec_module(self, module): pass
sys.meta_path.insert(0, _Finder())
"""

THINGSVISION_NOTE = (
    "THINGSvision 2.7.3 (pip install --no-deps thingsvision torchtyping typeguard timm) with the "
    "torch 2.14.1 / torchvision 0.29.1 of our environment; its wheel pins tensorflow < 2.16 and "
    "numpy < 2 and imports tensorflow at module level even on its torchvision path, where it is "
    "never called: tensorflow/keras are replaced by inert stub modules (a numpy < 2 stack is not "
    "installable beside torch 2.14), and np.AxisError (removed in numpy 2) is aliased to "
    "np.exceptions.AxisError. Its own ImageDataset (Pillow, its transforms = ours) and "
    "single-process DataLoader, get_extractor_from_model on the same resnet18, all layers in one "
    "extract_features call."
)


def thingsvision_child(folder: Path, state: Path, batch: int, out: Path, check: int) -> None:
    """Runs in the THINGSvision environment: time it, save the first ``check`` rows."""
    exec(TF_STUB, {})  # inert stand-ins for tensorflow/keras (see THINGSVISION_NOTE)
    if not hasattr(np, "AxisError"):  # its helpers use np.AxisError, gone in numpy 2
        setattr(np, "AxisError", np.exceptions.AxisError)  # noqa: B010
    from thingsvision import get_extractor_from_model
    from thingsvision.utils.data import DataLoader, ImageDataset

    model = torch_model(state)
    extractor = get_extractor_from_model(model=model, device="cpu", backend="pt")
    transforms = extractor.get_transformations(resize_dim=256, crop_dim=224)
    with tempfile.TemporaryDirectory() as order:
        dataset = ImageDataset(root=str(folder), out_path=order, backend="pt",
                               transforms=transforms)  # fmt: skip
        batches = DataLoader(dataset=dataset, batch_size=batch, backend="pt")
        with Clock() as clock:
            features = extractor.extract_features(
                batches=batches, module_names=LAYERS, flatten_acts=False, output_type="ndarray"
            )
        images = [Path(p).name for p in dataset.images]
    np.savez(out, seconds=clock.wall, cpu_s=clock.cpu, images=np.array(images),
             **{k: np.asarray(v)[:check] for k, v in features.items()})  # fmt: skip


def run_thingsvision(
    python: str, folder: Path, state: Path, batch: int, work: Path, check: int
) -> dict[str, Any]:
    out = work / "thingsvision.npz"
    command = [python, __file__, "--thingsvision-child", str(folder), str(state), str(batch),
               str(out), str(check)]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "PYTHONPATH": ""})  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"ran": False, "note": f"could not start {python}: {exc}"}
    if done.returncode != 0 or not out.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"ran": False, "note": "failed: " + " | ".join(tail)}
    loaded = np.load(out)
    clock = Clock()
    clock.wall, clock.cpu = float(loaded["seconds"]), float(loaded.get("cpu_s", np.nan))
    return {"ran": True, "clock": clock,
            "images": [str(x) for x in loaded["images"]],
            "acts": {k: loaded[k] for k in LAYERS}}  # fmt: skip


# --- main ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "host_load_1min": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--check", type=int, default=4)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--thingsvision-python", default="/tmp/tv/bin/python")
    parser.add_argument("--skip", default="", help="comma-separated runs to leave out")
    parser.add_argument(
        "--peer-workers", default="", help="the peer's loader worker counts (default: 0,2,cores)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import torch

    skip = set(filter(None, args.skip.split(",")))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="o2b_peers_"))
    folder = work / "images"
    paths = make_images(folder, args.n)
    import object2brain as o2b

    state = work / "resnet18.pt"
    torch.save(o2b.load_model("resnet18", "none", seed=0).module.state_dict(), state)
    runs: dict[str, dict[str, Any]] = {}
    acts: dict[str, dict[str, np.ndarray]] = {}

    def record(name: str, clock: Clock, values: dict[str, np.ndarray], **extra: Any) -> None:
        quantize_s = getattr(clock, "quantize", 0.0)
        if quantize_s:
            extra["quantize_s"] = round(quantize_s, 3)
            extra["images_per_s_after_calibration"] = round(args.n / (clock.wall - quantize_s), 2)
        runs[name] = {
            "seconds": round(clock.wall, 3),
            "images_per_s": round(args.n / clock.wall, 2),
            "cpu_s": round(clock.cpu, 3),
            "images_per_cpu_s": round(args.n / clock.cpu, 2),
            **extra,
        }
        acts[name] = values
        print(f"{name}: {args.n / clock.wall:.1f} images/s, {args.n / clock.cpu:.1f} per CPU-s "
              f"({clock.wall:.1f} s) {extra}", flush=True)  # fmt: skip

    def ours(out: str, **options: Any) -> Any:
        return lambda: run_ours(paths, folder, work / out, args.batch, **options)

    # every run of one repeat before the next repeat (ours and the peers interleaved), so a
    # change in the machine's load falls on all of them alike; the best repeat of each is kept
    schedule: dict[str, Any] = {"ours_float32": ours("f32.h5")}
    if "contiguous" not in skip:
        schedule["ours_float32_contiguous"] = ours("contiguous.h5", channels_last=False)
    if "one_lane" not in skip:
        schedule["ours_float32_one_lane"] = ours("one_lane.h5", lanes=1)
    if "fast" not in skip:
        schedule["ours_fast"] = ours("fast.h5", fold_batchnorm=True, channels_last=True)
    if "int8" not in skip:
        schedule["ours_int8"] = ours("int8.h5", quantize="int8", channels_last=True)
        ours("int8c.h5", quantize="int8", channels_last=True)()  # fills the cache (not timed)
        schedule["ours_int8_cached"] = ours("int8c.h5", quantize="int8", channels_last=True,
                                            calibrated=True)  # fmt: skip
    if "bf16" not in skip:
        schedule["ours_bf16_channels_last"] = ours("bf16.h5", amp_dtype="bfloat16",
                                                   channels_last=True)  # fmt: skip
    if "torch_decode" not in skip:
        schedule["ours_torch_decode"] = ours("td.h5", decode="torch")
    if "cache" not in skip:
        ours("fill.h5", image_cache=work / "cache")()  # fills the cache (not timed)
        schedule["ours_from_cache"] = ours("cached.h5", image_cache=work / "cache")
    cores = len(os.sched_getaffinity(0))
    workers = sorted({int(w) for w in args.peer_workers.split(",") if w} or {0, 2, cores})
    peer_configs = [{"num_workers": w, "channels_last": c}
                    for w in workers for c in (False, True)]  # fmt: skip
    for config in peer_configs:
        schedule["torchvision " + json.dumps(config)] = (
            lambda c=config: run_torchvision(paths, state, args.batch, c["num_workers"],
                                             c["channels_last"]))  # fmt: skip
    best: dict[str, tuple[Clock, dict[str, np.ndarray]]] = {}
    loads: dict[str, list[float]] = {}  # 1-min load average after each repeat of each run
    every: dict[str, list[tuple[float, float]]] = {}  # (seconds, CPU-s) of each repeat
    load_at_start = os.getloadavg()[0]
    for repeat in range(args.repeats):
        for name, run in schedule.items():
            clock, values = run()
            loads.setdefault(name, []).append(round(os.getloadavg()[0], 2))
            every.setdefault(name, []).append((round(clock.wall, 3), round(clock.cpu, 3)))
            print(f"  [{repeat}] {name}: {args.n / clock.wall:.1f} images/s ({clock.wall:.1f} s, "
                  f"load {loads[name][-1]:.1f})", flush=True)  # fmt: skip
            if name not in best or clock.wall < best[name][0].wall:
                best[name] = (clock, values)
    for name in schedule:
        if name.startswith("ours"):
            record(name, *best[name])
    configs: dict[str, dict[str, float]] = {}
    peer_best: tuple[Clock, dict[str, np.ndarray], dict[str, Any]] | None = None
    for config in peer_configs:
        clock, values = best["torchvision " + json.dumps(config)]
        configs[json.dumps(config)] = {
            "images_per_s": round(args.n / clock.wall, 2),
            "images_per_cpu_s": round(args.n / clock.cpu, 2),
        }
        if peer_best is None or clock.wall < peer_best[0].wall:
            peer_best = (clock, values, config)
    assert peer_best is not None
    record("torchvision", peer_best[0], peer_best[1], best_config=peer_best[2],
           configs=configs)  # fmt: skip
    tv: dict[str, Any] = {"ran": False, "note": "skipped"}
    if "thingsvision" not in skip:
        tv = run_thingsvision(args.thingsvision_python, folder, state, args.batch, work,
                              args.check)  # fmt: skip
    if tv["ran"]:
        order = [folder / name for name in tv["images"][: args.check]]
        assert order == paths[: args.check], "THINGSvision read the images in another order"
        record("thingsvision", tv["clock"], tv["acts"], note=THINGSVISION_NOTE)
    else:
        runs["thingsvision"] = {"note": f"{THINGSVISION_NOTE} Did not run: {tv['note']}"}
        print(runs["thingsvision"]["note"], flush=True)
    reference = acts["ours_float32"]
    checks = {name: max_error(reference, values, args.check)
              for name, values in acts.items() if name != "ours_float32"}  # fmt: skip
    layer_errors = {name: layer_error(reference, acts[name])
                    for name in ("ours_float32_contiguous", "ours_float32_one_lane", "ours_fast",
                                 "ours_int8", "ours_int8_cached", "ours_bf16_channels_last")
                    if name in acts}  # fmt: skip
    rsa_r = {name: rdm_agreement(reference, acts[name])
             for name in ("ours_fast", "ours_int8") if name in acts}  # fmt: skip
    peers = [name for name in ("torchvision", "thingsvision") if "images_per_s" in runs[name]]
    best_peer = max(peers, key=lambda name: runs[name]["images_per_s"])
    best_rate = runs[best_peer]["images_per_s"]
    ratios = {
        name: round(runs[name]["images_per_s"] / best_rate, 3)
        for name in runs
        if name.startswith("ours") and "images_per_s" in runs[name]
    }
    # per CPU-second: what the rates would be on a machine of their own (the wall-clock rates of
    # a shared machine favour runs with more processes, which take a larger share of it)
    best_cpu_peer = max(peers, key=lambda name: runs[name]["images_per_cpu_s"])
    best_cpu_rate = runs[best_cpu_peer]["images_per_cpu_s"]
    cpu_ratios = {
        name: round(runs[name]["images_per_cpu_s"] / best_cpu_rate, 3)
        for name in runs
        if name.startswith("ours") and "images_per_cpu_s" in runs[name]
    }
    results = {
        "benchmark": "cpu_peers",
        "command": " ".join(["benchmarks/cpu_peers.py", *(argv or sys.argv[1:])]),
        "machine": {**machine(), "host_load_1min_at_start": round(load_at_start, 2)},
        "load_1min_after_each_repeat": loads,
        "seconds_and_cpu_s_of_each_repeat": every,
        "n_images": args.n,
        "batch_size": args.batch,
        "layers": LAYERS,
        "repeats": args.repeats,
        "runs": runs,
        "best_peer": best_peer,
        "ratio_vs_best_peer": ratios,
        "best_peer_per_cpu_s": best_cpu_peer,
        "ratio_per_cpu_s_vs_best_peer": cpu_ratios,
        "max_scaled_error_vs_ours_float32": {k: float(f"{v:.3g}") for k, v in checks.items()},
        "error_per_layer_all_images": layer_errors,
        "rsa_r_vs_float32": rsa_r,
        "targets": {
            # the defaults (float32, channels_last: the layout of the peer's best configuration)
            "float32_no_slower_than_best_peer": ratios["ours_float32"] >= 1.0,
            "fastest_numerics_at_least_1_5x": max(
                ratios.get("ours_fast", 0),
                ratios.get("ours_int8", 0),
                ratios.get("ours_bf16_channels_last", 0),
            )
            >= 1.5,
            # a rerun or a Ray shard: the calibration read from its cache (a first run calibrates)
            "int8_with_cached_calibration_at_least_1_5x": ratios.get("ours_int8_cached", 0) >= 1.5,
        },
    }
    summary = ("ratio_vs_best_peer", "best_peer", "ratio_per_cpu_s_vs_best_peer", "targets",
               "max_scaled_error_vs_ours_float32", "rsa_r_vs_float32")  # fmt: skip
    print(json.dumps({k: results[k] for k in summary}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--thingsvision-child":
        folder, state, batch, out, check = sys.argv[2:7]
        thingsvision_child(Path(folder), Path(state), int(batch), Path(out), int(check))
    else:
        main()

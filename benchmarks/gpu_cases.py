"""The GPU cases of issues 8 and 23 in one script under a time budget (default 420 s, guarded).

Cases (full sizes; ``--smoke`` runs tiny sizes end to end on any device, the CPU included):

- ``rsa``: Mantel test, 1,000 stimuli x 20 layers x 20 ROIs x 10,000 permutations, Spearman
  (goal < 60 s). Baseline: the same code on the CPU of the machine, timed on a slice of the
  permutations and extrapolated linearly.
- ``lesion``: lesion null, 10,000 random subsets of a 512-filter layer (7 x 7), 1,000 stimuli,
  20 target RDMs, correlation RDMs + Spearman (goal < 60 s). Baselines: our engine on the CPU,
  and brute force on the same GPU (mask the activations, recompute the RDM with a Gram matrix,
  rank, correlate), each timed on a sample of subsets and extrapolated.
- ``extract``: resnet18 (random weights), all 8 canonical layers, 10,000 JPEGs of 500 x 375
  generated from photos shipped with scikit-image. End to end (files -> store) with Pillow
  decoding in loader workers (goal >= 2,500 images/s) and with the pipelined on-device path,
  ``--decode torch`` (goal >= 5,000 images/s), stored as float16 with a 4,096-dimensional sparse
  random projection (the full float32 layers would be 55 GB); the same from the decoded-image
  cache (``--image-cache``, filled by a first run; goal >= 15,000 images/s); the stage profile
  of each path (``object2brain.models.timing``: read, decode, forward, copy, write, each timed
  alone, against the end-to-end rate: their overlap); the same on 1,000 images without
  projection (write-bound); and from already
  decoded, preprocessed tensors on the device (goal >= 15,000 images/s), forward + hooks only
  and forward + copy of every layer to pinned host memory. Baseline: a one-image-at-a-time
  loop on the CPU (``benchmarks/extract.py``'s naive loop).
- ``dissect``: ``o2b.dissect`` of resnet18 ``layer4`` (512 filters) with box importances over
  25,000 JPEGs with cached detections (3 boxes per image, cache primed beforehand) on the
  pipelined image path (``decode="torch"``; goal < 30 s), with a Pillow probe and its stage
  profile.
  Baseline: the same call on the CPU on a slice, extrapolated.
- ``encode``: cross-validated ridge (``object2brain.encoding.ridge.fit_ridge_cv``, himalaya's
  ``torch_cuda`` backend, float32), 1,000 stimuli x 20 layers (1,000 features each) x 10,000
  voxels x 5 outer (5 inner) folds x 19 alphas (goal < 60 s), layer by layer under the budget
  (layers left are extrapolated, said so). Check: CPU (numpy, float64) vs GPU on 200 stimuli x
  100 features x 200 voxels (fraction of equal alphas; largest prediction difference where they
  agree, in units of the responses' SD; tolerance 1e-3: float32). Needs himalaya (pure Python):
  where the device image lacks it, the case says so instead of failing the run. Not in the
  default ``--cases``: run it with ``--cases encode``. First (without himalaya) the exact
  ``refit`` permutation null (``object2brain.encoding.smoother``, float64 on every device;
  relabelled, refitted and scored on the device, 8,192 columns per call as in the stage): check
  CPU vs device on 40 stimuli x 100 features x 50 voxels x 20 relabellings (null statistics
  within 1e-10); then 1,000 relabellings of 200 voxels timed on the device at the
  full demo's encode shape (260 stimuli, 172 PCA dimensions, 3 folds, 3 inner folds, 9 alphas:
  one layer x ROI of the demo, which has 8 x 25) and at the issue's scale (1,000 stimuli x 1,000
  features, 5 x 5 folds, 19 alphas), each against the same code on the CPU on a few relabellings,
  extrapolated.
- ``inference`` (issue 18): the two-factor group bootstrap (``group_inference``: every layer
  against the subject mean of every ROI, 1,000 resamples plus the 1,000 delete-one rows and the
  lower noise ceiling's terms) at 1,000 stimuli x 20 layers x 20 ROIs x 10 subjects, Spearman,
  on the device (``object2brain.rsa.group``, resamples per call from the device's free memory),
  ROI by ROI under the budget (ROIs left are extrapolated, said so), and one ``model_comparison``
  (two listed layers, same resamples). Throughput in resamples/s and coefficients/s, peak
  device memory. Check: CPU vs device on a slice (60 stimuli x 3 layers x 4 subjects, 50
  resamples: every resample and delete-one coefficient, and the rows' mean_r, se, ci, p; 1e-9).
  Baseline: the same code on the CPU on 2 resamples of one ROI (model and lower-ceiling terms),
  extrapolated to every resample, delete-one row and ROI. Not in the default
  ``--cases``: run it with ``--cases inference``.
- ``rsa_stage`` (run last, no goal): the rest of an RSA run at the rsa case's scale, bootstrap
  CIs (1,000 resamples) and one condition contrast (500 + 500 stimuli, 500 permutations,
  extrapolated to 10,000).

Every case first checks GPU == CPU on a small slice and records the largest difference and the
tolerance it was held to (float64 paths: 1e-9; float32 network paths: 1e-2 of the layer's
largest value, because cuDNN convolutions use TF32 by default on Hopper).

Run from the repository root: ``python3 benchmarks/gpu_cases.py`` with the machine's own torch
(the project's ``.venv`` is far over the device tool's 64 MiB carry limit; it works too where it
exists). ``src/`` is put on the path and, when pydantic is missing (as on the device image),
only the submodules needed are imported; everything else used (numpy, torch, torchvision, h5py,
pandas, pyarrow, Pillow, scikit-image, PyYAML, tqdm, safetensors) is on that image. On the
device tool: ``run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_cases.py",
timeout_s=540)``. Writes ``$OUT/gpu_cases.json`` when ``OUT`` is set and
``--json PATH`` when given. ``--smoke`` (alias ``--quick``) is the CPU smoke run tested by
``tests/gpu/test_gpu_cases_smoke.py``. ``--cases rsa,lesion`` picks cases; ``--budget-s`` stops
starting new work when the budget would be exceeded (skipped work is listed in the JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _bootstrap_imports() -> None:
    """Make ``object2brain`` importable from ``src/`` even without its optional dependencies."""
    sys.path.insert(0, str(ROOT / "src"))
    try:
        import pydantic  # noqa: F401
    except ImportError:  # the package's __init__ imports the pipeline (pydantic): skip it
        package = types.ModuleType("object2brain")
        package.__path__ = [str(ROOT / "src" / "object2brain")]
        sys.modules["object2brain"] = package


_bootstrap_imports()

import numpy as np  # noqa: E402
import torch  # noqa: E402

FULL = {
    "rsa": {"n": 1000, "layers": 20, "rois": 20, "n_perm": 10_000, "cpu_perm": 100},
    "lesion": {"n": 1000, "filters": 512, "subsets": 10_000, "targets": 20, "size": 64},
    "extract": {"n": 10_000, "n_full": 1_000, "batch": 256, "srp": 4096, "naive": 48},
    "dissect": {"n": 25_000, "batch": 128, "cpu_images": 64, "check": 32},
    "rsa_stage": {"n": 1000, "layers": 20, "rois": 20, "n_boot": 1000, "contrast_perm": 500},
    "encode": {"n": 1000, "layers": 20, "features": 1000, "voxels": 10_000, "check_n": 200},
    "inference": {
        "n": 1000,
        "layers": 20,
        "rois": 20,
        "subjects": 10,
        "n_boot": 1000,
        "cpu_boot": 2,
        "check_n": 60,
    },
}
# Smoke sizes stay above the slices the full run takes (e.g. 60 stimuli = 1,770 pairs), so that a
# slice that only breaks at scale breaks here too.
SMOKE = {
    "rsa": {"n": 60, "layers": 3, "rois": 3, "n_perm": 100, "cpu_perm": 20},
    "lesion": {"n": 60, "filters": 32, "subsets": 64, "targets": 3, "size": 4},
    "extract": {"n": 12, "n_full": 6, "batch": 4, "srp": 64, "naive": 3},
    "dissect": {"n": 12, "batch": 4, "cpu_images": 4, "check": 4},
    "rsa_stage": {"n": 40, "layers": 3, "rois": 3, "n_boot": 20, "contrast_perm": 20},
    "encode": {"n": 60, "layers": 2, "features": 30, "voxels": 50, "check_n": 40},
    "inference": {
        "n": 40,
        "layers": 3,
        "rois": 2,
        "subjects": 4,
        "n_boot": 20,
        "cpu_boot": 2,
        "check_n": 30,
    },
}
# Rough cost of each case at full size on an H100 (s), used by the budget guard.
ESTIMATE_S = {
    "rsa": 40,
    "lesion": 90,
    "extract": 180,
    "dissect": 90,
    "rsa_stage": 30,
    "encode": 60,
    "inference": 120,
}


class Budget:
    """Wall-clock budget: ``allows(seconds)`` is false when the work would not finish in time."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, seconds: float, what: str) -> bool:
        if self.left() >= seconds:
            return True
        self.skipped.append(f"{what} (needs ~{seconds:.0f} s, {self.left():.0f} s left)")
        say(f"  skipped {what}: budget")
        return False


def say(text: str) -> None:
    print(text, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - start, value


def environment(device: torch.device) -> dict[str, Any]:
    import torchvision

    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }
    if device.type == "cuda":
        _free, total = torch.cuda.mem_get_info(device)
        info["device_memory_gib"] = round(total / 2**30, 1)
    if Path("/dev/shm").is_dir():  # loader workers pass batches through it (~10 GB at 16 x 4 x 256)
        info["dev_shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
    return info


# ----------------------------------------------------------------------------------------------
# RSA


def case_rsa(sizes: dict[str, int], device: torch.device, budget: Budget) -> dict[str, Any]:
    from object2brain.rsa.inference import mantel_test

    n, K, T, n_perm = sizes["n"], sizes["layers"], sizes["rois"], sizes["n_perm"]
    m = n * (n - 1) // 2
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(K, m, generator=gen, dtype=torch.float64)
    Y = torch.rand(T, m, generator=gen, dtype=torch.float64)
    Y[: T // 2] += 0.3 * X[: T // 2]  # some real alignment
    out: dict[str, Any] = {"sizes": sizes, "method": "spearman", "goal_s": 60}

    # equality on a slice: the first min(n, 200) stimuli, 500 permutations
    ns = min(n, 200)
    ms = ns * (ns - 1) // 2
    pos = _condensed_prefix(n, ns)
    Xs, Ys = X[:4, pos], Y[:4, pos]
    check_perm = min(500, n_perm)
    cpu = mantel_test(Xs, Ys, "spearman", check_perm, seed=1, device="cpu")
    dev = mantel_test(Xs, Ys, "spearman", check_perm, seed=1, device=device)
    out["check"] = {
        "slice": f"{ns} stimuli ({ms} pairs) x {len(Xs)} x {len(Ys)}, {check_perm} permutations",
        "max_abs_diff_r": float(np.abs(cpu.r - dev.r).max()),
        "max_abs_diff_p": float(np.abs(cpu.p - dev.p).max()),
        "tolerance": "r: 1e-9; p: 2 / (n_perm + 1)",
    }
    # bootstrap CI and condition contrast on the same slice (square RDMs)
    from object2brain.rsa.inference import bootstrap_ci, condition_difference_test
    from object2brain.rsa.rdm import squareform

    Xq, Yq = squareform(Xs), squareform(Ys)
    boot = [bootstrap_ci(Xq, Yq, "spearman", 50, seed=1, device=d) for d in ("cpu", device)]
    labels = ["a" if i % 2 else "b" for i in range(ns)]
    contrast = [
        condition_difference_test(Xq, Yq, labels, "a", "b", "spearman", 50, seed=1, device=d)
        for d in ("cpu", device)
    ]
    out["check"]["max_abs_diff_bootstrap_ci"] = float(
        max(np.abs(boot[0][k] - boot[1][k]).max() for k in range(2))
    )
    out["check"]["max_abs_diff_contrast_delta"] = float(
        np.abs(contrast[0].delta - contrast[1].delta).max()
    )
    out["check"]["max_abs_diff_contrast_p"] = float(np.abs(contrast[0].p - contrast[1].p).max())
    # the stratified contrast bootstrap and the linear (lesion p_perm) permutation test
    from object2brain.rsa.compare import prepare
    from object2brain.rsa.inference import condition_difference_bootstrap, linear_permutation_test

    stratified = [
        condition_difference_bootstrap(Xq, Yq, labels, "a", "b", "spearman", 50, 1, d)
        for d in ("cpu", device)
    ]
    out["check"]["max_abs_diff_contrast_bootstrap"] = float(
        max(np.abs(getattr(stratified[0], k) - getattr(stratified[1], k)).max()
            for k in ("low", "high", "p"))
    )  # fmt: skip
    difference = prepare(Xs[1:], "spearman") - prepare(Xs[:1], "spearman")
    linear = [
        linear_permutation_test(difference.to(d), prepare(Ys, "spearman").to(d), check_perm, seed=1)
        for d in (torch.device("cpu"), device)
    ]
    out["check"]["max_abs_diff_linear_p"] = float(np.abs(linear[0].p - linear[1].p).max())
    out["check"]["tolerance"] += (
        "; bootstrap CI, contrast delta and stratified bootstrap: 1e-9; contrast p: 2 / 51; "
        "linear permutation p: 2 / (n_perm + 1)"
    )
    out["check"]["passed"] = bool(
        out["check"]["max_abs_diff_r"] <= 1e-9
        and out["check"]["max_abs_diff_p"] <= 2 / (check_perm + 1)
        and out["check"]["max_abs_diff_bootstrap_ci"] <= 1e-9
        and out["check"]["max_abs_diff_contrast_delta"] <= 1e-9
        and out["check"]["max_abs_diff_contrast_p"] <= 2 / 51
        and out["check"]["max_abs_diff_contrast_bootstrap"] <= 1e-9
        and out["check"]["max_abs_diff_linear_p"] <= 2 / (check_perm + 1)
    )
    mantel_test(X, Y, "spearman", 10, device=device)  # warm-up (kernels, allocator)
    seconds, result = timed(device, lambda: mantel_test(X, Y, "spearman", n_perm, device=device))
    out["seconds"] = seconds
    out["min_p"] = float(np.nanmin(result.p))
    say(f"  rsa on {device}: {seconds:.2f} s for {K}x{T}x{n_perm} permutations ({n} stimuli)")
    if device.type == "cuda" and budget.allows(60, "rsa CPU baseline"):
        cpu_perm = sizes["cpu_perm"]
        t_cpu, _ = timed(
            torch.device("cpu"), lambda: mantel_test(X, Y, "spearman", cpu_perm, device="cpu")
        )
        out["cpu_seconds_extrapolated"] = t_cpu * n_perm / cpu_perm
        out["cpu_measured"] = f"{t_cpu:.2f} s for {cpu_perm} permutations"
        out["ratio_vs_cpu"] = out["cpu_seconds_extrapolated"] / seconds
        say(f"  rsa CPU: {out['cpu_seconds_extrapolated']:.1f} s (extrapolated), "
            f"{out['ratio_vs_cpu']:.1f}x")  # fmt: skip
    out["goal_met"] = bool(device.type == "cuda" and seconds < 60)
    return out


def case_rsa_stage(sizes: dict[str, int], device: torch.device, budget: Budget) -> dict[str, Any]:
    """The rest of an RSA run at the scale of the rsa case (no goal in the issue; run last):
    bootstrap CIs (all resamples) and one condition contrast (500 + 500 stimuli; a sample of the
    permutations, extrapolated to 10,000)."""
    from object2brain.rsa.inference import bootstrap_ci, condition_difference_test
    from object2brain.rsa.rdm import squareform

    n, K, T = sizes["n"], sizes["layers"], sizes["rois"]
    gen = torch.Generator().manual_seed(2)
    m = n * (n - 1) // 2
    X = squareform(torch.rand(K, m, generator=gen, dtype=torch.float64))
    Y = squareform(torch.rand(T, m, generator=gen, dtype=torch.float64))
    out: dict[str, Any] = {"sizes": sizes, "method": "spearman"}
    bootstrap_ci(X[:, :50, :50], Y[:, :50, :50], "spearman", 4, device=device)  # warm-up
    seconds, _ = timed(
        device, lambda: bootstrap_ci(X, Y, "spearman", sizes["n_boot"], device=device)
    )
    out["bootstrap_seconds"] = seconds
    say(f"  bootstrap on {device}: {seconds:.2f} s for {sizes['n_boot']} resamples")
    if budget.allows(20, "condition contrast"):
        labels = ["a" if i % 2 else "b" for i in range(n)]
        n_perm = sizes["contrast_perm"]
        seconds, _ = timed(
            device,
            lambda: condition_difference_test(
                X, Y, labels, "a", "b", "spearman", n_perm, device=device
            ),
        )
        out["contrast_seconds"] = seconds
        out["contrast_seconds_per_10000_extrapolated"] = seconds * 10_000 / n_perm
        say(f"  contrast on {device}: {seconds:.2f} s for {n_perm} permutations")
    return out


def _bare_subpackages(*names: str) -> None:
    """Where pydantic is missing (the device image), make ``object2brain.<name>`` importable
    without its ``__init__`` (which imports the pipeline's options), as ``_bootstrap_imports``
    does for the top package; the encode case only needs leaf modules."""
    try:
        import pydantic  # noqa: F401
    except ImportError:
        for name in names:
            full = f"object2brain.{name}"
            if full not in sys.modules:
                package = types.ModuleType(full)
                package.__path__ = [str(ROOT / "src" / "object2brain" / name)]
                sys.modules[full] = package


def _null_means(smoother: Any, y: np.ndarray, n_perm: int, per_call: int) -> np.ndarray:
    """Mean r of ``n_perm`` seeded relabellings of ``y`` ``(n, v)`` against their refits, as the
    stage's exact test computes them (``per_call`` relabellings per call, all stimuli one mask):
    ``(n_perm,)``."""
    rng = np.random.default_rng(0)
    orders = np.stack([rng.permutation(y.shape[0]) for _ in range(n_perm)])
    mask = [np.ones(y.shape[0], dtype=bool)]
    return np.concatenate(
        [
            smoother.null_mean_r(y, orders[first : first + per_call], mask)[0]
            for first in range(0, n_perm, per_call)
        ]
    )


def _refit_null_timing(
    shape: tuple[int, int, int, int, int, int, int],
    device: torch.device,
    budget: Budget,
) -> dict[str, Any]:
    """The refit null of one layer x ROI: ``n_perm`` relabellings (all of them, as for a
    significant ROI; 8,192 columns per call, as the stage) on ``device`` and a few on the CPU
    (extrapolated)."""
    from object2brain.encoding.folds import outer_folds
    from object2brain.encoding.smoother import fit_torch_smoother

    n, p, v, folds_k, inner, n_alphas, n_perm = shape
    cpu_perm = max(2, n_perm // 250)
    per_call = max(1, 8192 // v)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, p))
    y = x @ rng.standard_normal((p, v)) * 0.05 + rng.standard_normal((n, v))
    folds = outer_folds(n, folds_k, seed=0)
    args = {"alphas": np.logspace(-2, 7, n_alphas), "inner_folds": inner, "seed": 0}
    out: dict[str, Any] = {
        "shape": f"{n} stimuli x {p} features x {v} voxels, {folds_k} folds, {inner} inner "
        f"folds, {n_alphas} alphas, {n_perm} relabellings (no sequential stop)"
    }
    setup, gpu = timed(device, lambda: fit_torch_smoother(x, folds, device=device, **args))
    cpu = fit_torch_smoother(x, folds, device="cpu", **args)
    start = time.perf_counter()
    on_cpu = _null_means(cpu, y, cpu_perm, per_call)
    cpu_s = (time.perf_counter() - start) * n_perm / cpu_perm
    out |= {"device_setup_s": setup, "cpu_s_extrapolated": cpu_s, "cpu_relabellings": cpu_perm}
    if not budget.allows(min(cpu_s, 120.0), f"refit null {n} stimuli on {device}"):
        return out
    seconds, null = timed(device, lambda: _null_means(gpu, y, n_perm, per_call))
    out |= {
        "device_s": seconds,
        "device_ms_per_relabelling": 1000 * seconds / n_perm,
        "ratio_cpu_over_device": cpu_s / seconds,
        "max_null_difference_first_relabellings": float(np.abs(null[:cpu_perm] - on_cpu).max()),
    }
    say(f"  refit null {out['shape']}: {seconds:.2f} s on {device}, CPU ~{cpu_s:.1f} s")
    return out


def case_refit_null(sizes: dict[str, int], device: torch.device, budget: Budget) -> dict[str, Any]:
    """The exact ``refit`` permutation null of the encode stage (see the module docstring)."""
    _bare_subpackages("encoding")
    from object2brain.encoding.folds import outer_folds
    from object2brain.encoding.ridge import reduce_folds
    from object2brain.encoding.smoother import fit_torch_smoother

    rng = np.random.default_rng(0)
    m = 40
    x = rng.standard_normal((m, 100))
    y = x @ rng.standard_normal((100, 50)) * 0.1 + rng.standard_normal((m, 50))
    folds = outer_folds(m, 5, seed=0)
    args = {"alphas": np.logspace(-2, 7, 19), "inner_folds": 5, "seed": 0}
    nulls = [
        _null_means(fit_torch_smoother(x, folds, device=dev, **args), y, 20, 7)
        for dev in ("cpu", device)
    ]
    difference = float(np.abs(nulls[0] - nulls[1]).max())
    out: dict[str, Any] = {
        "dtype": "float64",
        "check": {
            "max_null_difference": difference,
            "tolerance": 1e-10,
            "ok": bool(difference < 1e-10),
        },
    }
    say(f"  refit null check: {out['check']}")
    n, p = sizes["n"], sizes["features"]
    demo_n = 260 if n >= 260 else n
    # the full demo: pca:256 of a wide layer leaves n_T - 1 = 172 dimensions per fold
    reduced = reduce_folds(
        rng.standard_normal((demo_n, 400)),
        outer_folds(demo_n, 3, seed=0),
        pca_dim=256,
        standardize=False,
    )
    demo_dim = reduced[0].x_train.shape[1] if reduced[0].x_train is not None else 400
    v, n_perm = min(200, sizes["voxels"]), 1000 if n >= 260 else 40
    out["demo"] = _refit_null_timing((demo_n, demo_dim, v, 3, 3, 9, n_perm), device, budget)
    out["issue_scale"] = _refit_null_timing((n, p, v, 5, 5, 19, n_perm), device, budget)
    return out


def case_encode(sizes: dict[str, int], device: torch.device, budget: Budget) -> dict[str, Any]:
    """Encoding models at the issue's scale on the device (see the module docstring)."""
    refit_null = case_refit_null(sizes, device, budget)
    try:
        import himalaya  # noqa: F401
    except ImportError:
        return {
            "refit_null": refit_null,
            "skipped": "himalaya is not installed here (pip install himalaya; pure Python)",
        }
    from object2brain.encoding.folds import outer_folds
    from object2brain.encoding.ridge import backend_for, fit_ridge_cv

    alphas = [10.0 ** (-2.0 + 0.5 * i) for i in range(19)]
    backend = backend_for(device)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"sizes": sizes, "backend": backend, "alphas": 19, "folds": 5}
    out["refit_null"] = refit_null
    m, p_check = sizes["check_n"], min(100, sizes["features"])
    x = rng.standard_normal((m, p_check))
    y = x @ rng.standard_normal((p_check, 200)) * 0.1 + rng.standard_normal((m, 200))
    folds = outer_folds(m, 5, seed=0)
    cpu = fit_ridge_cv(x, y, folds, alphas=alphas, inner_folds=5, seed=0, keep_weights=False)
    dev = fit_ridge_cv(
        x, y, folds, alphas=alphas, inner_folds=5, seed=0, keep_weights=False, backend=backend
    )
    same = np.all(cpu.alphas == dev.alphas, axis=0)
    diff = np.abs(cpu.predictions - dev.predictions)[:, same] / y.std()
    out["check"] = {
        "alphas_equal_fraction": float(same.mean()),
        "max_prediction_difference_sd": float(diff.max()) if diff.size else None,
        "tolerance_sd": 1e-3,
        "ok": bool(same.mean() > 0.95 and (diff.size == 0 or diff.max() < 1e-3)),
    }
    say(f"  encode check: {out['check']}")
    n, v = sizes["n"], sizes["voxels"]
    responses = rng.standard_normal((n, v)).astype(np.float32)
    folds = outer_folds(n, 5, seed=0)
    per_layer: list[float] = []
    for layer in range(sizes["layers"]):
        needed = per_layer[-1] if per_layer else 10.0
        if not budget.allows(needed, f"encode layer {layer}"):
            break
        features = rng.standard_normal((n, sizes["features"])).astype(np.float32)
        seconds, _ = timed(
            device,
            lambda f=features: fit_ridge_cv(
                f,
                responses,
                folds,
                alphas=alphas,
                inner_folds=5,
                seed=0,
                keep_weights=False,
                backend=backend,
            ),
        )
        per_layer.append(seconds)
        say(f"  encode layer {layer}: {seconds:.2f} s")
    out["layers_timed"] = len(per_layer)
    out["seconds_per_layer"] = per_layer
    out["seconds_measured"] = sum(per_layer)
    if per_layer:
        steady = float(np.median(per_layer[1:] or per_layer))
        out["seconds_all_layers"] = sum(per_layer) + steady * (sizes["layers"] - len(per_layer))
        out["extrapolated"] = len(per_layer) < sizes["layers"]
        out["goal_met"] = bool(device.type == "cuda" and out["seconds_all_layers"] < 60)
    return out


def _inference_study(
    n: int, layers: int, rois: int, subjects: int, seed: int = 3
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Square model RDMs ``(layers, n, n)`` and per ROI subject RDMs ``(subjects, n, n)``
    (float64, CPU): random dissimilarities, each subject a noisy copy of one layer's."""
    from object2brain.rsa.rdm import squareform

    gen = torch.Generator().manual_seed(seed)
    m = n * (n - 1) // 2
    X = torch.rand(layers, m, generator=gen, dtype=torch.float64)
    rois_out = []
    for t in range(rois):
        noise = torch.rand(subjects, m, generator=gen, dtype=torch.float64)
        rois_out.append(squareform(noise + 0.3 * X[t % layers]))
    return squareform(X), rois_out


def case_inference(sizes: dict[str, int], device: torch.device, budget: Budget) -> dict[str, Any]:
    """The two-factor group bootstrap of issue 18 on the device (see the module docstring)."""
    from types import SimpleNamespace

    from object2brain.rsa import group as g

    n, K, R, S, B = (sizes[k] for k in ("n", "layers", "rois", "subjects", "n_boot"))
    out: dict[str, Any] = {"sizes": sizes, "method": "spearman", "bootstrap": "both"}

    def analysis(targets: list[torch.Tensor], rows: np.ndarray, first: int = 0) -> Any:
        return SimpleNamespace(
            conditions=[SimpleNamespace(name="all", rows=rows)],
            targets=[
                SimpleNamespace(name=f"roi{first + i}", rdms=t) for i, t in enumerate(targets)
            ],
        )

    def settings(dev: torch.device, boot: int, picks: str = "m:l0,m:l1") -> Any:
        return g.GroupSettings("spearman", boot, None, picks, 0, None, dev)

    # check: CPU vs device on a slice
    ns = min(n, sizes["check_n"])
    Xs, rois_s = _inference_study(ns, 3, 1, 4, seed=5)
    plan = g.resample_plan(ns, 4, 50, 1)
    coefs = [g.subject_coefficients(Xs, rois_s[0], "spearman", plan, device=d)
             for d in (torch.device("cpu"), device)]  # fmt: skip
    model_s = [g.ModelRdms("m", ["l0", "l1", "l2"], [0, 1, 2], Xs)]
    rows = [
        g.group_inference_rows(model_s, analysis(rois_s, np.arange(ns)), settings(d, 50),
                               {(0, "all"): (0.0, 0.0)})
        for d in (torch.device("cpu"), device)
    ]  # fmt: skip
    row_diff = max(
        abs(a[k] - b[k]) for a, b in zip(*rows, strict=True) for k in ("mean_r", "se", "ci_low",
                                                                      "ci_high", "p")
    )  # fmt: skip
    coef_diff = max(float(np.abs(getattr(coefs[0], k) - getattr(coefs[1], k)).max())
                    for k in ("r", "boot", "jack"))  # fmt: skip
    out["check"] = {
        "slice": f"{ns} stimuli x 3 layers x 4 subjects, 50 resamples",
        "max_abs_diff_coefficients": coef_diff,
        "max_abs_diff_rows": float(row_diff),
        "tolerance": 1e-9,
        "passed": bool(coef_diff <= 1e-9 and row_diff <= 1e-9),
    }
    say(f"  inference check: {out['check']}")
    X, rois = _inference_study(n, K, R, S)
    model = [g.ModelRdms("m", [f"l{k}" for k in range(K)], list(range(K)), X.to(device))]
    every = np.arange(n)
    g.group_inference_rows(model, analysis([rois[0]], np.arange(min(n, 50))),
                           settings(device, 4), {(0, "all"): (0.0, 0.0)})  # warm-up  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_roi: list[float] = []
    for t in range(R):
        if not budget.allows(per_roi[-1] if per_roi else 30.0, f"inference ROI {t}"):
            break
        seconds, _ = timed(
            device,
            lambda t=t: g.group_inference_rows(
                model, analysis([rois[t].to(device)], every, t), settings(device, B),
                {(0, "all"): (0.0, 0.0)},
            ),
        )  # fmt: skip
        per_roi.append(seconds)
        say(f"  inference ROI {t}: {seconds:.2f} s ({K} layers x {S} subjects x {B} resamples)")
    out["rois_timed"] = len(per_roi)
    out["seconds_per_roi"] = per_roi
    if per_roi:
        steady = float(np.median(per_roi[1:] or per_roi))
        total = sum(per_roi) + steady * (R - len(per_roi))
        out["group_inference_seconds"] = total
        out["extrapolated"] = len(per_roi) < R
        out["resamples_per_s"] = R * B / total  # two-factor resamples of a whole ROI
        # coefficients: (resamples + delete-one rows) x (layers x subjects + lower-ceiling terms)
        out["coefficients_per_s"] = R * (B + n) * (K * S + S) / total
        say(f"  inference on {device}: {total:.1f} s for {R} ROIs"
            f"{' (extrapolated)' if out['extrapolated'] else ''}; "
            f"{out['resamples_per_s']:.1f} resamples/s, "
            f"{out['coefficients_per_s']:.3g} coefficients/s")  # fmt: skip
    if device.type == "cuda":
        out["peak_device_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if budget.allows(per_roi[0] / K * 2 if per_roi else 30.0, "model_comparison"):
        seconds, pairs = timed(
            device,
            lambda: g.model_comparison_rows(model, analysis([rois[0].to(device)], every),
                                            settings(device, B)),
        )  # fmt: skip
        out["model_comparison_seconds"] = seconds
        out["model_comparison_rows"] = len(pairs)
        say(f"  model_comparison (2 listed layers, 1 ROI): {seconds:.2f} s")
    cpu_boot = sizes["cpu_boot"]
    # the baseline (on the CPU also at smoke sizes, so that a dry run exercises it)
    if (device.type == "cuda" or n <= 100) and budget.allows(120, "inference CPU baseline"):
        from object2brain.rsa.rdm import upper_triangle

        cpu = torch.device("cpu")
        A, Y = upper_triangle(X), upper_triangle(rois[0])
        counts = g.resample_plan(n, S, cpu_boot, 0).counts
        t_model, _ = timed(cpu, lambda: g._coefficients(A, Y, "spearman", counts))
        others = (Y.sum(dim=0, keepdim=True) - Y) / (S - 1)
        t_lower, _ = timed(cpu, lambda: g._coefficients(Y, others, "spearman", counts))
        out["cpu_seconds_extrapolated"] = (t_model + t_lower) / cpu_boot * (B + n) * R
        out["cpu_measured"] = f"{t_model + t_lower:.2f} s for {cpu_boot} resamples of one ROI"
        if "group_inference_seconds" in out:
            out["ratio_vs_cpu"] = out["cpu_seconds_extrapolated"] / out["group_inference_seconds"]
        say(f"  inference CPU: {out['cpu_seconds_extrapolated']:.0f} s (extrapolated)")
    return out


def _condensed_prefix(n: int, k: int) -> torch.Tensor:
    """Positions in a condensed vector of ``n`` stimuli of the pairs among the first ``k``."""
    i, j = np.triu_indices(k, 1)
    return torch.as_tensor(i * n - i * (i + 1) // 2 + (j - i - 1))


# ----------------------------------------------------------------------------------------------
# lesion null


def case_lesion(sizes: dict[str, int], device: torch.device, budget: Budget) -> dict[str, Any]:
    from object2brain.lesion.engine import FilterStats, random_subset_masks
    from object2brain.rsa.compare import prepare
    from object2brain.rsa.rdm import rdm_from_features, upper_triangle

    n, K, S, T = sizes["n"], sizes["filters"], sizes["subsets"], sizes["targets"]
    m = n * (n - 1) // 2
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(n, K, 7, 7, generator=gen).clamp_min_(0)
    targets = torch.rand(T, m, generator=gen, dtype=torch.float64)
    masks = ~random_subset_masks(K, sizes["size"], S, seed=1)  # lesion null: drop `size` filters
    out: dict[str, Any] = {"sizes": sizes, "metric": "correlation", "method": "spearman"}
    out["goal_s"] = 60

    def run(dev: torch.device, subsets: int) -> tuple[float, float, np.ndarray]:
        start = time.perf_counter()
        stats = FilterStats.from_activations(acts.to(dev), device=dev)
        sync(dev)
        t_stats = time.perf_counter() - start
        tp = prepare(targets.to(dev), "spearman")
        chunk = stats.subsets_per_chunk(dev)
        rows = []
        for begin in range(0, subsets, chunk):
            rdms = stats.rdms(masks[begin : min(subsets, begin + chunk)], device=dev, strict=False)
            rows.append((prepare(rdms, "spearman") @ tp.T).cpu())
            del rdms
        sync(dev)
        return time.perf_counter() - start, t_stats, torch.cat(rows).numpy()

    check_n = min(S, 16)
    t_dev, t_stats, r_dev = run(device, S)
    out["seconds"] = t_dev
    out["stats_seconds"] = t_stats
    say(f"  lesion on {device}: {t_dev:.2f} s ({t_stats:.2f} s statistics) for {S} subsets")
    if budget.allows(45 if device.type == "cuda" else 5, "lesion CPU check/baseline"):
        sample = min(S, 64)
        t_cpu, t_cpu_stats, r_cpu = run(torch.device("cpu"), sample)
        diff = float(np.abs(r_cpu[:check_n] - r_dev[:check_n]).max())
        out["check"] = {
            "slice": f"first {check_n} subsets",
            "max_abs_diff_r": diff,
            "tolerance": 1e-9,
            "passed": diff <= 1e-9,
        }
        out["cpu_seconds_extrapolated"] = t_cpu_stats + (t_cpu - t_cpu_stats) * S / sample
        out["cpu_measured"] = f"{t_cpu:.2f} s for statistics + {sample} subsets"
        out["ratio_vs_cpu"] = out["cpu_seconds_extrapolated"] / t_dev
    # brute force on the same device: mask, Gram-matrix RDM, ranks, correlate
    brute_n = min(S, 20)
    if budget.allows(30, "lesion brute force"):
        acts_dev = acts.to(device)
        tp = prepare(targets.to(device), "spearman")

        def brute() -> np.ndarray:
            rows = []
            for mask in masks[:brute_n]:
                keep = torch.as_tensor(mask, device=device)[None, :, None, None]
                rdm = upper_triangle(rdm_from_features(acts_dev * keep, device=device))
                rows.append((prepare(rdm[None], "spearman") @ tp.T).cpu())
            return torch.cat(rows).numpy()

        brute()  # warm-up
        t_brute, r_brute = timed(device, brute)
        out["brute_seconds_extrapolated"] = t_brute * S / brute_n
        out["brute_measured"] = f"{t_brute:.2f} s for {brute_n} subsets on {device}"
        out["ratio_vs_brute"] = out["brute_seconds_extrapolated"] / t_dev
        out["brute_max_abs_diff_r"] = float(np.abs(r_brute - r_dev[:brute_n]).max())
    out["goal_met"] = bool(device.type == "cuda" and t_dev < 60)
    return out


# ----------------------------------------------------------------------------------------------
# images


def _make_one(args: tuple[str, int]) -> None:
    from PIL import Image

    path, i = args
    sources = _SOURCES
    source = sources[i % len(sources)]
    rng = np.random.default_rng(i)
    w, h = source.size
    scale = rng.uniform(1.0, 1.6)
    cw, ch = int(w / scale), int(h / scale)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = source.crop((x0, y0, x0 + cw, y0 + ch)).resize((500, 375), Image.Resampling.BILINEAR)
    image.save(path, quality=90)


def _load_sources() -> list[Any]:
    from PIL import Image
    from skimage import data

    return [
        Image.fromarray(getattr(data, name)()).convert("RGB")
        for name in ("astronaut", "coffee", "chelsea", "rocket", "horse", "camera")
    ]


_SOURCES: list[Any] = []


def make_images(folder: Path, n: int) -> list[Path]:
    """``n`` baseline JPEGs of 500 x 375 cut from scikit-image photos (made in parallel)."""
    global _SOURCES
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:05d}.jpg" for i in range(n)]
    todo = [(str(p), i) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        _SOURCES = _load_sources()
        if len(todo) > 64:
            with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
                pool.map(_make_one, todo, chunksize=64)
        else:
            for item in todo:
                _make_one(item)
    return paths


def _scaled_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(a).max(), 1e-30))


# ----------------------------------------------------------------------------------------------
# extraction


def case_extract(
    sizes: dict[str, int], device: torch.device, budget: Budget, work: Path
) -> dict[str, Any]:
    import importlib

    ex = importlib.import_module("object2brain.activations.extract")
    from object2brain.activations.store import ActivationStore
    from object2brain.api.extract import extract
    from object2brain.data.stimuli import load_stimuli
    from object2brain.models import timing
    from object2brain.models.inputs import default_threads, default_workers
    from object2brain.models.layers import LayerRecorder, list_layers
    from object2brain.models.zoo import load_model

    n, batch = sizes["n"], sizes["batch"]
    workers = min(16, os.cpu_count() or 1) if n > batch else 0  # the stage breakdown's loaders
    start = time.perf_counter()
    paths = make_images(work / "images", n)
    out: dict[str, Any] = {"sizes": sizes, "workers": workers, "goal_images_per_s": 5000}
    out["goal_pillow_images_per_s"] = 2500
    out["goal_cache_images_per_s"] = 15000
    out["goal_decoded_images_per_s"] = 15000
    out["default_pillow_workers"] = default_workers(n, batch, device)
    out["default_reading_threads"] = default_threads(device)
    out["image_generation_s"] = time.perf_counter() - start
    model = load_model("resnet18", "none", seed=0)
    layers = [info.name for info in list_layers(model)]
    out["layers"] = layers

    # equality: 16 images, CPU vs device, float32, Pillow decoding; device decoding vs Pillow
    few = load_stimuli(
        __import__("pandas").DataFrame(
            {"stimulus_id": [p.stem for p in paths[:16]], "path": [str(p) for p in paths[:16]]}
        ),
        check="none",
    )
    stores = {}
    decode_failure = None
    for label, dev, decode in (
        ("cpu", "cpu", "pil"),
        ("dev", device, "pil"),
        ("dec", device, "torch"),
    ):
        path = work / f"check_{label}.h5"
        try:
            extract(model, few, out=path, device=dev, batch_size=8, num_workers=0,
                       progress=False, decode=decode, overwrite=True)  # fmt: skip
        except Exception as exc:  # on-device decoding may be unavailable: keep the rest
            if label != "dec":
                raise
            decode_failure = f"{type(exc).__name__}: {exc}"
            say(f"  extract check: on-device decoding failed: {decode_failure}")
            continue
        with ActivationStore.open(path) as store:
            stores[label] = {layer: store.read(layer) for layer in layers}
    out["check"] = {
        "slice": "16 images, float32, all layers; error = max |a - b| / max |a| per layer",
        "device_vs_cpu": max(_scaled_error(stores["cpu"][x], stores["dev"][x]) for x in layers),
        "device_decode_vs_pillow": (
            max(_scaled_error(stores["dev"][x], stores["dec"][x]) for x in layers)
            if "dec" in stores
            else decode_failure
        ),
        "tolerance": "device vs cpu 1e-2 (TF32 convolutions); device decoding 3e-2",
    }
    out["check"]["passed"] = bool(
        out["check"]["device_vs_cpu"] <= 1e-2
        and "dec" in stores
        and out["check"]["device_decode_vs_pillow"] <= 3e-2
    )
    say(f"  extract check: {out['check']}")

    def end_to_end(label: str, count: int, profile: bool = False, **options: Any) -> None:
        if not budget.allows(max(10.0, count / 800), f"extract {label}"):
            return
        table = __import__("pandas").DataFrame(
            {
                "stimulus_id": [p.stem for p in paths[:count]],
                "path": [str(p) for p in paths[:count]],
            }
        )
        subset = load_stimuli(table, check="none")
        store = work / f"{label}.h5"
        try:
            if profile:  # each stage timed alone (synchronised): where the time goes
                with timing.profile_stages() as times:
                    _end_to_end(label, count, subset, store, options)
                out[label]["profile"] = times.as_dict()
                say(f"  extract {label} profile: {out[label]['profile']}")
            else:
                _end_to_end(label, count, subset, store, options)
        except Exception as exc:  # keep the other variants
            out[label] = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"  extract {label}: failed: {exc}")

    def _end_to_end(
        label: str, count: int, subset: Any, store: Path, options: dict[str, Any]
    ) -> None:
        seconds, _ = timed(device, lambda: extract(
            model, subset, out=store, device=device, batch_size=batch,
            progress=False, overwrite=True, **options))  # fmt: skip
        size = store.stat().st_size / 2**20
        store.unlink()
        out[label] = {
            "images": count,
            "seconds": seconds,
            "images_per_s": count / seconds,
            "store_mib": size,
            "options": {k: str(v) for k, v in options.items()},
        }
        say(f"  extract {label}: {count / seconds:.0f} images/s ({seconds:.1f} s)")

    common = {"dtype": "float16", "srp": sizes["srp"]}
    cache = work / "image_cache"
    end_to_end("e2e_pillow", n, decode="pil", **common)
    end_to_end("e2e_device_decode", n, decode="torch", **common)
    end_to_end("e2e_device_decode_bf16_cl", n, decode="torch", amp_dtype="bfloat16",
               channels_last=True, **common)  # fmt: skip
    # the cache: a first run fills it (timed: decoding + appending), the second reads it
    end_to_end("e2e_device_decode_cache_fill", n, decode="torch", image_cache=cache, **common)
    end_to_end("e2e_from_cache", n, decode="torch", image_cache=cache, **common)
    end_to_end("e2e_from_cache_bf16_cl", n, decode="torch", image_cache=cache,
               amp_dtype="bfloat16", channels_last=True, **common)  # fmt: skip
    # stage profiles (slower: every stage synchronised), on up to 2,000 images
    profiled = min(n, 2000)
    end_to_end("profile_device_decode", profiled, profile=True, decode="torch", **common)
    end_to_end("profile_pillow", profiled, profile=True, decode="pil", **common)
    end_to_end("profile_from_cache", profiled, profile=True, decode="torch", image_cache=cache,
               **common)  # fmt: skip
    end_to_end("e2e_full_layers_float16", sizes["n_full"], decode="torch", dtype="float16")

    if budget.allows(25, "extract stage breakdown"):
        try:
            out["stages"] = _extract_stages(ex, model, layers, paths, sizes, device, workers, work)
            say(f"  extract stages (images/s): {out['stages']['images_per_s']}")
        except Exception as exc:  # a profile, not a result: keep the rest
            out["stages"] = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"  extract stages: failed: {exc}")

    # from decoded, preprocessed tensors already on the device
    if budget.allows(20, "extract from decoded tensors"):
        network = model.module.to(device).eval()
        gen = torch.Generator().manual_seed(0)
        inputs = torch.randn(batch, 3, 224, 224, generator=gen).to(device)
        n_batches = max(1, n // batch)
        for label, amp, cl, copy in (
            ("decoded_fp32_forward", None, False, False),
            ("decoded_bf16_cl_forward", torch.bfloat16, True, False),
            ("decoded_fp32_forward_copy_to_host", None, False, True),
        ):
            fmt = torch.channels_last if cl else torch.contiguous_format
            network.to(memory_format=fmt)
            x = inputs.contiguous(memory_format=fmt)
            pinned: dict[str, torch.Tensor] = {}

            def go(x: torch.Tensor = x, amp: Any = amp, copy: bool = copy,
                   pinned: dict[str, torch.Tensor] = pinned) -> None:  # fmt: skip
                with LayerRecorder(network, layers) as rec, torch.inference_mode():
                    for _ in range(n_batches):
                        rec.reset()
                        with torch.autocast(device.type, dtype=amp or torch.float32,
                                            enabled=amp is not None):  # fmt: skip
                            network(x)
                        if copy:
                            for name, value in rec.outputs.items():
                                if name not in pinned:
                                    pinned[name] = torch.empty(
                                        value.shape, dtype=value.dtype,
                                        pin_memory=device.type == "cuda")  # fmt: skip
                                pinned[name].copy_(value, non_blocking=True)

            go()  # warm-up (cuDNN autotuning, allocations)
            seconds, _ = timed(device, go)
            count = n_batches * batch
            out[label] = {"images": count, "seconds": seconds, "images_per_s": count / seconds}
            say(f"  extract {label}: {count / seconds:.0f} images/s")
        network.to(memory_format=torch.contiguous_format)

    # baseline: one image at a time on the CPU
    if budget.allows(20, "extract naive CPU baseline"):
        from object2brain.data.images import load_image

        cpu_net = model.module.to("cpu")
        transform = model.preprocessing.transform()
        naive = sizes["naive"]

        def loop() -> None:
            with LayerRecorder(cpu_net, layers) as rec, torch.inference_mode():
                for path in paths[:naive]:
                    rec.reset()
                    cpu_net(transform(load_image(path))[None])
                    _ = {k: v.numpy() for k, v in rec.outputs.items()}

        seconds, _ = timed(torch.device("cpu"), loop)
        out["naive_cpu"] = {"images": naive, "seconds": seconds, "images_per_s": naive / seconds}
        for label in ("e2e_pillow", "e2e_device_decode"):
            if label in out:
                out[label]["ratio_vs_naive_cpu"] = out[label]["images_per_s"] / (naive / seconds)

    def rate(label: str) -> float:
        return float(out.get(label, {}).get("images_per_s", 0.0))

    cuda = device.type == "cuda"
    out["goal_met"] = bool(cuda and rate("e2e_device_decode") >= 5000)
    out["goal_pillow_met"] = bool(cuda and rate("e2e_pillow") >= 2500)
    out["goal_cache_met"] = bool(cuda and rate("e2e_from_cache") >= 15000)
    decoded = out.get("decoded_fp32_forward", {}).get("images_per_s", 0.0)
    out["goal_decoded_met"] = bool(device.type == "cuda" and decoded >= 15000)
    return out


def _extract_stages(
    ex: Any,
    model: Any,
    layers: list[str],
    paths: list[Path],
    sizes: dict[str, int],
    device: torch.device,
    workers: int,
    work: Path,
) -> dict[str, Any]:
    """Where the end-to-end time goes (decode="torch", float16 + SRP): each stage of
    ``extract._run_batches`` alone on the same images, as images/s; the slowest one bounds the
    end-to-end rate (stages overlap: loader workers, device, writer thread)."""
    from torch.utils.data import DataLoader

    from object2brain.activations.store import StoreWriter
    from object2brain.models import inputs as image_inputs
    from object2brain.models.layers import LayerRecorder

    batch = sizes["batch"]
    count = min(len(paths), 10 * batch)
    ids = [p.stem for p in paths[:count]]
    dataset = image_inputs.EncodedImageDataset(paths[:count], ids, model.preprocessing)
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers,
                        pin_memory=device.type == "cuda",
                        collate_fn=image_inputs.collate_encoded,
                        prefetch_factor=4 if workers else None)  # fmt: skip
    rates: dict[str, float] = {}
    pixels = image_inputs.ImageDataset(paths[:count], ids, model.preprocessing, pixels=True)
    pillow = DataLoader(pixels,
                        batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)  # fmt: skip
    start = time.perf_counter()
    for _ in pillow:
        pass
    rates["loader_pillow_pixels_pin"] = count / (time.perf_counter() - start)
    start = time.perf_counter()
    batches = list(loader)
    rates["loader_read_pin"] = count / (time.perf_counter() - start)
    image_inputs.decode_batch(
        batches[0].payloads(), batches[0].encoded, model.preprocessing, device
    )
    seconds, inputs = timed(device, lambda: [
        image_inputs.decode_batch(b.payloads(), b.encoded, model.preprocessing, device)
        for b in batches])  # fmt: skip
    rates["decode_resize_on_device"] = count / seconds
    network = model.module.to(device).eval()
    projections: dict[str, torch.Tensor] = {}
    dtype = np.dtype(np.float16)

    def compute(to_host: bool) -> list[Any]:
        staged = []
        with LayerRecorder(network, layers) as rec, torch.inference_mode():
            for x in inputs:
                rec.reset()
                network(x)
                blocks = {k: v.float() for k, v in rec.outputs.items()}
                blocks = ex._project_blocks(blocks, sizes["srp"], 0, projections, device)
                if to_host:
                    staged.append(ex._to_host(blocks, dtype, 0, ids[: len(x)]))
        if to_host and staged and staged[-1].copied is not None:
            staged[-1].copied.synchronize()
        return staged

    compute(True)  # warm-up (cuDNN autotuning, projection matrices)
    seconds, _ = timed(device, lambda: compute(False))
    rates["forward_hooks_project"] = count / seconds
    seconds, staged = timed(device, lambda: compute(True))
    rates["forward_hooks_project_copy"] = count / seconds
    path = work / "stages.h5"
    writer = StoreWriter.create(path, [f"s{i}" for i in range(count)], {}, "x")
    start = time.perf_counter()
    for i, item in enumerate(staged):
        arrays = {k: v.numpy() for k, v in item.blocks.items()}
        for k, a in arrays.items():
            writer.ensure_layer(k, count, tuple(a.shape[1:]), dtype)
        writer.write_rows(i * batch, arrays)
    rates["hdf5_write"] = count / (time.perf_counter() - start)
    writer.close()
    ex.partial_path(path).unlink(missing_ok=True)
    return {
        "images": count,
        "batch": batch,
        "workers": workers,
        "images_per_s": {k: round(v) for k, v in rates.items()},
    }


# ----------------------------------------------------------------------------------------------
# dissection


def case_dissect(
    sizes: dict[str, int], device: torch.device, budget: Budget, work: Path
) -> dict[str, Any]:
    import pandas as pd
    from PIL import Image

    from object2brain.api.dissect import dissect
    from object2brain.data.stimuli import load_stimuli
    from object2brain.explain.detectors import Detection, DetectionCache, Detector
    from object2brain.explain.groups import load_groups
    from object2brain.manifest import file_sha256
    from object2brain.models.zoo import load_model

    class SyntheticBoxes(Detector):
        """Three fixed boxes per image (labels of the ``coco`` map), only ever read from cache."""

        kind = "synthetic"

        def detect(self, image: Image.Image, *, stimulus_id: str, path: Path) -> list[Detection]:
            return boxes_for(stimulus_id, image.size[0], image.size[1])

    labels = ["person", "car", "dog", "chair", "cup"]

    def boxes_for(sid: str, w: int, h: int) -> list[Detection]:
        i = int(sid[3:])
        return [
            Detection(float((i * 7 + 40 * k) % (w // 2)), float((i * 5 + 30 * k) % (h // 2)),
                      float((i * 7 + 40 * k) % (w // 2) + w // 3),
                      float((i * 5 + 30 * k) % (h // 2) + h // 3), labels[(i + k) % len(labels)])
            for k in range(3)
        ]  # fmt: skip

    n = sizes["n"]
    start = time.perf_counter()
    paths = make_images(work / "images", n)
    detector = SyntheticBoxes()
    cache_dir = work / "detection_cache"
    cache = DetectionCache(cache_dir, detector)

    def prime(p: Path) -> None:  # what a first run with a real detector leaves behind
        cache.put(file_sha256(p), 500, 375, boxes_for(p.stem, 500, 375))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(prime, paths))
    out: dict[str, Any] = {"sizes": sizes, "goal_s": 30, "boxes_per_image": 3,
                           "decode": "torch"}  # fmt: skip
    out["preparation_s"] = time.perf_counter() - start
    model = load_model("resnet18", "none", seed=0)
    groups = load_groups("coco")

    def run(dev: Any, count: int, batch: int, decode: str = "torch") -> tuple[float, Any]:
        table = pd.DataFrame(
            {
                "stimulus_id": [p.stem for p in paths[:count]],
                "path": [str(p) for p in paths[:count]],
            }
        )
        stimuli = load_stimuli(table, check="none")
        return timed(torch.device(dev), lambda: dissect(
            model, stimuli, layer="layer4", detector=detector, groups=groups, target=0,
            min_images=1, batch_size=batch, device=dev, cache_dir=cache_dir, figures=False,
            num_workers=None if count > batch else 0, decode=decode,
            progress=False))  # fmt: skip

    check = sizes["check"]
    _, on_cpu = run("cpu", check, 16, decode="pil")
    _, on_dev = run(device, check, 16, decode="pil")
    a, b = on_cpu.table, on_dev.table
    diffs = {
        col: float(np.nanmax(np.abs(a[col] - b[col])) / max(np.nanmax(np.abs(a[col])), 1e-30))
        for col in ("importance", "enrichment")
    }
    out["check"] = {
        "slice": f"{check} images; error = max |a - b| / max |a| per column",
        **diffs,
        "tolerance": 1e-2,
        "passed": all(v <= 1e-2 for v in diffs.values()),
    }
    say(f"  dissect check: {out['check']}")
    # A first run on up to 2,000 images gives the rate; the full run goes ahead only if it fits
    # the budget, else the largest part that fits runs and the time is extrapolated (said so).
    probe = min(n, 2000)
    t_probe, _ = run(device, probe, sizes["batch"])
    rate = probe / t_probe
    out["probe"] = {"images": probe, "seconds": t_probe, "images_per_s": rate}
    if budget.allows(15, "dissect probe with Pillow decoding"):
        t_pil, _ = run(device, probe, sizes["batch"], decode="pil")
        out["probe_pillow"] = {"images": probe, "seconds": t_pil,
                               "images_per_s": probe / t_pil}  # fmt: skip
        say(f"  dissect probe: {rate:.0f} images/s (decode=torch), {probe / t_pil:.0f} (Pillow)")
    if budget.allows(20, "dissect stage profile"):
        from object2brain.models import timing

        with timing.profile_stages() as times:
            profiled_s, _ = run(device, probe, sizes["batch"])
        out["profile"] = times.as_dict()  # the image path's read and decode ...
        out["profile"]["seconds"] = profiled_s  # ... out of the whole (profiled) pass
        say(f"  dissect profile: {out['profile']}")
    count = n
    if n > probe and n / rate > budget.left() - 45:
        count = max(probe, int(rate * max(budget.left() - 45, 0) * 0.8))
        budget.skipped.append(f"dissect: {n - count} of {n} images (time extrapolated)")
    if count > probe:
        seconds, result = run(device, count, sizes["batch"])
        out["cache_hits"] = result.summary["cache_hits"]
    else:
        seconds = t_probe
    out["images_measured"] = count
    out["seconds_measured"] = seconds
    out["seconds"] = seconds * n / count
    out["extrapolated"] = count < n
    out["images_per_s"] = count / seconds
    say(
        f"  dissect on {device}: {seconds:.1f} s for {count} images "
        f"({count / seconds:.0f} images/s)"
    )
    if budget.allows(15, "dissect CPU baseline"):
        count = sizes["cpu_images"]
        t_cpu, _ = run("cpu", count, 16, decode="pil")
        out["cpu_images_per_s"] = count / t_cpu
        if "images_per_s" in out:
            out["ratio_vs_cpu"] = out["images_per_s"] / out["cpu_images_per_s"]
    out["goal_met"] = bool(device.type == "cuda" and out["seconds"] < 30)
    return out


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", "--quick", action="store_true", help="tiny sizes (any device)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--cases", default="rsa,lesion,extract,dissect,rsa_stage")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workdir", type=Path, help="image folder (default: a temporary one)")
    args = parser.parse_args(argv)
    from object2brain.devices import resolve_device

    device = resolve_device(args.device)
    sizes = SMOKE if args.smoke else FULL
    budget = Budget(args.budget_s)
    results: dict[str, Any] = {
        "script": "benchmarks/gpu_cases.py",
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "smoke": args.smoke,
        "environment": environment(device),
        "budget_s": args.budget_s,
        "cases": {},
    }
    say(f"gpu_cases on {results['environment']['device_name']} ({device}), smoke={args.smoke}")
    with tempfile.TemporaryDirectory(prefix="o2b-gpu-") as tmp:
        work = args.workdir or Path(tmp)
        for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
            estimate = 5.0 if args.smoke else ESTIMATE_S[name]
            if not budget.allows(estimate, f"case {name}"):
                continue
            say(f"case {name}")
            started = time.perf_counter()
            try:
                if name == "rsa":
                    value = case_rsa(sizes["rsa"], device, budget)
                elif name == "lesion":
                    value = case_lesion(sizes["lesion"], device, budget)
                elif name == "extract":
                    value = case_extract(sizes["extract"], device, budget, work)
                elif name == "dissect":
                    value = case_dissect(sizes["dissect"], device, budget, work)
                elif name == "rsa_stage":
                    value = case_rsa_stage(sizes["rsa_stage"], device, budget)
                elif name == "encode":
                    value = case_encode(sizes["encode"], device, budget)
                elif name == "inference":
                    value = case_inference(sizes["inference"], device, budget)
                else:
                    raise ValueError(f"unknown case {name!r}")
            except Exception as exc:  # keep the other cases' numbers
                import traceback

                traceback.print_exc()
                value = {"error": f"{type(exc).__name__}: {exc}"}
            value["case_wall_s"] = time.perf_counter() - started
            results["cases"][name] = value
            if device.type == "cuda":
                torch.cuda.empty_cache()
            _write(results, args.json)
    results["skipped"] = budget.skipped
    results["total_s"] = time.perf_counter() - budget.start
    _write(results, args.json)
    say(f"done in {results['total_s']:.0f} s; skipped: {budget.skipped or 'nothing'}")
    return results


def _write(results: dict[str, Any], path: Path | None) -> None:
    text = json.dumps(results, indent=2, default=str)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_cases.json").write_text(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


if __name__ == "__main__":
    main()

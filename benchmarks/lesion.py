"""Benchmark: the lesion null from sufficient statistics vs brute force (mask, recompute, compare).

Same work for both: RDMs (correlation distance) of ``n_subsets`` random filter subsets of a layer
``(n_stimuli, K, 7, 7)`` and their Spearman correlation with ``n_targets`` target RDMs.

- ours: ``FilterStats`` once, then one matrix product per chunk of subsets, ranks in torch;
- brute force: for each subset, zero the other filters, ``scipy.spatial.distance.pdist``, rank
  with ``scipy.stats.rankdata`` and correlate (timed on a sample of subsets and extrapolated).

Run: ``.venv/bin/python benchmarks/lesion.py [--stimuli 200 --filters 256 --subsets 1000]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from scipy.spatial.distance import pdist
from scipy.stats import rankdata

from object2brain.lesion.engine import FilterStats, random_subset_masks
from object2brain.rsa.compare import compare


def run(
    stimuli: int = 200,
    filters: int = 256,
    subsets: int = 1000,
    targets: int = 20,
    brute_sample: int = 20,
    device: str = "cpu",
) -> dict[str, object]:
    """Time ours vs brute force; returns the figures as a dict."""
    dev = torch.device(device)
    rng = np.random.default_rng(0)
    n, k = stimuli, filters
    acts = np.maximum(rng.normal(size=(n, k, 7, 7)), 0).astype(np.float32)
    target_rdms = rng.random((targets, n * (n - 1) // 2))
    masks = random_subset_masks(k, k // 8, subsets, seed=1)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"device {dev}; {n} stimuli, {k} filters of 7x7, {subsets} subsets, {targets} targets"
    )

    start = time.perf_counter()
    stats = FilterStats.from_activations(acts, device=dev)
    prepared = time.perf_counter() - start
    r_ours = []
    for begin in range(0, len(masks), 256):
        rdms = stats.rdms(masks[begin : begin + 256], "correlation", device=dev)
        r_ours.append(compare(rdms, torch.as_tensor(target_rdms, device=dev), "spearman").cpu())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ours = time.perf_counter() - start
    r_ours_all = torch.cat(r_ours).numpy()

    target_ranks = np.stack([rankdata(t) for t in target_rdms])
    target_z = (target_ranks - target_ranks.mean(1, keepdims=True)) / target_ranks.std(
        1, keepdims=True
    )
    sample = min(brute_sample, len(masks))
    start = time.perf_counter()
    r_brute = []
    for mask in masks[:sample]:
        rdm = pdist((acts * mask[None, :, None, None]).reshape(n, -1), "correlation")
        ranks = rankdata(rdm)
        z = (ranks - ranks.mean()) / ranks.std()
        r_brute.append(target_z @ z / len(z))
    brute = (time.perf_counter() - start) / sample * len(masks)
    error = float(np.abs(np.asarray(r_brute) - r_ours_all[:sample]).max())
    print(f"  ours (stats {prepared:.2f} s included): {ours:8.2f} s")
    print(f"  brute force (extrapolated from {sample}): {brute:8.2f} s")
    print(f"  ratio: {brute / ours:.1f}x; max |r_ours - r_brute| = {error:.2e}")
    return {
        "scenario": f"{n} stimuli, {k} filters of 7x7, {subsets} subsets, {targets} targets",
        "ours_s": ours,
        "ours_stats_s": prepared,
        "brute_force_s": brute,
        "brute_measured": f"{sample} subsets, extrapolated linearly",
        "ratio": brute / ours,
        "max_abs_diff_r": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stimuli", type=int, default=200)
    parser.add_argument("--filters", type=int, default=256)
    parser.add_argument("--subsets", type=int, default=1000)
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--brute-sample", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run(args.stimuli, args.filters, args.subsets, args.targets, args.brute_sample, args.device)


if __name__ == "__main__":
    main()

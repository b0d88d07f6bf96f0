"""Benchmark of the batched Mantel permutation test against a loop over rsatoolbox ``compare``.

Scenario A (the issue's): 300 stimuli x 10 layers x 6 ROIs x 5,000 permutations, Spearman.
- ours: :func:`object2brain.rsa.inference.mantel_test` (ranks once, permutations as gathers,
  batched matrix products);
- rsatoolbox: for every layer and permutation, permute the model RDM (a gather on its condensed
  vector, the cheapest way) and call ``rsatoolbox.rdm.compare(permuted, rois, "spearman")``.
  That loop is timed on a subset of the permutations and extrapolated linearly (said so below).
Scenario B: ours on 1,000 stimuli x 10 layers x 6 ROIs x 10,000 permutations.

Run: ``.venv/bin/python benchmarks/rsa.py [--device cpu] [--quick]``; ``run(...)`` returns the
figures as a dict (used by ``benchmarks/run_all.py``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from object2brain.rsa.inference import mantel_test, pair_permutation, permutations
from object2brain.rsa.rdm import rdm_from_features, upper_triangle


def _vectors(rng: np.random.Generator, k: int, n: int, p: int = 64) -> torch.Tensor:
    return upper_triangle(
        torch.stack([rdm_from_features(rng.normal(size=(n, p)), device="cpu") for _ in range(k)])
    )


def run(
    device: str = "cpu",
    sizes: tuple[int, int, int, int] = (300, 10, 6, 5_000),
    subset: int = 50,
    scenario_b: tuple[int, int] | None = (1_000, 10_000),
) -> dict[str, object]:
    """Scenario A at ``sizes`` = (stimuli, layers, ROIs, permutations), then B if given."""
    rng = np.random.default_rng(0)
    n, layers, rois, n_perm = sizes

    X, Y = _vectors(rng, layers, n), _vectors(rng, rois, n)
    start = time.perf_counter()
    ours = mantel_test(X, Y, "spearman", n_perm, seed=0, device=device)
    t_ours = time.perf_counter() - start

    import rsatoolbox

    roi_rdms = rsatoolbox.rdm.RDMs(Y.numpy())
    Xn = X.numpy()
    subset = min(subset, n_perm)
    perms = np.concatenate(list(permutations(n, subset, seed=0)))
    index = pair_permutation(perms).numpy()
    counts = np.zeros((layers, rois))
    start = time.perf_counter()
    observed = rsatoolbox.rdm.compare(rsatoolbox.rdm.RDMs(Xn), roi_rdms, method="spearman")
    for k in range(layers):
        for idx in index:
            r = rsatoolbox.rdm.compare(
                rsatoolbox.rdm.RDMs(Xn[k, idx][None]), roi_rdms, method="spearman"
            )
            counts[k] += r[0] >= observed[k] - 1e-12
    t_subset = time.perf_counter() - start
    t_rsa = t_subset * n_perm / subset
    np.testing.assert_allclose(observed, ours.r, atol=1e-8)

    print(f"scenario A: {n} stimuli x {layers} layers x {rois} ROIs x {n_perm} permutations")
    print(f"  ours ({device}, float64):  {t_ours:9.2f} s")
    print(
        f"  rsatoolbox loop:           {t_rsa:9.2f} s  (extrapolated from {subset} of {n_perm} "
        f"permutations x {layers} layers, measured {t_subset:.2f} s)"
    )
    print(f"  speed-up:                  {t_rsa / t_ours:9.1f} x")
    result: dict[str, object] = {
        "scenario": f"{n} stimuli x {layers} layers x {rois} ROIs x {n_perm} perms, spearman",
        "ours_s": t_ours,
        "rsatoolbox_loop_s": t_rsa,
        "rsatoolbox_measured": f"{t_subset:.2f} s for {subset} of {n_perm} permutations, "
        "extrapolated linearly",
        "ratio": t_rsa / t_ours,
    }
    if scenario_b is not None:
        n_b, perm_b = scenario_b
        Xb, Yb = _vectors(rng, layers, n_b), _vectors(rng, rois, n_b)
        start = time.perf_counter()
        mantel_test(Xb, Yb, "spearman", perm_b, seed=0, device=device)
        t_b = time.perf_counter() - start
        print(f"scenario B: {n_b} stimuli x {layers} layers x {rois} ROIs x {perm_b} permutations")
        print(f"  ours ({device}, float64):  {t_b:9.2f} s")
        result["scenario_b"] = f"{n_b} stimuli x {layers} x {rois} x {perm_b} permutations"
        result["scenario_b_ours_s"] = t_b
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    parser.add_argument("--subset", type=int, default=50, help="rsatoolbox permutations timed")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run(
        args.device,
        (60, 3, 2, 200) if args.quick else (300, 10, 6, 5_000),
        args.subset,
        (200, 500) if args.quick else (1_000, 10_000),
    )


if __name__ == "__main__":
    main()

"""Benchmark of the batched Mantel permutation test against a loop over rsatoolbox ``compare``.

Scenario A (the issue's): 300 stimuli x 10 layers x 6 ROIs x 5,000 permutations, Spearman.
- ours: :func:`object2brain.rsa.inference.mantel_test` (ranks once, permutations as gathers,
  batched matrix products);
- rsatoolbox: for every layer and permutation, permute the model RDM (a gather on its condensed
  vector, the cheapest way) and call ``rsatoolbox.rdm.compare(permuted, rois, "spearman")``.
  That loop is timed on a subset of the permutations and extrapolated linearly (said so below).
Scenario B: ours on 1,000 stimuli x 10 layers x 6 ROIs x 10,000 permutations.
Scenario C: stimulus-bootstrap CI, 300 stimuli x 10 layers x 6 ROIs x 1,000 resamples, Spearman.
- ours: :func:`object2brain.rsa.inference.bootstrap_ci` (each resample is the original pairs
  under weights ``c_a c_b``; ranks from cumulative weights in a sort order computed once);
- explicit loop: per resample, gather the resampled pairs, drop a stimulus's pairs with its own
  copy, and call ``rsatoolbox.rdm.compare(layers, rois, "spearman")`` once (all layers x ROIs);
  timed on a subset of the resamples and extrapolated linearly.
Scenario D: condition contrast, 300 stimuli (150 + 150) x 10 layers x 6 ROIs x 1,000 permutations
of the condition labels, Spearman.
- ours: :func:`object2brain.rsa.inference.condition_difference_test`;
- rsatoolbox loop: per permutation and condition, ``rsatoolbox.rdm.compare(layers, rois)`` on
  the pairs within the condition; timed on a subset of the permutations and extrapolated.

Run: ``.venv/bin/python benchmarks/rsa.py [--device cpu] [--quick]``; ``run(...)`` returns the
figures as a dict (used by ``benchmarks/run_all.py``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from object2brain.rsa.inference import (
    bootstrap_ci,
    condition_difference_test,
    mantel_test,
    pair_permutation,
    permutations,
)
from object2brain.rsa.rdm import rdm_from_features, squareform, upper_triangle


def _vectors(rng: np.random.Generator, k: int, n: int, p: int = 64) -> torch.Tensor:
    return upper_triangle(
        torch.stack([rdm_from_features(rng.normal(size=(n, p)), device="cpu") for _ in range(k)])
    )


def run(
    device: str = "cpu",
    sizes: tuple[int, int, int, int] = (300, 10, 6, 5_000),
    subset: int = 50,
    scenario_b: tuple[int, int] | None = (1_000, 10_000),
    bootstrap: tuple[int, int, int] | None = (300, 1_000, 20),
    contrast: tuple[int, int, int] | None = (300, 1_000, 20),
) -> dict[str, object]:
    """Scenario A at ``sizes`` = (stimuli, layers, ROIs, permutations), then B if given, then C
    with ``bootstrap`` = (stimuli, resamples, resamples of the loop timed) if given."""
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
    if bootstrap is not None:
        result.update(_bootstrap(rng, device, layers, rois, *bootstrap))
    if contrast is not None:
        result.update(_contrast(rng, device, layers, rois, *contrast))
    return result


def _contrast(
    rng: np.random.Generator, device: str, layers: int, rois: int, n: int, n_perm: int, loop: int
) -> dict[str, object]:
    import rsatoolbox

    X, Y = squareform(_vectors(rng, layers, n)), squareform(_vectors(rng, rois, n))
    labels = ["a" if i % 2 else "b" for i in range(n)]
    start = time.perf_counter()
    ours = condition_difference_test(X, Y, labels, "a", "b", "spearman", n_perm, device=device)
    t_ours = time.perf_counter() - start

    loop = min(loop, n_perm)
    lab = np.asarray(labels)
    pool = np.concatenate([np.flatnonzero(lab == "a"), np.flatnonzero(lab == "b")])
    n_a = int(np.sum(lab == "a"))
    Xn, Yn = X.numpy(), Y.numpy()

    def r_within(rows: np.ndarray) -> np.ndarray:
        i, j = np.triu_indices(len(rows), 1)
        a, b = rows[i], rows[j]
        return np.asarray(
            rsatoolbox.rdm.compare(
                rsatoolbox.rdm.RDMs(Xn[:, a, b]), rsatoolbox.rdm.RDMs(Yn[:, a, b]), "spearman"
            )
        )

    delta = r_within(pool[:n_a]) - r_within(pool[n_a:])
    start = time.perf_counter()
    for perm in np.concatenate(list(permutations(len(pool), loop, seed=0))):
        shuffled = pool[perm]
        r_within(shuffled[:n_a]) - r_within(shuffled[n_a:])
    t_loop = time.perf_counter() - start
    t_peer = t_loop * n_perm / loop
    max_diff = float(np.abs(ours.delta - delta).max())
    print(
        f"scenario D: condition contrast, {n} stimuli x {layers} x {rois} x {n_perm} permutations"
    )
    print(f"  ours ({device}, float64):  {t_ours:9.2f} s")
    print(
        f"  rsatoolbox loop:           {t_peer:9.2f} s  (extrapolated from {loop} permutations, "
        f"measured {t_loop:.2f} s)"
    )
    print(f"  speed-up:                  {t_peer / t_ours:9.1f} x  (observed deltas differ by "
          f"{max_diff:.1e})")  # fmt: skip
    return {
        "contrast_scenario": f"condition contrast, {n} stimuli ({n_a} + {n - n_a}) x {layers} "
        f"layers x {rois} ROIs x {n_perm} perms, spearman",
        "contrast_ours_s": t_ours,
        "contrast_loop_s": t_peer,
        "contrast_loop_measured": f"{t_loop:.2f} s for {loop} of {n_perm} permutations, "
        "extrapolated linearly",
        "contrast_ratio": t_peer / t_ours,
        "contrast_max_abs_diff": max_diff,
    }


def _bootstrap(
    rng: np.random.Generator, device: str, layers: int, rois: int, n: int, n_boot: int, loop: int
) -> dict[str, object]:
    import rsatoolbox

    X, Y = squareform(_vectors(rng, layers, n)), squareform(_vectors(rng, rois, n))
    start = time.perf_counter()
    low, high = bootstrap_ci(X, Y, "spearman", n_boot, seed=0, device=device)
    t_ours = time.perf_counter() - start

    loop = min(loop, n_boot)
    draws = np.random.default_rng([0, 7_919])  # the same resamples as ours
    i, j = np.triu_indices(n, 1)
    Xn, Yn = X.numpy(), Y.numpy()
    values = []
    start = time.perf_counter()
    for _ in range(loop):
        idx = draws.integers(0, n, size=n)
        keep = idx[i] != idx[j]
        a, b = idx[i][keep], idx[j][keep]
        values.append(
            rsatoolbox.rdm.compare(
                rsatoolbox.rdm.RDMs(Xn[:, a, b]), rsatoolbox.rdm.RDMs(Yn[:, a, b]), "spearman"
            )
        )
    t_loop = time.perf_counter() - start
    # the same first resamples, ours: equal coefficients (checked on the loop's subset)
    ours_first = bootstrap_ci(X, Y, "spearman", loop, seed=0, device=device)
    with np.errstate(all="ignore"):
        low_loop = np.nanquantile(np.stack(values), 0.025, axis=0)
    max_diff = float(np.abs(ours_first[0] - low_loop).max())
    t_peer = t_loop * n_boot / loop
    print(f"scenario C: bootstrap CI, {n} stimuli x {layers} x {rois} x {n_boot} resamples")
    print(f"  ours ({device}, float64):  {t_ours:9.2f} s")
    print(
        f"  explicit rsatoolbox loop:  {t_peer:9.2f} s  (extrapolated from {loop} resamples, "
        f"measured {t_loop:.2f} s)"
    )
    print(f"  speed-up:                  {t_peer / t_ours:9.1f} x  (lower bounds differ by "
          f"{max_diff:.1e} on the first {loop} resamples)")  # fmt: skip
    return {
        "bootstrap_scenario": f"bootstrap CI, {n} stimuli x {layers} layers x {rois} ROIs x "
        f"{n_boot} resamples, spearman",
        "bootstrap_ours_s": t_ours,
        "bootstrap_loop_s": t_peer,
        "bootstrap_loop_measured": f"{t_loop:.2f} s for {loop} of {n_boot} resamples, "
        "extrapolated linearly",
        "bootstrap_ratio": t_peer / t_ours,
        "bootstrap_max_abs_diff": max_diff,
        "bootstrap_ci_width_mean": float(np.nanmean(high - low)),
    }


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
        (60, 100, 10) if args.quick else (300, 1_000, 20),
        (60, 100, 10) if args.quick else (300, 1_000, 20),
    )


if __name__ == "__main__":
    main()

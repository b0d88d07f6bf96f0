"""Benchmark of the two-factor (stimuli x subjects) bootstrap against rsatoolbox's
``eval_dual_bootstrap`` on the same data, in one process.

Data: ``n`` stimuli, ``L`` model layers (fixed model RDMs), ``R`` ROIs of ``S`` subjects each
(noisy measurements of the features a layer sees), Spearman, ``B`` resamples.

- ours: per ROI, :func:`object2brain.rsa.group.resample_plan`,
  :func:`~object2brain.rsa.group.subject_coefficients` (every resample as pair weights on the
  original pairs, all layers and subjects at once) and
  :func:`~object2brain.rsa.group.estimate` with ``pair_correction=False`` (rsatoolbox's
  corrected dual-bootstrap variance, the same estimator; the tables report the pair-corrected
  one, which costs the ``n`` delete-one evaluations more);
- rsatoolbox: per ROI, ``rsatoolbox.inference.eval_dual_bootstrap(models, data,
  method="spearman", N=B)`` (``use_correction=True``, its default), ``get_sem()``.

Printed: both run times, their ratio, and the relative difference of the standard errors per
(layer, ROI) (both are Monte-Carlo estimates: they agree to about 15% at ``B >= 1,000``).

Run: ``PYTHONPATH=src python benchmarks/inference.py`` (reduced: 30 stimuli x 3 layers x 1 ROI
x 5 subjects x 1,000 resamples, a few minutes here) or ``--size issue`` (300 stimuli x 10 layers
x 6 ROIs x 8 subjects x 1,000 resamples; rsatoolbox's side takes hours: ``--rsatoolbox-rois 1
--rsatoolbox-resamples 100`` times it on one ROI and 100 resamples and extrapolates linearly in
ROIs and resamples, its cost being one evaluation per resample). ``--out FILE`` writes the
figures as JSON, with the machine's load average before and after.

Ours is timed as the tables run it: the resamples, the ``n`` delete-one evaluations and both
estimators (``se_ours``: rsatoolbox's, compared with its SEs; ``se_ours_tables``: the corrected
one the ``group_inference`` table reports).

``--relabelling`` times instead the ``p`` of ``stimuli`` rows at the same size: the relabelling
test of the subject mean (:func:`object2brain.rsa.group.relabelling_test`, ``--n-perm``
relabellings, default the rsa default 10,000) against the score test it replaced
(:func:`~object2brain.rsa.group.association_test`), every ROI, in one process, CPU seconds
(``time.process_time``) and wall seconds, ratio printed; ``--bootstrap-rois k`` adds the cost of
the group bootstrap of ``k`` ROIs (what a ``group_inference`` cell costs anyway) for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from object2brain.rsa import group as g


def correlation_rdms(patterns: np.ndarray) -> np.ndarray:
    """``1 - r`` RDMs ``(R, n, n)`` of patterns ``(R, n, p)``."""
    z = patterns - patterns.mean(axis=-1, keepdims=True)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    return np.asarray(1.0 - z @ np.swapaxes(z, -1, -2))


def make_data(n: int, L: int, R: int, S: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Layer RDMs ``(L, n, n)`` and subject RDMs ``(R, S, n, n)``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    layers = np.stack([x @ rng.normal(size=(8, 30)) + (1 + k) * rng.normal(size=(n, 30))
                       for k in range(L)])  # fmt: skip
    subjects = np.stack([
        np.stack([x @ rng.normal(size=(8, 40)) + 3 * rng.normal(size=(n, 40)) for _ in range(S)])
        for _ in range(R)
    ])  # fmt: skip
    return correlation_rdms(layers), np.stack([correlation_rdms(s) for s in subjects])


def ours(layers: np.ndarray, subjects: np.ndarray, B: int) -> tuple[np.ndarray, np.ndarray, float]:
    """SEs ``(L, R)`` of rsatoolbox's estimator and of the tables' corrected one, and seconds."""
    start = time.perf_counter()
    n, S = layers.shape[-1], subjects.shape[1]
    models = torch.as_tensor(layers)
    out, tables = [], []
    for roi, subs in enumerate(subjects):
        plan = g.resample_plan(n, S, B, (0, roi))
        coef = g.subject_coefficients(models, torch.as_tensor(subs), "spearman", plan)
        out.append(g.estimate(coef, plan, "both", pair_correction=False).se)
        tables.append(g.estimate(coef, plan, "both").se)
        seconds = time.perf_counter() - start
        print(f"ours: ROI {roi + 1}/{len(subjects)} {seconds:.0f} s", flush=True)
    return np.stack(out, axis=1), np.stack(tables, axis=1), time.perf_counter() - start


def theirs(layers: np.ndarray, subjects: np.ndarray, B: int, rois: int) -> tuple[np.ndarray, float]:
    """rsatoolbox's SEs ``(L, rois)`` and seconds for the first ``rois`` ROIs."""
    import rsatoolbox

    iu = np.triu_indices(layers.shape[-1], 1)
    models = [rsatoolbox.model.ModelFixed(f"layer{k}", rdm[iu]) for k, rdm in enumerate(layers)]
    start = time.perf_counter()
    out = []
    np.random.seed(0)  # noqa: NPY002 (rsatoolbox draws from the legacy global generator)
    for subs in subjects[:rois]:
        data = rsatoolbox.rdm.RDMs(subs[:, iu[0], iu[1]], dissimilarity_measure="corr")
        result = rsatoolbox.inference.eval_dual_bootstrap(models, data, method="spearman", N=B)
        out.append(np.asarray(result.get_sem()))
    return np.stack(out, axis=1), time.perf_counter() - start


def run(
    n: int, L: int, R: int, S: int, B: int, rsatoolbox_rois: int, rsatoolbox_resamples: int
) -> dict[str, Any]:
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    layers, subjects = make_data(n, L, R, S)
    se_ours, se_tables, t_ours = ours(layers, subjects, B)
    rois, b_theirs = min(R, rsatoolbox_rois), min(B, rsatoolbox_resamples)
    se_theirs, t_theirs = theirs(layers, subjects, b_theirs, rois)
    t_theirs_all = t_theirs * (R / rois) * (B / b_theirs)
    rel = np.abs(se_ours[:, :rois] / se_theirs - 1)
    return {
        "size": {"stimuli": n, "layers": L, "rois": R, "subjects": S, "resamples": B},
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores (shared), "
        "one torch thread",
        "load_average_before_after": [round(x, 1) for x in (*load_before, *os.getloadavg())],
        "seconds_ours": round(t_ours, 2),
        "seconds_rsatoolbox": round(t_theirs_all, 2),
        "seconds_rsatoolbox_measured": round(t_theirs, 2),
        "rsatoolbox_timed_rois": rois,
        "rsatoolbox_timed_resamples": b_theirs,
        "rsatoolbox_extrapolated": rois < R or b_theirs < B,
        "ratio_rsatoolbox_over_ours": round(t_theirs_all / t_ours, 1),
        "se_relative_difference_max": float(rel.max()),
        "se_relative_difference_median": float(np.median(rel)),
        "se_ours": se_ours[:, :rois].round(5).tolist(),
        "se_rsatoolbox": se_theirs.round(5).tolist(),
        "se_ours_tables": se_tables[:, :rois].round(5).tolist(),
    }


def relabelling(
    n: int, L: int, R: int, S: int, B: int, n_perm: int, bootstrap_rois: int
) -> dict[str, Any]:
    """CPU and wall seconds of the ``stimuli`` p (relabelling test) and of the score test over
    ``R`` ROIs, and of the group bootstrap of ``bootstrap_rois`` ROIs."""
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    layers, subjects = make_data(n, L, R, S)
    models = torch.as_tensor(layers)

    def timed(fn: Any) -> tuple[list[Any], float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = [fn(torch.as_tensor(subs), roi) for roi, subs in enumerate(subjects)]
        return out, time.process_time() - cpu, time.perf_counter() - wall

    perm, perm_cpu, perm_wall = timed(
        lambda subs, roi: g.relabelling_test(models, subs, "spearman", n_perm, roi)
    )
    score, score_cpu, score_wall = timed(
        lambda subs, roi: g.association_test(models, subs, "spearman", "stimuli")
    )
    boot_cpu = 0.0
    for roi in range(bootstrap_rois):
        cpu = time.process_time()
        plan = g.resample_plan(n, S, B, (0, roi))
        coef = g.subject_coefficients(models, torch.as_tensor(subjects[roi]), "spearman", plan)
        g.estimate(coef, plan, "stimuli")
        boot_cpu += time.process_time() - cpu
    return {
        "size": {"stimuli": n, "layers": L, "rois": R, "subjects": S, "n_perm": n_perm},
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores (shared), "
        "one torch thread",
        "load_average_before_after": [round(x, 1) for x in (*load_before, *os.getloadavg())],
        "cpu_seconds_relabelling": round(perm_cpu, 2),
        "wall_seconds_relabelling": round(perm_wall, 2),
        "cpu_seconds_score_test": round(score_cpu, 3),
        "wall_seconds_score_test": round(score_wall, 3),
        "ratio_relabelling_over_score": round(perm_cpu / score_cpu, 1),
        "bootstrap_rois": bootstrap_rois,
        "bootstrap_resamples": B,
        "cpu_seconds_bootstrap_per_roi": round(boot_cpu / bootstrap_rois, 1)
        if bootstrap_rois
        else None,
        "relabelling_share_of_a_cell": round(
            perm_cpu / R / (perm_cpu / R + boot_cpu / bootstrap_rois), 3
        )
        if bootstrap_rois
        else None,
        "smallest_p": float(min(p.min() for p in perm)),
        "rejected_at_0.05": [int((p < 0.05).sum()) for p in perm],
        "score_rejected_at_0.05": [int((t.p < 0.05).sum()) for t in score],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["reduced", "issue"], default="reduced")
    parser.add_argument("--issue", action="store_true", help="--size issue")
    parser.add_argument("--rsatoolbox-rois", type=int, default=1)
    parser.add_argument("--rsatoolbox-resamples", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--relabelling", action="store_true", help="time the stimuli p")
    parser.add_argument("--n-perm", type=int, default=10_000)
    parser.add_argument("--bootstrap-rois", type=int, default=0)
    args = parser.parse_args()
    issue = args.issue or args.size == "issue"
    size = (300, 10, 6, 8, 1000) if issue else (30, 3, 1, 5, 1000)
    figures = (
        relabelling(*size, args.n_perm, args.bootstrap_rois)
        if args.relabelling
        else run(*size, args.rsatoolbox_rois, args.rsatoolbox_resamples)
    )
    print(json.dumps(figures, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()

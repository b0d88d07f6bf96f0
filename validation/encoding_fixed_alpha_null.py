"""Calibration, power and cost of the ``fixed_alpha`` permutation null of the encoding stage.

``perm_null = fixed_alpha`` relabels the responses and refits every relabelled voxel with the
alphas its real responses chose (per outer fold), skipping the inner alpha search
(:class:`object2brain.encoding.smoother.FixedAlphaSmoother`). It keeps what makes the
``predictions`` null conservative (each fold's predictions depend on the other folds'
responses: the out-of-fold r of ridge is biased negative under the null) but ignores the
selection of alpha, so its false-positive rate is measured here, not assumed.

Settings (``--setting``, repeatable; each dataset's p-values from the same seeded permutations
as the stage):

- ``small``: 60 stimuli, 20 Gaussian features, 10 voxels, 5 outer / 5 inner folds, the default
  19 alphas: the datasets of ``validation/encoding_null.py`` (same generator and seeds), where the
  exact ``refit`` test rejected 5.00% and ``predictions`` 1.75% of 400 at 0.05;
- ``power_small``: ``small`` with a planted effect ``Y = s X W + E`` (``s = 0.2``), also
  with the exact ``refit`` test (sequential, ``perm_stop`` 10, as in the stage);
- ``small_moments``: ``small`` with the exact refit null (``refit_full``: rank p of all its
  ``n_perm`` draws) and cheaper readings of its first ``R`` draws: ``refit_tR`` (Student-t
  prediction p, a normal null with the draws' mean and sd), ``refit_rank59`` (rank p of 59
  draws) and ``refit_hybrid59`` (the stage's ``refit_tail`` p with ``n_perm`` 59: the rank p of
  59 draws, extended below its floor 1/60 by the t p when no draw reaches the observed value);
- ``demo_decay_moments``: the full demo's encode shape (260 stimuli, 400 Gaussian features
  scaled by ``(j + 1)^-1`` like a network layer's decaying spectrum, ``pca:256`` -> 172
  dimensions per fold, 200 voxels, 3 outer / 3 inner folds stratified by 3 conditions, alphas
  ``10^-1 .. 10^7``), the ``all`` row and the 3 condition rows tested from the same
  relabellings (as in the stage), with the readings of ``small_moments`` from 99 exact refits;
- ``power_demo``: the demo shape with flat features and a planted effect (``s = 0.15``).

Per dataset: ``fixed_alpha`` (all ``n_perm``), its sequential p with stop 10 from the same null
(the stage's default ``perm_stop``) and ``predictions``. Null settings: the rejection rate at 0.01
/ 0.05 / 0.10 must lie in the binomial 95% interval around the level; Kolmogorov-Smirnov p of
the full test's p-values against the uniform.

Run (the recorded results; one thread, ``OMP_NUM_THREADS=1``)::

    PYTHONPATH=src nice -n 10 python validation/encoding_fixed_alpha_null.py \\
        --setting small --setting power_small --datasets 1000 --n-perm 1000 \\
        --out validation/encoding_fixed_alpha_null_small.json   # power_small stopped at 550
    ... --setting small_moments --datasets 1000 --n-perm 200 --out ..._moments.json
    ... --setting demo_decay_moments --datasets 200 --n-perm 200 --out ..._demo.json
    ... --setting power_demo --datasets 100 --n-perm 200 --out ..._power_demo.json

Each ``--out`` JSON (with a ``.md`` table beside it) is written every 50 datasets, so an
interrupted run keeps its progress (``--resume`` continues it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent))

from encoding_null import null_dataset

from object2brain.encoding.folds import outer_folds
from object2brain.encoding.ridge import fit_ridge_cv, reduce_folds
from object2brain.encoding.scores import (
    normal_tail_p,
    permutation_test,
    refit_permutation_tests,
    sequential_p,
    tail_p,
)
from object2brain.encoding.smoother import (
    fit_fixed_alpha_smoother,
    fit_torch_smoother,
)
from object2brain.options import EncodeOptions

LEVELS = (0.01, 0.05, 0.10)
STOP = 10
SHAPES: dict[str, dict[str, Any]] = {
    "small": {"n": 60, "p": 20, "v": 10, "folds": 5, "inner": 5, "pca": None,
              "alphas": list(EncodeOptions().alphas), "conditions": 0, "decay": False,
              "signal": 0.0, "refit": False},
    "small_moments": {"n": 60, "p": 20, "v": 10, "folds": 5, "inner": 5, "pca": None,
                      "alphas": list(EncodeOptions().alphas), "conditions": 0, "decay": False,
                      "signal": 0.0, "refit": False, "moments": True},
    "demo_decay_moments": {"n": 260, "p": 400, "v": 200, "folds": 3, "inner": 3, "pca": 256,
                           "alphas": [10.0**k for k in range(-1, 8)], "conditions": 3,
                           "decay": True, "signal": 0.0, "refit": False, "moments": True,
                           "refit_draws": 99},
    "power_demo": {"n": 260, "p": 400, "v": 200, "folds": 3, "inner": 3, "pca": 256,
                   "alphas": [10.0**k for k in range(-1, 8)], "conditions": 3, "decay": False,
                   "signal": 0.15, "refit": False, "moments": True, "refit_draws": 99},
    "power_small": {"n": 60, "p": 20, "v": 10, "folds": 5, "inner": 5, "pca": None,
                    "alphas": list(EncodeOptions().alphas), "conditions": 0, "decay": False,
                    "signal": 0.2, "refit": True},
}  # fmt: skip


def dataset(index: int, shape: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Features ``(n, p)``, responses ``(n, v)`` and condition labels ``(n,)`` (or ``None``)."""
    n, p, v = shape["n"], shape["p"], shape["v"]
    if not shape["pca"]:
        x, y = null_dataset(index, n, p, v, shape["signal"])
        return x, y, None
    rng = np.random.default_rng([2026, index])
    x = rng.standard_normal((n, p))
    if shape["decay"]:
        x /= np.arange(1, p + 1)
    y = rng.standard_normal((n, v))
    if shape["signal"]:
        y += shape["signal"] * x @ rng.standard_normal((p, v)) / np.sqrt(p)
    return x, y, np.arange(n) % shape["conditions"]


def one(index: int, shape: dict[str, Any], n_perm: int) -> dict[str, list[float]]:
    """p-values of dataset ``index``: per test a list over masks (``all`` first)."""
    x, y, conditions = dataset(index, shape)
    n = x.shape[0]
    folds = outer_folds(n, shape["folds"], seed=index, conditions=conditions)
    reductions = reduce_folds(x, folds, pca_dim=shape["pca"], standardize=False)
    fit = fit_ridge_cv(
        x, y, folds, alphas=shape["alphas"], inner_folds=shape["inner"], seed=index,
        keep_weights=False, reductions=reductions,
    )  # fmt: skip
    masks = [np.ones(n, dtype=bool)]
    if conditions is not None:
        masks += [conditions == c for c in range(shape["conditions"])]
    null = fit_fixed_alpha_smoother(x, folds, alphas=shape["alphas"], reductions=reductions)
    tests = refit_permutation_tests(
        y, fit.predictions, null.bind(fit.alphas), masks, n_perm=n_perm, seed=index
    )
    out: dict[str, list[float]] = {"fixed_alpha": [t.p for t in tests]}
    out[f"fixed_alpha_seq{STOP}"] = [
        sequential_p(t.null, t.observed, stop=STOP, n_perm=n_perm)[0] for t in tests
    ]
    out["predictions"] = [
        permutation_test(y[m], fit.predictions[m], n_perm=n_perm, seed=index, groups=folds[m]).p
        for m in masks
    ]
    out["chosen_max_alpha"] = [float(np.mean(fit.alphas == max(shape["alphas"])))]
    if shape.get("moments"):
        smoother = fit_torch_smoother(
            x, folds, alphas=shape["alphas"], inner_folds=shape["inner"], seed=index,
            reductions=reductions,
        )  # fmt: skip
        draws = min(n_perm, shape.get("refit_draws", n_perm))
        exact = refit_permutation_tests(
            y, fit.predictions, smoother, masks, n_perm=draws, seed=index
        )
        out["refit_full"] = [t.p for t in exact]
        for draws in MOMENT_DRAWS:
            out[f"refit_t{draws}"] = [t_p(t.observed, t.null[:draws]) for t in exact]
        out[f"refit_rank{HYBRID}"] = [rank_p(t.observed, t.null[:HYBRID]) for t in exact]
        out[f"refit_hybrid{HYBRID}"] = [hybrid_p(t.observed, t.null[:HYBRID]) for t in exact]
    if shape["refit"]:
        smoother = fit_torch_smoother(
            x, folds, alphas=shape["alphas"], inner_folds=shape["inner"], seed=index,
            reductions=reductions,
        )  # fmt: skip
        exact = refit_permutation_tests(
            y, fit.predictions, smoother, masks, n_perm=n_perm, seed=index, stop=STOP
        )
        out[f"refit_seq{STOP}"] = [t.p for t in exact]
    return out


MOMENT_DRAWS = (20, 50, 100)


def t_p(observed: float, null: np.ndarray) -> float:
    """One-sided p of ``observed`` against ``R`` exchangeable null draws under a normal null
    (:func:`object2brain.encoding.scores.normal_tail_p`)."""
    return normal_tail_p(observed, null)


HYBRID = 59  # R + 1 = 60: 0.05 and 0.10 are attainable rank p-values


def rank_p(observed: float, null: np.ndarray) -> float:
    """The permutation p ``(1 + #{null >= observed}) / (1 + R)`` of ``R`` draws."""
    return float((1 + np.count_nonzero(null >= observed - 1e-12)) / (1 + null.size))


def hybrid_p(observed: float, null: np.ndarray) -> float:
    """The rank p of ``R`` exact refits, extended below its floor ``1 / (R + 1)`` by the normal
    approximation when no draw reaches the observed value: the stage's ``refit_tail`` p with
    ``n_perm = R`` (:func:`object2brain.encoding.scores.tail_p`); exact at every level
    ``>= 1 / (R + 1)`` (the rank p decides there), approximate only below it."""
    return tail_p(rank_p(observed, null), null.size, null, observed, null.size)


def summary(values: dict[str, list[list[float]]], signal: float) -> dict[str, Any]:
    count = len(values["predictions"])
    tests = [k for k in values if k != "chosen_max_alpha"]
    masks = len(values["predictions"][0])
    out: dict[str, Any] = {
        "datasets": count,
        "binomial_95_interval": {
            str(a): [b / count for b in stats.binom.interval(0.95, count, a)] for a in LEVELS
        },
        "rejection_rate": {},
        "ks_uniform_p": {},
        "mean_fraction_max_alpha": float(np.mean(values["chosen_max_alpha"])),
    }
    for test in tests:
        p = np.asarray(values[test])  # (datasets, masks)
        for m in range(masks):
            key = test if m == 0 else f"{test} (condition {m - 1})"
            out["rejection_rate"][key] = {str(a): float(np.mean(p[:, m] <= a)) for a in LEVELS}
            if "seq" not in test:
                out["ks_uniform_p"][key] = float(stats.kstest(p[:, m], "uniform").pvalue)
    if signal == 0.0:
        out["inside_interval"] = {
            key: all(
                out["binomial_95_interval"][a][0] <= r <= out["binomial_95_interval"][a][1]
                for a, r in rates.items()
            )
            for key, rates in out["rejection_rate"].items()
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# `fixed_alpha` permutation null of the encoding stage: calibration and power",
        "",
        f"n_perm {result['n_perm']}; `fixed_alpha`: all n_perm relabellings; "
        f"`fixed_alpha_seq{STOP}`: the sequential p (stop {STOP}, the stage's default "
        "`perm_stop`) from the same null; `predictions`: permutations of the fixed out-of-fold "
        f"predictions within folds; `refit_seq{STOP}`: the exact refit test (sequential). "
        f"Machine: {result['machine']}. Generated by "
        "`validation/encoding_fixed_alpha_null.py` (settings in its docstring).",
        "",
        "| setting | datasets | max-alpha share | interval 0.01 / 0.05 / 0.10 | test | "
        "rejections 0.01 / 0.05 / 0.10 | KS p | inside |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in result["settings"].items():
        bounds = " / ".join(
            f"[{100 * lo:.2f}, {100 * hi:.2f}]%" for lo, hi in s["binomial_95_interval"].values()
        )
        for test, rates in s["rejection_rate"].items():
            cells = " / ".join(f"{100 * r:.2f}%" for r in rates.values())
            ks = s["ks_uniform_p"].get(test)
            inside = s.get("inside_interval", {}).get(test)
            lines.append(
                f"| {name} | {s['datasets']} | {s['mean_fraction_max_alpha']:.2f} | {bounds} | "
                f"{test} | {cells} | {'-' if ks is None else f'{ks:.2g}'} | "
                f"{'-' if inside is None else ('yes' if inside else 'NO')} |"
            )
    lines += [
        "",
        "`power_*` rows: rejection rates on planted datasets (higher is better; intervals do "
        "not apply). `max-alpha share`: mean fraction of (fold, voxel) alphas at the grid's "
        "largest value. Seconds and load averages per setting are in the JSON.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--setting", action="append", choices=list(SHAPES), required=True)
    parser.add_argument("--datasets", type=int, default=1000)
    parser.add_argument("--n-perm", type=int, default=1000)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("encoding_fixed_alpha_null.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = (
        json.loads(args.out.read_text())
        if args.out.exists()
        else {"n_perm": args.n_perm, "settings": {}, "raw": {}}
    )
    result["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores (shared), Python "
        f"{platform.python_version()}, torch threads 1"
    )
    for name in args.setting:
        shape = SHAPES[name]
        values: dict[str, list[list[float]]] = result["raw"].get(name, {}) if args.resume else {}
        done = len(values.get("predictions", []))
        began, cpu = time.perf_counter(), time.process_time()
        for index in range(done, args.datasets):
            for key, p in one(index, shape, args.n_perm).items():
                values.setdefault(key, []).append(p)
            if (index + 1) % 50 == 0 or index + 1 == args.datasets:
                s = summary(values, shape["signal"])
                s.update(
                    {
                        "shape": shape,
                        "seconds_this_run": round(time.perf_counter() - began, 1),
                        "cpu_seconds_this_run": round(time.process_time() - cpu, 1),
                        "load_average": os.getloadavg(),
                    }
                )
                result["settings"][name] = s
                result["raw"][name] = values
                args.out.write_text(json.dumps(result) + "\n")
                args.out.with_suffix(".md").write_text(markdown(result))
                print(name, index + 1, {k: v["0.05"] for k, v in s["rejection_rate"].items()},
                      f"{s['cpu_seconds_this_run']} CPU-s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

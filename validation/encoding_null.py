"""Calibration and power of the encoding permutation tests of the ROI's mean r.

Each null dataset: ``n`` stimuli, one layer of ``p`` Gaussian features, an ROI of ``v`` Gaussian
voxels independent of them. :func:`object2brain.encoding.compute_encoding` (5 outer folds, the
default alpha grid, 5 inner folds, ``perm_null = refit``) gives the exact ``p_perm``; the same
out-of-fold predictions are then tested by permutations of the fixed predictions: the stage's
``predictions`` null (plain mean r, permutations within the outer folds) and three candidate
corrections that were measured as possible cheap calibrated replacements:

- ``fold_centred``: responses and predictions centred within each outer fold, then the mean r
  (permutations within folds);
- ``per_fold``: Pearson r within each fold, averaged over folds (weighted by size) and voxels;
- ``fold_cov``: the within-fold covariance of the centred predictions with the fold-centred,
  unit-norm responses (no normalisation by the prediction's spread);
- ``across_folds``: the plain mean r with permutations across all stimuli.

Over ``--datasets`` such datasets the fraction with ``p <= 0.05`` must lie in the 95% binomial
interval around 0.05, and the p-values should be uniform (Kolmogorov-Smirnov). Power: planted
datasets where ``Y = s X W + E`` (``W ~ N(0, 1/p)``, ``E ~ N(0, 1)``, ``s = --signal``).
``--voxels`` can be repeated for a second ROI size (``--no-refit``: only the fixed-prediction
tests, which are cheap).

What it shows (``encoding_null.json`` / ``.md``): only ``refit`` (relabel the responses, rerun the
whole cross-validation, alpha choice included) is calibrated. Every permutation of fixed
out-of-fold predictions misses that each fold's predictions depend on the other folds' responses
(they were its training data): depending on the statistic the null is too wide (plain and
fold-centred r: conservative, increasingly so with more voxels) or too narrow (per-fold r and
the fold covariance: liberal).

Run: ``PYTHONPATH=src python validation/encoding_null.py [--datasets 400] [--n-perm 1000]``;
writes ``validation/encoding_null.json`` (incrementally) and ``validation/encoding_null.md``.

``--sequential``: the sequential refit test (Besag & Clifford 1991; the stage's ``perm_stop``)
instead, written to ``encoding_null_sequential.json`` / ``.md``: per dataset the stage's p
(``perm_null = refit``, ``perm_stop = --stop``, ``n_perm = --n-perm``) and the refits it used,
the full refit test from the same seeded draws (all ``n_perm``; sequential p for other stops
derived from its null by :func:`sequential_p`, checked equal to the stage's for ``--stop``) and
``predictions``; rejection rates at 0.01, 0.05 and 0.10 (a sequential p is discrete on the
values ``h / L``, so a Kolmogorov-Smirnov test against the uniform does not apply: validity is
``P(p <= u) <= u`` at every level, which the rates check). ``--sequential-budget`` seconds
bound the run (settings cut short say so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from object2brain.encoding import compute_encoding
from object2brain.encoding.ridge import fit_smoother
from object2brain.encoding.scores import (
    PERM_BLOCK,
    _block_permutations,
    refit_permutation_tests,
    sequential_p,
)
from object2brain.options import EncodeOptions, Runtime

LEVEL = 0.05
Statistic = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def null_dataset(
    index: int, n: int, p: int, v: int, signal: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(n, p)`` and voxel responses ``(n, v)`` of dataset ``index`` (``signal`` 0:
    independent of the features)."""
    rng = np.random.default_rng([2024, index])
    x, noise = rng.standard_normal((n, p)), rng.standard_normal((n, v))
    weights = np.random.default_rng([2025, index]).standard_normal((p, v)) / np.sqrt(p)
    return x, signal * x @ weights + noise


def _centre(values: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """``values`` ``(..., n, v)`` centred within each fold along axis -2."""
    out = values.copy()
    for fold in np.unique(folds):
        members = folds == fold
        out[..., members, :] -= values[..., members, :].mean(axis=-2, keepdims=True)
    return out


def _unit(values: np.ndarray) -> np.ndarray:
    return values / np.linalg.norm(values, axis=-2, keepdims=True)


def plain(y: np.ndarray, p: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Mean r over voxels; ``y`` ``(n, v)``, ``p`` ``(B, n, v)`` -> ``(B,)``."""
    yz, pz = _unit(y - y.mean(0)), _unit(p - p.mean(-2, keepdims=True))
    return np.asarray((yz * pz).sum(-2).mean(-1))


def fold_centred(y: np.ndarray, p: np.ndarray, folds: np.ndarray) -> np.ndarray:
    return np.asarray((_unit(_centre(y, folds)) * _unit(_centre(p, folds))).sum(-2).mean(-1))


def per_fold(y: np.ndarray, p: np.ndarray, folds: np.ndarray) -> np.ndarray:
    rs, sizes = [], []
    for fold in np.unique(folds):
        members = folds == fold
        rs.append(plain(y[members], p[..., members, :], folds[members]))
        sizes.append(members.sum())
    return np.asarray(np.average(np.stack(rs), axis=0, weights=sizes))


def fold_cov(y: np.ndarray, p: np.ndarray, folds: np.ndarray) -> np.ndarray:
    return np.asarray((_unit(_centre(y, folds)) * _centre(p, folds)).sum(-2).mean(-1))


FIXED: dict[str, tuple[Statistic, bool]] = {  # statistic, permute within folds
    "predictions": (plain, True),
    "fold_centred": (fold_centred, True),
    "per_fold": (per_fold, True),
    "fold_cov": (fold_cov, True),
    "across_folds": (plain, False),
}


def fixed_p_values(
    y: np.ndarray, predictions: np.ndarray, folds: np.ndarray, n_perm: int, seed: int
) -> dict[str, float]:
    """``p`` of every fixed-prediction test (the stage's seeded permutation blocks)."""
    out = {}
    n = y.shape[0]
    for name, (statistic, within) in FIXED.items():
        groups = folds if within else None
        perms = np.concatenate(
            [
                _block_permutations(n, seed, b, min(PERM_BLOCK, n_perm - b * PERM_BLOCK), groups)
                for b in range(-(-n_perm // PERM_BLOCK))
            ]
        )
        observed = statistic(y, predictions[None], folds)[0]
        null = statistic(y, predictions[perms], folds)
        out[name] = float((1 + np.count_nonzero(null >= observed - 1e-12)) / (1 + n_perm))
    return out


def one_dataset(
    index: int, n: int, p: int, v: int, n_perm: int, signal: float, refit: bool, refit_perm: int
) -> dict[str, float]:
    features, responses = null_dataset(index, n, p, v, signal)
    result = compute_encoding(
        {"layer": features},
        {("roi", "sub-01"): responses},
        EncodeOptions(n_perm=refit_perm if refit else 0, perm_null="refit", keep_weights=False),
        Runtime(seed=index, device="cpu", progress=False),
        stimulus_ids=[f"s{i}" for i in range(n)],
    )
    fit = result.fits[("layer", "roi", "sub-01")].ridge
    folds = result.folds["fold"].to_numpy()
    p_values = fixed_p_values(responses, fit.predictions, folds, n_perm, seed=index)
    if refit:
        p_values["refit"] = float(result.encoding["p_perm"].iloc[0])
    return p_values


def summarise(p_values: dict[str, list[float]]) -> dict[str, Any]:
    count = len(next(iter(p_values.values())))
    low, high = (bound / count for bound in stats.binom.interval(0.95, count, LEVEL))
    rates = {k: float(np.mean(np.asarray(ps) <= LEVEL)) for k, ps in p_values.items()}
    return {
        "datasets": count,
        "binomial_95_interval": [low, high],
        "rejection_rate": rates,
        "inside_interval": {k: bool(low <= r <= high) for k, r in rates.items()},
        "ks_uniform_p": {
            k: float(stats.kstest(ps, "uniform").pvalue) for k, ps in p_values.items()
        },
    }


def run_setting(
    args: argparse.Namespace, v: int, signal: float, datasets: int, refit: bool, start: int = 0
) -> dict[str, Any]:
    p_values: dict[str, list[float]] = {}
    began = time.perf_counter()
    for index in range(start, start + datasets):
        for key, value in one_dataset(
            index, args.stimuli, args.features, v, args.n_perm, signal, refit, args.refit_perm
        ).items():
            p_values.setdefault(key, []).append(value)
        if (index - start + 1) % 25 == 0:
            rates = {
                k: round(float(np.mean(np.asarray(x) <= LEVEL)), 4) for k, x in p_values.items()
            }
            print(
                f"v={v} signal={signal}: {index - start + 1} datasets {rates} "
                f"{time.perf_counter() - began:.0f} s",
                flush=True,
            )
    summary = summarise(p_values)
    summary.update(
        {"n_voxels": v, "signal": signal, "seconds": round(time.perf_counter() - began, 1)}
    )
    return summary


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Encoding permutation tests of the ROI's mean r: calibration and power",
        "",
        f"{result['n_stimuli']} stimuli, {result['n_features']} Gaussian features, 5 outer / 5 "
        f"inner folds, 19 alphas, {result['n_perm']} permutations per fixed-prediction test "
        f"and {result['n_perm_refit']} per refit test; "
        f"level {LEVEL}. Machine: {result['machine']}.",
        "Generated by `validation/encoding_null.py` (see its docstring for the tests).",
        "",
        "| setting | datasets | interval | " + " | ".join(result["tests"]) + " |",
        "|---|---|---|" + "---|" * len(result["tests"]),
    ]
    for name, setting in result["settings"].items():
        low, high = setting["binomial_95_interval"]
        cells = []
        for test in result["tests"]:
            rate = setting["rejection_rate"].get(test)
            ks = setting["ks_uniform_p"].get(test)
            cells.append("-" if rate is None else f"{100 * rate:.2f}% (KS p {ks:.2g})")
        lines.append(
            f"| {name} | {setting['datasets']} | [{100 * low:.2f}, {100 * high:.2f}]% | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "Rows `power`: rejection rate on planted datasets (higher is better; the "
        "interval and KS columns apply to the null rows only). Run times per setting are in the "
        "JSON.",
    ]
    return "\n".join(lines) + "\n"


SEQ_LEVELS = (0.01, 0.05, 0.10)
SEQ_STOPS = (5, 10, 20)


def sequential_dataset(
    index: int, args: argparse.Namespace, v: int, signal: float, full: bool
) -> dict[str, float]:
    """p-values (and refits used) of one dataset: the stage's sequential refit test, the full
    refit test and sequential tests with other stops from its null (when ``full``), and the
    ``predictions`` test."""
    n = args.stimuli
    features, responses = null_dataset(index, n, args.features, v, signal)
    options = EncodeOptions(
        n_perm=args.n_perm, perm_null="refit", perm_stop=args.stop, keep_weights=False
    )
    result = compute_encoding(
        {"layer": features},
        {("roi", "sub-01"): responses},
        options,
        Runtime(seed=index, device="cpu", progress=False),
        stimulus_ids=[f"s{i}" for i in range(n)],
    )
    row = result.encoding.iloc[0]
    out = {f"seq{args.stop}": float(row["p_perm"]), f"seq{args.stop}_refits": float(row["n_perm"])}
    fit = result.fits[("layer", "roi", "sub-01")].ridge
    folds = result.folds["fold"].to_numpy()
    out["predictions"] = fixed_p_values_of(
        "predictions", responses, fit.predictions, folds, args.n_perm, index
    )
    if full:
        smoother = fit_smoother(
            features, folds, alphas=options.alphas, inner_folds=options.inner_folds, seed=index
        )
        test = refit_permutation_tests(
            responses, fit.predictions, smoother.predict, [np.ones(n, dtype=bool)],
            n_perm=args.n_perm, seed=index,
        )[0]  # fmt: skip
        out["refit_full"] = test.p
        for stop in SEQ_STOPS:
            p, used = sequential_p(test.null, test.observed, stop=stop, n_perm=args.n_perm)
            if stop == args.stop:
                assert p == out[f"seq{stop}"] and used == out[f"seq{stop}_refits"], (index, p)
            out[f"seq{stop}"], out[f"seq{stop}_refits"] = p, float(used)
    return out


def fixed_p_values_of(
    name: str, y: np.ndarray, predictions: np.ndarray, folds: np.ndarray, n_perm: int, seed: int
) -> float:
    """``p`` of one fixed-prediction test of :data:`FIXED`."""
    statistic, within = FIXED[name]
    perms = np.concatenate(
        [
            _block_permutations(
                y.shape[0], seed, b, min(PERM_BLOCK, n_perm - b * PERM_BLOCK),
                folds if within else None,
            )
            for b in range(-(-n_perm // PERM_BLOCK))
        ]
    )  # fmt: skip
    observed = statistic(y, predictions[None], folds)[0]
    null = statistic(y, predictions[perms], folds)
    return float((1 + np.count_nonzero(null >= observed - 1e-12)) / (1 + n_perm))


def sequential_summary(values: dict[str, list[float]]) -> dict[str, Any]:
    """Rejection rates at :data:`SEQ_LEVELS` (with binomial 95% intervals) and mean refits."""
    count = len(values["predictions"])
    tests = [k for k in values if not k.endswith("_refits")]
    intervals = {
        str(level): [b / count for b in stats.binom.interval(0.95, count, level)]
        for level in SEQ_LEVELS
    }
    return {
        "datasets": count,
        "binomial_95_interval": intervals,
        "rejection_rate": {
            k: {str(a): float(np.mean(np.asarray(values[k]) <= a)) for a in SEQ_LEVELS}
            for k in tests
        },
        "mean_refits": {
            k.removesuffix("_refits"): float(np.mean(values[k]))
            for k in values
            if k.endswith("_refits")
        },
    }


def sequential_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Sequential refit permutation test (Besag & Clifford 1991): calibration, power, cost",
        "",
        f"{result['n_stimuli']} stimuli, {result['n_features']} Gaussian features, 5 outer / 5 "
        f"inner folds, 19 alphas, n_perm {result['n_perm']}; the stage's test is "
        f"`perm_null = refit`, `perm_stop = {result['stop']}` (`seq{result['stop']}`); "
        "`refit_full`: all n_perm refits from the same seeded draws; `seqH`: sequential p with "
        "stop H from that null; `predictions`: the fixed-prediction test. "
        f"Machine: {result['machine']}.",
        "Generated by `validation/encoding_null.py --sequential`. Cells: rejection rate at "
        "0.01 / 0.05 / 0.10; null rows must lie inside the binomial 95% intervals; "
        "`refits`: mean refits per test (n_perm for the full test).",
        "",
        "| setting | datasets | interval 0.01 / 0.05 / 0.10 | test | rejections "
        "0.01 / 0.05 / 0.10 | mean refits |",
        "|---|---|---|---|---|---|",
    ]
    for name, setting in result["settings"].items():
        bounds = " / ".join(
            f"[{100 * lo:.2f}, {100 * hi:.2f}]%"
            for lo, hi in setting["binomial_95_interval"].values()
        )
        for test, rates in setting["rejection_rate"].items():
            cells = " / ".join(f"{100 * r:.2f}%" for r in rates.values())
            refits = setting["mean_refits"].get(test)
            if test == "refit_full":
                refits = float(result["n_perm"])
            used = "-" if refits is None else f"{refits:.1f}"
            lines.append(
                f"| {name} | {setting['datasets']} | {bounds} | {test} | {cells} | {used} |"
            )
    lines += [
        "",
        "Rows `power`: rejection rate on planted datasets (higher is better; the intervals apply "
        "to the null rows only).",
        "",
        "Run time per setting: "
        + "; ".join(
            f"{name} {setting['seconds']:.0f} s (load average {setting['load_average'][0]:.1f})"
            for name, setting in result["settings"].items()
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def run_sequential(args: argparse.Namespace) -> None:
    out = args.out.with_name("encoding_null_sequential.json")
    result: dict[str, Any] = {
        "n_stimuli": args.stimuli,
        "n_features": args.features,
        "n_perm": args.n_perm,
        "stop": args.stop,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared, loaded), "
        f"Python {platform.python_version()}",
        "settings": {},
    }
    plan = [
        (f"null, {args.voxels} voxels", args.voxels, 0.0, args.datasets, True),
        (f"power, {args.voxels} voxels, s={args.signal}", args.voxels, args.signal,
         args.power_datasets, True),
        (f"null, {args.more_voxels} voxels (no full refit)", args.more_voxels, 0.0,
         args.datasets, False),
    ]  # fmt: skip
    began = time.perf_counter()
    for name, v, signal, datasets, full in plan:
        values: dict[str, list[float]] = {}
        start = time.perf_counter()
        for index in range(datasets):
            if time.perf_counter() - began > args.sequential_budget:
                print(f"{name}: time budget reached after {index} datasets", flush=True)
                break
            for key, value in sequential_dataset(index, args, v, signal, full).items():
                values.setdefault(key, []).append(value)
            if (index + 1) % 25 == 0:
                print(f"{name}: {index + 1} {sequential_summary(values)['rejection_rate']}")
        if not values:
            continue
        summary = sequential_summary(values)
        summary.update(
            {
                "n_voxels": v,
                "signal": signal,
                "seconds": round(time.perf_counter() - start, 1),
                "load_average": os.getloadavg(),
                "complete": summary["datasets"] == datasets,
            }
        )
        result["settings"][name] = summary
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(sequential_markdown(result))
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", type=int, default=400)
    parser.add_argument("--power-datasets", type=int, default=100)
    parser.add_argument("--n-perm", type=int, default=1000)
    parser.add_argument(
        "--refit-perm", type=int, default=200, help="permutations of the (costly) refit test"
    )
    parser.add_argument("--stimuli", type=int, default=60)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--voxels", type=int, default=10)
    parser.add_argument("--more-voxels", type=int, default=50, help="second ROI size (no refit)")
    parser.add_argument("--signal", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("encoding_null.json"))
    parser.add_argument("--sequential", action="store_true", help="the sequential refit test")
    parser.add_argument("--stop", type=int, default=10, help="perm_stop of the sequential test")
    parser.add_argument("--sequential-budget", type=float, default=3000.0, help="seconds")
    args = parser.parse_args()
    if args.sequential:
        run_sequential(args)
        return
    result: dict[str, Any] = {
        "n_stimuli": args.stimuli,
        "n_features": args.features,
        "n_perm": args.n_perm,
        "n_perm_refit": args.refit_perm,
        "level": LEVEL,
        "tests": ["refit", *FIXED],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared, loaded), "
        f"Python {platform.python_version()}",
        "settings": {},
    }
    plan = [
        (f"null, {args.voxels} voxels", args.voxels, 0.0, args.datasets, True),
        (
            f"power, {args.voxels} voxels, s={args.signal}",
            args.voxels,
            args.signal,
            args.power_datasets,
            True,
        ),
        (
            f"null, {args.more_voxels} voxels (no refit)",
            args.more_voxels,
            0.0,
            args.datasets,
            False,
        ),
    ]
    for name, v, signal, datasets, refit in plan:
        result["settings"][name] = run_setting(args, v, signal, datasets, refit)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

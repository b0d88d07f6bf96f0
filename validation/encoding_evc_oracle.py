"""Why the demo's encoding does not single out the planted EVC layer: the best any linear model
could do on the demo's simulated EVC, layer by layer.

The demo simulates EVC voxels as random linear maps of the z-scored activations of ``_blocks.2``
(plus noise at SNR 1): ``Y = F W + E``, ``W ~ N(0, 1/p)``. Given the stimuli's kernel
``K = F F^T / p``, the best linear predictor of a held-out stimulus is kernel ridge with that
kernel (a Gaussian-process posterior mean). This script computes, for each layer (raw and
z-scored features):

- the effective dimension of the centred kernel (participation ratio of its eigenvalues,
  ``(sum l)^2 / sum l^2``; ``n`` = every stimulus needs its own direction, nothing generalises);
- the "oracle" mean r over voxels of kernel ridge on the demo's 3 outer folds, with the penalty
  chosen *on the test data* from a grid (optimistic: an upper bound for any cross-validated
  ridge on these features), averaged over the first ``--subjects`` subjects.

Run on a demo folder (``object2brain demo --size quick --out DIR`` writes it):
``PYTHONPATH=src python validation/encoding_evc_oracle.py --store STORE.h5 --patterns
patterns.h5``. Results: ``validation/encoding_evc_oracle.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np

from object2brain.activations.store import ActivationStore
from object2brain.encoding.folds import fold_splits, outer_folds


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def _kernel_ridge(kernel: np.ndarray, y: np.ndarray, folds: np.ndarray, lam: float) -> np.ndarray:
    """Out-of-fold kernel ridge predictions (kernel centred on each training set, intercept)."""
    out = np.empty_like(y)
    for train, test in fold_splits(folds):
        k_train = kernel[np.ix_(train, train)]
        k_test = kernel[np.ix_(test, train)]
        centre = np.eye(train.size) - 1.0 / train.size
        row_mean = k_train.mean(axis=0)
        k_train_c = centre @ k_train @ centre
        k_test_c = k_test - k_test.mean(axis=1, keepdims=True) - row_mean + row_mean.mean()
        mean = y[train].mean(axis=0)
        dual = np.linalg.solve(k_train_c + lam * np.eye(train.size), y[train] - mean)
        out[test] = k_test_c @ dual + mean
    return out


def _mean_r(y: np.ndarray, p: np.ndarray) -> float:
    yc, pc = y - y.mean(0), p - p.mean(0)
    return float(
        np.mean((yc * pc).sum(0) / np.linalg.norm(yc, axis=0) / np.linalg.norm(pc, axis=0))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--patterns", type=Path, required=True)
    parser.add_argument("--roi", default="EVC")
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--folds", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    with ActivationStore.open(args.store) as store:
        ids = list(store.stimulus_ids)
        layers = [name for name in store.layers if name.startswith("_blocks")]
        features = {
            name: store.read(name).reshape(len(ids), -1).astype(np.float64) for name in layers
        }
    with h5py.File(args.patterns) as handle:
        subjects = sorted(k for k in handle if k.startswith("sub"))[: args.subjects]
        responses = [handle[s][args.roi][()].astype(np.float64) for s in subjects]
    folds = outer_folds(len(ids), args.folds, seed=0)
    rows = []
    for name in layers:
        for scaling, x in (("raw", features[name]), ("z-scored", _zscore(features[name]))):
            kernel = x @ x.T / x.shape[1]
            centred = kernel - kernel.mean(0) - kernel.mean(1)[:, None] + kernel.mean()
            eig = np.clip(np.linalg.eigvalsh(centred), 0, None)
            best = max(
                np.mean([_mean_r(y, _kernel_ridge(kernel, y, folds, lam)) for y in responses])
                for lam in eig.max() * np.logspace(-6, 2, 17)
            )
            rows.append(
                {
                    "layer": name,
                    "features": x.shape[1],
                    "scaling": scaling,
                    "effective_dim": round(float(eig.sum() ** 2 / (eig**2).sum()), 1),
                    "oracle_r": round(float(best), 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"{len(ids)} stimuli, {len(subjects)} subjects, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

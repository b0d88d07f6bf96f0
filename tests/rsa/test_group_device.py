"""The torch device path of the group bootstrap (object2brain.rsa.group): block sizes, the CPU
torch path against a scipy loop, CUDA against the CPU (skipped without CUDA)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch

from object2brain.rsa import group as g

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "validation"))
from inference_common import World

METHODS = ["spearman", "pearson", "rho_a", "cosine", "corr_cov", "cosine_cov"]


def _study(seed: int, n: int, S: int, n_models: int = 2):
    world = World.make(seed, n_models=n_models)
    rng = np.random.default_rng(seed + 1)
    return world.draw(rng, n, world.subjects(rng, S))


@pytest.mark.parametrize("method", METHODS)
def test_results_do_not_depend_on_the_block_size(method: str) -> None:
    """Blocks of 1, 7 and the default (64 on the CPU) resamples per call: the same resampled,
    delete-one and lower-ceiling values (blocks only group resamples)."""
    n, S = 14, 3
    models, subs = _study(5, n, S)
    plan = g.resample_plan(n, S, 40, 2)
    ref = g.subject_coefficients(models, subs, method, plan)
    low = g.lower_ceiling_coefficients(subs, method, plan)
    for block in (1, 7):
        got = g.subject_coefficients(models, subs, method, plan, block=block)
        np.testing.assert_allclose(got.boot, ref.boot, rtol=0, atol=1e-13)
        np.testing.assert_allclose(got.jack, ref.jack, rtol=0, atol=1e-13)
        np.testing.assert_array_equal(got.r, ref.r)
        other = g.lower_ceiling_coefficients(subs, method, plan, block=block)
        np.testing.assert_allclose(other.boot, low.boot, rtol=0, atol=1e-13)


def test_resample_block_fits_the_issue_size_in_memory() -> None:
    """At 1,000 stimuli x (20 layers + 10 subjects) a block (prepared rows and ranking
    temporaries, ``8 (m + n) (K + T + 12)`` bytes per resample) stays within pick_chunk's share
    of free memory: on the CPU at most 64 resamples and 512 MiB (or a single resample); on an
    H200 (~140 GB free) 0.4 x 140e9 / 168 MB ~ 333 resamples per call."""
    per = 8 * (1000 * 999 // 2 + 1000) * 42
    block = g.resample_block(30, 1000, torch.device("cpu"))
    assert 1 <= block <= 64
    assert block == 1 or block * per <= 512 << 20
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        assert g.resample_block(30, 1000, torch.device("cuda")) * per <= 0.4 * free + per


def test_cpu_torch_path_equals_a_scipy_loop() -> None:
    """Every resampled and delete-one Spearman coefficient of the torch path equals scipy on
    the RDMs of the drawn stimuli (pairs of a stimulus with its own copy dropped), with blocks
    of 3 resamples."""
    n, S = 10, 2
    models, subs = _study(7, n, S)
    plan = g.resample_plan(n, S, 6, 3)
    coef = g.subject_coefficients(models, subs, "spearman", plan, block=3)

    def on_stimuli(index: np.ndarray) -> np.ndarray:
        i, j = np.triu_indices(len(index), 1)
        keep = index[i] != index[j]
        a, b = index[i][keep], index[j][keep]
        return np.array(
            [
                [scipy.stats.spearmanr(m[a, b], s[a, b])[0] for s in subs.numpy()]
                for m in models.numpy()
            ]
        )

    for b in range(plan.n_boot):
        drawn = np.repeat(np.arange(n), plan.counts[b].astype(int))
        np.testing.assert_allclose(coef.boot[b], on_stimuli(drawn), atol=1e-12)
    for left in range(n):
        expected = on_stimuli(np.delete(np.arange(n), left))
        np.testing.assert_allclose(coef.jack[left], expected, atol=1e-12)


def _tables(device: str, block: int | None = None):
    n, S = 16, 4
    models, subs = _study(11, n, S, n_models=2)
    rdm_models = [
        g.ModelRdms("a", ["l0", "l1"], [0, 1], models),
        g.ModelRdms("b", ["l0", "l1"], [0, 1], models.flip(0) + 0.01 * models[:1]),
    ]
    analysis = SimpleNamespace(
        conditions=[SimpleNamespace(name="all", rows=np.arange(n))],
        targets=[SimpleNamespace(name="roi", rdms=subs)],
    )
    settings = g.GroupSettings("spearman", 60, None, "a:l0,b:l1", 0, None, device, block)
    group = g.group_inference_rows(rdm_models, analysis, settings, {(0, "all"): (0.1, 0.2)})
    pairs = g.model_comparison_rows(rdm_models, analysis, settings)
    return group, pairs


def test_group_tables_do_not_depend_on_the_block_size() -> None:
    group, pairs = _tables("cpu")
    assert len(group) == 4 and len(pairs) == 1
    for ref, got in zip(_tables("cpu"), _tables("cpu", block=5), strict=True):
        for a, b in zip(ref, got, strict=True):
            assert a.keys() == b.keys()
            for key, value in a.items():
                if isinstance(value, float):
                    assert b[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
                else:
                    assert b[key] == value, key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_equals_cpu(method: str) -> None:
    n, S = 30, 4
    models, subs = _study(9, n, S)
    plan = g.resample_plan(n, S, 50, 4)
    cpu = g.subject_coefficients(models, subs, method, plan)
    gpu = g.subject_coefficients(models, subs, method, plan, device="cuda")
    np.testing.assert_allclose(gpu.boot, cpu.boot, rtol=0, atol=1e-9)
    np.testing.assert_allclose(gpu.jack, cpu.jack, rtol=0, atol=1e-9)
    np.testing.assert_allclose(gpu.r, cpu.r, rtol=0, atol=1e-9)
    for ref, got in zip(_tables("cpu"), _tables("cuda"), strict=True):
        for a, b in zip(ref, got, strict=True):
            for key, value in a.items():
                if isinstance(value, float):
                    assert b[key] == pytest.approx(value, abs=1e-9, nan_ok=True), key


def test_gpu_benchmark_inference_case_runs_on_the_cpu() -> None:
    """benchmarks/gpu_cases.py's ``inference`` case end to end at tiny sizes on the CPU: its
    CPU-vs-device check passes, every ROI is timed, the comparison and the baseline run."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_cases.py"
    spec = importlib.util.spec_from_file_location("gpu_cases_for_test", path)
    assert spec is not None and spec.loader is not None
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    sizes = {"n": 20, "layers": 2, "rois": 2, "subjects": 3, "n_boot": 8, "cpu_boot": 2,
             "check_n": 16}  # fmt: skip
    out = cases.case_inference(sizes, torch.device("cpu"), cases.Budget(600.0))
    assert out["check"]["passed"], out["check"]
    assert out["rois_timed"] == 2 and not out["extrapolated"]
    assert out["resamples_per_s"] > 0 and out["model_comparison_rows"] == 1
    assert out["cpu_seconds_extrapolated"] > 0

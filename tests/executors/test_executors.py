"""The executors: chunk order, the chunk-seed rule, errors naming the stage and chunk, and the
Mantel permutations giving the same p-values on Ray (1 and 2 workers) as in this process."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from object2brain.errors import Object2BrainError
from object2brain.executors import (
    ExecutorError,
    LocalExecutor,
    RayExecutor,
    chunk_seed,
    chunks_of,
    executor_for,
    require_ray,
)
from object2brain.options import Runtime
from object2brain.rsa.inference import (
    PERM_BLOCK,
    linear_permutation_test,
    mantel_test,
    permutation_block,
    permutations,
)


def test_chunk_seed_rule() -> None:
    assert chunk_seed(5, None, 3) == [5, 3]  # the permutation blocks' seeds before executors
    assert chunk_seed(5, 7, 3) == [5, 7, 3]
    assert chunk_seed(5, 7, 3) != chunk_seed(5, 8, 3)
    with pytest.raises(ValueError, match="non-negative"):
        chunk_seed(-1, None, 0)


def test_blocks_drawn_alone_are_the_loops_blocks() -> None:
    n, n_perm, seed = 9, 2 * PERM_BLOCK + 17, 4
    looped = list(permutations(n, n_perm, seed))
    alone = [permutation_block(n, n_perm, seed, k) for k in range(3)]
    assert [b.shape for b in alone] == [(PERM_BLOCK, n), (PERM_BLOCK, n), (17, n)]
    for a, b in zip(looped, alone, strict=True):
        np.testing.assert_array_equal(a, b)
    # the seeds of the blocks are unchanged: block k = default_rng([seed, k])
    rng = np.random.default_rng([seed, 1])
    expected = rng.permuted(np.tile(np.arange(n), (PERM_BLOCK, 1)), axis=1)
    np.testing.assert_array_equal(alone[1], expected)


def test_local_executor_keeps_order_and_shares() -> None:
    ex = LocalExecutor()
    assert ex.map_chunks(lambda c: c * 2, [3, 1, 2], stage="x") == [6, 2, 4]
    assert ex.map_chunks(lambda s, c: s + c, [1, 2], stage="x", shared=10) == [11, 12]
    assert [list(r) for r in chunks_of(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert executor_for(Runtime()).name == "local"


def test_without_ray_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ExecutorError, match=r"pip install 'object2brain\[ray\]'"):
        require_ray()
    with pytest.raises(ExecutorError, match="not installed"):
        executor_for(Runtime(executor="ray"))


def _rdms(rng: np.random.Generator, n: int, k: int, signal: float) -> tuple[np.ndarray, ...]:
    m = n * (n - 1) // 2
    base = rng.normal(size=m)
    models = base + rng.normal(size=(k, m))
    targets = signal * base + rng.normal(size=(3, m))
    return models, targets


@pytest.mark.parametrize("cpus_per_task", [2, 1], ids=["1-worker", "2-workers"])
def test_mantel_on_ray_equals_local(ray_cluster: ModuleType, cpus_per_task: int) -> None:
    rng = np.random.default_rng(3)
    models, targets = _rdms(rng, 14, 4, 0.15)
    combine = torch.tensor([[0.5], [0.5], [0.0]], dtype=torch.float64)
    ray_ex = RayExecutor(num_cpus=cpus_per_task)
    assert ray_ex.workers == 2 // cpus_per_task
    n_perm = 3 * PERM_BLOCK + 250  # four blocks: several chunks per worker
    for method in ("spearman", "pearson"):
        local = mantel_test(models, targets, method, n_perm, 11, "cpu", combine)
        remote = mantel_test(models, targets, method, n_perm, 11, "cpu", combine, executor=ray_ex)
        np.testing.assert_array_equal(remote.p, local.p)
        np.testing.assert_allclose(remote.r, local.r, rtol=0, atol=1e-12)
        assert np.nanmin(local.p) > 0 and np.nanmax(local.p) <= 1
    X, Y = torch.as_tensor(models), torch.as_tensor(targets)
    X = (X - X.mean(1, keepdim=True)) / X.std(1, keepdim=True)
    Y = (Y - Y.mean(1, keepdim=True)) / Y.std(1, keepdim=True)
    local = linear_permutation_test(X[1:] - X[:1], Y, 1500, seed=2)
    remote = linear_permutation_test(X[1:] - X[:1], Y, 1500, seed=2, executor=ray_ex)
    np.testing.assert_array_equal(remote.p, local.p)


def _fails_on_two(chunk: int) -> int:
    if chunk == 2:
        raise RuntimeError("chunk two is broken")
    return chunk


def _user_error(chunk: int) -> int:
    raise Object2BrainError(f"bad input in chunk {chunk}")


def test_ray_errors_name_stage_and_chunk(ray_cluster: ModuleType) -> None:
    ex = RayExecutor(max_retries=1)
    assert ex.map_chunks(_fails_on_two, [0, 1], stage="rsa") == [0, 1]
    with pytest.raises(ExecutorError, match=r"rsa: chunk 2 of 4 failed: .*chunk two is broken"):
        ex.map_chunks(_fails_on_two, [0, 1, 2, 3], stage="rsa")
    with pytest.raises(Object2BrainError, match="bad input in chunk 0"):
        ex.map_chunks(_user_error, [0], stage="rsa")


def _study_yaml(tmp_path: Path, executor: str) -> Path:
    (tmp_path / "stimuli.csv").write_text("stimulus_id,path\na,a.jpg\n")
    config = tmp_path / "study.yaml"
    config.write_text(
        "stimuli: stimuli.csv\nmodels:\n  - {arch: resnet18, weights: none}\n"
        f"executor: {executor}\n"
    )
    return config


def test_study_config_executor_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from object2brain.pipeline.config import ConfigError, RunConfig, load_config

    assert (
        RunConfig.model_validate(
            {"stimuli": "s.csv", "models": [{"arch": "resnet18"}]}
        ).executor.kind
        == "local"
    )
    with pytest.raises(ConfigError, match="executor"):
        load_config(_study_yaml(tmp_path, "{kind: spark}"))
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"executor.kind: .*pip install 'object2brain\[ray\]'"):
        load_config(_study_yaml(tmp_path, "{kind: ray, address: auto}"))
    config, _ = load_config(_study_yaml(tmp_path, "{kind: local}"))
    assert config.executor.kind == "local" and config.executor.address is None


@pytest.mark.parametrize("command", ["rsa", "extract", "dissect", "train-head", "lesion", "encode"])
def test_cli_without_ray_one_line_exit_2(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from object2brain.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    (tmp_path / "stimuli.csv").write_text("stimulus_id,path\na,a.jpg\n")
    args = {
        "rsa": ["rsa", "--activations", str(tmp_path / "acts.h5"), "--out", str(tmp_path / "o")],
        "extract": ["extract", "--model", "resnet18", "--weights", "none", "--stimuli",
                    str(tmp_path / "stimuli.csv"), "--out", str(tmp_path / "acts.h5")],
        "dissect": ["dissect", "--model", "resnet18", "--weights", "none", "--stimuli",
                    str(tmp_path / "stimuli.csv"), "--out", str(tmp_path / "o"),
                    "--layer", "layer4"],
        "train-head": ["train-head", "--model", "resnet18", "--weights", "none", "--stimuli",
                       str(tmp_path / "stimuli.csv"), "--out", str(tmp_path / "o")],
        "lesion": ["lesion", "--activations", str(tmp_path / "acts.h5"), "--filters",
                   str(tmp_path / "f.csv"), "--out", str(tmp_path / "o")],
        "encode": ["encode", "--activations", str(tmp_path / "acts.h5"), "--ratings",
                   str(tmp_path / "r.csv"), "--out", str(tmp_path / "o")],
    }[command]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        main([*args, "--executor", "ray", "--quiet"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --executor ray needs Ray, which is not installed: "
                   "pip install 'object2brain[ray]'"]  # fmt: skip
    assert not (tmp_path / "o").exists() and not (tmp_path / "acts.h5").exists()

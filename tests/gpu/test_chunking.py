"""Memory-aware chunking: the chunk picker, the out-of-memory retry, and results that do not
depend on chunk sizes (RSA permutations, lesion engine, feature chunks)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from object2brain import devices
from object2brain.devices import (
    CPU_CHUNK_CAP_BYTES,
    chunked,
    free_memory_bytes,
    is_out_of_memory,
    pick_chunk,
)
from object2brain.lesion.engine import FilterStats, random_subset_masks
from object2brain.rsa import inference
from object2brain.rsa.compare import WeightedComparison
from object2brain.rsa.inference import bootstrap_ci, condition_difference_test, mantel_test
from object2brain.rsa.rdm import rdm_from_features, upper_triangle


def fake_free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device="cpu": free)


def test_free_memory_is_positive_on_cpu() -> None:
    assert free_memory_bytes("cpu") > 0


def test_pick_chunk_follows_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_free(monkeypatch, 1000)
    # 40 % of 1000 bytes = 400 bytes -> 4 items of 100 bytes
    assert pick_chunk(100, "cpu") == 4
    assert pick_chunk(100, "cpu", fraction=0.8) == 8
    assert pick_chunk(100, "cpu", maximum=3) == 3
    # an item larger than the budget: still one (the OOM retry reports it)
    assert pick_chunk(10_000, "cpu") == 1
    assert pick_chunk(10_000, "cpu", minimum=2) == 2


def test_pick_chunk_caps_the_cpu_but_not_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_free(monkeypatch, 1 << 40)
    assert pick_chunk(1 << 20, "cpu") == CPU_CHUNK_CAP_BYTES >> 20
    assert pick_chunk(1 << 20, "cpu", cap_bytes=1 << 30) == 1024
    assert pick_chunk(1 << 20, torch.device("cuda")) == int(0.4 * (1 << 40)) >> 20


def test_is_out_of_memory() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: 8 GB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def flaky(limit: int, calls: list[tuple[int, int]]) -> Callable[[int, int], int]:
    """Work that raises a (fake) CUDA OOM on any chunk larger than ``limit`` items."""

    def work(start: int, stop: int) -> int:
        calls.append((start, stop))
        if stop - start > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return sum(range(start, stop))

    return work


def test_chunked_halves_on_oom_and_covers_everything_once() -> None:
    calls: list[tuple[int, int]] = []
    results = list(chunked(100, 64, flaky(10, calls)))
    covered = [i for start, stop, _ in results for i in range(start, stop)]
    assert covered == list(range(100))
    assert sum(r for _, _, r in results) == sum(range(100))
    assert all(stop - start <= 10 for start, stop, _ in results)
    # 64 -> 32 -> 16 -> 8 failed/halved once each, then the size stays at 8
    assert calls[:4] == [(0, 64), (0, 32), (0, 16), (0, 8)]
    assert all(stop - start <= 8 for start, stop in calls[4:])


def test_chunking_keeps_a_halved_size_for_later_runs() -> None:
    calls: list[tuple[int, int]] = []
    chunking = devices.Chunking(64)
    first = list(chunking.run(100, flaky(10, calls)))
    assert chunking.size == 8
    calls.clear()
    second = list(chunking.run(30, flaky(10, calls)))  # a later block starts at the small size
    assert calls == [(0, 8), (8, 16), (16, 24), (24, 30)]
    assert [i for a, b, _ in first for i in range(a, b)] == list(range(100))
    assert [i for a, b, _ in second for i in range(a, b)] == list(range(30))


def test_chunked_reraises_when_one_item_does_not_fit() -> None:
    with pytest.raises(torch.OutOfMemoryError):
        list(chunked(5, 4, flaky(0, [])))


def test_chunked_does_not_swallow_other_errors() -> None:
    def work(start: int, stop: int) -> int:
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        list(chunked(5, 4, work))


def vectors(rng: np.random.Generator, k: int, n: int) -> torch.Tensor:
    return upper_triangle(
        torch.stack([rdm_from_features(rng.normal(size=(n, 12)), device="cpu") for _ in range(k)])
    )


@pytest.mark.parametrize("method", ["spearman", "pearson"])
@pytest.mark.parametrize(("n_models", "n_targets"), [(3, 2), (2, 3)])  # gathers targets / models
def test_mantel_does_not_depend_on_batches_or_oom(
    monkeypatch: pytest.MonkeyPatch, method: str, n_models: int, n_targets: int
) -> None:
    rng = np.random.default_rng(3)
    X, Y = vectors(rng, n_models, 25), vectors(rng, n_targets, 25)
    # 10 gathered values per tile: one permutation and a few pairs at a time
    reference = mantel_test(X, Y, method, n_perm=300, seed=1, device="cpu", memory_elements=10)
    auto = mantel_test(X, Y, method, n_perm=300, seed=1, device="cpu")
    big = mantel_test(X, Y, method, n_perm=300, seed=1, device="cpu", memory_elements=1 << 30)
    np.testing.assert_array_equal(reference.p, auto.p)
    np.testing.assert_array_equal(reference.p, big.p)
    np.testing.assert_allclose(reference.r, auto.r, atol=1e-12)

    original = inference.pair_index
    sizes: list[int] = []

    def failing(perms: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        sizes.append(len(perms))
        if len(perms) > 7:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(perms, rows, cols)

    monkeypatch.setattr(inference, "pair_index", failing)
    retried = mantel_test(X, Y, method, n_perm=300, seed=1, device="cpu", memory_elements=1 << 30)
    np.testing.assert_array_equal(reference.p, retried.p)
    assert max(sizes) > 7 and min(sizes) <= 7


def test_bootstrap_auto_batches_equal_explicit() -> None:
    rng = np.random.default_rng(4)
    A = torch.stack([rdm_from_features(rng.normal(size=(15, 6)), device="cpu") for _ in range(2)])
    B = torch.stack([rdm_from_features(rng.normal(size=(15, 6)), device="cpu") for _ in range(2)])
    low1, high1 = bootstrap_ci(A, B, n_boot=50, seed=2, device="cpu", memory_elements=500)
    low2, high2 = bootstrap_ci(A, B, n_boot=50, seed=2, device="cpu")
    np.testing.assert_allclose(low1, low2, atol=1e-12)
    np.testing.assert_allclose(high1, high2, atol=1e-12)


SIMULATED_OOM = torch.OutOfMemoryError("CUDA out of memory (simulated)")


def test_bootstrap_halves_resamples_on_oom(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    A = torch.stack([rdm_from_features(rng.normal(size=(15, 6)), device="cpu") for _ in range(2)])
    B = torch.stack([rdm_from_features(rng.normal(size=(15, 6)), device="cpu") for _ in range(3)])
    reference = bootstrap_ci(A, B, n_boot=60, seed=2, device="cpu", memory_elements=1)
    real = inference._weighted_resamples
    sizes: list[int] = []

    def failing(
        comparison: WeightedComparison, iu: torch.Tensor, ju: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        sizes.append(len(idx))
        if len(idx) > 7:
            raise SIMULATED_OOM
        return real(comparison, iu, ju, idx)

    monkeypatch.setattr(inference, "_weighted_resamples", failing)
    retried = bootstrap_ci(A, B, n_boot=60, seed=2, device="cpu", memory_elements=1 << 30)
    np.testing.assert_allclose(retried[0], reference[0], atol=1e-12)
    np.testing.assert_allclose(retried[1], reference[1], atol=1e-12)
    assert max(sizes) == 60 and min(sizes) <= 7


def test_condition_contrast_halves_permutations_on_oom(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(8)
    A = torch.stack([rdm_from_features(rng.normal(size=(16, 6)), device="cpu") for _ in range(2)])
    B = torch.stack([rdm_from_features(rng.normal(size=(16, 6)), device="cpu") for _ in range(2)])
    labels = ["a", "b"] * 8
    reference = condition_difference_test(
        A, B, labels, "a", "b", n_perm=120, seed=3, device="cpu", memory_elements=1
    )
    real = inference._subset_vectors
    sizes: list[int] = []

    def failing(rdms: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        sizes.append(len(rows))
        if len(rows) > 7:
            raise SIMULATED_OOM
        return real(rdms, rows)

    monkeypatch.setattr(inference, "_subset_vectors", failing)
    retried = condition_difference_test(
        A, B, labels, "a", "b", n_perm=120, seed=3, device="cpu", memory_elements=1 << 30
    )
    np.testing.assert_array_equal(retried.p, reference.p)
    np.testing.assert_allclose(retried.delta, reference.delta, atol=1e-12)
    assert max(sizes) > 7 and min(sizes) <= 7


def test_feature_chunks_auto_equal_small_chunks() -> None:
    x = np.random.default_rng(5).normal(size=(10, 3, 4, 4))
    small = rdm_from_features(x, device="cpu", chunk_elements=20)
    auto = rdm_from_features(x, device="cpu")
    torch.testing.assert_close(small, auto, atol=1e-12, rtol=0)


def test_lesion_engine_chunks_and_oom(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    acts = np.maximum(rng.normal(size=(12, 16, 3, 3)), 0).astype(np.float32) + 0.01
    tiny = FilterStats.from_activations(acts, chunk_bytes=1)  # one filter per chunk
    auto = FilterStats.from_activations(acts)
    torch.testing.assert_close(tiny.cross, auto.cross, atol=1e-9, rtol=1e-12)
    masks = random_subset_masks(16, 5, 40, seed=0)
    reference = tiny.rdms(masks, chunk_bytes=16 * 8)  # one pair per chunk
    torch.testing.assert_close(auto.rdms(masks), reference, atol=1e-10, rtol=0)
    assert 1 <= auto.subsets_per_chunk() <= CPU_CHUNK_CAP_BYTES
    assert auto.to("cpu").cross.device.type == "cpu"

    # A simulated OOM on every chunk wider than 5 pairs: same RDMs.
    real_matmul = torch.Tensor.__matmul__

    def failing(self: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        # the (K, pairs) slices of the cross stack; not the (K, n = 12) sums
        if (
            other.ndim == 2
            and other.shape[0] == 16
            and other.shape[1] not in (12,)
            and other.shape[1] > 5
        ):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_matmul(self, other)

    monkeypatch.setattr(torch.Tensor, "__matmul__", failing)
    retried = auto.rdms(masks, chunk_bytes=1 << 30)
    monkeypatch.undo()
    torch.testing.assert_close(retried, reference, atol=1e-10, rtol=0)

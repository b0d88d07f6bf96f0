"""Device selection and memory-aware chunking shared by every stage.

- :func:`resolve_device`: ``--device auto|cpu|cuda|cuda:N``.
- :func:`pick_chunk`: how many items (permutations, filter subsets, feature columns) one chunk may
  hold, from the device's free memory and a safety fraction.
- :class:`Chunking` / :func:`chunked`: run a computation in chunks and halve a chunk that runs out
  of memory, so a problem that fits in chunks never fails with out-of-memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from object2brain.errors import Object2BrainError

log = logging.getLogger("object2brain.devices")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or ``None``) -> the first CUDA device if one is usable, else the CPU.

    Raises:
        Object2BrainError: an unknown spec, or CUDA requested where none is available.
    """
    if isinstance(spec, torch.device):
        return spec
    text = "auto" if spec is None else spec.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise Object2BrainError(
            f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise Object2BrainError(f"device {spec!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise Object2BrainError(
                f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif device.type != "cpu":
        raise Object2BrainError(f"unsupported device {spec!r} (use auto, cpu, cuda or cuda:N)")
    return device


# ----------------------------------------------------------------------------------------------
# memory-aware chunking

#: Fraction of the free memory that one chunk may use (the rest is headroom for the allocator,
#: other tensors of the computation and other processes).
SAFETY_FRACTION = 0.4
#: Largest chunk on the CPU: bigger chunks do not run faster there and only cost memory.
CPU_CHUNK_CAP_BYTES = 512 << 20
_FALLBACK_FREE_BYTES = 1 << 30

T = TypeVar("T")


def free_memory_bytes(device: str | torch.device = "cpu") -> int:
    """Free memory of ``device`` in bytes.

    CUDA: ``torch.cuda.mem_get_info`` (free bytes of the device) plus what PyTorch's caching
    allocator holds but does not use (reusable without a new allocation). CPU: available RAM
    (``psutil.virtual_memory().available``; ``os.sysconf`` where psutil is missing; 1 GiB if
    neither tells).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free) + max(0, int(cached))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is a dev dependency only
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return _FALLBACK_FREE_BYTES


def pick_chunk(
    bytes_per_item: int | float,
    device: str | torch.device = "cpu",
    *,
    fraction: float = SAFETY_FRACTION,
    cap_bytes: int | None = None,
    minimum: int = 1,
    maximum: int | None = None,
) -> int:
    """How many items (permutations, subsets, filters, ...) one chunk may hold.

    ``floor(budget / bytes_per_item)`` clipped to ``[minimum, maximum]``, where
    ``budget = fraction * free_memory_bytes(device)``, capped at ``cap_bytes`` (default: no cap
    on CUDA, :data:`CPU_CHUNK_CAP_BYTES` on the CPU). ``bytes_per_item`` is the peak memory one
    item adds to the computation (all its temporaries, not only its output).

    Never less than ``minimum``: a single item that does not fit is tried anyway (the caller's
    out-of-memory retry, :func:`chunked`, then reports it).
    """
    dev = torch.device(device)
    if cap_bytes is None and dev.type != "cuda":
        cap_bytes = CPU_CHUNK_CAP_BYTES
    budget = fraction * free_memory_bytes(dev)
    if cap_bytes is not None:
        budget = min(budget, float(cap_bytes))
    items = int(budget // max(float(bytes_per_item), 1.0))
    if maximum is not None:
        items = min(items, maximum)
    return max(minimum, items)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA ``OutOfMemoryError`` or a CPU allocator's)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def release_cached_memory(device: str | torch.device | None = None) -> None:
    """Return PyTorch's cached, unused CUDA blocks to the device (no-op on the CPU)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


class Chunking:
    """A chunk size that only shrinks: :meth:`run` halves it when a chunk runs out of memory, and
    later runs (e.g. over the next block of permutations) start from the smaller size."""

    def __init__(self, size: int) -> None:
        self.size = max(1, int(size))

    def run(
        self,
        total: int,
        work: Callable[[int, int], T],
        *,
        device: str | torch.device | None = None,
    ) -> Iterator[tuple[int, int, T]]:
        """Run ``work(start, stop)`` over ``range(total)`` in chunks, halving a chunk that runs out
        of memory.

        Yields ``(start, stop, work(start, stop))`` in order, covering ``0..total`` exactly once.
        When ``work`` raises an out-of-memory error (:func:`is_out_of_memory`), cached device
        memory is released, the chunk size is halved and the same ``start`` is retried; later
        chunks keep the smaller size. A chunk of one item that still fails re-raises the error.
        ``work`` must have no side effect before it returns (its result is what the caller
        accumulates), so a retried chunk is never counted twice.
        """
        start = 0
        while start < total:
            stop = min(total, start + self.size)
            try:
                result = work(start, stop)
            except Exception as exc:
                if not is_out_of_memory(exc) or stop - start <= 1:
                    raise
                del exc
                release_cached_memory(device)
                self.size = max(1, (stop - start) // 2)
                log.warning(
                    "out of memory on a chunk of %d: retrying with %d", stop - start, self.size
                )
                continue
            yield start, stop, result
            start = stop


def chunked(
    total: int,
    chunk: int,
    work: Callable[[int, int], T],
    *,
    device: str | torch.device | None = None,
) -> Iterator[tuple[int, int, T]]:
    """:meth:`Chunking.run` with a fresh chunk size ``chunk``."""
    return Chunking(chunk).run(total, work, device=device)

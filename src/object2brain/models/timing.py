"""Per-stage timing of the image path, for benchmarks: how long reading, decoding, the forward
pass, the device-to-host copies and the store writes take, summed over a run.

Off by default (no cost). Inside ``with profile_stages() as times:`` every :func:`stage` block of
the image path (:mod:`object2brain.models.inputs`) and of extraction adds its seconds to
``times``; on CUDA each timed block synchronises the device first and last, so the stages are
measured one by one and no longer overlap: compare the profile with an unprofiled run's wall time
to see the overlap. On the pipelined path (``decode="torch"``) ``read`` is summed over the
reading threads (thread-seconds: with 8 threads it may exceed the wall time) and ``decode`` is the
batched decode, resize and normalisation; on the Pillow path ``read`` is the time the main
process waits for the loader's next batch (its workers read and decode) and ``decode`` the copy
to the device and normalisation. The others are wall seconds of the thread that runs them
(``write``: the store's writer thread; ``forward`` and ``copy`` summed over extraction's CPU lanes,
which compute two batches at once on a CPU with two or more threads).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

#: The stages, in the order an image meets them.
STAGES: tuple[str, ...] = ("read", "decode", "forward", "copy", "write")


@dataclass
class StageTimes:
    """Seconds per stage (:data:`STAGES`) and the number of images that went through."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    images: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_dict(self) -> dict[str, float | int]:
        """``{"<stage>_s": seconds, ..., "images": n}`` plus each stage alone in images/s."""
        out: dict[str, float | int] = {f"{k}_s": round(v, 4) for k, v in self.seconds.items()}
        out["images"] = self.images
        for name, seconds in self.seconds.items():
            if seconds > 0 and self.images:
                out[f"{name}_images_per_s"] = round(self.images / seconds, 1)
        return out


_ACTIVE: StageTimes | None = None


@contextmanager
def profile_stages() -> Iterator[StageTimes]:
    """Collect the stage times of the image path and extraction for the block."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, StageTimes()
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous


def profiling() -> bool:
    """Whether a :func:`profile_stages` block is collecting."""
    return _ACTIVE is not None


@contextmanager
def stage(name: str, device: torch.device | None = None, *, images: int = 0) -> Iterator[None]:
    """Add the block's seconds to stage ``name`` when profiling (``device`` CUDA: synchronised
    before and after); ``images``: count these images as having passed through the path."""
    times = _ACTIVE
    if times is None:
        yield
        return
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        times.add(name, time.perf_counter() - start)
        if images:
            with times.lock:
                times.images += images

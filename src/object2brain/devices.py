"""Device selection shared by every stage (``--device auto|cpu|cuda|cuda:N``)."""

from __future__ import annotations

import torch

from object2brain.errors import Object2BrainError


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` -> the first CUDA device if one is usable, else the CPU.

    Raises:
        Object2BrainError: an unknown spec, or CUDA requested where none is available.
    """
    if isinstance(spec, torch.device):
        return spec
    text = spec.strip().lower()
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

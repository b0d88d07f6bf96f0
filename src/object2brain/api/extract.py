"""The edge of the stage behind ``o2b.extract``: load -> compute -> write (to be reshaped)."""

from __future__ import annotations

from object2brain.activations.extract import extract

__all__ = ["extract"]

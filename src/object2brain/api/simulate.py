"""The edge of the stage behind ``o2b.simulate``: load -> compute -> write (to be reshaped)."""

from __future__ import annotations

from object2brain.simulate import simulate

__all__ = ["simulate"]

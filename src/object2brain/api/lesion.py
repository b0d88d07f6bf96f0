"""The edge of the stage behind ``o2b.lesion``: load -> compute -> write (to be reshaped)."""

from __future__ import annotations

from object2brain.lesion.analysis import run_lesion as lesion

__all__ = ["lesion"]

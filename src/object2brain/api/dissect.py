"""The edge of the stage behind ``o2b.dissect``: load -> compute -> write (to be reshaped)."""

from __future__ import annotations

from object2brain.explain.dissect import dissect

__all__ = ["dissect"]

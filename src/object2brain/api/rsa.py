"""The edge of the stage behind ``o2b.rsa``: load -> compute -> write (to be reshaped)."""

from __future__ import annotations

from object2brain.rsa.align import run_alignment as rsa

__all__ = ["rsa"]

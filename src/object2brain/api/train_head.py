"""The edge of the stage behind ``o2b.train_head``: load -> compute -> write (to be reshaped)."""

from __future__ import annotations

from object2brain.heads.train import train_head

__all__ = ["train_head"]

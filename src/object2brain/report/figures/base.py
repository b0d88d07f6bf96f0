"""What every figure module shares: matplotlib on the Agg backend, file-name slugs, saving."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from object2brain.io import atomic_path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slug(text: str) -> str:
    """``text`` made safe for a file name: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(text)).strip("_") or "figure"


def save_figure(fig: Any, out_dir: str | Path, stem: str, *, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``<out_dir>/<stem>.png`` and ``.svg``, each atomically; returns both."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for fmt in ("png", "svg"):
        path = folder / f"{stem}.{fmt}"
        with atomic_path(path) as temp:
            fig.savefig(temp, format=fmt, dpi=dpi, bbox_inches="tight")
        files.append(path)
    return files

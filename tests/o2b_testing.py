"""Helpers shared by the foundation tests (imported by name: keep this module name unique)."""

from __future__ import annotations

import numpy as np
from PIL import Image

PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "camera", "cat", "horse", "page")


def shipped_photo(name: str) -> Image.Image:
    """A real photo shipped with scikit-image, as RGB."""
    from skimage import data

    array = getattr(data, name)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array)
    return image.convert("RGB")

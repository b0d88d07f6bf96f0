"""Image decoding that gives the same 8-bit RGB picture whatever the file's mode.

Every image that enters a model, a detector or a figure goes through :func:`load_image`, so that
greyscale, palette, RGBA, CMYK, 16-bit and EXIF-rotated files are handled identically everywhere:

- EXIF orientation is applied first (the picture is shown the way a photo viewer shows it);
- transparency is composited onto a white background (``ALPHA_BACKGROUND``);
- 16-bit and 32-bit integer images are scaled to 8 bits (``value / 257`` for 16-bit data,
  i.e. 65535 -> 255); float images are taken to lie in [0, 1];
- greyscale is replicated to three channels; CMYK and YCbCr are converted by Pillow.

An image may also be a row of an HDF5 image array, written ``FILE#ROW`` or ``FILE#DATASET#ROW``
(:mod:`object2brain.data.image_array`): its uint8 ``(H, W, 3)`` pixels become the RGB picture
directly, so the rest of the preprocessing is exactly that of a file with the same pixels.

An image with more pixels than Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is
decoded with a :class:`LargeImageWarning` naming its stimulus (when known) and file, once per
file, in place of Pillow's own warning, which names neither.
:func:`image_sha256` is the content hash of either kind (caches of per-image results use it).
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from object2brain.data.image_array import parse_array_ref, read_row, row_sha256
from object2brain.manifest import cached_file_sha256

ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an opened PIL image of any mode to 8-bit RGB (see module docstring)."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(image)
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    array = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(array, 0.0, 1.0) * 255.0
    else:
        # 'I' is how Pillow opens 16-bit PNG/TIFF data (values 0..65535) in some versions.
        scaled = array.astype(np.float64) / 257.0
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")


class LargeImageWarning(UserWarning):
    """An image above Pillow's decompression-bomb limit, named with its stimulus or file."""


_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()
_OPEN_LOCK = threading.Lock()


def _open(path: str | Path) -> Image.Image:
    """``Image.open`` (reads the header only) without Pillow's DecompressionBombWarning, which
    names neither the file nor the stimulus: :func:`_warn_if_large` replaces it. Images past
    twice the limit stay an error (``DecompressionBombError``). The lock keeps the warning
    filter change of one thread from racing another's."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _warn_if_large(image: Image.Image, path: str | Path, stimulus_id: str | None) -> None:
    """Warn once per file when ``image`` has more pixels than ``Image.MAX_IMAGE_PIXELS``."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is None or width * height <= limit:
        return
    with _WARNED_LOCK:
        if str(path) in _WARNED:
            return
        _WARNED.add(str(path))
    who = f"stimulus {stimulus_id!r} ({path})" if stimulus_id is not None else str(path)
    warnings.warn(
        f"{who}: {width} x {height} = {width * height:,} pixels, more than Pillow's "
        f"decompression-bomb limit of {limit:,}; decoded anyway (slow, memory-hungry: check that "
        "it is the intended image or downscale it)",
        LargeImageWarning,
        stacklevel=3,
    )


def load_image(
    path: str | Path, *, draft_size: int | None = None, stimulus_id: str | None = None
) -> Image.Image:
    """Decode ``path`` into an 8-bit RGB :class:`PIL.Image.Image`.

    Args:
        path: image file (any format Pillow reads), or a row of an image array (``FILE#ROW``,
            ``FILE#DATASET#ROW``; see module docstring).
        draft_size: if given, JPEG files may be decoded at a reduced scale no smaller than this
            many pixels on the short side (much faster; used for validation only).
        stimulus_id: names the stimulus in the warning about an image above Pillow's
            decompression-bomb limit (:class:`LargeImageWarning`, once per file).

    Raises:
        OSError, PIL.UnidentifiedImageError, ValueError: the file is unreadable or corrupt.
        StimulusError: a bad image array, dataset or row (named).
    """
    ref = parse_array_ref(path)
    if ref is not None:
        return Image.fromarray(read_row(ref))
    with _open(path) as opened:
        _warn_if_large(opened, path, stimulus_id)
        if draft_size is not None and opened.format == "JPEG":
            opened.draft("RGB", (draft_size, draft_size))
        opened.load()
        return to_rgb(opened)


def image_sha256(path: str | Path) -> str:
    """Content hash of an image: SHA-256 of the file's bytes
    (:func:`~object2brain.manifest.cached_file_sha256`), or of an array row's pixels
    (:func:`~object2brain.data.image_array.row_sha256`)."""
    ref = parse_array_ref(path)
    return row_sha256(ref) if ref is not None else cached_file_sha256(path)

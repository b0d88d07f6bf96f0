"""Every image mode decodes to the same 8-bit RGB picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from object2brain.data.images import load_image


@pytest.fixture
def base() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8), mode="RGB")


def as_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_rgb_roundtrip(base: Image.Image, tmp_path: Path) -> None:
    base.save(tmp_path / "x.png")
    np.testing.assert_array_equal(as_array(load_image(tmp_path / "x.png")), np.asarray(base))


def test_greyscale_is_replicated(base: Image.Image, tmp_path: Path) -> None:
    grey = base.convert("L")
    grey.save(tmp_path / "g.png")
    loaded = as_array(load_image(tmp_path / "g.png"))
    for channel in range(3):
        np.testing.assert_array_equal(loaded[..., channel], np.asarray(grey))


def test_sixteen_bit_matches_eight_bit(base: Image.Image, tmp_path: Path) -> None:
    grey8 = np.asarray(base.convert("L"))
    grey16 = grey8.astype(np.uint16) * 257  # full 16-bit range
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    np.testing.assert_array_equal(
        as_array(load_image(tmp_path / "g16.png")), as_array(load_image(tmp_path / "g8.png"))
    )


def test_cmyk_matches_rgb(base: Image.Image, tmp_path: Path) -> None:
    base.convert("CMYK").save(tmp_path / "c.tif")
    np.testing.assert_array_equal(as_array(load_image(tmp_path / "c.tif")), np.asarray(base))


def test_rgba_composited_on_white(base: Image.Image, tmp_path: Path) -> None:
    rgba = base.convert("RGBA")
    alpha = np.full(base.size[::-1], 255, dtype=np.uint8)
    alpha[:, :16] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "a.png")
    loaded = as_array(load_image(tmp_path / "a.png"))
    assert (loaded[:, :16] == 255).all()
    np.testing.assert_array_equal(loaded[:, 16:], np.asarray(base)[:, 16:])


def test_palette_image(base: Image.Image, tmp_path: Path) -> None:
    palette = base.convert("P")
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(
        as_array(load_image(tmp_path / "p.png")), np.asarray(palette.convert("RGB"))
    )


@pytest.mark.parametrize(
    ("orientation", "stored_as"),
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_90),
        (8, Image.Transpose.ROTATE_270),
    ],
)
def test_exif_orientation_is_applied(
    base: Image.Image, tmp_path: Path, orientation: int, stored_as: Image.Transpose
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    base.transpose(stored_as).save(tmp_path / "r.png", exif=exif)
    np.testing.assert_array_equal(as_array(load_image(tmp_path / "r.png")), np.asarray(base))


def test_corrupt_file_raises(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(OSError, match=r"(?i)truncated|cannot identify"):
        load_image(tmp_path / "bad.jpg")


def test_array_row_is_the_same_picture_as_its_png(base: Image.Image, tmp_path: Path) -> None:
    import h5py

    from object2brain.data.images import image_sha256
    from object2brain.manifest import file_sha256

    pixels = np.asarray(base)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("images", data=np.stack([pixels[::-1], pixels]))
    base.save(tmp_path / "x.png")
    from_array = load_image(f"{tmp_path / 'a.h5'}#images#1")
    assert from_array.mode == "RGB" and from_array.size == base.size
    np.testing.assert_array_equal(
        np.asarray(from_array), np.asarray(load_image(tmp_path / "x.png"))
    )
    # files keep their content hash (detection caches written before stay valid)
    assert image_sha256(tmp_path / "x.png") == file_sha256(tmp_path / "x.png")

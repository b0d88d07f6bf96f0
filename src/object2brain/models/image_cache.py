"""Decoded-image cache: model-resolution uint8 pixels of stimulus images, kept across runs.

Decoding and resizing a JPEG costs far more than a forward pass of a small network on a GPU, and
the result depends only on the image and the deterministic geometric preprocessing. So the
resized, centre-cropped pixels ``(3, crop, crop)`` uint8 (before normalisation) are kept in a
folder (``--image-cache DIR``) and a second model with the same preprocessing, a second layer set
or a rerun reads them instead of decoding.

Layout: one pair of files per geometry (resize size, crop size, interpolation), whatever the
number of images (NSD's 73,000 images at 224 x 224 make one 11 GB file, not 73,000 files):

- ``pixels-<crop>px-<geometry hash>.u8``: raw records of ``3 * crop * crop`` bytes, end to end
  (record ``s`` at byte ``s * record_size``), read through a memory map;
- ``pixels-<crop>px-<geometry hash>.idx``: one text line per record, ``key slot crc32``.

A record's **key** is the SHA-256 of the image's content hash
(:func:`~object2brain.data.images.image_sha256`: the file's bytes, or an array row's pixels) and
of the decoder that produced its pixels (``pil``, or ``torch:cpu`` / ``torch:cuda`` for
torchvision's decoders, which differ from Pillow by about one 8-bit level): a changed image file,
decoder or geometry misses the cache; moving or renaming the images does not.

Writes are append-only under an exclusive ``flock`` of ``<files>.lock`` (several runs may share a
cache): the records are written and synced first, then their index lines, so a crash leaves at
worst unindexed bytes at the end of the data file, which the next writer drops. On opening, an
index that does not parse, or a data file shorter than its index says, is a damaged cache: it is
deleted and rebuilt, with a one-line warning. Each record read is checked against its CRC-32; a
mismatch is decoded afresh (warning) instead of being used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from object2brain.data.images import image_sha256
from object2brain.errors import StoreError
from object2brain.models.zoo import Preprocessing

log = logging.getLogger("object2brain.image_cache")

#: Bumped when the record layout changes (part of the file names).
CACHE_FORMAT = 1


@dataclass(frozen=True)
class CacheEntry:
    """Where an image's pixels lie: record ``slot``, with CRC-32 ``crc``."""

    slot: int
    crc: int


class ImageCache:
    """The decoded-image cache of one geometry in ``folder`` (created when missing).

    Args:
        folder: the cache folder (``--image-cache``).
        preprocessing: the model's preprocessing; its ``resize_size``, ``crop_size`` and
            ``interpolation`` choose the files (normalisation is applied after the cache).
    """

    def __init__(self, folder: str | Path, preprocessing: Preprocessing) -> None:
        self.folder = Path(folder).expanduser()
        self.crop = preprocessing.crop_size
        self.shape = (3, self.crop, self.crop)
        self.record_size = 3 * self.crop * self.crop
        geometry = {
            "format": CACHE_FORMAT,
            "resize": preprocessing.resize_size,
            "crop": preprocessing.crop_size,
            "interpolation": preprocessing.interpolation,
        }
        tag = hashlib.sha256(json.dumps(geometry, sort_keys=True).encode()).hexdigest()[:12]
        stem = f"pixels-{self.crop}px-{tag}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"image cache {self.folder}: cannot be created: {exc}") from exc
        self.data_path = self.folder / f"{stem}.u8"
        self.index_path = self.folder / f"{stem}.idx"
        self.lock_path = self.folder / f"{stem}.lock"
        self.entries: dict[str, CacheEntry] = {}
        with self._locked():
            self._load()

    # --- keys and lookups ---------------------------------------------------------------

    @staticmethod
    def key(path: str | Path, decoder: str) -> str:
        """Cache key of image ``path`` decoded by ``decoder`` (``pil``, ``torch:cpu``, ...)."""
        return hashlib.sha256(f"{image_sha256(path)}|{decoder}".encode()).hexdigest()

    def lookup(self, keys: Sequence[str]) -> list[CacheEntry | None]:
        """The entry of each key, ``None`` where the cache does not hold it."""
        return [self.entries.get(key) for key in keys]

    def read(self, entry: CacheEntry) -> np.ndarray | None:
        """The pixels ``(3, crop, crop)`` uint8 of ``entry`` (a copy), or ``None`` when the
        record fails its CRC-32 (damaged since it was indexed: decode the image afresh)."""
        array = self._memmap()
        if array is None or entry.slot >= array.shape[0]:
            log.warning("image cache %s: record %d is missing; decoding", self.data_path,
                        entry.slot)  # fmt: skip
            return None
        pixels = np.array(array[entry.slot])
        if zlib.crc32(pixels.tobytes()) != entry.crc:
            log.warning("image cache %s: record %d fails its checksum; decoding", self.data_path,
                        entry.slot)  # fmt: skip
            return None
        return pixels

    def add(self, keys: Sequence[str], pixels: np.ndarray) -> None:
        """Append the pixels ``(n, 3, crop, crop)`` uint8 of ``keys`` (keys already held, by
        this or another run, are skipped)."""
        if len(keys) != len(pixels) or tuple(pixels.shape[1:]) != self.shape:
            raise ValueError(f"expected {len(keys)} images {self.shape}, got {pixels.shape}")
        with self._locked():
            self._load()  # records added by other runs since we opened
            new = [(k, p) for k, p in zip(keys, pixels, strict=True) if k not in self.entries]
            unique = dict(new)
            if not unique:
                return
            slot = len(self.entries)
            block = np.ascontiguousarray(np.stack(list(unique.values())), dtype=np.uint8)
            with open(self.data_path, "ab") as data:
                data.truncate(slot * self.record_size)  # drop unindexed bytes of a crash
                data.write(block.tobytes())
                data.flush()
                os.fsync(data.fileno())
            lines = []
            for offset, key in enumerate(unique):
                crc = zlib.crc32(block[offset].tobytes())
                self.entries[key] = CacheEntry(slot + offset, crc)
                lines.append(f"{key} {slot + offset} {crc}\n")
            with open(self.index_path, "a", encoding="ascii") as index:
                index.write("".join(lines))
                index.flush()
                os.fsync(index.fileno())
        self._map = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict[str, object]:
        """Pickled for loader worker processes without the memory map (each maps the file)."""
        return {**self.__dict__, "_map": None}

    # --- files --------------------------------------------------------------------------

    _map: np.ndarray | None = None

    def _memmap(self) -> np.ndarray | None:
        n = self.data_path.stat().st_size // self.record_size if self.data_path.exists() else 0
        if n == 0:
            return None
        if self._map is None or self._map.shape[0] < n:
            self._map = np.memmap(self.data_path, dtype=np.uint8, mode="r",
                                  shape=(n, *self.shape))  # fmt: skip
        return self._map

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_path, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _load(self) -> None:
        """Read the index (under the lock); rebuild a damaged cache."""
        problem = None
        entries: dict[str, CacheEntry] = {}
        if self.index_path.exists():
            text = self.index_path.read_text(encoding="ascii", errors="replace")
            try:
                entries = _parse_index(text)
            except ValueError as exc:
                problem = str(exc)
        size = self.data_path.stat().st_size if self.data_path.exists() else 0
        if problem is None and size < len(entries) * self.record_size:
            problem = (
                f"data file holds {size // self.record_size} of the {len(entries)} "
                "indexed images (truncated)"
            )
        if problem is not None:
            log.warning("image cache %s is damaged (%s): rebuilding it", self.data_path, problem)
            self.data_path.unlink(missing_ok=True)
            self.index_path.unlink(missing_ok=True)
            entries = {}
        self.entries = entries
        self._map = None


def _parse_index(text: str) -> dict[str, CacheEntry]:
    """``key slot crc`` lines (slots 0, 1, 2, ... in order) to entries."""
    if text and not text.endswith("\n"):
        raise ValueError("index ends in a partial line")
    entries: dict[str, CacheEntry] = {}
    for number, line in enumerate(text.splitlines()):
        parts = line.split(" ")
        if len(parts) != 3 or len(parts[0]) != 64 or int(parts[1]) != number:
            raise ValueError(f"index line {number + 1} is malformed")
        entries[parts[0]] = CacheEntry(number, int(parts[2]))
    return entries

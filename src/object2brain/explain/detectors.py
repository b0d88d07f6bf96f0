"""Object detectors behind one interface: image -> boxes ``(x0, y0, x1, y1)``, class name, score.

Boxes are in pixels of the image as :func:`~object2brain.data.images.load_image` decodes it
(EXIF orientation applied), ``x`` to the right, ``y`` down, ``x1``/``y1`` exclusive.

Detectors (``make_detector(spec)``):

- ``opencv`` (offline): Haar cascades for frontal faces (``face``), profile faces seen from either
  side (``face_profile``), eyes searched inside the faces (``eye``), upper bodies
  (``upper_body``) and full bodies (``full_body``), plus the HOG people detector (``person``).
- ``fasterrcnn`` (Faster R-CNN ResNet-50 FPN v2), ``retinanet`` (RetinaNet ResNet-50 FPN v2),
  ``fcos`` (FCOS ResNet-50 FPN), ``ssdlite`` (SSDlite320 MobileNetV3-Large): torchvision's COCO
  detectors with their real weights, which torchvision downloads into ``$TORCH_HOME`` when online
  (or finds there); offline without them a clear error says how to provide them.
- ``boxes:FILE``: boxes given in a CSV/TSV (``stimulus_id, x0, y0, x1, y1, label[, score]``) or a
  COCO-format JSON (``images`` with ``id`` + ``file_name``, ``annotations`` with ``image_id``,
  ``bbox`` = ``[x, y, width, height]``, ``category_id`` and optional ``score``, ``categories``
  with ``id`` + ``name``), so annotations or any detector's output (e.g. YOLO on Open Images)
  can be used. A table matches stimuli by ``stimulus_id``; COCO images match by file name, then
  file stem, then image id (see :class:`GivenBoxes`).

Detections of the real detectors are cached as JSON per (detector and its settings, SHA-256 of the
image file) by :class:`DetectionCache`, by default in one folder per user
(:func:`default_detection_cache`) that studies, the command line and the API share.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from object2brain.errors import (
    DataError,
    Object2BrainError,
    WeightsUnavailableError,
    listing,
    require_columns,
)

TORCHVISION_DETECTORS: dict[str, tuple[str, str]] = {
    "fasterrcnn": ("fasterrcnn_resnet50_fpn_v2", "FasterRCNN_ResNet50_FPN_V2_Weights"),
    "retinanet": ("retinanet_resnet50_fpn_v2", "RetinaNet_ResNet50_FPN_V2_Weights"),
    "fcos": ("fcos_resnet50_fpn", "FCOS_ResNet50_FPN_Weights"),
    "ssdlite": ("ssdlite320_mobilenet_v3_large", "SSDLite320_MobileNet_V3_Large_Weights"),
}
OPENCV_PARTS: tuple[str, ...] = (
    "face",
    "face_profile",
    "eye",
    "upper_body",
    "full_body",
    "person",
)
DETECTOR_KINDS: tuple[str, ...] = ("opencv", *TORCHVISION_DETECTORS, "boxes:FILE")

log = logging.getLogger("object2brain.explain.detectors")


@dataclass(frozen=True)
class Detection:
    """One box in image pixels (``x1``, ``y1`` exclusive), its class name and score."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str
    score: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImageDetections:
    """The detections of one stimulus and the size ``(width, height)`` of its decoded image."""

    stimulus_id: str
    width: int
    height: int
    detections: tuple[Detection, ...]


class Detector(ABC):
    """A detector: :meth:`detect` maps one decoded RGB image to its detections.

    Attributes:
        kind: ``opencv``, ``fasterrcnn``, ..., or ``boxes``.
        cacheable: whether results are cached per image hash (not for given boxes).
    """

    kind: str = ""
    cacheable: bool = True

    def config(self) -> dict[str, Any]:
        """Settings that change the detections (part of the cache key)."""
        return {"kind": self.kind}

    def cache_key(self) -> str:
        """``<kind>-<12 hex digits of the settings' hash>``."""
        text = json.dumps(self.config(), sort_keys=True)
        return f"{self.kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def ensure_ready(self) -> None:  # noqa: B027 (optional hook)
        """Load what the detector needs (weights); raises a clear error when unavailable."""

    @abstractmethod
    def detect(self, image: Image.Image, *, stimulus_id: str, path: Path) -> list[Detection]:
        """Detections in ``image`` (pixels of the decoded image)."""


# ----------------------------------------------------------------------------------------------
# OpenCV


def _iou(a: Detection, b: Detection) -> float:
    ix = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = ix * iy
    union = (a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter
    return inter / union if union > 0 else 0.0


class OpenCVDetector(Detector):
    """Offline OpenCV detectors: Haar cascades (faces, profile faces, eyes, upper/full bodies) and
    the HOG people detector (see module docstring).

    Args:
        parts: which of :data:`OPENCV_PARTS` to run.
        max_side: images are searched at most this large (longer side), boxes scaled back.
        min_face: smallest face searched, as a fraction of the image's shorter side.
    """

    kind = "opencv"

    def __init__(
        self,
        parts: Sequence[str] = OPENCV_PARTS,
        *,
        max_side: int = 800,
        min_face: float = 0.05,
    ) -> None:
        unknown = sorted(set(parts) - set(OPENCV_PARTS))
        if unknown:
            raise DataError(f"unknown OpenCV detector part(s) {unknown}; use {OPENCV_PARTS}")
        self.parts = tuple(p for p in OPENCV_PARTS if p in parts)
        self.max_side = max_side
        self.min_face = min_face
        self._cascades: dict[str, Any] = {}
        self._hog: Any = None

    def config(self) -> dict[str, Any]:
        import cv2

        return {
            "kind": self.kind,
            "parts": list(self.parts),
            "max_side": self.max_side,
            "min_face": self.min_face,
            "opencv": cv2.__version__,
        }

    def _cascade(self, name: str) -> Any:
        import cv2

        if name not in self._cascades:
            path = Path(cv2.data.haarcascades) / name  # type: ignore[attr-defined]
            cascade = cv2.CascadeClassifier(str(path))
            if cascade.empty():
                raise Object2BrainError(
                    f"OpenCV cascade {path} is missing (opencv-python-headless>=4.8,<5 ships it)"
                )
            self._cascades[name] = cascade
        return self._cascades[name]

    def ensure_ready(self) -> None:
        for name in ("haarcascade_frontalface_default.xml", "haarcascade_profileface.xml"):
            self._cascade(name)

    def _haar(
        self, grey: np.ndarray, name: str, label: str, min_size: int, neighbours: int = 5
    ) -> list[Detection]:
        boxes, _levels, weights = self._cascade(name).detectMultiScale3(
            grey,
            scaleFactor=1.1,
            minNeighbors=neighbours,
            minSize=(min_size, min_size),
            outputRejectLevels=True,
        )
        return [
            Detection(float(x), float(y), float(x + w), float(y + h), label, float(s))
            for (x, y, w, h), s in zip(
                np.asarray(boxes).reshape(-1, 4), np.ravel(weights), strict=True
            )
        ]

    def detect(self, image: Image.Image, *, stimulus_id: str, path: Path) -> list[Detection]:
        import cv2

        rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        factor = min(1.0, self.max_side / max(height, width))
        if factor < 1.0:
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        short = min(grey.shape)
        min_face = max(20, int(self.min_face * short))
        found: list[Detection] = []
        faces: list[Detection] = []
        if "face" in self.parts or "eye" in self.parts:
            faces = self._haar(grey, "haarcascade_frontalface_default.xml", "face", min_face)
            if "face" in self.parts:
                found.extend(faces)
        if "face_profile" in self.parts:
            profiles = self._haar(grey, "haarcascade_profileface.xml", "face_profile", min_face)
            flipped = self._haar(
                np.ascontiguousarray(grey[:, ::-1]),
                "haarcascade_profileface.xml",
                "face_profile",
                min_face,
            )
            w = grey.shape[1]
            profiles += [
                Detection(w - d.x1, d.y0, w - d.x0, d.y1, d.label, d.score) for d in flipped
            ]
            kept: list[Detection] = []
            for candidate in profiles:  # drop profiles that duplicate a face already found
                if all(_iou(candidate, other) < 0.3 for other in faces + kept):
                    kept.append(candidate)
            found.extend(kept)
        if "eye" in self.parts:
            for face in faces:
                x0, y0 = int(face.x0), int(face.y0)
                roi = grey[y0 : y0 + int(0.6 * (face.y1 - face.y0)), x0 : int(face.x1)]
                if min(roi.shape) < 12:
                    continue
                eye_size = max(8, int(0.15 * (face.x1 - face.x0)))
                for eye in self._haar(roi, "haarcascade_eye.xml", "eye", eye_size, neighbours=4):
                    found.append(
                        Detection(
                            eye.x0 + x0, eye.y0 + y0, eye.x1 + x0, eye.y1 + y0, "eye", eye.score
                        )
                    )
        min_body = max(24, int(0.1 * short))
        if "upper_body" in self.parts:
            found += self._haar(grey, "haarcascade_upperbody.xml", "upper_body", min_body, 3)
        if "full_body" in self.parts:
            found += self._haar(grey, "haarcascade_fullbody.xml", "full_body", min_body, 3)
        if "person" in self.parts and grey.shape[0] >= 128 and grey.shape[1] >= 64:
            if self._hog is None:
                self._hog = cv2.HOGDescriptor()
                people = cv2.HOGDescriptor_getDefaultPeopleDetector()  # type: ignore[attr-defined]
                self._hog.setSVMDetector(people)
            boxes, weights = self._hog.detectMultiScale(
                grey, winStride=(8, 8), padding=(8, 8), scale=1.05
            )
            rows = np.asarray(boxes).reshape(-1, 4)
            for (x, y, w, h), s in zip(rows, np.ravel(weights), strict=True):
                if float(s) > 0.5:
                    found.append(
                        Detection(
                            float(x), float(y), float(x + w), float(y + h), "person", float(s)
                        )
                    )
        scale = 1.0 / factor
        return [
            Detection(d.x0 * scale, d.y0 * scale, d.x1 * scale, d.y1 * scale, d.label, d.score)
            for d in found
        ]


# ----------------------------------------------------------------------------------------------
# torchvision COCO detectors


class TorchvisionDetector(Detector):
    """A torchvision COCO detector with its real weights (see module docstring).

    Args:
        kind: ``fasterrcnn`` | ``retinanet`` | ``fcos`` | ``ssdlite``.
        score_threshold: detections below this score are dropped.
        device: where the detector runs.
    """

    def __init__(
        self, kind: str, *, score_threshold: float = 0.5, device: str | torch.device = "cpu"
    ) -> None:
        if kind not in TORCHVISION_DETECTORS:
            raise DataError(f"unknown detector {kind!r}; use one of {', '.join(DETECTOR_KINDS)}")
        self.kind = kind
        self.score_threshold = score_threshold
        self.device = torch.device(device)
        self._model: Any = None
        self._categories: list[str] = []
        self._transform: Any = None

    def config(self) -> dict[str, Any]:
        import torchvision

        builder, weights = TORCHVISION_DETECTORS[self.kind]
        return {
            "kind": self.kind,
            "builder": builder,
            "weights": f"{weights}.DEFAULT",  # DEFAULT may name newer weights in a new release
            "torchvision": torchvision.__version__,
            "score_threshold": self.score_threshold,
        }

    def ensure_ready(self) -> None:
        if self._model is not None:
            return
        import os

        from torch.hub import get_dir
        from torchvision.models import detection

        builder_name, enum_name = TORCHVISION_DETECTORS[self.kind]
        weights = getattr(detection, enum_name).DEFAULT
        cache = Path(get_dir()) / "checkpoints" / Path(weights.url).name
        offline = os.environ.get("OBJECT2BRAIN_OFFLINE", "").strip().lower() in {"1", "true", "yes"}
        message = (
            f"detector {self.kind!r} needs the COCO weights {enum_name}.DEFAULT, which are not "
            f"available ({{reason}}). Download {weights.url} into {cache.parent} (or set "
            f"TORCH_HOME to a folder whose hub/checkpoints holds {cache.name}) and run again, or "
            "use the offline detector --detector opencv, or bring boxes with --detector boxes:FILE"
        )
        if not cache.is_file() and offline:
            raise WeightsUnavailableError(message.format(reason="offline mode, not in the cache"))
        try:
            model = getattr(detection, builder_name)(
                weights=weights, weights_backbone=None, progress=False
            )
        except (OSError, RuntimeError) as exc:  # no network, or a corrupt download
            raise WeightsUnavailableError(message.format(reason=str(exc))) from None
        self._model = model.eval().to(self.device)
        self._categories = list(weights.meta["categories"])
        self._transform = weights.transforms()

    def detect(self, image: Image.Image, *, stimulus_id: str, path: Path) -> list[Detection]:
        from torchvision.transforms.functional import pil_to_tensor

        self.ensure_ready()
        tensor = self._transform(pil_to_tensor(image.convert("RGB"))).to(self.device)
        with torch.inference_mode():
            (result,) = self._model([tensor])
        found = []
        for box, label, score in zip(
            result["boxes"].cpu().tolist(),
            result["labels"].cpu().tolist(),
            result["scores"].cpu().tolist(),
            strict=True,
        ):
            name = self._categories[int(label)]
            if score >= self.score_threshold and name not in {"__background__", "N/A"}:
                x0, y0, x1, y1 = (float(v) for v in box)
                found.append(Detection(x0, y0, x1, y1, name, float(score)))
        return found


# ----------------------------------------------------------------------------------------------
# given boxes


@dataclass(frozen=True)
class _MatchRule:
    """One way a stimulus can find its entry in a boxes file: ``lookup`` maps a key of the file
    (e.g. a COCO file stem) to its entries (more than one: ambiguous), ``keys`` gives the
    stimulus's candidate keys ``(stimulus_id, path) -> [key, ...]``."""

    name: str
    lookup: dict[str, list[str]]
    keys: Callable[[str, Path], list[str]]


class GivenBoxes(Detector):
    """Boxes read from a CSV/TSV or COCO JSON file (see module docstring).

    A box table matches stimuli by ``stimulus_id`` only. A COCO image matches by file name, then
    by file stem (vs stimulus id or the image's stem), then by image id (vs stimulus id): the
    first rule that matches decides, so stimulus ``1`` with file ``1.jpg`` gets image ``1.jpg``,
    not image id 1. A key shared by two COCO images is an error when a stimulus needs it.

    Attributes:
        boxes: entry (stimulus id, or ``file_name (id N)``) -> detections.
        used: entries matched by a stimulus so far (to report boxes of unknown stimuli).
    """

    kind = "boxes"
    cacheable = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise DataError(f"{self.path}: boxes file not found")
        self.used: set[str] = set()
        if self.path.suffix.lower() == ".json":
            self.boxes, self.rules = _read_coco(self.path)
        else:
            self.boxes = _read_box_table(self.path)
            by_id = _MatchRule("stimulus id", {sid: [sid] for sid in self.boxes}, _stimulus_id)
            self.rules = [by_id]

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path)}

    def detect(self, image: Image.Image, *, stimulus_id: str, path: Path) -> list[Detection]:
        return self.lookup(stimulus_id=stimulus_id, path=path)

    def lookup(self, *, stimulus_id: str, path: Path) -> list[Detection]:
        """The boxes given for a stimulus (no pixels needed), matched by id or file name."""
        for rule in self.rules:
            for key in rule.keys(stimulus_id, path):
                entries = rule.lookup.get(key, [])
                if len(entries) > 1:
                    raise DataError(
                        f"{self.path}: stimulus {stimulus_id!r} matches {listing(entries)} by "
                        f"{rule.name} {key!r}: give the images distinct file names"
                    )
                if entries:
                    self.used.add(entries[0])
                    return list(self.boxes[entries[0]])
        return []

    def unmatched(self) -> list[str]:
        """Entries (stimulus ids / COCO images) of the file that no stimulus matched."""
        return sorted(set(self.boxes) - self.used)


def _stimulus_id(stimulus_id: str, path: Path) -> list[str]:
    return [stimulus_id]


_BOX_COLUMNS = ("stimulus_id", "x0", "y0", "x1", "y1", "label")


def _read_box_table(path: Path) -> dict[str, list[Detection]]:
    import pandas as pd

    try:
        sep = "\t" if path.suffix.lower() in {".tsv", ".tab"} else ","
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as exc:  # parser errors, encoding errors
        raise DataError(f"{path}: cannot be read as a boxes table ({exc})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    require_columns(
        frame.columns,
        _BOX_COLUMNS,
        str(path),
        detail=f"; expected {', '.join(_BOX_COLUMNS)}[, score]",
    )
    problems: list[str] = []
    boxes: dict[str, list[Detection]] = {}
    has_score = "score" in frame.columns
    for row_number, record in enumerate(frame.to_dict("records"), start=1):
        where = f"row {row_number} (line {row_number + 1})"
        try:
            coords = [float(record[c]) for c in ("x0", "y0", "x1", "y1")]
            score = float(record["score"]) if has_score and record["score"] != "" else 1.0
        except (TypeError, ValueError):
            problems.append(f"{where}: non-numeric coordinate or score")
            continue
        if not all(math.isfinite(v) for v in [*coords, score]):
            problems.append(f"{where}: non-finite coordinate or score")
            continue
        if coords[2] <= coords[0] or coords[3] <= coords[1]:
            problems.append(f"{where}: empty box (need x1 > x0 and y1 > y0)")
            continue
        sid, label = str(record["stimulus_id"]).strip(), str(record["label"]).strip()
        if not sid or not label:
            problems.append(f"{where}: empty stimulus_id or label")
            continue
        boxes.setdefault(sid, []).append(
            Detection(coords[0], coords[1], coords[2], coords[3], label, score)
        )
    if problems:
        shown = "; ".join(problems[:10]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 10 else ""
        )
        raise DataError(f"{path}: {len(problems)} bad row(s): {shown}")
    return boxes


def _read_coco(path: Path) -> tuple[dict[str, list[Detection]], list[_MatchRule]]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(payload, list):  # a bare results list needs the images/categories: reject
        raise DataError(
            f"{path}: a COCO file needs 'images', 'annotations' and 'categories' (got a list)"
        )
    missing = [k for k in ("images", "annotations", "categories") if k not in payload]
    if missing:
        raise DataError(f"{path}: COCO file without {', '.join(missing)}")
    problems: list[str] = []
    try:
        names = {c["id"]: str(c["name"]) for c in payload["categories"]}
        images = {im["id"]: str(im["file_name"]) for im in payload["images"]}
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"{path}: categories need 'id' and 'name', images 'id' and 'file_name' (missing {exc})"
        ) from None
    per_image: dict[Any, list[Detection]] = {key: [] for key in images}
    for number, ann in enumerate(payload["annotations"]):
        where = f"annotation {number} (id {ann.get('id', '?') if isinstance(ann, dict) else '?'})"
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            image_id, category = ann["image_id"], ann["category_id"]
            score = float(ann.get("score", 1.0))
        except (KeyError, TypeError, ValueError):
            problems.append(f"{where}: needs image_id, category_id and bbox [x, y, w, h]")
            continue
        if image_id not in images:
            problems.append(f"{where}: unknown image_id {image_id!r}")
        elif category not in names:
            problems.append(f"{where}: unknown category_id {category!r}")
        elif not (w > 0 and h > 0 and all(math.isfinite(v) for v in (x, y, w, h))):
            problems.append(f"{where}: empty or non-finite bbox")
        else:
            per_image[image_id].append(Detection(x, y, x + w, y + h, names[category], score))
    if problems:
        shown = "; ".join(problems[:10]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 10 else ""
        )
        raise DataError(f"{path}: {len(problems)} bad annotation(s): {shown}")
    entries = {image_id: f"{file_name} (id {image_id})" for image_id, file_name in images.items()}
    boxes = {entries[image_id]: per_image[image_id] for image_id in images}

    def lookup(key: Callable[[Any, str], str]) -> dict[str, list[str]]:
        table: dict[str, list[str]] = {}
        for image_id, file_name in images.items():
            table.setdefault(key(image_id, file_name), []).append(entries[image_id])
        return table

    rules = [
        _MatchRule("file name", lookup(lambda _, f: Path(f).name), lambda s, p: [p.name, s]),
        _MatchRule("file stem", lookup(lambda _, f: Path(f).stem), lambda s, p: [s, p.stem]),
        _MatchRule("image id", lookup(lambda i, _: str(i)), _stimulus_id),
    ]
    return boxes, rules


# ----------------------------------------------------------------------------------------------
# factory, cache, batch detection


def given_boxes_file(spec: str) -> str | None:
    """The ``FILE`` of a ``boxes:FILE`` detector spec; None for the other detectors."""
    text = spec.strip()
    return text[len("boxes:") :] if text.lower().startswith("boxes:") else None


def make_detector(
    spec: str, *, device: str | torch.device = "cpu", score_threshold: float = 0.5
) -> Detector:
    """``opencv`` | ``fasterrcnn`` | ``retinanet`` | ``fcos`` | ``ssdlite`` | ``boxes:FILE``."""
    boxes = given_boxes_file(spec)
    if boxes is not None:
        return GivenBoxes(boxes)
    key = spec.strip().lower()
    if key == "opencv":
        return OpenCVDetector()
    if key in TORCHVISION_DETECTORS:
        return TorchvisionDetector(key, score_threshold=score_threshold, device=device)
    raise DataError(f"unknown detector {spec!r}; use one of {', '.join(DETECTOR_KINDS)}")


def default_detection_cache() -> Path:
    """The detection cache shared by studies, the command line and the API:
    ``$XDG_CACHE_HOME/object2brain/detections``, else ``~/.cache/object2brain/detections``."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "object2brain" / "detections"


class DetectionCache:
    """JSON files ``<folder>/<detector key>/<sha[:2]>/<sha>.json``, one per image file hash."""

    def __init__(self, folder: str | Path, detector: Detector) -> None:
        self.folder = Path(folder).expanduser() / detector.cache_key()
        self.detector = detector

    def _path(self, image_sha: str) -> Path:
        return self.folder / image_sha[:2] / f"{image_sha}.json"

    def get(self, image_sha: str) -> tuple[int, int, list[Detection]] | None:
        """``(width, height, detections)`` or ``None`` when not cached (or unreadable)."""
        path = self._path(image_sha)
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            found = [Detection(**d) for d in payload["detections"]]
            return int(payload["width"]), int(payload["height"]), found
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "%s: damaged detection cache file (%s); detecting again and rewriting it",
                path, " ".join(str(exc).split())[:80],
            )  # fmt: skip
            return None

    def put(self, image_sha: str, width: int, height: int, found: Sequence[Detection]) -> None:
        from object2brain.io import write_json

        path = self._path(image_sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(
            path,
            {
                "detector": self.detector.config(),
                "image_sha256": image_sha,
                "width": width,
                "height": height,
                "detections": [d.to_dict() for d in found],
            },
        )


def detect_images(
    detector: Detector,
    ids: Sequence[str],
    paths: Sequence[Path],
    *,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[list[ImageDetections], int]:
    """Run ``detector`` on every image (decoded with ``load_image``), using the cache.

    Returns:
        One :class:`ImageDetections` per stimulus (in order) and the number of cache hits.
    """
    from tqdm.auto import tqdm

    from object2brain.data.images import image_sha256, load_image

    cache = DetectionCache(cache_dir, detector) if cache_dir and detector.cacheable else None
    results: list[ImageDetections] = []
    hits = 0
    for sid, path in tqdm(
        list(zip(ids, paths, strict=True)), disable=not progress, unit="img", desc="detect"
    ):
        digest = image_sha256(path) if cache is not None else ""  # file bytes or array row
        cached = cache.get(digest) if cache is not None else None
        if cached is not None:
            width, height, found = cached
            hits += 1
        else:
            image = load_image(path)
            width, height = image.size
            detector.ensure_ready()
            found = detector.detect(image, stimulus_id=sid, path=Path(path))
            if cache is not None:
                cache.put(digest, width, height, found)
        results.append(ImageDetections(sid, width, height, tuple(found)))
    return results, hits

"""Object groups: YAML maps from detector class names to the groups filters are assigned to.

A group map is a YAML file::

    name: coco                      # optional label
    groups:                         # group -> detector class names, in display order
      Humans: [person]
      Animals: [bird, cat, dog]

Class names match case-insensitively, with ``_`` and ``-`` read as spaces (``upper_body`` ==
``Upper body``). A class listed under two groups is an error. Three maps ship with object2brain:
``coco`` (the 80 COCO classes of torchvision's detectors), ``opencv`` (the Haar / HOG detectors of
:mod:`object2brain.explain.detectors`) and ``openimages`` (Open Images V7 class names, e.g. the
output of YOLO Open-Images models); ``default`` merges all three. Users pass their own file to
replace them. Classes a detector reports that the map does not know are counted and reported,
and their boxes left out.

Groups: ``Humans`` (whole people), ``Faces`` (faces and their parts: eyes, nose, mouth),
``BodyParts`` (the rest of the body), ``Animals``, ``Vehicles``, ``Food``, ``Furniture``,
``Clothing``, ``Buildings/Scene`` and ``Objects`` (other man-made things).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from object2brain.errors import DataError
from object2brain.yaml_io import describe_yaml_error, load_yaml, parse_yaml

SHIPPED_MAPS: tuple[str, ...] = ("openimages", "coco", "opencv")


def normalise_class(name: str) -> str:
    """``'Upper_Body '`` -> ``'upper body'`` (lower case, ``_``/``-`` as spaces, one space)."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", str(name))).strip().lower()


@dataclass(frozen=True)
class GroupMap:
    """Class name -> object group.

    Attributes:
        name: label of the map (file stem or ``name:`` entry).
        groups: group names in display order.
        classes: normalised class name -> group.
        source: the YAML file(s) it was read from.
    """

    name: str
    groups: tuple[str, ...]
    classes: dict[str, str]
    source: tuple[str, ...] = field(default=())

    def group_of(self, label: str) -> str | None:
        """The group of a detector class, or ``None`` when unmapped."""
        return self.classes.get(normalise_class(label))

    def unmapped(self, labels: Iterable[str]) -> list[str]:
        """The labels (sorted, unique) that belong to no group."""
        return sorted({label for label in labels if self.group_of(label) is None})


def _parse(payload: object, origin: str) -> GroupMap:
    if not isinstance(payload, Mapping) or not isinstance(payload.get("groups"), Mapping):
        raise DataError(f"{origin}: expected a mapping with a 'groups:' mapping (group -> classes)")
    groups: list[str] = []
    classes: dict[str, str] = {}
    problems: list[str] = []
    for group, members in payload["groups"].items():
        group = str(group)
        if isinstance(members, str):
            members = [members]
        if not isinstance(members, list):
            problems.append(f"group {group!r}: expected a list of class names")
            continue
        groups.append(group)
        for member in members:
            key = normalise_class(str(member))
            if key in classes and classes[key] != group:
                problems.append(f"class {member!r} is in both {classes[key]!r} and {group!r}")
            classes[key] = group
    if problems:
        raise DataError(f"{origin}: {'; '.join(problems)}")
    if not groups:
        raise DataError(f"{origin}: no groups defined")
    return GroupMap(
        str(payload.get("name") or Path(origin).stem), tuple(groups), classes, (origin,)
    )


def load_groups(source: str | Path) -> GroupMap:
    """Read a group map: a YAML path, or a shipped name (``coco``, ``opencv``, ``openimages``,
    ``default`` = all three merged).

    Raises:
        DataError: missing or malformed file (naming it), or a class in two groups.
    """
    text = str(source)
    if text in SHIPPED_MAPS:
        package = resources.files("object2brain.explain") / "groups" / f"{text}.yaml"
        return _parse(parse_yaml(package.read_text(encoding="utf-8")), f"{text}.yaml")
    if text == "default":
        return merge_groups([load_groups(name) for name in SHIPPED_MAPS], name="default")
    path = Path(text).expanduser()
    if not path.is_file():
        raise DataError(
            f"{path}: group map not found (give a YAML file or one of "
            f"{', '.join((*SHIPPED_MAPS, 'default'))})"
        )
    try:
        payload = load_yaml(path)
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML: {describe_yaml_error(exc)}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid YAML ({exc})") from None
    return _parse(payload, str(path))


def merge_groups(maps: Iterable[GroupMap], *, name: str = "merged") -> GroupMap:
    """Union of several maps (groups in first-seen order; the first map wins on conflicts)."""
    groups: list[str] = []
    classes: dict[str, str] = {}
    sources: list[str] = []
    for group_map in maps:
        groups.extend(g for g in group_map.groups if g not in groups)
        for key, group in group_map.classes.items():
            classes.setdefault(key, group)
        sources.extend(group_map.source)
    return GroupMap(name, tuple(groups), classes, tuple(sources))


def default_groups_for(detector_kind: str) -> GroupMap:
    """The shipped map that fits a detector: ``opencv`` -> opencv, COCO detectors -> coco,
    given boxes -> ``default`` (all three merged)."""
    if detector_kind == "opencv":
        return load_groups("opencv")
    if detector_kind in {"fasterrcnn", "retinanet", "fcos", "ssdlite"}:
        return load_groups("coco")
    return load_groups("default")

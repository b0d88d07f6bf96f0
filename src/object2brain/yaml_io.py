"""The one YAML reader of the package: safe, and a key given twice is an error.

PyYAML's ``safe_load`` keeps the *last* value of a key written twice in one mapping
(``n_perm: 100`` ... ``n_perm: 10000``), so an edit that adds a key without removing the old one
silently changes a study. :func:`load_yaml` reads with the same safe constructors (no
``!!python`` tags) but refuses such a mapping, naming the key and both lines. Every YAML file the
package reads (study configs, brain manifests, group maps) goes through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives the same key twice (a :class:`yaml.YAMLError`)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``SafeLoader`` whose mappings refuse a key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *base`` keys may be overridden: only keys written here count
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            line = key_node.start_mark.line + 1
            if first is not None:
                raise DuplicateKeyError(
                    None,
                    None,
                    f"key {key!r} is given twice (lines {first} and {line}); keep one",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """The data of a YAML document, read safely; a key given twice in a mapping is an error.

    Raises:
        yaml.YAMLError: malformed YAML, an unsafe tag, or a duplicate key
            (:class:`DuplicateKeyError`, naming the key and its lines).
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe


def load_yaml(path: str | Path, *, encoding: str = "utf-8") -> Any:
    """:func:`parse_yaml` of the file ``path`` (``OSError``/``UnicodeDecodeError`` pass through)."""
    return parse_yaml(Path(path).read_text(encoding=encoding))


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where (``line L, column C``)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        parts = [str(p) for p in (exc.context, exc.problem) if p]
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return "; ".join(parts) + where
    return " ".join(str(exc).split())

"""User-facing errors.

Every problem a user can cause (bad files, unknown names, unavailable weights) raises a subclass of
:class:`Object2BrainError` whose message is complete on its own: the CLI prints it as one line
(no traceback unless ``--debug``) and exits with status 2.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

MAX_LISTED = 20


def listing(items: Sequence[object], limit: int = MAX_LISTED) -> str:
    """``a, b, c, ... and N more``: the items at fault, shortened for a one-line message."""
    shown = ", ".join(str(i) for i in items[:limit])
    more = len(items) - limit
    return shown + (f", ... and {more} more" if more > 0 else "")


class Object2BrainError(Exception):
    """Base class of errors caused by the user's input or environment."""


class StimulusError(Object2BrainError):
    """The stimulus table or its images are invalid."""


class ModelError(Object2BrainError):
    """Unknown architecture, or a checkpoint that does not fit it."""


class WeightsUnavailableError(ModelError):
    """Requested weights are neither cached nor downloadable."""


class LayerError(Object2BrainError):
    """Unknown layer name, or a module that cannot be hooked."""


class StoreError(Object2BrainError):
    """An activation store or output path that cannot be read or written."""


class DataError(Object2BrainError):
    """Ratings, brain data or result tables that are invalid or do not match."""


def require_columns(
    found: Iterable[object],
    required: Sequence[str],
    where: str,
    *,
    error: type[Object2BrainError] = DataError,
    label: str = "column(s)",
    detail: str = "",
) -> None:
    """Raise ``error`` naming ``where``, the ``required`` columns missing from ``found`` and the
    columns found: ``<where>: missing <label> a, b<detail> (found: x, y)``."""
    columns = [str(c) for c in found]
    missing = [c for c in required if c not in columns]
    if missing:
        raise error(
            f"{where}: missing {label} {', '.join(missing)}{detail} "
            f"(found: {', '.join(columns) or 'none'})"
        )


def require_unique_ids(
    ids: Iterable[str], where: str, *, error: type[Object2BrainError] = DataError
) -> None:
    """Raise ``error`` naming ``where`` and every stimulus id that occurs more than once."""
    duplicated = sorted(sid for sid, count in Counter(ids).items() if count > 1)
    if duplicated:
        raise error(f"{where}: duplicate stimulus id(s): {listing(duplicated)}")

"""The executor protocol, the local executor and the chunk-seed rule (no Ray here)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from object2brain.errors import Object2BrainError

Chunk = TypeVar("Chunk")
Result = TypeVar("Result")


class ExecutorError(Object2BrainError):
    """A chunk of a stage failed on every try, or the executor cannot be used (Ray missing,
    no cluster at the address)."""


def chunk_seed(root_seed: int, stream: int | None, chunk_index: int) -> list[int]:
    """Seed words of chunk ``chunk_index`` of random stream ``stream``: the entropy of
    ``numpy.random.default_rng(chunk_seed(...))``.

    ``[root_seed, chunk_index]`` for the main stream (``stream=None``: the Mantel permutations,
    whose blocks were seeded this way before executors existed, so no earlier result changes),
    ``[root_seed, stream, chunk_index]`` for any other stream. A chunk's numbers depend only on
    these words, never on which worker runs it, in what order, or how many chunks run at once.
    """
    if root_seed < 0 or chunk_index < 0 or (stream is not None and stream < 0):
        raise ValueError("seeds, streams and chunk indices are non-negative integers")
    if stream is None:
        return [int(root_seed), int(chunk_index)]
    return [int(root_seed), int(stream), int(chunk_index)]


def chunks_of(total: int, size: int) -> list[range]:
    """``range(total)`` cut into consecutive ranges of ``size`` (the last one shorter)."""
    size = max(1, int(size))
    return [range(start, min(total, start + size)) for start in range(0, total, size)]


@runtime_checkable
class Executor(Protocol):
    """Runs ``fn`` on each chunk; results in the order of ``chunks``.

    ``shared`` (optional) is passed as the first argument of every call, ``fn(shared, chunk)``:
    a Ray executor puts it in the object store once instead of once per task. ``stage`` names the
    stage in errors (``rsa: chunk 3 of 10 failed after 3 retries: ...``).
    """

    @property
    def name(self) -> str:
        """``local`` | ``ray``."""

    @property
    def workers(self) -> int:
        """How many chunks run at once."""

    def map_chunks(
        self,
        fn: Callable[..., Result],
        chunks: Sequence[Any],
        *,
        stage: str,
        shared: Any = None,
    ) -> list[Result]: ...


class LocalExecutor:
    """A plain loop in this process: ``[fn(shared, c) for c in chunks]``."""

    name = "local"
    workers = 1

    def map_chunks(
        self,
        fn: Callable[..., Result],
        chunks: Sequence[Any],
        *,
        stage: str,
        shared: Any = None,
    ) -> list[Result]:
        return [fn(c) if shared is None else fn(shared, c) for c in chunks]

    def __repr__(self) -> str:
        return "LocalExecutor()"

"""The single-process Pillow path decodes one batch ahead on a thread: same batches, in order,
errors raised at their item, and the thread stops when the consumer does."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from object2brain.models.inputs import read_ahead


def test_items_in_order_and_producer_runs_ahead() -> None:
    produced: list[int] = []

    def source() -> Iterator[int]:
        for i in range(5):
            produced.append(i)
            yield i

    it = read_ahead(source(), depth=1)
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(produced) >= 2  # item 1 was made while the consumer held item 0
    assert [0, *it] == [0, 1, 2, 3, 4]


def test_error_is_raised_at_its_item() -> None:
    def source() -> Iterator[int]:
        yield 1
        raise ValueError("broken image")

    it = read_ahead(source())
    assert next(it) == 1
    with pytest.raises(ValueError, match="broken image"):
        next(it)


def test_closing_stops_the_thread() -> None:
    def endless() -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    before = {t.ident for t in threading.enumerate()}
    it = read_ahead(endless(), depth=2)
    assert next(it) == 0
    it.close()
    assert not [t for t in threading.enumerate()
                if t.name == "o2b-read-ahead" and t.ident not in before]  # fmt: skip

"""The helpers of :mod:`object2brain.io` behind items 3 and 5: the output lock and the staged
result folder (in-process; the real processes and filesystems are in the other fault tests)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from object2brain.errors import DataError, StoreError
from object2brain.io import lock_path, output_lock, staged_output


def test_lock_refuses_a_second_holder_and_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "new" / "acts.h5"
    with output_lock(out):
        assert lock_path(out).is_file()
        with pytest.raises(StoreError, match="is writing it") as caught, output_lock(out):
            pass
        assert "\n" not in str(caught.value)
    assert not lock_path(out).exists()
    with output_lock(out):  # free again
        pass


def test_failed_run_leaves_no_folder_it_created(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "res"

    def failing_run() -> None:
        with staged_output(out) as staging:
            (staging.folder / "alignment.csv").write_text("x\n")
            raise DataError("bad input")

    with pytest.raises(DataError):
        failing_run()
    assert not (tmp_path / "a").exists()


def test_staged_folder_swaps_in_whole_and_keeps_caches(tmp_path: Path) -> None:
    out = tmp_path / "res"
    with staged_output(out) as staging:
        pd.DataFrame({"a": [1]}).to_csv(staging.folder / "t.csv", index=False)
        (out / "cache").mkdir(parents=True)  # a cache written into out itself during the run
        (out / "cache" / "c.json").write_text("{}")
        assert not (out / "t.csv").exists()  # nothing visible before the end
        (staging.folder / "manifest.json").write_text(
            f'{{"config": {{"out": "{staging.folder}"}}, "outputs": ["t.csv"]}}'
        )
    assert (out / "t.csv").is_file() and (out / "cache" / "c.json").read_text() == "{}"
    assert str(out) in (out / "manifest.json").read_text()  # paths of the stage rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


def test_rsa_with_bad_input_creates_nothing(tmp_path: Path) -> None:
    import h5py
    import numpy as np

    import object2brain as o2b

    store = tmp_path / "acts.h5"
    with h5py.File(store, "w") as handle:
        handle.create_dataset("stimulus_ids", data=np.asarray(["a", "b", "c", "d"], dtype=object),
                              dtype=h5py.string_dtype())  # fmt: skip
        handle.create_group("layers").create_dataset("fc", data=np.eye(4, dtype=np.float32))
        handle.attrs["complete"] = True
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("who,what\n1,2\n")
    with pytest.raises(o2b.Object2BrainError):
        o2b.rsa(store, ratings=ratings, out=tmp_path / "new" / "res", progress=False)
    assert not (tmp_path / "new").exists()

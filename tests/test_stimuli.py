"""Stimulus tables and folders: loading, carrying columns, and reporting every problem at once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from object2brain.data.stimuli import load_stimuli
from object2brain.errors import StimulusError


def test_csv_table_with_relative_paths(stimulus_table: Path) -> None:
    stimuli = load_stimuli(stimulus_table)
    assert len(stimuli) == 8
    assert stimuli.ids[0] == "s00_coffee"
    assert all(p.is_absolute() and p.is_file() for p in stimuli.paths)
    assert stimuli.conditions is not None and set(stimuli.conditions) == {
        "congruent",
        "incongruent",
    }
    assert "valence" in stimuli.table.columns


@pytest.mark.parametrize("fmt", ["tsv", "parquet"])
def test_tsv_and_parquet(stimulus_table: Path, fmt: str) -> None:
    frame = pd.read_csv(stimulus_table, dtype={"stimulus_id": str})
    frame["extra"] = range(len(frame))
    path = stimulus_table.with_suffix(f".{fmt}")
    if fmt == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    else:
        frame.to_parquet(path, index=False)
    stimuli = load_stimuli(path)
    assert stimuli.ids == list(frame["stimulus_id"])
    assert list(stimuli.table["extra"]) == list(range(len(frame)))


def test_numeric_looking_ids_stay_strings(photo_dir: Path, tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    pd.DataFrame(
        {
            "stimulus_id": ["001", "002"],
            "path": [str(photo_dir / "coffee.jpg"), str(photo_dir / "cat.jpg")],
        }
    ).to_csv(table, index=False)
    assert load_stimuli(table).ids == ["001", "002"]


def test_folder_uses_file_stems(photo_dir: Path) -> None:
    stimuli = load_stimuli(photo_dir)
    assert stimuli.ids == sorted(p.stem for p in photo_dir.glob("*.jpg"))


def test_relative_folder(photo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder given relative to the working directory (was joined to itself twice)."""
    monkeypatch.chdir(photo_dir.parent)
    stimuli = load_stimuli(Path(photo_dir.name))
    assert stimuli.paths == sorted(p.resolve() for p in photo_dir.glob("*.jpg"))


def test_subset_and_fingerprint(stimulus_table: Path) -> None:
    stimuli = load_stimuli(stimulus_table)
    sub = stimuli.subset(["s03_rocket", "s00_coffee"])
    assert sub.ids == ["s03_rocket", "s00_coffee"]
    assert stimuli.fingerprint() == load_stimuli(stimulus_table).fingerprint()
    assert len(stimuli.fingerprint()) == 64


def test_fingerprint_follows_image_bytes_not_file_times(
    stimulus_table: Path, tmp_path: Path
) -> None:
    """Copied (new mtimes, new folder) images keep the fingerprint; an image edited in place with
    its size and mtime restored (``cp -p`` of another file) changes it in a new process."""
    import importlib
    import os
    import shutil

    manifest_module = importlib.import_module("object2brain.manifest")
    original = load_stimuli(stimulus_table)
    frame = original.table.copy()
    (tmp_path / "copy").mkdir()
    for sid, path in zip(original.ids, original.paths, strict=True):
        shutil.copy(path, tmp_path / "copy" / f"{sid}.jpg")
    frame["path"] = [f"copy/{sid}.jpg" for sid in original.ids]
    frame.to_csv(tmp_path / "copied.csv", index=False)
    copied = load_stimuli(tmp_path / "copied.csv")
    assert copied.fingerprint() == original.fingerprint()

    victim = copied.paths[0]
    stat = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # inside the JPEG's last scan, same length
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    manifest_module._HASHES.clear()  # what a new process starts with
    assert load_stimuli(tmp_path / "copied.csv").fingerprint() != original.fingerprint()


def test_all_missing_files_listed_at_once(stimulus_table: Path) -> None:
    frame = pd.read_csv(stimulus_table)
    frame.loc[1, "path"] = "nowhere/a.jpg"
    frame.loc[4, "path"] = "nowhere/b.jpg"
    frame.to_csv(stimulus_table, index=False)
    with pytest.raises(StimulusError) as info:
        load_stimuli(stimulus_table)
    message = str(info.value)
    assert "2 missing image file(s)" in message
    assert "s01_chelsea" in message and "s04_camera" in message
    assert str(stimulus_table) in message


def test_corrupt_and_truncated_images_listed(photo_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    shutil.copytree(photo_dir, folder)
    (folder / "garbage.jpg").write_bytes(b"this is not an image")
    data = (photo_dir / "coffee.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(StimulusError) as info:
        load_stimuli(folder)
    message = str(info.value)
    assert "2 unreadable image(s)" in message
    assert "garbage" in message and "truncated" in message


def test_duplicate_ids_and_missing_files_reported_together(photo_dir: Path, tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    pd.DataFrame(
        {
            "stimulus_id": ["a", "a", "b", "c"],
            "path": [str(photo_dir / "coffee.jpg")] * 3 + ["missing.jpg"],
        }
    ).to_csv(table, index=False)
    with pytest.raises(StimulusError) as info:
        load_stimuli(table)
    assert "duplicate stimulus_id(s): a" in str(info.value)
    assert "1 missing image file(s): c" in str(info.value)


def test_condition_all_is_reserved_and_empty_condition_is_none(
    photo_dir: Path, tmp_path: Path
) -> None:
    """``all`` names the whole set in the result tables; an empty cell means no condition."""
    table = tmp_path / "t.csv"
    frame = pd.DataFrame(
        {
            "stimulus_id": ["a", "b", "c"],
            "path": [str(photo_dir / "coffee.jpg")] * 3,
            "condition": ["x", "all", None],
        }
    )
    frame.to_csv(table, index=False)
    with pytest.raises(StimulusError, match=r"t\.csv: condition 'all' \(line\(s\) 3\) is reserved"):
        load_stimuli(table)
    frame.loc[1, "condition"] = " y "
    frame.to_csv(table, index=False)
    assert load_stimuli(table).conditions == ["x", "y", ""]


def test_empty_table(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("stimulus_id,path\n")
    with pytest.raises(StimulusError, match="no rows"):
        load_stimuli(table)
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(StimulusError, match="empty"):
        load_stimuli(tmp_path / "blank.csv")


def test_missing_columns_named(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("id,file\nx,y.jpg\n")
    with pytest.raises(StimulusError, match=r"missing required column\(s\) stimulus_id, path"):
        load_stimuli(table)


def test_unsupported_format_and_missing_source(tmp_path: Path) -> None:
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(StimulusError, match="unsupported table format"):
        load_stimuli(tmp_path / "t.xlsx")
    with pytest.raises(StimulusError, match="no such stimulus table"):
        load_stimuli(tmp_path / "absent.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(StimulusError, match="no image files"):
        load_stimuli(tmp_path / "empty_dir")


def test_require_columns_names_file_missing_and_found() -> None:
    from object2brain.errors import DataError, require_columns

    require_columns(["a", "b"], ["a"], "t.csv")  # nothing missing: no error
    with pytest.raises(DataError, match=r"^t\.csv: missing column\(s\) b, c \(found: a\)$"):
        require_columns(["a"], ["b", "c"], "t.csv")
    with pytest.raises(
        StimulusError, match=r"missing required column\(s\) x; see y \(found: none\)"
    ):
        require_columns([], ["x"], "t", error=StimulusError, label="required column(s)",
                        detail="; see y")  # fmt: skip

"""Run manifests: outputs recorded so that the folder can be moved."""

from __future__ import annotations

from pathlib import Path

from object2brain.manifest import output_list


def test_outputs_are_relative_to_the_folder_where_they_lie_under_it(tmp_path: Path) -> None:
    out = tmp_path / "res"
    inside = [out / "figures" / "a.png", out / "alignment.csv"]
    elsewhere = tmp_path / "other" / "x.csv"
    assert output_list([*inside, elsewhere], out) == sorted(
        ["figures/a.png", "alignment.csv", str(elsewhere.resolve())]
    )

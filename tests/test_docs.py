"""The documents inside the repository: generated pages current, links inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from object2brain import reference
from object2brain.tables import TABLES

ROOT = Path(__file__).resolve().parents[1]
PINNED = ROOT / "tests" / "regression" / "pinned"

#: Where the repository's own text lives (this file is left out: it names what it forbids).
SCANNED = ("README.md", "BENCHMARKS.md", "Makefile", "pyproject.toml", "docs", "src", "tests",
           "benchmarks", "examples")  # fmt: skip
SUFFIXES = {".md", ".py", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".json", ""}
#: Documents that are not in the repository.
OUTSIDE = re.compile(r"DESIGN\.md")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _text_files() -> list[Path]:
    files: list[Path] = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        for file in candidates:
            parts = file.relative_to(ROOT).parts
            # hidden folders and build artefacts (pip's *.egg-info copies an old README) are not
            # the repository's documents
            if any(
                part.startswith(".") or part == "__pycache__" or part.endswith(".egg-info")
                for part in parts
            ):
                continue
            if file.is_file() and file.suffix in SUFFIXES and file != Path(__file__).resolve():
                files.append(file)
    return files


def test_generated_pages_are_current() -> None:
    stale = reference.stale_pages(ROOT)
    assert not stale, (
        f"generated pages differ from the code: {', '.join(stale)}; "
        "run `python -m object2brain.reference` from the repository root"
    )


def test_nothing_points_to_documents_outside_the_repository() -> None:
    found = []
    for path in _text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert not found, "references to documents outside the repository:\n" + "\n".join(found)


def test_markdown_links_stay_inside_the_repository() -> None:
    broken = []
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):  # http(s):, mailto:
                continue
            resolved = (page.parent / target).resolve()
            if not resolved.exists() or ROOT not in resolved.parents:
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to files that are not in the repository:\n" + "\n".join(broken)


@pytest.mark.parametrize("name", sorted(p.stem for p in PINNED.glob("*.csv")))
def test_schema_columns_are_those_the_stages_write(name: str) -> None:
    """The pinned study's tables (written by the stages) have the columns of their schema."""
    written = list(pd.read_csv(PINNED / f"{name}.csv", nrows=0).columns)
    assert written == TABLES[name].column_names


def test_every_table_is_documented() -> None:
    page = reference.formats_markdown()
    for schema in TABLES.values():
        assert f"### `{schema.name}`" in page
        for column in schema.columns:
            assert f"`{column.name}`" in page


def test_cli_reference_covers_every_command_and_option() -> None:
    group = reference.cli_group()
    page = reference.cli_markdown(group)
    ctx = group.context_class(group, info_name="object2brain")
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert f"## `object2brain {name}`" in page
        for param in command.params:
            for flag in getattr(param, "opts", []):
                if flag.startswith("-"):
                    assert flag in page, (name, flag)


def test_cli_generator_reads_any_typer_app() -> None:
    import typer
    import typer.main

    app = typer.Typer(help="Tool help.")
    count_option = typer.Option(3, "--count", min=1, help="How many.")
    name_option = typer.Option([], "--name", help="A name.")

    @app.command("go")
    def go(count: int = count_option, names: list[str] = name_option) -> None:
        """Do it."""

    @app.command("stay")
    def stay() -> None:
        """Stay put."""

    page = reference.cli_markdown(typer.main.get_command(app), prog="tool")
    assert "## `tool go`" in page and "## `tool stay`" in page
    assert "Tool help." in page and "Do it." in page
    assert "`--count <int range>` | How many. [default: 3; x>=1] |" in page
    assert "[repeatable]" in page


def test_performance_page_holds_the_current_benchmark_runs() -> None:
    """The measured part of docs/performance.md is what benchmarks/run_all.py renders now."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    assert spec is not None and spec.loader is not None
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    assert run_all.splice_markdown(page, run_all.render_markdown()) == page, (
        "docs/performance.md is stale: run `.venv/bin/python benchmarks/run_all.py --markdown-only`"
    )

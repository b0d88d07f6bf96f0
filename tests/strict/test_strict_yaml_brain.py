"""Duplicate YAML keys, unknown brain-manifest keys, RDMs that are no RDMs (issue 17: 9, 10)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from object2brain.data.brain import load_brain
from object2brain.errors import DataError
from object2brain.explain.groups import load_groups
from object2brain.pipeline.config import ConfigError, load_config
from object2brain.yaml_io import DuplicateKeyError, parse_yaml

IDS = [f"s{i}" for i in range(5)]


def test_duplicate_key_refused_at_any_depth() -> None:
    with pytest.raises(DuplicateKeyError, match=r"key 'n_perm' is given twice \(lines 2 and 4\)"):
        parse_yaml("rsa:\n  n_perm: 100\n  n_boot: 10\n  n_perm: 10000\n")
    with pytest.raises(DuplicateKeyError, match="key 'a'"):
        parse_yaml("- {a: 1, a: 2}\n")
    # what safe_load accepts otherwise is unchanged: merges may be overridden, tags stay unsafe
    text = "base: &b {p: 1, q: 2}\nm:\n  <<: *b\n  p: 3\n"
    assert parse_yaml(text) == yaml.safe_load(text)
    with pytest.raises(yaml.YAMLError, match="python/object"):
        parse_yaml("!!python/object/apply:os.system ['true']\n")


def test_duplicate_keys_in_every_yaml_the_package_reads(
    tmp_path: Path, stimulus_table: Path
) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(
        f"stimuli: {stimulus_table}\nseed: 1\nmodels: [{{arch: resnet18, weights: none}}]\n"
        "seed: 2\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(study)
    assert str(info.value) == (
        f"{study}: not valid YAML: key 'seed' is given twice (lines 2 and 4); keep one "
        "(line 4, column 1)"
    )
    manifest = tmp_path / "brain.yaml"
    manifest.write_text("sources:\n  - {kind: patterns, path: a.h5, path: b.h5}\n")
    with pytest.raises(DataError, match=rf"^{manifest}: .*key 'path' is given twice"):
        load_brain(manifest)
    groups = tmp_path / "groups.yaml"
    groups.write_text("groups:\n  Faces: [face]\n  Faces: [person]\n")
    with pytest.raises(DataError, match=rf"^{groups}: not valid YAML: key 'Faces'"):
        load_groups(groups)


def _h5(path: Path, kind: str, data: np.ndarray, subject: str = "sub-01", roi: str = "EVC") -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["kind"] = kind
        f.create_dataset(
            "stimulus_ids", data=np.asarray(IDS, dtype=object), dtype=h5py.string_dtype()
        )
        f.create_dataset(f"{subject}/{roi}", data=data)
    return path


def _rdm() -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(len(IDS), 4))
    return np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))


def test_valid_rdm_and_rounding_accepted(tmp_path: Path) -> None:
    d = _rdm()
    d_rounded = d + 1e-9 * np.eye(len(IDS))  # rounding of a computed RDM passes
    item = load_brain(_h5(tmp_path / "r.h5", "rdms", d_rounded)).items[0]
    assert item.kind == "rdm"


def test_similarity_matrix_refused(tmp_path: Path) -> None:
    """A correlation matrix (diagonal 1) given as an RDM was accepted and gave r = -1."""
    x = np.random.default_rng(0).normal(size=(len(IDS), 8))
    similarity = np.corrcoef(x)
    path = _h5(tmp_path / "r.h5", "rdms", similarity, "sub-07", "FFA")
    with pytest.raises(DataError) as info:
        load_brain(path)
    message = str(info.value)
    assert message.startswith(f"{path}: /sub-07/FFA: the RDM's diagonal must be zero")
    assert "s0, s1, s2, s3, s4" in message and "similarity matrix; give 1 - similarity" in message


def test_negative_dissimilarities_refused(tmp_path: Path) -> None:
    d = _rdm()
    d[1, 3] = d[3, 1] = -0.5
    path = _h5(tmp_path / "r.h5", "rdms", d, "sub-02", "V4")
    with pytest.raises(DataError) as info:
        load_brain(path)
    assert str(info.value) == (
        f"{path}: /sub-02/V4: an RDM holds dissimilarities >= 0, but 1 pair(s) are negative: "
        "(s1, s3) = -0.5"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "sources:\n  - {kind: patterns, pth: p.h5}\n",
            "source 1: unknown key(s) pth (a patterns source reads: kind, path)",
        ),
        (
            "sources:\n  - {kind: patterns, path: p.h5}\nsubjects: [1]\n",
            "unknown top-level key(s) subjects (a brain manifest has only 'sources:')",
        ),
        (
            "sources:\n  - {kind: patterns, path: p.h5}\n  - {kind: nsd, root: ., rois: [V1],"
            " subjects: [1], sesions: [1]}\n",
            "source 2: unknown key(s) sesions (a nsd source reads: betas, kind, repetitions, "
            "rois, root, sessions, space, subjects)",
        ),
    ],
)
def test_unknown_manifest_keys_refused(tmp_path: Path, text: str, expected: str) -> None:
    """Unknown keys were ignored (a typo silently dropped a setting)."""
    manifest = tmp_path / "brain.yaml"
    manifest.write_text(text)
    with pytest.raises(DataError) as info:
        load_brain(manifest)
    assert str(info.value) == f"{manifest}: {expected}"

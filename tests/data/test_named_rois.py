"""ROIs named in the brain manifest: ``rois: {AMY: mask.nii.gz}`` beside the list form."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from object2brain.data.brain import brain_files, load_brain
from object2brain.errors import DataError

IDS = [f"s{i}" for i in range(6)]


def _subject(tmp_path: Path, rois: str) -> Path:
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    (tmp_path / "sub-01").mkdir()
    betas = rng.normal(size=(4, 4, 4, len(IDS))).astype(np.float32)
    nib.save(nib.Nifti1Image(betas, affine), tmp_path / "sub-01" / "betas.nii.gz")
    pd.DataFrame({"stimulus_id": IDS}).to_csv(tmp_path / "sub-01" / "betas.tsv", sep="\t",
                                              index=False)  # fmt: skip
    (tmp_path / "rois").mkdir()
    mask = np.zeros((4, 4, 4), dtype=np.uint8)
    mask[:2, :2, :2] = 1
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "rois" / "amygdala_mni_2mm.nii.gz")
    manifest = tmp_path / "brain.yaml"
    manifest.write_text(
        "sources:\n  - kind: nifti\n    subject: sub-01\n    betas: sub-01/betas.nii.gz\n"
        f"    stimuli: sub-01/betas.tsv\n{rois}"
    )
    return manifest


def test_named_roi_is_the_target_name(tmp_path: Path) -> None:
    manifest = _subject(tmp_path, "    rois: {AMY: rois/amygdala_mni_2mm.nii.gz}\n")
    brain = load_brain(manifest)
    assert brain.rois == ["AMY"]
    assert brain.for_roi("AMY")[0].data.shape == (6, 8)
    assert tmp_path / "rois" / "amygdala_mni_2mm.nii.gz" in brain_files(manifest)


def test_list_form_keeps_the_file_stem(tmp_path: Path) -> None:
    brain = load_brain(_subject(tmp_path, "    rois: [rois/amygdala_mni_2mm.nii.gz]\n"))
    assert brain.rois == ["amygdala_mni_2mm"]


def test_bad_rois_value_names_the_forms(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"list of mask files or a mapping \{name: file\}"):
        load_brain(_subject(tmp_path, "    rois: rois/amygdala_mni_2mm.nii.gz\n"))

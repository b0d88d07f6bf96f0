"""The study workflow: ``run --dry-run`` (every problem at once, the stage plan), stage timings,
each message once per run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from object2brain.cli import main
from object2brain.pipeline.config import ConfigError, load_config
from object2brain.pipeline.plan import dry_run
from object2brain.pipeline.run import once_per_run


def _config(tmp_path: Path, stimuli: Path, **edits: Any) -> Path:
    payload: dict[str, Any] = {
        "out": "results",
        "device": "cpu",
        "stimuli": str(stimuli),
        "models": [{"arch": "resnet18", "weights": "none", "layers": ["layer3", "layer4"]}],
        "rsa": {"n_perm": 10, "n_boot": 5},
    }
    payload.update(edits)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(payload))
    return path


FIVE_ERRORS = {
    "colour": "red",  # unknown key
    "rsa": {"n_perm": "many"},  # wrong type
    "models": [
        {"arch": "resnet18", "weights": "none", "layers": ["layer9"]},  # unknown layer
        {"arch": "resnet19"},  # unknown model
    ],
    "device": "cuda:99",  # no such device
    "ratings": "nowhere.csv",  # missing file
}


def test_dry_run_lists_every_problem_at_once_and_writes_nothing(
    tmp_path: Path, stimulus_table: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, stimulus_table, **FIVE_ERRORS)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as info:
        main(["run", str(path), "--dry-run"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for expected in (
        "colour: unknown key",
        "rsa.n_perm: Input should be a valid integer",
        "models.0.layers: unknown layer(s) for resnet18: 'layer9'",
        "models.1.arch: unknown model 'resnet19'",
        "device: ",
        "ratings: file not found",
    ):
        assert expected in err, (expected, err)
    assert "6 problem(s)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_run_reports_every_problem_too(tmp_path: Path, stimulus_table: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, stimulus_table, **FIVE_ERRORS))
    message = str(info.value)
    assert "models.0.layers" in message and "device" in message and "colour" in message


def test_dry_run_plan_says_what_would_run_and_why(
    tmp_path: Path, stimulus_table: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, stimulus_table)
    main(["run", str(path), "--dry-run"])
    out = capsys.readouterr().out
    assert "valid; stages in run order" in out
    assert "extract:resnet18" in out and "never run" in out
    assert not (tmp_path / "results").exists()
    checked = dry_run(path)
    assert [p.name for p in checked.plan] == ["extract:resnet18", "rsa"]
    # a finished extract with the same key is reused; the rsa stage then reads it unchanged
    study_plan = checked.plan[0]
    from object2brain.pipeline.plan import plan_stages
    from object2brain.pipeline.run import new_study
    from object2brain.pipeline.stages import STAGE_FILE, digest

    config, _ = load_config(path)
    study = new_study(config, progress=False)
    extract = next(s for s in __import__("object2brain.pipeline.stages", fromlist=["STAGES"])
                   .STAGES if s.name == "extract")  # fmt: skip
    key = digest(extract.key(study, config.models[0]))
    study_plan.folder.mkdir(parents=True)
    store = config.out / "activations" / "resnet18.h5"
    store.write_bytes(b"stand-in")
    (study_plan.folder / STAGE_FILE).write_text(
        json.dumps({"key": key, "outputs": ["activations/resnet18.h5"], "seconds": 1.0})
    )
    again = plan_stages(new_study(config, progress=False))
    assert (again[0].action, again[0].reason) == ("reuse", "unchanged")
    assert again[1].action == "run" and "never run" in again[1].reason
    store.unlink()
    third = plan_stages(new_study(config, progress=False))
    assert third[0].reason.startswith("outputs missing")
    assert "an earlier stage it reads re-runs (extract:resnet18)" in third[1].reason


def test_each_message_is_shown_once_per_run(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("object2brain.data.brain")
    with caplog.at_level(logging.INFO), once_per_run() as recorded:
        for _ in range(8):
            log.info("resampled to the beta grid")
        log.warning("stimulus s01 has no condition")
        log.warning("stimulus s01 has no condition")
    log.warning("stimulus s01 has no condition")  # after the run: shown again, not recorded
    assert recorded == ["stimulus s01 has no condition"]  # the manifest's warnings: once
    texts = [r.getMessage() for r in caplog.records[:-1]]
    assert texts.count("resampled to the beta grid") == 1
    assert texts.count("stimulus s01 has no condition") == 1


def test_models_sharing_a_backbone_are_extracted_once(
    tmp_path: Path, stimulus_table: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import h5py
    import numpy as np

    import object2brain.api.extract as api_extract
    from object2brain.pipeline.run import run_study

    calls: list[str] = []
    real = api_extract.extract

    def counting(model: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(model.name)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(api_extract, "extract", counting)
    models = [
        {"arch": "resnet18", "weights": "none", "layers": ["layer4"], "name": "a"},
        {"arch": "resnet18", "weights": "none", "layers": ["layer4"], "name": "b"},
        {"arch": "resnet18", "weights": "none", "layers": ["layer3"], "name": "c"},
    ]
    path = _config(tmp_path, stimulus_table, models=models, rsa=None, report=False)
    result = run_study(path, progress=False)
    assert calls == ["a", "c"]  # b shares a's backbone; c extracts other layers
    assert {"extract:a", "extract:b", "extract:c"} <= set(result.ran)
    assert set(result.timings) >= {"extract:a", "extract:b", "extract:c"}
    manifest = json.loads((tmp_path / "results" / "manifest.json").read_text())
    assert set(manifest["timings"]) == set(result.timings)
    with h5py.File(result.stores["a"]) as a, h5py.File(result.stores["b"]) as b:
        np.testing.assert_array_equal(a["layers/layer4"][()], b["layers/layer4"][()])
        assert b.attrs["model"] == "b" and b.attrs["backbone_from"] == "a.h5"
        assert json.loads(b.attrs["order"]) == ["layer4"]


def _head(path: Path, seed: int) -> Path:
    import torch

    from object2brain.heads.io import save_head

    torch.manual_seed(seed)
    return save_head(torch.nn.Linear(512, 1), path, {"arch": "resnet18", "replaced_layer": "fc"})


def test_models_with_their_own_heads_share_one_backbone_pass(
    tmp_path: Path, stimulus_table: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two models on one backbone with different head files: one forward pass over the stimuli;
    the second store (its head run on the captured head inputs) equals a separate extraction,
    array for array and attribute for attribute (but ``backbone_from``), manifest included."""
    import h5py
    import numpy as np

    import object2brain.activations.extract as activations_extract
    from object2brain.api.extract import extract
    from object2brain.models.zoo import load_model
    from object2brain.pipeline.run import run_study

    passes: list[int] = []
    real = activations_extract._run_batches

    def counting(plan: Any, writer: Any) -> None:
        passes.append(len(plan.stimuli))
        real(plan, writer)

    monkeypatch.setattr(activations_extract, "_run_batches", counting)
    heads = [_head(tmp_path / f"h{i}" / "head.safetensors", i) for i in (1, 2)]
    models = [
        {
            "arch": "resnet18",
            "weights": "none",
            "layers": ["layer3", "layer4"],
            "name": name,
            "head": str(head),
        }
        for name, head in zip(("b", "c"), heads, strict=True)
    ]
    path = _config(tmp_path, stimulus_table, models=models, rsa=None, report=False,
                   extract={"batch_size": 3})  # fmt: skip
    result = run_study(path, progress=False)
    assert len(passes) == 1  # the backbone ran once over the stimuli
    alone = tmp_path / "alone"
    for name, head in zip(("b", "c"), heads, strict=True):
        loaded = load_model("resnet18", "none", head=head, seed=0, name=name)
        extract(loaded, stimulus_table, out=alone / f"{name}.h5", layers=["layer3", "layer4"],
                batch_size=3, device="cpu", seed=0, progress=False)  # fmt: skip
    assert len(passes) == 3
    with h5py.File(result.stores["c"]) as shared, h5py.File(alone / "c.h5") as single:
        assert shared.attrs["backbone_from"] == "b.h5"
        assert set(shared["layers"]) == set(single["layers"]) == {"layer3", "layer4", "valence"}
        for name in single["layers"]:
            got, want = shared["layers"][name], single["layers"][name]
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got[()], want[()])  # bit-identical on the CPU
        np.testing.assert_array_equal(shared["stimulus_ids"][()], single["stimulus_ids"][()])
        attrs = {k: v for k, v in shared.attrs.items() if k != "backbone_from"}
        assert attrs.keys() == single.attrs.keys()
        for key, value in single.attrs.items():
            assert attrs[key] == value, key
        with h5py.File(result.stores["b"]) as first:
            assert not np.array_equal(first["layers/valence"][()], shared["layers/valence"][()])
    manifests = [
        json.loads(p.with_name("c.manifest.json").read_text())
        for p in (result.stores["c"], alone / "c.h5")
    ]
    for manifest in manifests:  # where and when it was written, how long it took
        for key in ("created", "seconds", "outputs"):
            manifest.pop(key, None)
        manifest["config"].pop("out")
    assert manifests[0] == manifests[1]


def test_a_model_added_to_a_finished_study_reads_no_image(
    tmp_path: Path, stimulus_table: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run a study with model b (its own head), then add model c (same backbone, another head)
    and run again: c's store is written from b's store and the head inputs b's extraction kept
    next to it, with no image decoded and no pass over the images; it equals a separate
    extraction bit for bit (CPU)."""
    import h5py
    import numpy as np

    import object2brain.activations.extract as activations_extract
    import object2brain.models.inputs as model_inputs
    from object2brain.api.extract import extract
    from object2brain.data.stimuli import load_stimuli
    from object2brain.models.zoo import load_model
    from object2brain.pipeline.backbone import head_inputs_file
    from object2brain.pipeline.run import run_study

    counts = {"passes": 0, "batches": 0, "decoded": 0}
    real_run, real_batches, real_load = (activations_extract._run_batches,
                                         activations_extract.image_batches,
                                         model_inputs.load_image)  # fmt: skip

    def run_batches(plan: Any, writer: Any) -> None:
        counts["passes"] += 1
        real_run(plan, writer)

    def image_batches(*args: Any, **kwargs: Any) -> Any:
        counts["batches"] += 1
        return real_batches(*args, **kwargs)

    def load_image(*args: Any, **kwargs: Any) -> Any:
        counts["decoded"] += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(activations_extract, "_run_batches", run_batches)
    monkeypatch.setattr(activations_extract, "image_batches", image_batches)
    monkeypatch.setattr(model_inputs, "load_image", load_image)
    heads = [_head(tmp_path / f"h{i}" / "head.safetensors", i) for i in (1, 2)]
    base = {"arch": "resnet18", "weights": "none", "layers": ["layer4"]}
    models = [
        {**base, "name": name, "head": str(head)}
        for name, head in zip(("b", "c"), heads, strict=True)
    ]
    common = {"rsa": None, "report": False, "extract": {"batch_size": 3, "num_workers": 0}}
    run_study(_config(tmp_path, stimulus_table, models=models[:1], **common), progress=False)
    assert counts["passes"] == 1 and counts["batches"] == 1 and counts["decoded"] > 0
    kept = head_inputs_file(tmp_path / "results", "b")
    assert kept.is_file()
    with h5py.File(kept) as handle:
        n = len(load_stimuli(stimulus_table))
        assert handle["layers/fc"].shape == (n, 512)  # resnet18's fc input, every stimulus
    counts.update(passes=0, batches=0, decoded=0)
    second = run_study(_config(tmp_path, stimulus_table, models=models, **common), progress=False)
    assert "extract:b" in second.skipped and "extract:c" in second.ran
    assert counts == {"passes": 0, "batches": 0, "decoded": 0}  # c read no image
    alone = tmp_path / "alone" / "c.h5"
    loaded = load_model("resnet18", "none", head=heads[1], seed=0, name="c")
    extract(loaded, stimulus_table, out=alone, layers=["layer4"], batch_size=3, num_workers=0,
            device="cpu", seed=0, progress=False)  # fmt: skip
    assert counts["passes"] == 1 and counts["decoded"] > 0  # the counters do count
    with h5py.File(second.stores["c"]) as shared, h5py.File(alone) as single:
        assert shared.attrs["backbone_from"] == "b.h5"
        assert set(shared["layers"]) == set(single["layers"]) == {"layer4", "valence"}
        for name in single["layers"]:
            got, want = shared["layers"][name], single["layers"][name]
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got[()], want[()])  # bit-identical on the CPU
        for key, value in single.attrs.items():
            assert shared.attrs[key] == value, key
        with h5py.File(second.stores["b"]) as other:
            assert not np.array_equal(other["layers/valence"][()], shared["layers/valence"][()])


def test_stale_or_foreign_head_inputs_are_not_used(tmp_path: Path) -> None:
    """The kept head inputs round-trip exactly (rows per batch, dtype, bfloat16 included) and
    are read only for the same backbone key and the store they were written with."""
    import h5py
    import torch

    from object2brain.pipeline.backbone import read_head_inputs, write_head_inputs

    store = tmp_path / "a.h5"
    with h5py.File(store, "w") as handle:
        handle.attrs["fingerprint"] = "f1"
    torch.manual_seed(0)
    batches = [torch.randn(3, 8).to(torch.bfloat16), torch.randn(2, 8).to(torch.bfloat16)]
    wide = [torch.randn(3, 20000)]  # over the limit: not kept
    path = write_head_inputs(tmp_path / "k.h5", {"fc": batches, "big": wide}, "key", store)
    assert path is not None
    got = read_head_inputs(path, "key", store, "fc")
    assert got is not None and [b.shape[0] for b in got] == [3, 2]
    for a, b in zip(got, batches, strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert read_head_inputs(path, "key", store, "big") is None
    assert read_head_inputs(path, "other backbone", store, "fc") is None
    with h5py.File(store, "r+") as handle:
        handle.attrs["fingerprint"] = "f2"  # the store was re-extracted
    assert read_head_inputs(path, "key", store, "fc") is None
    assert write_head_inputs(tmp_path / "none.h5", {"big": wide}, "key", store) is None


def _brain(folder: Path, ids: list[str]) -> Path:
    """A NIfTI brain manifest of two subjects (4x4x4 voxels of 2 mm, one volume per id, ROI
    EVC); returns the manifest."""
    import nibabel as nib
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    mask = np.zeros((4, 4, 4), dtype=np.uint8)
    mask[:2, :2, :2] = 1
    (folder / "rois").mkdir(parents=True)
    nib.save(nib.Nifti1Image(mask, affine), folder / "rois" / "EVC.nii.gz")
    lines = ["sources:"]
    for subject in ("sub-01", "sub-02"):
        (folder / subject).mkdir()
        betas = rng.normal(size=(4, 4, 4, len(ids))).astype(np.float32)
        nib.save(nib.Nifti1Image(betas, affine), folder / subject / "betas.nii.gz")
        pd.DataFrame({"stimulus_id": ids}).to_csv(folder / subject / "betas.tsv", sep="\t",
                                                  index=False)  # fmt: skip
        lines += [f"  - kind: nifti\n    subject: {subject}\n    betas: {subject}/betas.nii.gz\n"
                  f"    stimuli: {subject}/betas.tsv\n    rois: [rois/EVC.nii.gz]"]  # fmt: skip
    manifest = folder / "brain.yaml"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_dry_run_loads_the_brain_data_and_ratings_and_lists_every_problem(
    tmp_path: Path, stimulus_table: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Five problems of different kinds, two of them inside brain files and one in the ratings,
    reported in one pass (exit 2, nothing written); a clean study then passes, and brain ids
    that miss stimuli are reported too."""
    import nibabel as nib
    import numpy as np
    import pandas as pd

    ids = list(pd.read_csv(stimulus_table)["stimulus_id"])
    data = tmp_path / "data"
    manifest = _brain(data, ids)
    # 1: sub-01's sidecar lists fewer ids than its betas have volumes
    pd.DataFrame({"stimulus_id": ids[:-1]}).to_csv(data / "sub-01" / "betas.tsv", sep="\t",
                                                   index=False)  # fmt: skip
    # 2: sub-02's ROI on a grid far from the betas (nothing left after resampling)
    far = np.diag([2.0, 2.0, 2.0, 1.0])
    far[:3, 3] = 500.0
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), far), data / "rois" / "FAR.nii.gz")
    text = manifest.read_text().replace("rois: [rois/EVC.nii.gz]", "rois: [rois/FAR.nii.gz]")
    manifest.write_text(text.replace("rois: [rois/FAR.nii.gz]", "rois: [rois/EVC.nii.gz]", 1))
    # 3: ratings of a stimulus the study does not have
    ratings = data / "ratings.csv"
    pd.DataFrame({"subject": ["r1", "r1"], "stimulus_id": [ids[0], "s99_unknown"],
                  "valence": [1.0, 2.0]}).to_csv(ratings, index=False)  # fmt: skip
    # 4: an unknown key, 5: a wrong type
    path = _config(tmp_path, stimulus_table, brain=str(manifest), ratings=str(ratings),
                   colour="red", rsa={"n_perm": "many"})  # fmt: skip
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as info:
        main(["run", str(path), "--dry-run"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for expected in (
        "colour: unknown key",
        "rsa.n_perm: Input should be a valid integer",
        f"brain: {data / 'sub-01' / 'betas.tsv'}: {len(ids) - 1} rows but betas.nii.gz has "
        f"{len(ids)} volumes",
        f"brain: {data / 'rois' / 'FAR.nii.gz'}: ROI 'FAR' of subject 'sub-02' has no voxels on "
        "the beta grid",
        f"ratings: {ratings}: 1 stimulus id(s) not in the stimulus set: s99_unknown",
    ):
        assert expected in err, (expected, err)
    assert "5 problem(s)" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # fixed, the study passes; brain data that miss a stimulus are then reported
    pd.DataFrame({"stimulus_id": ids}).to_csv(data / "sub-01" / "betas.tsv", sep="\t",
                                              index=False)  # fmt: skip
    manifest.write_text(manifest.read_text().replace("FAR", "EVC"))
    ratings.write_text(ratings.read_text().replace("s99_unknown", ids[1]))
    clean = _config(tmp_path, stimulus_table, brain=str(manifest), ratings=str(ratings))
    assert dry_run(clean).ok
    stimuli = pd.read_csv(stimulus_table)
    extra = stimuli.iloc[:1].assign(stimulus_id="s98_new")
    pd.concat([stimuli, extra]).to_csv(stimulus_table.with_name("more.csv"), index=False)
    checked = dry_run(_config(tmp_path, stimulus_table.with_name("more.csv"),
                              brain=str(manifest), ratings=str(ratings)))  # fmt: skip
    assert len(checked.problems) == 1 and "do not cover the stimulus set" in checked.problems[0]
    assert "s98_new" in checked.problems[0]


def test_ray_workers_capture_nothing_so_added_models_extract_in_full() -> None:
    """On Ray (``executor: ray``) no hook of this process sees the forward pass: nothing is
    captured or kept beside the store (the safe fallback: a later model is extracted in full);
    locally the model's own head layer (else its output layer) is kept."""
    from types import SimpleNamespace

    from object2brain.pipeline.backbone import layers_to_capture

    model: Any = SimpleNamespace(label="a")
    loaded: Any = SimpleNamespace(output_layer="fc")

    def study(kind: str) -> Any:
        config = SimpleNamespace(executor=SimpleNamespace(kind=kind), models=[model])
        return SimpleNamespace(config=config, heads={"a": None}, out_of_fold={})

    key: Any = str
    assert layers_to_capture(study("ray"), model, key, loaded) == (set(), set())
    assert layers_to_capture(study("local"), model, key, loaded) == (set(), {"fc"})

"""Cross-fitted (out-of-fold) valence predictions: folds, no leakage, no optimism, stores, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from heads_helpers import run_cli, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from object2brain.activations.store import ActivationStore
from object2brain.api.extract import extract
from object2brain.api.train_head import train_head
from object2brain.data.splits import make_folds, valence_levels
from object2brain.errors import DataError
from object2brain.heads.features import CachedFeatures, FeatureSources
from object2brain.heads.fit import RatedFeatures, cross_fitted_predictions, fit_head, predict
from object2brain.options import TrainHeadOptions

CPU = torch.device("cpu")


@settings(max_examples=40, deadline=None)
@given(
    levels=st.lists(st.integers(-3, 3), min_size=4, max_size=60),
    k=st.integers(2, 10),
    seed=st.integers(0, 2**16),
)
def test_folds_are_balanced_within_every_level(levels: list[int], k: int, seed: int) -> None:
    if k > len(levels):
        with pytest.raises(DataError, match=f"cross-fitting with {k} folds"):
            make_folds(levels, k, seed=seed)
        return
    folds = make_folds(levels, k, seed=seed)
    assert folds.shape == (len(levels),) and set(folds) <= set(range(k))
    sizes = np.bincount(folds, minlength=k)
    assert sizes.max() - sizes.min() <= 1
    lv = valence_levels(levels)
    for level in np.unique(lv):  # each level spread over the folds to within one stimulus
        counts = np.bincount(folds[lv == level], minlength=k)
        assert counts.max() - counts.min() <= 1
    assert np.array_equal(folds, make_folds(levels, k, seed=seed))


def _problem(n: int, dim: int, signal: float, seed: int) -> tuple[CachedFeatures, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w = rng.standard_normal(dim) / np.sqrt(dim)
    y = np.clip(signal * (x @ w) * 1.5 + rng.standard_normal(n), -3, 3)
    return CachedFeatures(torch.from_numpy(x), CPU), y


def _rated(source: CachedFeatures, y: np.ndarray) -> RatedFeatures:
    sources = FeatureSources(source, source, int(source.features.shape[1]))
    return RatedFeatures(sources, y, valence_levels(y))


def _oof(source: CachedFeatures, y: np.ndarray, folds: np.ndarray, **kw: object) -> np.ndarray:
    return cross_fitted_predictions(
        _rated(source, y),
        folds,
        np.array([], dtype=np.int64),
        TrainHeadOptions(loss="mse", **kw),  # type: ignore[arg-type]
        seed=0,
        device=CPU,
    )


def test_a_stimulus_rating_never_reaches_its_own_prediction() -> None:
    """Changing the ratings of fold 0 (validation stimuli among them) leaves fold 0's
    predictions exactly as they were: neither training, level weights nor early stopping saw
    them."""
    source, y = _problem(40, 16, signal=1.0, seed=0)
    val_rows = np.arange(0, 40, 5)  # 8 validation stimuli, spread over the folds
    folds = make_folds(y, 4, seed=0)
    assert len(set(folds[val_rows])) > 1
    kw = {"epochs": 60, "patience": 3, "lr": 5e-2, "batch_size": 8}

    def out_of_fold(ratings: np.ndarray) -> np.ndarray:
        return cross_fitted_predictions(
            _rated(source, ratings), folds, val_rows,
            TrainHeadOptions(loss="weighted_mse", **kw),  # type: ignore[arg-type]
            seed=0, device=CPU,
        )  # fmt: skip

    before = out_of_fold(y)
    edited = y.copy()
    edited[folds == 0] = -edited[folds == 0]
    after = out_of_fold(edited)
    np.testing.assert_array_equal(before[folds == 0], after[folds == 0])
    assert not np.allclose(before[folds != 0], after[folds != 0])  # the others did see them


def test_out_of_fold_predictions_are_not_optimistic() -> None:
    """Ratings unrelated to the features (planted r = 0): a head fitted on 60 stimuli with 120
    features "predicts" its own training ratings almost perfectly (r > 0.99 measured), the
    out-of-fold predictions do not (their r stays within the null's spread); with a planted
    signal the out-of-fold predictions recover it."""
    kw = {"epochs": 60, "lr": 0.1, "batch_size": 60}
    in_sample, out_of_fold = [], []
    for seed in range(3):
        source, y = _problem(60, 120, signal=0.0, seed=seed)
        everything = np.arange(len(y))
        options = TrainHeadOptions(loss="mse", **kw)  # type: ignore[arg-type]
        fit = fit_head(_rated(source, y), everything, everything[:0], options, seed=0, device=CPU)
        in_sample.append(stats.spearmanr(predict(fit.head, source, everything), y).statistic)
        oof = _oof(source, y, make_folds(y, 5, seed=seed), **kw)
        out_of_fold.append(stats.spearmanr(oof, y).statistic)
    assert min(in_sample) > 0.9
    # null sd of one r at n = 60 is 0.13, of a mean of three 0.075 (measured: -0.05)
    assert abs(float(np.mean(out_of_fold))) < 0.25
    source, y = _problem(60, 120, signal=3.0, seed=9)
    oof = _oof(source, y, make_folds(y, 5, seed=9), epochs=60, lr=1e-2, batch_size=16)
    assert stats.spearmanr(oof, y).statistic > 0.4


def test_train_head_writes_out_of_fold_predictions(small_table: Path, tmp_path: Path) -> None:
    result = train_head(
        tiny_model(),
        stimuli=small_table,
        out=tmp_path / "heads",
        epochs=3,
        cross_fit=5,
        num_workers=0,
        progress=False,
        figures=False,
    )
    head = result.models["tinynet"]
    assert head.out_of_fold_path == tmp_path / "heads" / "tinynet" / "out_of_fold.csv"
    table = pd.read_csv(head.out_of_fold_path, dtype={"stimulus_id": str})
    assert list(table.columns) == ["stimulus_id", "fold", "valence", "level", "predicted"]
    assert len(table) == 35 and np.isfinite(table["predicted"]).all()
    assert np.bincount(table["fold"]).tolist() == [7] * 5
    # the validation stimuli are dealt over the folds, so every fold head can stop early (the
    # folds once repeated the split's shuffles and put every validation stimulus in one fold)
    split = pd.read_csv(tmp_path / "heads" / "split.csv", dtype={"stimulus_id": str})
    is_val = table["stimulus_id"].map(split.set_index("stimulus_id")["split"]) == "val"
    per_fold = np.bincount(table.loc[is_val, "fold"], minlength=5)
    assert per_fold.max() - per_fold.min() <= 1
    assert all(is_val.sum() - per_fold[j] > 0 for j in range(5))
    expected = stats.spearmanr(table["predicted"], table["valence"]).statistic
    assert head.metrics["out_of_fold"]["spearman"] == pytest.approx(expected)
    assert head.metrics["training"]["cross_fit_folds"] == 5
    summary = pd.read_csv(tmp_path / "heads" / "head_metrics.csv")
    assert summary["split"].tolist() == ["train", "val", "test", "out_of_fold"]

    # the predictions go into a store as its 'valence' layer, matched by stimulus id
    shuffled = tmp_path / "shuffled.csv"
    table.sample(frac=1.0, random_state=0).to_csv(shuffled, index=False)
    store = extract(
        tiny_model(),
        small_table,
        out=tmp_path / "acts.h5",
        layers="1",
        valence=shuffled,
        num_workers=0,
        batch_size=8,
        progress=False,
    )
    with ActivationStore.open(store) as handle:
        assert handle.layers == ["1", "valence"] and handle.attrs["valence_source"] == "supplied"
        stored = handle.read("valence", table["stimulus_id"].tolist())
    np.testing.assert_allclose(stored, table["predicted"], rtol=1e-6)


def test_supplied_valence_is_checked_and_fingerprinted(small_table: Path, tmp_path: Path) -> None:
    ids = pd.read_csv(small_table, dtype={"stimulus_id": str})["stimulus_id"].tolist()
    common = {"layers": "1", "num_workers": 0, "progress": False}
    with pytest.raises(DataError, match=rf"1 stimulus id\(s\) have no predicted valence: {ids[3]}"):
        extract(
            tiny_model(),
            small_table,
            out=tmp_path / "a.h5",
            valence={i: 0.0 for i in ids if i != ids[3]},
            **common,  # type: ignore[arg-type]
        )
    assert not (tmp_path / "a.h5").exists()
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"stimulus_id": ids, "predicted": [np.nan] + [0.0] * (len(ids) - 1)}).to_csv(bad)
    with pytest.raises(DataError, match=rf"{bad}: predicted valence missing or not numeric"):
        extract(tiny_model(), small_table, out=tmp_path / "a.h5", valence=bad, **common)  # type: ignore[arg-type]
    first = pd.Series(np.linspace(-1, 1, len(ids)), index=ids)
    as_given = first.index.copy()
    doubled = pd.concat([first, first.iloc[:1]])
    with pytest.raises(DataError, match=rf"duplicate stimulus_id\(s\) {ids[0]}"):
        extract(tiny_model(), small_table, out=tmp_path / "a.h5", valence=doubled, **common)  # type: ignore[arg-type]
    words = first.astype(object)
    words.iloc[2] = "high"
    with pytest.raises(DataError, match=rf"missing or not numeric for {ids[2]}"):
        extract(tiny_model(), small_table, out=tmp_path / "a.h5", valence=words, **common)  # type: ignore[arg-type]
    extract(tiny_model(), small_table, out=tmp_path / "a.h5", valence=first, **common)  # type: ignore[arg-type]
    assert first.index is not as_given and first.index.equals(as_given)  # not changed in place
    with pytest.raises(Exception, match="already exists"):  # other values: another store
        extract(tiny_model(), small_table, out=tmp_path / "a.h5", valence=-first, **common)  # type: ignore[arg-type]
    extract(tiny_model(), small_table, out=tmp_path / "a.h5", valence=first, **common)  # type: ignore[arg-type]


def test_cli_cross_fit(
    small_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_cli(
        [
            "train-head", "--model", "resnet18", "--weights", "none", "--stimuli",
            str(small_table), "--out", str(tmp_path / "h"), "--epochs", "2", "--cross-fit",
            "3", "--device", "cpu", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    assert "resnet18: out-of-fold spearman" in capsys.readouterr().out
    assert (tmp_path / "h" / "resnet18" / "out_of_fold.csv").is_file()
    code = run_cli(
        [
            "extract", "--model", "resnet18", "--weights", "none", "--stimuli", str(small_table),
            "--layers", "layer4", "--valence", str(tmp_path / "h" / "resnet18" / "out_of_fold.csv"),
            "--out", str(tmp_path / "acts.h5"), "--device", "cpu", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    with ActivationStore.open(tmp_path / "acts.h5") as store:
        assert store.layers == ["layer4", "valence"]
    code = run_cli(
        [
            "train-head", "--model", "resnet18", "--weights", "none", "--stimuli",
            str(small_table), "--out", str(tmp_path / "h1"), "--cross-fit", "1", "--quiet",
        ]
    )  # fmt: skip
    assert code == 2
    assert "cross-fit 1: use 0 (off) or 2 or more folds" in capsys.readouterr().err
    assert not (tmp_path / "h1").exists()

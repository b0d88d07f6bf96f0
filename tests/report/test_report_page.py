"""The report read as a scientist reads it: figures per target with one ceiling band, the test
behind filled markers, the contrast table that names its p, provenance, captions that name the
model and layer (checked on the page's markup; the browser test checks it rendered)."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from object2brain.report.build import build_report
from object2brain.report.figures import glance

from .report_study import CONDITIONS, MODELS, TARGETS, WARNING, tables, write_study


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("study")
    folder = write_study(root / "results", root / "elsewhere" / "resnet18" / "head.safetensors")
    return build_report(folder).read_text()


def figures(page: str) -> dict[str, str]:
    """Each inline SVG figure's markup (with its <figure> tag) by its data-figure name."""
    found = re.findall(r'(<figure class="svg" data-figure="([^"]+)".*?</figure>)', page, re.S)
    return {name: markup for markup, name in found}


def bands_per_panel(markup: str, kind: str = "ceiling") -> list[int]:
    panels = int(re.search(r'data-panels="(\d+)"', markup).group(1))  # type: ignore[union-attr]
    return [len(re.findall(rf'class="o2b-{kind}" data-panel="{i}"', markup)) for i in range(panels)]


def test_alignment_figure_has_one_panel_per_target_and_one_ceiling_band_each(page: str) -> None:
    shown = figures(page)
    assert {"alignment", "alignment_conditions", "best_layers"} <= set(shown)
    for name in ("alignment", "alignment_conditions", "best_layers"):
        markup = shown[name]
        assert f'data-panels="{len(TARGETS)}"' in markup, name
        assert bands_per_panel(markup) == [1] * len(TARGETS), name
        # the figure's own record agrees with what was drawn
        assert f'data-ceilings="{",".join(["1"] * len(TARGETS))}"' in markup
    # error bars drawn in every panel (bootstrap CIs are finite in this study)
    assert all(n > 0 for n in bands_per_panel(shown["alignment"], "ci"))
    # every model is a line of the same figure, every target a panel title
    for text in (*MODELS, *TARGETS):
        assert f">{text}<" in shown["alignment"], text


def test_caption_names_the_group_level_test(page: str) -> None:
    caption = re.search(r"<figcaption>(Alignment per layer \(condition all\).*?)</figcaption>",
                        page, re.S).group(1)  # type: ignore[union-attr]  # fmt: skip
    caption = html.unescape(caption)
    assert "group_inference p_fdr (score test of r > 0) (EVC, FFA)" in caption
    # behaviour has no group_inference rows here: the across-subject t-test of alignment_group
    assert "alignment_group p_t_fdr (t-test of the per-subject r) (behavior)" in caption


def test_markers_follow_the_group_level_test_not_the_mantel_p() -> None:
    study = tables(np.random.default_rng(1))
    alignment, inference = study["rsa/alignment"], study["rsa/group_inference"]
    summary = study["rsa/alignment_group"]
    profile = glance.alignment_profile(alignment, inference, summary)
    rows = profile.rows.assign(filled=profile.significant.to_numpy())
    roi = rows[rows["target"] == "EVC"]
    # group_inference: p_fdr 0.01 only for resnet18 layer4 (the Mantel p_fdr passes elsewhere)
    expected = roi["layer"] == "layer4"
    assert (roi["filled"] == expected).all()
    behaviour = rows[rows["target"] == "behavior"]
    assert (behaviour["filled"] == (behaviour["layer_index"] > 0)).all()  # p_t_fdr
    # without either table: the group row's own (Mantel) p_fdr
    alone = glance.alignment_profile(alignment, None, None)
    assert set(alone.test.values()) == {"alignment p_fdr (Mantel permutation, group RDM)"}
    assert (alone.significant == (alone.rows["p_fdr"] < 0.05)).all()


def test_caption_names_the_test_of_each_target_s_bootstrap_mode() -> None:
    study = tables(np.random.default_rng(1))
    alignment, inference = study["rsa/alignment"], study["rsa/group_inference"]
    stimuli_only = inference.assign(
        bootstrap=np.where(inference["target"] == "EVC", "stimuli", inference["bootstrap"])
    )
    profile = glance.alignment_profile(alignment, stimuli_only, None)
    assert profile.test["EVC"] == "group_inference p_fdr (relabelling test of r > 0)"
    assert profile.test["FFA"] == "group_inference p_fdr (score test of r > 0)"
    assert glance.group_test_name(["both", "subjects", "both"]) == (
        "score test of r > 0 / t-test of r > 0 over subjects"
    )


def test_layers_on_x_follow_each_model_s_network_order() -> None:
    rows = tables(np.random.default_rng(2))["rsa/alignment"].sample(frac=1.0, random_state=0)
    position, shared = glance._layer_positions(rows)
    assert shared is None  # the two models have different layers
    for model, layers in MODELS.items():
        assert [position[(model, layer)] for layer in layers] == list(range(len(layers)))


def test_summary_counts_each_model_s_own_layers(page: str) -> None:
    counts = ", ".join(f"{model}: {len(layers)}" for model, layers in MODELS.items())
    assert f"<td>{counts}</td>" in page


def test_contrast_figure_and_a_table_that_fits_and_names_its_p(page: str) -> None:
    shown = figures(page)
    assert all(n > 0 for n in bands_per_panel(shown["contrast"], "ci"))  # bootstrap CIs
    assert bands_per_panel(shown["contrast"]) == [0] * len(TARGETS)  # no ceiling on a delta
    section = page[page.index('id="contrast"') : page.index('id="encoding"')]
    assert '<table class="wrap">' in section
    assert "<th>p bootstrap, BH-FDR</th>" in section
    assert "<th>p label permutation, BH-FDR</th>" in section
    assert "smallest <b>p bootstrap, BH-FDR</b>" in section
    assert "table.wrap { table-layout: fixed; width: 100%; }" in page


def test_model_comparison_group_inference_and_encoding_figures(page: str) -> None:
    shown = figures(page)
    assert {"model_comparison", "group_inference", "encoding"} <= set(shown)
    assert "alexnet/features.12 - resnet18/layer4 | EVC (all)" in shown["model_comparison"]
    assert bands_per_panel(shown["group_inference"]) == [1, 1]  # ROIs only
    assert bands_per_panel(shown["encoding"]) == [1, 1]
    assert "range over subjects of the split-half noise ceiling" in shown["encoding"]
    # the comparison table fits the page: what every row shares is said once above it
    section = page[page.index('data-figure="model_comparison"') :]
    table = section[section.index("<table") : section.index("</table>")]
    assert "Every row: compare_method <b>spearman</b>" in section
    assert "<th>n_boot</th>" not in table and "<th>delta_r</th>" in table
    assert "<th>target</th>" in table  # identifying columns stay, constant or not


def test_object2brain_across_models_marks_only_where_both_tests_pass(page: str) -> None:
    markup = figures(page)["object2brain_models"]
    for model, layers in MODELS.items():
        assert f"{model} / {layers[-1]}" in markup
    # one planted effect (resnet18, Faces, FFA): one star in the figure
    assert len(re.findall(r">\*<", markup)) == 1
    assert "p_fdr and p_perm_fdr both &lt; 0.05" in markup


def test_object2brain_marks_use_the_significant_column_when_present() -> None:
    rows = tables(np.random.default_rng(3))["lesion/object2brain"]
    rows = rows.assign(significant=False)
    marks, rule = glance.object2brain_marks(rows)
    assert not marks.any() and "significant" in rule
    fallback, rule = glance.object2brain_marks(rows.drop(columns="significant"))
    assert int(fallback.sum()) == 2 and "p_perm_fdr" in rule  # lesion and keep of the effect


def test_lesion_captions_name_model_and_layer(page: str) -> None:
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    for model, layers in MODELS.items():
        assert any(c.startswith(f"{model} / {layers[-1]}: delta r per object group")
                   for c in captions), model  # fmt: skip
    assert not any(c.startswith("lesion_") for c in captions)


def test_gallery_and_heatmap_captions_name_model_layer_and_explain_a_blank(page: str) -> None:
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    for model, layers in MODELS.items():
        gallery = [c for c in captions if c.startswith(f"{model} / {layers[-1]}, group Faces:")]
        assert len(gallery) == 1 and "f&lt;index&gt; = the filter&#x27;s channel" in gallery[0]
        heatmap = [c for c in captions if c.startswith(f"{model} / {layers[-1]}: log2 enrich")]
        assert len(heatmap) == 1
        assert ("blank: no group was detected" in heatmap[0]) == (model == "alexnet")


def test_provenance(page: str) -> None:
    section = page[page.index('id="provenance"') : page.index('id="tables"')]
    for text in (
        "<td>numpy</td><td>2.4.6</td>",
        "seed: permutation",
        "<td>n_perm</td><td>199</td>",
        "<td>n_boot</td><td>100</td>",
        "<td>n_null</td><td>100</td>",
        "<td>folds</td><td>5</td>",
        "<td>2 subjects</td>",
        "<td>3 raters</td>",
        "<td>790-812 (sub-01: 812, sub-02: 790)</td>",
        "<td>trained in this study</td>",
        "given: ",
        "0.770 / 0.700",  # the given head's test metrics, read from its head.json
        "<td>rsa</td><td>12.5</td>",
        "<td>lesion</td><td>40.2</td>",
        "reused by the last run (not re-computed): rsa",
    ):
        assert text in section, text
    assert section.count(html.escape(WARNING)) == 1  # recorded by two manifests, listed once
    heads = section[section.index("Valence heads") :].split("</table>")[0]
    assert "<th>best_epoch</th>" in heads  # alexnet's head.json records it
    assert "<th>n_train</th>" not in heads  # no head.json records it: no empty column


def test_sections_are_a_registry_in_page_order() -> None:
    from object2brain.report.build import SECTIONS

    names = [name for name, _ in SECTIONS]
    assert names.index("alignment") < names.index("contrast") < names.index("lesion")
    assert names[-2:] == ["provenance", "tables"]


def test_report_still_says_the_data_are_simulated(page: str) -> None:
    assert "<b>Simulated data.</b>" in page
    # a truth.json without valence_origin: no empty "True valence: ;"
    assert "True valence: ;" not in page and "Ratings: 2 simulated raters" in page


def test_roi_voxel_counts_after_dropping_constant_voxels(tmp_path: Path) -> None:
    import h5py

    from object2brain.api.rsa import roi_voxels
    from object2brain.data.brain import load_brain

    rng = np.random.default_rng(0)
    path = tmp_path / "patterns.h5"
    with h5py.File(path, "w") as f:
        f.attrs["kind"] = "patterns"
        f["stimulus_ids"] = np.array([f"s{i}" for i in range(6)], dtype="S")
        patterns = rng.normal(size=(6, 10))
        patterns[:, 3] = 1.0  # a constant voxel: dropped when loading
        f["sub-01/EVC"] = patterns
        f["sub-02/EVC"] = rng.normal(size=(6, 7))
    assert roi_voxels(load_brain(path)) == {"EVC": {"sub-01": 9, "sub-02": 7}}
    assert roi_voxels(None) == {}


def test_conditions_of_the_study_appear_as_lines() -> None:
    study = tables(np.random.default_rng(4))
    profile = glance.alignment_profile(
        study["rsa/alignment"], None, None, conditions=[c for c in CONDITIONS if c != "all"]
    )
    drawn = glance.plot_layer_profiles(profile, name="x", title="t", by_condition=True)
    labels = drawn.figure.axes[0].get_legend_handles_labels()[1]
    glance.pyplot().close(drawn.figure)
    assert "alexnet (pos)" in labels and "resnet18 (neg)" in labels
    assert isinstance(profile.rows, pd.DataFrame)


def test_a_run_records_each_warning_once() -> None:
    """What the provenance lists: ``object2brain run`` keeps each distinct warning once."""
    import logging

    from object2brain.pipeline.run import once_per_run

    log = logging.getLogger("object2brain.data.brain")
    with once_per_run() as warnings:
        for _ in range(8):
            log.warning("resampled %s to the betas' grid", "EVC")
        log.warning("stimulus s3 has no rating")
        log.info("not a warning")
    log.warning("after the run")
    assert warnings == ["resampled EVC to the betas' grid", "stimulus s3 has no rating"]


def test_object2brain_figure_draws_delta_r_against_the_null_quantiles() -> None:
    """With ``null_low``/``null_high`` (the null delta_r's 2.5% and 97.5% quantiles) the figure
    shows delta_r and each group's null interval; without them (older tables), or with the
    columns empty, z_null against the grey -1.96..1.96 band."""
    from object2brain.report.html import svg_figure_html

    rows = tables(np.random.default_rng(5))["lesion/object2brain"]
    delta = pd.to_numeric(rows["delta_r"])
    quantiles = rows.assign(null_low=delta - 0.05 - rows.index * 1e-3, null_high=delta + 0.02)

    def draw(table: pd.DataFrame) -> tuple[Any, str]:
        drawn = glance.plot_object2brain_models(table)
        assert drawn is not None
        axes = drawn.figure.axes
        markup = svg_figure_html(drawn.figure, drawn.caption, name="o2b")
        glance.pyplot().close(drawn.figure)
        return axes, markup

    axes, markup = draw(quantiles)
    assert axes[0].get_ylabel() == "delta r (variant - full)"
    assert 'class="o2b-nullq"' in markup and 'class="o2b-null"' not in markup
    assert "null_low to null_high" in markup and "97.5%" in markup
    # the drawn intervals are the table's quantiles, point for point
    shown = rows[(rows["condition"] == "all") & (rows["subject"] == "group")
                 & (rows["variant"] == "lesion")]  # fmt: skip
    first = shown[shown["target"] == shown["target"].iloc[0]]
    drawn_bars = [c for c in axes[0].collections if c.get_gid() == "o2b-nullq-0"]
    segments = np.concatenate([np.asarray(c.get_segments()) for c in drawn_bars])
    expected = quantiles.loc[first.index, ["null_low", "null_high"]].to_numpy(float)
    got = segments[:, :, 1]  # per bar (low, high)
    np.testing.assert_allclose(np.sort(got, axis=0), np.sort(expected, axis=0))
    points = np.concatenate([np.asarray(c.get_offsets()) for c in axes[0].collections
                             if c.get_gid() is None and len(c.get_offsets())])  # fmt: skip
    np.testing.assert_allclose(np.sort(points[:, 1]), np.sort(delta[first.index].to_numpy()))
    for table in (rows, quantiles.assign(null_low=np.nan, null_high=np.nan)):
        axes, markup = draw(table)
        assert axes[0].get_ylabel() == "z_null of delta r"
        assert 'class="o2b-null"' in markup and 'class="o2b-nullq"' not in markup
        assert "-1.96 to 1.96" in markup


def test_propagated_rows_chosen_on_the_same_stimuli_are_worded_circular(page: str) -> None:
    section = page[page.index("Propagated lesions: change of the direct behaviour") :]
    notes = re.findall(r"<strong>Circular selection:</strong> (\d+) of (\d+) rows", section)
    assert notes == [("2", "4"), ("2", "4")]  # behaviour; later layers at the group level
    cells = re.findall(r"<td>(same \(circular\)|cross_fit|same)</td>", section)
    assert cells.count("same (circular)") == 4 and cells.count("cross_fit") == 4
    assert "same" not in cells  # no bare `same` left
    assert "Propagated lesions: change of later layers&#x27; alignment" in section


def test_heatmap_marks_follow_the_rule_the_caption_names() -> None:
    """The per-model heatmaps star the same cells as the figure across models: with an empty
    p_group_fdr column both fall back to p_fdr and p_perm_fdr (one planted effect starred);
    with p_group_fdr values the heatmap uses them."""
    from object2brain.report.figures.lesion import summary_rows

    rows = tables(np.random.default_rng(3))["lesion/object2brain"]
    marks, rule = glance.object2brain_marks(rows)
    q = summary_rows(rows)["q"]
    shown = summary_rows(rows).index
    assert "p_fdr and p_perm_fdr" in rule
    np.testing.assert_array_equal((q < 0.05).to_numpy(), marks[shown].to_numpy(bool))
    assert int((q < 0.05).sum()) == 2  # lesion and keep of the planted effect
    strict = rows.assign(p_group_fdr=0.5)  # the matched null rejects nothing
    assert not (summary_rows(strict)["q"] < 0.05).any()


def test_effects_table_fits_the_page(page: str) -> None:
    """The starred Object2Brain rows without raw p-values, counts and empty columns."""
    from object2brain.report.build import effects_table

    rows = tables(np.random.default_rng(3))["lesion/object2brain"]
    shown = effects_table(rows)
    assert {"p_null", "p_perm", "n_null", "condition", "subject"}.isdisjoint(shown.columns)
    assert {"delta_r", "p_fdr", "p_perm_fdr", "z_null"} <= set(shown.columns)
    assert shown.notna().any().all()  # no column of n/a only
    assert len(shown.columns) <= 15
    section = page[page.index("Effects where") :]
    assert "<th>p_null</th>" not in section.split("</table>")[0]

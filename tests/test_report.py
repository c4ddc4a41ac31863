"""Tables in the style of Tables 2-3, figures in the style of Figures 2-3, self-contained HTML reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from d2mae.eval.document import Report, markdown_to_html, write_html
from d2mae.eval.figures import confusion_figure, metric_bars, read_records, roc_figure, sigma_histogram, training_curves
from d2mae.eval.image_figures import image_grid, obs_strip, reconstruction_figure
from d2mae.eval.statistics import mean_ci
from d2mae.eval.tables import ablation_table, comparison_table, format_mean_ci, format_pvalue
from d2mae.runtime.errors import D2maeError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Per-fold F1 of three methods on two datasets (fractions), and one method with a single run on a third.
RESULTS = {
    "MAE": {"GE4K": [0.870, 0.880, 0.875, 0.860, 0.890], "LEPset": {"f1": 0.840, "f2": 0.850, "f3": 0.830}},
    "DeblurrMAE": {"GE4K": [0.880, 0.885, 0.890, 0.870, 0.900], "LEPset": {"f1": 0.845, "f2": 0.846, "f3": 0.840}},
    "D2MAE": {"GE4K": [0.900, 0.895, 0.900, 0.890, 0.905], "LEPset": {"f1": 0.870, "f2": 0.875, "f3": 0.872},
              "MMOTU": [0.757]},
}


def _assert_png(path: Path, min_side: int = 200) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert min(im.size) >= min_side


def _cell(table, method: str, column: str) -> str:
    row = next(r for r in table.rows if r[0] == method)
    return row[table.header.index(column)]


def test_format_helpers() -> None:
    assert format_pvalue(0.0004) == "< 0.001"
    assert format_pvalue(0.00712) == "0.007"
    assert format_pvalue(float("nan")) == "n/a"
    assert format_mean_ci(mean_ci([0.8984])) == "89.84"
    s = mean_ci([0.9, 0.91, 0.92])
    assert format_mean_ci(s) == f"{91.0:.2f} ± {s.half_width * 100:.2f}"


def test_comparison_table_bold_best_underline_second_and_pvalue_row() -> None:
    t = comparison_table(RESULTS, info={"MAE": {"Pre-training": "US"}}, info_columns=["Pre-training"],
                         caption="Table 2: F1 (%)")
    assert t.header == ["Method", "Pre-training", "GE4K", "LEPset", "MMOTU"]
    ge = mean_ci(RESULTS["D2MAE"]["GE4K"])
    assert _cell(t, "D2MAE", "GE4K") == f"**{ge.mean * 100:.2f} ± {ge.half_width * 100:.2f}**"
    assert _cell(t, "DeblurrMAE", "GE4K").startswith("<u>") and _cell(t, "DeblurrMAE", "GE4K").endswith("</u>")
    assert "**" not in _cell(t, "MAE", "GE4K") and "<u>" not in _cell(t, "MAE", "GE4K")
    assert _cell(t, "MAE", "MMOTU") == "-"
    assert _cell(t, "D2MAE", "MMOTU") == "**75.70**"  # one run: no CI
    assert _cell(t, "MAE", "Pre-training") == "US"
    p_row = t.rows[-2]
    assert p_row[0].startswith("P-value") and t.rows[-1][0].startswith("MDE")
    ref = stats.ttest_rel(RESULTS["D2MAE"]["GE4K"], RESULTS["DeblurrMAE"]["GE4K"]).pvalue
    assert p_row[2] == format_pvalue(ref)
    assert t.data["columns"]["GE4K"]["pvalue"] == pytest.approx(ref)
    ref_named = stats.ttest_rel([0.870, 0.875, 0.872], [0.845, 0.846, 0.840]).pvalue  # paired by fold name
    assert t.data["columns"]["LEPset"]["pvalue"] == pytest.approx(ref_named)
    assert p_row[4] == "n/a" and any("MMOTU" in n for n in t.notes)
    md = t.to_markdown()
    assert md.startswith("Table 2: F1 (%)") and "| :--- | :--- | ---: | ---: | ---: |" in md
    assert sum(line.startswith("|") for line in md.splitlines()) == len(t.rows) + 2  # header + separator + rows


def test_minimum_detectable_effect_is_the_gap_a_paired_t_test_detects_with_80_percent_power() -> None:
    """Simulated from scratch: normal paired differences whose true mean is the MDE are called significant by scipy's
    paired t-test in 80% of the experiments (independent of the noncentral-t formula); half the MDE far less."""
    from d2mae.eval.statistics import minimum_detectable_effect

    rng = np.random.default_rng(0)
    measured = np.array([0.012, -0.004, 0.020, 0.007, -0.010, 0.015])  # e.g. AUROC differences over 6 folds × seeds
    mde = minimum_detectable_effect(measured)
    sd, n = measured.std(ddof=1), len(measured)
    assert 2.8 * sd / np.sqrt(n) < mde < 4.5 * sd / np.sqrt(n)  # normal approximation 2.80 s/√n, plus the t tails
    for delta, want in ((mde, 0.80), (mde / 2, None)):
        sims = rng.normal(delta, sd, size=(40_000, n))
        rate = float((stats.ttest_1samp(sims, 0.0, axis=1).pvalue < 0.05).mean())
        if want is not None:
            assert rate == pytest.approx(want, abs=0.01)
        else:
            assert rate < 0.40
    assert minimum_detectable_effect([0.1]) != minimum_detectable_effect([0.1])  # NaN: one pair
    assert minimum_detectable_effect([0.1, 0.1, 0.1]) == 0.0
    t = comparison_table({"a": {"AUROC": list(0.70 + measured)}, "b": {"AUROC": [0.70] * n}})
    assert t.data["columns"]["AUROC"]["mde"] == pytest.approx(mde)
    assert t.rows[-1] == ["MDE (P < 0.05, 80% power)", f"{mde * 100:.2f}"]


def test_comparison_table_lower_is_better_and_unpairable_values() -> None:
    t = comparison_table({"a": {"loss": [0.2, 0.3]}, "b": {"loss": [0.1, 0.15, 0.2]}}, higher_is_better=False)
    assert _cell(t, "b", "loss").startswith("**") and _cell(t, "a", "loss").startswith("<u>")
    assert t.rows[-2][1] == "n/a" and "cannot pair" in t.data["columns"]["loss"]["note"]
    assert t.rows[-1][1] == "n/a"  # no minimum detectable effect without pairs
    with pytest.raises(D2maeError):
        comparison_table({})


def test_ablation_table_marks_best_and_second_per_group() -> None:
    t = ablation_table({"(a) Blurriness range": {"0.1→0.6": [0.89, 0.902, 0.893], "0.1→1.1": [0.90, 0.91, 0.905],
                                                 "0.1→1.6": [0.88, 0.89, 0.889]},
                        "(d) Search step": {"s = 1": 0.8994, "s = 2": 0.8984, "s = 3": 0.8905}})
    assert t.header == ["Factor", "Setting", "F1 (%)"]
    assert t.rows[0][0] == "(a) Blurriness range" and t.rows[1][0] == ""
    assert t.rows[1][2].startswith("**") and t.rows[0][2].startswith("<u>") and "**" not in t.rows[2][2]
    assert t.rows[3] == ["(d) Search step", "s = 1", "**89.94**"]
    assert t.rows[4][2] == "<u>89.84</u>" and t.rows[5][2] == "89.05"
    ref = stats.ttest_rel([0.90, 0.91, 0.905], [0.89, 0.902, 0.893]).pvalue
    assert t.data["(a) Blurriness range"]["pvalue"] == pytest.approx(ref)
    assert any("(a) Blurriness range" in n for n in t.notes)


def test_figures_are_valid_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folds = {}
    for f in range(3):
        y = rng.integers(0, 2, 60)
        folds[f"fold{f}"] = (y, np.clip(0.35 * y + 0.65 * rng.random(60), 0, 1))
    _assert_png(roc_figure(folds, tmp_path / "roc.png", classes=["benign", "malignant"]))
    y = rng.integers(0, 4, 120)
    p = rng.dirichlet(np.ones(4), 120)
    _assert_png(roc_figure({"all": (y, p)}, tmp_path / "roc_mc.png", classes=list("abcd")))
    cm = np.array([[50, 5], [8, 37]])
    _assert_png(confusion_figure(cm, ["benign", "malignant"], tmp_path / "cm.png"))
    bars = {"ACC": {"GE4K": {"MAE": [0.85, 0.86, 0.87], "D2MAE": mean_ci([0.90, 0.91, 0.90])}},
            "AUROC": {"GE4K": {"MAE": {"mean": 0.93, "low": 0.92, "high": 0.94}, "D2MAE": 0.96}}}
    _assert_png(metric_bars(bars, tmp_path / "bars.png"))
    sigma = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9, 1.1], 90)
    _assert_png(sigma_histogram(sigma, tmp_path / "sigma.png", groups=rng.choice(["thyroid", "ovary"], 90)))
    _assert_png(sigma_histogram(np.append(sigma, np.nan), tmp_path / "sigma1.png"))
    img = rng.random((24, 24))
    levels = [0.1, 0.5, 0.9]
    _assert_png(obs_strip(img, [img * 0.9] * 3, [img * 0.95] * 3, levels, [0.03, 0.01, 0.02], tmp_path / "obs.png"))
    chw = np.stack([img] * 3)  # [3, H, W] (channels first, as tensors come) and [H, W, 3] mixed
    _assert_png(obs_strip(chw, np.stack([chw] * 3), [np.moveaxis(chw, 0, -1)] * 3, levels, [0.03, 0.01, 0.02],
                          tmp_path / "obs_chw.png", chosen=2))
    x = rng.random((2, 1, 16, 16))
    masked = x.copy()
    masked[:, :, :8, :8] = np.nan
    _assert_png(reconstruction_figure(x, masked, x * 0.9, tmp_path / "recon.png", blurred=x * 0.8))
    _assert_png(image_grid({"a": rng.random((2, 16, 16, 3))}, tmp_path / "grid.png", row_labels=["r1", "r2"]),
                min_side=100)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_training_curves_from_jsonl_and_csv(tmp_path: Path) -> None:
    lines = [json.dumps({"step": s, "epoch": s // 10, "loss": 1 / (s + 1), "lr": 1e-3}) for s in range(30)]
    lines += [json.dumps({"epoch": e, "val_acc": 0.5 + 0.04 * e, "val_loss": 1 - 0.1 * e, "note": "x"})
              for e in range(3)]
    jl = tmp_path / "metrics.jsonl"
    jl.write_text("\n".join(lines) + "\n\n")
    assert len(read_records(jl)) == 33
    _assert_png(training_curves(jl, tmp_path / "curves.png"))
    csv_file = tmp_path / "log.csv"
    csv_file.write_text("epoch,train_loss,val_f1\n0,1.0,0.5\n1,0.7,\n2,0.5,0.7\n")
    _assert_png(training_curves(csv_file, tmp_path / "curves_csv.png"))
    _assert_png(training_curves([{"step": 0, "x": 1.0}, {"step": 1, "x": 0.5}], tmp_path / "k.png", keys=["x"]))
    with pytest.raises(D2maeError, match="does not exist"):
        training_curves(tmp_path / "nope.jsonl", tmp_path / "c.png")
    (tmp_path / "bad.jsonl").write_text('{"loss": 1}\n{oops\n')
    with pytest.raises(D2maeError, match="line 2"):
        training_curves(tmp_path / "bad.jsonl", tmp_path / "c.png")
    with pytest.raises(D2maeError, match="no column"):
        training_curves([{"step": 0, "acc": 1.0}], tmp_path / "c.png")
    with pytest.raises(D2maeError, match="no column"):
        training_curves([{"step": 0, "loss": 1.0}], tmp_path / "c.png", keys=["acc"])


def test_figure_input_errors(tmp_path: Path) -> None:
    img = np.zeros((8, 8))
    with pytest.raises(D2maeError, match="same number"):
        obs_strip(img, [img], [img, img], [0.1], [0.1], tmp_path / "o.png")
    with pytest.raises(D2maeError, match="shape"):
        obs_strip(img, [np.zeros((4, 4))], [img], [0.1], [0.1], tmp_path / "o.png")
    with pytest.raises(D2maeError, match="outside"):
        obs_strip(img, [img], [img], [0.1], [0.1], tmp_path / "o.png", chosen=3)
    with pytest.raises(D2maeError, match="match"):
        confusion_figure(np.zeros((3, 3)), ["a", "b"], tmp_path / "c.png")
    with pytest.raises(D2maeError, match="group labels"):
        sigma_histogram([0.1, 0.2], tmp_path / "s.png", groups=["a"])
    with pytest.raises(D2maeError, match="no finite"):
        sigma_histogram([np.nan], tmp_path / "s.png")
    with pytest.raises(D2maeError, match="different numbers"):
        image_grid({"a": np.zeros((2, 8, 8)), "b": np.zeros((3, 8, 8))}, tmp_path / "g.png")
    with pytest.raises(D2maeError, match="cannot show"):
        image_grid({"a": np.zeros((1, 8, 8, 5))}, tmp_path / "g.png")
    assert not (tmp_path / "o.png").exists()


def test_report_writes_markdown_and_self_contained_html(tmp_path: Path) -> None:
    figs = tmp_path / "figs"
    bars = metric_bars({"ACC": {"GE4K": {"MAE": [0.85, 0.86], "D2MAE": [0.90, 0.91]}}}, figs / "bars.png")
    rep = Report("D²MAE results")
    rep.heading("Table 2")
    rep.table(comparison_table(RESULTS, caption="F1 (%)"))
    rep.paragraph("P < 0.05 & friends: **bold**, <u>under</u>, `code`, <script>alert(1)</script>")
    rep.bullets(["one", "two"])
    rep.code("d2mae evaluate RUN")
    rep.image(bars, "Figure 2: ACC")
    md_path, html_path = rep.write(tmp_path / "out")
    md = md_path.read_text()
    assert md.startswith("# D²MAE results") and "![Figure 2: ACC](../figs/bars.png)" in md
    page = html_path.read_text()
    srcs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "<strong>" in page and "<u>" in page and "<code>code</code>" in page
    assert "&lt;script&gt;" in page and "<script>" not in page and "P &lt; 0.05" in page
    assert page.count("<table>") == 1 and "<th" in page
    # the Markdown file converts to the same kind of page
    page2 = write_html(md_path, tmp_path / "out" / "again.html").read_text()
    assert re.findall(r'src="([^"]{0,22})', page2) == ["data:image/png;base64,"]
    assert "<strong>" in page2 and "<table>" in page2 and "<pre><code>d2mae evaluate RUN" in page2
    assert "<li>one</li>" in page2
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_markdown_to_html_refuses_remote_and_missing_images(tmp_path: Path) -> None:
    with pytest.raises(D2maeError, match="not a local file"):
        markdown_to_html("![x](https://example.com/a.png)\n", tmp_path)
    with pytest.raises(D2maeError, match="does not exist"):
        markdown_to_html("# T\n\n![x](missing.png)\n", tmp_path)
    rep = Report("r").image(tmp_path / "missing.png")
    with pytest.raises(D2maeError, match="does not exist"):
        rep.write(tmp_path / "o")
    assert not (tmp_path / "o" / "report.md").exists()
    page = markdown_to_html("| a | b |\n| --- | ---: |\n| x \\| y | 2 |\n", tmp_path, title="t")
    assert "<td>x | y</td>" in page and '<td style="text-align:right">2</td>' in page

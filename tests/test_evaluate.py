"""``d2mae evaluate`` / ``d2mae compare`` on synthetic run folders (predictions.csv + run.json, the fine-tuning
contract), including every bad input the commands must explain."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from d2mae.commands.main import main
from d2mae.eval.evaluate import compare_runs, evaluate_run
from d2mae.io.predictions import load_predictions
from d2mae.runtime.errors import D2maeError

CLASSES = ["benign", "malignant"]
SIGMAS = [0.1, 0.3, 0.5, 0.7, 0.9, 1.1]


def make_run(folder: Path, skill: float = 1.5, n: int = 150, n_folds: int = 5, classes: list[str] = CLASSES,
             seed: int = 0, label_seed: int = 0, method: str = "d2mae", extra: bool = True, val_rows: int = 10,
             write_run_json: bool = True) -> Path:
    """Write a run folder as fine-tuning does. Labels depend on ``label_seed`` only, so two runs made with the
    same ``label_seed`` share test images and labels; ``skill`` sets how well the probabilities separate."""
    folder.mkdir(parents=True, exist_ok=True)
    k = len(classes)
    lab = np.random.default_rng(label_seed)
    y = lab.integers(0, k, n)
    y[:k] = np.arange(k)  # every class present
    scanner = lab.choice(["GE", "Philips", "Toshiba"], n)
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += skill
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    folds = [f"fold{i % n_folds + 1}" for i in range(n)]
    header = ["path", "fold", "split", "label", "label_name", "pred", *[f"prob_{c}" for c in classes], "t_star",
              "sigma_star"] + (["scanner"] if extra else [])
    with (folder / "predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i in range(n + val_rows):
            j = i % n
            t = int(rng.integers(0, len(SIGMAS)))
            split = "test" if i < n else "val"
            row = [f"images/{j:04d}.png", folds[j], split, int(y[j]), classes[y[j]], int(probs[j].argmax()),
                   *[f"{v:.6f}" for v in probs[j]], 1 + 2 * t, SIGMAS[t]] + ([scanner[j]] if extra else [])
            w.writerow(row)
    if write_run_json:
        (folder / "run.json").write_text(json.dumps({
            "classes": classes, "protocol": f"kfold:{n_folds}", "folds": [f"fold{i + 1}" for i in range(n_folds)],
            "method": method, "seed": seed}))
    return folder


def read_test_rows(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with (folder / "predictions.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    cols = [c for c in rows[0] if c.startswith("prob_")]
    return (np.array([int(r["label"]) for r in rows]), np.array([[float(r[c]) for c in cols] for r in rows]),
            [r["fold"] for r in rows])


def rewrite(folder: Path, fn) -> None:
    """Apply ``fn(header, rows) -> (header, rows)`` to predictions.csv."""
    path = folder / "predictions.csv"
    with path.open(newline="") as fh:
        data = list(csv.reader(fh))
    header, rows = fn(data[0], data[1:])
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        im.verify()
    return path.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_writes_all_files_and_agrees_with_sklearn(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    res = evaluate_run(run, n_bootstrap=200, seed=0, group_by=["scanner"])
    for name in ("metrics.json", "metrics.md", "metrics.html", "evaluate.yaml", "roc.png", "confusion.png",
                 "sigma_star.png", "sigma_star_by_scanner.png"):
        assert (run / name).is_file(), name
    for png in run.glob("*.png"):
        assert _is_png(png)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    y, p, folds = read_test_rows(run)
    assert res["n_images"] == 150 and res["n_folds"] == 5 and res["split"] == "test"  # val rows ignored
    pooled = res["pooled"]
    assert pooled["accuracy"]["value"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    assert pooled["macro_f1"]["value"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert pooled["auroc"]["value"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    for m in ("accuracy", "macro_f1", "auroc", "balanced_accuracy"):
        lo, hi = pooled[m]["ci"]
        assert lo <= pooled[m]["value"] <= hi
    fold_acc = []
    for f in ["fold1", "fold2", "fold3", "fold4", "fold5"]:
        sel = np.array(folds) == f
        fold_acc.append(accuracy_score(y[sel], p[sel].argmax(1)))
        assert res["folds"][f]["accuracy"] == pytest.approx(fold_acc[-1])
    over = res["over_folds"]["accuracy"]
    lo, hi = stats.t.interval(0.95, 4, loc=np.mean(fold_acc), scale=stats.sem(fold_acc))
    assert over["mean"] == pytest.approx(np.mean(fold_acc)) and (over["low"], over["high"]) == pytest.approx((lo, hi))
    assert set(res["groups"]["scanner"]) == {"GE", "Philips", "Toshiba"}
    assert sum(v["n"] for v in res["groups"]["scanner"].values()) == 150
    assert res["sigma_star"]["n"] == 150 and set(res["sigma_star"]["counts"]) <= {f"{s:g}" for s in SIGMAS}
    md = (run / "metrics.md").read_text()
    assert "| ACC |" in md and "![ROC curves](roc.png)" in md and "By scanner" in md
    html = (run / "metrics.html").read_text()
    assert 'src="data:image/png;base64,' in html and 'src="roc.png"' not in html
    # same seed -> same numbers
    again = evaluate_run(run, n_bootstrap=200, seed=0, group_by=["scanner"], out_dir=tmp_path / "again",
                         figures=False)
    assert again["pooled"] == res["pooled"]
    assert not (tmp_path / "again" / "roc.png").exists() and (tmp_path / "again" / "metrics.json").is_file()


def test_single_fold_multiclass_run_without_run_json(tmp_path: Path) -> None:
    run = make_run(tmp_path / "mc", classes=["a", "b", "c", "d"], n_folds=1, n=80, extra=False,
                   write_run_json=False)
    res = evaluate_run(run, n_bootstrap=100)
    assert res["classes"] == ["a", "b", "c", "d"] and res["n_folds"] == 1 and "over_folds" not in res
    assert any("classes taken from the prob_ columns" in n for n in res["notes"])
    y, p, _ = read_test_rows(run)
    assert res["pooled"]["auroc"]["value"] == pytest.approx(
        np.mean([roc_auc_score(y == c, p[:, c]) for c in range(4)]))
    assert (run / "roc.png").is_file() and (run / "sigma_star.png").is_file()


def test_fold_missing_a_class_gets_auroc_note(tmp_path: Path) -> None:
    run = make_run(tmp_path / "r", n=40, n_folds=2)
    # make every fold2 image benign -> AUROC undefined on fold 2, still defined pooled
    rewrite(run, lambda h, rows: (h, [r[:3] + (["0", "benign"] + r[5:] if r[1] == "fold2" else r[3:])
                                      for r in rows]))
    res = evaluate_run(run, n_bootstrap=50, figures=True)
    assert res["folds"]["fold2"]["auroc"] is None and "only class 0" in res["folds"]["fold2"]["auroc_note"]
    assert res["over_folds"]["auroc"]["n"] == 1 and "NaN" in res["over_folds"]["auroc"]["note"]
    assert res["pooled"]["auroc"]["value"] is not None
    assert "fold2: AUROC n/a" in (run / "metrics.md").read_text()


def test_pred_column_is_used_and_disagreement_noted(tmp_path: Path) -> None:
    run = make_run(tmp_path / "r", n=60, n_folds=2)
    rewrite(run, lambda h, rows: (h, [r[:5] + ["1"] + r[6:] for r in rows]))  # always predict malignant
    res = evaluate_run(run, n_bootstrap=50, figures=False)
    y, _, _ = read_test_rows(run)
    assert res["pooled"]["accuracy"]["value"] == pytest.approx(np.mean(y == 1))
    assert any("differs from the argmax" in n for n in res["notes"])


def test_compare_runs_paired_tests(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", skill=3.0, seed=1, method="d2mae")
    b = make_run(tmp_path / "b", skill=0.5, seed=2, method="mae")
    # B lists its rows in another order: matching is by (fold, path), not row position
    rewrite(b, lambda h, rows: (h, rows[::-1]))
    res = compare_runs(a, b, n_bootstrap=200, seed=0, out_dir=tmp_path / "cmp")
    assert (tmp_path / "cmp" / "compare.json").is_file() and (tmp_path / "cmp" / "compare.md").is_file()
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["metrics"] == res["metrics"]
    assert res["method_a"] == "d2mae" and res["method_b"] == "mae" and res["n_images"] == 150
    acc = res["metrics"]["accuracy"]
    assert acc["difference"] == pytest.approx(acc["a"] - acc["b"]) and acc["difference"] > 0
    assert acc["bootstrap"]["ci"][0] > 0 and acc["bootstrap"]["pvalue"] < 0.05
    fa = [acc["per_fold"][f]["a"] for f in res["folds"]]
    fb = [acc["per_fold"][f]["b"] for f in res["folds"]]
    assert acc["ttest_folds"]["pvalue"] == pytest.approx(stats.ttest_rel(fa, fb).pvalue)
    ya, pa, folds_a = read_test_rows(a)
    sel = np.array(folds_a) == "fold3"
    assert acc["per_fold"]["fold3"]["a"] == pytest.approx(accuracy_score(ya[sel], pa[sel].argmax(1)))
    same = compare_runs(a, a, n_bootstrap=50)
    assert same["metrics"]["auroc"]["difference"] == 0 and same["metrics"]["auroc"]["ttest_folds"]["pvalue"] is None


def test_cli_evaluate_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_run(tmp_path / "a", skill=2.5, seed=1)
    b = make_run(tmp_path / "b", skill=1.0, seed=2)
    assert main(["evaluate", str(a), "--n-bootstrap", "100", "--group-by", "scanner", "--out",
                 str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "ACC" in out and "over folds" in out and (tmp_path / "ev" / "sigma_star_by_scanner.png").is_file()
    assert "n_bootstrap: 100" in (tmp_path / "ev" / "evaluate.yaml").read_text()
    assert main(["compare", str(a), str(b), "--n-bootstrap", "100", "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "A − B" in out and "p (t-test, 5 folds)" in out and (tmp_path / "cmp" / "compare.json").is_file()
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "missing" in err and "Traceback" not in err
    assert main(["evaluate", str(a), "--n-bootstrap", "0"]) == 2
    assert "--n-bootstrap" in capsys.readouterr().err


def _expect(run: Path, match: str, **kw: Any) -> None:
    with pytest.raises(D2maeError, match=match):
        evaluate_run(run, n_bootstrap=10, figures=False, **kw)


def test_bad_run_folders_raise_clear_errors(tmp_path: Path) -> None:
    _expect(tmp_path / "nope", r"run folder .*nope does not exist")
    (tmp_path / "empty").mkdir()
    _expect(tmp_path / "empty", r"predictions\.csv not found")

    run = make_run(tmp_path / "cols", n=30, n_folds=2)
    rewrite(run, lambda h, rows: ([c for c in h if c != "pred"], [r[:5] + r[6:] for r in rows]))
    _expect(run, r"missing column\(s\) \['pred'\]")

    run = make_run(tmp_path / "probcol", n=30, n_folds=2)
    rewrite(run, lambda h, rows: ([("prob_cancer" if c == "prob_malignant" else c) for c in h], rows))
    _expect(run, r"missing column\(s\) \['prob_malignant'\]")

    run = make_run(tmp_path / "one", n=30, n_folds=2)
    rewrite(run, lambda h, rows: (h, [r[:3] + ["0", "benign"] + r[5:] for r in rows]))
    _expect(run, r"every 'test' image has the label 'benign'")

    run = make_run(tmp_path / "oneclass", n=30, n_folds=2)
    (run / "run.json").write_text(json.dumps({"classes": ["benign"]}))
    rewrite(run, lambda h, rows: ([c for c in h if c != "prob_malignant"], [r[:7] + r[8:] for r in rows]))
    _expect(run, r"only one class")

    run = make_run(tmp_path / "label", n=30, n_folds=2)
    rewrite(run, lambda h, rows: (h, [r[:3] + ["7"] + r[4:] if i == 4 else r for i, r in enumerate(rows)]))
    _expect(run, r"line 6: column 'label' = 7 is outside 0\.\.1")

    run = make_run(tmp_path / "name", n=30, n_folds=2)
    rewrite(run, lambda h, rows: (h, [r[:4] + ["malignant" if r[3] == "0" else "benign"] + r[5:] for r in rows]))
    _expect(run, r"label_name says")

    run = make_run(tmp_path / "logits", n=30, n_folds=2)
    rewrite(run, lambda h, rows: (h, [r[:6] + ["2.5", "-1.0"] + r[8:] for r in rows]))
    _expect(run, r"line 2: the prob_ columns must be probabilities")

    run = make_run(tmp_path / "nan", n=30, n_folds=2)
    rewrite(run, lambda h, rows: (h, [r[:6] + ["abc"] + r[7:] for r in rows]))
    _expect(run, r"column 'prob_benign' must be a number")

    run = make_run(tmp_path / "dup", n=30, n_folds=2)
    rewrite(run, lambda h, rows: (h, rows[:3] + [rows[0]] + rows[3:]))
    _expect(run, r"appears twice in fold 'fold1'")

    run = make_run(tmp_path / "split", n=30, n_folds=2)
    _expect(run, r"no rows with split == 'train' \(splits found: \['test', 'val'\]\)", split="train")
    _expect(run, r"no column 'hospital'", group_by=["hospital"])

    run = make_run(tmp_path / "json", n=30, n_folds=2)
    (run / "run.json").write_text("{not json")
    _expect(run, r"run\.json is not valid JSON")
    (run / "run.json").write_text(json.dumps({"classes": ["benign", "malignant", "other"]}))
    _expect(run, r"missing column\(s\) \['prob_other'\]")
    (run / "run.json").write_text(json.dumps({"classes": ["benign"]}))
    _expect(run, r"probability column\(s\) \['prob_malignant'\] that are not classes")


def test_compare_refuses_runs_on_different_images_or_folds(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", n=60, n_folds=3)
    fewer = make_run(tmp_path / "fewer", n=50, n_folds=3)
    with pytest.raises(D2maeError, match=r"different 'test' images: 10 only in A, 0 only in B"):
        compare_runs(a, fewer, n_bootstrap=10)
    folds = make_run(tmp_path / "folds", n=60, n_folds=2)
    with pytest.raises(D2maeError, match="different folds"):
        compare_runs(a, folds, n_bootstrap=10)
    other = make_run(tmp_path / "other", n=60, n_folds=3, label_seed=5)
    with pytest.raises(D2maeError, match="disagree on the label"):
        compare_runs(a, other, n_bootstrap=10)
    classes = make_run(tmp_path / "classes", n=60, n_folds=3, classes=["x", "y"])
    with pytest.raises(D2maeError, match="different classes"):
        compare_runs(a, classes, n_bootstrap=10)
    with pytest.raises(D2maeError, match="does not exist"):
        compare_runs(a, tmp_path / "nope", n_bootstrap=10)


def test_load_predictions_accepts_class_names_as_labels(tmp_path: Path) -> None:
    run = make_run(tmp_path / "r", n=30, n_folds=2)
    rewrite(run, lambda h, rows: (h, [r[:3] + [r[4]] + r[4:] for r in rows]))  # label column holds names
    loaded = load_predictions(run)
    with (run / "predictions.csv").open(newline="") as fh:
        names = [r["label_name"] for r in csv.DictReader(fh) if r["split"] == "test"]
    assert loaded.labels.tolist() == [CLASSES.index(n) for n in names]
    assert loaded.fold_order == ["fold1", "fold2"] and loaded.method == "d2mae"



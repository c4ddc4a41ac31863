"""Run folders written by d2mae 0.2.0 (before the package's files were split) still load and give the same numbers.

``tests/fixtures/run-0.2.0`` was written by commit b76d3ef with a tiny model (16 wide, 1 block, 32 px) on 24
phantoms: ``pt`` (D²MAE), ``pt-moco`` and ``pt-diffmae`` (``d2mae pretrain``), ``obs`` (``d2mae obs``) and ``ft``
(``d2mae finetune --pretrained pt``). Its CSVs hold the absolute paths of the machine that wrote them; images are
matched by file name.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from d2mae.commands.main import main
from d2mae.io.artifacts import load_classifier, load_pretrained

OLD = Path(__file__).resolve().parent / "fixtures" / "run-0.2.0"
CPU = ["--device", "cpu"]


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return {Path(r["path"]).name: r for r in csv.DictReader(fh)}


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A copy of the old folders (commands may write beside them; the fixture stays as it was)."""
    shutil.copytree(OLD, tmp_path / "old")
    return tmp_path / "old"


@pytest.mark.parametrize("folder", ["pt", "pt-moco", "pt-diffmae"])
def test_old_pretrained_folders_load(old: Path, folder: str) -> None:
    model = load_pretrained(old / folder, "cpu")
    assert model.config.img_size == 32 and model.config.dim == 16


def test_old_pretrained_model_gives_the_same_obs_table(old: Path, tmp_path: Path) -> None:
    """OBS with the old D²MAE folder picks the same t* per image, with the same losses, as d2mae 0.2.0 did."""
    assert main(["obs", "--model", str(old / "pt"), "--labels", str(old / "ph" / "labels.csv"), "--out",
                 str(tmp_path / "obs"), "--strips", "0", *CPU]) == 0
    before, after = _rows(old / "obs" / "obs.csv"), _rows(tmp_path / "obs" / "obs.csv")
    assert set(before) == set(after) and len(after) == 24
    for name, row in before.items():
        assert after[name]["t_star"] == row["t_star"], name
        for key in (k for k in row if k.startswith("loss_t")):
            assert abs(float(after[name][key]) - float(row[key])) < 2e-6, (name, key)


def test_old_finetuned_run_predicts_what_it_predicted(old: Path, tmp_path: Path) -> None:
    """``predict`` with the old fine-tuned run (OBS first, then the fold's classifier) reproduces the probabilities
    that run wrote for its test images; ``evaluate`` reads its predictions.csv and run.json."""
    test_rows = {k: r for k, r in _rows(old / "ft" / "predictions.csv").items() if r["split"] == "test"}
    images = [str(old / "ph" / "images" / name) for name in sorted(test_rows)]
    out = tmp_path / "pred.csv"
    assert main(["predict", "--model", str(old / "ft"), *images, "--out", str(out), "--workers", "0", *CPU]) == 0
    now = _rows(out)
    for name, row in test_rows.items():
        for key in ("prob_benign", "prob_malignant"):
            assert abs(float(now[name][key]) - float(row[key])) < 2e-5, (name, key)
    assert main(["evaluate", str(old / "ft"), "--no-figures"]) == 0
    assert load_classifier(old / "ft" / "fold_1" / "model", "cpu") is not None


def test_old_pretrained_folder_fine_tunes_and_exports(old: Path, tmp_path: Path) -> None:
    assert main(["finetune", "--pretrained", str(old / "pt"), "--labels", str(old / "ph" / "labels.csv"), "--out",
                 str(tmp_path / "ft"), "--epochs", "1", "--batch-size", "8", "--warmup-epochs", "0", "--workers", "0",
                 "--no-progress", *CPU]) == 0
    assert (tmp_path / "ft" / "predictions.csv").is_file()
    assert main(["export", "--model", str(old / "pt"), "--out", str(tmp_path / "timm")]) == 0
    assert any((tmp_path / "timm").iterdir())

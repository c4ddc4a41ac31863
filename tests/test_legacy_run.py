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
    assert model.config.img_size == 32 and model.config.embed_dim == 16


def test_old_pretrained_model_gives_the_same_obs_table(old: Path, tmp_path: Path) -> None:
    """OBS with the old D²MAE folder picks the same t* per image, with the same losses, as d2mae 0.2.0 did."""
    assert main(["obs", "--pretrained", str(old / "pt"), "--labels", str(old / "ph" / "labels.csv"), "--out",
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
    assert main(["export", "--pretrained", str(old / "pt"), "--out", str(tmp_path / "timm")]) == 0
    assert any((tmp_path / "timm").iterdir())


def test_an_old_pretrain_yaml_still_builds_its_config(old: Path) -> None:
    """``num_workers`` (0.2.0's name of ``workers``) is accepted from a saved pretrain.yaml and as a flag."""
    from d2mae.commands.main import build_parser
    from d2mae.runtime.options import build_config, load_yaml
    from d2mae.train.pretrain_config import PretrainConfig

    saved = load_yaml(old / "pt" / "pretrain.yaml")
    assert "num_workers" in saved
    cfg = build_config(PretrainConfig, ({**saved, "num_workers": 3}, "pretrain.yaml"))
    assert cfg.workers == 3 and cfg.epochs == 1 and cfg.embed_dim == 16
    args = build_parser("pretrain").parse_args(["--data", "x", "--out", "y", "--num-workers", "1"])
    assert args.workers == "1"


def test_a_d2mae_config_carries_no_other_objectives_settings(old: Path) -> None:
    """config.json keeps MoCo v3's settings for a MoCo v3 model only (and DiffMAE's for DiffMAE); an old D²MAE
    config.json that lists them all still loads, and saving it again drops them."""
    import json

    from d2mae.method.model_config import OBJECTIVE_FIELDS, ModelConfig

    old_d2mae = json.loads((old / "pt" / "config.json").read_text())["model"]
    assert "moco_dim" in old_d2mae and "diffusion_steps" in old_d2mae
    again = ModelConfig.from_dict(old_d2mae).to_dict()
    assert not set(again) & set(OBJECTIVE_FIELDS)
    moco = ModelConfig.from_dict(json.loads((old / "pt-moco" / "config.json").read_text())["model"]).to_dict()
    assert {k for k in moco if k in OBJECTIVE_FIELDS} == {"moco_dim", "moco_mlp_dim", "moco_temperature",
                                                           "moco_momentum"}
    assert moco["moco_dim"] == 8

"""One downstream engine, one name per concept: classification and segmentation share one fold loop and one config
core, every command takes the same names for the same things, and each command's help fits on a screen. Runs
written before the engine was shared still load, evaluate and predict the same."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d2mae.commands.main import COMMANDS, build_parser, main
from d2mae.data.phantom import generate_phantoms
from d2mae.train import engine
from d2mae.train.config import DownstreamConfig, FinetuneConfig, ProbeConfig, SegmentConfig, own_fields

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SEG = FIXTURES / "seg-dbb9461"  # written by commit dbb9461 (before the engine was shared): d2mae phantoms, pretrain
CPU = ["--device", "cpu", "--workers", "0", "--no-progress"]


def _declared(cls: type) -> set[str]:
    """The fields ``cls`` declares in its own body (its annotations), not those it builds on."""
    return set(cls.__dict__.get("__annotations__", {}))


def test_no_field_is_declared_in_both_the_segmentation_and_the_classification_config() -> None:
    seg, cls, probe = _declared(SegmentConfig), _declared(FinetuneConfig), _declared(ProbeConfig)
    assert seg and cls and probe
    assert seg & cls == set() and seg & probe == set() and cls & probe == set()
    shared = _declared(DownstreamConfig)
    assert not (seg | cls | probe) & shared  # what they share is declared once, in DownstreamConfig
    assert set(own_fields(SegmentConfig)) == seg and set(own_fields(FinetuneConfig)) == cls
    for name in ("epochs", "batch_size", "blr", "layer_decay", "obs", "protocol", "patience", "seed", "pretrained"):
        assert name in shared, name


def test_classification_and_segmentation_run_through_the_same_fold_loop(tmp_path: Path, monkeypatch) -> None:
    """Both commands train every fold with engine.train_one_epoch, from engine.Run.run_fold."""
    calls: list[tuple[str, str]] = []
    real_epoch, real_fold = engine.train_one_epoch, engine.Run.run_fold

    def epoch(trainer, *args, **kwargs):  # noqa: ANN001
        calls.append(("epoch", type(trainer.model).__name__))
        return real_epoch(trainer, *args, **kwargs)

    def run_fold(self, fold):  # noqa: ANN001
        calls.append(("fold", self.task.command))
        return real_fold(self, fold)

    monkeypatch.setattr(engine, "train_one_epoch", epoch)
    monkeypatch.setattr(engine.Run, "run_fold", run_fold)
    generate_phantoms(tmp_path / "ph", n=24, size=40, seed=2, masks=True)
    labels = str(tmp_path / "ph" / "labels.csv")
    common = ["--protocol", "split:2:1:1", "--epochs", "1", "--batch-size", "4", "--warmup-epochs", "0",
              "--img-size", "32", *CPU]
    assert main(["finetune", "--labels", labels, "--mode", "scratch", "--obs", "none", "--out",
                 str(tmp_path / "ft"), *common]) == 0
    assert main(["segment", "--labels", labels, "--mask-column", "mask", "--decoder", "unet", "--out",
                 str(tmp_path / "seg"), *common]) == 0
    assert ("fold", "finetune") in calls and ("fold", "segment") in calls
    assert ("epoch", "DeblurClassifier") in calls and ("epoch", "UNetSegmenter") in calls


@pytest.mark.parametrize("command,old,new,value", [
    ("pretrain", "--model", "--arch", "vit_small_patch16"),
    ("obs", "--model", "--pretrained", "runs/pt"),
    ("probe", "--model", "--pretrained", "runs/pt"),
    ("export", "--model", "--pretrained", "runs/pt"),
])
def test_one_name_per_concept_and_old_spellings_still_work_with_a_note(command: str, old: str, new: str,
                                                                      value: str) -> None:
    from d2mae.commands.flags import OLD
    from d2mae.eval.obs import ObsConfig
    from d2mae.io.export import ExportConfig
    from d2mae.runtime.options import canonical_key
    from d2mae.train.pretrain_config import PretrainConfig

    parser = build_parser(command)
    assert new in parser.format_help()
    assert re.search(rf"\s{old}\b", parser.format_help()) is None  # the old spelling is not advertised
    args = parser.parse_args([old, value])  # still a flag
    assert {k[len(OLD):]: v for k, v in vars(args).items() if k.startswith(OLD)} == {old[2:]: value}
    config_cls = {"pretrain": PretrainConfig, "obs": ObsConfig, "probe": ProbeConfig, "export": ExportConfig}[command]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert canonical_key(config_cls, old[2:], "the command line") == new[2:].replace("-", "_")
    assert [str(w.message) for w in seen] == [f"{old} is now {new}; the old name still works in this release"]


def test_an_old_spelling_on_the_command_line_gives_one_note_and_runs(tmp_path: Path) -> None:
    generate_phantoms(tmp_path / "ph", n=8, size=40, seed=1)
    with pytest.warns(FutureWarning) as notes:
        code = main(["pretrain", "--data", str(tmp_path / "ph" / "images"), "--out", str(tmp_path / "pt"),
                     "--model", "vit_tiny_patch16", "--img-size", "32", "--embed-dim", "16", "--depth", "1",
                     "--num-heads", "1", "--decoder-embed-dim", "16", "--decoder-depth", "1", "--decoder-num-heads",
                     "1", "--epochs", "1", "--batch-size", "4", "--warmup-epochs", "0", *CPU])
    assert code == 0
    assert [str(n.message) for n in notes] == ["--model is now --arch; the old name still works in this release"]
    assert json.loads((tmp_path / "pt" / "config.json").read_text())["model"]["arch"] == "vit_tiny_patch16"


def _listed(command: str) -> set[str]:
    """The options ``d2mae COMMAND --help`` lists (a --x / --no-x pair once)."""
    text = build_parser(command).format_help()
    return {m for m in re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", text, flags=re.M) if not m.startswith("--no-")}


def test_each_commands_help_fits_on_a_screen_and_help_all_lists_the_rest(capsys) -> None:
    counts = {c: len(_listed(c)) for c in COMMANDS}
    assert max(counts.values()) <= 30, counts
    assert sum(counts.values()) <= 200, counts
    assert "--layer-decay" not in _listed("finetune")
    assert main(["finetune", "--help-all"]) == 0
    every = capsys.readouterr().out
    for option in ("--layer-decay", "--mixup", "--folds-csv", "--checkpoint-every-seconds"):
        assert option in every and "(default:" in every


def test_set_and_nested_yaml_sections_reach_the_config(tmp_path: Path) -> None:
    from d2mae.commands.flags import config_from_cli

    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text("data: {labels: l.csv, protocol: 'kfold:3'}\noptim: {epochs: 7, layer_decay: 0.5}\n")
    args = build_parser("finetune").parse_args(["--config", str(cfg_file), "--set", "layer_decay=0.75",
                                                "--set", "classes=[b, a]", "--epochs", "9"])
    cfg = config_from_cli(FinetuneConfig, args)
    assert (cfg.labels, cfg.protocol, cfg.epochs, cfg.layer_decay, cfg.classes) == ("l.csv", "kfold:3", 9, 0.75,
                                                                                      ["b", "a"])


# ------------------------------------------------------------------------------------------ runs written before


@pytest.fixture
def old_seg(tmp_path: Path) -> Path:
    shutil.copytree(SEG, tmp_path / "old")
    return tmp_path / "old"


def _test_rows(run: Path) -> list[dict[str, str]]:
    with (run / "per_image.csv").open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["split"] == "test"]


def test_an_old_segmentation_run_predicts_the_masks_it_wrote(old_seg: Path, tmp_path: Path) -> None:
    """``predict`` with the old run folder (OBS with its bundled pre-trained model, then the segmenter at t*)
    writes, bit for bit, the masks that run wrote for its own test images."""
    rows = _test_rows(old_seg / "seg")
    images = [str(old_seg / "ph" / "images" / Path(r["path"]).name) for r in rows]
    assert main(["predict", "--model", str(old_seg / "seg"), *images, "--out", str(tmp_path / "masks"), *CPU]) == 0
    for r in rows:
        name = Path(r["path"]).name
        now = np.asarray(Image.open(tmp_path / "masks" / name))
        then = np.asarray(Image.open(old_seg / "seg" / "predictions" / ("images__" + name)))
        assert np.array_equal(now, then), name
    written = {Path(r["path"]).name: r for r in csv.DictReader(open(tmp_path / "masks" / "masks.csv"))}
    assert {Path(r["path"]).name: r["t_star"] for r in rows} == {k: v["t_star"] for k, v in written.items()}


def test_an_old_segmentation_run_evaluates_to_the_numbers_it_reported(old_seg: Path, monkeypatch) -> None:
    monkeypatch.chdir(old_seg)  # its per_image.csv names the masks relative to the folder it ran in
    before = json.loads((SEG / "seg" / "evaluation" / "metrics.json").read_text())
    assert main(["evaluate", str(old_seg / "seg")]) == 0
    after = json.loads((old_seg / "seg" / "evaluation" / "metrics.json").read_text())
    assert after["n_images"] == before["n_images"] == len(_test_rows(old_seg / "seg"))
    # every test image of the fixture holds a lesion and got a prediction: its lesion-image metrics are its old ones
    assert after["lesion_images"] == after["n_images"] and after["metrics"]["hd95_lesion"]["missed"] == 0
    for old, new in (("dice", "dice"), ("dice", "dice_lesion"), ("iou", "iou_lesion"), ("hd95", "hd95_lesion")):
        assert after["metrics"][new]["mean"] == pytest.approx(before["metrics"][old]["mean"], abs=1e-9)


def test_an_old_pretrained_folder_and_its_config_load_under_the_new_names(old_seg: Path) -> None:
    from d2mae.io.artifacts import load_pretrained

    saved = json.loads((SEG / "pt" / "config.json").read_text())
    assert saved["model"]["model"] == "vit_tiny_patch16"  # the old name of the architecture
    mae = load_pretrained(old_seg / "pt")
    assert (mae.config.arch, mae.config.embed_dim, mae.config.depth, mae.config.patch_size) == \
        ("vit_tiny_patch16", 16, 1, 16)


#: where BUS-BRA lay when the keys were recorded: an image's cache key names the image's absolute path (so a stage
#: whose images moved runs again rather than trusting a cache built from other files)
RECORDED_BUSBRA = Path("/work/shared/data/bus-bra")
RECORDED_KEYS = json.loads((FIXTURES / "stage-keys-dbb9461.json").read_text())
del RECORDED_KEYS["busi-seg-cpu"]  # since rewritten for the pyramid decoder at 128 px (issue 34): new stages, new keys


@pytest.mark.parametrize("name", sorted(RECORDED_KEYS))
def test_finished_experiments_keep_their_stage_keys(name: str, monkeypatch) -> None:
    """Every stage of the shipped configs keeps the cache key d2mae wrote before the engine was shared (commit
    dbb9461), so a finished experiment resumes with every stage skipped."""
    from d2mae.experiment.config import load_experiment
    from d2mae.experiment.plan import make_plan
    from tests.conftest import BUSBRA

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    cfg = load_experiment(repo / "configs" / f"{name}.yaml")
    if any(ds.labels for ds in cfg.datasets.values()) and BUSBRA.resolve() != RECORDED_BUSBRA:
        pytest.skip(f"the keys of {name} name BUS-BRA's images at {RECORDED_BUSBRA}; here it lies at {BUSBRA}")
    plan = make_plan(cfg, f"/tmp/base/plan-{name}")  # the folder the keys were recorded with (phantoms lie
    # under it, and the fine-tuning keys name their labels file); nothing is written there
    assert {s.id: s.key for s in plan.stages} == RECORDED_KEYS[name]


def test_a_config_changes_nothing_it_does_not_name(tmp_path: Path) -> None:
    """The shared core's defaults are one set: the segmentation and classification configs agree on every field
    they share."""
    seg, ft = SegmentConfig(), FinetuneConfig()
    for f in dataclasses.fields(DownstreamConfig):
        if f.name != "mode":  # without a pre-trained model a segmenter trains from scratch (docs/segment.md)
            assert getattr(seg, f.name) == getattr(ft, f.name), f.name


def test_every_commands_page_lists_every_option_with_its_default() -> None:
    """docs/<command>.md holds what ``--help-all`` lists (regenerate with ``python docs/options.py``)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "docs" / "options.py"
    spec = importlib.util.spec_from_file_location("docs_options", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.update(check=True) == []

"""Blurriness-aware fine-tuning (Algorithm 1 l. 11-14): t* reaches the classifier, MAE recipe, contract files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2mae.commands.main import main
from d2mae.data.decode import content_hash
from d2mae.eval import obs as eval_obs
from d2mae.io.artifacts import load_classifier, load_pretrained, load_weights, model_sha256
from d2mae.io.obs_table import ObsTable
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurClassifier, build_classifier
from d2mae.runtime.errors import D2maeError
from d2mae.train import engine as ft
from d2mae.train.config import FinetuneConfig
from d2mae.train.optim import make_optimizer, param_groups
from d2mae.train.tasks import Classify
from tests.conftest import TINY
from tests.test_labels import write_labeled
from tests.test_obs import make_pretrained

FAST = ["--epochs", "2", "--batch-size", "8", "--workers", "0", "--warmup-epochs", "1", "--no-progress"]


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    return make_pretrained(tmp_path / "pre"), write_labeled(tmp_path / "d", n=36, size=24)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_blur_token_is_in_the_stem_group_without_weight_decay() -> None:
    model = DeblurClassifier(ModelConfig(**TINY), 2)
    cfg = FinetuneConfig(layer_decay=0.65, weight_decay=0.05)
    groups = param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    where = {names[id(p)]: g for g in groups for p in g["params"]}
    depth = TINY["depth"]
    stem = 0.65 ** (depth + 1)  # MAE: stem at layer_decay^(num_layers + 1), head at 1
    for name in ("encoder.blur_token", "encoder.cls_token", "encoder.pos_embed"):
        assert where[name]["lr_scale"] == pytest.approx(stem), name
        assert where[name]["weight_decay"] == 0.0, name
    assert where["encoder.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(stem)
    assert where["encoder.patch_embed.proj.weight"]["weight_decay"] == 0.05
    assert where["encoder.blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65 ** depth)
    assert where["encoder.blocks.1.mlp.fc1.weight"]["weight_decay"] == 0.05
    assert where["head.weight"]["lr_scale"] == 1.0
    opt = make_optimizer(model, cfg)
    from d2mae.train.optim import warmup_cosine_scheduler

    sched = warmup_cosine_scheduler(opt, 10, 0, 0.0)
    sched.step_update(0)
    lrs = {names[id(g["params"][0])]: g["lr"] for g in opt.param_groups}
    blur_group = next(g for g in opt.param_groups if any(p is model.encoder.blur_token for p in g["params"]))
    assert blur_group["lr"] == pytest.approx(cfg.resolved_lr() * stem)
    assert max(lrs.values()) == pytest.approx(cfg.resolved_lr())


def test_the_classifier_receives_t_star(data, tmp_path: Path, monkeypatch) -> None:
    """Algorithm 1 l. 11-12: every call of f_θ — training steps, validation after each epoch, the final val/test
    predictions — gets each image's own t*; evaluation sees OBS's deterministic view (the same pixels, 1e-6)."""
    from d2mae.data.dataset import center_box, resize_box
    from d2mae.data.decode import load_image

    pre, labels = data
    mae = load_pretrained(pre)
    clf = build_classifier(mae.config, 2, "full", 0.0)
    clf.load_encoder(mae.state_dict())
    clf.head.weight.data.normal_()  # a head that is not ~0, so that logits show the features
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        a, b = clf.eval()(x, torch.tensor([1.0, 1.0])), clf(x, torch.tensor([9.0, 9.0]))
    assert not torch.allclose(a, b)  # changing t* changes the output (blur + BLU(t))

    calls: list[tuple[bool, torch.Tensor, torch.Tensor]] = []
    original = DeblurClassifier.forward

    def spy(self, x, t):
        calls.append((self.training, x.detach().cpu().clone(), t.detach().cpu().clone()))
        return original(self, x, t)

    monkeypatch.setattr(DeblurClassifier, "forward", spy)
    out = tmp_path / "run"
    assert main(["finetune", "--pretrained", str(pre), "--labels", str(labels), "--protocol", "split:3:1:1",
                 "--out", str(out), *FAST, "--epochs", "1"]) == 0
    table = ObsTable.load(out / "obs")
    t_of = dict(zip(table.paths, table.t_star))
    assert len(set(t_of.values())) > 1  # the images do not share one level: a constant t would show
    preds = _rows(out / "predictions.csv")
    evaluated = {r["path"] for r in preds}
    train = [p for p in t_of if p not in evaluated]
    got = sorted(float(v) for training, _, t in calls if training for v in t)
    assert got == sorted(t_of[p] for p in train)  # every training image, once per epoch, at its own t*
    views = {p: torch.from_numpy(resize_box(im, center_box(*im.shape[:2]), 32))
             for p, im in ((p, load_image(p)) for p in evaluated)}
    seen: dict[str, int] = {}
    for training, xs, ts in calls:
        if training:
            continue
        for x_row, t_row in zip(xs, ts):
            match = [p for p, v in views.items() if float((v - x_row).abs().max()) <= 1e-6]
            assert len(match) == 1  # an evaluated row is the deterministic view of exactly one image
            assert float(t_row) == t_of[match[0]]
            seen[match[0]] = seen.get(match[0], 0) + 1
    val = {r["path"] for r in preds if r["split"] == "val"}
    assert set(seen) == evaluated  # validation (each epoch + final) and test, every image
    assert all(seen[p] == 2 for p in val) and all(seen[p] == 1 for p in evaluated - val)
    assert all(float(r["t_star"]) == t_of[r["path"]] for r in preds)


def test_short_finetune_writes_the_contract_files(data, tmp_path: Path, capsys) -> None:
    pre, labels = data
    out = tmp_path / "run"
    args = ["finetune", "--pretrained", str(pre), "--labels", str(labels), "--protocol", "kfold:3", "--folds", "1,3",
            "--out", str(out), "--keep-columns", "group", *FAST]
    assert main(args) == 0
    rows = _rows(out / "predictions.csv")
    assert list(rows[0]) == ["path", "fold", "split", "label", "label_name", "pred", "prob_benign",
                             "prob_malignant", "t_star", "sigma_star", "group"]
    assert {r["fold"] for r in rows} == {"1", "3"} and {r["split"] for r in rows} == {"val", "test"}
    for r in rows:
        assert float(r["prob_benign"]) + float(r["prob_malignant"]) == pytest.approx(1, abs=1e-5)
        assert r["label_name"] == ["benign", "malignant"][int(r["label"])]
    run = json.loads((out / "run.json").read_text())
    assert run["classes"] == ["benign", "malignant"] and run["protocol"] == "kfold:3"
    assert run["folds"] == ["1", "3"] and run["method"] == "d2mae" and run["seed"] == 0
    for k in ("1", "3"):
        lines = [json.loads(x) for x in (out / f"fold_{k}" / "metrics.jsonl").read_text().splitlines()]
        assert [x["epoch"] for x in lines] == [1, 2]
        assert {"train_loss", "val_macro_f1", "lr"} <= set(lines[0])
        assert list((out / "tensorboard" / f"fold_{k}").glob("events.out.tfevents.*"))  # tensorboard: test extra
        model_dir = out / f"fold_{k}" / "model"
        cfg = json.loads((model_dir / "config.json").read_text())
        assert cfg["format"] == "d2mae-classifier" and cfg["format_version"] == 1
        assert cfg["classes"] == ["benign", "malignant"] and cfg["num_classes"] == 2
        assert cfg["obs"]["mode"] == "search" and cfg["finetune"]["mode"] == "full"
        assert cfg["pretrained_sha256"] == model_sha256(pre) == model_sha256(model_dir / "pretrained")
        assert ModelConfig.from_dict(cfg["model"]) == load_pretrained(pre).config
        load_classifier(model_dir)
        assert not (out / f"fold_{k}" / "resume.pt").exists()
    assert (out / "obs" / "obs.csv").is_file() and (out / "finetune.yaml").is_file()
    capsys.readouterr()
    assert main(args) == 2  # the folder holds a run
    assert "option --out: " in (err := capsys.readouterr().err) and "already holds a fine-tuning run; continue it with resume" in err
    before = (out / "fold_1" / "model" / "classifier.safetensors").stat().st_mtime_ns
    assert main(args + ["--resume"]) == 0  # finished folds are skipped
    assert "fold 1: already finished" in capsys.readouterr().err
    assert (out / "fold_1" / "model" / "classifier.safetensors").stat().st_mtime_ns == before
    assert main(args[:-len(FAST)] + [*FAST[:-1], "--resume", "--seed", "5"]) == 2
    assert "settings differ" in capsys.readouterr().err


def test_sigterm_checkpoints_and_resume_equals_an_uninterrupted_run(data, tmp_path: Path, monkeypatch) -> None:
    pre, labels = data
    base = ["finetune", "--pretrained", str(pre), "--labels", str(labels), "--protocol", "split:3:1:1", *FAST,
            "--obs", "fixed:0.5"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    real_save = ft.save_checkpoint

    def save_then_term(state, path):
        real_save(state, path)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives right after epoch 1's checkpoint

    monkeypatch.setattr(ft, "save_checkpoint", save_then_term)
    assert main(base + ["--out", str(tmp_path / "b"), "--checkpoint-every-seconds", "0"]) == 143
    state = torch.load(tmp_path / "b" / "fold_1" / "resume.pt", weights_only=True)
    assert state["epoch"] == 1
    monkeypatch.setattr(ft, "save_checkpoint", real_save)
    assert main(base + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    wa = load_weights(tmp_path / "a" / "fold_1" / "model" / "classifier.safetensors")
    wb = load_weights(tmp_path / "b" / "fold_1" / "model" / "classifier.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = (tmp_path / "a" / "fold_1" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "fold_1" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in ("seconds", "images_per_s")}
                           for x in lines]  # noqa: E731
    assert strip(la) == strip(lb)
    assert {r["t_star"] for r in _rows(tmp_path / "a" / "predictions.csv")} == {"5"}


def test_a_stop_signal_writes_the_resume_state_whatever_the_checkpoint_interval(data, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """Resume states are written at most every checkpoint_every_seconds (default 30 s: short epochs do not pay a
    checkpoint each), but a SIGTERM always writes the last finished epoch's state before the run stops."""
    pre, labels = data
    real_validate = Classify.validate
    written = []
    real_save = ft.save_checkpoint
    monkeypatch.setattr(ft, "save_checkpoint", lambda state, path: (written.append(state["epoch"]),
                                                                    real_save(state, path)))

    calls = []

    def validate_then_term(self, *args, **kwargs):  # noqa: ANN001
        calls.append(1)
        if len(calls) == 2:  # during epoch 2's validation
            os.kill(os.getpid(), signal.SIGTERM)
        return real_validate(self, *args, **kwargs)

    monkeypatch.setattr(Classify, "validate", validate_then_term)
    out = tmp_path / "run"
    assert main(["finetune", "--pretrained", str(pre), "--labels", str(labels), "--protocol", "split:3:1:1", *FAST,
                 "--obs", "none", "--out", str(out), "--epochs", "4", "--checkpoint-every-seconds", "3600"]) == 143
    assert written == [2]  # no epoch-end checkpoint before the signal; then exactly the state it stopped at
    assert torch.load(out / "fold_1" / "resume.pt", weights_only=True)["epoch"] == 2


def test_a_stop_signal_mid_epoch_keeps_the_last_finished_epoch(data, tmp_path: Path, monkeypatch) -> None:
    """SIGTERM in the middle of epoch 3, with no checkpoint written since the start (interval 3600 s): resume.pt
    holds epoch 2's state (kept in memory until then), and resuming ends with the weights of an uninterrupted run."""
    pre, labels = data
    base = ["finetune", "--pretrained", str(pre), "--labels", str(labels), "--protocol", "split:3:1:1", *FAST,
            "--obs", "none", "--epochs", "4", "--checkpoint-every-seconds", "3600"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    real_validate, real_step = Classify.validate, ft.FoldTrainer.train_step
    validated, stepped_after = [], []

    def validate(self, *args, **kwargs):  # noqa: ANN001
        validated.append(1)
        return real_validate(self, *args, **kwargs)

    def step(self, *args, **kwargs):  # noqa: ANN001
        if len(validated) == 2:
            stepped_after.append(1)
            if len(stepped_after) == 1:  # epoch 3's first step: the signal arrives mid-epoch
                os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Classify, "validate", validate)
    monkeypatch.setattr(ft.FoldTrainer, "train_step", step)
    assert main(base + ["--out", str(tmp_path / "b")]) == 143
    assert torch.load(tmp_path / "b" / "fold_1" / "resume.pt", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(Classify, "validate", real_validate)
    monkeypatch.setattr(ft.FoldTrainer, "train_step", real_step)
    assert main(base + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    wa = load_weights(tmp_path / "a" / "fold_1" / "model" / "classifier.safetensors")
    wb = load_weights(tmp_path / "b" / "fold_1" / "model" / "classifier.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("mode,extra", [("linear", []), ("scratch", ["--obs", "none"]),
                                        ("full", ["--mixup", "0.8", "--cutmix", "1.0", "--balance", "sampler"]),
                                        ("full", ["--balance", "loss", "--obs", "none"])])
def test_modes_and_options_run(data, tmp_path: Path, mode: str, extra: list[str]) -> None:
    pre, labels = data
    out = tmp_path / "run"
    assert main(["finetune", "--pretrained", str(pre), "--labels", str(labels), "--out", str(out), "--mode", mode,
                 *FAST, "--epochs", "1", *extra]) == 0
    run = json.loads((out / "run.json").read_text())
    state = load_weights(out / "fold_1" / "model" / "classifier.safetensors")
    mae = load_weights(pre / "model.safetensors")
    if mode == "linear":
        assert "head.0.running_mean" in state and run["method"] == "d2mae-linear"
        assert torch.equal(state["encoder.blocks.0.attn.qkv.weight"], mae["encoder.blocks.0.attn.qkv.weight"])
    if mode == "scratch":
        assert run["method"] == "scratch" and not (out / "fold_1" / "model" / "pretrained").exists()
        assert not torch.allclose(state["encoder.blocks.0.attn.qkv.weight"], mae["encoder.blocks.0.attn.qkv.weight"])
    if "none" in extra:
        assert {r["t_star"] for r in _rows(out / "predictions.csv")} == {"0"}


def test_leak_guard_and_duplicates_across_splits(data, tmp_path: Path, capsys) -> None:
    pre, labels = data
    rows = _rows(labels)
    root = labels.parent
    shutil.copyfile(root / rows[0]["path"], root / "img" / "copy.png")  # same content, another name
    split = ["train" if i % 5 > 1 else "val" if i % 5 == 1 else "test" for i in range(len(rows))]
    split[0] = "train"
    rows.append({"path": "img/copy.png", "label": rows[0]["label"], "group": "other"})
    split.append("test")
    with (root / "split.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "group", "split"])
        w.writeheader()
        w.writerows({**r, "split": s} for r, s in zip(rows, split))
    leaky = tmp_path / "leaky"
    shutil.copytree(pre, leaky)
    test_img = root / rows[5]["path"]  # split "test"
    (leaky / "pretrain_hashes.txt").write_text(f"{content_hash(test_img)}  {test_img}\n")
    args = ["finetune", "--pretrained", str(leaky), "--labels", str(root / "split.csv"), "--protocol", "csv", *FAST,
            "--epochs", "1", "--obs", "none"]
    with pytest.warns(UserWarning, match="possible data leak"):
        assert main(args + ["--out", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "leak_pretraining.txt").read_text().strip() == str(test_img.absolute())
    assert "copy.png" in (tmp_path / "w" / "duplicates_across_splits.txt").read_text()
    run = json.loads((tmp_path / "w" / "run.json").read_text())
    assert run["leak_check"]["test_in_pretraining"] == 1 and run["leak_check"]["duplicates_across_splits"] == 1
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "s"), "--strict"]) == 2
    assert "option --strict: data leak: 1 of the" in capsys.readouterr().err


def test_bad_inputs_fail_before_training(data, tmp_path: Path, capsys) -> None:
    pre, labels = data
    common = ["--labels", str(labels), "--out", str(tmp_path / "o"), *FAST]

    def error(*args: str) -> str:
        assert main(["finetune", *args]) == 2
        assert not (tmp_path / "o" / "fold_1").exists()
        return capsys.readouterr().err

    assert "does not exist" in error("--pretrained", str(tmp_path / "missing"), *common)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(pre, incomplete)
    (incomplete / "model.safetensors").unlink()
    assert "model.safetensors does not exist" in error("--pretrained", str(incomplete), *common)
    other = tmp_path / "other"
    shutil.copytree(pre, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model"]["depth"] = 3
    (other / "config.json").write_text(json.dumps(cfg))
    assert "weights do not match the architecture" in error("--pretrained", str(other), *common)
    assert "option --pretrained: is required for mode full" in error(*common)
    assert "outside the model's blur schedule" in error("--pretrained", str(pre), *common, "--obs", "fixed:1.7")
    assert "no column 'Device'" in error("--pretrained", str(pre), *common, "--keep-columns", "Device")
    stale = make_pretrained(tmp_path / "stale_pre", seed=3)
    from d2mae.eval.obs import run_obs
    from d2mae.io.artifacts import model_sha256

    refs = [str((labels.parent / r["path"]).absolute()) for r in _rows(labels)]
    run_obs(load_pretrained(stale), refs, model_hash=model_sha256(stale), progress=False).save(tmp_path / "t")
    assert "another pre-trained model" in error("--pretrained", str(pre), *common, "--obs-table",
                                                str(tmp_path / "t" / "obs.csv"))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(labels.parent / "img" / "im005.png")
    assert "im005.png is 8x8 pixels" in error("--pretrained", str(pre), *common)
    with pytest.raises(D2maeError, match="batch_size: must be even with Mixup/CutMix, got 7"):
        FinetuneConfig(batch_size=7, mixup=0.8)


def test_finetune_reuses_an_obs_table_instead_of_searching(data, tmp_path: Path, capsys) -> None:
    pre, labels = data
    assert main(["obs", "--pretrained", str(pre), "--labels", str(labels), "--out", str(tmp_path / "obs"),
                 "--workers", "0", "--strips", "0"]) == 0
    table = ObsTable.load(tmp_path / "obs")
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["finetune", "--pretrained", str(pre), "--labels", str(labels), "--out", str(out), *FAST,
                 "--epochs", "1", "--obs-table", str(tmp_path / "obs" / "obs.csv")]) == 0
    assert "OBS search" not in capsys.readouterr().err  # no second search
    assert json.loads((out / "run.json").read_text())["obs_seconds"] == 0
    t_of = dict(zip(table.paths, table.t_star))
    assert all(float(r["t_star"]) == t_of[r["path"]] for r in _rows(out / "predictions.csv"))


def test_scratch_without_a_pretrained_folder(data, tmp_path: Path) -> None:
    _, labels = data
    out = tmp_path / "run"
    assert main(["finetune", "--mode", "scratch", "--arch", "vit_tiny_patch16", "--img-size", "16", "--labels",
                 str(labels), "--out", str(out), *FAST, "--epochs", "1", "--obs", "none"]) == 0
    cfg = json.loads((out / "fold_1" / "model" / "config.json").read_text())
    assert cfg["model"]["img_size"] == 16 and cfg["model"]["blur"] is False and cfg["pretrained_sha256"] is None
    assert cfg["model"]["mean"] is not None  # normalised with the training images' own statistics
    rows = _rows(out / "predictions.csv")
    assert {r["t_star"] for r in rows} == {"0"}


def test_obs_runs_once_per_finetuning_not_per_epoch(data, tmp_path: Path, monkeypatch) -> None:
    """Section 2.3: the OBS procedure is executed only once, not at every fine-tuning epoch (nor per fold)."""
    pre, labels = data
    calls: list[int] = []
    original = eval_obs.run_obs
    monkeypatch.setattr(eval_obs, "run_obs", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert main(["finetune", "--pretrained", str(pre), "--labels", str(labels), "--protocol", "kfold:3",
                 "--folds", "1,2", "--out", str(tmp_path / "run"), *FAST]) == 0
    assert len(calls) == 1


def test_train_step_is_algorithm_1_lines_11_to_14(data) -> None:
    """FoldTrainer.train_step, called directly: the classifier receives each image's t* (line 11's blur level and
    line 12's token), the loss is the cross-entropy of those logits (line 13), and the weights move (line 14)."""
    from torch import nn

    from d2mae.train.engine import FoldTrainer
    from d2mae.train.optim import warmup_cosine_scheduler

    pre, _ = data
    mae = load_pretrained(pre)
    clf = build_classifier(mae.config, 2, "full", 0.0)
    clf.load_encoder(mae.state_dict())
    seen: list[torch.Tensor] = []
    clf.encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[1].detach().clone()))
    optimizer = torch.optim.SGD(clf.parameters(), lr=0.1)
    trainer = FoldTrainer(clf, optimizer, warmup_cosine_scheduler(optimizer, 10, 0, 0.0), nn.CrossEntropyLoss(),
                          torch.device("cpu"))
    x, y, t = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 1, 0]), torch.tensor([1.0, 5.0, 9.0, 11.0])
    clf.train()
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(clf(x, t), y))
    seen.clear()
    head = clf.head.weight.detach().clone()
    result = trainer.train_step(x, y, t, step_images=4)
    assert [s.tolist() for s in seen] == [t.tolist()]  # one forward pass, at each image's own t*
    assert result.finite and not result.stop and trainer.step == 1
    assert result.loss == pytest.approx(expected, abs=1e-5)
    assert not torch.equal(head, clf.head.weight)


def test_validate_selects_by_the_macro_f1_evaluate_reports(data, tmp_path: Path) -> None:
    """The classification task's validation scores the validation images with d2mae.metrics.macro_f1 (the classes
    present in the labels or predictions), the rule evaluation uses, on their deterministic view at their t*."""
    from types import SimpleNamespace

    from d2mae.data.folds import Fold
    from d2mae.eval.infer import class_probabilities
    from d2mae.eval.metrics import macro_f1
    from d2mae.runtime.distributed import DistContext

    pre, labels = data
    mae = load_pretrained(pre)
    clf = build_classifier(mae.config, 3, "full", 0.0)  # three classes, the validation part has two
    clf.load_encoder(mae.state_dict())
    torch.nn.init.normal_(clf.head.weight)
    rows = _rows(labels)[:12]
    refs = [str((labels.parent / r["path"]).absolute()) for r in rows]
    y = np.array([int(r["label"] == "malignant") for r in rows])
    t = np.linspace(1, 11, len(refs))
    run = SimpleNamespace(labeled=SimpleNamespace(refs=refs, labels=y), t_star=t, device=torch.device("cpu"),
                          ctx=DistContext())
    fold = Fold("1", np.arange(0), np.arange(len(refs)), np.arange(0))
    v = Classify(FinetuneConfig(workers=0)).validate(run, clf, fold)
    pred = class_probabilities(clf, refs, t, torch.device("cpu")).argmax(axis=1)
    assert v["val_macro_f1"] == pytest.approx(macro_f1(y, pred))
    assert v["val_accuracy"] == pytest.approx(float(np.mean(pred == y)))


def test_resume_keeps_what_changes_results_and_may_change_the_rest(data, tmp_path: Path, capsys) -> None:
    """One rule for resuming (train/resume.py): options that change results must stay (the epochs, the pre-trained
    model's weights), volatile ones may change (workers, progress)."""
    pre, labels = data
    args = ["finetune", "--pretrained", str(pre), "--labels", str(labels), "--out", str(tmp_path / "run"), *FAST,
            "--epochs", "1", "--obs", "none"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--resume", "--epochs", "2"]) == 2
    assert "cannot resume" in (err := capsys.readouterr().err) and "epochs: 1 → 2" in err
    other = make_pretrained(tmp_path / "other", seed=7)
    moved = [a if a != str(pre) else str(other) for a in args]
    assert main([*moved, "--resume"]) == 2
    assert "pre-trained model sha256" in capsys.readouterr().err
    assert main([*args, "--resume", "--workers", "1", "--progress"]) == 0  # volatile: allowed

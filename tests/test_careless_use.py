"""Careless and hostile use: one writer per output folder, disks that fail, options and artefact fields outside
their domain, weights with NaN, labels that would lose or double data, error messages that could explode.

Each test reproduces one class of failure seen when ~110 bad inputs went at the command line; docs/bad-inputs.md
names them. Every failure must be one line on stderr, exit status 2, before any work, and leave no artefact that looks
complete.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch

from d2mae.commands import main as cli
from d2mae.data.phantom import generate_phantoms
from d2mae.io.artifacts import WEIGHTS, load_weights, save_weights
from d2mae.runtime import locks
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.locks import LOCK_NAME
from tests.conftest import REPO

TINY_FLAGS = ["--arch", "vit_tiny_patch16", "--img-size", "32", "--depth", "2", "--embed-dim", "64", "--num-heads",
              "2", "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ph")
    generate_phantoms(out, n=24, size=40, seed=0)
    return out


@pytest.fixture(scope="module")
def pretrained(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pt") / "run"
    assert cli.main(pretrain_args(phantoms, out, epochs=1)) == 0
    return out


def pretrain_args(phantoms: Path, out: Path, epochs: int = 1, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(phantoms / "images"), "--out", str(out), *TINY_FLAGS, "--batch-size", "4",
            "--epochs", str(epochs), "--warmup-epochs", "0", "--tensorboard", "off", "--num-workers", "0",
            "--log-every-steps", "1", *extra]


def finetune_args(phantoms: Path, pretrained: Path, out: Path) -> list[str]:
    return ["finetune", "--pretrained", str(pretrained), "--labels", str(phantoms / "labels.csv"), "--out", str(out),
            "--protocol", "split:3:1:1", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--tensorboard", "off",
            "--no-progress"]


def one_error_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "error:" in line]  # progress lines may come before it
    assert len(lines) == 1 and err.endswith(lines[0]) and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "d2mae", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{path} did not appear")


# ------------------------------------------------------------------------------------- 1. one writer per folder


def test_two_pretrain_runs_into_one_folder_exactly_one_proceeds(phantoms, tmp_path):
    out = tmp_path / "shared"
    first = start(pretrain_args(phantoms, out, 5000))  # runs until SIGTERM below
    wait_for(out / "metrics.jsonl", first)  # it holds the lock and is training
    second = start(pretrain_args(phantoms, out, 1))
    _, err = second.communicate(timeout=120)
    resumed = start(pretrain_args(phantoms, out, 5000, "--resume", "auto"))  # a second --resume while it runs
    _, err_resume = resumed.communicate(timeout=120)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert second.returncode == 2 and resumed.returncode == 2
    for text in (err, err_resume):
        errors = [line for line in text.splitlines() if "error:" in line]
        assert len(errors) == 1 and LOCK_NAME in errors[0] and "in use by another d2mae pretrain" in errors[0], text
        assert "Traceback" not in text
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None
    assert config is None or config["extra"]["pretrain"]["images"] == 24  # only the first run's images


def test_the_lock_of_a_killed_run_is_taken_over(phantoms, tmp_path):
    out = tmp_path / "killed"
    proc = start(pretrain_args(phantoms, out, 30))
    wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert (out / LOCK_NAME).is_file()  # left behind
    resumed = start(pretrain_args(phantoms, out, 2, "--resume", "auto"))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "taking over the lock" in err and not (out / LOCK_NAME).exists()


def test_a_lock_held_by_this_process_nests_and_another_host_is_refused(tmp_path):
    path = locks.acquire(tmp_path, "experiment")
    assert locks.acquire(tmp_path, "pretrain") == path  # an experiment's own stage
    locks.release(path)
    assert path.exists()
    locks.release(path)
    assert not path.exists()
    path.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "command": "finetune"}))
    with pytest.raises(D2maeError, match="on host elsewhere"):
        locks.acquire(tmp_path, "finetune")


# ------------------------------------------------------------------------------------------ 2. disks that fail


def test_out_below_a_regular_file_is_one_line(phantoms, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(pretrain_args(phantoms, tmp_path / "file" / "out")) == 2
    one_error_line(capsys, "--out", "not a folder")


@pytest.mark.parametrize("command", ["pretrain", "obs", "finetune", "export"])
def test_a_read_only_output_is_one_line_before_any_work(phantoms, pretrained, tmp_path, capsys, monkeypatch,
                                                       command):
    real_open = open

    def read_only(file, mode="r", *args, **kwargs):  # noqa: ANN001
        if ".d2mae-probe" in str(file) and "w" in mode:
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    out = tmp_path / "ro"
    argv = {"pretrain": pretrain_args(phantoms, out),
            "obs": ["obs", "--pretrained", str(pretrained), "--data", str(phantoms / "images"), "--out", str(out)],
            "finetune": finetune_args(phantoms, pretrained, out),
            "export": ["export", "--pretrained", str(pretrained), "--out", str(out)]}[command]
    assert cli.main(argv) == 2
    one_error_line(capsys, "--out", "cannot be written", "read-only")
    assert not [p for p in out.iterdir() if not p.name.startswith(".")] if out.exists() else True


def test_a_real_read_only_file_system(phantoms, tmp_path, capsys):
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        assert cli.main(pretrain_args(phantoms, mount / "out")) == 2
        one_error_line(capsys, "--out", "read-only")
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_at_the_final_save_is_one_line_and_no_complete_looking_folder(phantoms, tmp_path, capsys,
                                                                                  monkeypatch):
    def full(path, data):  # noqa: ANN001
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("d2mae.io.artifacts.atomic_write_bytes", full)  # the weights of save_pretrained
    out = tmp_path / "full"
    assert cli.main(pretrain_args(phantoms, out)) == 2
    one_error_line(capsys, "No space left on device", "disk is full", str(out / WEIGHTS))
    assert not (out / "config.json").exists()  # config.json is what makes a pre-trained folder valid


# ---------------------------------------------------------------------------------------- 3. outputs checked first


def test_predict_out_is_checked_before_any_image_is_classified(phantoms, pretrained, tmp_path, capsys,
                                                              monkeypatch):
    calls = []
    monkeypatch.setattr("d2mae.commands.predict.predict", lambda *a, **k: calls.append(1))
    (tmp_path / "folder").mkdir()
    assert cli.main(["predict", "--model", str(pretrained), str(phantoms / "images"), "--out",
                     str(tmp_path / "folder")]) == 2
    one_error_line(capsys, "--out", "is a folder; give a file name")
    (tmp_path / "file").write_text("x")
    assert cli.main(["predict", "--model", str(pretrained), str(phantoms / "images"), "--out",
                     str(tmp_path / "file" / "p.csv")]) == 2
    one_error_line(capsys, "--out", "not a folder")
    assert not calls


def test_export_refuses_a_folder_of_other_files_unless_forced(pretrained, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the user's own weights")
    assert cli.main(["export", "--pretrained", str(pretrained), "--out", str(out)]) == 2
    one_error_line(capsys, "--out", "files d2mae did not write", "--force")
    assert cli.main(["export", "--pretrained", str(pretrained), "--out", str(out), "--force"]) == 2  # never over it
    one_error_line(capsys, "model.safetensors", "d2mae did not write")
    assert (out / "model.safetensors").read_bytes() == b"the user's own weights"
    (out / "model.safetensors").rename(tmp_path / "kept.safetensors")
    (out / "notes.txt").write_text("mine")  # beside the export, with --force
    assert cli.main(["export", "--pretrained", str(pretrained), "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert cli.main(["export", "--pretrained", str(pretrained), "--out", str(out)]) == 2  # an earlier export: kept
    one_error_line(capsys, "--out", "earlier output of d2mae export", "--force")
    assert cli.main(["export", "--pretrained", str(pretrained), "--out", str(out), "--force"]) == 0  # replaced


# ------------------------------------------------------------------------------------------- 4. option domains


@pytest.mark.parametrize("flags, option", [
    (["--decoder-embed-dim", "0"], "--decoder-embed-dim"), (["--decoder-num-heads", "0"], "--decoder-num-heads"),
    (["--decoder-embed-dim", "-8"], "--decoder-embed-dim"), (["--patch-size", "0"], "--patch-size"),
    (["--depth", "0"], "--depth"), (["--embed-dim", "0"], "--embed-dim"), (["--mask-ratio", "0.99"], "--mask-ratio"),
    (["--moco-temperature", "0"], "--moco-temperature"), (["--diffusion-steps", "0"], "--diffusion-steps"),
])
def test_every_architecture_option_is_range_checked(phantoms, tmp_path, capsys, flags, option):
    assert cli.main(pretrain_args(phantoms, tmp_path / "o") + flags) == 2
    one_error_line(capsys, option)
    assert not (tmp_path / "o" / "config.json").exists()


def test_every_numeric_option_of_every_command_declares_its_domain():
    from d2mae.data.phantom import PhantomConfig
    from d2mae.eval.evaluate import CompareConfig, EvaluateConfig
    from d2mae.eval.obs import ObsConfig
    from d2mae.eval.predict import PredictConfig
    from d2mae.experiment.config import BudgetSpec, ReportSpec
    from d2mae.io.export import ExportConfig
    from d2mae.method.backbones import BackboneConfig
    from d2mae.method.model_config import ModelConfig
    from d2mae.runtime.options import _describe
    from d2mae.train.config import FinetuneConfig, SegmentConfig
    from d2mae.train.pretrain_config import PretrainConfig
    from d2mae.train.probe import ProbeConfig

    missing = []
    for cls in (ModelConfig, PretrainConfig, FinetuneConfig, ObsConfig, PredictConfig, EvaluateConfig,
                CompareConfig, ExportConfig, PhantomConfig, BackboneConfig, BudgetSpec, ReportSpec, SegmentConfig,
                ProbeConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _describe(hints[f.name])[1] in (int, float) and not any(
                    k in f.metadata for k in ("min", "max", "above", "below", "choices")):
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing


def test_a_saved_config_json_outside_the_domain_is_refused(pretrained, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pretrained, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model"]["depth"] = 0
    (bad / "config.json").write_text(json.dumps(config))
    assert cli.main(["export", "--pretrained", str(bad), "--out", str(tmp_path / "e")]) == 2
    one_error_line(capsys, "config.json", "depth")


# -------------------------------------------------------------------------------------------- 5. bad weights


@pytest.mark.parametrize("tensor, command", [("decoder_pred.weight", "obs"), ("encoder.blocks.0.attn.qkv.weight",
                                                                              "finetune")])
def test_nan_in_a_weight_is_named_when_loaded(phantoms, pretrained, tmp_path, capsys, tensor, command):
    import shutil

    bad = tmp_path / "nan"
    shutil.copytree(pretrained, bad)
    state = load_weights(bad / WEIGHTS)
    state[tensor][0, 0] = float("nan")
    save_weights(state, bad / WEIGHTS)
    argv = (["obs", "--pretrained", str(bad), "--data", str(phantoms / "images"), "--out", str(tmp_path / "o")]
            if command == "obs" else finetune_args(phantoms, bad, tmp_path / "o"))
    assert cli.main(argv) == 2
    one_error_line(capsys, f"tensor {tensor}", "NaN")


def test_obs_losses_that_are_not_finite_stop_the_search(phantoms, pretrained, tmp_path, capsys, monkeypatch):
    import d2mae.eval.obs as obs

    monkeypatch.setattr(obs, "search_losses", lambda model, x, levels, max_rows: torch.full(
        (x.shape[0], len(levels)), float("nan")))
    assert cli.main(["obs", "--pretrained", str(pretrained), "--data", str(phantoms / "images"), "--out",
                     str(tmp_path / "o")]) == 2
    one_error_line(capsys, "NaN or infinite", "phantom_")
    assert not (tmp_path / "o" / "obs.csv").exists()


# ------------------------------------------------------------------------------------------------ 6. labels


def test_one_image_under_two_spellings_is_refused(phantoms, tmp_path):
    from d2mae.data.labels import load_labeled

    csv = tmp_path / "labels.csv"
    csv.write_text(f"path,label\n{phantoms}/images/phantom_00.png,benign\n{phantoms}/images/./phantom_00.png,"
                   f"malignant\n{phantoms}/images/phantom_01.png,benign\n")
    with pytest.raises(D2maeError, match="more than once, 1 of them with different labels"):
        load_labeled(csv)


def test_an_empty_class_folder_is_named(phantoms, tmp_path):
    from d2mae.data.folds import make_folds
    from d2mae.data.labels import load_labeled

    tree = tmp_path / "tree"
    for name in ("benign", "malignant"):
        (tree / name).mkdir(parents=True)
    for i in range(4):
        (tree / "benign" / f"{i}.png").write_bytes((phantoms / "images" / f"phantom_{i:02d}.png").read_bytes())
    with pytest.raises(D2maeError, match="'malignant' hold no images"):
        load_labeled(tree)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"{phantoms}/images/phantom_{i:02d}.png,{'ab'[i % 2]}\n"
                                            for i in range(12)))
    labeled = load_labeled(csv, classes=["a", "b", "c"])
    with pytest.raises(D2maeError, match="class 'c' has no images") as err:
        make_folds(labeled, "kfold:3", 0)
    assert "≤ 0" not in str(err.value)


# ----------------------------------------------------------------------------------------- 7. capped messages


def test_a_yaml_alias_bomb_is_refused_fast_with_a_short_message(tmp_path, capsys):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    lines.append("epochs: *i")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert len(path.read_bytes()) < 400
    t0 = time.perf_counter()
    assert cli.main(["pretrain", "--config", str(path), "--data", "x", "--out", str(tmp_path / "o")]) == 2
    assert time.perf_counter() - t0 < 5
    line = one_error_line(capsys, "bomb.yaml", "aliases")
    assert len(line) < 300


def test_a_huge_value_is_quoted_short():
    from d2mae.runtime.options import coerce

    with pytest.raises(D2maeError) as err:
        coerce(["x" * 10**6] * 1000, int, "epochs", "cfg.yaml")
    assert len(str(err.value)) < 200

"""Nothing read from disk is trusted (issue 24, docs/bad-inputs.md): a shard index is checked field by field and its
members' bytes against their hashes; a resume state that cannot be read is explained in d2mae's words."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from d2mae.commands.main import main
from d2mae.data.phantom import generate_phantoms
from d2mae.data.shard_writer import ShardsConfig, make_shards
from d2mae.data.shards import INDEX, ShardSet, split_member
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import load_checkpoint

TINY_FLAGS = ["--arch", "vit_tiny_patch16", "--img-size", "32", "--embed-dim", "16", "--depth", "1", "--num-heads",
              "2", "--decoder-embed-dim", "16", "--decoder-depth", "1", "--decoder-num-heads", "2", "--epochs", "1",
              "--batch-size", "4", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    generate_phantoms(root / "ph", n=12, size=32, seed=5)
    make_shards(ShardsConfig(sources=[str(root / "ph" / "images")], out=str(root / "shards"), shard_size=6,
                             progress=False))
    return root / "shards"


def _edited(shard_set: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shard_set, copy)
    index = json.loads((copy / INDEX).read_text())
    edit(index)
    (copy / INDEX).write_text(json.dumps(index))
    return copy


@pytest.mark.parametrize("edit, words", [
    (lambda ix: ix["shards"][0].update(file="../outside.tar"), r"'shards\[0\]\.file'.*not a file inside"),
    (lambda ix: ix["shards"][0].update(file="/etc/hostname"), r"'shards\[0\]\.file'.*not a file inside"),
    (lambda ix: ix["shards"][1]["samples"][2].update(offset="512"), r"'shards\[1\]\.samples\[2\]\.offset' must be an integer"),
    (lambda ix: ix["shards"][0]["samples"][0].update(offset=10**9), r"does not lie inside"),
    (lambda ix: ix["shards"][0]["samples"][1].pop("sha256"), r"'shards\[0\]\.samples\[1\]\.sha256' is missing"),
    (lambda ix: ix["shards"][0]["samples"][1].update(sha256="abc"), r"64 hexadecimal digits"),
    (lambda ix: ix["shards"][0]["samples"][1].update(height=True), r"samples\[1\]\.height' must be an integer"),
    (lambda ix: ix.update(count=99), r"'count' is 99 but the shards list 12 images"),
    (lambda ix: ix.pop("shards"), r"'shards' is missing"),
])
def test_every_field_of_a_shard_index_is_checked(shard_set, tmp_path, edit, words) -> None:
    (tmp_path / "outside.tar").write_bytes(b"x" * 4096)
    with pytest.raises(D2maeError, match=words):
        ShardSet.open(_edited(shard_set, tmp_path, edit))


def test_a_member_whose_bytes_differ_from_the_index_is_refused_before_training(shard_set, tmp_path, capsys) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(shard_set, copy)
    shard, offset, size, name = split_member(ShardSet.open(copy).refs[3])
    data = bytearray(Path(shard).read_bytes())
    data[offset + size - 20] ^= 0xFF  # one byte of the member's PNG data, same size
    Path(shard).write_bytes(bytes(data))
    code = main(["pretrain", "--data", str(copy), "--out", str(tmp_path / "pt"), *TINY_FLAGS])
    err = capsys.readouterr().err
    assert code == 2 and name in err and "does not match its sha256" in err
    assert not (tmp_path / "pt" / "model.safetensors").exists()


class _RunsCode:
    def __reduce__(self):
        return (print, ("unsafe",))


def test_an_unreadable_resume_state_is_explained_in_d2maes_words(tmp_path) -> None:
    unsafe, damaged = tmp_path / "unsafe.pt", tmp_path / "damaged.pt"
    torch.save({"model": {}, "x": _RunsCode()}, unsafe)
    damaged.write_bytes(b"\x80\x02 not a checkpoint")
    for path in (unsafe, damaged):
        for given, todo in ((True, "give the resume.pt of a d2mae run"), (False, "delete it to start this run over")):
            with pytest.raises(D2maeError) as exc:
                load_checkpoint(path, given=given)
            text = str(exc.value)
            assert str(path) in text and todo in text
            assert "weights_only" not in text and "torch.load" not in text  # never torch's advice
    with pytest.raises(D2maeError, match="cannot be read safely"):
        load_checkpoint(unsafe)
    with pytest.raises(D2maeError, match="damaged or not a checkpoint"):
        load_checkpoint(damaged)


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run-0.2.0"
FT = ["--epochs", "1", "--batch-size", "8", "--warmup-epochs", "0", "--workers", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture
def labeled(tmp_path) -> Path:
    """The 24 fixture phantoms and their labels, copied (the tests change them)."""
    shutil.copytree(FIXTURE / "ph", tmp_path / "ph")
    shutil.copytree(FIXTURE / "pt", tmp_path / "pt")
    return tmp_path


def test_paths_outside_the_image_root_are_refused_unless_allowed(labeled, capsys) -> None:
    csv = labeled / "ph" / "labels.csv"
    rows = csv.read_text().splitlines()
    (labeled / "other").mkdir()
    (labeled / "other" / "elsewhere.png").write_bytes((labeled / "ph" / "images" / "phantom_00.png").read_bytes())
    rows[1] = rows[1].replace("images/phantom_00.png", "../other/elsewhere.png")
    csv.write_text("\n".join(rows) + "\n")
    args = ["finetune", "--pretrained", str(labeled / "pt"), "--labels", str(csv), "--image-root", str(labeled / "ph"),
            *FT]
    assert main(args + ["--out", str(labeled / "ft")]) == 2
    err = capsys.readouterr().err
    assert "lead outside" in err and "../other/elsewhere.png" in err and "--allow-outside-root" in err
    assert main(args + ["--out", str(labeled / "ft2"), "--allow-outside-root"]) == 0


def test_resume_refuses_an_image_whose_content_changed(labeled, capsys) -> None:
    csv = labeled / "ph" / "labels.csv"
    args = ["finetune", "--pretrained", str(labeled / "pt"), "--labels", str(csv), "--out", str(labeled / "ft"), *FT]
    assert main(args) == 0
    image = labeled / "ph" / "images" / "phantom_05.png"
    from PIL import Image

    Image.new("L", (32, 32), 7).save(image)  # same path, other pixels
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "phantom_05.png" in err and "changed since this run started" in err
    pt = ["pretrain", "--data", str(labeled / "ph" / "images"), "--out", str(labeled / "pt2"), *TINY_FLAGS]
    assert main(pt) == 0
    Image.new("L", (32, 32), 9).save(image)
    assert main(pt + ["--resume"]) == 2
    assert "phantom_05.png" in capsys.readouterr().err


@pytest.mark.parametrize("kind, words", [("pickle", "holds pickled Python objects"), ("bytes", "not a readable PyTorch weights file"),
                                         ("architecture", "knows")])
def test_an_experiment_checks_every_methods_weights_before_any_stage(tmp_path, capsys, kind, words) -> None:
    """mae-imagenet comes after d2mae in run order; its bad weights file stops the experiment before d2mae is
    pre-trained (no stage folder is made)."""
    import timm
    import yaml

    from tests.test_experiment import MICRO

    weights = tmp_path / "mae.pth"
    if kind == "pickle":
        torch.save({"model": {}, "x": _RunsCode()}, weights)
    elif kind == "bytes":
        weights.write_bytes(b"\x00\x13 random bytes" * 50)
    else:  # a ViT 64 wide with 3 blocks: no architecture d2mae knows
        vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, embed_dim=64, depth=3, num_heads=2)
        torch.save({"model": vit.state_dict()}, weights)
    data = dict(MICRO, methods=["d2mae", "mae-imagenet"], weights={"mae-imagenet": str(weights)})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["experiment", str(tmp_path / "c.yaml"), "--out", str(out), "--no-estimate"]) == 2
    err = capsys.readouterr().err
    assert "mae-imagenet" in err and str(weights) in err and words in err and "nothing was trained" in err
    assert not (out / "pretrained").exists() and not (out / "runs").exists()


@pytest.mark.parametrize("value, words", [("big", "'img_size' must be an integer, got 'big'"),
                                          ("32", "'img_size' must be an integer, got '32'"),
                                          (None, "'img_size' must be an integer, got null")])
def test_a_saved_config_with_a_wrong_type_names_the_file_and_the_key(labeled, capsys, value, words) -> None:
    config = labeled / "pt" / "config.json"
    data = json.loads(config.read_text())
    data["model"]["img_size"] = value
    config.write_text(json.dumps(data))
    assert main(["obs", "--pretrained", str(labeled / "pt"), "--data", str(labeled / "ph" / "images"), "--out",
                 str(labeled / "obs"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and words in err and "Traceback" not in err


def test_each_missing_file_of_a_fine_tuned_run_is_named(tmp_path, capsys) -> None:
    shutil.copytree(FIXTURE, tmp_path / "old")
    run, image = tmp_path / "old" / "ft", str(tmp_path / "old" / "ph" / "images" / "phantom_00.png")
    (run / "fold_1" / "model" / "pretrained" / "model.safetensors").unlink()
    assert main(["predict", "--model", str(run), image, "--device", "cpu", "--workers", "0"]) == 2
    assert "is missing" in (err := capsys.readouterr().err) and "pretrained/model.safetensors" in err
    (run / "fold_1" / "model" / "config.json").unlink()
    assert main(["predict", "--model", str(run), image, "--device", "cpu", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "fold_1/model/config.json is missing" in err and "finish the run" not in err


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch) -> None:
    from d2mae.runtime import files
    from d2mae.runtime.errors import os_error_message

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    target = tmp_path / "out" / "metrics.json"
    with pytest.raises(OSError) as exc:
        files.atomic_write_text(target, "{}")
    assert str(target) in os_error_message(exc.value) and "No space left on device" in os_error_message(exc.value)
    assert not list((tmp_path / "out").iterdir())  # no temp file left behind


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["obs_json"].update(search_step="two"), r"obs.json: 'search_step' must be an integer, got 'two'"),
    (lambda d: d["obs_json"].update(model_sha256=7), r"obs.json: 'model_sha256' must be a string"),
    (lambda d: d["run_json"].update(folds=3), r"run.json: 'folds' must be a list of folds, got 3"),
    (lambda d: d["run_json"].update(seed="0"), r"run.json: 'seed' must be an integer"),
    (lambda d: d.update(obs_csv_t_star="abc"), r"obs.csv, line 2: column 't_star' must be a number, got 'abc'"),
])
def test_a_saved_run_json_or_obs_table_with_a_wrong_type_names_the_key(tmp_path, edit, words) -> None:
    from d2mae.io.obs_table import ObsTable
    from d2mae.io.predictions import load_predictions

    shutil.copytree(FIXTURE, tmp_path / "old")
    o = tmp_path / "old"
    docs = {"obs_json": json.loads((o / "obs" / "obs.json").read_text()),
            "run_json": json.loads((o / "ft" / "run.json").read_text())}
    edit(docs)
    (o / "obs" / "obs.json").write_text(json.dumps(docs["obs_json"]))
    (o / "ft" / "run.json").write_text(json.dumps(docs["run_json"]))
    if "obs_csv_t_star" in docs:
        lines = (o / "obs" / "obs.csv").read_text().splitlines()
        cells = lines[1].split(",")
        cells[2] = docs["obs_csv_t_star"]
        (o / "obs" / "obs.csv").write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    with pytest.raises(D2maeError, match=words):
        ObsTable.load(o / "obs") if "obs" in words else load_predictions(o / "ft")

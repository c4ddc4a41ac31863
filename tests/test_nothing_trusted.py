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

TINY_FLAGS = ["--model", "vit_tiny_patch16", "--img-size", "32", "--embed-dim", "16", "--depth", "1", "--num-heads",
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
    (labeled / "elsewhere.png").write_bytes((labeled / "ph" / "images" / "phantom_00.png").read_bytes())
    rows[1] = rows[1].replace("images/phantom_00.png", "../elsewhere.png")
    csv.write_text("\n".join(rows) + "\n")
    args = ["finetune", "--pretrained", str(labeled / "pt"), "--labels", str(csv), "--image-root", str(labeled / "ph"),
            *FT]
    assert main(args + ["--out", str(labeled / "ft")]) == 2
    err = capsys.readouterr().err
    assert "lead outside" in err and "../elsewhere.png" in err and "--allow-outside-root" in err
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

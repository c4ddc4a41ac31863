"""Every command that writes keeps to its own output (runtime/outputs.py): pointed at one of its inputs, at a folder of
other files, or at an existing file, it refuses with one line naming the path (exit 2) and leaves everything as it
was. Walks every command and every output flag."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from d2mae.commands.main import COMMANDS, build_parser, main

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run-0.2.0"
CPU = ["--device", "cpu"]
TINY = ["--arch", "vit_tiny_patch16", "--img-size", "32", "--embed-dim", "16", "--depth", "1", "--num-heads", "2",
        "--decoder-embed-dim", "16", "--decoder-depth", "1", "--decoder-num-heads", "2", "--epochs", "1",
        "--batch-size", "8", "--workers", "0", *CPU]


@pytest.fixture
def old(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "old")
    return tmp_path / "old"


def _tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself) and its sha256."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _commands(o: Path) -> dict[str, tuple[callable, list[Path]]]:
    """command → (argv for an output path, the inputs it reads)."""
    images, labels, pt, ft = o / "ph" / "images", o / "ph" / "labels.csv", o / "pt", o / "ft"
    return {
        "phantoms": (lambda out: ["phantoms", "--out", str(out), "--n", "8", "--size", "32"], []),
        "pretrain": (lambda out: ["pretrain", "--data", str(images), "--out", str(out), *TINY], [images]),
        "obs": (lambda out: ["obs", "--pretrained", str(pt), "--labels", str(labels), "--out", str(out), *CPU],
                [pt, labels, images]),
        "finetune": (lambda out: ["finetune", "--pretrained", str(pt), "--labels", str(labels), "--out", str(out),
                                  "--epochs", "1", "--batch-size", "8", "--workers", "0", *CPU], [pt, labels, images]),
        "segment": (lambda out: ["segment", "--pretrained", str(pt), "--images", str(images), "--masks", str(images),
                                 "--out", str(out), "--epochs", "1", *CPU], [pt, images]),
        "probe": (lambda out: ["probe", "--pretrained", str(pt), "--labels", str(labels), "--out", str(out),
                               "--knn-k", "3", *CPU], [pt, labels, images]),
        "evaluate": (lambda out: ["evaluate", str(ft), "--out", str(out)], [ft]),
        "compare": (lambda out: ["compare", str(ft), str(ft), "--out", str(out)], [ft]),
        "predict": (lambda out: ["predict", "--model", str(ft), str(images), "--out", str(out), *CPU],
                    [ft, images]),
        "view": (lambda out: ["view", str(ft), "--out", str(out), "--no-progress", "--device", "cpu"], [ft]),
        "export": (lambda out: ["export", "--pretrained", str(pt), "--out", str(out)], [pt]),
        "shards": (lambda out: ["shards", str(images), "--out", str(out)], [images]),
        "experiment": (lambda out: ["experiment", str(o / "exp.yaml"), "--out", str(out), "--no-estimate"],
                       [labels, images]),
        "demo": (lambda out: ["demo", "--out", str(out), "--no-estimate"], []),
    }


def test_every_command_that_writes_is_walked() -> None:
    writers = set(_commands(Path("x")))
    assert writers == set(COMMANDS), set(COMMANDS) ^ writers


def _experiment_config(o: Path) -> None:
    (o / "exp.yaml").write_text(f"""name: t
seeds: [0]
methods: [supervised]
model: {{model: vit_tiny_patch16, img_size: 32, depth: 1, embed_dim: 16, num_heads: 2, decoder_embed_dim: 16,
        decoder_depth: 1, decoder_num_heads: 2}}
budget: {{pretrain_epochs: 1, pretrain_batch_size: 8, finetune_epochs: 1, finetune_batch_size: 8}}
datasets: {{ph: {{labels: {o / 'ph' / 'labels.csv'}, protocol: "split:3:1:1"}}}}
""")


@pytest.mark.parametrize("command", sorted(_commands(Path("x"))))
def test_no_command_writes_into_its_inputs_or_over_other_files(old: Path, tmp_path: Path, capsys, command: str) -> None:
    _experiment_config(old)
    argv, inputs = _commands(old)[command]
    before = {str(p): _tree(p) for p in inputs}
    # an input, a folder inside one, and the folder that holds one (beside the inputs)
    targets = [p for p in inputs] + [p / "sub" for p in inputs if p.is_dir()] + [p.parent for p in inputs]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    targets.append(foreign if command != "predict" else foreign / "notes.txt")
    forceable = "--force" in build_parser(command).format_help()
    for target, force in [(t, f) for t in targets for f in ([False, True] if forceable else [False])]:
        if force and target == foreign:
            continue  # --force may write beside files it did not write (test_replacing.py: never over them)
        assert main(argv(target) + (["--force"] if force else [])) == 2, (target, force)
        err = capsys.readouterr().err
        assert str(target) in err or str(target.parent) in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {str(p): _tree(p) for p in inputs} == before
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_an_earlier_output_is_replaced_only_with_force(old: Path, tmp_path: Path, capsys) -> None:
    obs = ["obs", "--pretrained", str(old / "pt"), "--labels", str(old / "ph" / "labels.csv"), "--out",
           str(tmp_path / "obs"), "--strips", "0", *CPU]
    assert main(obs) == 0
    assert main(obs) == 2 and "give --force" in capsys.readouterr().err
    assert main(obs + ["--force"]) == 0
    out = tmp_path / "pred.csv"
    predict = ["predict", "--model", str(old / "ft"), str(old / "ph" / "images" / "phantom_00.png"), "--out",
               str(out), *CPU]
    assert main(predict) == 0
    assert main(predict) == 2 and "give --force" in capsys.readouterr().err
    assert main(predict + ["--force"]) == 0

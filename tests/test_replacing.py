"""--force replaces only what d2mae wrote; masks pair exactly with their images; mask values are checked, not cast;
a segmentation run resumes where it stopped; every field read back from a run folder is checked. Each case below
was a way to lose data or to get a silent wrong result (issue 33); each test fails when its guard is removed
(benchmarks/mutations.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d2mae.commands.main import main
from d2mae.data.phantom import generate_phantoms
from d2mae.runtime.errors import D2maeError
from d2mae.segment.masks import load_segment_set
from d2mae.segment.metrics import image_scores
from d2mae.train.config import SegmentConfig

SEG = Path(__file__).resolve().parent / "fixtures" / "seg-dbb9461"  # a segmentation run (tests/test_engine.py)
CPU = ["--device", "cpu", "--workers", "0", "--no-progress"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture
def seg(tmp_path: Path, monkeypatch) -> Path:
    """A copy of the fixture's folders (a segmentation run, its images and masks), run from inside it."""
    shutil.copytree(SEG, tmp_path / "s")
    monkeypatch.chdir(tmp_path / "s")
    return tmp_path / "s"


# ----------------------------------------------------------------------------- 1. --force never destroys an input


def test_force_never_writes_a_mask_over_an_input_image(seg: Path, capsys) -> None:
    image = seg / "ph" / "images" / "phantom_06.png"
    before = _sha(image)
    assert main(["predict", "--model", str(seg / "seg"), "--out", str(image.parent), "--force", str(image),
                 *CPU]) == 2
    _error(capsys, str(image.parent), "inputs")
    assert _sha(image) == before


def test_force_writes_beside_ground_truth_masks_but_never_over_one(seg: Path, capsys) -> None:
    """The masks folder is not an input of predict: --force may write beside its files, never over them."""
    masks = seg / "ph" / "masks"
    before = {p.name: _sha(p) for p in masks.iterdir()}
    image = seg / "ph" / "images" / "phantom_06.png"  # its mask file would be masks/phantom_06.png
    assert main(["predict", "--model", str(seg / "seg"), "--out", str(masks), "--force", str(image), *CPU]) == 2
    _error(capsys, "phantom_06.png", "did not write")
    assert {p.name: _sha(p) for p in masks.iterdir() if p.name in before} == before
    assert not (masks / "masks.csv").exists()  # refused before any work


def test_force_never_replaces_a_runs_own_test_predictions(seg: Path, capsys) -> None:
    folder = seg / "seg" / "predictions"
    before = {p.name: _sha(p) for p in folder.iterdir()}
    images = [str(seg / "ph" / "images" / n.replace("images__", "")) for n in before]
    images.append(str(seg / "ph" / "masks" / "phantom_00.png"))  # the inputs' common folder is ph/: the same names
    assert main(["predict", "--model", str(seg / "seg" / "fold_1" / "model"), "--out", str(folder), "--force",
                 *images, *CPU]) == 2
    _error(capsys, "did not write")
    assert {p.name: _sha(p) for p in folder.iterdir()} == before


def test_force_replaces_what_the_same_command_wrote_before(seg: Path, tmp_path: Path, capsys) -> None:
    image = str(seg / "ph" / "images" / "phantom_06.png")
    out = tmp_path / "masks"
    assert main(["predict", "--model", str(seg / "seg"), "--out", str(out), image, *CPU]) == 0
    assert main(["predict", "--model", str(seg / "seg"), "--out", str(out), image, *CPU]) == 2
    _error(capsys, "--force")
    (out / "notes.txt").write_text("mine")
    assert main(["predict", "--model", str(seg / "seg"), "--out", str(out), "--force", image, *CPU]) == 0
    assert (out / "notes.txt").read_text() == "mine"


def test_force_never_replaces_a_csv_d2mae_did_not_write(tmp_path: Path, capsys) -> None:
    from tests.test_legacy_run import OLD

    table = tmp_path / "budget.csv"
    table.write_text("item,cost\nscanner,1000\n")
    image = str(OLD / "ph" / "images" / "phantom_00.png")
    assert main(["predict", "--model", str(OLD / "ft"), image, "--out", str(table), "--force", *CPU]) == 2
    _error(capsys, "not written by d2mae")
    assert table.read_text() == "item,cost\nscanner,1000\n"


def test_a_folder_holding_only_hidden_files_is_not_empty(tmp_path: Path, capsys) -> None:
    out = tmp_path / "project"
    (out / ".git").mkdir(parents=True)
    (out / ".env").write_text("SECRET=1\n")
    assert main(["phantoms", "--out", str(out), "--n", "4", "--size", "32"]) == 2
    _error(capsys, ".env", "did not write")
    assert main(["phantoms", "--out", str(out), "--n", "4", "--size", "32", "--force"]) == 0  # beside them
    assert (out / ".env").read_text() == "SECRET=1\n"


# ---------------------------------------------------------------------------- 2. masks pair by relative path


def _layout(root: Path, images: list[str], masks: list[str]) -> None:
    rng = np.random.default_rng(0)
    for i, rel in enumerate(images):
        _png(root / "images" / rel, rng.integers(0, 255, (24, 28), dtype=np.uint8))
    for i, rel in enumerate(masks):
        m = np.zeros((24, 28), np.uint8)
        m[2:4 + 3 * i, 3:9] = 255  # a different mask each
        _png(root / "masks" / rel, m)


def _pair(root: Path, **options) -> dict[str, str]:
    data = load_segment_set(SegmentConfig(images=str(root / "images"), masks=str(root / options.pop("masks", "masks")),
                                          **options))
    return {i: Path(m).relative_to(root).as_posix() for i, m in zip(data.labeled.ids, data.masks)}


def test_nested_images_take_the_mask_at_their_own_path(tmp_path: Path) -> None:
    names = [f"{c}/000.png" for c in ("benign", "malignant", "normal")]
    _layout(tmp_path, names, names)
    assert _pair(tmp_path) == {n: f"masks/{n}" for n in names}


def test_nested_images_with_one_flat_mask_are_refused(tmp_path: Path) -> None:
    _layout(tmp_path, [f"{c}/000.png" for c in ("benign", "malignant", "normal")], ["000.png"])
    with pytest.raises(D2maeError, match=r"3 image\(s\) have no mask.*benign/000"):
        _pair(tmp_path)


def test_two_images_that_would_share_one_mask_are_refused(tmp_path: Path) -> None:
    _layout(tmp_path, ["x.png", "x.jpg"], ["x.png"])
    with pytest.raises(D2maeError, match="would serve two images"):
        _pair(tmp_path)


def test_two_candidate_masks_for_one_image_are_refused(tmp_path: Path) -> None:
    _layout(tmp_path, ["x.png"], ["x.png", "x.tif"])
    with pytest.raises(D2maeError, match="more than one mask"):
        _pair(tmp_path)


def test_busis_own_layout_masks_beside_images_with_a_suffix(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("benign (1)", "malignant (2)"):
        _png(tmp_path / "images" / f"{name}.png", rng.integers(0, 255, (24, 28), dtype=np.uint8))
        _png(tmp_path / "images" / f"{name}_mask.png", np.zeros((24, 28), np.uint8))
    pairs = _pair(tmp_path, masks="images", mask_suffix="_mask")
    assert pairs == {"benign (1).png": "images/benign (1)_mask.png",
                     "malignant (2).png": "images/malignant (2)_mask.png"}  # the masks are never images
    with pytest.raises(D2maeError, match="mask_suffix|_mask"):
        _pair(tmp_path, masks="images")


# --------------------------------------------------------------------------------- 3. mask values are checked


def test_a_mask_of_fractions_is_an_error_that_names_the_file(tmp_path: Path) -> None:
    _layout(tmp_path, ["a.png"], [])
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.where(np.arange(24 * 28).reshape(24, 28) % 3, 0.0, 0.5).astype(np.float32)).save(
        tmp_path / "masks" / "a.tif")
    with pytest.raises(D2maeError, match=r"a\.tif holds values that are not whole numbers \(0\.5\)"):
        _pair(tmp_path)


def test_dice_counts_only_the_classes_in_the_truth_or_the_prediction() -> None:
    """Three classes on a 0/1 truth: by hand, the lesion (class 1) has Dice 0 under an empty prediction, and class
    2 occurs nowhere, so it does not count: Dice 0 (not 0.5). A perfect prediction: 1. A class-2 blob that is not
    there: the mean of class 1's 1 and class 2's 0 = 0.5."""
    truth = np.zeros((10, 10), np.uint8)
    truth[2:5, 2:5] = 1
    empty = np.zeros_like(truth)
    assert image_scores(empty, truth, 3)["dice"] == 0.0
    assert image_scores(truth, truth, 3)["dice"] == 1.0
    extra = truth.copy()
    extra[7:9, 7:9] = 2
    assert image_scores(extra, truth, 3)["dice"] == pytest.approx(0.5)
    assert image_scores(empty, empty, 3)["dice"] == 1.0  # no lesion and none predicted: a normal image read as normal


# ----------------------------------------------------------------------- 4-5. segment resumes; names cannot collide


def test_segment_resume_skips_the_folds_that_finished(tmp_path: Path, monkeypatch) -> None:
    from d2mae.train import engine

    generate_phantoms(tmp_path / "ph", n=24, size=40, seed=4, masks=True)
    args = ["segment", "--labels", str(tmp_path / "ph" / "labels.csv"), "--mask-column", "mask", "--decoder", "unet",
            "--img-size", "32", "--protocol", "kfold:2", "--epochs", "1", "--batch-size", "4", "--out",
            str(tmp_path / "run"), *CPU]
    real = engine.Run.fold_trainer

    def stop_in_fold_2(self, fold):  # noqa: ANN001
        if fold.name == "2":
            raise KeyboardInterrupt
        return real(self, fold)

    monkeypatch.setattr(engine.Run, "fold_trainer", stop_in_fold_2)
    assert main(args) == 130
    done = tmp_path / "run" / "fold_1" / "done.json"
    stamp = done.stat().st_mtime_ns
    trained = []
    monkeypatch.setattr(engine.Run, "fold_trainer", lambda self, fold: (trained.append(fold.name),
                                                                         real(self, fold))[1])
    assert main(args + ["--resume"]) == 0
    assert trained == ["2"] and done.stat().st_mtime_ns == stamp


def test_segment_refuses_two_images_that_would_write_one_prediction(tmp_path: Path, capsys) -> None:
    _layout(tmp_path, ["a/b.png", "a__b.png"], ["a/b.png", "a__b.png"])
    assert main(["segment", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
                 "--decoder", "unet", "--img-size", "32", "--out", str(tmp_path / "run"), *CPU]) == 2
    _error(capsys, "a__b.png", "rename")
    assert not (tmp_path / "run" / "predictions").exists()


# ------------------------------------------------------------------------------- 6. probe follows the rule


def test_probe_replaces_its_earlier_output_only_with_force(tmp_path: Path, capsys) -> None:
    from tests.test_legacy_run import OLD

    args = ["probe", "--pretrained", str(OLD / "pt"), "--labels", str(OLD / "ph" / "labels.csv"), "--protocol",
            "kfold:2", "--knn-k", "3", "--out", str(tmp_path / "p"), *CPU]
    assert main(args) == 0
    first = (tmp_path / "p" / "probe.csv").read_text()
    assert main(args[:-len(CPU)] + ["--probe-c", "0.1", *CPU]) == 2
    _error(capsys, "--force")
    assert (tmp_path / "p" / "probe.csv").read_text() == first
    assert main(args + ["--probe-c", "0.1", "--force"]) == 0


# ---------------------------------------------------------------- 7. every field read back from a run is checked


@pytest.mark.parametrize("file, change, words", [
    ("seg/fold_1/model/config.json", {"feature_size": "sixteen"}, "'feature_size' must be an integer"),
    ("seg/fold_1/model/config.json", {"obs": "search"}, "'obs' must be a mapping"),
    ("seg/fold_1/model/config.json", {"obs": {"mode": "seek"}}, "'mode' must be a string"),
    ("seg/run.json", {"num_classes": "two"}, "'num_classes' must be an integer"),
])
def test_a_wrong_typed_field_is_one_line_naming_the_file_and_the_key(seg: Path, capsys, file: str, change: dict,
                                                                     words: str) -> None:
    path = seg / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    image = str(seg / "ph" / "images" / "phantom_06.png")
    code = (main(["evaluate", str(seg / "seg")]) if file.endswith("run.json") else
            main(["predict", "--model", str(seg / "seg"), "--out", str(seg / "new"), image, *CPU]))
    assert code == 2
    _error(capsys, path.name, words)


def test_a_per_image_table_without_its_fold_column_is_one_line(seg: Path, capsys) -> None:
    path = seg / "seg" / "per_image.csv"
    rows = list(csv.DictReader(path.open()))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, [k for k in rows[0] if k != "fold"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert main(["evaluate", str(seg / "seg")]) == 2
    _error(capsys, "per_image.csv", "fold")


# ------------------------------------------------------------------------------------------ 8. smaller cases


def test_skip_bad_leaves_out_a_corrupt_image_in_segment(tmp_path: Path) -> None:
    _layout(tmp_path, [f"im{i}.png" for i in range(9)], [f"im{i}.png" for i in range(9)])
    (tmp_path / "images" / "im4.png").write_bytes(b"not a png")
    args = ["segment", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--decoder", "unet",
            "--img-size", "32", "--epochs", "1", "--batch-size", "2", "--out", str(tmp_path / "run"), *CPU]
    assert main(args) == 2
    assert main(args + ["--skip-bad"]) == 0
    assert "im4.png" in (tmp_path / "run" / "bad_images.txt").read_text()
    rows = list(csv.DictReader((tmp_path / "run" / "per_image.csv").open()))
    assert len(rows) >= 1 and all("im4" not in r["path"] for r in rows)


def test_keep_steps_beyond_the_last_step_is_one_line(tmp_path: Path, capsys) -> None:
    generate_phantoms(tmp_path / "ph", n=8, size=40, seed=1)
    assert main(["pretrain", "--data", str(tmp_path / "ph" / "images"), "--out", str(tmp_path / "pt"), "--arch",
                 "vit_tiny_patch16", "--img-size", "32", "--depth", "1", "--embed-dim", "16", "--num-heads", "1",
                 "--decoder-embed-dim", "16", "--decoder-depth", "1", "--decoder-num-heads", "1", "--epochs", "1",
                 "--batch-size", "4", "--keep-steps", "1", "50", *CPU]) == 2
    _error(capsys, "--keep-steps", "50", "last step (2")


def test_knn_k_above_the_training_images_says_so(tmp_path: Path, capsys) -> None:
    from tests.test_legacy_run import OLD

    assert main(["probe", "--pretrained", str(OLD / "pt"), "--labels", str(OLD / "ph" / "labels.csv"), "--protocol",
                 "kfold:2", "--knn-k", "20", "--out", str(tmp_path / "p"), *CPU]) == 0
    assert "training images, fewer than --knn-k 20: its kNN uses k = 6" in capsys.readouterr().err


def test_labels_that_differ_only_in_case_are_two_classes_with_a_warning(tmp_path: Path) -> None:
    from d2mae.data.labels import load_labeled

    generate_phantoms(tmp_path / "ph", n=6, size=32, seed=1)
    rows = list(csv.DictReader((tmp_path / "ph" / "labels.csv").open()))
    for i, r in enumerate(rows):
        r["label"] = ["Benign", "benign", "malignant"][i % 3]
    with (tmp_path / "l.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.warns(UserWarning, match="'Benign' and 'benign' differ only in case"):
        labeled = load_labeled(tmp_path / "l.csv", image_root=tmp_path / "ph")
    assert labeled.classes == ["Benign", "benign", "malignant"]

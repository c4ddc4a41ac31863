"""d2mae segment: masks checked against their images, one geometry for image and mask, the encoder fed σ_{t*} and
t*, metrics at each image's own size, and the run end to end on a 48-image BUSI slice."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_erosion, gaussian_filter
from scipy.spatial.distance import cdist

from d2mae.commands.main import main
from d2mae.data.phantom import generate_phantoms
from d2mae.io.artifacts import save_pretrained
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurMAE
from d2mae.runtime.errors import D2maeError
from d2mae.segment.data import SegmentDataset
from d2mae.segment.files import load_segmenter
from d2mae.segment.masks import load_segment_set
from d2mae.segment.metrics import image_scores
from d2mae.segment.model import build_segmenter
from d2mae.train.config import SegmentConfig
from tests.conftest import SHARED, TINY

BUSI = SHARED / "data" / "busi-seg"


def _png(path: Path, arr: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


# ------------------------------------------------------------------------------------------------------- metrics

def _hd95(a: np.ndarray, b: np.ndarray) -> float:
    """The symmetric 95th-percentile surface distance from scipy alone: boundary pixels (the mask minus its
    erosion), all pairwise distances, the 95th percentile each way, the larger of the two."""
    ea, eb = np.argwhere(a & ~binary_erosion(a)), np.argwhere(b & ~binary_erosion(b))
    d = cdist(ea, eb)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_dice_iou_hd95_agree_with_their_formulas_and_the_empty_mask_conventions() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        truth = np.zeros((70, 90), np.uint8)
        pred = np.zeros((70, 90), np.uint8)
        y0, x0 = rng.integers(5, 30, 2)
        truth[y0:y0 + 25, x0:x0 + 30] = 1
        pred[y0 + 3:y0 + 30, x0 - 4:x0 + 22] = 1
        s = image_scores(pred, truth, 2)
        inter = (pred & truth).sum()
        assert s["dice"] == pytest.approx(2 * inter / (pred.sum() + truth.sum()), abs=1e-9)
        assert s["iou"] == pytest.approx(inter / (pred | truth).sum(), abs=1e-9)
        assert s["hd95"] == pytest.approx(_hd95(pred.astype(bool), truth.astype(bool)), abs=1.0)
    empty, some = np.zeros((20, 20), np.uint8), np.pad(np.ones((6, 6), np.uint8), 7)
    assert image_scores(empty, empty, 2)["dice"] == 1.0  # a normal image read as normal
    assert image_scores(some, empty, 2)["dice"] == 0.0
    assert np.isnan(image_scores(empty, some, 2)["hd95"])  # undefined: left out and counted


# ---------------------------------------------------------------------------------------------- masks and inputs

@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    for i in range(6):
        img = rng.integers(0, 255, (40, 50), dtype=np.uint8)
        mask = np.zeros((40, 50), np.uint8)
        mask[10:20 + i, 10:30] = 255 if i % 2 else 0
        _png(tmp_path / "images" / f"im_{i}.png", img)
        _png(tmp_path / "masks" / f"im_{i}.png", mask)
    return tmp_path


@pytest.mark.parametrize("problem, words", [
    ("missing", "have no mask"), ("size", "must have its image's size"), ("values", "beyond --num-classes"),
    ("rgb", "channels"),
])
def test_a_bad_mask_is_one_error_that_names_the_file(pairs: Path, problem: str, words: str) -> None:
    mask = pairs / "masks" / "im_3.png"
    if problem == "missing":
        mask.unlink()
    elif problem == "size":
        _png(mask, np.zeros((41, 50), np.uint8))
    elif problem == "values":
        _png(mask, np.full((40, 50), 7, np.uint8))
    else:
        _png(mask, np.zeros((40, 50, 3), np.uint8), mode="RGB")
    cfg = SegmentConfig(images=str(pairs / "images"), masks=str(pairs / "masks"), out=str(pairs / "run"))
    with pytest.raises(D2maeError) as err:
        load_segment_set(cfg)
    assert words in str(err.value) and "im_3" in str(err.value)
    code = main(["segment", "--images", str(pairs / "images"), "--masks", str(pairs / "masks"),
                 "--out", str(pairs / "run2")])
    assert code == 2


def test_empty_masks_are_valid_and_strata_say_which_images_hold_a_lesion(pairs: Path) -> None:
    data = load_segment_set(SegmentConfig(images=str(pairs / "images"), masks=str(pairs / "masks")))
    assert data.labeled.classes == ["lesion", "no lesion"]
    assert data.labeled.labels.tolist() == [1, 0, 1, 0, 1, 0]


def test_image_and_mask_share_one_crop_and_the_mask_keeps_its_classes(tmp_path: Path) -> None:
    """An image that equals its mask must still equal it after the random crop and flip: image bicubic, mask
    nearest, from the same box (a different crop for each, or an interpolated mask, breaks this)."""
    mask = np.zeros((60, 80), np.uint8)
    mask[10:35, 20:70] = 1
    mask[40:55, 5:30] = 1
    _png(tmp_path / "i.png", mask * 255)
    _png(tmp_path / "m.png", mask * 255)
    data = SegmentDataset([str(tmp_path / "i.png")], [str(tmp_path / "m.png")], 48, 1, 2, augment=True,
                          crop_scale=(0.3, 1.0))
    for seed in range(8):
        torch.manual_seed(seed)
        x, y, _ = data[0]
        assert set(torch.unique(y).tolist()) <= {0, 1}
        agree = ((x[0] > 0.5).long() == y).float().mean()
        assert agree > 0.97, (seed, float(agree))
    label_map = np.zeros((60, 80), np.uint8)
    label_map[:, 40:] = 2  # classes 0 and 2 side by side: any interpolation puts 1s on their border
    _png(tmp_path / "l.png", label_map)
    data = SegmentDataset([str(tmp_path / "i.png")], [str(tmp_path / "l.png")], 37, 1, 3, augment=True)
    for seed in range(4):
        torch.manual_seed(seed)
        assert 1 not in torch.unique(data[0][1]).tolist()


# ------------------------------------------------------------------------------------------------------- model

@pytest.mark.parametrize("decoder", ["fpn", "upernet", "unetr"])
def test_the_segmenter_sees_the_image_blurred_at_sigma_t_star_and_t_star_reaches_the_blur_token(decoder: str) -> None:
    cfg = ModelConfig(**{**TINY, "img_size": 64})
    model = build_segmenter(decoder, cfg, 2, 64 if decoder != "unetr" else 8).eval()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([3.0, 9.0])
    seen = []
    model.encoder.patch_embed.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach()))
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == (2, 2, 64, 64)
    image = seen[0] * model.encoder.pixel_std + model.encoder.pixel_mean
    for i, level in enumerate(t.tolist()):
        want = gaussian_filter(x[i, 0].double().numpy(), sigma=0.1 * level, mode="reflect", truncate=4.0)
        assert np.abs(image[i, 0].double().numpy() - want).max() < 1e-5
    blu = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda mod, inp: blu.append(inp[0][:, 1].detach()))
    with torch.no_grad():
        model(x, t)
        model(x, t + 1)  # the same blur would still differ through BLU(t): token 1 must move with t
    assert not torch.allclose(blu[-2], blu[-1])


# ---------------------------------------------------------------------------------------------------- phantoms

def test_phantom_masks_outline_the_dark_lesion_and_leave_the_images_as_they_were(tmp_path: Path) -> None:
    generate_phantoms(tmp_path / "a", n=12, size=64, seed=3)
    generate_phantoms(tmp_path / "b", n=12, size=64, seed=3, masks=True)
    ratios = []
    for i in range(12):
        a = (tmp_path / "a" / "images" / f"phantom_{i:02d}.png").read_bytes()
        assert a == (tmp_path / "b" / "images" / f"phantom_{i:02d}.png").read_bytes()
        img = np.asarray(Image.open(tmp_path / "b" / "images" / f"phantom_{i:02d}.png"), dtype=float)
        mask = np.asarray(Image.open(tmp_path / "b" / "masks" / f"phantom_{i:02d}.png")) > 0
        assert 0.005 < mask.mean() < 0.3
        ratios.append(img[mask].mean() / img[~mask & (img > 0)].mean())
    assert max(ratios) < 0.8 and np.median(ratios) < 0.7, ratios  # hypo-echoic inside the mask


# ------------------------------------------------------------------------------------------- end to end (BUSI)

@pytest.fixture
def busi48(tmp_path: Path) -> Path:
    if not (BUSI / "images").is_dir():
        pytest.skip("BUSI data not found beside the repository (../shared/data/busi-seg)")
    for cls in ("benign", "malignant", "normal"):
        for name in sorted(p.name for p in (BUSI / "images").glob(f"{cls}_*.png"))[:16]:
            for sub in ("images", "masks"):
                (tmp_path / "busi" / sub).mkdir(parents=True, exist_ok=True)
                (tmp_path / "busi" / sub / name).symlink_to(BUSI / sub / name)
    return tmp_path / "busi"


@pytest.mark.slow
def test_segment_end_to_end_on_48_busi_images(busi48: Path, tmp_path: Path) -> None:
    """A tiny pre-trained model, OBS, one epoch: a mask PNG per test image at that image's own size, whose Dice
    recomputed here equals per_image.csv; evaluate and compare read the run."""
    pre = tmp_path / "pre"
    save_pretrained(DeblurMAE(ModelConfig(**TINY)), pre)
    run = tmp_path / "run"
    args = ["segment", "--pretrained", str(pre), "--images", str(busi48 / "images"), "--masks",
            str(busi48 / "masks"), "--out", str(run), "--epochs", "1", "--batch-size", "8", "--feature-size", "64",
            "--img-size", "64",  # the model at 64 px, 4 × 4 patches: its position embedding interpolated
            "--threads", "1"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(run / "per_image.csv")))
    test = [r for r in rows if r["split"] == "test"]
    pngs = sorted((run / "predictions").glob("*.png"))
    assert len(test) == len(pngs) == 10
    for r in test:
        pred = np.asarray(Image.open(run / "predictions" / (Path(r["id"]).stem + ".png")))
        truth = np.asarray(Image.open(r["mask"])) > 0
        assert pred.shape == truth.shape == tuple(reversed(Image.open(r["path"]).size))
        assert set(np.unique(pred).tolist()) <= {0, 255}
        p = pred > 0
        want = 1.0 if not (p.any() or truth.any()) else 2 * (p & truth).sum() / (p.sum() + truth.sum())
        assert float(r["dice"]) == pytest.approx(want, abs=1e-6)
        assert float(r["t_star"]) >= 1  # OBS ran: every image has a searched level
    meta = json.loads((run / "run.json").read_text())
    assert meta["kind"] == "segment" and meta["obs"]["mode"] == "search"
    model, saved = load_segmenter(run / "fold_1" / "model")  # the model folder loads back as it was trained
    assert saved["obs"]["mode"] == "search" and saved["pretrained_sha256"] == meta["pretrained_sha256"]
    assert model(torch.rand(1, 1, 64, 64), torch.tensor([2.0])).shape == (1, 2, 64, 64)
    assert main(["evaluate", str(run)]) == 0
    assert (run / "evaluation" / "metrics.json").is_file() and (run / "evaluation" / "overlays.png").is_file()
    assert main(["compare", str(run), str(run)]) == 0
    # predict on the test images, as new images: OBS again, then the same masks as the run's own predictions
    out = tmp_path / "new"
    assert main(["predict", "--model", str(run), "--out", str(out), "--threads", "1", *[r["path"] for r in test]]) == 0
    written = list(csv.DictReader(open(out / "masks.csv")))
    assert [w["path"] for w in written] == [r["path"] for r in test]
    for w, r in zip(written, test):
        mine = np.asarray(Image.open(out / w["mask"]))
        assert np.array_equal(mine, np.asarray(Image.open(run / "predictions" / (Path(r["id"]).stem + ".png"))))
        assert int(w["lesion_pixels"]) == int((mine > 0).sum()) == int(r["lesion_pixels"])
        assert float(w["t_star"]) == float(r["t_star"])
    assert main(["predict", "--model", str(run), "--out", str(out), test[0]["path"]]) == 2  # finished: needs --force


# ------------------------------------------------------------------------------------------- experiment kind

SEG_MICRO = {
    "name": "segmicro", "seeds": [0], "methods": ["supervised", "unet", "mae", "d2mae"], "model": {**TINY, "img_size": 64},
    "budget": {"pretrain_epochs": 1, "pretrain_batch_size": 8, "finetune_epochs": 1, "finetune_batch_size": 8},
    "pretrain": {"warmup_epochs": 0, "lr": 1e-3},
    "segment": {"warmup_epochs": 0, "feature_size": 64, "progress": False},
    "datasets": {"ph": {"task": "segment", "phantoms": {"n": 24, "size": 32, "seed": 0}, "protocol": "kfold:2"}},
    "report": {"n_bootstrap": 50},
}


def _experiment(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "seg.yaml"
    path.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    return path


@pytest.mark.parametrize("change, words", [
    ({"datasets": {"ph": {"phantoms": {"n": 24, "size": 32}}}}, "method unet in"),  # a classification dataset
    ({"methods": ["mae-imagenet", "d2mae"], "weights": {"mae-imagenet": __file__}}, "cannot segment dataset 'ph'"),
    ({"segment": {"decoder": "unet"}}, "segment.decoder"),
    ({"datasets": {"ph": {"task": "segment", "images": "x"}}}, "exactly one of masks"),
    ({"datasets": {"ph": {"task": "paint", "phantoms": {"n": 24, "size": 32}}}}, "datasets.ph.task"),
])
def test_a_segmentation_experiment_refuses_what_it_cannot_run(tmp_path: Path, change: dict, words: str) -> None:
    from d2mae import experiment as ex

    with pytest.raises(D2maeError, match=words):
        ex.make_plan(ex.load_experiment(_experiment(tmp_path, {**SEG_MICRO, **change})), tmp_path / "out")


@pytest.mark.slow
def test_a_segmentation_experiment_runs_every_method_on_the_same_folds_and_reports_them(tmp_path: Path) -> None:
    """Phantoms with masks, every row of the table (scratch ViT, smp U-Net, MAE, D²MAE): the report's Dice is the mean
    of each run's per-image Dice, the P-values are scipy's Wilcoxon on the same images, and a resume skips it all."""
    from scipy.stats import wilcoxon

    from d2mae import experiment as ex

    path = _experiment(tmp_path, SEG_MICRO)
    out = tmp_path / "out"
    assert main(["experiment", str(path), "--out", str(out), "--no-estimate"]) == 0
    plan = ex.make_plan(ex.load_experiment(path), out)
    stages = {s.method: s for s in plan.of("segment")}
    assert set(stages) == {"supervised", "unet", "mae", "d2mae"} and not plan.of("finetune")
    per_image = {m: list(csv.DictReader(open(s.folder / "per_image.csv"))) for m, s in stages.items()}
    tests = {m: {(r["fold"], r["path"]): float(r["dice"]) for r in rows if r["split"] == "test"}
             for m, rows in per_image.items()}
    assert len({frozenset(v) for v in tests.values()}) == 1  # the same test images in the same folds
    assert json.loads((stages["unet"].folder / "run.json").read_text())["decoder"] == "unet"
    assert json.loads((stages["d2mae"].folder / "run.json").read_text())["obs"]["mode"] == "search"
    assert json.loads((stages["mae"].folder / "run.json").read_text())["obs"]["mode"] == "none"
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Lesion segmentation (beyond the paper)" in md and "overlays.png" in md
    table = json.loads((out / "metrics.json").read_text())["segmentation"]["ph"]
    keys = sorted(tests["d2mae"])
    for m in stages:
        assert table[m]["metrics"]["dice"]["mean"] == pytest.approx(np.mean(list(tests[m].values())), abs=1e-9)
        if m != "d2mae":
            d = np.array([tests[m][k] - tests["d2mae"][k] for k in keys])
            want = wilcoxon(d).pvalue if np.any(d != 0) else float("nan")
            assert all(int(r["truth_pixels"]) > 0 for r in per_image[m])  # every phantom holds a lesion
            got = table[m]["vs_d2mae_dice_lesion"]
            assert got["diff"] == pytest.approx(d.mean(), abs=1e-9)
            assert got["wilcoxon_p"] == pytest.approx(want, rel=1e-9, nan_ok=True)
            label = {"supervised": "ViT (no pre-training)", "unet": "U-Net (smp, ResNet-18)", "mae": "MAE"}[m]
            assert f"| {label} | {table[m]['metrics']['dice']['mean'] * 100:.1f} [" in md
    before = {s.id: (s.folder / ex.DONE).stat().st_mtime_ns for s in plan.stages}
    assert main(["experiment", str(path), "--out", str(out), "--resume", "--no-estimate"]) == 0
    assert {s.id: (s.folder / ex.DONE).stat().st_mtime_ns for s in plan.stages} == before


# ------------------------------------------------------------------------ the pyramid decoder and fair metrics

def test_the_pyramid_reads_the_patch_tokens_of_the_blocks_at_quarter_half_three_quarters_and_all_of_the_depth():
    """The simple feature pyramid's inputs are the patch tokens (CLS and blur token dropped) of blocks 3, 6, 9 and 12
    of a 12-block ViT, laid back on their grid, and its levels are ×4, ×2, ×1 and ×½ of that grid."""
    cfg = ModelConfig(**{**TINY, "img_size": 64, "depth": 12})
    model = build_segmenter("fpn", cfg, 2, 64).eval()
    outputs: list[torch.Tensor] = []
    for block in model.encoder.blocks:
        block.register_forward_hook(lambda mod, inp, out: outputs.append(out.detach()))
    fed: list[list[torch.Tensor]] = []
    model.pyramid.register_forward_pre_hook(lambda mod, inp: fed.append([g.detach() for g in inp[0]]))
    levels: list[torch.Tensor] = []
    model.pyramid.register_forward_hook(lambda mod, inp, out: levels.extend(out))
    with torch.no_grad():
        model(torch.rand(2, 1, 64, 64), torch.tensor([2.0, 7.0]))
    g, prefix = 64 // 16, 2  # 4 × 4 patches; CLS and BLU(t)
    for grid, block in zip(fed[0], (2, 5, 8, 11)):
        want = outputs[block][:, prefix:].transpose(1, 2).reshape(2, cfg.embed_dim, g, g)
        assert torch.equal(grid, want), block
    assert [tuple(x.shape[-2:]) for x in levels] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_lesion_dice_counts_only_the_images_whose_truth_holds_a_lesion() -> None:
    from d2mae.segment.metrics import per_image_values, summarize

    rows = [{"dice": d, "iou": d, "hd95": "nan", "truth_pixels": t, "lesion_pixels": p, "height": 30, "width": 40,
             "fold": "1"} for d, t, p in ((0.5, 10, 12), (1.0, 0, 0), (0.0, 0, 5), (0.25, 8, 3))]
    assert np.isnan(per_image_values(rows, "dice_lesion")[[1, 2]]).all()
    assert summarize(rows, "dice_lesion")["mean"] == pytest.approx((0.5 + 0.25) / 2)  # by hand
    assert summarize(rows, "dice")["mean"] == pytest.approx((0.5 + 1.0 + 0.0 + 0.25) / 4)
    assert summarize(rows, "empty_correct")["mean"] == pytest.approx(0.5)  # one of the two normal images


def test_hd95_compares_two_runs_on_the_same_lesion_images_with_a_missed_lesion_at_the_diagonal(tmp_path: Path):
    """Run A misses the lesion of image 2, run B finds it: both are scored on the same two lesion images, A's miss at
    the image diagonal (50 px for 30 × 40), not left out of A's mean alone."""
    from d2mae.segment.evaluate import compare_segment_runs

    fields = ["id", "path", "mask", "fold", "split", "class", "dice", "iou", "hd95", "lesion_pixels", "truth_pixels",
              "height", "width", "t_star", "sigma_star"]
    for name, hd2, found in (("a", "nan", 0), ("b", "4.0", 9)):
        run = tmp_path / name
        run.mkdir()
        (run / "run.json").write_text(json.dumps({"method": name, "num_classes": 2}))
        with (run / "per_image.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fields)
            w.writeheader()
            for i, (hd, lesion, truth) in enumerate((("3.0", 10, 10), (hd2, found, 12), ("nan", 0, 0))):
                w.writerow({"id": f"{i}.png", "path": f"/x/{i}.png", "mask": "", "fold": "1", "split": "test",
                            "class": "", "dice": "0.5", "iou": "0.3", "hd95": hd, "lesion_pixels": lesion,
                            "truth_pixels": truth, "height": 30, "width": 40, "t_star": "1", "sigma_star": "0.1"})
    hd = compare_segment_runs(tmp_path / "a", tmp_path / "b")["metrics"]["hd95_lesion"]
    assert hd["n_pairs"] == 2
    assert hd["mean_a"] == pytest.approx((3.0 + 50.0) / 2) and hd["mean_b"] == pytest.approx((3.0 + 4.0) / 2)


def test_predict_with_a_run_folder_averages_every_folds_probabilities(tmp_path: Path) -> None:
    """Two fold models of one run: the run's mask is the argmax of the mean of the two folds' probabilities, not
    the last fold's alone."""
    from d2mae.method.obs import ObsSpec
    from d2mae.segment.files import save_segmenter
    from d2mae.segment.predict import native_probs, predict_masks

    cfg = ModelConfig(**{**TINY, "img_size": 64, "blur": False, "blur_embed": "none"})
    run, models = tmp_path / "run", []
    for k in (1, 2):
        torch.manual_seed(k)
        model = build_segmenter("fpn", cfg, 2, 64).eval()
        torch.nn.init.normal_(model.head.weight, std=0.5)
        save_segmenter(model, run / f"fold_{k}" / "model", "fpn", ObsSpec("none"), {"feature_size": 64}, None, None)
        models.append(model)
    (run / "run.json").write_text(json.dumps({"kind": "segment", "folds": ["1", "2"], "num_classes": 2}))
    rng = np.random.default_rng(0)
    refs = []
    for i in range(3):
        _png(tmp_path / "new" / f"n{i}.png", rng.integers(0, 255, (50, 70), dtype=np.uint8))
        refs.append(str(tmp_path / "new" / f"n{i}.png"))
    result = predict_masks(run, refs, tmp_path / "out", progress=False)
    both = list(native_probs(models, refs, np.zeros(3), torch.device("cpu"), 8))
    last = list(native_probs(models[-1:], refs, np.zeros(3), torch.device("cpu"), 8))
    assert any(not np.array_equal(b.argmax(0), c.argmax(0)) for b, c in zip(both, last))  # the folds disagree
    for name, p in zip(result.masks, both):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / name)) > 0, p.argmax(0) > 0)


def test_the_scratch_row_segments_with_the_pre_trained_rows_architecture(tmp_path: Path) -> None:
    """With patch 8 in the experiment's model section, the ViT trained from scratch has 8-pixel patches too (and
    every other setting of the pre-trained rows): it starts from the untrained ViT of the plan's arch stage."""
    from d2mae import experiment as ex
    from d2mae.io.artifacts import read_config

    model = {**TINY, "img_size": 64, "patch_size": 8}
    path = _experiment(tmp_path, {**SEG_MICRO, "model": model, "methods": ["supervised", "d2mae"]})
    plan = ex.make_plan(ex.load_experiment(path), tmp_path / "out")
    (arch,) = plan.of("arch")
    scratch = next(s for s in plan.of("segment") if s.method == "supervised")
    assert scratch.payload.pretrained == str(arch.folder) and scratch.payload.mode == "scratch"
    shape = ("arch", "patch_size", "embed_dim", "depth", "num_heads", "img_size")
    pre = next(s for s in plan.of("pretrain")).payload.model_config()
    assert {k: getattr(arch.payload["model"], k) for k in shape} == {k: getattr(pre, k) for k in shape}
    assert arch.payload["model"].patch_size == 8
    for stage in plan.of("data") + [arch]:  # the phantoms, then the folder the scratch row builds its segmenter from
        ex.run_stage(stage, plan)
    assert read_config(arch.folder, "d2mae-pretrained")["model"]["patch_size"] == 8

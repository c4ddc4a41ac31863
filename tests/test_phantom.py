"""Synthetic ultrasound phantoms: files and labels as specified, deterministic, learnable, scanners that differ."""

from __future__ import annotations

import csv
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score

from d2mae.commands.main import main
from d2mae.data.decode import check_images, load_image
from d2mae.data.phantom import SCANNERS, PhantomConfig, generate_phantoms, lesion_box, render_phantoms
from d2mae.data.sources import find_images
from d2mae.runtime.errors import D2maeError


def read_rows(labels: Path) -> list[dict[str, str]]:
    with open(labels, newline="") as fh:
        return list(csv.DictReader(fh))


def test_generate_writes_pngs_and_labels(tmp_path: Path) -> None:
    labels = generate_phantoms(tmp_path / "ph", n=30, size=48, seed=0)
    assert labels == tmp_path / "ph" / "labels.csv"
    rows = read_rows(labels)
    assert list(rows[0]) == ["path", "label", "scanner", "group"]
    assert len(rows) == 30
    for row in rows:
        assert not Path(row["path"]).is_absolute()
        img = Image.open(labels.parent / row["path"])
        assert img.mode == "L" and img.size == (48, 48)
        assert row["label"] in ("benign", "malignant") and row["scanner"] in SCANNERS
    assert (tmp_path / "ph" / "phantoms.yaml").is_file()
    refs = find_images([labels])
    assert len(refs) == 30 and check_images(refs) == refs
    assert load_image(refs[0]).shape == (48, 48, 1)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    a = generate_phantoms(tmp_path / "a", n=6, size=32, seed=3)
    b = generate_phantoms(tmp_path / "b", n=6, size=32, seed=3)
    c = generate_phantoms(tmp_path / "c", n=6, size=32, seed=4)
    assert a.read_bytes() == b.read_bytes()
    for row in read_rows(a):
        assert (a.parent / row["path"]).read_bytes() == (b.parent / row["path"]).read_bytes()
    first = read_rows(a)[0]["path"]
    assert (a.parent / first).read_bytes() != (c.parent / first).read_bytes()


def test_groups_share_label_and_scanner_and_balance_is_a_parameter() -> None:
    _, plan = render_phantoms(PhantomConfig(n=120, size=16, seed=1, malignant_fraction=0.25, max_views=3))
    by_group: dict[str, list[dict]] = defaultdict(list)
    for meta in plan:
        by_group[meta["group"]].append(meta)
    assert all(1 <= len(v) <= 3 for v in by_group.values())
    assert all(len({(m["label"], m["scanner"]) for m in v}) == 1 for v in by_group.values())
    patient_labels = [v[0]["label"] for v in by_group.values()]
    assert sum(patient_labels) == round(0.25 * len(patient_labels))
    _, plan = render_phantoms(PhantomConfig(n=20, size=16, seed=1, malignant_fraction=1.0, max_views=1))
    assert {m["label"] for m in plan} == {1} and len({m["group"] for m in plan}) == 20


def test_scanner_mix_is_a_parameter() -> None:
    _, plan = render_phantoms(PhantomConfig(n=40, size=16, scanners=["B", "D"], scanner_weights=[0.0, 1.0]))
    assert {m["scanner"] for m in plan} == {"D"}
    _, plan = render_phantoms(PhantomConfig(n=200, size=16, seed=2))
    counts = Counter(m["scanner"] for m in plan)
    assert set(counts) == set(SCANNERS) and min(counts.values()) > 20


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(D2maeError, match="scanners: unknown scanner"):
        PhantomConfig(scanners=["Z"])
    with pytest.raises(D2maeError, match="scanner_weights: needs one weight per scanner"):
        PhantomConfig(scanners=["A", "B"], scanner_weights=[1.0])
    with pytest.raises(D2maeError, match="^n: "):
        PhantomConfig(n=0)
    with pytest.raises(D2maeError, match="malignant_fraction: "):
        PhantomConfig(malignant_fraction=1.5)
    with pytest.raises(D2maeError, match="size: "):
        PhantomConfig(size=4)


def test_linear_and_sector_geometry() -> None:
    imgs, plan = render_phantoms(PhantomConfig(n=16, size=64, seed=0, scanners=["A", "D"]))
    for img, meta in zip(imgs, plan):
        corners = [img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]]
        if SCANNERS[meta["scanner"]].geometry == "sector":
            assert max(corners) == 0 and img[40, 32] > 0  # black outside the fan, tissue inside
        else:
            assert (img[:, 0] > 0).mean() > 0.9        # linear: tissue up to the frame's edges


def _sharpness(img: np.ndarray) -> float:
    """High-pass energy / variance of the tissue below the skin: lower means blurrier."""
    x = img.astype(np.float64) / 255.0
    s = x.shape[0]
    c = x[int(0.35 * s):int(0.9 * s), int(0.35 * s):int(0.65 * s)]
    return float(((c - ndimage.gaussian_filter(c, 1.0)) ** 2).mean() / c.var())


def test_scanners_differ_in_measured_sharpness() -> None:
    sharp = {}
    for name in SCANNERS:  # the same patients (seed) imaged by each scanner
        imgs, _ = render_phantoms(PhantomConfig(n=12, size=96, seed=0, scanners=[name]))
        sharp[name] = np.mean([_sharpness(i) for i in imgs])
    assert sharp["A"] > 1.2 * sharp["B"] > 1.2 * 1.2 * sharp["C"]
    assert sharp["A"] > sharp["D"] > sharp["C"]
    assert sharp["A"] > 2.5 * sharp["C"]


def test_scanners_differ_in_gain_and_noise() -> None:
    means = {}
    for name in ("A", "C"):
        imgs, _ = render_phantoms(PhantomConfig(n=8, size=64, seed=0, scanners=[name]))
        means[name] = imgs.mean()
    assert abs(means["A"] - means["C"]) > 2  # gain / dynamic range differ: different gray levels


def test_lesions_are_hypoechoic_with_class_specific_shape_and_posterior_features() -> None:
    size = 64
    imgs, plan = render_phantoms(PhantomConfig(n=160, size=size, seed=0, scanners=["A", "B"]))
    inside, around, posterior = {0: [], 1: []}, {0: [], 1: []}, {0: [], 1: []}
    for img, meta in zip(imgs, plan):
        x0, y0, x1, y1 = lesion_box(meta, size)
        cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        core = img[int(cy - 1):int(cy + 2), int(cx - 1):int(cx + 2)]
        ring = img[int(cy - 1):int(cy + 2), max(0, int(x0 - w)):max(1, int(x0 - 2))]
        inside[meta["label"]].append(core.mean())
        around[meta["label"]].append(ring.mean())
        r0, r1 = int(y1 + 2), min(size, int(y1 + 12))
        if r1 - r0 >= 3:
            below = img[r0:r1, int(cx - w / 2):int(cx + w / 2) + 1].mean()
            side = np.r_[img[r0:r1, max(0, int(x0 - w)):max(1, int(x0))].ravel(),
                         img[r0:r1, int(x1) + 1:int(x1 + w) + 1].ravel()].mean()
            posterior[meta["label"]].append(below / (side + 1.0))
    for label in (0, 1):  # hypo-echoic: darker than the tissue beside it
        assert np.mean(inside[label]) < 0.6 * np.mean(around[label])
    # benign: posterior enhancement (brighter below); malignant: posterior shadowing (darker below)
    assert np.mean(posterior[0]) > 1.03 and np.mean(posterior[1]) < 0.85
    aspect = {lab: np.mean([m["lesion_b"] / m["lesion_a"] for m in plan if m["label"] == lab]) for lab in (0, 1)}
    assert aspect[0] < 0.8 < 1.0 < aspect[1]  # benign wider than tall, malignant taller than wide


def test_labels_are_learnable_by_a_tiny_classifier() -> None:
    imgs, plan = render_phantoms(PhantomConfig(n=240, size=64, seed=7))
    y = np.array([m["label"] for m in plan])
    groups = [m["group"] for m in plan]
    feats = (imgs.astype(np.float32) / 255.0).reshape(len(imgs), 8, 8, 8, 8).mean(axis=(2, 4)).reshape(len(imgs), -1)
    acc = cross_val_score(LogisticRegression(max_iter=2000), feats, y, cv=GroupKFold(4), groups=groups).mean()
    chance = max(y.mean(), 1 - y.mean())
    assert acc > chance + 0.1, (acc, chance)


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    imgs, _ = render_phantoms(PhantomConfig(n=200, size=64, seed=0))
    assert imgs.shape == (200, 64, 64) and imgs.dtype == np.uint8
    assert time.perf_counter() - start < 15.0  # ~1 s on 2 cores; loose for loaded CI machines


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli out é"
    assert main(["phantoms", "--out", str(out), "--n", "5", "--size", "32", "--seed", "2"]) == 0
    assert "labels.csv" in capsys.readouterr().out
    assert len(read_rows(out / "labels.csv")) == 5
    assert main(["phantoms", "--out", str(tmp_path / "x"), "--n", "0"]) == 2
    assert "option --n: must be an integer ≥ 1" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["phantoms", "--out", str(tmp_path / "file"), "--n", "1"]) == 2

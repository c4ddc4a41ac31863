"""Labeled data and evaluation protocols (Section 3.1): stratified, patient-disjoint folds; BUS-BRA's own folds."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d2mae.data.folds import crossing_groups, make_folds
from d2mae.data.labels import load_labeled
from d2mae.runtime.errors import D2maeError


def write_labeled(root: Path, n: int = 60, malignant_every: int = 3, views: int = 2, size: int = 20,
                  extra: dict[str, list[str]] | None = None, name: str = "labels.csv") -> Path:
    """Tiny PNGs + labels.csv (path,label,group[,extra]); ``views`` images per patient share its label."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        patient = i // views
        label = "malignant" if patient % malignant_every == 0 else "benign"
        path = root / "img" / f"im{i:03d}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)
        row = {"path": f"img/im{i:03d}.png", "label": label, "group": f"p{patient:03d}"}
        for k, v in (extra or {}).items():
            row[k] = v[i]
        rows.append(row)
    out = root / name
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def _parts_disjoint(folds, n):
    for f in folds:
        allp = np.concatenate([f.train, f.val, f.test])
        assert len(allp) == len(set(allp.tolist())) == n


def test_kfold_is_stratified_and_patient_disjoint(tmp_path: Path) -> None:
    labeled = load_labeled(write_labeled(tmp_path, n=120))
    folds = make_folds(labeled, "kfold:5", seed=3)
    assert [f.name for f in folds] == ["1", "2", "3", "4", "5"]
    _parts_disjoint(folds, 120)
    tests = np.concatenate([f.test for f in folds])
    assert sorted(tests.tolist()) == list(range(120))  # every image is tested exactly once
    share = labeled.labels.mean()
    groups = np.array(labeled.groups)
    for f in folds:
        assert crossing_groups(labeled, f) == []  # no patient in two parts
        assert not set(groups[f.test]) & set(groups[f.train])
        for part in (f.train, f.val, f.test):
            assert abs(labeled.labels[part].mean() - share) < 0.12  # stratified
        assert 0.15 < len(f.val) / 120 < 0.25  # validation = one (k-1)-th of the training part


def test_kfold_without_groups_and_same_seed_same_folds(tmp_path: Path) -> None:
    path = write_labeled(tmp_path, n=50)
    labeled = load_labeled(path)
    labeled.groups = None
    a = make_folds(labeled, "kfold:5", seed=1)
    b = make_folds(labeled, "kfold:5", seed=1)
    c = make_folds(labeled, "kfold:5", seed=2)
    assert all((x.test == y.test).all() and (x.val == y.val).all() for x, y in zip(a, b))
    assert any(not np.array_equal(x.test, y.test) for x, y in zip(a, c))
    counts = [Counter(labeled.labels[f.test].tolist()) for f in a]
    assert max(c[1] for c in counts) - min(c[1] for c in counts) <= 1  # StratifiedKFold


@pytest.mark.parametrize("grouped", [True, False])
def test_split_311(tmp_path: Path, grouped: bool) -> None:
    labeled = load_labeled(write_labeled(tmp_path, n=100))
    if not grouped:
        labeled.groups = None
    (fold,) = make_folds(labeled, "split:3:1:1", seed=0)
    _parts_disjoint([fold], 100)
    assert 50 <= len(fold.train) <= 70 and 12 <= len(fold.val) <= 28 and 12 <= len(fold.test) <= 28
    assert crossing_groups(labeled, fold) == []


def test_csv_split_column_folds_subset_and_holdout(tmp_path: Path) -> None:
    n = 40
    split = ["test" if i % 5 == 0 else "val" if i % 5 == 1 else "train" for i in range(n)]
    fold = [str(1 + (i // 2) % 4) for i in range(n)]
    path = write_labeled(tmp_path, n=n, extra={"split": split, "fold": fold})
    folds = make_folds(load_labeled(path, fold_column="fold"), "csv", folds="1,3")
    assert [x.name for x in folds] == ["1", "3"]
    assert all((np.array(fold)[x.test] == x.name).all() for x in folds)
    only_split = load_labeled(write_labeled(tmp_path, n=n, extra={"split": split}, name="s.csv"))
    (s,) = make_folds(only_split, "csv")
    assert set(np.array(split)[s.test]) == {"test"} and set(np.array(split)[s.val]) == {"val"}
    hold = tmp_path / "hold.txt"
    hold.write_text("img/im000.png\nim001.png\n" + "\n".join(f"img/im{i:03d}.png" for i in range(2, 12)) + "\n")
    (h,) = make_folds(only_split, f"holdout:{hold}")
    assert sorted(h.test.tolist()) == list(range(12))
    with pytest.raises(D2maeError, match="fold.*5 do not exist"):
        make_folds(load_labeled(path, fold_column="fold"), "csv", folds="1,5")


def test_csv_protocol_with_both_columns_uses_the_fold_column(tmp_path: Path) -> None:
    n = 40
    split = ["test" if i % 5 == 0 else "train" for i in range(n)]
    fold = [str(1 + (i // 2) % 4) for i in range(n)]
    labeled = load_labeled(write_labeled(tmp_path, n=n, extra={"split": split, "fold": fold}))
    assert [f.name for f in make_folds(labeled, "csv")] == ["1", "2", "3", "4"]


def test_image_folder_layout(tmp_path: Path) -> None:
    for cls, n in (("benign", 4), ("malignant", 3)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((20, 20), 10 * i, np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    labeled = load_labeled(tmp_path / "data")
    assert labeled.classes == ["benign", "malignant"]
    assert labeled.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert all(Path(r).is_file() for r in labeled.refs)


def test_busbra_folds_from_the_datasets_own_csv(busbra: Path) -> None:
    labeled = load_labeled(busbra / "bus_data.csv", path_column="ID", label_column="Pathology", group_column="Case",
                           image_root=busbra / "images", image_ext=".png", folds_csv=busbra / "5-fold-cv.csv")
    assert len(labeled) == 1875 and labeled.classes == ["benign", "malignant"]
    assert Counter(labeled.labels.tolist()) == {0: 1268, 1: 607}
    folds = make_folds(labeled, "csv")
    assert [f.name for f in folds] == ["1", "2", "3", "4", "5"]
    rows = {r["ID"]: r for r in csv.DictReader((busbra / "5-fold-cv.csv").open())}
    ids = np.array(labeled.ids)
    for f in folds:
        assert all(rows[i]["kFold"] == f.name for i in ids[f.test])
        assert all(rows[i][f"valid_{f.name}"] == "0" for i in ids[f.val])
        assert all(rows[i][f"valid_{f.name}"] == "1" for i in ids[f.train])
        assert len(f.train) + len(f.val) + len(f.test) == 1875
    assert len(folds[0].test) == 376
    assert "Device" in labeled.columns and len(set(labeled.columns["Device"])) == 4


def test_bad_labels_are_clear_errors(tmp_path: Path) -> None:
    path = write_labeled(tmp_path, n=20)
    text = path.read_text()
    bad = tmp_path / "bad_paths.csv"
    bad.write_text(text + "img/nope1.png,benign,x\nimg/nope2.png,benign,y\n")
    with pytest.raises(D2maeError, match=r"bad_paths.csv: 2 of 22 image path\(s\).*do not exist.*nope1"):
        load_labeled(bad)
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text(text.replace("img/im003.png,benign", "img/im003.png,"))
    with pytest.raises(D2maeError, match="no value in label column 'label'.*im003"):
        load_labeled(nolabel)
    one = tmp_path / "one.csv"
    one.write_text(text.replace("malignant", "benign"))
    with pytest.raises(D2maeError, match="only one class"):
        load_labeled(one)
    with pytest.raises(D2maeError, match="no column 'Pathology'.*--label-column"):
        load_labeled(path, label_column="Pathology")
    labeled = load_labeled(path)
    with pytest.raises(D2maeError, match="class 'benign' has only 6 patient group"):
        make_folds(labeled, "kfold:9")
    labeled.groups = None
    with pytest.raises(D2maeError, match="class 'malignant' has only 8 image.* fewer than the 9"):
        make_folds(labeled, "kfold:9")
    with pytest.raises(D2maeError, match="unknown protocol"):
        make_folds(labeled, "loo")
    with pytest.raises(D2maeError, match="no split or fold column"):
        make_folds(labeled, "csv")
    hold = tmp_path / "h.txt"
    hold.write_text("img/im000.png\nimg/unknown.png\n")
    with pytest.raises(D2maeError, match="1 entry.*unknown.png"):
        make_folds(labeled, f"holdout:{hold}")


def test_class_absent_from_test_is_refused(tmp_path: Path) -> None:
    n = 30
    labels_ = ["malignant" if i // 2 % 3 == 0 else "benign" for i in range(n)]
    split = ["test" if lab == "benign" and i % 4 == 0 else "val" if i % 5 == 1 else "train"
             for i, lab in enumerate(labels_)]
    labeled = load_labeled(write_labeled(tmp_path, n=n, extra={"split": split}))
    with pytest.raises(D2maeError, match="malignant are absent from the test part"):
        make_folds(labeled, "csv")


def test_a_label_fraction_is_stratified_keeps_patients_whole_and_is_the_same_for_every_call() -> None:
    """label_subset: about the asked share of each class, no patient group split, validation/test untouched."""
    from d2mae.data.folds import Fold, label_subset
    from d2mae.data.labels import LabeledSet

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 4, size=150)  # 150 patients with 1-3 images each
    groups = [f"p{g}" for g, k in enumerate(sizes) for _ in range(k)]
    patient_label = rng.random(150) < 0.3  # 30% malignant patients
    labels = np.array([int(patient_label[int(g[1:])]) for g in groups])
    n = len(labels)
    lab = LabeledSet([f"/x/{i}.png" for i in range(n)], [str(i) for i in range(n)], labels, ["benign", "malignant"],
                     groups=groups)
    fold = Fold("1", np.arange(0, n - 60), np.arange(n - 60, n - 30), np.arange(n - 30, n), 1)
    for share in (0.1, 0.25, 0.5):
        sub = label_subset(lab, fold, share, seed=3)
        assert np.array_equal(sub.val, fold.val) and np.array_equal(sub.test, fold.test)
        assert set(sub.train) <= set(fold.train)
        for c in (0, 1):
            have, want = (labels[sub.train] == c).sum(), share * (labels[fold.train] == c).sum()
            assert abs(have - want) <= 3, (share, c, have, want)  # within one patient of the target
        picked = {groups[i] for i in sub.train}
        assert all(i in set(sub.train) for i in fold.train if groups[i] in picked)  # whole patients only
        assert np.array_equal(sub.train, label_subset(lab, fold, share, seed=3).train)
    assert label_subset(lab, fold, 1.0) is fold

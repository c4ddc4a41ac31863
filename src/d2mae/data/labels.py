"""Labeled images and evaluation protocols for fine-tuning (Section 3.1, "Data").

The paper evaluates with three protocols: a 3:1:1 train/validation/test split (GE4K), stratified five-fold
cross-validation (LEPset) and a data set's own split (MMOTU). This module reads labeled images and turns a protocol
string into a list of :class:`Fold` objects:

* ``split:3:1:1`` — one stratified, seeded split in those proportions; patient-grouped when a group column exists
  (then the proportions are met to within one patient group's size, through :class:`StratifiedGroupKFold`).
* ``kfold:5`` — stratified k-fold; :class:`StratifiedGroupKFold` when groups exist so that no patient crosses folds.
  Each fold's validation part is carved out of its training part, stratified and grouped the same way, one
  (k-1)-th of it: for k = 5 that is 3:1:1 per fold.
* ``csv`` — the split or fold column of the labels (or ``--folds-csv``) file, e.g. BUS-BRA's ``5-fold-cv.csv``:
  ``kFold`` is each image's test fold and ``valid_k`` marks, for fold k, training (1), validation (0) and test (NaN).
  Without ``valid_k`` columns the validation part is carved out of the training part as for ``kfold``.
* ``holdout:FILE`` — a fixed test list (a text file with one path or ID per line, or a CSV with the path column);
  validation is carved out of the rest.

Labeled data come from a folder per class (ImageFolder layout) or a CSV with a path and a label column and optional
group (patient), split and fold columns; column names are options, so BUS-BRA's own files work directly::

    load_labeled("bus_data.csv", path_column="ID", label_column="Pathology", group_column="Case",
                 image_root="images", image_ext=".png", folds_csv="5-fold-cv.csv")
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from d2mae.runtime.errors import D2maeError, shown

_MISSING = {"", "nan", "na", "n/a", "none", "null"}
_SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "dev": "val", "test": "test", "testing": "test"}
SPLITS = ("train", "val", "test")


def _first(items: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f" … ({len(items)} in all)" if len(items) > n else "")


def _is_missing(value: str | None) -> bool:
    return value is None or value.strip().lower() in _MISSING


@dataclass
class LabeledSet:
    """Labeled images: one entry per image, in the order of the source file (or sorted, for a folder).

    Attributes:
        refs: image references (absolute paths) that :func:`d2mae.data.decode.load_image` opens.
        ids: the image names as the source wrote them (CSV path/ID value, or the path for a folder).
        labels: class indices [n] into ``classes``.
        classes: class names, sorted (or in the order given with ``classes=``).
        groups: patient/group id per image, or ``None``.
        split: ``train``/``val``/``test`` per image from a split column, or ``None``.
        fold: test-fold name per image from a fold column (BUS-BRA ``kFold``), or ``None``.
        fold_roles: for each fold name, the role (``train``/``val``/``test``) of every image, from ``valid_<k>``
            columns, or ``None``.
        columns: every column of the labels CSV, per image (for ``--keep-columns``; e.g. ``Device``).
        source: the file or folder the labels came from (for messages).
    """

    refs: list[str]
    ids: list[str]
    labels: np.ndarray
    classes: list[str]
    groups: list[str] | None = None
    split: list[str] | None = None
    fold: list[str] | None = None
    fold_roles: dict[str, list[str]] | None = None
    columns: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.refs)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "LabeledSet":
        """The images at positions ``idx`` (fold information kept per image)."""
        idx = [int(i) for i in idx]
        pick = lambda seq: None if seq is None else [seq[i] for i in idx]  # noqa: E731
        return LabeledSet(
            refs=pick(self.refs), ids=pick(self.ids), labels=self.labels[idx], classes=list(self.classes),
            groups=pick(self.groups), split=pick(self.split), fold=pick(self.fold),
            fold_roles=None if self.fold_roles is None else {k: pick(v) for k, v in self.fold_roles.items()},
            columns={k: pick(v) for k, v in self.columns.items()}, source=self.source)


@dataclass
class Fold:
    """One train/validation/test partition, as index arrays into a :class:`LabeledSet`.

    ``name`` is how outputs call it (``fold_<name>``); ``number`` is its 1-based place among all of the protocol's
    folds, which seeds its training (the same whichever folds a run selects).
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    number: int = 1

    def parts(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test}


# ----------------------------------------------------------------------------------------------------------- reading


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise D2maeError(f"labels file {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise D2maeError(f"labels file {path} is not a readable CSV ({exc})") from None
    rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in r.items()} for r in rows]
    if not header or not rows:
        raise D2maeError(f"labels file {path} has no rows; it needs a header line and one row per image")
    return header, rows


def _refuse_duplicates(refs: list[str], ids: list[str], names: list[str], labels: Path, path_column: str) -> None:
    """Each image once: rows are compared by the file they resolve to (``benign/x.png``, ``./benign/x.png`` and a
    symbolic link to it are one image), so no image trains twice or under two labels."""
    first: dict[str, int] = {}
    pairs = []
    for i, ref in enumerate(refs):
        file, _, frame = ref.partition("#")
        key = os.path.realpath(file) + ("#" + frame if frame else "")
        if key in first:
            pairs.append((first[key], i))
        else:
            first[key] = i
    if pairs:
        a, b = pairs[0]
        labels_differ = sum(names[i] != names[j] for i, j in pairs)
        what = f", {labels_differ} of them with different labels" if labels_differ else ""
        raise D2maeError(f"{labels}: column '{path_column}' lists {len(pairs)} image(s) more than once{what} (e.g. "
                         f"{shown(ids[b])} is the file of {shown(ids[a])}); each image must appear once")


def _need_column(header: list[str], column: str, path: Path, option: str) -> None:
    if column not in header:
        raise D2maeError(f"{path} has no column '{column}' (option {option}); its columns are: {', '.join(header)}")


def _resolve(value: str, root: Path, ext: str) -> str:
    if ext and not value.lower().endswith(ext.lower()):
        value = value + ext
    p = Path(value)
    return os.path.abspath(p if p.is_absolute() else root / p)


def _folder_labels(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """ImageFolder layout: one sub-folder per class, images anywhere below it."""
    from d2mae.data.sources import find_images

    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise D2maeError(f"labels folder {folder} has no class sub-folders; use one sub-folder per class "
                         "(ImageFolder layout) or a CSV with path,label columns")
    refs, ids, names = [], [], []
    empty = []
    for d in class_dirs:
        try:
            found = find_images([d])
        except D2maeError:
            empty.append(d.name)
            continue
        for ref in found:
            refs.append(ref)
            ids.append(os.path.relpath(ref.split("#")[0], folder))
            names.append(d.name)
    if not refs:
        raise D2maeError(f"labels folder {folder} holds no images in its class sub-folders")
    if empty:
        raise D2maeError(f"labels folder {folder}: class folder(s) {', '.join(repr(e) for e in empty[:5])} hold no "
                         "images; add images to them or remove them (a class without images cannot be learned)")
    return refs, ids, names


def load_labeled(labels: str | Path, *, path_column: str = "path", label_column: str = "label",
                 group_column: str | None = None, split_column: str | None = None, fold_column: str | None = None,
                 image_root: str | Path | None = None, image_ext: str = "", folds_csv: str | Path | None = None,
                 classes: Sequence[str] | None = None, check_files: bool = True) -> LabeledSet:
    """Read labeled images from a class-per-folder tree or a CSV.

    Args:
        labels: a folder (ImageFolder layout) or a CSV file.
        path_column: CSV column with the image path or ID (BUS-BRA: ``ID``).
        label_column: CSV column with the class name (BUS-BRA: ``Pathology``).
        group_column: patient/group column (BUS-BRA: ``Case``); ``None`` uses a column named ``group`` if present.
        split_column: column with train/val/test; ``None`` uses ``split`` if present.
        fold_column: column with each image's test fold; ``None`` uses ``fold`` or ``kFold`` if present.
        image_root: folder the paths are relative to (default: the CSV's folder).
        image_ext: extension appended to path values that lack it (BUS-BRA: ``.png``).
        folds_csv: a second CSV joined on ``path_column`` that adds fold/split columns (BUS-BRA's ``5-fold-cv.csv``).
        classes: class order (default: sorted class names).
        check_files: refuse paths that do not exist.

    Raises:
        D2maeError: unknown paths (count and first few), missing labels, one class only, bad fold columns.
    """
    labels = Path(labels)
    columns: dict[str, list[str]] = {}
    groups = split = fold = None
    fold_roles = None
    if labels.is_dir():
        if folds_csv:
            raise D2maeError("needs a labels CSV (--labels FILE.csv), not a class-per-folder tree", option="folds_csv")
        refs, ids, names = _folder_labels(labels)
    else:
        header, rows = _read_csv(labels)
        _need_column(header, path_column, labels, "--path-column")
        _need_column(header, label_column, labels, "--label-column")
        root = Path(image_root) if image_root else labels.parent
        if image_root and not root.is_dir():
            raise D2maeError(f"folder {root} does not exist", option="image_root")
        ids = [r.get(path_column, "") for r in rows]
        empty = [i + 2 for i, v in enumerate(ids) if _is_missing(v)]
        if empty:
            raise D2maeError(f"{labels}: column '{path_column}' is empty in {len(empty)} row(s) "
                             f"(lines {_first([str(x) for x in empty])}); every row needs an image path")
        names = [r.get(label_column, "") for r in rows]
        missing = [ids[i] for i, v in enumerate(names) if _is_missing(v)]
        if missing:
            raise D2maeError(f"{labels}: {len(missing)} image(s) have no value in label column '{label_column}' "
                             f"({_first(missing)}); fill the labels or remove those rows")
        refs = [_resolve(v, root, image_ext) for v in ids]
        _refuse_duplicates(refs, ids, names, labels, path_column)
        if check_files:
            absent = [ids[i] for i, r in enumerate(refs) if not os.path.isfile(r.split("#")[0])]
            if absent:
                where = f"under {root}" + (f" with extension {image_ext}" if image_ext else "")
                raise D2maeError(f"{labels}: {len(absent)} of {len(refs)} image path(s) in column '{path_column}' "
                                 f"do not exist {where} (first: {_first(absent)}); check --image-root/--image-ext")
        columns = {h: [r.get(h, "") for r in rows] for h in header}
        if folds_csv:
            _join_folds_csv(Path(folds_csv), ids, columns, path_column, label_column, names)
        group_column = group_column or ("group" if "group" in columns else None)
        if group_column:
            if group_column not in columns:
                raise D2maeError(f"{labels} has no column '{group_column}'; its columns are: {', '.join(columns)}",
                                 option="group_column")
            groups = columns[group_column]
            nogroup = [ids[i] for i, g in enumerate(groups) if _is_missing(g)]
            if nogroup:
                raise D2maeError(f"{labels}: {len(nogroup)} image(s) have no value in group column "
                                 f"'{group_column}' ({_first(nogroup)})")
        split_column = split_column or ("split" if "split" in columns else None)
        if split_column:
            if split_column not in columns:
                raise D2maeError(f"{labels} has no column '{split_column}'", option="split_column")
            split = []
            for i, v in enumerate(columns[split_column]):
                word = _SPLIT_WORDS.get(v.strip().lower())
                if word is None:
                    raise D2maeError(f"{labels}: split column '{split_column}' has value {shown(v)} for {ids[i]}; "
                                     "use train, val or test")
                split.append(word)
        if fold_column is None:
            fold_column = next((c for c in ("fold", "kFold") if c in columns), None)
        if fold_column:
            if fold_column not in columns:
                raise D2maeError(f"{labels} has no column '{fold_column}'", option="fold_column")
            fold = [_fold_name(v) for v in columns[fold_column]]
            nofold = [ids[i] for i, f in enumerate(fold) if f == ""]
            if nofold:
                raise D2maeError(f"{labels}: {len(nofold)} image(s) have no value in fold column '{fold_column}' "
                                 f"({_first(nofold)})")
            fold_roles = _fold_roles(columns, fold, ids, labels)

    class_names = sorted(set(names)) if classes is None else list(classes)
    unknown = sorted(set(names) - set(class_names))
    if unknown:
        raise D2maeError(f"{labels}: label(s) {_first(unknown)} are not among the classes given ({class_names})")
    if len(set(names)) < 2:
        raise D2maeError(f"{labels}: only one class ({shown(names[0])}) in column '{label_column}'; a classifier needs "
                         "at least two")
    index = {c: i for i, c in enumerate(class_names)}
    return LabeledSet(refs=refs, ids=ids, labels=np.array([index[n] for n in names], dtype=np.int64),
                      classes=class_names, groups=groups, split=split, fold=fold, fold_roles=fold_roles,
                      columns=columns, source=str(labels))


def _fold_name(value: str) -> str:
    """'3', '3.0' -> '3'; other names kept; missing -> ''."""
    if _is_missing(value):
        return ""
    try:
        f = float(value)
        if f.is_integer():
            return str(int(f))
    except ValueError:
        pass
    return value.strip()


def _join_folds_csv(path: Path, ids: list[str], columns: dict[str, list[str]], key: str, label_column: str,
                    names: list[str]) -> None:
    """Add the columns of ``path`` (joined on ``key``) to ``columns`` in place; labels must agree if repeated."""
    header, rows = _read_csv(path)
    _need_column(header, key, path, "--path-column (the join key of --folds-csv)")
    by_id: dict[str, dict[str, str]] = {}
    for r in rows:
        by_id[r[key]] = r
    absent = [i for i in ids if i not in by_id]
    if absent:
        raise D2maeError(f"--folds-csv {path}: {len(absent)} image(s) of the labels file are not listed in it "
                         f"(first: {_first(absent)})")
    if label_column in header:
        clash = [i for i, n in zip(ids, names) if by_id[i][label_column] != n]
        if clash:
            raise D2maeError(f"--folds-csv {path}: the label column '{label_column}' disagrees with the labels file "
                             f"for {len(clash)} image(s) ({_first(clash)})")
    for h in header:
        if h in (key, label_column):
            continue
        columns[h] = [by_id[i].get(h, "") for i in ids]


def _fold_roles(columns: dict[str, list[str]], fold: list[str], ids: list[str], source: Path
                ) -> dict[str, list[str]] | None:
    """BUS-BRA's ``valid_<k>`` columns: 1 train, 0 validation, NaN test (must match the fold column)."""
    names = sorted(set(fold), key=_fold_sort_key)
    cols = {k: f"valid_{k}" for k in names if f"valid_{k}" in columns}
    if not cols:
        return None
    if len(cols) != len(names):
        lacking = [k for k in names if k not in cols]
        raise D2maeError(f"{source}: validation columns valid_<k> exist but not for fold(s) {_first(lacking)}")
    roles: dict[str, list[str]] = {}
    for k, col in cols.items():
        r = []
        for i, v in enumerate(columns[col]):
            if _is_missing(v):
                role = "test"
            elif _fold_name(v) == "1":
                role = "train"
            elif _fold_name(v) == "0":
                role = "val"
            else:
                raise D2maeError(f"{source}: column '{col}' has value {shown(v)} for {ids[i]}; use 1 (train), "
                                 "0 (validation) or empty/NaN (test)")
            if (role == "test") != (fold[i] == k):
                raise D2maeError(f"{source}: {ids[i]} has test fold {fold[i]} but column '{col}' says {role}")
            r.append(role)
        roles[k] = r
    return roles


def _fold_sort_key(name: str) -> tuple[int, float, str]:
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


# ------------------------------------------------------------------------------------------------------ protocols


def parse_protocol(protocol: str) -> tuple[str, list[str]]:
    """``'kfold:5'`` -> ``('kfold', ['5'])``; unknown kinds are a clear error."""
    kind, *params = protocol.strip().split(":")
    kind = kind.lower()
    if kind == "holdout":  # the file name may itself contain ':' (Windows drive letters)
        params = [protocol.split(":", 1)[1]] if ":" in protocol else []
    if kind not in ("split", "kfold", "csv", "holdout"):
        raise D2maeError(f"unknown protocol '{protocol}'; use split:3:1:1, kfold:5, csv or "
                         "holdout:FILE", option="protocol")
    return kind, params


def make_folds(labeled: LabeledSet, protocol: str = "split:3:1:1", seed: int = 0,
               folds: str | Sequence[str] | None = None) -> list[Fold]:
    """Turn a protocol string into train/validation/test folds (see the module docstring).

    Args:
        labeled: the labeled images.
        protocol: ``split:A:B:C``, ``kfold:K``, ``csv`` or ``holdout:FILE``.
        seed: seeds every random split (same seed -> same folds).
        folds: run only these folds (``"1,3"`` or a list of names).

    Raises:
        D2maeError: a bad protocol, k above a class's count, a class absent from a fold's train or test part.
    """
    kind, params = parse_protocol(protocol)
    y = labeled.labels
    all_idx = np.arange(len(labeled))
    if kind == "split":
        out = [_protocol_split(labeled, params, seed, protocol)]
    elif kind == "kfold":
        if len(params) != 1 or not params[0].isdigit() or int(params[0]) < 2:
            raise D2maeError(f"{protocol}: use kfold:K with an integer K ≥ 2 (e.g. kfold:5)", option="protocol")
        k = int(params[0])
        _check_k(labeled, all_idx, k, f"protocol {protocol}")
        out = []
        for i, (train, test) in enumerate(_splitter(labeled, k, seed).split(all_idx, y, labeled.groups)):
            train, val = _carve_val(labeled, train, max(2, k - 1), seed + 1 + i, f"fold {i + 1} of {protocol}")
            out.append(Fold(str(i + 1), train, val, np.sort(test)))
    elif kind == "csv":
        out = _protocol_csv(labeled, seed)
    else:
        if not params or not params[0]:
            raise D2maeError("holdout:FILE needs a file with the test images (one per line)", option="protocol")
        test = _holdout_indices(labeled, Path(params[0]))
        rest = np.setdiff1d(all_idx, test)
        train, val = _carve_val(labeled, rest, 4, seed, f"the non-test part of {protocol}")
        out = [Fold("1", train, val, test)]
    for i, f in enumerate(out):
        f.number = i + 1
    out = select_folds(out, folds)
    for f in out:
        check_fold(labeled, f, protocol)
    return out


def select_folds(folds: list[Fold], which: str | Sequence[str] | None) -> list[Fold]:
    """Keep the folds named in ``which`` (``"1,3"``); ``None`` keeps all."""
    if which is None or which == "" or which == []:
        return folds
    names = [s.strip() for s in which.split(",")] if isinstance(which, str) else [str(s) for s in which]
    names = [_fold_name(n) or n for n in names if n]
    known = [f.name for f in folds]
    bad = [n for n in names if n not in known]
    if bad:
        raise D2maeError(f"fold(s) {', '.join(bad)} do not exist; this protocol has folds "
                         f"{', '.join(known)}", option="folds")
    return [f for f in folds if f.name in names]


def _splitter(labeled: LabeledSet, k: int, seed: int) -> StratifiedKFold | StratifiedGroupKFold:
    if labeled.groups is not None:
        return StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)


def _check_k(labeled: LabeledSet, idx: np.ndarray, k: int, what: str) -> None:
    """k must not exceed any class's image count (nor its patient count, when grouped)."""
    y = labeled.labels[idx]
    for c, name in enumerate(labeled.classes):
        members = idx[y == c]
        if not len(members):
            raise D2maeError(f"{what}: class '{name}' has no images; check its label spelling in the labels and in "
                             "--classes, or leave it out of --classes")
        if len(members) < k:
            raise D2maeError(f"{what}: class '{name}' has only {len(members)} image(s), fewer than the {k} parts "
                             f"asked for; use fewer folds (≤ {len(members)}) or more data")
        if labeled.groups is not None:
            n_groups = len({labeled.groups[i] for i in members})
            if n_groups < k:
                raise D2maeError(f"{what}: class '{name}' has only {n_groups} patient group(s), fewer than the {k} "
                                 f"parts asked for; use fewer folds (≤ {n_groups})")


def _first_split(labeled: LabeledSet, idx: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, one stratified (grouped) k-th part)."""
    groups = None if labeled.groups is None else [labeled.groups[i] for i in idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" — checked by _check_k / check_fold
        rest, part = next(_splitter(labeled, k, seed).split(idx, labeled.labels[idx], groups))
    return np.sort(idx[rest]), np.sort(idx[part])


def _carve_val(labeled: LabeledSet, train: np.ndarray, k: int, seed: int, what: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """Carve a stratified (patient-grouped) 1/k validation part out of ``train``."""
    _check_k(labeled, np.asarray(train), k, f"validation split of {what}")
    return _first_split(labeled, np.asarray(train), k, seed)


def _protocol_split(labeled: LabeledSet, params: list[str], seed: int, protocol: str) -> Fold:
    try:
        ratios = [float(p) for p in params]
    except ValueError:
        ratios = []
    if len(ratios) != 3 or min(ratios) < 0 or ratios[0] <= 0 or ratios[1] <= 0 or ratios[2] <= 0:
        raise D2maeError(f"{protocol}: use split:TRAIN:VAL:TEST with three positive numbers "
                         "(e.g. split:3:1:1)", option="protocol")
    a, b, c = ratios
    idx = np.arange(len(labeled))
    if labeled.groups is None:
        y = labeled.labels
        _check_k(labeled, idx, 3, f"protocol {protocol}")
        rest, test = train_test_split(idx, test_size=c / (a + b + c), stratify=y, random_state=seed)
        train, val = train_test_split(rest, test_size=b / (a + b), stratify=y[rest], random_state=seed + 1)
        return Fold("1", np.sort(train), np.sort(val), np.sort(test))
    k_test = max(2, round((a + b + c) / c))
    k_val = max(2, round((a + b) / b))
    _check_k(labeled, idx, k_test, f"protocol {protocol}")
    rest, test = _first_split(labeled, idx, k_test, seed)
    train, val = _carve_val(labeled, rest, k_val, seed + 1, protocol)
    return Fold("1", train, val, test)


def _protocol_csv(labeled: LabeledSet, seed: int) -> list[Fold]:
    if labeled.fold is not None:
        names = sorted(set(labeled.fold), key=_fold_sort_key)
        fold_arr = np.array(labeled.fold)
        out = []
        for i, k in enumerate(names):
            test = np.flatnonzero(fold_arr == k)
            if labeled.fold_roles is not None:
                roles = np.array(labeled.fold_roles[k])
                out.append(Fold(k, np.flatnonzero(roles == "train"), np.flatnonzero(roles == "val"), test))
            else:
                rest = np.flatnonzero(fold_arr != k)
                train, val = _carve_val(labeled, rest, max(2, len(names) - 1), seed + 1 + i, f"fold {k}")
                out.append(Fold(k, train, val, test))
        return out
    if labeled.split is not None:
        s = np.array(labeled.split)
        train, val, test = (np.flatnonzero(s == p) for p in SPLITS)
        if len(val) == 0:
            train, val = _carve_val(labeled, train, 4, seed, "the train split")
        return [Fold("1", train, val, test)]
    raise D2maeError(f"csv: {labeled.source} has no split or fold column; add one (split = "
                     "train/val/test, or fold), name it with --split-column/--fold-column, give --folds-csv, or use "
                     "--protocol split:3:1:1 / kfold:5", option="protocol")


def _holdout_indices(labeled: LabeledSet, path: Path) -> np.ndarray:
    if not path.is_file():
        raise D2maeError(f"holdout: file {path} does not exist", option="protocol")
    text = path.read_text(encoding="utf-8-sig").splitlines()
    entries = [line.strip() for line in text if line.strip() and not line.startswith("#")]
    if entries and ("," in entries[0] or entries[0].lower() == "path"):  # a CSV with a header
        header, rows = _read_csv(path)
        col = "path" if "path" in header else header[0]
        entries = [r[col] for r in rows if r.get(col)]
    lookup: dict[str, int] = {}
    for i, (ref, id_) in enumerate(zip(labeled.refs, labeled.ids)):
        for key in (ref, id_, os.path.basename(ref), os.path.splitext(id_)[0]):
            lookup.setdefault(key, i)
    found, unknown = [], []
    for e in entries:
        cand = [e, os.path.abspath(path.parent / e), os.path.basename(e)]
        hit = next((lookup[c] for c in cand if c in lookup), None)
        (unknown.append(e) if hit is None else found.append(hit))
    if unknown:
        raise D2maeError(f"holdout list {path}: {len(unknown)} entry(ies) match no labeled image "
                         f"(first: {_first(unknown)})")
    if not found:
        raise D2maeError(f"holdout list {path} is empty; list the test images, one per line")
    return np.array(sorted(set(found)), dtype=np.int64)


def check_fold(labeled: LabeledSet, fold: Fold, protocol: str = "") -> None:
    """Every class must be present in the training and test parts; the validation part must not be empty."""
    where = f"fold {fold.name}" + (f" of --protocol {protocol}" if protocol else "")
    for part in ("train", "test"):
        idx = getattr(fold, part)
        present = set(labeled.labels[idx].tolist())
        absent = [c for i, c in enumerate(labeled.classes) if i not in present]
        if absent:
            raise D2maeError(f"{where}: class(es) {', '.join(absent)} are absent from the {part} part "
                             f"({len(idx)} images); use fewer folds, another split or more data")
    if len(fold.val) == 0:
        raise D2maeError(f"{where}: the validation part is empty; model selection needs validation images")
    present = set(labeled.labels[fold.val].tolist())
    absent = [c for i, c in enumerate(labeled.classes) if i not in present]
    if absent:
        warnings.warn(f"{where}: class(es) {', '.join(absent)} are absent from the validation part; macro-F1 "
                      "model selection will be noisy", stacklevel=2)


def crossing_groups(labeled: LabeledSet, fold: Fold) -> list[str]:
    """Patient groups that appear in more than one part of ``fold`` (empty when groups are unknown)."""
    if labeled.groups is None:
        return []
    seen: dict[str, set[str]] = {}
    for part, idx in fold.parts().items():
        for i in idx:
            seen.setdefault(labeled.groups[i], set()).add(part)
    return sorted(g for g, parts in seen.items() if len(parts) > 1)


def crossing_pairs(labeled: LabeledSet, fold: Fold) -> dict[str, int]:
    """Number of patient groups shared by each pair of parts: ``{"train/val": n, "train/test": n, "val/test": n}``."""
    if labeled.groups is None:
        return {}
    g = np.array(labeled.groups, dtype=object)
    sets = {p: set(g[idx].tolist()) for p, idx in fold.parts().items()}
    return {f"{a}/{b}": len(sets[a] & sets[b]) for a, b in (("train", "val"), ("train", "test"), ("val", "test"))}


def fold_summary(labeled: LabeledSet, fold: Fold) -> str:
    """One line: sizes and class counts of each part."""
    parts = []
    for part, idx in fold.parts().items():
        counts = np.bincount(labeled.labels[idx], minlength=len(labeled.classes))
        parts.append(f"{part} {len(idx)} (" + ", ".join(f"{c} {n}" for c, n in zip(labeled.classes, counts)) + ")")
    return f"fold {fold.name}: " + "; ".join(parts)

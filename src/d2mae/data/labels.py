"""Labeled images for fine-tuning (Section 3.1, "Data"): a labels CSV or a class-per-folder tree as a
:class:`LabeledSet` (paths, classes, patient groups, split and fold columns), every row checked.

The protocols that cut it into folds are :mod:`d2mae.data.folds`. The paper evaluates with three: a 3:1:1
train/validation/test split (GE4K), stratified five-fold cross-validation (LEPset) and a data set's own split
(MMOTU). A protocol string becomes a list of folds:

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

from d2mae.data.sources import find_images
from d2mae.runtime.errors import D2maeError, shown

_MISSING = {"", "nan", "na", "n/a", "none", "null"}
_SPLIT_WORDS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "dev": "val", "test": "test", "testing": "test"}
SPLITS = ("train", "val", "test")


def first_few(items: Sequence[str], n: int = 3) -> str:
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


# ----------------------------------------------------------------------------------------------------------- reading


def read_table_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
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


def _optional_column(columns: dict[str, list[str]], given: str | None, defaults: Sequence[str], labels: Path,
                     option: str) -> str | None:
    """The column an optional option names (``given``), else the first default present; a named column must exist."""
    name = given or next((c for c in defaults if c in columns), None)
    if name and name not in columns:
        raise D2maeError(f"{labels} has no column '{name}'; its columns are: {', '.join(columns)}", option=option)
    return name


def _complete(values: list[str], ids: list[str], labels: Path, what: str) -> list[str]:
    """``values`` when every image has one, else an error naming the first images without."""
    empty = [ids[i] for i, v in enumerate(values) if _is_missing(v)]
    if empty:
        raise D2maeError(f"{labels}: {len(empty)} image(s) have no value in {what} ({first_few(empty)})")
    return values


def _csv_images(labels: Path, path_column: str, label_column: str, image_root: str | Path | None, image_ext: str,
                check_files: bool, allow_outside_root: bool = False
                ) -> tuple[list[str], list[str], list[str], list[str], list[dict[str, str]]]:
    """A labels CSV's image references (resolved and checked), IDs, class names, header and rows."""
    header, rows = read_table_csv(labels)
    _need_column(header, path_column, labels, "--path-column")
    _need_column(header, label_column, labels, "--label-column")
    root = Path(image_root) if image_root else labels.parent
    if image_root and not root.is_dir():
        raise D2maeError(f"folder {root} does not exist", option="image_root")
    ids = [r.get(path_column, "") for r in rows]
    empty = [i + 2 for i, v in enumerate(ids) if _is_missing(v)]
    if empty:
        raise D2maeError(f"{labels}: column '{path_column}' is empty in {len(empty)} row(s) "
                         f"(lines {first_few([str(x) for x in empty])}); every row needs an image path")
    names = [r.get(label_column, "") for r in rows]
    missing = [ids[i] for i, v in enumerate(names) if _is_missing(v)]
    if missing:
        raise D2maeError(f"{labels}: {len(missing)} image(s) have no value in label column '{label_column}' "
                         f"({first_few(missing)}); fill the labels or remove those rows")
    refs = [_resolve(v, root, image_ext) for v in ids]
    if image_root and not allow_outside_root:
        base = os.path.realpath(root)
        outside = [ids[i] for i, r in enumerate(refs)
                   if os.path.commonpath([base, os.path.realpath(r.split("#")[0])]) != base]
        if outside:
            raise D2maeError(f"{labels}: {len(outside)} image path(s) in column '{path_column}' lead outside {root} "
                             f"(absolute, ../ or a link: {first_few(outside)}); fix the paths, or allow it with "
                             "--allow-outside-root", option="image_root")
    _refuse_duplicates(refs, ids, names, labels, path_column)
    if check_files:
        absent = [ids[i] for i, r in enumerate(refs) if not os.path.isfile(r.split("#")[0])]
        if absent:
            where = f"under {root}" + (f" with extension {image_ext}" if image_ext else "")
            raise D2maeError(f"{labels}: {len(absent)} of {len(refs)} image path(s) in column '{path_column}' "
                             f"do not exist {where} (first: {first_few(absent)}); check --image-root/--image-ext")
    return refs, ids, names, header, rows


def labels_inputs(labels: str | Path | None, path_column: str = "path", image_root: str | Path | None = None,
                  image_ext: str = "") -> list[str]:
    """What a labels source brings as a command's inputs (outputs may not go into them): the CSV and every folder
    holding one of its images, or the class-per-folder tree. Unreadable rows are left to :func:`load_labeled`."""
    if not labels:
        return []
    path = Path(labels)
    if not path.is_file():
        return [str(path)]
    try:
        _, rows = read_table_csv(path)
    except D2maeError:
        return [str(path)]
    root = Path(image_root) if image_root else path.parent
    values = [r.get(path_column, "") for r in rows if not _is_missing(r.get(path_column, ""))]
    return [str(path), *sorted({os.path.dirname(_resolve(v, root, image_ext)) for v in values})]


def load_labeled(labels: str | Path, *, path_column: str = "path", label_column: str = "label",
                 group_column: str | None = None, split_column: str | None = None, fold_column: str | None = None,
                 image_root: str | Path | None = None, image_ext: str = "", folds_csv: str | Path | None = None,
                 classes: Sequence[str] | None = None, check_files: bool = True,
                 allow_outside_root: bool = False) -> LabeledSet:
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
        allow_outside_root: follow CSV paths that lead outside ``image_root`` (refused by default).

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
        refs, ids, names, header, rows = _csv_images(labels, path_column, label_column, image_root, image_ext,
                                                     check_files, allow_outside_root)
        columns = {h: [r.get(h, "") for r in rows] for h in header}
        if folds_csv:
            _join_folds_csv(Path(folds_csv), ids, columns, path_column, label_column, names)
        group_column = _optional_column(columns, group_column, ("group",), labels, "group_column")
        if group_column:
            groups = _complete(columns[group_column], ids, labels, f"group column '{group_column}'")
        split_column = _optional_column(columns, split_column, ("split",), labels, "split_column")
        if split_column:
            split = []
            for i, v in enumerate(columns[split_column]):
                word = _SPLIT_WORDS.get(v.strip().lower())
                if word is None:
                    raise D2maeError(f"{labels}: split column '{split_column}' has value {shown(v)} for {ids[i]}; "
                                     "use train, val or test")
                split.append(word)
        fold_column = _optional_column(columns, fold_column, ("fold", "kFold"), labels, "fold_column")
        if fold_column:
            fold = _complete([fold_name(v) for v in columns[fold_column]], ids, labels, f"fold column '{fold_column}'")
            fold_roles = _fold_roles(columns, fold, ids, labels)

    class_names = sorted(set(names)) if classes is None else list(classes)
    alike: dict[str, list[str]] = {}
    for c in sorted(set(names)):
        alike.setdefault(" ".join(c.lower().split()), []).append(c)
    for spellings in (v for v in alike.values() if len(v) > 1):
        warnings.warn(f"{labels}: labels {' and '.join(repr(c) for c in spellings)} differ only in case or spaces, "
                      f"so they are {len(spellings)} classes; fix the spelling if they are one", stacklevel=2)
    unknown = sorted(set(names) - set(class_names))
    if unknown:
        raise D2maeError(f"{labels}: label(s) {first_few(unknown)} are not among the classes given ({class_names})")
    if len(set(names)) < 2:
        raise D2maeError(f"{labels}: only one class ({shown(names[0])}) in column '{label_column}'; a classifier needs "
                         "at least two")
    index = {c: i for i, c in enumerate(class_names)}
    return LabeledSet(refs=refs, ids=ids, labels=np.array([index[n] for n in names], dtype=np.int64),
                      classes=class_names, groups=groups, split=split, fold=fold, fold_roles=fold_roles,
                      columns=columns, source=str(labels))


def fold_name(value: str) -> str:
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
    header, rows = read_table_csv(path)
    _need_column(header, key, path, "--path-column (the join key of --folds-csv)")
    by_id: dict[str, dict[str, str]] = {}
    for r in rows:
        by_id[r[key]] = r
    absent = [i for i in ids if i not in by_id]
    if absent:
        raise D2maeError(f"--folds-csv {path}: {len(absent)} image(s) of the labels file are not listed in it "
                         f"(first: {first_few(absent)})")
    if label_column in header:
        clash = [i for i, n in zip(ids, names) if by_id[i][label_column] != n]
        if clash:
            raise D2maeError(f"--folds-csv {path}: the label column '{label_column}' disagrees with the labels file "
                             f"for {len(clash)} image(s) ({first_few(clash)})")
    for h in header:
        if h in (key, label_column):
            continue
        columns[h] = [by_id[i].get(h, "") for i in ids]


def _fold_roles(columns: dict[str, list[str]], fold: list[str], ids: list[str], source: Path
                ) -> dict[str, list[str]] | None:
    """BUS-BRA's ``valid_<k>`` columns: 1 train, 0 validation, NaN test (must match the fold column)."""
    names = sorted(set(fold), key=fold_sort_key)
    cols = {k: f"valid_{k}" for k in names if f"valid_{k}" in columns}
    if not cols:
        return None
    if len(cols) != len(names):
        lacking = [k for k in names if k not in cols]
        raise D2maeError(f"{source}: validation columns valid_<k> exist but not for fold(s) {first_few(lacking)}")
    roles: dict[str, list[str]] = {}
    for k, col in cols.items():
        r = []
        for i, v in enumerate(columns[col]):
            if _is_missing(v):
                role = "test"
            elif fold_name(v) == "1":
                role = "train"
            elif fold_name(v) == "0":
                role = "val"
            else:
                raise D2maeError(f"{source}: column '{col}' has value {shown(v)} for {ids[i]}; use 1 (train), "
                                 "0 (validation) or empty/NaN (test)")
            if (role == "test") != (fold[i] == k):
                raise D2maeError(f"{source}: {ids[i]} has test fold {fold[i]} but column '{col}' says {role}")
            r.append(role)
        roles[k] = r
    return roles


def fold_sort_key(name: str) -> tuple[int, float, str]:
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


# ------------------------------------------------------------------------------------------------------ protocols



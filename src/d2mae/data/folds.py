"""The evaluation protocols of Section 3.1 as folds of a :class:`~d2mae.data.labels.LabeledSet`: a 3:1:1 split,
stratified (and group-aware) k-fold cross-validation, a dataset's own fold or split column, or a fixed hold-out list."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from d2mae.data.labels import SPLITS, LabeledSet, first_few, fold_name, fold_sort_key, read_table_csv
from d2mae.runtime.errors import D2maeError


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
    names = [fold_name(n) or n for n in names if n]
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
        names = sorted(set(labeled.fold), key=fold_sort_key)
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
        header, rows = read_table_csv(path)
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
                         f"(first: {first_few(unknown)})")
    if not found:
        raise D2maeError(f"holdout list {path} is empty; list the test images, one per line")
    return np.array(sorted(set(found)), dtype=np.int64)


def label_subset(labeled: LabeledSet, fold: Fold, fraction: float, seed: int = 0) -> Fold:
    """The fold with only ``fraction`` of its training images (label-efficiency curves); validation and test stay.

    Stratified and group-aware: each patient group (each image without a group column) counts for its majority class;
    within every class, groups are visited in a seeded random order and each is taken when it brings the class closer
    to ``round(fraction × its training images)`` (at least one group), so no patient is split and the class shares
    stay close to the fold's. The draw depends on (seed, fold number) only: the same subset for every method.
    """
    if fraction >= 1.0:
        return fold
    train = np.asarray(fold.train)
    groups = [labeled.groups[i] for i in train] if labeled.groups else [str(i) for i in train]
    members: dict[str, list[int]] = {}
    for i, g in zip(train, groups):
        members.setdefault(g, []).append(int(i))
    by_class: dict[int, list[str]] = {}
    for g, idx in members.items():
        majority = int(np.bincount(labeled.labels[idx]).argmax())
        by_class.setdefault(majority, []).append(g)
    rng = np.random.default_rng([seed, fold.number, 7919])
    keep: list[int] = []
    for c in sorted(by_class):
        names = sorted(by_class[c])
        order = [names[k] for k in rng.permutation(len(names))]
        want = max(1, round(fraction * sum(len(members[g]) for g in names)))
        got = 0
        for g in order:  # a group is taken when it brings the class closer to its target
            if got == 0 or abs(got + len(members[g]) - want) < abs(got - want):
                keep += members[g]
                got += len(members[g])
    return Fold(fold.name, np.array(sorted(keep), dtype=np.int64), fold.val, fold.test, fold.number)


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

"""Each dataset's part of an experiment's plan: its sizes, folds and data identity, with clear errors for missing
paths and bad columns (phantoms: planned sizes). Part of :mod:`d2mae.experiment`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from d2mae.data.folds import make_folds
from d2mae.data.labels import load_labeled
from d2mae.data.sources import find_images
from d2mae.experiment.config import DatasetSpec
from d2mae.experiment.forbidden import LABEL_OPTIONS
from d2mae.experiment.stage import DatasetPlan, config_hash, refs_digest
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.options import build_config
from d2mae.segment.masks import load_segment_set
from d2mae.train.config import SegmentConfig


def _approx_folds(n: int, protocol: str, folds: list[str] | None) -> list[tuple[str, int, int, int]]:
    """Fold sizes before the labels exist (phantoms): proportions of the protocol."""
    kind = protocol.split(":")[0].lower()
    if kind == "kfold":
        k = int(protocol.split(":")[1])
        test = n // k
        val = (n - test) // max(2, k - 1)
        out = [(str(i + 1), n - test - val, val, test) for i in range(k)]
    elif kind == "split":
        a, b, c = (float(x) for x in protocol.split(":")[1:4])
        test, val = round(n * c / (a + b + c)), round(n * b / (a + b + c))
        out = [("1", n - test - val, val, test)]
    else:
        out = [("1", int(n * 0.6), int(n * 0.2), n - int(n * 0.6) - int(n * 0.2))]
    if folds:
        out = [f for f in out if f[0] in folds] or out[:1]
    return out


def _check_path(path: str, key: str, source: str, dataset: DatasetSpec, what: str = "path") -> None:
    if not os.path.exists(path):
        hint = (f"fill in the path in the config or pass --set datasets.{dataset.name}.{key}=PATH "
                "(relative paths start from datasets.<name>.root, or from the current folder)")
        raise D2maeError(f"option 'datasets.{dataset.name}.{key}' in {source}: {what} {path} does not exist; {hint}")


def dataset_plan(spec: DatasetSpec, out: Path, source: str, seed: int) -> DatasetPlan:
    """Sizes, folds and data identity of one dataset; real paths are checked here (clear errors)."""

    data_dir = out / "data" / spec.name
    if spec.phantoms is not None:
        labels = str(data_dir / "labeled" / "labels.csv")
        n_labeled = int(spec.phantoms["n"])
        num_classes = 2
        folds = _approx_folds(n_labeled, spec.protocol, spec.folds)
        if spec.pretrain_phantoms is not None:
            pretrain_data = [str(data_dir / "pretrain" / "images")]
            n_pretrain = int(spec.pretrain_phantoms["n"])
        elif spec.pretrain_data:
            for p in spec.pretrain_data:
                _check_path(p, "pretrain_data", source, spec)
            refs = find_images(spec.pretrain_data)
            pretrain_data, n_pretrain = list(spec.pretrain_data), len(refs)
        else:
            pretrain_data, n_pretrain = [str(data_dir / "labeled" / "images")], n_labeled
        data_key = config_hash({"phantoms": spec.phantoms, "pretrain_phantoms": spec.pretrain_phantoms,
                                "pretrain_data": pretrain_data})
        overlap = "" if spec.pretrain_phantoms is not None or spec.pretrain_data else (
            "pre-training used the labeled phantoms' pixels (not their labels), test images included")
        return DatasetPlan(spec.name, spec, labels, pretrain_data, n_pretrain, n_labeled, num_classes, folds,
                           data_key, overlap)
    if spec.root:
        _check_path(spec.root, "root", source, spec, "folder")
    if spec.task == "segment":
        return _segment_dataset_plan(spec, out, source, seed)
    _check_path(spec.labels or "", "labels", source, spec, "labels file")
    for key in ("image_root", "folds_csv"):
        if getattr(spec, key):
            _check_path(getattr(spec, key), key, source, spec)
    try:
        labeled = load_labeled(spec.labels, **{k: getattr(spec, k) for k in LABEL_OPTIONS})
        fold_list = make_folds(labeled, spec.protocol, seed, spec.folds)
    except D2maeError as exc:
        raise D2maeError(f"dataset '{spec.name}' in {source}: {exc}") from None
    if spec.scanner_column and spec.scanner_column not in labeled.columns:
        raise D2maeError(f"option 'datasets.{spec.name}.scanner_column' in {source}: {spec.labels} has no column "
                         f"'{spec.scanner_column}'; its columns are: {', '.join(labeled.columns)}")
    folds = [(f.name, len(f.train), len(f.val), len(f.test)) for f in fold_list]
    if spec.pretrain_data:
        for p in spec.pretrain_data:
            _check_path(p, "pretrain_data", source, spec)
        try:
            pre_refs = find_images(spec.pretrain_data)
        except D2maeError as exc:
            raise D2maeError(f"option 'datasets.{spec.name}.pretrain_data' in {source}: {exc}") from None
        pretrain_data = list(spec.pretrain_data)
    else:
        pre_refs = list(labeled.refs)
        pretrain_data = [str(data_dir / "pretrain_images.txt")]
    shared = len(set(pre_refs) & set(labeled.refs))
    overlap = ""
    if shared:
        overlap = (f"{shared} of the {len(labeled.refs)} labeled images (test images of some fold included) were "
                   "also pre-training images: pre-training saw their pixels, never their labels")
    data_key = config_hash({"pretrain": refs_digest(pre_refs), "labeled": refs_digest(labeled.refs)})
    return DatasetPlan(spec.name, spec, str(spec.labels), pretrain_data, len(pre_refs), len(labeled),
                       len(labeled.classes), folds, data_key, overlap)


def segment_set(spec: DatasetSpec, labels: str | None = None) -> Any:
    """The images and masks of a segmentation dataset, every mask checked
    (:func:`~d2mae.segment.masks.load_segment_set`)."""
    return load_segment_set(build_config(SegmentConfig, (spec.segment_options(labels), f"datasets.{spec.name}")))


def _segment_dataset_plan(spec: DatasetSpec, out: Path, source: str, seed: int) -> DatasetPlan:
    """Sizes, folds and data identity of a segmentation dataset of real images (every mask read and checked)."""
    for key, what in (("images", "folder"), ("labels", "labels file"), ("masks", "folder"), ("image_root", "path")):
        if getattr(spec, key):
            _check_path(getattr(spec, key), key, source, spec, what)
    try:
        data = segment_set(spec)
        fold_list = make_folds(data.labeled, spec.protocol, seed, spec.folds)
    except D2maeError as exc:
        raise D2maeError(f"dataset '{spec.name}' in {source}: {exc}") from None
    refs = list(data.labeled.refs)
    folds = [(f.name, len(f.train), len(f.val), len(f.test)) for f in fold_list]
    if spec.pretrain_data:
        for p in spec.pretrain_data:
            _check_path(p, "pretrain_data", source, spec)
        pre_refs = find_images(spec.pretrain_data)
        pretrain_data = list(spec.pretrain_data)
    else:
        pre_refs, pretrain_data = refs, [str(out / "data" / spec.name / "pretrain_images.txt")]
    shared = len(set(pre_refs) & set(refs))
    overlap = (f"{shared} of the {len(refs)} segmented images (test images of some fold included) were also "
               "pre-training images: pre-training saw their pixels, never their masks") if shared else ""
    data_key = config_hash({"pretrain": refs_digest(pre_refs), "labeled": refs_digest(refs),
                            "masks": refs_digest(data.masks)})
    return DatasetPlan(spec.name, spec, str(spec.labels or spec.images), pretrain_data, len(pre_refs), len(refs),
                       data.num_classes, folds, data_key, overlap, sample=refs[:6])

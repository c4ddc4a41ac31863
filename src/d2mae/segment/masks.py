"""Images with lesion masks: pairing (a masks folder with the images' stems, or a mask column), checking every mask
against its image, and the :class:`SegmentSet` the protocols cut into folds.

Masks are one-channel PNGs (or any 8/16-bit grayscale image) of their image's size. Binary masks
(``num_classes`` 2) hold 0 and 255, or 0 and 1; label maps hold 0..K-1. An all-zero mask is valid (a normal image).
Each problem — a missing mask, another size than the image, values outside the classes, an RGB mask, an image
without a mask — is one error that names the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from d2mae.data.decode import image_shape, map_threads
from d2mae.data.labels import LabeledSet, first_few, load_labeled, read_table_csv
from d2mae.data.sources import DICOM_EXTENSIONS, IMAGE_EXTENSIONS, find_images
from d2mae.runtime.errors import D2maeError, reason


@dataclass
class SegmentSet:
    """Images and their masks: ``labeled`` (refs, ids, groups, split/fold columns; its labels are the strata of the
    folds) and one mask path per image, in the same order."""

    labeled: LabeledSet
    masks: list[str]
    num_classes: int

    def __len__(self) -> int:
        return len(self.masks)


def read_mask(path: str, num_classes: int) -> np.ndarray:
    """A mask file as class indices, uint8 [H, W] in 0..K-1 (binary 255 → 1).

    Raises:
        D2maeError: unreadable, more than one channel, or values that are not classes.
    """
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA"):
                raise D2maeError(f"mask {path} has {len(im.getbands())} channels ({mode}); masks must be one-channel "
                                 "(grayscale) images with class values")
            arr = np.asarray(im.convert("I") if mode in ("1", "P", "I;16", "I;16B", "I;16L") else im)
    except OSError as exc:
        raise D2maeError(f"cannot read mask {path}: {reason(exc)}") from None
    if arr.ndim != 2:
        raise D2maeError(f"mask {path} has shape {arr.shape}; masks must be one-channel images")
    values = np.unique(arr)
    fractional = values[values != np.round(values)] if np.issubdtype(values.dtype, np.floating) else values[:0]
    if len(fractional):
        shown = first_few([f"{v:g}" for v in fractional.tolist()])
        raise D2maeError(f"mask {path} holds values that are not whole numbers ({shown}); a mask holds class values "
                         "(0/255 or 0/1 for a lesion, 0..K-1 for K classes) — save it as integers")
    if num_classes == 2 and set(values.tolist()) <= {0, 255}:
        return (arr == 255).astype(np.uint8)  # [H, W]
    bad = values[(values < 0) | (values >= num_classes)]
    if len(bad):
        hint = ("binary masks hold 0 and 255, or 0 and 1" if num_classes == 2
                else f"label maps hold 0..{num_classes - 1}")
        raise D2maeError(f"mask {path} has value(s) {first_few([str(v) for v in bad.tolist()])} beyond "
                         f"--num-classes {num_classes} ({hint}); set --num-classes or fix the mask")
    return arr.astype(np.uint8)


def _key(rel: str) -> str:
    """A file's pairing key: its path below its root, '/'-separated, without the extension."""
    rel = rel.replace("\\", "/").split("#")[0]
    stem, ext = os.path.splitext(rel)
    return stem if ext.lower() in IMAGE_EXTENSIONS + DICOM_EXTENSIONS else rel


def mask_stem(stem: str, suffix: str) -> str | None:
    """The image stem a file stem is the mask of (``x_mask`` → ``x`` with suffix ``_mask``; BUSI's extra
    ``x_mask_1`` too), or ``None`` when the stem is not a mask's."""
    match = re.fullmatch(rf"(.*){re.escape(suffix)}(_\d+)?", stem) if suffix else None
    return match.group(1) if match else None


def _mask_index(folder: Path, suffix: str) -> dict[str, list[str]]:
    """Masks under ``folder`` by pairing key (their path below ``folder`` without extension and ``suffix``)."""
    if not folder.is_dir():
        raise D2maeError(f"folder {folder} does not exist", option="masks")
    index: dict[str, list[str]] = {}
    for ref in find_images(folder):
        key = _key(os.path.relpath(ref, folder))
        if suffix:
            parent, _, stem = key.rpartition("/")
            image = mask_stem(stem, suffix)
            if image is None:
                continue
            key = f"{parent}/{image}" if parent else image
        index.setdefault(key, []).append(ref)
    return index


def _pair_by_path(ids: Sequence[str], folder: Path, suffix: str) -> list[str]:
    """Each image's mask: the file at the image's own path below the masks folder (``images/a/x.png`` →
    ``masks/a/x<suffix>.<any image extension>``). A missing mask, two candidate masks, or two images that would take
    one mask are each one error that lists the first cases."""
    index = _mask_index(folder, suffix)
    keys = [_key(i) for i in ids]
    missing = [f"{i} (expected {folder / k}{suffix}.png)" for i, k in zip(ids, keys) if k not in index]
    if missing:
        raise D2maeError(f"{len(missing)} image(s) have no mask in {folder}: {first_few(missing, 2)}; a mask sits at "
                         "its image's own path below the masks folder (docs/segment.md)", option="masks")
    several = [" and ".join(index[k]) for k in dict.fromkeys(keys) if len(index[k]) > 1]
    if several:
        raise D2maeError(f"{len(several)} image(s) have more than one mask: {first_few(several, 2)}; keep one (merge "
                         "several masks of one image into one file)", option="masks")
    by_key: dict[str, list[str]] = {}
    for i, k in zip(ids, keys):
        by_key.setdefault(k, []).append(i)
    shared = [" and ".join(v) + f" → {index[k][0]}" for k, v in by_key.items() if len(v) > 1]
    if shared:
        raise D2maeError(f"{len(shared)} mask(s) would serve two images: {first_few(shared, 2)}; give each image a "
                         "distinct name (they differ only by extension)", option="masks")
    return [index[k][0] for k in keys]


def _pair_by_column(labeled: LabeledSet, column: str, csv_path: Path) -> list[str]:
    values = labeled.columns.get(column)
    if values is None:
        raise D2maeError(f"{csv_path} has no column '{column}'; its columns are: {', '.join(labeled.columns)}",
                         option="mask_column")
    empty = [labeled.ids[i] for i, v in enumerate(values) if not v.strip()]
    if empty:
        raise D2maeError(f"{csv_path}: {len(empty)} image(s) have no mask in column '{column}' "
                         f"(first: {first_few(empty)}); every image needs one", option="mask_column")
    masks = [os.path.abspath(v if os.path.isabs(v) else csv_path.parent / v) for v in values]
    absent = [m for m in masks if not os.path.isfile(m)]
    if absent:
        raise D2maeError(f"{csv_path}: {len(absent)} mask file(s) in column '{column}' do not exist "
                         f"(first: {first_few(absent)})", option="mask_column")
    return masks


def _images(cfg: Any) -> LabeledSet:
    """The images as a :class:`LabeledSet` (its labels: the classes of ``label_column``, or filled in later with
    whether each mask holds a lesion)."""
    if cfg.labels:
        if not Path(cfg.labels).is_file():
            raise D2maeError(f"{cfg.labels} does not exist", option="labels")
        header, _ = read_table_csv(Path(cfg.labels))
        column = cfg.label_column or cfg.path_column  # unique ids: one "class" each, until the masks are read
        if column not in header:
            raise D2maeError(f"{cfg.labels} has no column '{column}'; its columns are: {', '.join(header)} (leave "
                             "label_column unset to stratify by lesion presence)", option="label_column")
        return load_labeled(cfg.labels, path_column=cfg.path_column, label_column=column,
                            group_column=cfg.group_column, split_column=cfg.split_column,
                            fold_column=cfg.fold_column, image_root=cfg.image_root, image_ext=cfg.image_ext,
                            allow_outside_root=cfg.allow_outside_root)
    if not cfg.images:
        raise D2maeError("is required: a folder of images, or a labels CSV with --labels", option="images")
    if cfg.label_column:
        raise D2maeError(f"a class column ('{cfg.label_column}') needs a labels CSV (--labels)",
                         option="label_column")
    refs = [r for r in find_images(cfg.images) if mask_stem(Path(r).stem, cfg.mask_suffix) is None]  # not masks
    if cfg.masks and os.path.realpath(cfg.masks) == os.path.realpath(cfg.images) and not cfg.mask_suffix:
        raise D2maeError("the masks sit beside the images: give the text that ends a mask's file name (e.g. _mask "
                         "for x_mask.png)", option="mask_suffix")
    root = os.path.abspath(cfg.images)
    ids = [os.path.relpath(r, root) for r in refs]
    return LabeledSet(refs=refs, ids=ids, labels=np.zeros(len(refs), dtype=np.int64), classes=["all"],
                      source=str(cfg.images))


def load_segment_set(cfg: Any) -> SegmentSet:
    """Images and masks of ``cfg`` (a :class:`~d2mae.train.config.SegmentConfig`), every mask read and checked
    against its image (size, channels, values).

    Raises:
        D2maeError: the problem and the file, one line (module docstring).
    """
    labeled = _images(cfg)
    if cfg.mask_column and cfg.masks:
        raise D2maeError("give either masks DIR or mask_column, not both", option="mask_column")
    if cfg.mask_column:
        if not cfg.labels:
            raise D2maeError("needs a labels CSV (--labels)", option="mask_column")
        masks = _pair_by_column(labeled, cfg.mask_column, Path(cfg.labels))
    elif cfg.masks:
        masks = _pair_by_path(labeled.ids, Path(cfg.masks), cfg.mask_suffix)
    else:
        raise D2maeError("is required: the folder of masks (or a labels CSV column with --mask-column)",
                         option="masks")

    def check(i: int) -> bool:
        mask = read_mask(masks[i], cfg.num_classes)
        try:
            h, w = image_shape(labeled.refs[i])
        except (D2maeError, OSError, ValueError):
            if cfg.skip_bad:  # left out with the other unreadable images, and listed (d2mae.data.decode.check_images)
                return bool(mask.any())
            raise D2maeError(f"cannot read image {labeled.refs[i]} (the image of mask {masks[i]}); fix or remove it, "
                             "or give --skip-bad to leave it out") from None
        if mask.shape != (h, w):
            raise D2maeError(f"mask {masks[i]} is {mask.shape[1]}×{mask.shape[0]} px but its image "
                             f"{labeled.refs[i]} is {w}×{h}; a mask must have its image's size")
        return bool(mask.any())

    lesion = np.array(list(map_threads(check, range(len(masks)))), dtype=bool)  # [n]
    if not cfg.label_column:  # the folds are stratified by whether the mask holds a lesion
        names = ["lesion" if v else "no lesion" for v in lesion]
        classes = sorted(set(names))
        labeled.labels = np.array([classes.index(n) for n in names], dtype=np.int64)
        labeled.classes = classes
    return SegmentSet(labeled, masks, cfg.num_classes)

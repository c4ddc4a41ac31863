"""The segmentation run on disk: model folders, predicted mask PNGs and the per-image table.

A run folder from ``d2mae segment``::

    segment.yaml              resolved config
    run.json                  "kind": "segment", method, protocol, folds, classes, timings
    obs/                      the OBS table used
    per_image.csv             id,path,mask,fold,split,class,dice,iou,hd95,lesion_pixels,truth_pixels,height,width,
                              t_star,sigma_star[,kept columns]
    predictions/<id>.png      every test image's predicted mask at its own size (0/255 binary; class values else)
    fold_<k>/model/           segmenter.safetensors + config.json + pretrained/ (for OBS on new images)
    fold_<k>/metrics.jsonl    one line per epoch
    evaluation/               metrics.md / metrics.json and the figures (d2mae evaluate)
"""

from __future__ import annotations

import io
import math
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from d2mae.data.decode import image_shape
from d2mae.io.artifacts import (
    FORMAT_VERSION,
    link_or_copy,
    load_weights,
    read_config,
    save_weights,
)
from d2mae.method.model_config import ModelConfig
from d2mae.method.obs import ObsSpec
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_bytes, atomic_write_json, read_csv_rows
from d2mae.runtime.options import check_saved_types, saved_value
from d2mae.segment.model import DECODERS, UNetConfig, build_segmenter

SEGMENTER_FORMAT = "d2mae-segmenter"
SEGMENTER_WEIGHTS = "segmenter.safetensors"
PER_IMAGE = "per_image.csv"
PREDICTIONS_DIR = "predictions"
RUN_KIND = "segment"
PER_IMAGE_FIELDS = ["id", "path", "mask", "fold", "split", "class", "dice", "iou", "hd95", "lesion_pixels",
                    "truth_pixels", "height", "width", "t_star", "sigma_star"]


def mask_name(image_id: str) -> str:
    """A predicted mask's file name from its image's id: the id's path without extension, '/' → '__', ``.png``."""
    stem = re.sub(r"\.[A-Za-z0-9]+$", "", image_id.replace("\\", "/"))
    return stem.strip("/").replace("/", "__") + ".png"


def mask_png(labels: np.ndarray, num_classes: int) -> bytes:
    """Class indices uint8 [H, W] → PNG bytes: 0/255 for binary masks, the class values for label maps."""
    out = (labels * 255).astype(np.uint8) if num_classes == 2 else labels.astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(out, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_mask(path: Path, labels: np.ndarray, num_classes: int) -> None:
    atomic_write_bytes(path, mask_png(labels, num_classes))


def save_segmenter(model: torch.nn.Module, folder: Path, kind: str, obs: ObsSpec, settings: dict[str, Any],
                   pretrained: Path | None, pretrained_hash: str | None) -> Path:
    """A model folder: weights, config.json (decoder kind, model config, classes, OBS setting, training settings)
    and, for a pre-trained encoder, a link to its pre-trained folder (OBS on new images)."""
    save_weights(model.state_dict(), folder / SEGMENTER_WEIGHTS, metadata={"format": SEGMENTER_FORMAT})
    if pretrained is not None:
        for name in ("model.safetensors", "config.json"):
            link_or_copy(pretrained / name, folder / "pretrained" / name)
    atomic_write_json(folder / "config.json", {
        "format": SEGMENTER_FORMAT, "format_version": FORMAT_VERSION, "decoder": kind,
        "model": model.config.to_dict(), "num_classes": model.num_classes,
        "feature_size": settings.get("feature_size"), "obs": obs.to_dict(), "segment": settings,
        "pretrained_sha256": pretrained_hash})
    return folder


def load_segmenter(folder: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """A model folder of :func:`save_segmenter`, in eval mode, with its config."""
    folder = Path(folder)
    meta = read_config(folder, SEGMENTER_FORMAT)
    source = str(folder / "config.json")
    kind = saved_value(meta, "decoder", str, source, choices=DECODERS)
    saved = saved_value(meta, "model", dict, source)
    if kind == "unet":
        check_saved_types(UNetConfig, saved, source)
        try:
            config: Any = UNetConfig(**saved)
        except (TypeError, D2maeError) as exc:
            raise D2maeError(f"{source}: {exc}") from None
    else:
        config = ModelConfig.from_dict(saved, source=source)
    num_classes = saved_value(meta, "num_classes", int, source, low=2)
    feature_size = saved_value(meta, "feature_size", int, source, None, low=1)
    ObsSpec.from_dict(meta.get("obs"), source)  # the OBS setting new images get
    model = build_segmenter(kind, config, num_classes, feature_size, drop_path=0.0)
    state = load_weights(folder / SEGMENTER_WEIGHTS)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def is_segmenter(folder: str | Path) -> bool:
    """Whether ``folder`` is a segmentation model folder or run folder (for commands that take either kind)."""
    folder = Path(folder)
    for path in (folder / "run.json", folder / "config.json"):
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return False
            return isinstance(data, dict) and (data.get("kind") == RUN_KIND or data.get("format") == SEGMENTER_FORMAT)
    return False


def read_per_image(run: str | Path) -> list[dict[str, Any]]:
    """``per_image.csv`` of a run, each metric as a float (NaN where undefined)."""
    path = Path(run) / PER_IMAGE
    if not path.is_file():
        raise D2maeError(f"{run} holds no {PER_IMAGE}: not a finished segmentation run (d2mae segment)")
    rows: list[dict[str, Any]] = read_csv_rows(path)
    missing = [c for c in ("path", "fold", "split", "dice", "iou", "hd95", "truth_pixels") if rows and c not in rows[0]]
    if missing:
        raise D2maeError(f"{path} has no column(s) {', '.join(missing)}; the file is damaged — write it again with "
                         "d2mae segment")
    for r in rows:
        if "height" not in r:  # a run from before the image size was written: read it from the image
            try:
                r["height"], r["width"] = image_shape(r["path"])
            except (D2maeError, OSError, ValueError):
                r["height"] = r["width"] = math.nan
        r.setdefault("class", "")
        if not str(r["truth_pixels"]).isdigit():
            raise D2maeError(f"{path}: column 'truth_pixels' holds {r['truth_pixels']!r} for {r.get('path')}; not a "
                             "pixel count")
        for key in ("dice", "iou", "hd95"):
            try:
                r[key] = float(r[key]) if r.get(key, "") not in ("", "nan") else float("nan")
            except ValueError:
                raise D2maeError(f"{path}: column '{key}' holds {r[key]!r} for {r.get('id')}; not a number") from None
    return rows


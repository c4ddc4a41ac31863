"""The segmenter's masks at each image's own size: for a run's own test images, and for new images.

``d2mae predict --model SEG --out DIR IMAGES…`` with a segmentation model folder (``fold_k/model``) or a whole
``d2mae segment`` run folder. As for classification (:mod:`d2mae.eval.predict`), each new image first gets its t*
under the model's OBS setting — the search with the bundled pre-trained model, or the fixed level — then the
segmenter sees it blurred at σ_{t*} with t* fed to BLU(t). With a run folder the folds' class probabilities are
averaged at the native size (a k-fold ensemble); ``--fold K`` picks one fold.

Output folder ``DIR``: ``<image>.png`` per image at its own size (0/255 for a binary mask, the class values for a
label map; the name is the image's path below the inputs' common folder, '/' → '__') and ``masks.csv`` with path,
mask, lesion_pixels (non-background pixels), t_star and sigma_star.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from d2mae.data.decode import check_images
from d2mae.data.sources import find_images
from d2mae.eval.predict import model_folders, new_image_levels
from d2mae.io.obs_table import sigmas_of
from d2mae.method.model_config import ModelConfig
from d2mae.runtime.device import amp_dtype, autocast, eval_mode
from d2mae.runtime.distributed import DistContext
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_text, csv_text
from d2mae.segment.data import SegmentDataset, native_logits
from d2mae.segment.files import load_segmenter, mask_name, write_mask

MASKS_CSV = "masks.csv"
MASKS_FIELDS = ["path", "mask", "lesion_pixels", "t_star", "sigma_star"]


def native_probs(models: Sequence[nn.Module], refs: Sequence[str], t: np.ndarray, device: torch.device,
                 batch_size: int, precision: str = "auto", views: torch.Tensor | None = None,
                 sizes: Sequence[tuple[int, int]] | None = None, progress: bool = False, tta: bool = False,
                 ) -> Iterator[np.ndarray]:
    """Per image, in order: class probabilities [K, H, W] at its own size, the mean over ``models`` (which share one
    input size), from the whole-image view at level ``t[i]``; the logits are upsampled, never the truth. With
    ``tta`` each model also sees the mirror image, whose probabilities are mirrored back and averaged in.

    ``views`` [n, C, S, S] and ``sizes`` (H, W) of images already decoded; else each image is decoded here.
    """
    cfg = models[0].config
    data = SegmentDataset(refs, [""] * len(refs), cfg.img_size, cfg.in_chans, models[0].num_classes)
    amp = amp_dtype(device, precision, getattr(cfg, "embed_dim", None))
    starts = range(0, len(refs), batch_size)
    with torch.inference_mode(), autocast(device, amp):
        for start in tqdm(starts, desc="segment", unit="batch", disable=not (progress and len(starts) > 2)):
            idx = range(start, min(start + batch_size, len(refs)))
            if views is not None and sizes is not None:
                x, hw = views[start:idx.stop], [sizes[i] for i in idx]
            else:
                decoded = [data.image_and_size(i) for i in idx]
                x, hw = torch.stack([v for v, _ in decoded]), [s for _, s in decoded]
            x = x.to(device)  # [B, C, S, S]
            tb = torch.as_tensor(t[start:idx.stop], dtype=torch.float32, device=device)  # [B]
            total: list[torch.Tensor | None] = [None] * len(idx)
            passes = [(model, mirror) for model in models for mirror in ((False, True) if tta else (False,))]
            for model, mirror in passes:
                with eval_mode(model):
                    logits = model(x.flip(-1) if mirror else x, tb)  # [B, K, S, S]
                logits = logits.flip(-1) if mirror else logits
                for j in range(len(idx)):  # [K, S, S] → [K, H, W], softmax at the native size
                    p = torch.softmax(native_logits(logits[j], hw[j]), dim=0)
                    total[j] = p if total[j] is None else total[j] + p
            for p in total:
                yield (p / len(passes)).cpu().numpy()


@dataclass
class MaskPredictions:
    """What :func:`predict_masks` wrote: per image its mask file, lesion area in pixels, t* and σ*."""

    paths: list[str]
    masks: list[str]
    lesion_pixels: list[int]
    t_star: np.ndarray
    sigma_star: np.ndarray
    models: list[str]

    def rows(self) -> list[dict[str, Any]]:
        return [{"path": p, "mask": m, "lesion_pixels": a, "t_star": f"{t:g}", "sigma_star": f"{s:g}"}
                for p, m, a, t, s in zip(self.paths, self.masks, self.lesion_pixels, self.t_star, self.sigma_star)]

    def table(self, limit: int = 20) -> str:
        width = min(48, max([5] + [len(Path(p).name) for p in self.paths]))
        head = f"{'image':<{width}}  {'lesion px':>10}  {'σ*':>5}"
        lines = [head, "-" * len(head)]
        for p, a, s in list(zip(self.paths, self.lesion_pixels, self.sigma_star))[:limit]:
            name = Path(p).name
            lines.append(f"{name if len(name) <= width else '…' + name[-(width - 1):]:<{width}}  {a:>10}  {s:>5.2g}")
        if len(self.paths) > limit:
            lines.append(f"… {len(self.paths) - limit} more row(s)")
        return "\n".join(lines)


def mask_names(refs: Sequence[str]) -> list[str]:
    """Unique file names for the masks of ``refs``: each path below the images' common folder."""
    files = [os.path.abspath(r.split("#")[0]) for r in refs]
    root = os.path.commonpath([os.path.dirname(f) for f in files]) if files else ""
    names = [mask_name(os.path.relpath(f, root) + (("#" + r.split("#", 1)[1]) if "#" in r else ""))
             for f, r in zip(files, refs)]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise D2maeError(f"two images would write the same mask file {dup}; give each image a distinct name")
    return names


def predict_masks(model: str | Path, inputs: Sequence[str | Path], out: str | Path, *, fold: str | None = None,
                  batch_size: int = 32, device: torch.device = torch.device("cpu"), precision: str = "auto",
                  workers: int = 0, skip_bad: bool = False, progress: bool = True) -> MaskPredictions:
    """OBS on each image, then the segmenter(s) at its t*; the masks and ``masks.csv`` are written into ``out``.

    Raises:
        D2maeError: a model folder that is missing, incomplete or inconsistent; unreadable images.
    """
    folders = model_folders(model, fold)
    loaded = [load_segmenter(f, device) for f in folders]
    first = loaded[0][1]
    for f, (_, meta) in zip(folders[1:], loaded[1:]):
        for key in ("decoder", "model", "num_classes", "obs", "pretrained_sha256"):
            if meta.get(key) != first.get(key):
                raise D2maeError(f"fold models disagree on '{key}' ({folders[0]} vs {f}); they do not come from "
                                 "one run", option="model")
    models = [m for m, _ in loaded]
    seg = models[0]
    refs = check_images(find_images([str(p) for p in inputs]), seg.config.in_chans, skip_bad=skip_bad)
    out = Path(out)
    names = mask_names(refs)
    if isinstance(seg.config, ModelConfig):  # the ViT encoder: t* under the model's OBS setting
        t_star = new_image_levels(folders[0], first, seg, refs, batch_size=batch_size, device=device,
                                  workers=workers, progress=progress, ctx=DistContext())
        sigma = sigmas_of(seg.config.schedule, t_star)
    else:  # a U-Net: no blur
        t_star, sigma = np.zeros(len(refs)), np.zeros(len(refs))
    areas = []
    tta = bool((first.get("segment") or {}).get("tta", False))  # as the run validated and tested
    for name, p in zip(names, native_probs(models, refs, t_star, device, batch_size, precision, progress=progress,
                                            tta=tta)):
        labels = p.argmax(axis=0).astype(np.uint8)  # [H, W]
        write_mask(out / name, labels, seg.num_classes)
        areas.append(int((labels > 0).sum()))
    result = MaskPredictions(list(refs), names, areas, np.asarray(t_star, float), np.asarray(sigma, float),
                             [str(f) for f in folders])
    atomic_write_text(out / MASKS_CSV, csv_text(MASKS_FIELDS, result.rows()))
    return result

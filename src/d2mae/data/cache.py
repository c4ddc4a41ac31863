"""The pre-training memory path: every image decoded once, kept at native resolution, cropped on the device.

:class:`DecodedCache` holds the images in one flat uint8 buffer (on the GPU when training there) and draws MAE's
RandomResizedCrop + flip for a whole batch, resampled with PIL's antialiased bicubic filter
(:func:`d2mae.data.resample.crop_resize`), so its crops equal the loader path's (:mod:`d2mae.data.dataset`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from d2mae.data.dataset import CROP_RATIO, CROP_SCALE, resize_box
from d2mae.data.decode import image_shape, load_image, map_threads
from d2mae.data.resample import BICUBIC_SUPPORT, crop_resize
from d2mae.runtime.errors import D2maeError

#: The cache keeps at least this many stored pixels per output pixel for the smallest crop an image can give, so
#: that its crops are as sharp as PIL's crop of the original file (equivalent σ ≤ 0.1 px; tests/test_data.py).
CACHE_MARGIN = 2.0


def crop_boxes(aspect: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
               generator: torch.Generator | None, attempts: int = 10) -> tuple[torch.Tensor, ...]:
    """Sample RandomResizedCrop boxes in fractions of each image's width/height (torchvision's algorithm, batched).

    Args:
        aspect: each original image's width / height [B] (the crop's area and aspect are measured in original pixels).

    Returns:
        (cx, cy, w, h) [B] each, fractions of the image in [0, 1].
    """
    b = aspect.shape[0]
    area = torch.empty(b, attempts).uniform_(scale[0], scale[1], generator=generator)  # [B, K] fraction of the area
    log_r = torch.empty(b, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_r)  # crop width / crop height, in pixels
    a = aspect[:, None]
    w = torch.sqrt(area * r / a)  # [B, K] fraction of the width
    h = torch.sqrt(area * a / r)
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))  # [B]
    # torchvision's fallback: the whole image cut to the nearest allowed aspect ratio
    fr = torch.clamp(aspect, ratio[0], ratio[1])
    fw = torch.where(aspect > fr, fr / aspect, torch.ones_like(aspect))
    fh = torch.where(aspect < fr, aspect / fr, torch.ones_like(aspect))
    idx = first.clamp_min(0)[:, None]
    w = torch.where(first >= 0, w.gather(1, idx)[:, 0], fw)
    h = torch.where(first >= 0, h.gather(1, idx)[:, 0], fh)
    u = torch.rand(b, 2, generator=generator)
    cx = torch.where(first >= 0, w / 2 + u[:, 0] * (1 - w), torch.full_like(w, 0.5))
    cy = torch.where(first >= 0, h / 2 + u[:, 1] * (1 - h), torch.full_like(h, 0.5))
    return cx, cy, w, h


def center_fractions(aspect: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The deterministic view's box (the largest centred square, :func:`center_box`) as (cx, cy, w, h) fractions."""
    aspect = aspect.float()
    w = torch.where(aspect > 1, 1 / aspect, torch.ones_like(aspect))
    h = torch.where(aspect < 1, aspect, torch.ones_like(aspect))
    half = torch.full_like(aspect, 0.5)
    return half, half, w, h


def stored_shape(h: int, w: int, img_size: int, scale: float = CROP_SCALE[0], ratio: tuple[float, float] = CROP_RATIO,
                 margin: float = CACHE_MARGIN) -> tuple[int, int]:
    """(height, width) at which :class:`DecodedCache` keeps an ``h`` × ``w`` image: native, or smaller when even its
    smallest crop (area ``scale``, the most extreme aspect of ``ratio``) would be ``margin`` × ``img_size`` pixels
    wide at a lower resolution."""
    smallest = math.sqrt(scale * h * w * min(ratio[0], 1 / ratio[1]))  # the shortest side any crop can have
    f = min(1.0, margin * img_size / max(smallest, 1e-9))
    return max(1, round(f * h)), max(1, round(f * w))


def cache_bytes(refs: Sequence[str], img_size: int, in_chans: int = 1, sample: int = 256, seed: int = 0) -> int:
    """The memory a :class:`DecodedCache` of ``refs`` would take, from the headers of up to ``sample`` images."""
    refs = list(refs)
    if not refs:
        return 0
    pick = refs if len(refs) <= sample else [refs[i] for i in np.random.default_rng(seed).choice(len(refs), sample,
                                                                                                 replace=False)]
    sizes = [math.prod(stored_shape(*image_shape(r), img_size)) for r in pick]
    return int(round(np.mean(sizes) * len(refs) * in_chans))


class DecodedCache:
    """Every image decoded once and kept, at native resolution, in one flat uint8 buffer on the device.

    Pre-training without a DataLoader: :meth:`batch` draws MAE's RandomResizedCrop + flip for a whole batch and
    resamples it with :func:`d2mae.data.resample.crop_resize` — the same antialiased bicubic filter as PIL's crop of the
    original file, so the target that Eq. 3 reconstructs is as sharp as the loader path's. An image is stored
    smaller than native only where even its smallest crop cannot use the resolution (:func:`stored_shape`, at
    least ``CACHE_MARGIN`` stored pixels per output pixel); crop boxes are drawn in original pixels.

    Memory: the stored pixels, one byte each (BUS-BRA, 1,875 images: 240 MB at 224 px, ~190 MB at 96 px).

    Attributes:
        data: uint8 [Σ C·h·w], image i at ``offsets[i]`` as [C, h_i, w_i] (move with :meth:`to`).
        shapes: stored (h, w) per image [N, 2]; ``original``: original (h, w) [N, 2].
        labels: int64 [N] (-1 when none were given).
    """

    def __init__(self, refs: Sequence[str], img_size: int, in_chans: int = 1,
                 labels: Sequence[int] | None = None, progress: bool = False) -> None:
        refs = [str(r) for r in refs]
        if not refs:
            raise D2maeError("cannot build the decoded-image cache: the list of images is empty")
        self.refs = refs
        self.img_size = int(img_size)
        self.in_chans = in_chans
        self.labels = torch.tensor(list(labels) if labels is not None else [-1] * len(refs), dtype=torch.long)
        if self.labels.shape[0] != len(refs):
            raise D2maeError(f"{self.labels.shape[0]} labels for {len(refs)} images; give one label per image")

        def decode(ref: str) -> tuple[np.ndarray, tuple[int, int]]:
            arr = load_image(ref, in_chans)  # [H, W, C]
            h, w = arr.shape[:2]
            hs, ws = stored_shape(h, w, self.img_size)
            x = (np.ascontiguousarray(arr.transpose(2, 0, 1)) if (hs, ws) == (h, w)
                 else resize_box(arr, (0, 0, w, h), (ws, hs)))  # [C, hs, ws], antialiased when shrunk
            return np.rint(x * 255.0).astype(np.uint8), (h, w)

        items = map_threads(decode, refs)
        if progress:
            items = tqdm(items, total=len(refs), desc="decoding images", unit="img")
        chunks, shapes, original = [], [], []
        for x, hw in items:
            chunks.append(torch.from_numpy(x.reshape(-1)))
            shapes.append(x.shape[1:])
            original.append(hw)
        self.shapes = torch.tensor(shapes, dtype=torch.long)  # [N, 2]
        self.original = torch.tensor(original, dtype=torch.long)  # [N, 2]
        sizes = torch.tensor([c.numel() for c in chunks], dtype=torch.long)
        self.offsets = torch.cumsum(sizes, 0) - sizes  # [N]
        self.data = torch.cat(chunks)

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def aspect(self) -> torch.Tensor:
        """Original width / height per image [N]."""
        return self.original[:, 1].float() / self.original[:, 0].float()

    def to(self, device: torch.device | str) -> "DecodedCache":
        """Move the images (and labels) to ``device``, e.g. the GPU, so that batches never leave it."""
        self.data = self.data.to(device)
        self.labels = self.labels.to(device)
        return self

    def windows(self, idx: torch.Tensor, windows: torch.Tensor) -> list[torch.Tensor]:
        """The stored pixels (top, bottom, left, right) ``windows`` [B, 4] of images ``idx`` [B], as views
        uint8 [C, h, w] on the cache's device (nothing is copied)."""
        out = []
        for i, (top, bottom, left, right) in zip(idx.cpu().tolist(), windows.tolist()):
            h, w = (int(v) for v in self.shapes[i])
            o = int(self.offsets[i])
            image = self.data[o:o + self.in_chans * h * w].view(self.in_chans, h, w)
            out.append(image[:, top:bottom, left:right])
        return out

    def pad(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images [C, h, w] (:meth:`windows`) as one zero-padded uint8 batch [B, C, H_max, W_max] on their device."""
        hb, wb = max(int(v.shape[-2]) for v in views), max(int(v.shape[-1]) for v in views)
        out = torch.zeros(len(views), self.in_chans, hb, wb, dtype=torch.uint8, device=self.data.device)
        for k, v in enumerate(views):  # copies only: the resampling is one batched operation
            out[k, :, :v.shape[-2], :v.shape[-1]] = v
        return out

    def crops(self, idx: torch.Tensor, boxes: tuple[torch.Tensor, ...], flip: torch.Tensor | None = None,
              padded: bool | None = None) -> torch.Tensor:
        """Boxes (cx, cy, w, h) in fractions of each original image [B] each, resampled to S × S as PIL would
        resample them from the original file -> float32 [B, C, S, S] in [0, 1] on the cache's device.

        Only each box's window (the box and the filter's reach around it) is resampled: on the CPU each window on
        its own, which multiplies no padding; on an accelerator (or with ``padded=True``) the windows zero-padded
        into one batch, two batched products (benchmarks/crop_speed.py compares the two)."""
        idx = idx.cpu()
        cx, cy, w, h = (b.double().cpu() for b in boxes)
        shapes = self.shapes[idx]
        hs, ws = shapes[:, 0].double(), shapes[:, 1].double()
        pixels = torch.stack([(cx - w / 2) * ws, (cy - h / 2) * hs, (cx + w / 2) * ws, (cy + h / 2) * hs], 1)
        reach = BICUBIC_SUPPORT * torch.stack([w * ws, h * hs], 1).div(self.img_size).clamp_min(1.0) + 1  # [B, 2]
        lo = torch.floor(pixels[:, :2] - reach).clamp_min(0).long()  # [B, 2] (left, top)
        hi = torch.minimum(torch.ceil(pixels[:, 2:] + reach).long(), shapes.flip(1))  # [B, 2] (right, bottom)
        windows = torch.stack([lo[:, 1], hi[:, 1], lo[:, 0], hi[:, 0]], 1)  # [B, 4] top, bottom, left, right
        local = pixels - torch.cat([lo, lo], 1).double()  # the boxes in window coordinates
        views = self.windows(idx, windows)
        sizes = (hi - lo).flip(1)  # [B, 2] each window's (height, width)
        if padded is None:
            padded = self.data.device.type != "cpu"
        images = self.pad(views) if padded else views
        return crop_resize(images, sizes, local, self.img_size, flip)

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None,
              scale: tuple[float, float] = CROP_SCALE, hflip: float = 0.5) -> torch.Tensor:
        """MAE-augmented images for indices ``idx`` [B] (RandomResizedCrop + flip) -> float32 [B, C, S, S]."""
        idx = idx.cpu()
        boxes = crop_boxes(self.aspect[idx], scale, CROP_RATIO, generator)
        flip = torch.rand(len(idx), generator=generator) < hflip
        return self.crops(idx, boxes, flip)

    def center(self, idx: torch.Tensor) -> torch.Tensor:
        """The deterministic view for indices ``idx`` [B] -> float32 [B, C, S, S]."""
        idx = idx.cpu()
        return self.crops(idx, center_fractions(self.aspect[idx]))

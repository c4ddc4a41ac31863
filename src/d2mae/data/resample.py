"""Crop-and-resize of a whole batch on its device, pixel for pixel what PIL's antialiased bicubic resize gives.

D²MAE's signal is a blur of σ = 0.1 … 1.1 *pixels* (Eq. 1). Any resampling on the way to the model softens or
sharpens by a comparable amount unless it is antialiased and taken from full resolution, so every view of an
image — the loader's PIL crop (:func:`d2mae.data.dataset.resize_box`) and the memory cache's crops here — must be the same
filter. This module reproduces Pillow's ``Image.resize(size, BICUBIC, box=…)`` (``libImaging/Resample.c``):

* for output pixel ``i`` of a box ``[lo, hi)`` of an ``n``-pixel axis resized to ``m`` pixels,
  ``scale = (hi − lo) / m``, ``centre = lo + (i + ½)·scale``;
* the filter is Keys' cubic (a = −½, support 2), stretched by ``max(scale, 1)`` when shrinking (antialiasing);
* the taps are the input pixels ``j`` of ``[⌊centre − support + ½⌋, ⌊centre + support + ½⌋)`` inside the image,
  weighted by ``cubic((j − centre + ½) / max(scale, 1))`` and renormalised to sum to one (no border reflection).

As matrices: ``out = R · X · Cᵀ`` with ``R`` [m, n_rows] and ``C`` [m, n_cols] per sample, built from the boxes with
tensor ops on the device (no host sync, no loop over images) and applied as two matrix products in fp32: batched over
a padded batch on an accelerator, and per image on the CPU, where the padding of a batch of differently sized windows
would double the multiply-adds (benchmarks/crop_speed.py).
The result equals PIL's float ('F' mode) resize to about 1e-6.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

BICUBIC_SUPPORT = 2.0  # Keys' cubic convolution kernel reaches two input pixels either side


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = −0.5 (PIL's ``bicubic_filter``)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0  # |x| < 1
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a  # 1 ≤ |x| < 2
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def taps_for(max_scale: float) -> int:
    """Taps per output pixel (PIL's ``ksize``) when shrinking by up to ``max_scale`` input pixels per output pixel."""
    return int(math.ceil(BICUBIC_SUPPORT * max(float(max_scale), 1.0))) * 2 + 1


def resize_matrices(lo: torch.Tensor, hi: torch.Tensor, in_size: torch.Tensor, out_size: int, width: int,
                    taps: int | None = None) -> torch.Tensor:
    """Per-sample 1-D resampling matrices [B, out_size, width] of PIL's antialiased bicubic resize.

    Args:
        lo, hi: the box's edges on this axis, in input pixels [B] (PIL reads them as float32).
        in_size: each sample's own number of input pixels on this axis [B] (≤ ``width``; taps stop there).
        out_size: output pixels m.
        width: the matrices' input width (the padded batch's size on this axis).
        taps: window length K ≥ :func:`taps_for` of the largest ``(hi − lo) / m`` (``None``: computed, which waits
            for the device); only these K weights per output pixel are evaluated, then scattered.

    Returns:
        float32 [B, m, width]: row i holds the weights of output pixel i, zero outside its window.
    """
    dev = lo.device
    lo = lo.float().double()  # PIL's box is float32; its coefficients are double
    hi = hi.float().double()
    scale = (hi - lo) / out_size  # [B] input pixels per output pixel
    if taps is None:
        taps = taps_for(float(scale.max())) if scale.numel() else 1
    stretch = scale.clamp_min(1.0)  # antialiasing: the kernel widens when shrinking
    support = BICUBIC_SUPPORT * stretch  # [B]
    centre = lo[:, None] + (torch.arange(out_size, device=dev, dtype=torch.float64)[None] + 0.5) * scale[:, None]
    first = torch.floor(centre - support[:, None] + 0.5).clamp_min(0)  # [B, m], PIL's xmin
    stop = torch.minimum(torch.floor(centre + support[:, None] + 0.5), in_size.double()[:, None])  # PIL's xmax
    j = first[..., None] + torch.arange(taps, device=dev, dtype=torch.float64)  # [B, m, K] input pixel index
    w = _cubic((j - centre[..., None] + 0.5) / stretch[:, None, None])  # [B, m, K]
    w = torch.where(j < stop[..., None], w, torch.zeros_like(w))
    total = w.sum(dim=-1, keepdim=True)
    w = torch.where(total != 0, w / torch.where(total != 0, total, torch.ones_like(total)), w)
    index = j.long().clamp_max(width - 1)  # taps past the image carry weight 0
    out = torch.zeros(lo.shape[0], out_size, width, device=dev)
    return out.scatter_add_(2, index, w.float())  # [B, m, W]


def crop_resize(images: torch.Tensor | Sequence[torch.Tensor], sizes: torch.Tensor, boxes: torch.Tensor,
                out_size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Resize one box of each image to ``out_size`` × ``out_size`` as PIL's bicubic resize would, on the device.

    Args:
        images: uint8 (read as value / 255) or float, either one padded batch [B, C, H, W] with image b in its
            top-left ``sizes[b]`` corner (the rest gets no weight; two batched products for the whole batch, the
            accelerator's choice), or a list of B tensors [C, h_b, w_b] of their own sizes (two products per image
            that multiply no padding, the CPU's choice: :class:`d2mae.data.cache.DecodedCache` on the CPU).
        sizes: each image's own (height, width) [B, 2].
        boxes: (left, top, right, bottom) in each image's pixels [B, 4] (fractional edges allowed).
        out_size: output side S.
        flip: bool [B]: mirror those crops horizontally.

    Returns:
        float32 [B, C, S, S] in the images' units, clamped to [0, 1].
    """
    padded = isinstance(images, torch.Tensor)
    first = images if padded else images[0]
    dev, dtype = first.device, first.dtype
    boxes = boxes.to(dev)
    sizes = sizes.to(dev)
    with torch.autocast(dev.type, enabled=False):  # resampling stays fp32 under autocast
        h, w = images.shape[-2:] if padded else (int(v) for v in sizes.max(0).values)  # the matrices' widths
        rows = resize_matrices(boxes[:, 1], boxes[:, 3], sizes[:, 0], out_size, h)  # [B, S, H]
        cols = resize_matrices(boxes[:, 0], boxes[:, 2], sizes[:, 1], out_size, w)  # [B, S, W]
        if padded:
            if flip is not None:
                cols = torch.where(flip.to(dev)[:, None, None], cols.flip(1), cols)  # mirrored output columns
            out = rows[:, None] @ images.float() @ cols[:, None].transpose(-1, -2)  # [B,1,S,H]@[B,C,H,W]@[B,1,W,S]
        else:
            mirror = [False] * len(images) if flip is None else flip.tolist()
            out = torch.empty(len(images), first.shape[0], out_size, out_size, device=dev)  # [B, C, S, S]
            for b, x in enumerate(images):
                hb, wb = x.shape[-2:]
                r, c = rows[b, :, :hb], cols[b, :, :wb]  # [S, h_b], [S, w_b]
                c = (c.flip(0) if mirror[b] else c).T  # [w_b, S] (mirrored output columns)
                x = x.float()  # [C, h_b, w_b]
                # the same two products in the cheaper order: S·h·w + S·S·min(h, w) multiply-adds
                out[b] = (r @ x) @ c if wb <= hb else r @ (x @ c)
        if dtype == torch.uint8:
            out = out.mul_(1.0 / 255.0)  # uint8 pixels are value / 255
    return out.clamp_(0.0, 1.0)

"""The images of a view page: a thumbnail per image, each searched level's blurred input, restoration and difference
(paper Fig. 3a, for one image at a time), and a segmentation's truth and prediction as outlines.

The restorations are the search's own computation (:meth:`d2mae.method.models.DeblurMAE.restore`: the image blurred
at σ_t, t fed to BLU(t), mask ratio 0), batched over images and levels on the device; their losses are returned so
that a page can be checked against the OBS table it shows.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import binary_erosion

from d2mae.method.blur import gaussian_blur
from d2mae.method.models import DeblurMAE
from d2mae.runtime.device import eval_mode

THUMB = 160  # the grid's thumbnails: the longer side, in pixels
DETAIL = 384  # a segmentation's overlay: the longer side, in pixels
TRUTH, PREDICTED = (85, 168, 104), (221, 132, 82)  # the outlines' colours (green, orange)


def png(arr: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, 3] → PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [H, W, C] in [0, 1] → uint8 [H, W] (gray: the first channel's luma) or [H, W, 3]."""
    arr = np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255), 0, 255).astype(np.uint8)
    return arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr


def thumbnail(image: np.ndarray, side: int = THUMB) -> bytes:
    """A PNG of ``image`` (float [H, W, C] in [0, 1]) with its longer side at most ``side`` (antialiased)."""
    im = Image.fromarray(to_uint8(image))
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return png(np.asarray(im))


def _outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask [H, W]."""
    return mask & ~binary_erosion(mask, iterations=1, border_value=0)


def overlay(image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray, side: int = DETAIL) -> bytes:
    """The image with the truth's outline (green) and the prediction's (orange), its longer side at most ``side``;
    the masks are class indices [H, W] at the image's own size."""
    gray = to_uint8(image)
    rgb = np.repeat(gray[..., None], 3, axis=2) if gray.ndim == 2 else gray.copy()
    scale = min(1.0, side / max(rgb.shape[:2]))
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS)).copy()
    for mask, colour in ((truth, TRUTH), (pred, PREDICTED)):
        if mask is None:
            continue
        m = np.asarray(Image.fromarray((mask > 0).astype(np.uint8)).resize(size, Image.Resampling.NEAREST)) > 0
        small[_outline(m)] = colour
    return png(small)


@torch.no_grad()
def restorations(model: DeblurMAE, views: torch.Tensor, levels: Sequence[int], device: torch.device,
                 rows: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image's blurred input x_b^(t) and restoration x̂^(t) at every level, and L_deblur^(t).

    Args:
        views: the images' deterministic views [B, C, S, S] in [0, 1] (OBS's).
        levels: the searched levels t.
        rows: (image, level) pairs per forward pass.

    Returns:
        blurred [B, L, C, S, S], restored [B, L, C, S, S], losses [B, L] (fp32, on the CPU).
    """
    b, n = views.shape[0], len(levels)
    x = views.to(device).unsqueeze(1).expand(b, n, *views.shape[1:]).reshape(b * n, *views.shape[1:])  # [B·L, …]
    t = torch.tensor(list(levels), dtype=torch.float32, device=device).repeat(b)  # [B·L], image-major
    blurred, restored, losses = [], [], []
    with eval_mode(model):
        for i in range(0, b * n, rows):
            image, loss = model.restore(x[i:i + rows], t[i:i + rows])
            blurred.append(gaussian_blur(x[i:i + rows], model.schedule.sigma(t[i:i + rows])).float().cpu())
            restored.append(image.float().cpu())
            losses.append(loss.float().cpu())
    shape = (b, n, *views.shape[1:])
    return torch.cat(blurred).view(shape), torch.cat(restored).view(shape), torch.cat(losses).view(b, n)


def strip(original: torch.Tensor, blurred: torch.Tensor, restored: torch.Tensor, gap: int = 2) -> bytes:
    """One image's search as a PNG: a column per level, rows blurred input / restoration / |restoration − x|
    (``original`` [C, S, S], ``blurred`` and ``restored`` [L, C, S, S], all in [0, 1])."""
    diff = (restored - original.unsqueeze(0)).abs()
    n, _, s, _ = blurred.shape
    canvas = np.full((3 * s + 2 * gap, n * s + (n - 1) * gap), 255, np.uint8)
    for r, part in enumerate((blurred, restored, diff)):
        for j in range(n):
            tile = to_uint8(part[j].permute(1, 2, 0).numpy())
            canvas[r * (s + gap):r * (s + gap) + s, j * (s + gap):j * (s + gap) + s] = \
                tile if tile.ndim == 2 else tile.mean(axis=2).astype(np.uint8)
    return png(canvas)

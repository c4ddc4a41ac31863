"""Figures made of images: the OBS strip (Figure 3a), image grids and MAE-style reconstructions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.patches import Rectangle

from d2mae.eval.figures import display_image, imshow, new_figure, save_figure
from d2mae.runtime.errors import D2maeError


def obs_strip(original: Any, blurred: Sequence[Any], deblurred: Sequence[Any], sigmas: Sequence[float],
              losses: Sequence[float], path: str | Path, chosen: int | None = None,
              title: str = "Optimal blurriness search") -> Path:
    """Figure 3a of the paper: the OBS procedure on one image (Eq. 4-5).

    Columns are the searched levels; rows show the blurred input G_σt(x), the deblurred output x̂^(t), and the
    absolute difference |x̂^(t) - x| (one colour scale for all levels); the original sits at the left, and the
    bottom panel plots L_deblur^(t) against σ_t. The chosen level (default: argmin of ``losses``) is framed in red.

    Args:
        original: ``[H, W]`` (or ``[H, W, C]`` / ``[C, H, W]``) image in [0, 1].
        blurred, deblurred: ``L`` images of the same shape (or arrays ``[L, ...]``).
        sigmas, losses: ``[L]`` σ of each searched level and its deblurring loss.
    """
    n = len(sigmas)
    if not (len(blurred) == len(deblurred) == len(losses) == n) or n == 0:
        raise D2maeError(f"obs_strip: need the same number (>0) of blurred ({len(blurred)}), deblurred "
                         f"({len(deblurred)}), sigmas ({n}) and losses ({len(losses)})")
    loss = np.asarray(losses, dtype=np.float64)
    best = int(np.nanargmin(loss)) if chosen is None else int(chosen)
    if not 0 <= best < n:
        raise D2maeError(f"obs_strip: chosen level {chosen} is outside 0..{n - 1}")
    orig = display_image(original)
    blur = [display_image(b) for b in blurred]
    deb = [display_image(d) for d in deblurred]
    for name, arr in (("blurred", blur), ("deblurred", deb)):
        if any(a.shape != orig.shape for a in arr):
            raise D2maeError(f"obs_strip: every {name} image must have the original's shape {orig.shape}")
    diff = [np.abs(d - orig) if d.ndim == 2 else np.abs(d - orig).mean(axis=-1) for d in deb]
    dmax = max(float(np.nanmax(d)) for d in diff) or 1.0
    fig = new_figure(1.55 * (n + 1) + 0.8, 1.6 * 3 + 2.2)
    gs = fig.add_gridspec(4, n + 1, height_ratios=[1, 1, 1, 1.15])
    ax = fig.add_subplot(gs[0, 0])
    imshow(ax, orig)
    ax.set_title("original", fontsize=9)
    for r, label in enumerate(("blurred\nG_σ(x)", "deblurred\nx̂(t)", "difference\n|x̂(t) − x|")):
        if r > 0:
            ax = fig.add_subplot(gs[r, 0])
            ax.axis("off")
            ax.text(0.5, 0.5, label, ha="center", va="center", fontsize=9, transform=ax.transAxes)
        else:
            ax.set_ylabel(label, fontsize=8)
    for c in range(n):
        for r, img in enumerate((blur[c], deb[c], diff[c])):
            ax = fig.add_subplot(gs[r, c + 1])
            if r == 2:
                imshow(ax, img, cmap="magma", vmin=0.0, vmax=dmax)
            else:
                imshow(ax, img)
            if r == 0:
                ax.set_title(f"σ = {float(sigmas[c]):.2f}" + (" (σ*)" if c == best else ""), fontsize=9,
                             color="#d62728" if c == best else "black", fontweight="bold" if c == best else None)
            if c == best:
                ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, ec="#d62728", lw=3,
                                       clip_on=False))
    ax = fig.add_subplot(gs[3, :])
    s = np.asarray(sigmas, dtype=np.float64)
    ax.plot(s, loss, marker="o", color="#4c72b0")
    ax.plot([s[best]], [loss[best]], marker="o", ms=11, mfc="none", mec="#d62728", mew=2,
            label=f"σ* = {s[best]:.2f} (min loss {loss[best]:.4g})")
    ax.set_xlabel("σ_t")
    ax.set_ylabel("L_deblur(t)")
    ax.set_xticks(s)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def image_grid(columns: Mapping[str, Any], path: str | Path, row_labels: Sequence[str] | None = None,
               max_rows: int = 8, title: str = "") -> Path:
    """A grid of images: one column per entry of ``columns`` (each ``[B, H, W]``, ``[B, H, W, C]`` or
    ``[B, C, H, W]``, values in [0, 1]; NaN pixels show gray), one row per image (at most ``max_rows``)."""
    if not columns:
        raise D2maeError("image_grid: no columns given")
    arrays = {k: (v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
              for k, v in columns.items()}
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise D2maeError(f"image_grid: columns hold different numbers of images: {sizes}")
    b = min(next(iter(sizes.values())), max_rows)
    if b == 0:
        raise D2maeError("image_grid: no images given")
    fig = new_figure(1.9 * len(arrays) + (0.8 if row_labels else 0.2), 1.9 * b + 0.5)
    axes = fig.subplots(b, len(arrays), squeeze=False)
    for j, (name, arr) in enumerate(arrays.items()):
        for i in range(b):
            imshow(axes[i, j], display_image(arr[i]))
            if i == 0:
                axes[i, j].set_title(name, fontsize=9)
            if j == 0 and row_labels is not None and i < len(row_labels):
                axes[i, j].set_ylabel(str(row_labels[i]), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def reconstruction_figure(original: Any, masked: Any, reconstruction: Any, path: str | Path,
                          blurred: Any | None = None, row_labels: Sequence[str] | None = None,
                          max_rows: int = 8, title: str = "Masked reconstruction") -> Path:
    """Pre-training reconstructions (Eq. 1-3): original x, optionally the blurred x_b, the masked input x_b^m
    (masked patches as NaN or any fill value), and the reconstruction x̂, one row per image."""
    cols: dict[str, Any] = {"original x": original}
    if blurred is not None:
        cols["blurred x_b"] = blurred
    cols["masked input"] = masked
    cols["reconstruction x̂"] = reconstruction
    return image_grid(cols, path, row_labels=row_labels, max_rows=max_rows, title=title)

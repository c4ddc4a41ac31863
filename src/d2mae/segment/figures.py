"""Figures of a segmentation run: the distribution of per-image Dice, and image / truth / prediction for the best,
median and worst test images (by Dice, among images with a lesion)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from d2mae.data.decode import load_image
from d2mae.eval.figures import new_figure, save_figure
from d2mae.segment.files import PREDICTIONS_DIR, mask_name
from d2mae.segment.masks import read_mask


def dice_histogram(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Histogram of the per-image Dice (rows of ``per_image.csv``), with the mean marked."""
    dice = np.array([float(r["dice"]) for r in rows])
    fig = new_figure(5.0, 3.2)
    ax = fig.add_subplot()
    ax.hist(dice, bins=np.linspace(0, 1, 21), color="#4c72b0", edgecolor="white")
    ax.axvline(dice.mean(), color="#c44e52", linestyle="--", label=f"mean {dice.mean():.3f}")
    ax.set_xlabel("Dice (per image, at its own size)")
    ax.set_ylabel("images")
    ax.set_title(f"{title}: {len(dice)} test images")
    ax.legend(frameon=False)
    return save_figure(fig, path)


def _cases(rows: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    lesion = [r for r in rows if int(r["truth_pixels"]) > 0] or list(rows)
    ordered = sorted(lesion, key=lambda r: float(r["dice"]))
    return [("best", ordered[-1]), ("median", ordered[len(ordered) // 2]), ("worst", ordered[0])]


def overlay_figure(rows: Sequence[dict[str, Any]], run: Path, path: Path, num_classes: int) -> Path:
    """Three rows (best, median, worst): the image, the truth mask's outline, the prediction's outline."""
    cases = _cases(rows)
    fig = new_figure(7.5, 2.5 * len(cases))
    for k, (name, r) in enumerate(cases):
        img = load_image(r["path"], 1)[:, :, 0]  # [H, W]
        truth = read_mask(r["mask"], num_classes)
        pred = read_mask(str(run / PREDICTIONS_DIR / mask_name(r["id"])), num_classes)
        for j, (label, m) in enumerate((("image", None), ("truth", truth), ("prediction", pred))):
            ax = fig.add_subplot(len(cases), 3, 3 * k + j + 1)
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            if m is not None and m.any():
                ax.contour(m > 0, levels=[0.5], colors=["#55a868" if label == "truth" else "#dd8452"],
                           linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: Dice {float(r['dice']):.3f}" if j == 0 else label, fontsize=8)
    return save_figure(fig, path)

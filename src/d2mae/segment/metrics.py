"""Dice, IoU and HD95 of one predicted mask against its truth, at the image's own resolution, through MONAI.

Conventions (per foreground class, then the mean over the foreground classes of the image):

* Dice and IoU are averaged over the foreground classes present in the truth or in the prediction: a class that
  occurs in neither says nothing about the image, so it does not count (with ``--num-classes 3`` on a 0/1 mask, an
  empty prediction scores 0, not the 0.5 that counting the absent class 2 as a perfect match would give). An image
  with no foreground in either — a normal image read as normal — scores 1; a non-empty prediction on an empty truth
  scores 0.
* HD95 (the 95th percentile of the symmetric surface distance, in pixels of the image; MONAI's
  ``compute_hausdorff_distance(percentile=95)``) is undefined when the truth or the prediction of a class is
  empty: that class is left out, and an image with no class defined has HD95 = NaN, left out of every mean and
  counted (``hd95_undefined``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from d2mae.eval.statistics import MeanCI, mean_ci

METRICS = ("dice", "iou", "hd95")


def _one_hot(labels: np.ndarray, k: int) -> torch.Tensor:
    """Class indices [H, W] → one-hot [1, K, H, W] (float64)."""
    t = torch.as_tensor(labels.astype(np.int64))
    return torch.nn.functional.one_hot(t, k).permute(2, 0, 1)[None].double()


def image_scores(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> dict[str, float]:
    """Dice, IoU and HD95 of prediction ``pred`` against ``truth`` (class indices [H, W], same size)."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou  # lazy (segment/model.py)

    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in size")
    p, y = _one_hot(pred, num_classes), _one_hot(truth, num_classes)  # [1, K, H, W]
    present = [c - 1 for c in range(1, num_classes) if p[0, c].any() or y[0, c].any()]  # foreground classes seen
    dice = compute_dice(p, y, include_background=False, ignore_empty=False)[0][present]  # [classes present]
    iou = compute_iou(p, y, include_background=False, ignore_empty=False)[0][present]
    hd = []
    with warnings.catch_warnings():  # MONAI warns about its own internal use of a deprecated argument
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        for c in range(1, num_classes):
            if p[0, c].any() and y[0, c].any():
                hd.append(float(compute_hausdorff_distance(p[:, [0, c]], y[:, [0, c]], percentile=95.0)[0, 0]))
    return {"dice": float(dice.mean()) if present else 1.0, "iou": float(iou.mean()) if present else 1.0,
            "hd95": float(np.mean(hd)) if hd else math.nan}


@dataclass
class MetricSummary:
    """A metric over images: mean with a 95% percentile-bootstrap CI, the t-interval over folds, and how many
    images were left out (HD95 undefined)."""

    metric: str
    n: int
    mean: float
    ci: tuple[float, float]
    left_out: int
    over_folds: MeanCI | None

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "n": self.n, "mean": self.mean, "ci": list(self.ci),
                "left_out": self.left_out, "over_folds": self.over_folds.to_dict() if self.over_folds else None}


def bootstrap_mean(values: np.ndarray, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95
                   ) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` [n] (images resampled with replacement)."""
    if len(values) < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def defined_mean(values: Sequence[float]) -> float:
    """The mean of the defined (finite) values; NaN when none is (an HD95 undefined on every image)."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if len(arr) else math.nan


def summarize(rows: Sequence[dict[str, Any]], metric: str, n_resamples: int = 2000, seed: int = 0) -> MetricSummary:
    """``metric`` over per-image rows (``fold`` and the metric's value; NaN = undefined, left out)."""
    values = np.array([float(r[metric]) for r in rows], dtype=float)
    defined = np.isfinite(values)
    kept = values[defined]
    folds = sorted({str(r["fold"]) for r in rows})
    over = None
    if len(folds) > 1:
        per_fold = [defined_mean([float(r[metric]) for r in rows if str(r["fold"]) == f]) for f in folds]
        over = mean_ci([v for v in per_fold if math.isfinite(v)])
    return MetricSummary(metric, int(defined.sum()), float(kept.mean()) if len(kept) else math.nan,
                         bootstrap_mean(kept, n_resamples, seed), int((~defined).sum()), over)

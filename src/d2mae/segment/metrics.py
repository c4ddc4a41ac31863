"""Dice, IoU and HD95 of one predicted mask against its truth, at the image's own resolution, through MONAI, and a
run's summary metrics over the sets of images that the truth alone defines (:data:`SUMMARY`), so that no row of a
comparison is scored on its own, flattering set.

Conventions of one image (per foreground class, then the mean over the foreground classes of the image):

* Dice and IoU are averaged over the foreground classes present in the truth or in the prediction: a class that
  occurs in neither says nothing about the image, so it does not count (with ``--num-classes 3`` on a 0/1 mask, an
  empty prediction scores 0, not the 0.5 that counting the absent class 2 as a perfect match would give). An image
  with no foreground in either — a normal image read as normal — scores 1; a non-empty prediction on an empty truth
  scores 0.
* HD95 (the 95th percentile of the symmetric surface distance, in pixels of the image; MONAI's
  ``compute_hausdorff_distance(percentile=95)``) is undefined when the truth or the prediction of a class is
  empty: that class is left out, and an image with no class defined has HD95 = NaN in ``per_image.csv``. The
  summary ``hd95_lesion`` scores a missed lesion at the image diagonal instead (:func:`per_image_values`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats

from d2mae.eval.statistics import mean_ci


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


#: A segmentation run's summary metrics: each taken over a set of images that the truth alone defines, so that every
#: row of a comparison is scored on the same images. name → (label, unit scale for a table, higher is better).
SUMMARY: dict[str, tuple[str, float, bool]] = {
    "dice_lesion": ("Dice, lesion images", 100.0, True),
    "dice": ("Dice, all images", 100.0, True),
    "iou_lesion": ("IoU, lesion images", 100.0, True),
    "empty_correct": ("empty truth predicted empty", 100.0, True),
    "hd95_lesion": ("HD95 px, lesion images (missed: the diagonal)", 1.0, False),
}


def per_image_values(rows: Sequence[dict[str, Any]], metric: str) -> np.ndarray:
    """Each image's value of a :data:`SUMMARY` metric [n], NaN for an image outside the metric's set.

    * ``dice``: every image (an empty truth scores 1 with an empty prediction, 0 otherwise);
    * ``dice_lesion``, ``iou_lesion``: the images whose truth holds a lesion, and only those;
    * ``empty_correct``: the images with an empty truth: 1 when the prediction is empty too, else 0;
    * ``hd95_lesion``: the images whose truth holds a lesion; a missed lesion (empty prediction, where HD95 is
      undefined) is scored at the image's diagonal, the farthest a boundary can be, and counted
      (:func:`summarize`). Rows give ``dice``, ``iou``, ``hd95``, ``truth_pixels``, ``lesion_pixels`` and the
      image's ``height`` and ``width``.
    """
    truth = np.array([int(r["truth_pixels"]) > 0 for r in rows], dtype=bool)
    pred = np.array([int(r["lesion_pixels"]) > 0 for r in rows], dtype=bool)
    nan = np.full(len(rows), math.nan)
    if metric in ("dice", "iou"):
        return np.array([float(r[metric]) for r in rows], dtype=float)
    if metric in ("dice_lesion", "iou_lesion"):
        values = np.array([float(r[metric.split("_")[0]]) for r in rows], dtype=float)
        return np.where(truth, values, nan)
    if metric == "empty_correct":
        return np.where(~truth, (~pred).astype(float), nan)
    if metric == "hd95_lesion":
        hd = np.array([float(r["hd95"]) for r in rows], dtype=float)
        diagonal = np.array([math.hypot(float(r["height"]), float(r["width"])) for r in rows], dtype=float)
        return np.where(truth, np.where(np.isfinite(hd), hd, diagonal), nan)
    raise ValueError(f"unknown segmentation metric {metric!r}; known: {', '.join(SUMMARY)}")


def mean_interval(values: np.ndarray, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
                  ) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` [n] (scipy.stats.bootstrap, images resampled)."""
    values = values[np.isfinite(values)]
    if len(values) < 2 or np.all(values == values[0]):
        return (float(values[0]), float(values[0])) if len(values) else (math.nan, math.nan)
    res = stats.bootstrap((values,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                          method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarize(rows: Sequence[dict[str, Any]], metric: str, n_resamples: int = 1000, seed: int = 0,
              confidence: float = 0.95) -> dict[str, Any]:
    """A :data:`SUMMARY` metric over its images: the mean with a percentile-bootstrap CI, the images counted, the
    t-interval of the fold means (more than one fold), and for HD95 the lesions missed."""
    values = per_image_values(rows, metric)
    kept = np.isfinite(values)
    fold_of = np.array([str(r["fold"]) for r in rows])
    folds = sorted(set(fold_of.tolist()))
    over = None
    if len(folds) > 1:
        means = [float(values[(fold_of == f) & kept].mean()) if ((fold_of == f) & kept).any() else math.nan
                 for f in folds]
        over = mean_ci(means, confidence).to_dict()
    out = {"metric": metric, "n": int(kept.sum()), "mean": float(values[kept].mean()) if kept.any() else math.nan,
           "ci": list(mean_interval(values, n_resamples, seed, confidence)), "over_folds": over}
    if metric == "hd95_lesion":
        out["missed"] = int(sum(1 for r in rows if int(r["truth_pixels"]) > 0 and int(r["lesion_pixels"]) == 0))
    return out


def by_class(rows: Sequence[dict[str, Any]], metric: str, column: str = "class", **options: Any
             ) -> dict[str, dict[str, Any]]:
    """:func:`summarize` for each value of a class column (BUSI's benign / malignant / normal); ``{}`` without one."""
    if not rows or column not in rows[0]:
        return {}
    return {c: summarize([r for r in rows if r[column] == c], metric, **options)
            for c in sorted({r[column] for r in rows})}

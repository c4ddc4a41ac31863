"""Classification metrics (paper Section 3.1, Tables 2-3, Figure 2); their confidence intervals and significance
tests are :mod:`d2mae.eval.statistics`.

The paper reports accuracy (ACC), macro-averaged F1 and AUROC, with 95% confidence intervals as error bars and
significance "assessed via two-sided t-tests" (best vs. runner-up, Table 2). This module and
:mod:`d2mae.eval.statistics` provide those numbers as pure functions on arrays:

* :func:`classification_metrics` -- every metric of one set of predictions, computed with scikit-learn.
* ``statistics.bootstrap`` / ``statistics.bootstrap_ci`` -- a seeded percentile bootstrap over images (one run,
  one test set).
* ``statistics.mean_ci`` -- mean and t-distribution 95% CI over folds or seeds (the "±" of Table 2).
* ``statistics.paired_ttest`` -- the paper's two-sided paired t-test over folds/seeds (``scipy.stats.ttest_rel``).
* ``statistics.paired_bootstrap`` -- difference of two methods on the same images, with CI and p-value.

Conventions: ``y_true`` is an int array ``[N]`` of class indices ``0..K-1``; ``probs`` is ``[N, K]`` class
probabilities (a ``[N]`` array is read as the positive-class probability of a binary task); ``y_pred`` defaults to
``argmax(probs)``. Metric values are fractions in [0, 1]; reports multiply by 100. Undefined values are ``NaN`` and
come with a one-line reason, never a silent skip.

The bootstrap evaluates the four scalar metrics for all resamples at once with NumPy (confusion counts via
``bincount``, AUROC via average ranks = the Mann-Whitney statistic). These batch forms give the same numbers as
scikit-learn's ``accuracy_score``, ``balanced_accuracy_score``, ``f1_score(average="macro")`` and
``roc_auc_score`` (tests check this); they exist only because calling scikit-learn 1000 times per metric is slow.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from d2mae.runtime.errors import D2maeError

#: The scalar metrics every evaluation reports, in display order.
SCALAR_METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "auroc", "balanced_accuracy")

#: Short names used in tables and figures (the paper's ACC / F1 / AUROC).
METRIC_LABELS: dict[str, str] = {
    "accuracy": "ACC",
    "macro_f1": "F1",
    "auroc": "AUROC",
    "balanced_accuracy": "Balanced ACC",
}

MetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


# --------------------------------------------------------------------------------------------------- inputs
def as_arrays(y_true: Any, probs: Any, y_pred: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert inputs: ``y_true [N]`` int, ``probs [N, K]`` float, ``y_pred [N]`` int.

    A 1-D ``probs`` is the positive-class probability of a binary task and becomes ``[N, 2]``.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1:
        raise D2maeError(f"y_true must be one label per image (1-D), got shape {y.shape}")
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)  # [N, 2]
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise D2maeError(f"probs must have shape [N={y.shape[0]}, K], got {p.shape}")
    if y.shape[0] == 0:
        raise D2maeError("no predictions to evaluate (0 images)")
    if not np.all(np.isfinite(p)):
        raise D2maeError("probs contains NaN or infinite values")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise D2maeError("y_true must hold integer class indices 0..K-1")
    k = p.shape[1]
    if k < 2:
        raise D2maeError(f"probs must have at least 2 class columns, got {k}")
    if y.min() < 0 or y.max() >= k:
        raise D2maeError(f"y_true holds class indices outside 0..{k - 1} (probs has {k} columns)")
    if y_pred is None:
        pred = np.argmax(p, axis=1)
    else:
        pred = np.asarray(y_pred)
        if pred.shape != y.shape:
            raise D2maeError(f"y_pred must have shape {y.shape}, got {pred.shape}")
        if pred.size and (pred.min() < 0 or pred.max() >= k):
            raise D2maeError(f"y_pred holds class indices outside 0..{k - 1}")
    return y.astype(np.int64), p, pred.astype(np.int64)


def auroc_undefined_reason(y_true: np.ndarray, num_classes: int) -> str | None:
    """Why AUROC cannot be computed on these labels, or ``None`` when it can.

    Binary AUROC needs both classes; one-vs-rest macro AUROC needs every class present in ``y_true``.
    """
    present = np.unique(y_true)
    if num_classes == 2 and present.size < 2:
        return f"only class {int(present[0])} present in the labels; AUROC needs both classes"
    if num_classes > 2 and present.size < num_classes:
        missing = sorted(set(range(num_classes)) - set(int(c) for c in present))
        return f"class(es) {missing} absent from the labels; one-vs-rest AUROC needs every class"
    return None


# ---------------------------------------------------------------------------------------- point estimates
def auroc(y_true: Any, probs: Any) -> float:
    """AUROC with scikit-learn: binary on the positive-class probability, else one-vs-rest macro (``ovr``).

    Returns ``NaN`` when undefined (see :func:`auroc_undefined_reason`).
    """
    y, p, _ = as_arrays(y_true, probs)
    if auroc_undefined_reason(y, p.shape[1]) is not None:
        return math.nan
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1]))
    # One-vs-rest macro: the mean of the per-class binary AUROCs -- exactly what roc_auc_score(multi_class="ovr",
    # average="macro") computes (label_binarize + _average_binary_score), without its check that every row sums to
    # 1, which probabilities rounded in a CSV can fail (renormalising instead would perturb tied scores).
    return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in range(p.shape[1])]))


def macro_f1(y_true: Any, y_pred: Any) -> float:
    """The paper's F1: the macro average of class-wise F1 scores (Section 3.1), d2mae's one rule for it.

    The average runs over the classes present in ``y_true`` or ``y_pred`` (scikit-learn's default labels,
    ``zero_division=0``): a class a small fold lacks, and that nothing was predicted as, neither counts as 0 nor
    counts at all. Model selection, evaluation, the bootstrap and every table use this rule.
    """
    return float(f1_score(np.asarray(y_true), np.asarray(y_pred), average="macro", zero_division=0))


def _metric_sklearn(name: str, y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> float:
    if name == "accuracy":
        return float(accuracy_score(y, pred))
    if name == "macro_f1":
        return macro_f1(y, pred)
    if name == "balanced_accuracy":
        with warnings.catch_warnings():  # "y_pred contains classes not in y_true": handled like scikit-learn does
            warnings.simplefilter("ignore")
            return float(balanced_accuracy_score(y, pred))
    if name == "auroc":
        return auroc(y, p)
    raise D2maeError(f"unknown metric '{name}'; known metrics: {', '.join(SCALAR_METRICS)}")


def metric_value(metric: str | MetricFn, y_true: Any, probs: Any, y_pred: Any = None) -> float:
    """One scalar metric: a name from :data:`SCALAR_METRICS` or a callable ``f(y_true, probs, y_pred) -> float``."""
    y, p, pred = as_arrays(y_true, probs, y_pred)
    if callable(metric):
        return float(metric(y, p, pred))
    return _metric_sklearn(metric, y, p, pred)


def classification_metrics(y_true: Any, probs: Any, classes: Sequence[str] | None = None,
                           y_pred: Any = None) -> dict[str, Any]:
    """All metrics of one set of predictions (scikit-learn throughout).

    Args:
        y_true: ``[N]`` int class indices.
        probs: ``[N, K]`` class probabilities (or ``[N]`` positive-class probability, binary).
        classes: K class names (default ``"0".."K-1"``).
        y_pred: ``[N]`` predicted indices; default ``argmax(probs)``.

    Returns:
        ``{"n", "classes", "accuracy", "macro_f1", "auroc", "auroc_note", "balanced_accuracy", "per_class":
        {name: {"precision", "recall", "f1", "support"}}, "confusion_matrix": [[...]] (rows = true, cols = pred)}``.
        ``macro_f1`` averages the classes present in ``y_true`` or ``y_pred`` (scikit-learn's default labels);
        ``auroc`` is ``NaN`` with ``auroc_note`` saying why when a class is absent from ``y_true``.
    """
    y, p, pred = as_arrays(y_true, probs, y_pred)
    k = p.shape[1]
    names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise D2maeError(f"{len(names)} class names given for probabilities with {k} columns")
    labels = list(range(k))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, average=None, zero_division=0)
    reason = auroc_undefined_reason(y, k)
    return {
        "n": int(y.shape[0]),
        "classes": names,
        "accuracy": _metric_sklearn("accuracy", y, p, pred),
        "macro_f1": _metric_sklearn("macro_f1", y, p, pred),
        "auroc": math.nan if reason else _metric_sklearn("auroc", y, p, pred),
        "auroc_note": reason,
        "balanced_accuracy": _metric_sklearn("balanced_accuracy", y, p, pred),
        "per_class": {
            names[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                       "support": int(support[i])}
            for i in labels
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }


# ----------------------------------------------------------------------------------------------- helpers
def nan_to_none(obj: Any) -> Any:
    """Recursively replace NaN/inf floats by ``None`` so the result is strict JSON."""
    if isinstance(obj, float) or isinstance(obj, np.floating):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Mapping):
        return {str(k): nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return nan_to_none(obj.tolist())
    return obj

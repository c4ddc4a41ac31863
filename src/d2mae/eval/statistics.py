"""Uncertainty and significance for the paper's metrics (Section 3.1): percentile-bootstrap CIs over images (vectorised
over resamples), the mean ± t-interval over folds, and the paired tests (two-sided paired t-test over folds, paired
bootstrap over images)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

import numpy as np
from scipy import optimize, stats

from d2mae.eval.metrics import SCALAR_METRICS, MetricFn, as_arrays, metric_value
from d2mae.runtime.errors import D2maeError

# Resamples are evaluated in chunks so that a chunk holds at most this many numbers ([R, N, K] probabilities).
_CHUNK_ELEMENTS = 4_000_000


# ------------------------------------------------------------------------------ batch metrics (bootstrap)
def _batch_confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Confusion counts of R resamples at once: y, pred [R, N] -> [R, K, K] (rows = true, cols = predicted)."""
    r = y.shape[0]
    flat = (np.arange(r)[:, None] * k * k + y * k + pred).ravel()  # [R*N]
    return np.bincount(flat, minlength=r * k * k).reshape(r, k, k)


def _batch_binary_auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC per row: scores, positive [R, N] -> [R] (NaN where a row lacks a class).

    With average ranks for ties this equals the trapezoidal ROC area of ``roc_auc_score``.
    """
    ranks = stats.rankdata(scores, axis=1)  # [R, N], ties get their average rank
    n_pos = positive.sum(axis=1).astype(np.float64)  # [R]
    n_neg = positive.shape[1] - n_pos
    rank_sum = (ranks * positive).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _batch_metric(name: str, y: np.ndarray, p: np.ndarray, pred: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Metric ``name`` on each resample ``idx [R, N]`` of the images; returns ``[R]`` (NaN = undefined)."""
    k = p.shape[1]
    yr, predr = y[idx], pred[idx]  # [R, N]
    if name == "accuracy":
        return (yr == predr).mean(axis=1)
    if name in ("macro_f1", "balanced_accuracy"):
        cm = _batch_confusion(yr, predr, k).astype(np.float64)  # [R, K, K]
        tp = np.diagonal(cm, axis1=1, axis2=2)  # [R, K]
        true_count = cm.sum(axis=2)  # [R, K]
        pred_count = cm.sum(axis=1)  # [R, K]
        with np.errstate(invalid="ignore", divide="ignore"):
            if name == "balanced_accuracy":  # mean recall over classes present in y_true
                recall = np.where(true_count > 0, tp / true_count, np.nan)
                return np.nanmean(recall, axis=1)
            # F1 = 2TP / (2TP + FP + FN), averaged over classes present in y_true or y_pred
            denom = true_count + pred_count
            f1 = np.where(denom > 0, 2.0 * tp / denom, np.nan)
            return np.nanmean(f1, axis=1)
    if name == "auroc":
        if k == 2:
            return _batch_binary_auc(p[idx, 1], yr == 1)
        per_class = np.stack([_batch_binary_auc(p[idx, c], yr == c) for c in range(k)], axis=1)  # [R, K]
        out = per_class.mean(axis=1)  # NaN when any class is missing, like roc_auc_score(multi_class="ovr")
        return out
    raise D2maeError(f"unknown metric '{name}'; known metrics: {', '.join(SCALAR_METRICS)}")


def _resample_values(metric: str | MetricFn, y: np.ndarray, p: np.ndarray, pred: np.ndarray,
                     idx: np.ndarray) -> np.ndarray:
    """Evaluate ``metric`` on every resample ``idx [R, N]`` -> ``[R]``, chunked to bound memory."""
    if callable(metric):
        out = np.empty(idx.shape[0])
        for i, row in enumerate(idx):
            out[i] = metric(y[row], p[row], pred[row])
        return out
    if metric not in SCALAR_METRICS:
        raise D2maeError(f"unknown metric '{metric}'; known metrics: {', '.join(SCALAR_METRICS)}")
    n, k = p.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n * k))
    parts = [_batch_metric(metric, y, p, pred, idx[s:s + chunk]) for s in range(0, idx.shape[0], chunk)]
    return np.concatenate(parts)


# --------------------------------------------------------------------------------------------- bootstrap
@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """Percentile bootstrap of one metric over images.

    ``n_skipped`` counts resamples on which the metric was undefined (e.g. AUROC on a resample that lacks a
    class); they are left out of the percentiles and named in ``note``.
    """

    estimate: float
    low: float
    high: float
    n_resamples: int
    n_skipped: int
    confidence: float
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_bootstrap_args(n_resamples: int, confidence: float) -> None:
    if int(n_resamples) < 1:
        raise D2maeError(f"n_resamples (--n-bootstrap) must be at least 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise D2maeError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")


def _resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """``[R, N]`` indices drawn with replacement, from a generator seeded by ``seed`` (same seed -> same CIs)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(int(n_resamples), n))


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _skip_note(n_skipped: int, n_resamples: int, metric: str | MetricFn) -> str | None:
    if n_skipped == 0:
        return None
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    return (f"{n_skipped} of {n_resamples} bootstrap resamples left out: {name} undefined on them "
            "(a class missing from the resample)")


def bootstrap(y_true: Any, probs: Any, metric: str | MetricFn, n_resamples: int = 1000, seed: int = 0,
              y_pred: Any = None, confidence: float = 0.95) -> BootstrapResult:
    """Seeded percentile bootstrap of ``metric`` over images: resample N images with replacement R times.

    Args:
        metric: a name from :data:`SCALAR_METRICS` (fast batched path) or ``f(y_true, probs, y_pred) -> float``
            (returning NaN when undefined).
        n_resamples: R. seed: seeds ``numpy.random.default_rng``. confidence: 0.95 -> 2.5th/97.5th percentiles.
    """
    _check_bootstrap_args(n_resamples, confidence)
    y, p, pred = as_arrays(y_true, probs, y_pred)
    estimate = metric_value(metric, y, p, pred)
    idx = _resample_indices(y.shape[0], n_resamples, seed)  # [R, N]
    values = _resample_values(metric, y, p, pred, idx)  # [R]
    valid = values[np.isfinite(values)]
    n_skipped = int(values.size - valid.size)
    note = _skip_note(n_skipped, int(n_resamples), metric)
    if valid.size == 0:
        why = "the metric is undefined on every resample" if math.isnan(estimate) else "no valid resample"
        return BootstrapResult(estimate, math.nan, math.nan, int(n_resamples), n_skipped, confidence,
                               f"confidence interval undefined: {why}")
    low, high = _percentile_interval(valid, confidence)
    return BootstrapResult(estimate, low, high, int(n_resamples), n_skipped, confidence, note)


def bootstrap_ci(y_true: Any, probs: Any, metric: str | MetricFn, n_resamples: int = 1000, seed: int = 0,
                 y_pred: Any = None, confidence: float = 0.95) -> tuple[float, float]:
    """95% (by default) percentile-bootstrap CI ``(low, high)`` of ``metric`` over images; see :func:`bootstrap`."""
    res = bootstrap(y_true, probs, metric, n_resamples=n_resamples, seed=seed, y_pred=y_pred,
                    confidence=confidence)
    return res.low, res.high


@dataclasses.dataclass(frozen=True)
class PairedBootstrapResult:
    """Difference ``metric(A) - metric(B)`` on the same images, with a paired percentile-bootstrap CI.

    ``pvalue`` is two-sided: twice the smaller share of resampled differences on either side of 0 (with the usual
    +1 correction, so it is never exactly 0), capped at 1.
    """

    value_a: float
    value_b: float
    difference: float
    low: float
    high: float
    pvalue: float
    n_resamples: int
    n_skipped: int
    confidence: float
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def paired_bootstrap(y_true: Any, probs_a: Any, probs_b: Any, metric: str | MetricFn, n_resamples: int = 1000,
                     seed: int = 0, y_pred_a: Any = None, y_pred_b: Any = None,
                     confidence: float = 0.95) -> PairedBootstrapResult:
    """Paired bootstrap over images of two methods' predictions on the same images (same row order).

    Each resample draws one set of image indices and evaluates both methods on it, so the image-to-image variation
    cancels in the difference.
    """
    _check_bootstrap_args(n_resamples, confidence)
    y, pa, preda = as_arrays(y_true, probs_a, y_pred_a)
    y_b, pb, predb = as_arrays(y_true, probs_b, y_pred_b)
    if pa.shape != pb.shape:
        raise D2maeError(f"probs_a {pa.shape} and probs_b {pb.shape} must have the same shape (same images, classes)")
    value_a = metric_value(metric, y, pa, preda)
    value_b = metric_value(metric, y_b, pb, predb)
    idx = _resample_indices(y.shape[0], n_resamples, seed)  # [R, N], shared by both methods
    diffs = _resample_values(metric, y, pa, preda, idx) - _resample_values(metric, y, pb, predb, idx)  # [R]
    valid = diffs[np.isfinite(diffs)]
    n_skipped = int(diffs.size - valid.size)
    note = _skip_note(n_skipped, int(n_resamples), metric)
    difference = value_a - value_b
    if valid.size == 0:
        return PairedBootstrapResult(value_a, value_b, difference, math.nan, math.nan, math.nan, int(n_resamples),
                                     n_skipped, confidence, "metric undefined on every resample: no CI, no p-value")
    low, high = _percentile_interval(valid, confidence)
    below = (np.count_nonzero(valid <= 0.0) + 1) / (valid.size + 1)
    above = (np.count_nonzero(valid >= 0.0) + 1) / (valid.size + 1)
    pvalue = float(min(1.0, 2.0 * min(below, above)))
    if np.all(valid == 0.0):
        pvalue = 1.0
        note = (note + "; " if note else "") + "the two methods agree on every resample (difference 0)"
    return PairedBootstrapResult(value_a, value_b, difference, low, high, pvalue, int(n_resamples), n_skipped,
                                 confidence, note)


# ------------------------------------------------------------------------------------ over folds / seeds
@dataclasses.dataclass(frozen=True)
class MeanCI:
    """Mean of per-fold (or per-seed) values with a t-distribution confidence interval.

    ``n == 1``: the mean is that value and the CI is undefined (``NaN``, with a note): one fold has no spread.
    All values equal: the CI collapses to the mean.
    """

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95
    std: float = math.nan
    note: str | None = None

    @property
    def half_width(self) -> float:
        """``(high - low) / 2``: the "± x" of the paper's tables (NaN when the CI is undefined)."""
        return (self.high - self.low) / 2.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["half_width"] = self.half_width
        return out


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> MeanCI:
    """Mean ± CI over folds/seeds: ``scipy.stats.t.interval(confidence, n-1, loc=mean, scale=sem)``.

    NaN values (a metric undefined on a fold) are left out and counted in ``note``.
    """
    if not 0.0 < confidence < 1.0:
        raise D2maeError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    arr = np.asarray(values, dtype=np.float64).ravel()
    finite = arr[np.isfinite(arr)]
    notes = []
    if finite.size < arr.size:
        notes.append(f"{arr.size - finite.size} undefined (NaN) value(s) left out")
    n = int(finite.size)
    if n == 0:
        notes.append("no values: mean and CI undefined")
        return MeanCI(math.nan, math.nan, math.nan, 0, confidence, math.nan, "; ".join(notes))
    mean = float(finite.mean())
    if n == 1:
        notes.append("one value: no spread, CI undefined")
        return MeanCI(mean, math.nan, math.nan, 1, confidence, math.nan, "; ".join(notes))
    std = float(finite.std(ddof=1))
    if std == 0.0:
        notes.append("all values equal: CI has zero width")
        return MeanCI(mean, mean, mean, n, confidence, 0.0, "; ".join(notes))
    sem = std / math.sqrt(n)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return MeanCI(mean, float(low), float(high), n, confidence, std, "; ".join(notes) or None)


@dataclasses.dataclass(frozen=True)
class TTestResult:
    """Two-sided paired t-test of A vs. B over matched folds/seeds (``scipy.stats.ttest_rel``)."""

    statistic: float
    pvalue: float
    n: int
    mean_difference: float
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def paired_ttest(a_values: Sequence[float] | np.ndarray, b_values: Sequence[float] | np.ndarray) -> TTestResult:
    """Two-sided paired t-test of ``a`` vs. ``b`` (paper, Section 3.1: "two-sided t-tests"; Table 2 P-value row).

    Pairs with a NaN on either side are left out (counted in ``note``). ``pvalue`` is ``NaN`` with a reason when
    fewer than 2 pairs remain or all differences are zero (no evidence either way); when the differences are all
    equal and non-zero the statistic is infinite and p = 0, as ``ttest_rel`` gives, with a note.
    """
    a = np.asarray(a_values, dtype=np.float64).ravel()
    b = np.asarray(b_values, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise D2maeError(f"paired t-test needs the same number of values on both sides, got {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    notes = [f"{int((~keep).sum())} pair(s) with an undefined value left out"] if not keep.all() else []
    a, b = a[keep], b[keep]
    n = int(a.size)
    mean_diff = float(np.mean(a - b)) if n else math.nan
    if n < 2:
        notes.append(f"{n} paired value(s): a t-test needs at least 2 folds or seeds")
        return TTestResult(math.nan, math.nan, n, mean_diff, "; ".join(notes))
    d = a - b
    if np.all(d == 0.0):
        notes.append("all differences are zero: the t-test is undefined")
        return TTestResult(math.nan, math.nan, n, 0.0, "; ".join(notes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_rel(a, b)
    if np.all(d == d[0]):
        notes.append("differences are all equal (zero variance): infinite t statistic")
    return TTestResult(float(res.statistic), float(res.pvalue), n, mean_diff, "; ".join(notes) or None)


def minimum_detectable_effect(differences: Sequence[float] | np.ndarray, alpha: float = 0.05,
                              power: float = 0.8) -> float:
    """The smallest true mean difference that a two-sided paired t-test at ``alpha`` detects with ``power``, given
    the spread of the measured paired ``differences`` (what a null result rules out).

    With n pairs and standard deviation s of the differences, the test statistic of a true difference δ follows a
    noncentral t with n − 1 degrees of freedom and noncentrality δ√n / s; δ is solved from
    P(|T| > t_{1−α/2, n−1}) = power (Cohen 1988, ch. 2). NaN with fewer than 2 finite pairs; 0 when s = 0.
    """
    d = np.asarray(differences, dtype=np.float64).ravel()
    d = d[np.isfinite(d)]
    n = int(d.size)
    if n < 2:
        return math.nan
    if np.all(d == d[0]):  # no spread: any true difference is detected
        return 0.0
    sd = float(d.std(ddof=1))
    df, crit = n - 1, float(stats.t.ppf(1 - alpha / 2, n - 1))

    def shortfall(delta: float) -> float:
        nc = delta * math.sqrt(n) / sd
        upper = float(stats.nct.sf(crit, df, nc))
        upper = upper if math.isfinite(upper) else 1.0 - float(stats.nct.cdf(crit, df, nc))
        lower = float(stats.nct.cdf(-crit, df, nc))  # the far tail: scipy may give NaN where it is ~0
        return upper + (lower if math.isfinite(lower) else 0.0) - power

    high = sd / math.sqrt(n)
    while shortfall(high) < 0:  # a bracket: power grows with δ
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-12 * sd))

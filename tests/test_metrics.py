"""Metrics agree with scikit-learn/scipy; CIs and tests behave as the paper's reporting needs (Section 3.1)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from d2mae.eval.metrics import SCALAR_METRICS, classification_metrics, nan_to_none
from d2mae.eval.statistics import bootstrap, bootstrap_ci, mean_ci, paired_bootstrap, paired_ttest
from d2mae.runtime.errors import D2maeError


def _predictions(n: int, k: int, seed: int, skill: float = 1.5, round_to: int | None = None):
    """Labels [N] and softmax probabilities [N, K] that favour the true class by ``skill``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += skill
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if round_to is not None:  # creates ties, like probabilities rounded in a CSV
        p = np.round(p, round_to)
    return y, p


def _sk(name: str, y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> float:
    if name == "accuracy":
        return accuracy_score(y, pred)
    if name == "macro_f1":
        return f1_score(y, pred, average="macro", zero_division=0)
    if name == "balanced_accuracy":
        with warnings.catch_warnings():  # "y_pred contains classes not in y_true" on some resamples
            warnings.simplefilter("ignore")
            return balanced_accuracy_score(y, pred)
    if p.shape[1] == 2:
        return roc_auc_score(y, p[:, 1]) if np.unique(y).size == 2 else math.nan
    if np.unique(y).size < p.shape[1]:
        return math.nan
    if np.allclose(p.sum(axis=1), 1.0):
        return roc_auc_score(y, p, multi_class="ovr", average="macro")
    # rows that do not sum to 1 (rounded): roc_auc_score refuses them; "ovr" is the mean of one-vs-rest AUROCs
    return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in range(p.shape[1])]))


@pytest.mark.parametrize("k", [2, 3, 8])
def test_classification_metrics_agree_with_sklearn(k: int) -> None:
    y, p = _predictions(240, k, seed=k)
    pred = p.argmax(axis=1)
    m = classification_metrics(y, p, classes=[f"c{i}" for i in range(k)])
    assert m["n"] == 240
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    if k == 2:
        assert m["auroc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    else:
        assert m["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["auroc_note"] is None
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    prec = precision_score(y, pred, average=None, zero_division=0)
    rec = recall_score(y, pred, average=None, zero_division=0)
    for i in range(k):
        assert m["per_class"][f"c{i}"]["precision"] == pytest.approx(prec[i])
        assert m["per_class"][f"c{i}"]["recall"] == pytest.approx(rec[i])
        assert m["per_class"][f"c{i}"]["support"] == int((y == i).sum())


def test_binary_accepts_positive_class_probability_and_explicit_predictions() -> None:
    y, p = _predictions(100, 2, seed=1)
    m1 = classification_metrics(y, p[:, 1])
    m2 = classification_metrics(y, p)
    assert m1["auroc"] == pytest.approx(m2["auroc"])
    pred = (p[:, 1] > 0.8).astype(int)  # a stricter threshold than argmax
    m3 = classification_metrics(y, p, y_pred=pred)
    assert m3["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m3["auroc"] == pytest.approx(m2["auroc"])  # AUROC depends on probabilities only


def test_auroc_undefined_when_a_class_is_absent() -> None:
    y = np.zeros(10, dtype=int)
    p = np.tile([0.7, 0.3], (10, 1))
    m = classification_metrics(y, p)
    assert math.isnan(m["auroc"]) and "only class 0" in m["auroc_note"]
    y3, p3 = _predictions(30, 3, seed=2)
    y3[y3 == 2] = 0
    m3 = classification_metrics(y3, p3)
    assert math.isnan(m3["auroc"]) and "[2]" in m3["auroc_note"]
    assert not math.isnan(m3["macro_f1"])


@pytest.mark.parametrize("k,round_to", [(2, None), (2, 1), (3, 1), (5, 2)])
def test_batched_bootstrap_equals_sklearn_per_resample(k: int, round_to: int | None) -> None:
    """The fast batched metrics give the same resample values as scikit-learn (same seed -> same resamples)."""
    y, p = _predictions(60, k, seed=7, skill=1.0, round_to=round_to)
    for name in SCALAR_METRICS:
        fast = bootstrap(y, p, name, n_resamples=40, seed=11)
        slow = bootstrap(y, p, lambda yy, pp, pr, name=name: _sk(name, yy, pp, pr), n_resamples=40, seed=11)
        assert fast.estimate == pytest.approx(slow.estimate), name
        assert fast.n_skipped == slow.n_skipped, name
        assert fast.low == pytest.approx(slow.low) and fast.high == pytest.approx(slow.high), name


def test_bootstrap_ci_contains_estimate_shrinks_with_n_and_is_seeded() -> None:
    widths = []
    for n in (80, 2000):
        y, p = _predictions(n, 2, seed=3)
        for name in SCALAR_METRICS:
            res = bootstrap(y, p, name, n_resamples=300, seed=0)
            assert res.low <= res.estimate <= res.high, (name, n)
            assert res.n_skipped == 0 and res.note is None
        lo, hi = bootstrap_ci(y, p, "accuracy", n_resamples=300, seed=0)
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # width ~ 1/sqrt(n)
    y, p = _predictions(200, 3, seed=4)
    assert bootstrap_ci(y, p, "auroc", 200, seed=5) == bootstrap_ci(y, p, "auroc", 200, seed=5)
    assert bootstrap_ci(y, p, "auroc", 200, seed=5) != bootstrap_ci(y, p, "auroc", 200, seed=6)


def test_bootstrap_counts_resamples_missing_a_class() -> None:
    y = np.array([0] * 12 + [1])  # one positive: many resamples lack it
    p = np.linspace(0.1, 0.9, 13)
    res = bootstrap(y, p, "auroc", n_resamples=300, seed=0)
    assert 0 < res.n_skipped < 300
    assert "left out" in res.note
    assert math.isfinite(res.low) and math.isfinite(res.high)
    none = bootstrap(np.zeros(5, dtype=int), np.full(5, 0.3), "auroc", n_resamples=20, seed=0)
    assert math.isnan(none.low) and none.n_skipped == 20 and "undefined" in none.note


def test_mean_ci_matches_scipy_t_interval() -> None:
    values = [0.8984, 0.8741, 0.8810, 0.8902, 0.8850]
    res = mean_ci(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert res.mean == pytest.approx(np.mean(values))
    assert (res.low, res.high) == pytest.approx((lo, hi))
    assert res.half_width == pytest.approx((hi - lo) / 2)
    assert res.n == 5 and res.note is None
    one = mean_ci([0.9])
    assert one.mean == 0.9 and math.isnan(one.low) and math.isnan(one.half_width) and "one value" in one.note
    same = mean_ci([0.5, 0.5, 0.5])
    assert same.low == same.high == 0.5 and "zero width" in same.note
    with_nan = mean_ci([0.5, math.nan, 0.7])
    assert with_nan.n == 2 and "NaN" in with_nan.note
    assert mean_ci(values, 0.99).half_width > res.half_width
    with pytest.raises(D2maeError, match="confidence"):
        mean_ci(values, confidence=95)


def test_paired_ttest_matches_scipy_and_handles_degenerate_cases() -> None:
    a = [0.8984, 0.9012, 0.8950, 0.9033, 0.8971]
    b = [0.8848, 0.8870, 0.8899, 0.8835, 0.8902]
    res = paired_ttest(a, b)
    ref = stats.ttest_rel(a, b)
    assert res.statistic == pytest.approx(ref.statistic) and res.pvalue == pytest.approx(ref.pvalue)
    assert res.n == 5 and res.mean_difference == pytest.approx(np.mean(np.subtract(a, b)))
    # a known textbook number: differences 1, 2, 3 -> t = 3.464, p = 0.0742 (two-sided, df 2)
    known = paired_ttest([2, 4, 6], [1, 2, 3])
    assert known.statistic == pytest.approx(2 / (1 / math.sqrt(3)), rel=1e-6)
    assert known.pvalue == pytest.approx(0.07417990022744853, rel=1e-6)
    short = paired_ttest([0.9], [0.8])
    assert math.isnan(short.pvalue) and "at least 2" in short.note
    same = paired_ttest([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    assert math.isnan(same.pvalue) and "zero" in same.note
    const = paired_ttest([3.0, 2.0, 1.0], [2.0, 1.0, 0.0])
    assert const.pvalue == pytest.approx(0.0, abs=1e-12) and "zero variance" in const.note
    nan = paired_ttest([0.9, math.nan, 0.7, 0.6], [0.8, 0.7, 0.65, 0.5])
    assert nan.n == 3 and "left out" in nan.note
    with pytest.raises(D2maeError, match="same number"):
        paired_ttest([1, 2, 3], [1, 2])


def test_paired_bootstrap_difference_ci_and_pvalue() -> None:
    y, good = _predictions(400, 2, seed=9, skill=3.0)
    _, bad = _predictions(400, 2, seed=9, skill=0.3)
    res = paired_bootstrap(y, good, bad, "accuracy", n_resamples=300, seed=0)
    assert res.difference == pytest.approx(res.value_a - res.value_b)
    assert res.value_a == pytest.approx(accuracy_score(y, good.argmax(1)))
    assert res.low > 0 and res.low <= res.difference <= res.high
    assert res.pvalue < 0.01
    same = paired_bootstrap(y, good, good, "auroc", n_resamples=100, seed=0)
    assert same.difference == 0 and same.pvalue == 1.0 and "agree" in same.note
    with pytest.raises(D2maeError, match="same shape"):
        paired_bootstrap(y, good, good[:, :1].repeat(3, axis=1), "accuracy", n_resamples=10)


def test_bad_inputs_raise_clear_errors() -> None:
    y, p = _predictions(20, 2, seed=0)
    with pytest.raises(D2maeError, match="shape"):
        classification_metrics(y[:10], p)
    with pytest.raises(D2maeError, match="outside"):
        classification_metrics(y + 5, p)
    bad = p.copy()
    bad[0, 0] = np.nan
    with pytest.raises(D2maeError, match="NaN"):
        classification_metrics(y, bad)
    with pytest.raises(D2maeError, match="0 images"):
        classification_metrics(np.array([], dtype=int), np.zeros((0, 2)))
    with pytest.raises(D2maeError, match="class names"):
        classification_metrics(y, p, classes=["a", "b", "c"])
    with pytest.raises(D2maeError, match="unknown metric"):
        bootstrap(y, p, "precision", n_resamples=5)
    with pytest.raises(D2maeError, match="n_resamples"):
        bootstrap(y, p, "accuracy", n_resamples=0)


def test_nan_to_none_makes_strict_json() -> None:
    import json

    out = nan_to_none({"a": math.nan, "b": [np.float32(0.5), np.int64(3), math.inf], "c": (1, "x")})
    assert out == {"a": None, "b": [0.5, 3, None], "c": [1, "x"]}
    json.dumps(out, allow_nan=False)

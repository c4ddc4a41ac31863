"""``d2mae evaluate`` and ``d2mae compare``: metrics, confidence intervals, tables and figures for fine-tuned runs.

Input is a run folder written by fine-tuning (``d2mae finetune --out RUN``):

* ``RUN/predictions.csv`` -- ``path,fold,split,label,label_name,pred,prob_<class0>,prob_<class1>,...,t_star,
  sigma_star`` (``split`` = test|val; extra columns such as ``scanner`` or ``group`` are kept for ``--group-by``);
* ``RUN/run.json`` -- ``{"classes": [...], "protocol": ..., "folds": [...], "method": ..., "seed": ...}``.

``evaluate`` reports, on the rows of one split (default ``test``), the paper's metrics (Section 3.1: ACC, macro-F1,
AUROC; plus balanced accuracy): per fold, pooled over all test images with percentile-bootstrap 95% CIs, and for
k > 1 folds the mean ± 95% t-interval over folds (the "±" of Table 2). It writes ``metrics.json``, ``metrics.md`` /
``metrics.html``, ``roc.png``, ``confusion.png`` and, when OBS values are present, ``sigma_star.png`` (Figure 3b,
per class) and ``sigma_star_by_<column>.png`` for each ``--group-by`` column.

``compare`` tests run A against run B on the same test images: two-sided paired t-test over folds (matched by
name; the paper's test) and a paired bootstrap over images (matched by fold and path).

Many runs (methods × datasets, ablation variants) become the paper's result section in
:mod:`d2mae.experiment.report`.

Examples::

    d2mae evaluate runs/d2mae-busbra --group-by scanner
    d2mae compare runs/d2mae-busbra runs/mae-busbra --out runs/compare
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from d2mae.eval.document import Report
from d2mae.eval.figures import confusion_figure, roc_figure, sigma_histogram
from d2mae.eval.metrics import METRIC_LABELS, SCALAR_METRICS, classification_metrics, nan_to_none
from d2mae.eval.statistics import bootstrap, mean_ci, minimum_detectable_effect, paired_bootstrap, paired_ttest
from d2mae.eval.tables import Table, format_ci, format_pvalue, format_value
from d2mae.io.predictions import RunPredictions, load_predictions
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_json, atomic_write_text
from d2mae.runtime.locks import output_lock
from d2mae.runtime.options import check_fields, save_config
from d2mae.runtime.outputs import claim_folder


# ------------------------------------------------------------------------------------------------ configs
@dataclasses.dataclass
class EvaluateConfig:
    """Options of ``d2mae evaluate`` (every field is also a flag: ``n_bootstrap`` -> ``--n-bootstrap``)."""

    n_bootstrap: int = dataclasses.field(default=1000, metadata={"help": "bootstrap resamples over images for "
                                                                         "the pooled 95% CIs", "min": 1})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the bootstrap", "min": 0})
    confidence: float = dataclasses.field(default=0.95, metadata={"help": "confidence level of every interval",
                                                                  "above": 0.0, "below": 1.0})
    split: str = dataclasses.field(default="test", metadata={"help": "rows of predictions.csv to evaluate "
                                                                     "(split column)"})
    group_by: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "extra predictions.csv columns (e.g. Device, BUS-BRA's scanner column) for per-group metrics and σ* histograms",
        "metavar": "COLUMN"})
    figures: bool = dataclasses.field(default=True, metadata={"help": "write the PNG figures"})
    force: bool = dataclasses.field(default=False, metadata={
        "help": "replace an earlier output of this command in --out (or write beside other files there)"})

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.split:
            raise D2maeError("must name a split, e.g. test", option="split")


@dataclasses.dataclass
class CompareConfig:
    """Options of ``d2mae compare``."""

    n_bootstrap: int = dataclasses.field(default=1000, metadata={"help": "paired bootstrap resamples over images",
                                                                 "min": 1})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the bootstrap", "min": 0})
    confidence: float = dataclasses.field(default=0.95, metadata={"help": "confidence level of the intervals",
                                                                  "above": 0.0, "below": 1.0})
    split: str = dataclasses.field(default="test", metadata={"help": "rows of predictions.csv to compare"})
    force: bool = dataclasses.field(default=False, metadata={
        "help": "replace an earlier output of this command in --out (or write beside other files there)"})

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.split:
            raise D2maeError("must name a split, e.g. test", option="split")


# -------------------------------------------------------------------------------------------- evaluation
def _scalar_summary(m: dict[str, Any]) -> dict[str, Any]:
    out = {k: m[k] for k in ("n",) + SCALAR_METRICS}
    if m.get("auroc_note"):
        out["auroc_note"] = m["auroc_note"]
    return out


def evaluate_predictions(run: RunPredictions, n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95,
                         group_by: Sequence[str] = ()) -> dict[str, Any]:
    """Metrics of a loaded run: per fold, pooled with bootstrap CIs, mean ± CI over folds, per group, σ*."""
    pooled = classification_metrics(run.labels, run.probs, run.classes, run.preds)
    boot = {m: bootstrap(run.labels, run.probs, m, n_resamples=n_bootstrap, seed=seed, y_pred=run.preds,
                         confidence=confidence) for m in SCALAR_METRICS}
    pooled_out: dict[str, Any] = {"n": pooled["n"]}
    for m in SCALAR_METRICS:
        b = boot[m]
        pooled_out[m] = {"value": pooled[m], "ci": [b.low, b.high], "n_skipped": b.n_skipped,
                         "note": b.note if m != "auroc" or not pooled["auroc_note"] else pooled["auroc_note"]}
    pooled_out["per_class"] = pooled["per_class"]
    pooled_out["confusion_matrix"] = pooled["confusion_matrix"]
    folds: dict[str, Any] = {}
    for f in run.fold_order:
        idx = run.fold_indices(f)
        folds[f] = _scalar_summary(classification_metrics(run.labels[idx], run.probs[idx], run.classes,
                                                          run.preds[idx]))
    result: dict[str, Any] = {
        "format": "d2mae-metrics",
        "format_version": 1,
        "run": str(run.run_dir),
        "method": run.method,
        "protocol": run.info.get("protocol"),
        "seed": run.info.get("seed"),
        "classes": run.classes,
        "split": run.split,
        "n_images": int(run.labels.size),
        "n_folds": len(run.fold_order),
        "confidence": confidence,
        "bootstrap": {"n_resamples": n_bootstrap, "seed": seed, "method": "percentile, over images"},
        "pooled": pooled_out,
        "folds": folds,
    }
    if len(run.fold_order) > 1:
        result["over_folds"] = {m: {**mean_ci([folds[f][m] for f in run.fold_order], confidence).to_dict(),
                                    "values": [folds[f][m] for f in run.fold_order]} for m in SCALAR_METRICS}
    groups: dict[str, Any] = {}
    for col in group_by:
        values = np.asarray(run.extra[col], dtype=object)
        per: dict[str, Any] = {}
        for g in sorted(set(values.tolist()), key=str):
            idx = np.flatnonzero(values == g)
            entry = _scalar_summary(classification_metrics(run.labels[idx], run.probs[idx], run.classes,
                                                           run.preds[idx]))
            if run.sigma_star is not None:
                s = run.sigma_star[idx]
                entry["sigma_star_mean"] = float(np.nanmean(s)) if np.isfinite(s).any() else math.nan
            per[str(g)] = entry
        groups[col] = per
    if groups:
        result["groups"] = groups
    for name, arr in (("sigma_star", run.sigma_star), ("t_star", run.t_star)):
        if arr is None or not np.isfinite(arr).any():
            continue
        ok = np.isfinite(arr)
        levels, counts = np.unique(np.round(arr[ok], 6), return_counts=True)
        result[name] = {
            "n": int(ok.sum()), "n_missing": int((~ok).sum()), "mean": float(arr[ok].mean()),
            "median": float(np.median(arr[ok])), "counts": {f"{lv:g}": int(c) for lv, c in zip(levels, counts)},
            "mean_per_class": {c: (float(arr[ok & (run.labels == i)].mean()) if (ok & (run.labels == i)).any()
                                   else math.nan) for i, c in enumerate(run.classes)},
        }
    result["notes"] = list(run.notes)
    return result


def _metrics_report(result: dict[str, Any], out: Path, figures: dict[str, Path]) -> Report:
    conf = result["confidence"]
    rep = Report(f"Evaluation: {result['method']}")
    rep.paragraph(f"Run `{result['run']}` — split `{result['split']}`, {result['n_images']} images, "
                  f"{result['n_folds']} fold(s), protocol `{result.get('protocol')}`, classes "
                  f"{', '.join(result['classes'])}. Values in %. Pooled CIs: percentile bootstrap over images "
                  f"({result['bootstrap']['n_resamples']} resamples, seed {result['bootstrap']['seed']}); over folds: "
                  f"mean ± half-width of the {conf:.0%} t-interval.")
    folds = list(result["folds"])
    header = ["Metric", f"Pooled [{conf:.0%} CI]"]
    if "over_folds" in result:
        header.append(f"Mean ± {conf:.0%} CI over {len(folds)} folds")
    header += [str(f) for f in folds] if len(folds) > 1 else []
    rows = []
    for m in SCALAR_METRICS:
        p = result["pooled"][m]
        row = [METRIC_LABELS[m], format_ci(p["value"], *p["ci"])]
        if "over_folds" in result:
            o = result["over_folds"][m]
            row.append("n/a" if not math.isfinite(o["mean"]) else format_value(o["mean"]) if not math.isfinite(
                o["half_width"]) else f"{format_value(o['mean'])} ± {format_value(o['half_width'])}")
        row += [format_value(result["folds"][f][m]) for f in folds] if len(folds) > 1 else []
        rows.append(row)
    notes = [p["note"] for p in (result["pooled"][m] for m in SCALAR_METRICS) if p.get("note")]
    notes += [f"fold {f}: AUROC n/a, {v['auroc_note']}" for f, v in result["folds"].items() if v.get("auroc_note")]
    rep.heading("Metrics")
    rep.table(Table(header, rows, notes=notes))
    rep.heading("Per class (pooled)")
    pc = result["pooled"]["per_class"]
    rep.table(Table(["Class", "Precision", "Recall", "F1", "Support"],
                    [[c, format_value(v["precision"]), format_value(v["recall"]), format_value(v["f1"]), str(v["support"])]
                     for c, v in pc.items()]))
    rep.heading("Confusion matrix (pooled; rows = true, columns = predicted)")
    cm = result["pooled"]["confusion_matrix"]
    rep.table(Table(["true \\ pred", *result["classes"]],
                    [[c, *[str(x) for x in row]] for c, row in zip(result["classes"], cm)]))
    if "confusion" in figures:
        rep.image(figures["confusion"], "Confusion matrix")
    if "roc" in figures:
        rep.heading("ROC")
        rep.image(figures["roc"], "ROC curves")
    for col, per in result.get("groups", {}).items():
        rep.heading(f"By {col}")
        has_sigma = any("sigma_star_mean" in v for v in per.values())
        head = [col, "n", *[METRIC_LABELS[m] for m in SCALAR_METRICS]] + (["mean σ*"] if has_sigma else [])
        body = []
        for g, v in per.items():
            body.append([g, str(v["n"]), *[format_value(v[m]) for m in SCALAR_METRICS]]
                        + ([f"{v['sigma_star_mean']:.3f}" if v.get("sigma_star_mean") is not None and math.isfinite(
                            v["sigma_star_mean"]) else "n/a"] if has_sigma else []))
        rep.table(Table(head, body, notes=["Point estimates; AUROC n/a where a group lacks a class."]))
        if f"sigma_star_by_{col}" in figures:
            rep.image(figures[f"sigma_star_by_{col}"], f"σ* by {col}")
    if "sigma_star" in result:
        s = result["sigma_star"]
        rep.heading("Optimal blurriness σ* (OBS)")
        rep.paragraph(f"{s['n']} images with σ*; mean {s['mean']:.3f}, median {s['median']:.3f}"
                      + (f"; {s['n_missing']} without a value" if s["n_missing"] else "") + ".")
        rep.table(Table(["σ*", "images"], [[k, str(v)] for k, v in s["counts"].items()]))
        if "sigma_star" in figures:
            rep.image(figures["sigma_star"], "σ* per class (Figure 3b style)")
    if result.get("notes"):
        rep.heading("Notes")
        rep.bullets(result["notes"])
    return rep


def evaluate_run(run_dir: str | Path, n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95,
                 split: str = "test", group_by: Sequence[str] = (), out_dir: str | Path | None = None,
                 figures: bool = True, force: bool = False) -> dict[str, Any]:
    """Evaluate a fine-tuning run folder and write metrics.json, metrics.md/.html and figures.

    Args:
        run_dir: folder with predictions.csv (+ run.json) written by fine-tuning.
        n_bootstrap, seed, confidence: percentile bootstrap over images for the pooled CIs.
        split: rows of predictions.csv to evaluate. group_by: extra columns for per-group metrics / σ* histograms.
        out_dir: where to write (default: ``run_dir``; held locked while writing). figures: write the PNGs.

    Returns:
        The metrics.json content (NaN as ``None``) with ``files``: the paths written.
    """
    if not Path(run_dir).is_dir():  # before the lock, which would create the folder
        raise D2maeError(f"run folder {run_dir} does not exist; pass the --out folder of `d2mae finetune`")
    if out_dir is not None:  # without it, the evaluation files of the run are refreshed in the run folder
        claim_folder(out_dir, "evaluate", [run_dir], force=force)
    with output_lock(out_dir if out_dir is not None else run_dir, "evaluate"):
        return _evaluate_run(run_dir, n_bootstrap, seed, confidence, split, group_by, out_dir, figures)


def _evaluate_run(run_dir: str | Path, n_bootstrap: int, seed: int, confidence: float, split: str,
                  group_by: Sequence[str], out_dir: str | Path | None, figures: bool) -> dict[str, Any]:
    cfg = EvaluateConfig(n_bootstrap=n_bootstrap, seed=seed, confidence=confidence, split=split,
                         group_by=list(group_by), figures=figures)
    run = load_predictions(run_dir, split=split, require_columns=group_by)
    result = evaluate_predictions(run, n_bootstrap, seed, confidence, group_by)
    out = Path(out_dir) if out_dir is not None else run.run_dir
    figs: dict[str, Path] = {}
    if figures:
        curves = {f: (run.labels[run.fold_indices(f)], run.probs[run.fold_indices(f)]) for f in run.fold_order}
        figs["roc"] = roc_figure(curves, out / "roc.png", run.classes, title=f"ROC — {run.method} ({split})")
        figs["confusion"] = confusion_figure(result["pooled"]["confusion_matrix"], run.classes, out / "confusion.png",
                                             title=f"Confusion matrix — {run.method}")
        if run.sigma_star is not None and np.isfinite(run.sigma_star).any():
            names = [run.classes[i] for i in run.labels]
            figs["sigma_star"] = sigma_histogram(run.sigma_star, out / "sigma_star.png", groups=names,
                                                 title=f"σ* per class — {run.method}", group_order=run.classes)
            for col in group_by:
                figs[f"sigma_star_by_{col}"] = sigma_histogram(
                    run.sigma_star, out / f"sigma_star_by_{_safe_name(col)}.png", groups=run.extra[col],
                    title=f"σ* per {col} — {run.method}")
    md_path, html_path = _metrics_report(result, out, figs).write(out, stem="metrics")
    config_path = out / "evaluate.yaml"
    save_config(cfg, config_path)
    result["files"] = [str(p) for p in [out / "metrics.json", md_path, html_path, config_path, *figs.values()]]
    clean = nan_to_none(result)
    atomic_write_json(out / "metrics.json", clean)
    return clean


def _safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text) or "column"


# ---------------------------------------------------------------------------------------------- compare
def _align(a: RunPredictions, b: RunPredictions) -> np.ndarray:
    """Index into ``b`` for each row of ``a`` (matched by fold and path), or a D2maeError explaining the mismatch."""
    if a.classes != b.classes:
        raise D2maeError(f"runs {a.run_dir} and {b.run_dir} have different classes ({a.classes} vs {b.classes})")
    if set(a.fold_order) != set(b.fold_order):
        raise D2maeError(f"runs {a.run_dir} and {b.run_dir} have different folds in split '{a.split}' "
                         f"({a.fold_order} vs {b.fold_order}); compare runs made with the same protocol")
    keys_b = {(f, p): i for i, (f, p) in enumerate(zip(b.folds, b.paths))}
    keys_a = list(zip(a.folds, a.paths))
    only_a = [k for k in keys_a if k not in keys_b]
    only_b = sorted(set(keys_b) - set(keys_a))
    if only_a or only_b:
        example = (f"e.g. {only_a[0][1]} (fold {only_a[0][0]}) only in A" if only_a
                   else f"e.g. {only_b[0][1]} (fold {only_b[0][0]}) only in B")
        raise D2maeError(f"runs {a.run_dir} (A) and {b.run_dir} (B) have different '{a.split}' images: "
                         f"{len(only_a)} only in A, {len(only_b)} only in B ({example}); compare runs on the same "
                         "test images (same data and protocol)")
    idx = np.array([keys_b[k] for k in keys_a], dtype=np.int64)
    bad = np.flatnonzero(a.labels != b.labels[idx])
    if bad.size:
        raise D2maeError(f"runs {a.run_dir} and {b.run_dir} disagree on the label of {bad.size} image(s), e.g. "
                         f"{a.paths[bad[0]]}; they were not evaluated on the same labelled data")
    return idx


def compare_runs(run_a: str | Path, run_b: str | Path, n_bootstrap: int = 1000, seed: int = 0,
                 confidence: float = 0.95, split: str = "test", out_dir: str | Path | None = None,
                 force: bool = False) -> dict[str, Any]:
    """:func:`_compare_runs`, with ``out_dir`` (when given) locked while it is written."""
    if out_dir is not None:
        claim_folder(out_dir, "compare", [run_a, run_b], force=force)
    lock = output_lock(out_dir, "compare") if out_dir is not None else contextlib.nullcontext()
    with lock:
        return _compare_runs(run_a, run_b, n_bootstrap, seed, confidence, split, out_dir)


def _compare_runs(run_a: str | Path, run_b: str | Path, n_bootstrap: int, seed: int, confidence: float, split: str,
                  out_dir: str | Path | None) -> dict[str, Any]:
    """Compare run A with run B on the same test images (differences are A − B).

    For each metric: the pooled values, a paired percentile bootstrap over images (same resamples for A and B;
    CI of the difference and a two-sided p-value) and the paper's two-sided paired t-test over folds matched by name
    (``NaN`` with a reason when there are fewer than 2 folds). With ``out_dir``, writes compare.json and compare.md.
    """
    cfg = CompareConfig(n_bootstrap=n_bootstrap, seed=seed, confidence=confidence, split=split)
    a = load_predictions(run_a, split=split)
    b = load_predictions(run_b, split=split)
    idx = _align(a, b)
    pb, predb = b.probs[idx], b.preds[idx]
    metrics_out: dict[str, Any] = {}
    per_fold: dict[str, dict[str, tuple[float, float]]] = {m: {} for m in SCALAR_METRICS}
    for f in a.fold_order:
        ia = a.fold_indices(f)
        ma = classification_metrics(a.labels[ia], a.probs[ia], a.classes, a.preds[ia])
        mb = classification_metrics(a.labels[ia], pb[ia], a.classes, predb[ia])
        for m in SCALAR_METRICS:
            per_fold[m][f] = (ma[m], mb[m])
    for m in SCALAR_METRICS:
        boot = paired_bootstrap(a.labels, a.probs, pb, m, n_resamples=n_bootstrap, seed=seed, y_pred_a=a.preds,
                                y_pred_b=predb, confidence=confidence)
        test = paired_ttest([v[0] for v in per_fold[m].values()], [v[1] for v in per_fold[m].values()])
        metrics_out[m] = {
            "a": boot.value_a, "b": boot.value_b, "difference": boot.difference,
            "bootstrap": {"ci": [boot.low, boot.high], "pvalue": boot.pvalue, "n_resamples": boot.n_resamples,
                          "n_skipped": boot.n_skipped, "note": boot.note},
            "ttest_folds": test.to_dict(),
            "mde_folds": minimum_detectable_effect([v[0] - v[1] for v in per_fold[m].values()]),
            "per_fold": {f: {"a": va, "b": vb} for f, (va, vb) in per_fold[m].items()},
        }
    result = nan_to_none({
        "format": "d2mae-compare", "format_version": 1,
        "run_a": str(a.run_dir), "run_b": str(b.run_dir), "method_a": a.method, "method_b": b.method,
        "split": split, "n_images": int(a.labels.size), "folds": a.fold_order, "confidence": confidence,
        "bootstrap": {"n_resamples": n_bootstrap, "seed": seed, "method": "paired percentile, over images"},
        "metrics": metrics_out, "notes": [f"A: {n}" for n in a.notes] + [f"B: {n}" for n in b.notes],
    })
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_text(out / "compare.md", format_comparison(result) + "\n")
        save_config(cfg, out / "compare.yaml")
        result["files"] = [str(out / "compare.json"), str(out / "compare.md"), str(out / "compare.yaml")]
        atomic_write_json(out / "compare.json", result)
    return result


def format_comparison(result: dict[str, Any]) -> str:
    """A Markdown table of :func:`compare_runs`' result (values in %)."""
    conf = result["confidence"]
    head = ["Metric", f"A: {result['method_a']}", f"B: {result['method_b']}", "A − B",
            f"{conf:.0%} CI (bootstrap)", "p (bootstrap, images)", f"p (t-test, {len(result['folds'])} folds)",
            "MDE (t-test)"]
    rows, notes = [], []
    for m, v in result["metrics"].items():
        lo, hi = v["bootstrap"]["ci"]
        ci = "n/a" if lo is None or hi is None else f"[{format_value(lo)}, {format_value(hi)}]"
        rows.append([METRIC_LABELS[m], format_value(v["a"]), format_value(v["b"]), format_value(v["difference"]), ci,
                     format_pvalue(v["bootstrap"]["pvalue"]), format_pvalue(v["ttest_folds"]["pvalue"]),
                     format_value(v.get("mde_folds"))])
        for src, note in (("t-test", v["ttest_folds"].get("note")), ("bootstrap", v["bootstrap"].get("note"))):
            if note:
                notes.append(f"{METRIC_LABELS[m]} {src}: {note}")
    notes.append("MDE: the smallest true A − B gap the fold t-test detects at P < 0.05 with 80% power, given the "
                 "spread of the per-fold differences measured here.")
    table = Table(head, rows, caption=f"{result['method_a']} (A) vs. {result['method_b']} (B) on "
                                      f"{result['n_images']} '{result['split']}' images", notes=notes + result["notes"])
    return table.to_markdown().rstrip("\n")


# ---------------------------------------------------------------------------------------- experiment report


# -------------------------------------------------------------------------------------------------- CLI



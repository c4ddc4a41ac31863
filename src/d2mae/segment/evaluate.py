"""``d2mae evaluate`` and ``d2mae compare`` for segmentation runs: Dice, IoU and HD95 with 95% CIs, and paired
tests between two runs on the same test images.

Per-image values come from ``per_image.csv`` (computed at each image's own size, :mod:`d2mae.segment.metrics`).
The mean over the test images has a percentile-bootstrap CI (images resampled); with more than one fold, the mean
over folds has a t-interval. Two runs are compared image by image: the mean difference (A − B) with a paired
bootstrap CI, the two-sided Wilcoxon signed-rank test (scipy) on the per-image differences, and the paper's paired
t-test over folds. Each comparison carries its minimum detectable effect: the smallest true mean difference a paired
t-test on the same images detects at P < 0.05 with 80% power, given the measured spread
(:func:`d2mae.eval.statistics.minimum_detectable_effect`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from d2mae.eval.statistics import minimum_detectable_effect, paired_ttest
from d2mae.io.predictions import RUN_JSON
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_json, atomic_write_text
from d2mae.runtime.options import saved_value
from d2mae.runtime.outputs import claim_folder
from d2mae.segment.figures import dice_histogram, overlay_figure
from d2mae.segment.files import read_per_image
from d2mae.segment.metrics import METRICS, bootstrap_mean, defined_mean, summarize

LABELS = {"dice": "Dice", "iou": "IoU", "hd95": "HD95 (px)"}


def _run_json(run: Path) -> dict[str, Any]:
    try:
        data = json.loads((run / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise D2maeError(f"cannot read {run / RUN_JSON}: {exc}") from None
    saved_value(data, "method", str, str(run / RUN_JSON), "")
    saved_value(data, "num_classes", int, str(run / RUN_JSON), 2, low=2)
    return data


def _fmt(v: float, ci: tuple[float, float] | list[float] | None = None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    text = f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    if ci is not None and all(math.isfinite(c) for c in ci):
        text += f" [{ci[0]:.4f}, {ci[1]:.4f}]" if abs(v) < 10 else f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return text


def evaluate_segment_run(run_dir: str | Path, out_dir: str | Path | None = None, split: str = "test",
                         n_bootstrap: int = 2000, seed: int = 0, force: bool = False) -> dict[str, Any]:
    """The metric table of a segmentation run (``evaluation/metrics.json`` and ``metrics.md``) and its figures
    (Dice distribution; image, truth and prediction for the best, median and worst test images)."""
    run = Path(run_dir)
    meta = _run_json(run)
    rows = [r for r in read_per_image(run) if r["split"] == split]
    if not rows:
        raise D2maeError(f"{run / 'per_image.csv'} has no '{split}' rows", option="split")
    out = Path(out_dir) if out_dir is not None else run / "evaluation"
    if out_dir is not None:
        claim_folder(out, "evaluate", [run], force=force)
    summaries = {m: summarize(rows, m, n_bootstrap, seed) for m in METRICS}
    empty = sum(1 for r in rows if int(r["truth_pixels"]) == 0)
    res = {"method": meta.get("method"), "kind": "segment", "split": split, "n_images": len(rows),
           "n_folds": len({r["fold"] for r in rows}), "empty_truth": empty,
           "metrics": {m: s.to_dict() for m, s in summaries.items()},
           "notes": [f"HD95 is undefined for {summaries['hd95'].left_out} image(s) (an empty truth or prediction): "
                     "left out of its mean"] if summaries["hd95"].left_out else []}
    lines = [f"# {res['method']}: segmentation, {len(rows)} {split} images, {res['n_folds']} fold(s)", "",
             "| metric | mean [95% bootstrap CI] | over folds | images |", "|---|---|---|---|"]
    for m, s in summaries.items():
        folds = _fmt(s.over_folds.mean, [s.over_folds.low, s.over_folds.high]) if s.over_folds else "—"
        lines.append(f"| {LABELS[m]} | {_fmt(s.mean, s.ci)} | {folds} | {s.n}" +
                     (f" ({s.left_out} undefined)" if s.left_out else "") + " |")
    lines += ["", f"{empty} test image(s) have an empty truth mask: Dice/IoU count 1 for an empty prediction there "
              "and 0 otherwise (docs/segment.md)."] + [f"Note: {n}" for n in res["notes"]]
    files = [out / "metrics.json", out / "metrics.md",
             dice_histogram(rows, out / "dice_distribution.png", str(res["method"])),
             overlay_figure(rows, run, out / "overlays.png",
                            saved_value(meta, "num_classes", int, str(run / RUN_JSON), 2, low=2))]
    atomic_write_json(files[0], res)
    atomic_write_text(files[1], "\n".join(lines) + "\n")
    res["files"] = [str(f) for f in files]
    return res


def print_summary(res: dict[str, Any]) -> None:
    print(f"{res['method']}: {res['n_images']} '{res['split']}' images, {res['n_folds']} fold(s)")
    for m in METRICS:
        s = res["metrics"][m]
        line = f"  {LABELS[m]:<10} {_fmt(s['mean'], s['ci'])}"
        if s["over_folds"] and s["over_folds"]["mean"] is not None:
            line += f"   over folds {_fmt(s['over_folds']['mean'])}"
        print(line + (f"   ({s['left_out']} undefined, left out)" if s["left_out"] else ""))
    for note in res.get("notes", []):
        print(f"  note: {note}")
    if res.get("files"):
        print(f"wrote {', '.join(Path(f).name for f in res['files'])} to {Path(res['files'][0]).parent}")


def compare_segment_runs(run_a: str | Path, run_b: str | Path, split: str = "test", n_bootstrap: int = 2000,
                         seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Run A against run B on the test images both predicted (differences A − B), per metric."""
    a = {r["path"]: r for r in read_per_image(run_a) if r["split"] == split}
    b = {r["path"]: r for r in read_per_image(run_b) if r["split"] == split}
    common = sorted(set(a) & set(b))
    if not common:
        raise D2maeError(f"{run_a} and {run_b} share no {split} images; compare runs on the same data")
    res: dict[str, Any] = {"kind": "segment", "run_a": str(run_a), "run_b": str(run_b),
                           "method_a": _run_json(Path(run_a)).get("method"),
                           "method_b": _run_json(Path(run_b)).get("method"), "n_images": len(common),
                           "only_a": len(set(a) - set(b)), "only_b": len(set(b) - set(a)), "metrics": {}}
    folds = sorted({a[p]["fold"] for p in common})
    for m in METRICS:
        va = np.array([a[p][m] for p in common], dtype=float)
        vb = np.array([b[p][m] for p in common], dtype=float)
        keep = np.isfinite(va) & np.isfinite(vb)
        d = va[keep] - vb[keep]
        wil = stats.wilcoxon(d) if len(d) > 1 and np.any(d != 0) else None
        per_fold_a = [defined_mean([a[p][m] for p in common if a[p]["fold"] == f]) for f in folds]
        per_fold_b = [defined_mean([b[p][m] for p in common if a[p]["fold"] == f]) for f in folds]
        res["metrics"][m] = {
            "mean_a": float(np.mean(va[keep])) if keep.any() else math.nan,
            "mean_b": float(np.mean(vb[keep])) if keep.any() else math.nan,
            "diff": float(d.mean()) if len(d) else math.nan, "diff_ci": list(bootstrap_mean(d, n_bootstrap, seed,
                                                                                           confidence)),
            "n_pairs": int(keep.sum()), "wilcoxon_p": float(wil.pvalue) if wil is not None else math.nan,
            "mde": minimum_detectable_effect(d),
            "fold_ttest": paired_ttest(per_fold_a, per_fold_b).to_dict()}
    return res


def format_segment_comparison(res: dict[str, Any]) -> str:
    lines = [f"{res['method_a']} (A) vs {res['method_b']} (B): {res['n_images']} common test images"]
    for m in METRICS:
        r = res["metrics"][m]
        p_fold = r["fold_ttest"].get("pvalue")
        lines.append(f"  {LABELS[m]:<10} A {_fmt(r['mean_a'])}  B {_fmt(r['mean_b'])}  A−B {_fmt(r['diff'], r['diff_ci'])}"
                     f"  Wilcoxon P {_fmt(r['wilcoxon_p'])}  fold t-test P {_fmt(p_fold)}  MDE {_fmt(r['mde'])}")
    return "\n".join(lines)

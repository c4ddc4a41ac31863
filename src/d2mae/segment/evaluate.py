"""``d2mae evaluate`` and ``d2mae compare`` for segmentation runs: the summary metrics of
:data:`d2mae.segment.metrics.SUMMARY` with 95% CIs, per class where the run has a class column, and paired tests
between two runs on the same test images.

Per-image values come from ``per_image.csv`` (computed at each image's own size, :mod:`d2mae.segment.metrics`).
Every metric is taken over a set of images that the truth alone defines — all images, the lesion images, the
empty-truth images — so two runs are always scored on the same images: HD95 over the lesion images with a missed
lesion at the image diagonal, not over each run's own defined images. The mean over the images has a
percentile-bootstrap CI (images resampled); with more than one fold, the mean over folds has a t-interval. Two runs
are compared image by image: the mean difference (A − B) with a paired bootstrap CI, the two-sided Wilcoxon
signed-rank test (scipy) on the per-image differences, and the paper's paired t-test over folds. Each comparison
carries its minimum detectable effect (:func:`d2mae.eval.statistics.minimum_detectable_effect`).
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
from d2mae.segment.metrics import SUMMARY, by_class, mean_interval, per_image_values, summarize

def _run_json(run: Path) -> dict[str, Any]:
    try:
        data = json.loads((run / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise D2maeError(f"cannot read {run / RUN_JSON}: {exc}") from None
    saved_value(data, "method", str, str(run / RUN_JSON), "")
    saved_value(data, "num_classes", int, str(run / RUN_JSON), 2, low=2)
    return data


def _fmt(v: float, ci: tuple[float, float] | list[float] | None = None, scale: float = 1.0) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    digits = 1 if scale != 1.0 or abs(v) >= 10 else 4
    text = f"{v * scale:.{digits}f}"
    if ci is not None and all(c is not None and math.isfinite(c) for c in ci):
        text += f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"
    return text


def _rows(run: Path, split: str) -> list[dict[str, Any]]:
    rows = [r for r in read_per_image(run) if r["split"] == split]
    if not rows:
        raise D2maeError(f"{run / 'per_image.csv'} has no '{split}' rows", option="split")
    return rows


def evaluate_segment_run(run_dir: str | Path, out_dir: str | Path | None = None, split: str = "test",
                         n_bootstrap: int = 1000, seed: int = 0, force: bool = False,
                         confidence: float = 0.95) -> dict[str, Any]:
    """The metric table of a segmentation run (``evaluation/metrics.json`` and ``metrics.md``) and its figures
    (Dice distribution; image, truth and prediction for the best, median and worst test images)."""
    run = Path(run_dir)
    meta = _run_json(run)
    rows = _rows(run, split)
    out = Path(out_dir) if out_dir is not None else run / "evaluation"
    if out_dir is not None:
        claim_folder(out, "evaluate", [run], force=force)
    options = {"n_resamples": n_bootstrap, "seed": seed, "confidence": confidence}
    metrics = {m: summarize(rows, m, **options) for m in SUMMARY}
    res = {"method": meta.get("method"), "kind": "segment", "split": split, "n_images": len(rows),
           "n_folds": len({r["fold"] for r in rows}), "empty_truth": metrics["empty_correct"]["n"],
           "lesion_images": metrics["dice_lesion"]["n"], "metrics": metrics,
           "per_class": by_class(rows, "dice", **options)}
    lines = [f"# {res['method']}: segmentation, {len(rows)} {split} images, {res['n_folds']} fold(s)", "",
             f"| metric | mean [{confidence:.0%} bootstrap CI] | over folds | images |", "|---|---|---|---|"]
    for m, (label, scale, _) in SUMMARY.items():
        s = metrics[m]
        folds = _fmt(s["over_folds"]["mean"], [s["over_folds"]["low"], s["over_folds"]["high"]], scale) \
            if s["over_folds"] else "—"
        extra = f" ({s['missed']} missed)" if s.get("missed") else ""
        lines.append(f"| {label}{' (%)' if scale != 1.0 else ''} | {_fmt(s['mean'], s['ci'], scale)} | {folds} | "
                     f"{s['n']}{extra} |")
    for c, s in res["per_class"].items():
        lines.append(f"| Dice, class {c} (%) | {_fmt(s['mean'], s['ci'], 100.0)} | — | {s['n']} |")
    lines += ["", "Dice and IoU of an image whose truth and prediction are both empty are 1; HD95 over the lesion "
              "images scores a missed lesion at the image diagonal (docs/segment.md)."]
    files = [out / "metrics.json", out / "metrics.md",
             dice_histogram(rows, out / "dice_distribution.png", str(res["method"])),
             overlay_figure(rows, run, out / "overlays.png",
                            saved_value(meta, "num_classes", int, str(run / RUN_JSON), 2, low=2))]
    atomic_write_json(files[0], res)
    atomic_write_text(files[1], "\n".join(lines) + "\n")
    res["files"] = [str(f) for f in files]
    return res


def print_summary(res: dict[str, Any]) -> None:
    print(f"{res['method']}: {res['n_images']} '{res['split']}' images ({res['lesion_images']} with a lesion), "
          f"{res['n_folds']} fold(s)")
    for m, (label, scale, _) in SUMMARY.items():
        s = res["metrics"][m]
        extra = f"   ({s['missed']} missed lesions at the diagonal)" if s.get("missed") else ""
        print(f"  {label:<47} {_fmt(s['mean'], s['ci'], scale)}{extra}")
    for c, s in res.get("per_class", {}).items():
        print(f"  {'Dice, class ' + c:<47} {_fmt(s['mean'], s['ci'], 100.0)}")
    if res.get("files"):
        print(f"wrote {', '.join(Path(f).name for f in res['files'])} to {Path(res['files'][0]).parent}")


def compare_segment_runs(run_a: str | Path, run_b: str | Path, split: str = "test", n_bootstrap: int = 1000,
                         seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Run A against run B on the test images both predicted (differences A − B), per :data:`SUMMARY` metric: the
    same images on both sides by construction (each metric's set is the truth's)."""
    a = {r["path"]: r for r in _rows(Path(run_a), split)}
    b = {r["path"]: r for r in _rows(Path(run_b), split)}
    common = sorted(set(a) & set(b))
    if not common:
        raise D2maeError(f"{run_a} and {run_b} share no {split} images; compare runs on the same data")
    res: dict[str, Any] = {"kind": "segment", "run_a": str(run_a), "run_b": str(run_b),
                           "method_a": _run_json(Path(run_a)).get("method"),
                           "method_b": _run_json(Path(run_b)).get("method"), "n_images": len(common),
                           "only_a": len(set(a) - set(b)), "only_b": len(set(b) - set(a)), "metrics": {}}
    rows_a, rows_b = [a[p] for p in common], [b[p] for p in common]
    folds = np.array([str(r["fold"]) for r in rows_a])
    for m in SUMMARY:
        va, vb = per_image_values(rows_a, m), per_image_values(rows_b, m)
        keep = np.isfinite(va) & np.isfinite(vb)
        d = va[keep] - vb[keep]
        wil = stats.wilcoxon(d) if len(d) > 1 and np.any(d != 0) else None
        per_fold = [(va[keep & (folds == f)].mean(), vb[keep & (folds == f)].mean())
                    for f in sorted(set(folds.tolist())) if (keep & (folds == f)).any()]
        res["metrics"][m] = {
            "mean_a": float(va[keep].mean()) if keep.any() else math.nan,
            "mean_b": float(vb[keep].mean()) if keep.any() else math.nan,
            "diff": float(d.mean()) if len(d) else math.nan,
            "diff_ci": list(mean_interval(d, n_bootstrap, seed, confidence)), "n_pairs": int(keep.sum()),
            "wilcoxon_p": float(wil.pvalue) if wil is not None else math.nan, "mde": minimum_detectable_effect(d),
            "fold_ttest": paired_ttest([x for x, _ in per_fold], [y for _, y in per_fold]).to_dict()}
    return res


def format_segment_comparison(res: dict[str, Any]) -> str:
    lines = [f"{res['method_a']} (A) vs {res['method_b']} (B): {res['n_images']} common test images"]
    for m, (label, scale, _) in SUMMARY.items():
        r = res["metrics"][m]
        p_fold = r["fold_ttest"].get("pvalue")
        lines.append(f"  {label:<47} A {_fmt(r['mean_a'], scale=scale)}  B {_fmt(r['mean_b'], scale=scale)}  "
                     f"A−B {_fmt(r['diff'], r['diff_ci'], scale)}  Wilcoxon P {_fmt(r['wilcoxon_p'])}  "
                     f"fold t-test P {_fmt(p_fold)}  MDE {_fmt(r['mde'], scale=scale)}  ({r['n_pairs']} images)")
    return "\n".join(lines)

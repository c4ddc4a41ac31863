"""The segmentation section of an experiment's report (beyond the paper): for each ``task: segment`` dataset, every
method's summary metrics (:data:`d2mae.segment.metrics.SUMMARY`: Dice over the lesion images and over all images,
IoU, the empty-truth images predicted empty, HD95 over the lesion images with a missed lesion at the diagonal —
every one on the same images for every row) with 95% bootstrap CIs, Dice per class, each method against D²MAE on the
same images (:func:`d2mae.segment.evaluate.compare_segment_runs`), each row's wall time, and the validation Dice
against the epoch. Part of :mod:`d2mae.experiment`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from d2mae.eval.figures import new_figure, save_figure
from d2mae.eval.tables import Table
from d2mae.experiment.methods import method_for, table2_order
from d2mae.experiment.plan import Plan, format_seconds
from d2mae.experiment.stage import Stage
from d2mae.segment.evaluate import compare_segment_runs

REFERENCE = "d2mae"  # every row is compared with D²MAE on the same images


def _metrics(stage: Stage) -> dict[str, Any] | None:
    path = stage.folder / "evaluation" / "metrics.json"
    if stage.done_info() is None or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _cell(summary: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    mean, ci = summary.get("mean"), summary.get("ci") or [math.nan, math.nan]
    if mean is None:
        return "—"
    if mean is None or not math.isfinite(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    if all(c is not None and math.isfinite(c) for c in ci):
        text += f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"
    return text


def _p(value: Any) -> str:
    return "—" if value is None or not math.isfinite(value) else (f"{value:.3f}" if value >= 0.001 else "< 0.001")


def segment_tables(plan: Plan, n_bootstrap: int, confidence: float) -> dict[str, Table]:
    """One table per segmentation dataset and seed (rows in Table 2's order); ``data`` holds the numbers."""
    tables: dict[str, Table] = {}
    for ds in plan.datasets:
        for seed in plan.config.seeds:
            stages = {s.method: s for s in plan.of("segment", ds) if s.seed == seed}
            done = {m: (s, _metrics(s)) for m, s in stages.items()}
            done = {m: v for m, v in done.items() if v[1] is not None}
            if not done:
                continue
            ref = done.get(REFERENCE)
            classes = sorted({c for _, res in done.values() for c in res.get("per_class", {})})
            rows, data = [], {}
            for m in table2_order(list(done)):
                stage, res = done[m]
                met = res["metrics"]
                versus: dict[str, Any] = {}
                if ref is not None and m != REFERENCE:
                    versus = compare_segment_runs(stage.folder, ref[0].folder, n_bootstrap=n_bootstrap, seed=0,
                                                  confidence=confidence)["metrics"]["dice_lesion"]
                diff = ("—" if not versus else f"{versus['diff'] * 100:+.1f} [{versus['diff_ci'][0] * 100:+.1f}, "
                        f"{versus['diff_ci'][1] * 100:+.1f}]")
                seconds = (stage.done_info() or {}).get("seconds")
                hd = met["hd95_lesion"]
                rows.append([method_for(m).label, _cell(met["dice_lesion"]), _cell(met["dice"]),
                             _cell(met["iou_lesion"]), _cell(met["empty_correct"], digits=0),
                             _cell(hd, 1.0, 1) + (f" ({hd['missed']} missed)" if hd.get("missed") else ""),
                             *[_cell(res.get("per_class", {}).get(c, {}), digits=1) for c in classes],
                             diff, _p(versus.get("wilcoxon_p")), _p((versus.get("fold_ttest") or {}).get("pvalue")),
                             f"{versus['mde'] * 100:.1f}" if versus and math.isfinite(versus["mde"]) else "—",
                             format_seconds(seconds) if seconds is not None else "-"])
                data[m] = {"run": str(stage.folder), "metrics": met, "per_class": res.get("per_class", {}),
                           "vs_d2mae_dice_lesion": versus or None, "seconds": seconds}
            n = next(iter(done.values()))[1]
            key = ds if len(plan.config.seeds) == 1 else f"{ds} (seed {seed})"
            tables[key] = Table(
                ["Method", "Dice lesion %", "Dice all %", "IoU lesion %", "empty → empty %", "HD95 lesion px",
                 *[f"Dice {c} %" for c in classes], "Dice lesion − D²MAE", "Wilcoxon P", "fold t-test P",
                 "MDE (Dice)", "Time"],
                rows, caption=f"**{key}**: {n['n_images']} test images ({n['lesion_images']} with a lesion, "
                              f"{n['empty_truth']} with an empty mask) over {n['n_folds']} fold(s)",
                align=["l"] + ["r"] * (10 + len(classes)), data=data,
                notes=[f"Mean over each metric's images with its {confidence:.0%} percentile-bootstrap CI, each image "
                       "scored at its own size. Every metric is taken over images that the truth alone defines, so "
                       "every row is scored on the same images: Dice and IoU over the lesion images (and Dice over "
                       "all images, where an empty truth scores 1 with an empty prediction, else 0); the share of "
                       "empty-truth images predicted empty; HD95 (pixels, lower is better) over the lesion images, "
                       "a missed lesion scored at the image diagonal and counted. Dice per class: over the images of "
                       "that class (the dataset's class column).",
                       "Dice lesion − D²MAE: the mean per-image difference with a paired bootstrap CI; Wilcoxon: "
                       "two-sided signed-rank test on the same images; fold t-test: two-sided paired t-test of the "
                       "fold means; MDE: the smallest true gap (points) a paired t-test on these images detects at "
                       "P < 0.05 with 80% power, given the measured spread. Time: the stage's wall time."])
    return tables


def validation_curves(plan: Plan, path: Path) -> tuple[Path, str] | None:
    """Validation Dice against the epoch (mean over folds) for every segmentation method of the first dataset and
    seed: whether each row had trained long enough."""
    curves: dict[str, list[float]] = {}
    for s in plan.of("segment"):
        if s.seed != plan.config.seeds[0] or s.done_info() is None:
            continue
        per_fold = [[json.loads(line)["val_dice"] for line in f.read_text(encoding="utf-8").splitlines() if line]
                    for f in sorted(s.folder.glob("fold_*/metrics.jsonl"))]
        if per_fold:
            longest = max(len(c) for c in per_fold)
            curves[method_for(str(s.method)).label] = [
                float(np.mean([c[i] for c in per_fold if i < len(c)])) for i in range(longest)]
    if not curves:
        return None
    fig = new_figure(6.0, 3.6)
    ax = fig.add_subplot()
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), [v * 100 for v in values], label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Dice, all images (%)")
    ax.legend(frameon=False, fontsize=7)
    return (save_figure(fig, path), "Validation Dice (all validation images, mean over folds) against the epoch; "
                                    "a fold's curve ends where early stopping ended it")


def overlay_figures(plan: Plan) -> list[tuple[Path, str]]:
    """The D²MAE run's overlays (best, median, worst test image), else the first finished run's, per dataset."""
    figs = []
    for ds in plan.datasets:
        stages = [s for s in plan.of("segment", ds) if _metrics(s) is not None]
        stages.sort(key=lambda s: (s.method != REFERENCE, plan.config.seeds.index(s.seed)))
        if stages and (stages[0].folder / "evaluation" / "overlays.png").is_file():
            s = stages[0]
            figs.append((s.folder / "evaluation" / "overlays.png",
                         f"{ds}, {method_for(str(s.method)).label} (seed {s.seed}): image, truth (green) and "
                         "prediction (orange) of its best, median and worst test image by Dice"))
    return figs

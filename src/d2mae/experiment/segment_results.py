"""The segmentation section of an experiment's report (beyond the paper): for each ``task: segment`` dataset, Dice,
IoU and HD95 of every method with 95% bootstrap CIs over the test images, and each method against D²MAE on the same
images — the mean Dice difference with a paired bootstrap CI, the Wilcoxon signed-rank P and the paired t-test over
folds (:func:`d2mae.segment.evaluate.compare_segment_runs`). Part of :mod:`d2mae.experiment`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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
            rows, data = [], {}
            for m in table2_order(list(done)):
                stage, res = done[m]
                met = res["metrics"]
                versus: dict[str, Any] = {}
                if ref is not None and m != REFERENCE:
                    versus = compare_segment_runs(stage.folder, ref[0].folder, n_bootstrap=n_bootstrap, seed=0,
                                                  confidence=confidence)["metrics"]["dice"]
                diff = ("—" if not versus else f"{versus['diff'] * 100:+.1f} [{versus['diff_ci'][0] * 100:+.1f}, "
                        f"{versus['diff_ci'][1] * 100:+.1f}]")
                seconds = (stage.done_info() or {}).get("seconds")
                rows.append([method_for(m).label, _cell(met["dice"]), _cell(met["iou"]),
                             _cell(met["hd95"], 1.0, 1) + (f" ({met['hd95']['left_out']} undefined)"
                                                           if met["hd95"].get("left_out") else ""),
                             diff, _p(versus.get("wilcoxon_p")), _p((versus.get("fold_ttest") or {}).get("pvalue")),
                             f"{versus['mde'] * 100:.1f}" if versus and math.isfinite(versus["mde"]) else "—",
                             format_seconds(seconds) if seconds is not None else "-"])
                data[m] = {"run": str(stage.folder), "metrics": met, "vs_d2mae_dice": versus or None,
                           "seconds": seconds}
            n = next(iter(done.values()))[1]
            key = ds if len(plan.config.seeds) == 1 else f"{ds} (seed {seed})"
            tables[key] = Table(
                ["Method", "Dice %", "IoU %", "HD95 px", "Dice − D²MAE", "Wilcoxon P", "fold t-test P",
                 "MDE (Dice)", "Time"],
                rows, caption=f"**{key}**: {n['n_images']} test images over {n['n_folds']} fold(s)",
                align=["l"] + ["r"] * 8, data=data,
                notes=[f"Mean over the test images with its {confidence:.0%} percentile-bootstrap CI, each image "
                       "scored at its own size (Dice and IoU in %, HD95 in pixels, lower is better; undefined where "
                       "the truth or the prediction is empty, and left out).",
                       "Dice − D²MAE: the mean per-image difference with a paired bootstrap CI; Wilcoxon: two-sided "
                       "signed-rank test on the same images; fold t-test: two-sided paired t-test of the fold "
                       "means; MDE: the smallest true Dice gap (points) a paired t-test on these images detects at "
                       "P < 0.05 with 80% power, given the measured spread. "
                       f"{n['empty_truth']} test image(s) have an empty mask (Dice 1 for an empty prediction, else 0)."])
    return tables


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

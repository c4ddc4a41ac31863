"""The small-budget readouts of an experiment's report (beyond the paper): quality against images seen in
pre-training (``budget.checkpoints``: linear probe and kNN on each kept checkpoint, :mod:`d2mae.train.probe`) and
against the share of labels (``budget.label_fractions``: fine-tuning on stratified, group-aware subsets of each
training fold). Each point is the mean over folds × seeds with its t-interval. Part of :mod:`d2mae.experiment`."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from d2mae.eval.figures import new_figure, save_figure
from d2mae.eval.statistics import MeanCI, mean_ci
from d2mae.eval.tables import Table, format_mean_ci
from d2mae.experiment.methods import method_for, table2_order
from d2mae.experiment.plan import Plan
from d2mae.runtime.files import read_csv_rows
from d2mae.train.probe import PROBE_CSV

READOUTS = ("linear", "knn")
METRICS = (("auroc", "AUROC"), ("macro_f1", "F1"), ("accuracy", "ACC"))

Curve = dict[str, dict[float, dict[str, MeanCI]]]  # method → x → metric column → mean ± CI


def _images_seen(model_dir: Path, batch: int) -> int | None:
    try:
        extra = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("extra", {}).get("pretrain", {})
    except (OSError, ValueError):
        return None
    if extra.get("images_seen") is not None:
        return int(extra["images_seen"])
    return int(extra["step"]) * batch if extra.get("step") is not None else None


def probe_curves(plan: Plan, dataset: str) -> tuple[Curve, dict[float, int | None]]:
    """``{method: {share: {"linear AUROC": …, "knn F1": …}}}`` over folds × seeds, and images seen per share."""
    values: dict[str, dict[float, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    seen: dict[float, int | None] = {}
    batch = plan.config.budget.pretrain_batch_size * int(plan.config.pretrain.get("accum_iter", 1))
    for s in plan.of("probe", dataset):
        path = s.folder / PROBE_CSV
        if s.done_info() is None or not path.is_file():
            continue
        seen.setdefault(s.share, _images_seen(Path(s.payload.pretrained), batch))
        for r in read_csv_rows(path):
            for key, label in METRICS:
                values[str(s.method)][s.share][f"{r['readout']} {label}"].append(float(r[key]))
    conf = plan.config.report.confidence
    return ({m: {x: {k: mean_ci(v, conf) for k, v in cols.items()} for x, cols in xs.items()}
             for m, xs in values.items()}, seen)


def label_curves(plan: Plan, dataset: str) -> Curve:
    """``{method: {labels share: {"AUROC": …, "F1": …, "ACC": …}}}`` over folds × seeds (1.0: Table 2's runs)."""
    values: dict[str, dict[float, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for s in plan.of("label_fraction", dataset) + plan.of("finetune", dataset):
        path = s.folder / "metrics.json"
        if s.done_info() is None or not path.is_file():
            continue
        for fold in (json.loads(path.read_text(encoding="utf-8")).get("folds") or {}).values():
            for key, label in METRICS:
                v = fold.get(key)
                values[str(s.method)][s.share][label].append(math.nan if v is None else float(v))
    conf = plan.config.report.confidence
    return {m: {x: {k: mean_ci(v, conf) for k, v in cols.items()} for x, cols in xs.items()}
            for m, xs in values.items()}


def curve_table(curve: Curve, x_label: str, x_text: dict[float, str], columns: Sequence[str], caption: str,
                conf: float) -> Table:
    rows = []
    for m in table2_order(list(curve)):
        for x in sorted(curve[m]):
            rows.append([method_for(m).label, x_text.get(x, f"{x:g}"),
                         *[format_mean_ci(curve[m][x][c]) if c in curve[m][x] else "-" for c in columns]])
    data = {m: {f"{x:g}": {c: s.to_dict() for c, s in cols.items()} for x, cols in xs.items()}
            for m, xs in curve.items()}
    return Table(["Method", x_label, *columns], rows, caption=caption, align=["l", "r"] + ["r"] * len(columns),
                 data=data, notes=[f"Mean ± half-width of the {conf:.0%} t-interval over folds × seeds (%)."])


def curve_figure(curve: Curve, panels: Sequence[str], x: dict[float, float], x_label: str, title: str,
                 path: Path, log_x: bool = False) -> Path:
    """One panel per metric column: a line per method, error bars at each point's CI."""
    fig = new_figure(4.2 * len(panels), 3.4)
    for k, col in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for m in table2_order(list(curve)):
            pts = [(x[s], curve[m][s][col]) for s in sorted(curve[m]) if col in curve[m][s] and s in x]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1].mean * 100 for p in pts]
            err = [[(p[1].mean - p[1].low) * 100 if math.isfinite(p[1].low) else 0 for p in pts],
                   [(p[1].high - p[1].mean) * 100 if math.isfinite(p[1].high) else 0 for p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method_for(m).label)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{col} (%)")
        ax.set_title(col, fontsize=9)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def curve_sections(plan: Plan, figures: Path) -> list[tuple[str, str, list[Table], list[tuple[Path, str]]]]:
    """(heading, text, tables, figures) of the pre-training and label-efficiency curves, per dataset that has them."""
    conf = plan.config.report.confidence
    out = []
    for ds in plan.datasets:
        curve, seen = probe_curves(plan, ds)
        if curve:
            cols = [f"{r} {lab}" for r in READOUTS for _, lab in METRICS[:2]]
            text = {x: f"{x:.0%} ({seen[x]:,} images)" if seen.get(x) else f"{x:.0%}" for x in seen}
            table = curve_table(curve, "pre-training (images seen)", text, cols,
                                f"Pre-training curves — {ds}: frozen-encoder probes at each kept checkpoint", conf)
            xs = {x: float(seen[x]) for x in seen if seen[x]}
            png = curve_figure(curve, ["linear AUROC", "knn AUROC"], xs, "images seen in pre-training",
                               f"{ds}: probes against pre-training", figures / f"curves_pretraining_{ds}.png")
            out.append((f"Pre-training curves — {ds}",
                        "Linear probe (logistic regression) and kNN on the frozen encoder's pooled features at each "
                        "image's σ_{t*}, t* fed, for the models kept at each share of the pre-training budget "
                        "(d2mae probe). They cost seconds per checkpoint, and they show whether pre-training "
                        "changed the representation when fine-tuning at this budget cannot tell the methods apart.",
                        [table], [(png, f"{ds}: probe AUROC against images seen in pre-training (error bars: "
                                        f"{conf:.0%} t-interval over folds × seeds)")]))
        labels = label_curves(plan, ds)
        if labels and any(len(v) > 1 for v in labels.values()):
            cols = [lab for _, lab in METRICS]
            table = curve_table(labels, "labels", {x: f"{x:.0%}" for v in labels.values() for x in v}, cols,
                                f"Label efficiency — {ds}: fine-tuned on a share of each training fold", conf)
            png = curve_figure(labels, ["AUROC", "F1"], {x: x * 100 for v in labels.values() for x in v},
                               "labels used (% of each training fold)", f"{ds}: fine-tuning against labels",
                               figures / f"curves_labels_{ds}.png", log_x=True)
            out.append((f"Label efficiency — {ds}",
                        "Each method fine-tuned on a stratified, patient-group-aware share of every training fold "
                        "(the same images for every method), validated and tested on the full validation and test "
                        "parts.", [table], [(png, f"{ds}: test AUROC and macro-F1 against the share of labels "
                                                  f"(error bars: {conf:.0%} t-interval over folds × seeds)")]))
    return out


def curve_data(sections: Sequence[tuple[str, str, list[Table], list[Any]]]) -> dict[str, Any]:
    return {heading: [t.data for t in tables] for heading, _, tables, _ in sections}

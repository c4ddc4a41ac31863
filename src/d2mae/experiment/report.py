"""The report of an experiment: its Table-2/3-style tables (:mod:`~d2mae.experiment.results`), figures
(:mod:`~d2mae.experiment.report_figures`), setup, machine and times, as report.md and report.html, with
metrics.csv/json beside them. Part of :mod:`d2mae.experiment`."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from d2mae.eval.document import Report
from d2mae.eval.metrics import nan_to_none
from d2mae.eval.tables import Table
from d2mae.experiment.curves import curve_data, curve_sections
from d2mae.experiment.methods import method_for
from d2mae.experiment.plan import EXPERIMENT_CONFIG, PLAN_FILE, Plan, format_seconds, pretrain_budget
from d2mae.experiment.report_figures import FigureWriter, make_figures
from d2mae.experiment.results import (
    METRIC_COLUMNS,
    SIGNIFICANCE,
    RunResult,
    ablation_tables,
    actual_folds,
    check_same_folds,
    collect_results,
    comparison_tables,
    significance_statements,
    stage_times,
)
from d2mae.experiment.segment_results import overlay_figures, segment_tables, validation_curves
from d2mae.method.model_config import ModelConfig
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_json, atomic_write_text
from d2mae.runtime.machine import machine_info
from d2mae.runtime.options import build_config

# --------------------------------------------------------------------------------------------------------------------
# results and the report
# --------------------------------------------------------------------------------------------------------------------


# ---- figures -------------------------------------------------------------------------------------------------------


def _ablation_statements(ablations: Mapping[str, Any]) -> list[str]:
    """One line per Table 3 panel: its best and second variant and whether the difference is significant."""
    out = []
    for ds, t in ablations.items():
        for group, entry in t.data.items():
            order = entry.get("ranking", [])
            p = entry.get("pvalue")
            if len(order) >= 2:
                sig = ("significant" if p is not None and math.isfinite(p) and p < SIGNIFICANCE else
                       "**not significant**" if p is not None and math.isfinite(p) else "not testable")
                ptext = f"P = {p:.3f}" if p is not None and math.isfinite(p) else "no P-value"
                out.append(f"{ds}, {group}: best {order[0]}, second {order[1]} ({ptext}: {sig}).")
    return out


def _segment_statements(tables: Mapping[str, Table]) -> list[str]:
    """One line per segmentation table: the best Dice, and D²MAE against each other row (Wilcoxon P)."""
    out = []
    for key, t in tables.items():
        ranked = sorted(t.data, key=lambda m: -(t.data[m]["metrics"]["dice"].get("mean") or -1.0))
        if not ranked:
            continue
        best = t.data[ranked[0]]["metrics"]["dice"]["mean"]
        line = f"{key}, segmentation: best Dice {best * 100:.1f}% ({method_for(ranked[0]).label})"
        tests = []
        for m in ranked:
            v = t.data[m].get("vs_d2mae_dice")
            if v and v.get("wilcoxon_p") is not None and math.isfinite(v["wilcoxon_p"]):
                sig = "significant" if v["wilcoxon_p"] < SIGNIFICANCE else "not significant"
                p = v["wilcoxon_p"]
                tests.append(f"{method_for(m).label} − D²MAE {v['diff'] * 100:+.1f} points, Wilcoxon "
                             f"{'P < 0.001' if p < 0.001 else f'P = {p:.3f}'} ({sig})")
        out.append(line + (": " + "; ".join(tests) if tests else "") + ".")
    return out


def _metric_rows(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """metrics.csv: one row per run and fold."""
    rows = []
    for r in results:
        for fold, m in (r.metrics.get("folds") or {}).items():
            rows.append({"dataset": r.stage.dataset, "method": r.stage.method, "label": r.method.label,
                         "seed": r.stage.seed, "fold": fold, "n": m.get("n"),
                         **{k: m.get(k) for k in ("accuracy", "macro_f1", "auroc", "balanced_accuracy")},
                         "run": str(r.stage.folder)})
    return rows


def _setup_bullets(plan: Plan, fold_problems: Sequence[str]) -> list[str]:
    """The report's Setup section: each dataset's images, protocol and equal budget, and the model."""
    cfg, b = plan.config, plan.config.budget
    setup = []
    for name, dp in plan.datasets.items():
        accum = int(cfg.pretrain.get("accum_iter", 1))
        epochs, _, steps = pretrain_budget(b, dp.n_pretrain, accum)
        eff = b.pretrain_batch_size * accum
        folds = "; ".join(f"fold {f[0]}: {f[1]}/{f[2]}/{f[3]}" for f in actual_folds(plan, name) or dp.folds)
        setup.append(f"**{name}**: {dp.n_pretrain} pre-training images, {dp.n_labeled} labeled images, "
                     f"{dp.num_classes} classes; protocol `{dp.spec.protocol}` (train/val/test {folds}).")
        segment = dp.spec.task == "segment"
        fine = [s.payload for s in plan.of("segment" if segment else "finetune", name)]
        patience = fine[0].patience if fine else 0
        stopping = f"early stopping after {patience} epochs without a better one" if patience else "no early stopping"
        if segment:
            setup.append(f"Equal budget on {name} (segmentation, {dp.num_classes} classes with the background): "
                         f"every pre-trained method {steps:,} optimizer steps × batch {eff} = {steps * eff:,} images "
                         f"seen; every method segments ≤ {b.finetune_epochs} epochs × batch "
                         f"{b.finetune_batch_size} with the same recipe (Dice + cross-entropy; the epoch with the best "
                         f"validation Dice kept, {stopping}) on the same folds.")
        else:
            setup.append(f"Equal budget on {name}: every pre-trained method {steps:,} optimizer steps × batch "
                         f"{eff} = {steps * eff:,} images seen; every method "
                         f"fine-tuned ≤ {b.finetune_epochs} epochs × batch {b.finetune_batch_size} with the same "
                         f"recipe (the epoch with the best validation macro-F1 kept, {stopping}) on the same folds "
                         f"({'verified on the predictions' if not fold_problems else 'NOT identical, see above'}).")
        if dp.overlap:
            setup.append(f"Note on {name}: {dp.overlap}.")
    mc = build_config(ModelConfig, (cfg.model, "model"))
    setup.append(f"Model: {mc.arch} ({mc.depth} blocks, width {mc.embed_dim}, {mc.num_heads} heads, "
                 f"patch {mc.patch_size}), "
                 f"{mc.img_size} px, {mc.in_chans} channel(s); decoder {mc.decoder_depth} × {mc.decoder_embed_dim}; "
                 f"mask ratio {mc.mask_ratio:.0%}.")
    return setup


def _figure_sections(rep: Report, figs: Mapping[str, list[tuple[Path, str]]], notes: Sequence[str]) -> None:
    """The OBS (Figure 3), ROC, training-curve and reconstruction figures, and the figures that failed."""
    obs_sections = [k for k in figs if k.startswith("obs:")]
    if obs_sections or "sigma" in figs:
        rep.heading("Optimal blurriness search (Figure 3 style)")
        for k in obs_sections:
            for path, caption in figs[k]:
                rep.image(path, caption)
        for path, caption in figs.get("sigma", []):
            rep.image(path, caption)
    for prefix, heading in (("roc:", "ROC curves"), ("curves:", "Training curves"),
                            ("recon:", "Reconstructions of masked inputs")):
        keys = [k for k in figs if k.startswith(prefix)]
        if keys:
            rep.heading(heading)
            for k in keys:
                for path, caption in figs[k]:
                    rep.image(path, caption)
    if notes:
        rep.heading("Figures that could not be drawn")
        rep.bullets(list(notes))


def _per_run_table(results: Sequence[RunResult], out: Path) -> Table:
    run_rows = []
    for r in results:
        of = r.metrics.get("over_folds") or {}
        cells = []
        for key, _ in METRIC_COLUMNS:
            if key in of and of[key].get("mean") is not None:
                hw = of[key].get("half_width")
                cells.append(f"{of[key]['mean'] * 100:.2f}" + (f" ± {hw * 100:.2f}" if hw is not None else ""))
            else:
                v = (r.metrics.get("pooled", {}).get(key) or {}).get("value")
                cells.append("n/a" if v is None else f"{v * 100:.2f}")
        run_rows.append([r.stage.dataset, r.method.label, str(r.stage.seed), str(r.metrics.get("n_folds")), *cells,
                         f"`{r.stage.folder.relative_to(out)}`"])
    return Table(["Dataset", "Method", "Seed", "Folds", "ACC", "F1", "AUROC", "Run folder"], run_rows,
                 align=["l", "l", "r", "r", "r", "r", "r", "l"],
                 notes=["Per run: mean ± CI over its folds (one fold: pooled value). Each run folder holds "
                        "predictions.csv, metrics.json/.md/.html (per-fold and pooled metrics with bootstrap CIs), "
                        "ROC/confusion/σ* figures and the fine-tuned models."])


def _machine_section(rep: Report, machine: Mapping[str, Any], timings: Sequence[Mapping[str, Any]],
                     wall_seconds: float | None) -> None:
    rep.heading("Machine, software and time")
    rep.table(Table(["", ""], [
        ["Platform", machine["platform"]], ["CPU", f"{machine['cpu']} ({machine['cores']} cores available, "
                                                  f"{machine['torch_threads']} torch threads, OpenMP wait policy "
                                                  f"{machine['omp_wait_policy']}; load average "
                                                  f"{machine['load_average']} when the report was written)"],
        ["Memory", f"{machine['memory_gib']} GiB"], ["GPU", ", ".join(machine["gpus"])],
        ["Software", f"python {machine['python']}, torch {machine['torch']}, timm {machine['timm']}, numpy "
                     f"{machine['numpy']}, scikit-learn {machine['scikit-learn']}, d2mae {machine['d2mae']}"]],
        align=["l", "l"]))
    time_rows = []
    total = 0.0
    for t in timings:
        sec = t["seconds"]
        total += sec or 0.0
        est = t["estimate_s"]
        time_rows.append([t["stage"], format_seconds(sec) if sec is not None else "not run",
                          format_seconds(est) if est is not None else "-"])
    time_rows.append(["**all stages**", f"**{format_seconds(total)}**", ""])
    notes = ["Wall time of each stage when it ran (a stage reused from an earlier invocation keeps its own time); "
             "the estimate is what --plan predicted from timing a few steps."]
    if wall_seconds is not None:
        notes.append(f"This invocation took {format_seconds(wall_seconds)} up to writing the report.")
    rep.table(Table(["Stage", "Wall time", "Estimate"], time_rows, notes=notes, align=["l", "r", "r"]))


def _beyond_paper_sections(rep: Report, plan: Plan, curves: Sequence[Any], seg_tables: Mapping[str, Table]) -> None:
    """The pre-training and label-efficiency curves, and the segmentation tables with the overlay figure."""
    for heading, text, curve_tables, curve_figs in curves:
        rep.heading(heading)
        rep.paragraph(text)
        for t in curve_tables:
            rep.table(t)
        for path, caption in curve_figs:
            rep.image(path, caption)
    if seg_tables:
        rep.heading("Lesion segmentation (beyond the paper)")
        rep.paragraph("Each method's encoder (or the U-Net) segments with d2mae segment: the image blurred at its "
                      "σ_{t*} with t* fed to the blur token where the method searches, the same folds and budget "
                      "for every row (docs/segment.md).")
        for t in seg_tables.values():
            rep.table(t)
        curve = validation_curves(plan, plan.out / "figures" / "segment_validation.png")
        for path, caption in overlay_figures(plan) + ([curve] if curve else []):
            rep.image(path, caption)


def write_report(plan: Plan, wall_seconds: float | None = None, views: Path | None = None) -> Path:
    """Write OUT/report.md + report.html (figures embedded), metrics.csv/json, machine.json, timings.json/csv."""
    cfg, out = plan.config, plan.out
    results = collect_results(plan)
    seg_tables = segment_tables(plan, cfg.report.n_bootstrap, cfg.report.confidence)
    if not results and not seg_tables:
        raise D2maeError(f"{out}: no finished fine-tuning or segmentation run to report on; run the experiment first")
    machine = machine_info()
    timings = stage_times(plan)
    atomic_write_json(out / "machine.json", machine)
    atomic_write_json(out / "timings.json", {"stages": timings, "wall_seconds_this_invocation": wall_seconds})
    _write_csv(out / "timings.csv", timings)
    rows = _metric_rows(results)
    _write_csv(out / "metrics.csv", rows)
    tables = comparison_tables(plan, results)
    ablations = ablation_tables(plan, results)
    statements = significance_statements({k: t for k, t in tables.items() if k in plan.datasets})
    abl_statements = _ablation_statements(ablations)
    fold_problems = check_same_folds(plan)
    curves = curve_sections(plan, out / "figures")
    atomic_write_json(out / "metrics.json", nan_to_none({
        "format": "d2mae-experiment-results", "format_version": 1, "experiment": cfg.name,
        "per_fold": rows, "tables": {k: t.data for k, t in tables.items()},
        "ablations": {k: t.data for k, t in ablations.items()}, "significance": statements + abl_statements,
        "segmentation": {k: t.data for k, t in seg_tables.items()}, "curves": curve_data(curves),
        "same_folds_problems": fold_problems,
        "runs": [{"dataset": r.stage.dataset, "method": r.stage.method, "seed": r.stage.seed,
                  "run": str(r.stage.folder), "over_folds": r.metrics.get("over_folds"),
                  "pooled": {k: r.metrics.get("pooled", {}).get(k) for k in ("accuracy", "macro_f1", "auroc")}}
                 for r in results]}))

    draw = FigureWriter(out / "figures")
    figs = make_figures(plan, results, draw)

    rep = Report(cfg.report.title or f"d2mae experiment: {cfg.name}")
    methods_text = ", ".join(f"{method_for(m.name).label} ({m.describe()})" for m in cfg.runs())
    rep.paragraph(f"{cfg.description + ' ' if cfg.description else ''}Datasets: {', '.join(plan.datasets)}. "
                  f"Seeds: {', '.join(map(str, cfg.seeds))}. Methods: {methods_text}.")
    rep.heading("Summary")
    bullets = list(statements) + abl_statements
    if any("not significant" in s or "cannot be assessed" in s for s in bullets):
        bullets.append("Where a difference is not significant, this experiment does not show that one method is "
                       "better than the other; more folds, seeds or data would be needed.")
    bullets += _segment_statements(seg_tables)
    rep.bullets(bullets or ["No comparison was possible (fewer than two methods)."])
    if views is not None:
        rep.paragraph(f"Look through every test image — its blur search, prediction and masks, and where D²MAE and "
                      f"MAE disagree: [{views.relative_to(out).as_posix()}]({views.relative_to(out).as_posix()}) "
                      "(pages that open from disk; `d2mae view`, docs/view.md).")
    if fold_problems:
        rep.paragraph("**Warning: the methods were not evaluated on identical folds** — " + "; ".join(fold_problems))
    rep.heading("Setup")
    rep.bullets(_setup_bullets(plan, fold_problems))
    if results:
        rep.heading("Results (Table 2 style)")
        rep.paragraph(f"Test-set metrics in %, mean ± half-width of the {cfg.report.confidence:.0%} t-interval over "
                      "folds × seeds. Best **bold**, second <u>underlined</u>; the P-value row is the two-sided "
                      "paired t-test of the best vs. the second method over the same folds and seeds (paper, "
                      "Section 3.1).")
        for name, t in tables.items():
            rep.table(t)
        for path, caption in figs.get("fig2", []):
            rep.image(path, caption)
    _beyond_paper_sections(rep, plan, curves, seg_tables)
    if ablations:
        rep.heading("Ablations (Table 3 style)")
        rep.paragraph("Each block varies one factor of D²MAE with everything else fixed; variants that share a "
                      "pre-trained model (OBS setting, search step) reuse it.")
        for name, t in ablations.items():
            rep.table(t)
    _figure_sections(rep, figs, draw.notes)
    if results:
        rep.heading("Per-run results")
        rep.table(_per_run_table(results, out))
    _machine_section(rep, machine, timings, wall_seconds)
    rep.heading("Files")
    rep.bullets([f"`{EXPERIMENT_CONFIG}`: the resolved config; `{PLAN_FILE}`: the stages and their folders.",
                 "`metrics.csv` / `metrics.json`: per-fold metrics of every run, the tables' numbers and P-values.",
                 "`machine.json`, `timings.json` / `timings.csv`: the machine, software versions and stage times.",
                 "`figures/`: every figure as PNG; `runs/`, `pretrained/`, `data/`: the stages' outputs."])
    rep.heading("Resolved config")
    rep.code(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
    md, _ = rep.write(out, stem="report")
    return md


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())

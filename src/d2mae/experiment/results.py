"""An experiment's results: each finished fine-tuning stage's per-fold metrics, collected into the Table 2 comparison
and the Table 3 panels with their paired tests."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from d2mae.eval.tables import ablation_table, comparison_table, format_p_statement
from d2mae.experiment.config import ExperimentConfig
from d2mae.experiment.methods import ABLATIONS, Method, method_for, table2_order
from d2mae.experiment.plan import Plan
from d2mae.experiment.stage import Stage
from d2mae.io.predictions import PREDICTIONS, RUN_JSON
from d2mae.method.presets import describe_preset

SIGNIFICANCE = 0.05


METRIC_COLUMNS: tuple[tuple[str, str], ...] = (("accuracy", "ACC"), ("macro_f1", "F1"), ("auroc", "AUROC"))


@dataclass
class RunResult:

    """One finished fine-tuning run: its stage and D's ``metrics.json`` (per-fold metrics)."""
    stage: Stage
    metrics: dict[str, Any]

    @property
    def method(self) -> Method:
        return method_for(str(self.stage.method))

    def fold_values(self, metric: str) -> dict[str, float]:
        """``{"seed<k>/fold<f>": value}``: the pairing key of the paired t-test (same seed, same fold)."""
        out = {}
        for fold, m in (self.metrics.get("folds") or {}).items():
            value = m.get(metric)
            out[f"seed{self.stage.seed}/fold{fold}"] = math.nan if value is None else float(value)
        return out


def collect_results(plan: Plan) -> list[RunResult]:
    """The metrics of every finished fine-tuning stage of the plan (``metrics.json`` written by evaluate)."""
    out = []
    for s in plan.of("finetune"):
        path = s.folder / "metrics.json"
        if s.done_info() is None or not path.is_file():
            continue
        out.append(RunResult(s, json.loads(path.read_text(encoding="utf-8"))))
    return out


def fold_metric_values(results: Sequence[RunResult], dataset: str, method: str, metric: str) -> dict[str, float]:
    vals: dict[str, float] = {}
    for r in results:
        if r.stage.dataset == dataset and r.stage.method == method:
            vals.update(r.fold_values(metric))
    return vals


def table2_methods(cfg: ExperimentConfig, results: Sequence[RunResult], dataset: str) -> list[str]:
    """The comparison's rows: the ``methods:`` list (in Table 2 order first) that produced results."""
    have = {r.stage.method for r in results if r.stage.dataset == dataset}
    return [m for m in table2_order(cfg.methods) if m in have]


def method_info(m: Method, weights: Mapping[str, str]) -> dict[str, str]:
    if m.preset is not None:
        pre = describe_preset(m.preset)
    elif m.source == "checkpoint" or m.name in weights:
        pre = f"released weights ({Path(weights[m.name]).name})"
    else:
        pre = "none"
    if m.preset is None or m.obs == "none":
        ft = "no blur"
    elif m.obs == "search":
        ft = f"OBS σ* (s = {m.search_step})"
    else:
        ft = f"fixed σ = {m.obs.split(':', 1)[1]}"
    return {"Pre-training": pre, "Fine-tuning input": ft}


def comparison_tables(plan: Plan, results: Sequence[RunResult]) -> dict[str, Any]:
    """Table 2 per dataset (ACC, F1, AUROC) and, with several datasets, the paper's F1 × datasets layout."""

    cfg = plan.config
    conf = cfg.report.confidence
    tables: dict[str, Any] = {}
    for ds in plan.datasets:
        methods = table2_methods(cfg, results, ds)
        if not methods:
            continue
        res = {method_for(m).label: {lab: fold_metric_values(results, ds, m, key) for key, lab in METRIC_COLUMNS} for m in methods}
        info = {method_for(m).label: method_info(method_for(m), cfg.weights) for m in methods}
        tables[ds] = comparison_table(res, columns=[lab for _, lab in METRIC_COLUMNS], confidence=conf, info=info,
                                      info_columns=("Pre-training", "Fine-tuning input"),
                                      caption=f"Table 2 style — {ds}: mean ± {conf:.0%} CI over folds × seeds (%)")
    if len(tables) > 1:
        methods = [m for m in cfg.methods if any(r.stage.method == m for r in results)]
        res = {method_for(m).label: {ds: fold_metric_values(results, ds, m, "macro_f1") for ds in tables
                                  if fold_metric_values(results, ds, m, "macro_f1")} for m in methods}
        tables["F1 × datasets"] = comparison_table(res, columns=list(tables), confidence=conf,
                                                   caption="Table 2 layout — macro-F1 (%) per dataset")
    return tables


def ablation_tables(plan: Plan, results: Sequence[RunResult]) -> dict[str, Any]:
    """Table 3 per dataset: one block per ablation group that ran, macro-F1 (the paper's metric)."""

    cfg = plan.config
    out = {}
    for ds in plan.datasets:
        groups = {}
        for g in cfg.ablations:
            group = ABLATIONS[g]
            variants = {label: fold_metric_values(results, ds, m, "macro_f1") for m, label in group.variants}
            variants = {k: v for k, v in variants.items() if v}
            if variants:
                groups[group.title] = variants
        if groups:
            out[ds] = ablation_table(groups, metric_label="F1 (%)", confidence=cfg.report.confidence,
                                     caption=f"Table 3 style — {ds}: ablations, macro-F1 (mean ± "
                                             f"{cfg.report.confidence:.0%} CI over folds × seeds)")
    return out


def significance_statements(tables: Mapping[str, Any], alpha: float = SIGNIFICANCE) -> list[str]:
    """One plain sentence per table column: who is best, by how much, and whether that is significant."""

    lines = []
    for name, table in tables.items():
        cells = table.data.get("cells", {})
        for col, entry in table.data.get("columns", {}).items():
            best, second = entry.get("best"), entry.get("second")
            if best is None:
                continue
            where = f"{name}, {col}" if name != col else name
            if second is None:
                lines.append(f"{where}: only {best} has results; nothing to compare.")
                continue
            diff = (cells[best][col]["mean"] - cells[second][col]["mean"]) * 100
            p = entry.get("pvalue")
            n = entry.get("n_pairs", 0)
            if abs(diff) < 5e-3:
                tied = [m for m in entry.get("ranking", []) if abs(cells[m][col]["mean"] - cells[best][col]["mean"])
                        < 5e-5]
                lines.append(f"{where}: {', '.join(tied)} tie ({cells[best][col]['mean'] * 100:.2f}); no method is "
                             "better here.")
                continue
            head = f"{where}: best {best}, {diff:.2f} points above {second}"
            if p is None or not math.isfinite(p):
                why = entry.get("note") or "too few paired folds/seeds"
                lines.append(f"{head}; significance cannot be assessed ({why}) — treat the ranking as unconfirmed.")
            elif p < alpha:
                caveat = f" (caution: {entry['note']})" if entry.get("note") else ""
                lines.append(f"{head}; {format_p_statement(p)} (two-sided paired t-test over {n} folds × seeds): "
                             f"significant at {alpha:g}{caveat}.")
            else:
                mde = entry.get("mde")
                bound = (f" With this spread, the test would detect a true gap of {mde * 100:.2f} points with 80% "
                         "power; a gap larger than that is unlikely, a smaller one is not ruled out."
                         if mde is not None and math.isfinite(mde) else "")
                lines.append(f"{head}; {format_p_statement(p)} (two-sided paired t-test over {n} folds × seeds): "
                             f"**not significant** at {alpha:g} — the difference may well be chance.{bound}")
    return lines


def check_same_folds(plan: Plan) -> list[str]:
    """Problems found when checking that, per dataset and seed, every method predicted the same images of each fold
    and split (the folds of the equal-budget rule); empty when all agree."""
    problems = []
    for ds in plan.datasets:
        for seed in plan.config.seeds:
            ref: tuple[str, set] | None = None
            for s in plan.of("finetune", ds):
                path = s.folder / PREDICTIONS
                if s.seed != seed or not path.is_file():
                    continue
                with path.open(newline="", encoding="utf-8") as fh:
                    rows = {(r["fold"], r["split"], r["path"]) for r in csv.DictReader(fh)}
                if ref is None:
                    ref = (str(s.method), rows)
                elif rows != ref[1]:
                    problems.append(f"{ds}, seed {seed}: {s.method} was evaluated on other fold images than "
                                    f"{ref[0]} ({len(rows ^ ref[1])} differences)")
    return problems


def stage_times(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for s in plan.stages:
        info = s.done_info() or {}
        rows.append({"stage": s.label, "kind": s.kind, "dataset": s.dataset, "method": s.method, "seed": s.seed,
                     "seconds": info.get("seconds"), "estimate_s": info.get("estimate_s"),
                     "finished": info.get("finished"), "folder": str(s.folder)})
    return rows


def actual_folds(plan: Plan, dataset: str) -> list[tuple[str, int, int, int]]:
    """(fold, n_train, n_val, n_test) as the first finished fine-tuning of ``dataset`` recorded them."""
    for s in plan.of("finetune", dataset):
        path = s.folder / RUN_JSON
        if s.done_info() is not None and path.is_file():
            details = json.loads(path.read_text(encoding="utf-8")).get("fold_details") or []
            return [(str(d["fold"]), int(d["n_train"]), int(d["n_val"]), int(d["n_test"])) for d in details]
    return []

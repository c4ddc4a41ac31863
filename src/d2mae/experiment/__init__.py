"""``d2mae experiment``: every method on every dataset under one protocol and one budget, then one report.

An experiment config (``configs/*.yaml``, every key checked; docs/experiment.md) names the datasets, the methods
(Table 2's rows, :mod:`~d2mae.experiment.methods`), the ablation groups (Table 3), the seeds and the budget. The
package reads it (:mod:`~d2mae.experiment.config`), plans every stage with its cache key and checks that every
method gets the same budget, recipe and folds (:mod:`~d2mae.experiment.plan`), runs each stage once
(:mod:`~d2mae.experiment.runner`: pre-training, fine-tuning or segmentation through :mod:`d2mae.train`, probes,
evaluation; a finished stage is skipped on ``--resume``), and writes the report (:mod:`~d2mae.experiment.report`).
``d2mae demo`` is one such experiment on phantoms (:mod:`~d2mae.experiment.demo`)::

    cfg = load_experiment("configs/demo.yaml", ["budget.pretrain_epochs=5"])   # + --set style overrides
    plan = make_plan(cfg, "runs/demo")          # every stage, checked; nothing runs
    report_md = run_experiment(cfg, "runs/demo", resume=True)
"""

from __future__ import annotations

from d2mae.experiment.config import (
    PRESET_FIELDS,
    BudgetSpec,
    DatasetSpec,
    ExperimentConfig,
    ReportSpec,
    apply_overrides,
    expand_env,
    load_experiment,
    parse_experiment,
)
from d2mae.experiment.estimate import estimate_plan, measure_speed
from d2mae.experiment.methods import ABLATIONS, METHODS, TABLE2_METHODS, TABLE2_TIMM, AblationGroup, Method, method_for
from d2mae.experiment.plan import (
    EXPERIMENT_CONFIG,
    PLAN_FILE,
    Plan,
    check_equal_budget,
    format_plan,
    make_plan,
    pretrain_budget,
)
from d2mae.experiment.report import write_report
from d2mae.experiment.report_figures import make_figures, reconstruction_arrays
from d2mae.experiment.results import (
    METRIC_COLUMNS,
    SIGNIFICANCE,
    RunResult,
    ablation_tables,
    check_same_folds,
    collect_results,
    comparison_tables,
    significance_statements,
)
from d2mae.experiment.runner import prepare_out, run_experiment, run_stage
from d2mae.experiment.stage import DONE, DatasetPlan, Stage, config_hash
from d2mae.runtime.machine import machine_info

__all__ = [
    # config
    "Method", "METHODS", "TABLE2_METHODS", "TABLE2_TIMM", "method_for", "AblationGroup", "ABLATIONS", "PRESET_FIELDS", "DatasetSpec", "BudgetSpec",
    "ReportSpec", "ExperimentConfig", "parse_experiment", "expand_env", "apply_overrides", "load_experiment",
    # plan
    "DONE", "EXPERIMENT_CONFIG", "PLAN_FILE", "config_hash", "Stage", "DatasetPlan", "Plan", "pretrain_budget",
    "make_plan", "check_equal_budget", "measure_speed", "estimate_plan", "machine_info", "format_plan",
    # runner
    "run_stage", "prepare_out", "run_experiment",
    # report
    "SIGNIFICANCE", "METRIC_COLUMNS", "RunResult", "collect_results", "comparison_tables", "ablation_tables",
    "significance_statements", "check_same_folds", "reconstruction_arrays", "make_figures", "write_report",
]

"""``d2mae experiment``: every method on every dataset under one protocol and one budget, then one report.

An experiment config (YAML) names the datasets (pre-training images; a labeled downstream set with its column
options and protocol), the methods, the seeds and the compute budget. The command runs, for every dataset and seed,

* the pre-trainings the methods need (:func:`d2mae.train.pretrain.pretrain`, one per preset, cached and shared),
* one fine-tuning per method (:func:`d2mae.train.finetune.finetune`, all folds of the protocol) and its evaluation
  (:func:`d2mae.eval.evaluate.evaluate_run`),

and writes ``report.md`` + a self-contained ``report.html`` (:mod:`d2mae.eval.document`) with a Table-2-style comparison,
Table-3-style ablations, and the paper's figures. Methods (Table 2 of the paper, at the scale the config asks for):

============  ==========================  =====================================================================
method        pre-training preset         fine-tuning
============  ==========================  =====================================================================
supervised    none (ViT from scratch)     ``--mode scratch`` (no blur): the floor
mae           ``mae``                     OBS ``none`` (no blur)
deblurrmae    ``deblurrmae`` (σ = 1.1)    OBS ``fixed:1.1`` (the same fixed σ as in pre-training)
d2mae         ``d2mae`` (σ 0.1 → 1.1)     OBS ``search``, s = 2 (Eq. 5)
============  ==========================  =====================================================================

Opt-in ablation groups (Table 3): ``blur_range`` (presets range-0.6 / d2mae / range-1.6), ``embedding``
(embed-none / embed-add / d2mae's token), ``obs_setting`` (the d2mae model fine-tuned with OBS none / fixed:0.5 /
search) and ``search_step`` (s = 1 / 2 / 3 on the d2mae model). Variants that share a pre-training reuse it.

**Equal budget.** Every method of a dataset gets the same pre-training budget (epochs, or images seen, and batch
size, from the config's ``budget:`` section — a method cannot override it), the same fine-tuning recipe and the same
folds (same labels, protocol, fold seed). :func:`check_equal_budget` enforces this on the planned configs before
anything runs, and the report checks afterwards that every method was tested on the same images of each fold.

**Caching and resume.** Each stage writes its outputs, then a ``stage_done.json`` marker (atomically) holding the hash of
its resolved config. A stage whose marker is present with the same hash is skipped, so an interrupted experiment
continues where it stopped (``--resume``), and pre-trained models are reused across fine-tunings: their folder is
keyed by dataset + preset + budget + seed + model config hash (``OUT/pretrained/<dataset>/<preset>-seed<k>-<hash>``,
or ``cache_dir``). A stage stopped half-way continues from its own checkpoint (pre-training ``resume.pt``,
fine-tuning's finished folds).

``--plan`` prints every stage with an estimate of its time on this machine, from timing a few real training steps
of the configured model (and image decoding) here, extrapolated to the planned number of steps.

Config file (``configs/*.yaml``; every key is checked — an unknown key or a wrong type is an error naming the key
and the file)::

    name: demo                          # the default output folder is runs/<name>
    description: "…"
    seeds: [0]                          # every method runs once per seed; the folds are seeded by it too
    methods: [supervised, mae, deblurrmae, d2mae]               # Table 2 rows (any name of METHODS)
    ablations: [blur_range, embedding, obs_setting, search_step]  # Table 3 groups (optional)
    device: auto
    cache_dir: null                     # pre-trained models shared between experiments (default OUT/pretrained)
    model: {model: vit_tiny_patch16, img_size: 64, …}       # ModelConfig fields shared by all methods
    budget: {pretrain_epochs: 20 (or pretrain_images: N), pretrain_batch_size: 32,
             finetune_epochs: 16, finetune_batch_size: 32}   # the same for every method
    pretrain: {lr: 1.0e-3, warmup_epochs: 2, …}              # other PretrainConfig fields, shared
    finetune: {blr: 1.0e-2, patience: 6, …}                  # other FinetuneConfig fields, shared
    datasets:
      busbra: {root: …, labels: bus_data.csv, pretrain_data: [images], path_column: ID, …, protocol: csv,
               folds: null, scanner_column: Device}          # real images (labels CSV or class folders)
      phantoms: {phantoms: {n: 360, size: 64, seed: 1}, pretrain_phantoms: {n: 320, …}, protocol: kfold:3}
    report: {title: null, sample_images: 4, obs_images: 2, n_bootstrap: 1000, confidence: 0.95}

String values may use ``${VAR}`` / ``${VAR:-default}`` (environment variables); any value can be overridden on the
command line with ``--set key.sub=value`` (YAML syntax: ``--set seeds=[0,1]``).

Python API::

    cfg = load_experiment("configs/demo.yaml", ["budget.pretrain_epochs=5"])   # + --set style overrides
    plan = make_plan(cfg, "runs/demo")          # every stage, checked (paths, equal budget); nothing runs
    print(format_plan(estimate_plan(plan)))     # with time estimates measured on this machine
    report_md = run_experiment(cfg, "runs/demo", resume=True)

The package's parts: :mod:`d2mae.experiment.config` (methods, ablation groups, the config schema and its loading),
:mod:`d2mae.experiment.plan` (the stages, the equal-budget check, time estimates; a stage is
:mod:`d2mae.experiment.stage`, each dataset's part :mod:`d2mae.experiment.datasets`), :mod:`d2mae.experiment.runner`
(running the stages), :mod:`d2mae.experiment.report` (results, tables, figures, the report) and
:mod:`d2mae.experiment.demo` (the packaged demo). Every public name but the demo's is importable from
``d2mae.experiment`` itself.
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

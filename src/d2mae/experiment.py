"""``d2mae experiment``: every method on every dataset under one protocol and one budget, then one report.

An experiment config (YAML) names the datasets (pre-training images; a labeled downstream set with its column
options and protocol), the methods, the seeds and the compute budget. The command runs, for every dataset and seed,

* the pre-trainings the methods need (:func:`d2mae.pretrain.pretrain`, one per preset, cached and shared),
* one fine-tuning per method (:func:`d2mae.finetune.finetune`, all folds of the protocol) and its evaluation
  (:func:`d2mae.evaluate.evaluate_run`),

and writes ``report.md`` + a self-contained ``report.html`` (:mod:`d2mae.report`) with a Table-2-style comparison,
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

**Caching and resume.** Each stage writes its outputs, then a ``DONE.json`` marker (atomically) holding the hash of
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
"""

from __future__ import annotations

import os
import sys


def _busy_machine() -> bool:
    """Other processes already keep most of this machine's cores busy (1-minute load average)."""
    try:
        return os.getloadavg()[0] >= 0.75 * len(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        return False


if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ and _busy_machine():
    # An experiment is a long CPU job. When other processes already compete for the cores, OpenMP threads that spin
    # while they wait slow torch down 20-60× (measured on 2 cores at load average 6: a ViT-Tiny pre-training step
    # took 4-13 s spinning, 0.2 s passive); on an idle machine spinning is ~2× faster (0.11 s vs 0.21 s). So: passive
    # waiting only when the machine is busy at start. Set before torch is imported; an explicit OMP_WAIT_POLICY wins.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from d2mae.config import build_config, coerce, field_types, load_yaml, to_dict
from d2mae.errors import D2maeError
from d2mae.models import ModelConfig
from d2mae.runtime import atomic_write_json, atomic_write_text

DONE = "DONE.json"
EXPERIMENT_CONFIG = "experiment.yaml"
PLAN_FILE = "plan.json"
SIGNIFICANCE = 0.05

# --------------------------------------------------------------------------------------------------------------------
# methods and ablation groups
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One row of a results table: a pre-training preset (``None``: no pre-training) and a fine-tuning setting.

    Attributes:
        name: the config name (``methods:`` list).
        label: the name shown in tables and figures.
        preset: :data:`d2mae.pretrain.PRESETS` key, or ``None`` for the ViT trained from scratch.
        obs: fine-tuning blur: ``none``, ``fixed:SIGMA`` or ``search`` (:func:`d2mae.obs.parse_obs`).
        search_step: OBS step s (Table 3d).
    """

    name: str
    label: str
    preset: str | None
    obs: str = "none"
    search_step: int = 2

    @property
    def mode(self) -> str:
        return "scratch" if self.preset is None else "full"

    def describe(self) -> str:
        pre = "no pre-training (ViT from scratch)" if self.preset is None else f"pre-training preset {self.preset}"
        if self.preset is None:
            ft = "fine-tuning --mode scratch, no blur"
        elif self.obs == "search":
            ft = f"fine-tuning with OBS (s = {self.search_step})"
        elif self.obs == "none":
            ft = "fine-tuning without blur"
        else:
            ft = f"fine-tuning at fixed σ = {self.obs.split(':', 1)[1]}"
        return f"{pre}; {ft}"


METHODS: dict[str, Method] = {m.name: m for m in (
    # Table 2
    Method("supervised", "ViT (no pre-training)", None, "none"),
    Method("mae", "MAE", "mae", "none"),
    Method("deblurrmae", "DeblurrMAE", "deblurrmae", "fixed:1.1"),
    Method("d2mae", "D²MAE", "d2mae", "search", 2),
    # Table 3a: blur range
    Method("d2mae-range-0.6", "D²MAE σ 0.1→0.6", "range-0.6", "search", 2),
    Method("d2mae-range-1.6", "D²MAE σ 0.1→1.6", "range-1.6", "search", 2),
    # Table 3b: blur embedding
    Method("d2mae-embed-none", "D²MAE w/o blur embedding", "embed-none", "search", 2),
    Method("d2mae-embed-add", "D²MAE blur embedding added", "embed-add", "search", 2),
    # Table 3c: OBS setting (the d2mae pre-trained model)
    Method("d2mae-obs-none", "D²MAE, no blur in fine-tuning", "d2mae", "none"),
    Method("d2mae-obs-fixed-0.5", "D²MAE, fixed σ = 0.5", "d2mae", "fixed:0.5"),
    # Table 3d: search step (the d2mae pre-trained model)
    Method("d2mae-s1", "D²MAE, OBS s = 1", "d2mae", "search", 1),
    Method("d2mae-s3", "D²MAE, OBS s = 3", "d2mae", "search", 3),
)}
TABLE2_METHODS: tuple[str, ...] = ("supervised", "mae", "deblurrmae", "d2mae")


@dataclass(frozen=True)
class AblationGroup:
    """A Table 3 panel: its title and (method, row label) pairs, in the paper's order."""

    name: str
    title: str
    variants: tuple[tuple[str, str], ...]


ABLATIONS: dict[str, AblationGroup] = {g.name: g for g in (
    AblationGroup("blur_range", "(a) Blurriness range", (
        ("d2mae-range-0.6", "0.1 → 0.6"), ("d2mae", "0.1 → 1.1"), ("d2mae-range-1.6", "0.1 → 1.6"))),
    AblationGroup("embedding", "(b) Blurriness embedding", (
        ("d2mae-embed-none", "w/o embedding"), ("d2mae-embed-add", "Addition"), ("d2mae", "Extra token"))),
    AblationGroup("obs_setting", "(c) OBS settings", (
        ("d2mae-obs-none", "No blur"), ("d2mae-obs-fixed-0.5", "Fixed (σ = 0.5)"), ("d2mae", "With OBS"))),
    AblationGroup("search_step", "(d) Search step", (
        ("d2mae-s1", "s = 1"), ("d2mae", "s = 2"), ("d2mae-s3", "s = 3"))),
)}

# --------------------------------------------------------------------------------------------------------------------
# config schema
# --------------------------------------------------------------------------------------------------------------------

#: ModelConfig fields each method's pre-training preset decides (they may not be set in ``model:``).
PRESET_FIELDS = ("blur", "sigma_start", "sigma_stop", "sigma_step", "blur_embed", "loss_on")
_LABEL_OPTIONS = ("path_column", "label_column", "group_column", "split_column", "fold_column", "image_root",
                  "image_ext", "folds_csv", "classes")
_PATH_OPTIONS = ("labels", "image_root", "folds_csv")


@dataclass
class DatasetSpec:
    """One dataset of an experiment (a key under ``datasets:``).

    Either real images — ``labels`` (a labels CSV or a class-per-folder tree) and optionally ``pretrain_data`` —
    or synthetic ones — ``phantoms`` (options of :func:`d2mae.phantom.generate_phantoms`, written into the output
    folder) and optionally ``pretrain_phantoms`` (a second, disjoint phantom set for pre-training). Relative paths
    are taken relative to ``root`` when it is set, else to the current folder.
    """

    root: str | None = field(default=None, metadata={"help": "folder the other relative paths start from"})
    labels: str | None = field(default=None, metadata={"help": "labels CSV or class-per-folder tree"})
    pretrain_data: list[str] | None = field(default=None, metadata={
        "help": "pre-training images: folders, files, .csv/.txt lists (default: the labeled images)"})
    path_column: str = "path"
    label_column: str = "label"
    group_column: str | None = None
    split_column: str | None = None
    fold_column: str | None = None
    image_root: str | None = None
    image_ext: str = ""
    folds_csv: str | None = None
    classes: list[str] | None = None
    protocol: str = field(default="kfold:5", metadata={"help": "split:3:1:1, kfold:5, csv or holdout:FILE"})
    folds: list[str] | None = field(default=None, metadata={"help": "run only these folds (e.g. a smoke run)"})
    scanner_column: str | None = field(default=None, metadata={
        "help": "labels column naming the scanner/device (σ* histogram per scanner)"})
    name: str = ""
    phantoms: dict[str, Any] | None = None
    pretrain_phantoms: dict[str, Any] | None = None


@dataclass
class BudgetSpec:
    """The compute budget every method gets (the equal-budget rule): set once, here, never per method."""

    pretrain_epochs: int | None = field(default=None, metadata={"help": "pre-training epochs (or pretrain_images)"})
    pretrain_images: int | None = field(default=None, metadata={
        "help": "pre-training budget as images seen (instead of epochs)"})
    pretrain_batch_size: int = 64
    finetune_epochs: int = 50
    finetune_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.pretrain_epochs is not None and self.pretrain_images is not None:
            raise D2maeError("budget: give pretrain_epochs or pretrain_images, not both")
        if self.pretrain_epochs is None and self.pretrain_images is None:
            self.pretrain_epochs = 400
        for name in ("pretrain_epochs", "pretrain_images", "pretrain_batch_size", "finetune_epochs",
                     "finetune_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise D2maeError(f"budget.{name} must be ≥ 1, got {value}")


@dataclass
class ReportSpec:
    """What the report shows."""

    title: str | None = None
    sample_images: int = field(default=4, metadata={"help": "images in the reconstruction figures"})
    obs_images: int = field(default=2, metadata={"help": "images in the OBS strip figure (Figure 3a)"})
    n_bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for pooled CIs (evaluate)"})
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.sample_images < 0 or self.obs_images < 0:
            raise D2maeError("report.sample_images and report.obs_images must be ≥ 0")
        if not 0 < self.confidence < 1:
            raise D2maeError(f"report.confidence must be between 0 and 1, got {self.confidence}")
        if self.n_bootstrap < 1:
            raise D2maeError(f"report.n_bootstrap must be ≥ 1, got {self.n_bootstrap}")


@dataclass
class _TopLevel:
    """The scalar top-level keys of an experiment file (sections are checked separately)."""

    name: str = "experiment"
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: list(TABLE2_METHODS))
    ablations: list[str] = field(default_factory=list)
    device: str = "auto"
    cache_dir: str | None = None


@dataclass
class ExperimentConfig:
    """A parsed, checked experiment config (:func:`load_experiment`)."""

    name: str
    description: str
    seeds: list[int]
    methods: list[str]
    ablations: list[str]
    device: str
    cache_dir: str | None
    model: dict[str, Any]
    budget: BudgetSpec
    pretrain: dict[str, Any]
    finetune: dict[str, Any]
    datasets: dict[str, DatasetSpec]
    report: ReportSpec
    source: str = "config"

    def runs(self) -> list[Method]:
        """Every method to fine-tune: the ``methods`` list, then the ablation groups' variants (no repeats)."""
        names: list[str] = []
        for name in self.methods:
            if name not in names:
                names.append(name)
        for group in self.ablations:
            for name, _ in ABLATIONS[group].variants:
                if name not in names:
                    names.append(name)
        return [METHODS[n] for n in names]

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (saved as ``experiment.yaml`` beside the report)."""
        datasets = {}
        for name, ds in self.datasets.items():
            d = {k: v for k, v in dataclasses.asdict(ds).items() if k != "name" and v not in (None, "", [])}
            datasets[name] = d
        return {"name": self.name, "description": self.description, "seeds": list(self.seeds),
                "methods": list(self.methods), "ablations": list(self.ablations), "device": self.device,
                "cache_dir": self.cache_dir, "model": dict(self.model), "budget": dataclasses.asdict(self.budget),
                "pretrain": dict(self.pretrain), "finetune": dict(self.finetune), "datasets": datasets,
                "report": dataclasses.asdict(self.report)}


_TOP_SECTIONS = ("model", "budget", "pretrain", "finetune", "datasets", "report")

# pre-training options an experiment decides itself, with what to do instead
_PRETRAIN_FORBIDDEN = {
    "epochs": "set the pre-training budget under budget: (pretrain_epochs or pretrain_images) — the same for every "
              "method",
    "max_steps": "set the pre-training budget under budget: (pretrain_images) — the same for every method",
    "batch_size": "set budget.pretrain_batch_size — the same for every method",
    "data": "the pre-training images come from datasets.<name>.pretrain_data (or the labeled images)",
    "out": "the experiment chooses the output folders (--out, cache_dir)",
    "preset": "each method has its own preset; choose methods: / ablations: instead",
    "config": "put the options in this file",
    "seed": "list the seeds under seeds:",
    "resume": "use d2mae experiment --resume",
    "device": "set device: at the top level",
}
_FINETUNE_FORBIDDEN = {
    "epochs": "set budget.finetune_epochs — the same for every method",
    "batch_size": "set budget.finetune_batch_size — the same for every method",
    "pretrained": "the experiment passes each method's pre-trained model",
    "obs": "each method has its own OBS setting; choose methods: / ablations: instead",
    "search_step": "each method has its own search step; use ablations: [search_step]",
    "obs_table": "the experiment runs OBS itself",
    "mode": "each method has its own mode (supervised = scratch)",
    "method": "the experiment names the methods",
    "seed": "list the seeds under seeds:",
    "out": "the experiment chooses the output folders (--out)",
    "resume": "use d2mae experiment --resume",
    "device": "set device: at the top level",
    "config": "put the options in this file",
    "labels": "set datasets.<name>.labels",
    "protocol": "set datasets.<name>.protocol",
    "folds": "set datasets.<name>.folds",
    "keep_columns": "set datasets.<name>.scanner_column",
    "arch": "set model.model",
    "img_size": "set model.img_size",
    "in_chans": "set model.in_chans",
    **{k: f"set datasets.<name>.{k}" for k in _LABEL_OPTIONS},
}


def _section(data: Mapping[str, Any], key: str, source: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise D2maeError(f"section '{key}' in {source} must be a mapping of option: value, not "
                         f"{type(value).__name__}")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def _refuse(section: Mapping[str, Any], forbidden: Mapping[str, str], where: str, source: str) -> None:
    for key in section:
        if key in forbidden:
            raise D2maeError(f"option '{where}.{key}' in {source} is not allowed: {forbidden[key]}")


def _check_section_types(cls: type, section: Mapping[str, Any], where: str, source: str) -> None:
    """Unknown keys and wrong types of a section whose keys are fields of ``cls`` (no ``__post_init__`` run)."""
    types_ = field_types(cls)
    for key, value in section.items():
        if key not in types_:
            close = [k for k in types_ if k.split("_")[0] == key.split("_")[0]]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise D2maeError(f"unknown option '{where}.{key}' in {source}{hint}")
        coerce(value, types_[key], f"{where}.{key}", source)


def _build(cls: type, where: str, source: str, *layers: tuple[Mapping[str, Any] | None, str]) -> Any:
    """:func:`d2mae.config.build_config`, with the file and section named in value errors of ``__post_init__``."""
    try:
        return build_config(cls, *layers)
    except D2maeError as exc:
        if source in str(exc):
            raise
        raise D2maeError(f"{source}, section {where}: {exc}") from None


def parse_experiment(data: Mapping[str, Any], source: str = "config") -> ExperimentConfig:
    """Check and parse an experiment mapping (the YAML file's content); errors name the key and ``source``."""
    from d2mae.labels import parse_protocol
    from d2mae.pretrain import MODEL_FIELDS, PRESETS, PretrainConfig

    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    top = {k: v for k, v in data.items() if k not in _TOP_SECTIONS}
    unknown = [k for k in top if k not in field_types(_TopLevel)]
    if unknown:
        known = ", ".join(list(field_types(_TopLevel)) + list(_TOP_SECTIONS))
        raise D2maeError(f"unknown option '{unknown[0]}' in {source}; known top-level options: {known}")
    flat = build_config(_TopLevel, (top, source))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", flat.name):
        raise D2maeError(f"option 'name' in {source} must be letters, digits, '-', '_' or '.', got {flat.name!r}")
    if not flat.seeds or len(set(flat.seeds)) != len(flat.seeds) or min(flat.seeds) < 0:
        raise D2maeError(f"option 'seeds' in {source} must list distinct seeds ≥ 0, got {flat.seeds}")
    for m in flat.methods:
        if m not in METHODS:
            raise D2maeError(f"option 'methods' in {source}: unknown method '{m}'; choose from {', '.join(METHODS)}")
    for g in flat.ablations:
        if g not in ABLATIONS:
            raise D2maeError(f"option 'ablations' in {source}: unknown group '{g}'; choose from "
                             f"{', '.join(ABLATIONS)}")
    if not flat.methods and not flat.ablations:
        raise D2maeError(f"{source}: no methods and no ablations to run; list some under methods:")

    model = _section(data, "model", source)
    for key in model:
        if key in PRESET_FIELDS:
            raise D2maeError(f"option 'model.{key}' in {source} is not allowed: each method's pre-training preset "
                             f"sets it ({', '.join(f'{p}: {PRESETS[p].get(key)}' for p in ('d2mae', 'mae'))}…); "
                             "choose methods/ablations instead")
    _check_section_types(ModelConfig, model, "model", source)
    _build(ModelConfig, "model", source, (model, f"{source}, section model"))  # value checks (sizes, heads, …)

    budget_data = _section(data, "budget", source)
    _check_section_types(BudgetSpec, budget_data, "budget", source)
    budget = _build(BudgetSpec, "budget", source, (budget_data, f"{source}, section budget"))

    pretrain = _section(data, "pretrain", source)
    _refuse(pretrain, _PRETRAIN_FORBIDDEN, "pretrain", source)
    for key in pretrain:
        if key in MODEL_FIELDS:
            raise D2maeError(f"option 'pretrain.{key}' in {source} is not allowed: architecture options go under "
                             "model: (shared by pre-training and fine-tuning)")
    _check_section_types(PretrainConfig, pretrain, "pretrain", source)

    from d2mae.finetune import FinetuneConfig

    finetune = _section(data, "finetune", source)
    _refuse(finetune, _FINETUNE_FORBIDDEN, "finetune", source)
    _check_section_types(FinetuneConfig, finetune, "finetune", source)

    report_data = _section(data, "report", source)
    _check_section_types(ReportSpec, report_data, "report", source)
    report = _build(ReportSpec, "report", source, (report_data, f"{source}, section report"))

    raw_datasets = data.get("datasets")
    if not isinstance(raw_datasets, Mapping) or not raw_datasets:
        raise D2maeError(f"{source}: section 'datasets' is missing or empty; name at least one dataset "
                         "(labels: FILE or phantoms: {n: ...})")
    datasets: dict[str, DatasetSpec] = {}
    for ds_name, ds_data in raw_datasets.items():
        ds_name = str(ds_name)
        where = f"datasets.{ds_name}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", ds_name):
            raise D2maeError(f"dataset name '{ds_name}' in {source} must be letters, digits, '-', '_' or '.'")
        if not isinstance(ds_data, Mapping):
            raise D2maeError(f"'{where}' in {source} must be a mapping (labels:, protocol:, …)")
        ds_data = {str(k).replace("-", "_"): v for k, v in ds_data.items()}
        if "name" in ds_data:
            raise D2maeError(f"option '{where}.name' in {source} is not allowed: the key is the dataset's name")
        phantoms = {}
        for key in ("phantoms", "pretrain_phantoms"):
            value = ds_data.pop(key, None)
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise D2maeError(f"option '{where}.{key}' in {source} must be a mapping (n:, size:, seed:, …)")
            phantoms[key] = _check_phantoms(dict(value), f"{where}.{key}", source)
        _check_section_types(DatasetSpec, ds_data, where, source)
        spec = _build(DatasetSpec, where, source, (ds_data, f"{source}, section {where}"))
        spec.name = ds_name
        spec.phantoms = phantoms.get("phantoms")
        spec.pretrain_phantoms = phantoms.get("pretrain_phantoms")
        if (spec.labels is None) == (spec.phantoms is None):
            raise D2maeError(f"'{where}' in {source} needs exactly one of labels: (real images) or phantoms: "
                             "(synthetic images generated into the output folder)")
        if spec.pretrain_phantoms is not None and spec.pretrain_data is not None:
            raise D2maeError(f"'{where}' in {source}: give pretrain_data or pretrain_phantoms, not both")
        if spec.phantoms is not None:
            spec.scanner_column = spec.scanner_column or "scanner"
        try:
            kind, params = parse_protocol(spec.protocol)
        except D2maeError as exc:
            raise D2maeError(f"option '{where}.protocol' in {source}: {exc}") from None
        _check_protocol(kind, params, f"option '{where}.protocol' in {source}")
        _resolve_paths(spec, where, source)
        datasets[ds_name] = spec
    return ExperimentConfig(flat.name, flat.description, list(flat.seeds), list(flat.methods), list(flat.ablations),
                            flat.device, _abspath(flat.cache_dir) if flat.cache_dir else None, model, budget,
                            pretrain, finetune, datasets, report, source)


def _check_protocol(kind: str, params: list[str], where: str) -> None:
    """The protocol's parameters, checked before anything runs (the folds themselves are made by d2mae.labels)."""
    if kind == "kfold" and (len(params) != 1 or not params[0].isdigit() or int(params[0]) < 2):
        raise D2maeError(f"{where}: use kfold:K with an integer K ≥ 2 (e.g. kfold:5)")
    if kind == "split":
        try:
            ok = len(params) == 3 and all(float(p) > 0 for p in params)
        except ValueError:
            ok = False
        if not ok:
            raise D2maeError(f"{where}: use split:TRAIN:VAL:TEST with three positive numbers (e.g. split:3:1:1)")
    if kind == "holdout" and not (params and params[0]):
        raise D2maeError(f"{where}: use holdout:FILE with the list of test images")


def _check_phantoms(value: dict[str, Any], where: str, source: str) -> dict[str, Any]:
    """Phantom options (:class:`d2mae.phantom.PhantomConfig` without ``out``), checked and with defaults filled."""
    from d2mae.phantom import PhantomConfig

    value = {str(k).replace("-", "_"): v for k, v in value.items()}
    if "out" in value:
        raise D2maeError(f"option '{where}.out' in {source} is not allowed: phantoms are written into the "
                         "experiment's output folder")
    _check_section_types(PhantomConfig, value, where, source)
    cfg = _build(PhantomConfig, where, source, (value, f"{source}, section {where}"))
    out = to_dict(cfg)
    out.pop("out")
    return out


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _resolve_paths(spec: DatasetSpec, where: str, source: str) -> None:
    """Make relative paths absolute: against ``root`` when set (itself against the current folder)."""
    base = Path(_abspath(spec.root)) if spec.root else Path.cwd()
    if spec.root:
        spec.root = str(base)
    for key in _PATH_OPTIONS:
        value = getattr(spec, key)
        if value:
            setattr(spec, key, str(base / os.path.expanduser(value)))
    if spec.pretrain_data:
        spec.pretrain_data = [str(base / os.path.expanduser(p)) for p in spec.pretrain_data]


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(data: Any, source: str, where: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in string values by environment variables (recursively)."""
    if isinstance(data, Mapping):
        return {k: expand_env(v, source, f"{where}.{k}" if where else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, source, where) for v in data]
    if isinstance(data, str) and "${" in data:
        def repl(m: re.Match) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                if m.group(2) is None:
                    raise D2maeError(f"option '{where}' in {source} uses ${{{m.group(1)}}} but the environment "
                                     f"variable {m.group(1)} is not set; set it or write ${{{m.group(1)}:-default}}")
                return m.group(2)
            return value
        return _ENV.sub(repl, data)
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``--set key.sub=value`` overrides (values parsed as YAML: numbers, lists, true/false)."""
    data = json.loads(json.dumps(data, default=str))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise D2maeError(f"option --set {item!r}: use --set KEY=VALUE, e.g. "
                             "--set datasets.busbra.root=/data/bus-bra")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise D2maeError(f"option --set {item!r}: the key is empty")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict) and not raw.strip().startswith("{"):
            value = raw  # "a: b" in free text is a string, not a mapping
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise D2maeError(f"option --set {item!r}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML file, apply ``--set`` overrides and ``${ENV}`` variables, check everything."""
    data = load_yaml(path)
    source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        given = " ".join(overrides)
        source = f"{path} (with --set {given})" if len(given) <= 100 else f"{path} (with {len(overrides)} --set values)"
    return parse_experiment(expand_env(data, source), source)


# --------------------------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------------------------


def config_hash(obj: Any) -> str:
    """sha256 of a config as canonical JSON: the identity of a stage's work."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _refs_digest(refs: Sequence[str]) -> str:
    """Identity of a list of image files: paths and sizes (cheap to compute for thousands of files)."""
    h = hashlib.sha256()
    for r in refs:
        path = r.split("#", 1)[0]
        try:
            size = os.path.getsize(path)
        except OSError:
            size = -1
        h.update(f"{r}\t{size}\n".encode("utf-8"))
    return h.hexdigest()


@dataclass
class Stage:
    """One unit of work with its own folder and DONE marker.

    ``kind``: ``data`` (generate phantoms / list images), ``arch`` (the untrained ViT of the supervised floor),
    ``pretrain``, ``finetune`` (fine-tuning on every fold + evaluation).
    """

    kind: str
    dataset: str
    label: str
    folder: Path
    key: str
    payload: Any
    seed: int | None = None
    method: str | None = None
    preset: str | None = None
    needs: list[str] = field(default_factory=list)
    estimate_s: float = math.nan

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.dataset}:{self.folder.name}"

    def done_info(self) -> dict[str, Any] | None:
        """The DONE marker's content when this stage finished with the same config, else ``None``."""
        path = self.folder / DONE
        if not path.is_file():
            return None
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return info if isinstance(info, dict) and info.get("key") == self.key else None


@dataclass
class DatasetPlan:
    """What a dataset contributes to the plan: sizes (known or, for phantoms, planned) and derived paths."""

    name: str
    spec: DatasetSpec
    labels: str
    pretrain_data: list[str]
    n_pretrain: int
    n_labeled: int
    num_classes: int
    folds: list[tuple[str, int, int, int]]  # (name, n_train, n_val, n_test) per fold
    data_key: str
    overlap: str = ""


@dataclass
class Plan:
    """Every stage of an experiment in run order, with the datasets' sizes."""

    config: ExperimentConfig
    out: Path
    datasets: dict[str, DatasetPlan]
    stages: list[Stage]
    estimated: bool = False
    speed: dict[str, Any] = field(default_factory=dict)

    def of(self, kind: str, dataset: str | None = None) -> list[Stage]:
        return [s for s in self.stages if s.kind == kind and (dataset is None or s.dataset == dataset)]

    def run_stage(self, dataset: str, method: str, seed: int) -> Stage | None:
        for s in self.of("finetune", dataset):
            if s.method == method and s.seed == seed:
                return s
        return None


def _approx_folds(n: int, protocol: str, folds: list[str] | None) -> list[tuple[str, int, int, int]]:
    """Fold sizes before the labels exist (phantoms): proportions of the protocol."""
    kind = protocol.split(":")[0].lower()
    if kind == "kfold":
        k = int(protocol.split(":")[1])
        test = n // k
        val = (n - test) // max(2, k - 1)
        out = [(str(i + 1), n - test - val, val, test) for i in range(k)]
    elif kind == "split":
        a, b, c = (float(x) for x in protocol.split(":")[1:4])
        test, val = round(n * c / (a + b + c)), round(n * b / (a + b + c))
        out = [("1", n - test - val, val, test)]
    else:
        out = [("1", int(n * 0.6), int(n * 0.2), n - int(n * 0.6) - int(n * 0.2))]
    if folds:
        out = [f for f in out if f[0] in folds] or out[:1]
    return out


def _check_path(path: str, key: str, source: str, dataset: DatasetSpec, what: str = "path") -> None:
    if not os.path.exists(path):
        hint = (f"fill in the path in the config or pass --set datasets.{dataset.name}.{key}=PATH "
                "(relative paths start from datasets.<name>.root, or from the current folder)")
        raise D2maeError(f"option 'datasets.{dataset.name}.{key}' in {source}: {what} {path} does not exist; {hint}")


def _dataset_plan(spec: DatasetSpec, out: Path, source: str, seed: int) -> DatasetPlan:
    """Sizes, folds and data identity of one dataset; real paths are checked here (clear errors)."""
    from d2mae.data import find_images
    from d2mae.labels import load_labeled, make_folds

    data_dir = out / "data" / spec.name
    if spec.phantoms is not None:
        labels = str(data_dir / "labeled" / "labels.csv")
        n_labeled = int(spec.phantoms["n"])
        num_classes = 2
        folds = _approx_folds(n_labeled, spec.protocol, spec.folds)
        if spec.pretrain_phantoms is not None:
            pretrain_data = [str(data_dir / "pretrain" / "images")]
            n_pretrain = int(spec.pretrain_phantoms["n"])
        elif spec.pretrain_data:
            for p in spec.pretrain_data:
                _check_path(p, "pretrain_data", source, spec)
            refs = find_images(spec.pretrain_data)
            pretrain_data, n_pretrain = list(spec.pretrain_data), len(refs)
        else:
            pretrain_data, n_pretrain = [str(data_dir / "labeled" / "images")], n_labeled
        data_key = config_hash({"phantoms": spec.phantoms, "pretrain_phantoms": spec.pretrain_phantoms,
                                "pretrain_data": pretrain_data})
        overlap = "" if spec.pretrain_phantoms is not None or spec.pretrain_data else (
            "pre-training used the labeled phantoms' pixels (not their labels), test images included")
        return DatasetPlan(spec.name, spec, labels, pretrain_data, n_pretrain, n_labeled, num_classes, folds,
                           data_key, overlap)
    if spec.root:
        _check_path(spec.root, "root", source, spec, "folder")
    _check_path(spec.labels or "", "labels", source, spec, "labels file")
    for key in ("image_root", "folds_csv"):
        if getattr(spec, key):
            _check_path(getattr(spec, key), key, source, spec)
    try:
        labeled = load_labeled(spec.labels, **{k: getattr(spec, k) for k in _LABEL_OPTIONS})
        fold_list = make_folds(labeled, spec.protocol, seed, spec.folds)
    except D2maeError as exc:
        raise D2maeError(f"dataset '{spec.name}' in {source}: {exc}") from None
    if spec.scanner_column and spec.scanner_column not in labeled.columns:
        raise D2maeError(f"option 'datasets.{spec.name}.scanner_column' in {source}: {spec.labels} has no column "
                         f"'{spec.scanner_column}'; its columns are: {', '.join(labeled.columns)}")
    folds = [(f.name, len(f.train), len(f.val), len(f.test)) for f in fold_list]
    if spec.pretrain_data:
        for p in spec.pretrain_data:
            _check_path(p, "pretrain_data", source, spec)
        try:
            pre_refs = find_images(spec.pretrain_data)
        except D2maeError as exc:
            raise D2maeError(f"option 'datasets.{spec.name}.pretrain_data' in {source}: {exc}") from None
        pretrain_data = list(spec.pretrain_data)
    else:
        pre_refs = list(labeled.refs)
        pretrain_data = [str(data_dir / "pretrain_images.txt")]
    shared = len(set(pre_refs) & set(labeled.refs))
    overlap = ""
    if shared:
        overlap = (f"{shared} of the {len(labeled.refs)} labeled images (test images of some fold included) were "
                   "also pre-training images: pre-training saw their pixels, never their labels")
    data_key = config_hash({"pretrain": _refs_digest(pre_refs), "labeled": _refs_digest(labeled.refs)})
    return DatasetPlan(spec.name, spec, str(spec.labels), pretrain_data, len(pre_refs), len(labeled),
                       len(labeled.classes), folds, data_key, overlap)


# Fields of the stage configs that do not change results (left out of the cache keys).
_PRETRAIN_VOLATILE = ("out", "resume", "device", "num_workers", "log_every_steps", "save_every_epochs",
                      "checkpoint_every_steps", "data_path", "compile", "config", "skip_bad")
_FINETUNE_VOLATILE = ("out", "resume", "device", "workers", "progress", "eval_batch_size", "obs_batch_size",
                      "pretrained", "skip_bad")


def pretrain_budget(budget: BudgetSpec, n_images: int, accum_iter: int = 1) -> tuple[int, int | None, int]:
    """(epochs, max_steps, optimizer steps) of a pre-training on ``n_images`` images under ``budget``.

    An optimizer step takes ``batch × accum_iter`` images (the effective batch); each epoch uses the whole
    effective batches that fit (drop-last, as :class:`d2mae.distributed.EpochBatchSampler`).
    """
    batch = budget.pretrain_batch_size * max(1, accum_iter)
    steps_per_epoch = n_images // batch
    if budget.pretrain_images is None:
        epochs = int(budget.pretrain_epochs or 1)
        return epochs, None, epochs * steps_per_epoch
    steps = max(1, math.ceil(budget.pretrain_images / batch))
    return max(1, math.ceil(steps / max(1, steps_per_epoch))), steps, steps


def make_plan(cfg: ExperimentConfig, out: str | Path) -> Plan:
    """Every stage of the experiment, in run order, with resolved configs and cache keys (nothing is run).

    Raises:
        D2maeError: a missing dataset path, a bad column/protocol, or a violated equal-budget rule.
    """
    from d2mae.finetune import FinetuneConfig
    from d2mae.pretrain import PRESETS, PretrainConfig

    out = Path(out).absolute()
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "pretrained"
    runs = cfg.runs()
    presets = []
    for m in runs:
        if m.preset is not None and m.preset not in presets:
            presets.append(m.preset)
    datasets: dict[str, DatasetPlan] = {}
    stages: list[Stage] = []
    for name, spec in cfg.datasets.items():
        dp = _dataset_plan(spec, out, cfg.source, cfg.seeds[0])
        datasets[name] = dp
        data_dir = out / "data" / name
        if spec.phantoms is not None:
            stages.append(Stage("data", name, f"generate {spec.phantoms['n']} labeled phantoms ({name})",
                                data_dir / "labeled", config_hash(spec.phantoms), dict(spec.phantoms)))
            if spec.pretrain_phantoms is not None:
                stages.append(Stage("data", name, f"generate {spec.pretrain_phantoms['n']} pre-training phantoms "
                                                  f"({name})", data_dir / "pretrain",
                                    config_hash(spec.pretrain_phantoms), dict(spec.pretrain_phantoms)))
        elif not spec.pretrain_data:
            stages.append(Stage("data", name, f"list the {dp.n_labeled} labeled images for pre-training ({name})",
                                data_dir, dp.data_key, {"list": dp.pretrain_data[0]}))
        accum = int(cfg.pretrain.get("accum_iter", 1))
        epochs, max_steps, _ = pretrain_budget(cfg.budget, dp.n_pretrain, accum)
        if dp.n_pretrain < cfg.budget.pretrain_batch_size * accum and presets:
            raise D2maeError(f"dataset '{name}' in {cfg.source}: {dp.n_pretrain} pre-training images are fewer "
                             f"than one optimizer step needs (budget.pretrain_batch_size "
                             f"{cfg.budget.pretrain_batch_size} × accum_iter {accum}); lower the batch size or add "
                             "images")
        pre_by: dict[tuple[str, int], Stage] = {}
        arch_stage: Stage | None = None
        if any(m.preset is None for m in runs):
            arch_cfg = build_config(ModelConfig, (PRESETS["mae"], "preset mae"),
                                    (cfg.model, f"{cfg.source}, section model"))
            arch_key = config_hash({"data": dp.data_key, "model": arch_cfg.to_dict(), "stats_seed": 0})
            arch_stage = Stage("arch", name, f"untrained ViT for the supervised floor ({name})",
                               cache / name / f"scratch-vit-{arch_key[:12]}", arch_key,
                               {"model": arch_cfg, "data": dp.pretrain_data})
            stages.append(arch_stage)
        for seed in cfg.seeds:
            for preset in presets:
                pcfg = _build(
                    PretrainConfig, "pretrain", cfg.source,
                    ({**PRESETS[preset], "preset": preset}, f"preset '{preset}'"),
                    (cfg.model, f"{cfg.source}, section model"), (cfg.pretrain, f"{cfg.source}, section pretrain"),
                    ({"data": dp.pretrain_data, "out": "-", "seed": seed, "epochs": epochs, "max_steps": max_steps,
                      "batch_size": cfg.budget.pretrain_batch_size, "device": cfg.device, "resume": "auto"},
                     "the experiment"))
                key = config_hash({"dataset": name, "data": dp.data_key,
                                   "pretrain": {k: v for k, v in to_dict(pcfg).items() if k not in _PRETRAIN_VOLATILE}})
                folder = cache / name / f"{preset}-seed{seed}-{key[:12]}"
                pcfg = dataclasses.replace(pcfg, out=str(folder))
                stage = Stage("pretrain", name, f"pre-train {preset} on {name} (seed {seed})", folder, key, pcfg,
                              seed=seed, preset=preset)
                pre_by[(preset, seed)] = stage
                stages.append(stage)
        for seed in cfg.seeds:
            for m in runs:
                base = pre_by[(m.preset, seed)] if m.preset is not None else arch_stage
                assert base is not None
                options = {k: getattr(spec, k) for k in _LABEL_OPTIONS}
                options.update(labels=dp.labels, protocol=spec.protocol,
                               folds=",".join(spec.folds) if spec.folds else None,
                               keep_columns=[spec.scanner_column] if spec.scanner_column else None)
                fcfg = _build(
                    FinetuneConfig, "finetune", cfg.source, (cfg.finetune, f"{cfg.source}, section finetune"),
                    (options, f"{cfg.source}, section datasets.{name}"),
                    ({"pretrained": str(base.folder), "out": "-", "obs": m.obs, "search_step": m.search_step,
                      "mode": m.mode, "method": m.name, "seed": seed, "epochs": cfg.budget.finetune_epochs,
                      "batch_size": cfg.budget.finetune_batch_size, "device": cfg.device, "resume": True,
                      "arch": cfg.model.get("model", "vit_base_patch16"),
                      "img_size": int(cfg.model.get("img_size", 224)), "in_chans": int(cfg.model.get("in_chans", 1))},
                     f"method {m.name}"))
                key = config_hash({"dataset": name, "data": dp.data_key, "base": base.key,
                                   "finetune": {k: v for k, v in to_dict(fcfg).items() if k not in _FINETUNE_VOLATILE}})
                folder = out / "runs" / name / f"{m.name}-seed{seed}-{key[:8]}"
                fcfg = dataclasses.replace(fcfg, out=str(folder))
                stages.append(Stage("finetune", name, f"fine-tune {m.name} on {name} (seed {seed})", folder, key,
                                    fcfg, seed=seed, method=m.name, preset=m.preset, needs=[base.id]))
    plan = Plan(cfg, out, datasets, stages)
    check_equal_budget(plan)
    return plan


def check_equal_budget(plan: Plan) -> None:
    """The equal-budget rule: per dataset, every method's pre-training and fine-tuning differ only where the method
    itself differs (preset; OBS setting; scratch vs pre-trained; the seed).

    Pre-trainings must agree on every option but the preset's own model fields (:data:`PRESET_FIELDS`), ``preset``
    and ``seed`` — the same data, epochs/steps, batch size, learning-rate recipe and architecture. Fine-tunings must
    agree on every option but ``obs``, ``search_step``, ``mode``, ``method``, ``pretrained`` and ``seed`` — the same
    labels, protocol and folds, epochs, batch size and recipe. Fine-tunings of the same seed share the fold seed, so
    they see the same folds.

    Raises:
        D2maeError: naming the dataset, the two stages and the first option that differs.
    """
    pre_skip = set(PRESET_FIELDS) | {"preset", "seed", "out", "resume"}
    ft_skip = {"obs", "search_step", "mode", "method", "pretrained", "seed", "out", "resume"}
    arch_fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in PRESET_FIELDS + ("mean", "std")]
    for name in plan.datasets:
        groups = [(plan.of("pretrain", name), pre_skip, "pre-training"),
                  (plan.of("finetune", name), ft_skip, "fine-tuning")]
        for stages, skip, what in groups:
            if len(stages) < 2:
                continue
            ref = stages[0]
            ref_d = {k: v for k, v in to_dict(ref.payload).items() if k not in skip}
            for s in stages[1:]:
                d = {k: v for k, v in to_dict(s.payload).items() if k not in skip}
                for k in sorted(set(ref_d) | set(d)):
                    if ref_d.get(k) != d.get(k):
                        raise D2maeError(
                            f"equal-budget rule broken on dataset '{name}': the {what} of '{s.label}' differs from "
                            f"'{ref.label}' in {k} ({d.get(k)!r} vs {ref_d.get(k)!r}); every method must get the "
                            "same budget, recipe and folds")
        models = [(s.label, s.payload["model"]) for s in plan.of("arch", name)]
        models += [(s.label, s.payload.model_config()) for s in plan.of("pretrain", name)]
        for label, mc in models[1:]:
            for k in arch_fields:
                if getattr(mc, k) != getattr(models[0][1], k):
                    raise D2maeError(f"equal-budget rule broken on dataset '{name}': the architecture of '{label}' "
                                     f"differs from '{models[0][0]}' in {k} ({getattr(mc, k)!r} vs "
                                     f"{getattr(models[0][1], k)!r})")


# --------------------------------------------------------------------------------------------------------------------
# time estimates: a few real steps on this machine, extrapolated
# --------------------------------------------------------------------------------------------------------------------


def _time_steps(step: Callable[[], None], max_steps: int = 3, max_seconds: float = 4.0) -> float:
    """Seconds per call of ``step``: one warm-up call, then up to ``max_steps`` timed calls."""
    step()
    times = []
    start = time.perf_counter()
    while len(times) < max_steps and (not times or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_speed(model_cfg: ModelConfig, device: str, pretrain_batch: int, finetune_batch: int,
                  num_classes: int, sample_refs: Sequence[str], augment: str = "finetune") -> dict[str, float]:
    """Seconds per image of each kind of work, timed here on the configured model (not a guess).

    Times one pre-training step (forward, backward, AdamW) of the D²MAE model, one fine-tuning step of the
    classifier, inference, one OBS forward pass per level, and decoding/augmenting a few of the dataset's images.
    Steps run at the configured batch sizes when that is cheap (per-image cost falls with the batch on a CPU), and
    at fewer images for big models, so that a ViT-B at 224 px takes seconds, not minutes, to time.
    """
    import torch

    from d2mae.data import ImageDataset
    from d2mae.models import DeblurClassifier, DeblurMAE
    from d2mae.runtime import resolve_device

    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    # per-image work of one encoder pass ~ width² × tokens × blocks; ~1.1e9 ≈ a batch of 64 ViT-Tiny images at 96 px
    work = model_cfg.dim ** 2 * (model_cfg.num_patches + 2) * model_cfg.blocks
    cap = max(4, int(1.1e9 // max(1, work)))
    bp = max(1, min(pretrain_batch, cap))
    bf = max(1, min(finetune_batch, cap))
    c, s = model_cfg.in_chans, model_cfg.img_size
    torch.manual_seed(0)
    mae = DeblurMAE(model_cfg).to(dev)
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-4)
    x = torch.rand(bp, c, s, s, generator=gen).to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def pre_step() -> None:
        loss, _, _ = mae(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    out["pretrain_step"] = _time_steps(pre_step) / bp
    t = torch.ones(bp, device=dev)

    def obs_step() -> None:
        with torch.no_grad():
            mae.deblur_loss(x, t)
        sync()

    out["obs_level"] = _time_steps(obs_step) / bp
    del mae, opt
    clf = DeblurClassifier(model_cfg, num_classes, drop_path_rate=0.1).to(dev)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-4)
    xf = torch.rand(bf, c, s, s, generator=gen).to(dev)
    y = torch.zeros(bf, dtype=torch.long, device=dev)
    tf = torch.ones(bf, device=dev)

    def ft_step() -> None:
        loss = torch.nn.functional.cross_entropy(clf(xf, tf), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    out["finetune_step"] = _time_steps(ft_step) / bf

    def eval_step() -> None:
        with torch.no_grad():
            clf.eval()
            clf(xf, tf)
            clf.train()
        sync()

    out["eval"] = _time_steps(eval_step) / bf
    del clf, opt
    refs = list(sample_refs)[:6]
    out["decode"] = out["augment"] = 0.0
    if refs:
        for name, mode in (("decode", "none"), ("augment", augment)):
            ds = ImageDataset(refs, s, c, augment=mode)
            t0 = time.perf_counter()
            for i in range(len(refs)):
                ds[i]
            out[name] = (time.perf_counter() - t0) / len(refs)
    out["device"] = str(dev)  # type: ignore[assignment]
    return out


def _finetune_estimate(fcfg: Any, dp: DatasetPlan, speed: Mapping[str, float], levels: int) -> float:
    """Seconds of one fine-tuning run: OBS once, then per fold every epoch (train + validation), then predictions."""
    total = 0.0
    used = sum(tr + va + te for _, tr, va, te in dp.folds[:1]) if dp.folds else dp.n_labeled
    if fcfg.mode != "scratch" and fcfg.obs == "search":
        total += used * (levels * speed["obs_level"] + speed["decode"])
    infer = speed["eval"] + speed["decode"]
    for _, n_train, n_val, n_test in dp.folds:
        total += fcfg.epochs * (n_train * (speed["finetune_step"] + speed["augment"]) + n_val * infer)
        total += (n_val + n_test) * infer + 3.0  # best model's predictions, saving the fold
    return total + 8.0  # labels, content hashes, evaluation (bootstrap CIs, figures)


def estimate_plan(plan: Plan, sample_refs: Mapping[str, Sequence[str]] | None = None) -> Plan:
    """Fill ``estimate_s`` of every stage from :func:`measure_speed` on this machine (timed per dataset)."""
    from d2mae.pretrain import PRESETS

    cfg = plan.config
    for name, dp in plan.datasets.items():
        refs = list((sample_refs or {}).get(name, []))
        tmp = None
        phantom_s = 0.0
        try:
            if dp.spec.phantoms is not None:
                from d2mae.phantom import generate_phantoms

                tmp = tempfile.mkdtemp(prefix="d2mae-plan-")
                size = int(dp.spec.phantoms["size"])
                t0 = time.perf_counter()
                labels = generate_phantoms(tmp, n=4, size=size, seed=0)
                phantom_s = (time.perf_counter() - t0) / 4
                refs = [str(Path(tmp) / r["path"]) for r in csv.DictReader(open(labels, encoding="utf-8"))]
            elif not refs:
                from d2mae.labels import load_labeled

                refs = load_labeled(dp.labels, **{k: getattr(dp.spec, k) for k in _LABEL_OPTIONS}).refs[:6]
            model_cfg = build_config(ModelConfig, (PRESETS["d2mae"], "preset d2mae"),
                                     (cfg.model, f"{cfg.source}, section model"))
            fine = [s.payload for s in plan.of("finetune", name)]
            augment = fine[0].resolved_augment() if fine else "finetune"
            speed = measure_speed(model_cfg, cfg.device, cfg.budget.pretrain_batch_size,
                                  cfg.budget.finetune_batch_size, dp.num_classes, refs, augment)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        speed["phantom"] = phantom_s
        plan.speed[name] = speed
        for s in plan.stages:
            if s.dataset != name:
                continue
            if s.kind == "data":
                s.estimate_s = (phantom_s * int(s.payload.get("n", 0)) + 0.5) if "n" in s.payload else 1.0
            elif s.kind == "arch":
                s.estimate_s = min(dp.n_pretrain, 512) * speed["decode"] + 2.0
            elif s.kind == "pretrain":
                p = s.payload
                eff = p.batch_size * p.accum_iter
                steps = p.epochs * (dp.n_pretrain // eff)
                if p.max_steps is not None:
                    steps = min(steps, p.max_steps)
                s.estimate_s = steps * eff * speed["pretrain_step"] + dp.n_pretrain * speed["decode"] + 2.0
            elif s.kind == "finetune":
                levels = len(range(1, p_levels(PRESETS, s.preset) + 1, max(1, s.payload.search_step)))
                s.estimate_s = _finetune_estimate(s.payload, dp, speed, levels)
    plan.estimated = True
    return plan


def p_levels(presets: Mapping[str, Mapping[str, Any]], preset: str | None) -> int:
    """T, the number of blur levels of a preset's schedule (0 without blur)."""
    if preset is None:
        return 0
    from d2mae.blur import BlurSchedule

    p = presets[preset]
    return BlurSchedule(p.get("sigma_start", 0.1), p.get("sigma_stop", 1.1), p.get("sigma_step", 0.1),
                        enabled=p.get("blur", True)).num_levels


def _fmt_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def machine_info() -> dict[str, Any]:
    """Platform, CPU, cores, memory, GPU and the versions of the software that matter."""
    import timm
    import torch

    import d2mae

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 1
    memory = None
    try:
        memory = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(f"{props.name} ({props.total_memory / 2**30:.0f} GiB)")
    import numpy
    import sklearn

    return {"platform": platform.platform(), "cpu": cpu, "cores": affinity, "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "memory_gib": memory, "gpus": gpus or ["none"],
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__, "d2mae": d2mae.__version__}


def format_plan(plan: Plan) -> str:
    """The plan as text: datasets, budget, one line per stage (status, estimate), total."""
    cfg = plan.config
    b = cfg.budget
    lines = [f"Experiment '{cfg.name}' ({cfg.source}) → {plan.out}"]
    if cfg.description:
        lines.append(f"  {cfg.description}")
    lines.append(f"methods: {', '.join(m.name for m in cfg.runs())}; seeds: {', '.join(map(str, cfg.seeds))}")
    for name, dp in plan.datasets.items():
        fold_text = ", ".join(f"{f[0]}: {f[1]}/{f[2]}/{f[3]}" for f in dp.folds[:5])
        more = f" (+{len(dp.folds) - 5} more)" if len(dp.folds) > 5 else ""
        lines.append(f"dataset {name}: {dp.n_pretrain} pre-training images, {dp.n_labeled} labeled images, "
                     f"{dp.num_classes} classes, protocol {dp.spec.protocol} — folds train/val/test "
                     f"{fold_text}{more}")
        accum = int(cfg.pretrain.get("accum_iter", 1))
        epochs, _, steps = pretrain_budget(b, dp.n_pretrain, accum)
        eff = b.pretrain_batch_size * accum
        lines.append(f"  budget, the same for every method: pre-training {steps:,} steps × batch "
                     f"{eff} = {steps * eff:,} images seen ({epochs} epoch(s)); "
                     f"fine-tuning {b.finetune_epochs} epochs × batch {b.finetune_batch_size}, the same folds")
        if dp.overlap:
            lines.append(f"  note: {dp.overlap}")
    lines.append("")
    width = max(len(s.label) for s in plan.stages) if plan.stages else 10
    lines.append(f"  #  {'stage':<{width}}  {'status':<8}  estimate")
    total = 0.0
    for i, s in enumerate(plan.stages, 1):
        done = s.done_info() is not None
        est = 0.0 if done else s.estimate_s
        if math.isfinite(est):
            total += est
        status = "done" if done else "to run"
        lines.append(f"{i:>3}  {s.label:<{width}}  {status:<8}  {_fmt_seconds(est) if plan.estimated else '-'}")
    lines.append(f"{'':>3}  {'report (tables, figures)':<{width}}  {'to run':<8}  "
                 f"{_fmt_seconds(15.0) if plan.estimated else '-'}")
    if plan.estimated:
        total += 15.0
        m = machine_info()
        lines.append("")
        lines.append(f"Estimated time: {_fmt_seconds(total)} on this machine ({m['cpu']}, {m['cores']} cores, GPU: "
                     f"{', '.join(m['gpus'])}). This is an ESTIMATE from timing a few real pre-training, fine-tuning "
                     "and OBS steps of the configured model and decoding a few images here, extrapolated to the "
                     "planned steps; other load on the machine, early stopping and data loading change it.")
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            load = 0.0
        if load > 0.5 * m["cores"]:
            lines.append(f"Note: the machine was busy while timing (load average {load:.1f} on {m['cores']} cores); "
                         "the estimate includes that slowdown.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# running the stages
# --------------------------------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"[experiment] {message}", file=sys.stderr, flush=True)


def _write_done(stage: Stage, seconds: float, extra: Mapping[str, Any] | None = None) -> None:
    atomic_write_json(stage.folder / DONE, {
        "stage": stage.label, "kind": stage.kind, "key": stage.key, "seconds": round(seconds, 3),
        "estimate_s": None if not math.isfinite(stage.estimate_s) else round(stage.estimate_s, 1),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(extra or {})})


def _clear_stale(folder: Path, keep_partial: bool) -> None:
    """A stage folder whose DONE marker belongs to another config (or is unreadable) is emptied before re-running;
    a folder without a marker is a stopped run of this stage and is kept (its own checkpoint resumes it)."""
    marker = folder / DONE
    if marker.exists() or (folder.exists() and not keep_partial):
        shutil.rmtree(folder)


def _run_data(stage: Stage, plan: Plan) -> None:
    if "list" in stage.payload:
        from d2mae.labels import load_labeled

        spec = plan.config.datasets[stage.dataset]
        labeled = load_labeled(spec.labels, **{k: getattr(spec, k) for k in _LABEL_OPTIONS})
        atomic_write_text(stage.payload["list"], "".join(f"{r}\n" for r in labeled.refs))
        return
    from d2mae.phantom import generate_phantoms

    _clear_stale(stage.folder, keep_partial=False)
    generate_phantoms(stage.folder, **stage.payload)


def _run_arch(stage: Stage, plan: Plan) -> None:
    """The supervised floor's ViT: an untrained model folder with the experiment's architecture and the
    pre-training images' mean/std (fine-tuning ``--mode scratch`` reads only its config, not its weights)."""
    import torch

    from d2mae.artifacts import save_pretrained
    from d2mae.data import compute_stats, find_images
    from d2mae.models import DeblurMAE

    mc: ModelConfig = stage.payload["model"]
    if mc.mean is None or mc.std is None:
        mean, std = compute_stats(find_images(stage.payload["data"]), mc.in_chans, seed=0)
        mc = dataclasses.replace(mc, mean=mc.mean or mean, std=mc.std or std)
    torch.manual_seed(0)
    _clear_stale(stage.folder, keep_partial=False)
    save_pretrained(DeblurMAE(mc), stage.folder, extra={
        "scratch_architecture": True, "pretrain": {"preset": "none", "images": 0, "content_hashes": []},
        "note": "randomly initialised; only its architecture and normalisation are used (fine-tuning --mode "
                "scratch, the supervised floor)"})


def _run_pretrain(stage: Stage, plan: Plan) -> None:
    from d2mae.pretrain import pretrain

    _clear_stale(stage.folder, keep_partial=True)
    pretrain(stage.payload)


def _run_finetune(stage: Stage, plan: Plan) -> None:
    from d2mae.evaluate import evaluate_run
    from d2mae.finetune import finetune

    _clear_stale(stage.folder, keep_partial=True)
    spec = plan.config.datasets[stage.dataset]
    rep = plan.config.report
    finetune(stage.payload)
    evaluate_run(stage.folder, n_bootstrap=rep.n_bootstrap, seed=0, confidence=rep.confidence,
                 group_by=[spec.scanner_column] if spec.scanner_column else [], figures=True)


_RUNNERS: dict[str, Callable[[Stage, Plan], None]] = {
    "data": _run_data, "arch": _run_arch, "pretrain": _run_pretrain, "finetune": _run_finetune}


def run_stage(stage: Stage, plan: Plan, index: int = 0, total: int = 0) -> dict[str, Any]:
    """Run one stage unless its DONE marker (same config) exists; write the marker after the outputs."""
    where = f"[{index}/{total}] " if total else ""
    info = stage.done_info()
    if info is not None:
        _say(f"{where}{stage.label}: finished before, skipped ({stage.folder})")
        return {**info, "skipped": True}
    _say(f"{where}{stage.label} …")
    t0 = time.perf_counter()
    _RUNNERS[stage.kind](stage, plan)
    seconds = time.perf_counter() - t0
    _write_done(stage, seconds)
    _say(f"{where}{stage.label}: done in {_fmt_seconds(seconds)}")
    return {**(stage.done_info() or {}), "skipped": False}


def prepare_out(plan: Plan, resume: bool) -> None:
    """Refuse to mix two experiments in one folder; save the resolved config and the plan."""
    from d2mae.config import save_config

    out = plan.out
    previous = out / EXPERIMENT_CONFIG
    if previous.is_file() and not resume:
        raise D2maeError(f"option --out: {out} already holds an experiment ({previous}); continue it with --resume "
                         "(finished stages are skipped) or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(plan.config.to_dict(), previous)
    atomic_write_json(out / PLAN_FILE, {"stages": [
        {"id": s.id, "kind": s.kind, "dataset": s.dataset, "label": s.label, "folder": str(s.folder), "key": s.key,
         "seed": s.seed, "method": s.method, "preset": s.preset,
         "estimate_s": None if not math.isfinite(s.estimate_s) else round(s.estimate_s, 1)} for s in plan.stages]})


def run_experiment(cfg: ExperimentConfig, out: str | Path, resume: bool = False, estimate: bool = True) -> Path:
    """Run every stage of the experiment (skipping finished ones) and write the report; returns report.md.

    Args:
        cfg: the parsed config (:func:`load_experiment`).
        out: the output folder.
        resume: continue an experiment already in ``out`` (without it, a folder holding one is refused).
        estimate: time a few steps first so that the plan and the report show estimates beside actual times.
    """
    plan = make_plan(cfg, out)
    prepare_out(plan, resume)
    if estimate and any(s.done_info() is None for s in plan.stages):
        estimate_plan(plan)
    _say(format_plan(plan))
    started = time.perf_counter()
    for i, stage in enumerate(plan.stages, 1):
        run_stage(stage, plan, i, len(plan.stages))
    _say("writing the report …")
    path = write_report(plan, wall_seconds=time.perf_counter() - started)
    _say(f"report: {path}")
    return path


# --------------------------------------------------------------------------------------------------------------------
# results and the report
# --------------------------------------------------------------------------------------------------------------------

METRIC_COLUMNS: tuple[tuple[str, str], ...] = (("accuracy", "ACC"), ("macro_f1", "F1"), ("auroc", "AUROC"))


@dataclass
class RunResult:
    """One finished fine-tuning run: its stage and D's ``metrics.json`` (per-fold metrics)."""

    stage: Stage
    metrics: dict[str, Any]

    @property
    def method(self) -> Method:
        return METHODS[str(self.stage.method)]

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


def _values(results: Sequence[RunResult], dataset: str, method: str, metric: str) -> dict[str, float]:
    vals: dict[str, float] = {}
    for r in results:
        if r.stage.dataset == dataset and r.stage.method == method:
            vals.update(r.fold_values(metric))
    return vals


def _table2_methods(cfg: ExperimentConfig, results: Sequence[RunResult], dataset: str) -> list[str]:
    """The comparison's rows: the ``methods:`` list (in Table 2 order first) that produced results."""
    have = {r.stage.method for r in results if r.stage.dataset == dataset}
    order = [m for m in TABLE2_METHODS if m in cfg.methods] + [m for m in cfg.methods if m not in TABLE2_METHODS]
    return [m for m in order if m in have]


def _method_info(m: Method) -> dict[str, str]:
    pre = "none" if m.preset is None else {"mae": "MAE (no blur)", "deblurrmae": "DeblurrMAE (σ = 1.1)",
                                           "d2mae": "D²MAE (σ 0.1→1.1)"}.get(m.preset, m.preset)
    if m.preset is None or m.obs == "none":
        ft = "no blur"
    elif m.obs == "search":
        ft = f"OBS σ* (s = {m.search_step})"
    else:
        ft = f"fixed σ = {m.obs.split(':', 1)[1]}"
    return {"Pre-training": pre, "Fine-tuning input": ft}


def comparison_tables(plan: Plan, results: Sequence[RunResult]) -> dict[str, Any]:
    """Table 2 per dataset (ACC, F1, AUROC) and, with several datasets, the paper's F1 × datasets layout."""
    from d2mae.report import comparison_table

    cfg = plan.config
    conf = cfg.report.confidence
    tables: dict[str, Any] = {}
    for ds in plan.datasets:
        methods = _table2_methods(cfg, results, ds)
        if not methods:
            continue
        res = {METHODS[m].label: {lab: _values(results, ds, m, key) for key, lab in METRIC_COLUMNS} for m in methods}
        info = {METHODS[m].label: _method_info(METHODS[m]) for m in methods}
        tables[ds] = comparison_table(res, columns=[lab for _, lab in METRIC_COLUMNS], confidence=conf, info=info,
                                      info_columns=("Pre-training", "Fine-tuning input"),
                                      caption=f"Table 2 style — {ds}: mean ± {conf:.0%} CI over folds × seeds (%)")
    if len(tables) > 1:
        methods = [m for m in cfg.methods if any(r.stage.method == m for r in results)]
        res = {METHODS[m].label: {ds: _values(results, ds, m, "macro_f1") for ds in tables
                                  if _values(results, ds, m, "macro_f1")} for m in methods}
        tables["F1 × datasets"] = comparison_table(res, columns=list(tables), confidence=conf,
                                                   caption="Table 2 layout — macro-F1 (%) per dataset")
    return tables


def ablation_tables(plan: Plan, results: Sequence[RunResult]) -> dict[str, Any]:
    """Table 3 per dataset: one block per ablation group that ran, macro-F1 (the paper's metric)."""
    from d2mae.report import ablation_table

    cfg = plan.config
    out = {}
    for ds in plan.datasets:
        groups = {}
        for g in cfg.ablations:
            group = ABLATIONS[g]
            variants = {label: _values(results, ds, m, "macro_f1") for m, label in group.variants}
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
    from d2mae.report import format_p_statement

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
                lines.append(f"{head}; {format_p_statement(p)} (two-sided paired t-test over {n} folds × seeds): "
                             f"**not significant** at {alpha:g} — the difference may well be chance.")
    return lines


def check_same_folds(plan: Plan) -> list[str]:
    """Problems found when checking that, per dataset and seed, every method predicted the same images of each fold
    and split (the folds of the equal-budget rule); empty when all agree."""
    problems = []
    for ds in plan.datasets:
        for seed in plan.config.seeds:
            ref: tuple[str, set] | None = None
            for s in plan.of("finetune", ds):
                path = s.folder / "predictions.csv"
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


# ---- figures -------------------------------------------------------------------------------------------------------


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def roc_methods_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """ROC curves of several methods on one dataset (test predictions pooled over folds): binary, or the
    macro-average of one-vs-rest curves for more classes; the legend gives each pooled AUROC."""
    from sklearn.metrics import auc, roc_curve

    from d2mae.report import save_figure

    fig = _figure(5.6, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="chance")
    grid = np.linspace(0, 1, 201)
    for label, (y, p) in curves.items():
        k = p.shape[1]
        if k == 2:
            if np.unique(y).size < 2:
                continue
            fpr, tpr, _ = roc_curve(y, p[:, 1])
            ax.plot(fpr, tpr, lw=1.8, label=f"{label} (pooled AUROC {auc(fpr, tpr) * 100:.1f})")
        else:
            tprs = []
            for c in range(k):
                pos = y == c
                if pos.all() or not pos.any():
                    continue
                fpr, tpr, _ = roc_curve(pos, p[:, c])
                tprs.append(np.interp(grid, fpr, tpr))
            if tprs:
                macro = np.mean(tprs, axis=0)
                ax.plot(grid, macro, lw=1.8, label=f"{label} (pooled macro AUROC {auc(grid, macro) * 100:.1f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def curves_figure(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], path: Path,
                  xlabel: str, title: str) -> Path:
    """Line plots, one panel per entry of ``panels`` (``{panel: {series: (x, y)}}``), one colour per series."""
    from matplotlib.ticker import MaxNLocator

    from d2mae.report import save_figure

    fig = _figure(4.8 * len(panels) + 0.4, 3.7)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, series) in zip(axes, panels.items()):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, lw=1.5, marker="o" if len(xs) <= 30 else None, ms=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _sample_refs(labels_csv_refs: Sequence[str], labels: Sequence[int], n: int) -> list[str]:
    """Up to ``n`` images, alternating over the classes (the first of each class first)."""
    by_class: dict[int, list[str]] = {}
    for r, y in zip(labels_csv_refs, labels):
        by_class.setdefault(int(y), []).append(r)
    out: list[str] = []
    i = 0
    while len(out) < n and any(i < len(v) for v in by_class.values()):
        for c in sorted(by_class):
            if i < len(by_class[c]) and len(out) < n:
                out.append(by_class[c][i])
        i += 1
    return out


def reconstruction_arrays(folder: Path, refs: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Original, blurred (σ at the schedule's middle level), masked input (masked patches NaN) and reconstruction
    of a pre-trained model on ``refs`` (Eq. 1-3; the model's own mask ratio, a seeded mask)."""
    import torch

    from d2mae.artifacts import load_pretrained
    from d2mae.blur import gaussian_blur
    from d2mae.data import ImageDataset

    model = load_pretrained(folder, "cpu")
    cfg = model.config
    ds = ImageDataset(list(refs), cfg.img_size, cfg.in_chans, augment="none")
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # [B, C, S, S] in [0, 1]
    b = x.shape[0]
    levels = model.schedule.num_levels
    level = (levels + 1) // 2 if levels > 1 else levels  # D²MAE: t = 6 (σ 0.6); DeblurrMAE: σ 1.1; MAE: none
    t = torch.full((b,), float(level))
    noise = torch.rand(b, cfg.num_patches, generator=torch.Generator().manual_seed(seed))  # [B, N]
    enc = model.encoder
    with torch.no_grad():
        latent, mask, ids_restore = enc(x, t, cfg.mask_ratio, noise=noise)
        pred = model.forward_decoder(latent, ids_restore).float()  # [B, N, p*p*C] normalised units
        if cfg.norm_pix_loss:
            target = model.patchify(enc.normalize(x))
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        recon = (model.unpatchify(pred) * enc.pixel_std + enc.pixel_mean).clamp(0, 1)  # [B, C, S, S]
        blurred = gaussian_blur(x, model.schedule.sigma(t)).clamp(0, 1)  # [B, C, S, S]
    grid, p = cfg.img_size // cfg.patch, cfg.patch
    pix = mask.reshape(b, 1, grid, grid).repeat_interleave(p, 2).repeat_interleave(p, 3)  # [B, 1, S, S]
    hidden = pix.expand_as(blurred) > 0  # [B, C, S, S] True where a patch was masked
    masked = blurred.clone()
    masked[hidden] = float("nan")
    pasted = torch.where(hidden, recon, blurred)  # MAE's view: the visible input, masked patches filled in
    sigma = float(model.schedule.sigma(t[:1])[0])
    return {"original": x, "blurred": blurred, "masked": masked, "reconstruction": recon, "pasted": pasted,
            "sigma": sigma, "mask_ratio": cfg.mask_ratio}


class _Figures:
    """Draws figures into OUT/figures, turning a failure into a visible note in the report (never a silent skip)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.notes: list[str] = []

    def __call__(self, name: str, draw: Callable[[Path], Any]) -> Path | None:
        path = self.folder / f"{_safe(name)}.png"
        try:
            draw(path)
        except (D2maeError, ValueError, RuntimeError, OSError) as exc:
            self.notes.append(f"figure {path.name} could not be drawn: {exc}")
            return None
        return path if path.is_file() else None


def _first_seed_stage(plan: Plan, kind: str, dataset: str, **match: Any) -> Stage | None:
    for seed in plan.config.seeds:
        for s in plan.of(kind, dataset):
            if s.seed == seed and all(getattr(s, k) == v for k, v in match.items()) and s.done_info() is not None:
                return s
    return None


def _labeled_for(plan: Plan, dataset: str) -> Any:
    from d2mae.labels import load_labeled

    spec = plan.config.datasets[dataset]
    return load_labeled(plan.datasets[dataset].labels, **{k: getattr(spec, k) for k in _LABEL_OPTIONS})


def make_figures(plan: Plan, results: Sequence[RunResult], draw: _Figures) -> dict[str, list[tuple[Path, str]]]:
    """Every figure of the report, grouped by section: ``{section: [(png, caption), …]}``."""
    import torch

    from d2mae import report as rp
    from d2mae.evaluate import load_predictions
    from d2mae.metrics import mean_ci

    cfg = plan.config
    conf = cfg.report.confidence
    figs: dict[str, list[tuple[Path, str]]] = {}

    def add(section: str, path: Path | None, caption: str) -> None:
        if path is not None:
            figs.setdefault(section, []).append((path, caption))

    # Figure 2: ACC and AUROC bars with CI error bars
    data: dict[str, dict[str, dict[str, Any]]] = {"ACC": {}, "AUROC": {}}
    for ds in plan.datasets:
        for m in _table2_methods(cfg, results, ds):
            for key, panel in (("accuracy", "ACC"), ("auroc", "AUROC")):
                stat = mean_ci(list(_values(results, ds, m, key).values()), conf)
                clip = lambda v: v if not math.isfinite(v) else min(1.0, max(0.0, v))  # noqa: E731
                data[panel].setdefault(ds, {})[METHODS[m].label] = {
                    "mean": stat.mean, "low": clip(stat.low), "high": clip(stat.high)}
    if data["ACC"]:
        add("fig2", draw("fig2_acc_auroc", lambda p: rp.metric_bars(
            data, p, title=f"ACC and AUROC, mean with {conf:.0%} CI over folds × seeds", confidence=conf)),
            f"Figure 2 style: ACC and AUROC per method (bars: mean over folds × seeds; error bars: {conf:.0%} "
            "t-interval, cut at 0 and 100%).")

    sigma_all: list[float] = []
    sigma_groups: list[str] = []
    for ds, dp in plan.datasets.items():
        d2 = _first_seed_stage(plan, "finetune", ds, method="d2mae")
        pre = _first_seed_stage(plan, "pretrain", ds, preset="d2mae")
        labeled = None
        # Figure 3a: the OBS strip
        if d2 is not None and pre is not None and cfg.report.obs_images:
            from d2mae.artifacts import load_pretrained
            from d2mae.obs import obs_strips

            labeled = labeled or _labeled_for(plan, ds)
            refs = _sample_refs(labeled.refs, labeled.labels, cfg.report.obs_images)
            model = load_pretrained(pre.folder, "cpu")
            with torch.no_grad():
                strips = obs_strips(model, refs, search_step=METHODS["d2mae"].search_step)
            for i, st in enumerate(strips):
                chosen = st.levels.index(st.t_star) if st.t_star in st.levels else None
                add(f"obs:{ds}", draw(f"fig3a_obs_{ds}_{i + 1}", lambda p, st=st, chosen=chosen: rp.obs_strip(
                    st.original, list(st.blurred), list(st.deblurred), st.sigmas, list(st.losses), p, chosen=chosen,
                    title=f"OBS on {Path(st.path).name} ({ds}): σ* = {st.sigma_star:g}")),
                    f"Figure 3a style — {ds}, {Path(st.path).name} (class "
                    f"{labeled.classes[int(labeled.labels[labeled.refs.index(st.path)])]}): blurred inputs, the "
                    "D²MAE model's deblurred outputs and their difference to the original at each searched σ; the "
                    "chosen σ* (lowest deblurring loss, Eq. 5) is framed.")
        # Figure 3b: σ* histograms, from the OBS table of the d2mae fine-tuning (every image of the folds)
        if d2 is not None:
            from d2mae.obs import ObsTable

            obs_dir = d2.folder / "obs"
            if (obs_dir / "obs.csv").is_file():
                table = ObsTable.load(obs_dir)
                sig = np.asarray(table.sigma_star, dtype=float)
                sigma_all += sig.tolist()
                sigma_groups += [ds] * len(sig)
                col = dp.spec.scanner_column
                if col:
                    labeled = labeled or _labeled_for(plan, ds)
                    index = {r: i for i, r in enumerate(labeled.refs)}
                    groups = [labeled.columns[col][index[p]] if p in index else "?" for p in table.paths]
                    add("sigma", draw(f"fig3b_sigma_{ds}_per_{col}", lambda p, sig=sig, groups=groups, col=col, ds=ds:
                                      rp.sigma_histogram(sig, p, groups=groups,
                                                         title=f"σ* per {col} — {ds} (D²MAE OBS, s = 2)")),
                        f"Figure 3b style — {ds}: distribution of σ* per {col}; the dashed line is the group's "
                        "mean. Different scanners choosing different σ* is the domain shift OBS adapts to.")
        # ROC curves of the Table 2 methods (first seed, test predictions pooled over folds)
        curves = {}
        for m in _table2_methods(cfg, results, ds):
            st = _first_seed_stage(plan, "finetune", ds, method=m)
            if st is not None:
                run = load_predictions(st.folder, split="test")
                curves[METHODS[m].label] = (run.labels, run.probs)
        if curves:
            add(f"roc:{ds}", draw(f"roc_{ds}", lambda p, curves=curves, ds=ds: roc_methods_figure(
                curves, p, f"ROC — {ds} (test images of all folds, seed {cfg.seeds[0]})")),
                f"ROC curves on {ds}: each method's test predictions pooled over the folds (seed {cfg.seeds[0]}).")
        # pre-training curves
        records = []
        keys = []
        for s in plan.of("pretrain", ds):
            if s.seed != cfg.seeds[0]:
                continue
            key = f"{s.preset} loss"
            rows = [{"step": r["step"], key: r["loss"]} for r in _read_jsonl(s.folder / "metrics.jsonl")
                    if "step" in r and "loss" in r]
            if rows:
                keys.append(key)
                records += rows
        if records:
            add(f"curves:{ds}", draw(f"pretrain_curves_{ds}", lambda p, records=records, keys=keys, ds=ds:
                                     rp.training_curves(records, p, keys=keys,
                                                        title=f"Pre-training loss — {ds} (seed {cfg.seeds[0]})")),
                f"Pre-training loss against optimizer step on {ds}. The losses of different presets are not "
                "comparable in level (MAE's loss is on masked patches only, D²MAE/DeblurrMAE's on all patches of "
                "a blurred input); each curve should fall.")
        # fine-tuning curves: mean over folds per epoch
        panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {"training loss": {},
                                                                          "validation macro-F1": {}}
        for m in [m.name for m in cfg.runs()]:
            st = _first_seed_stage(plan, "finetune", ds, method=m)
            if st is None:
                continue
            per_epoch: dict[int, dict[str, list[float]]] = {}
            for fold_dir in sorted(st.folder.glob("fold_*")):
                for r in _read_jsonl(fold_dir / "metrics.jsonl"):
                    e = per_epoch.setdefault(int(r.get("epoch", 0)), {"train_loss": [], "val_macro_f1": []})
                    for k in e:
                        if isinstance(r.get(k), (int, float)):
                            e[k].append(float(r[k]))
            if per_epoch:
                epochs = sorted(per_epoch)
                for panel, k in (("training loss", "train_loss"), ("validation macro-F1", "val_macro_f1")):
                    xs = [e for e in epochs if per_epoch[e][k]]
                    panels[panel][METHODS[m].label] = (xs, [float(np.mean(per_epoch[e][k])) for e in xs])
        if panels["training loss"]:
            add(f"curves:{ds}", draw(f"finetune_curves_{ds}", lambda p, panels=panels, ds=ds: curves_figure(
                panels, p, "epoch", f"Fine-tuning — {ds} (seed {cfg.seeds[0]}, mean over folds)")),
                f"Fine-tuning on {ds}: training loss and validation macro-F1 per epoch, averaged over the folds "
                "(folds that stopped early drop out of later epochs).")
        # reconstructions of masked inputs
        if cfg.report.sample_images:
            labeled = labeled or _labeled_for(plan, ds)
            refs = _sample_refs(labeled.refs, labeled.labels, cfg.report.sample_images)
            for s in plan.of("pretrain", ds):
                if s.seed != cfg.seeds[0] or s.done_info() is None:
                    continue
                arr = reconstruction_arrays(s.folder, refs)
                add(f"recon:{ds}", draw(f"reconstruction_{ds}_{s.preset}", lambda p, arr=arr, s=s, ds=ds:
                                        rp.image_grid(
                                            {"original x": arr["original"], "blurred x_b": arr["blurred"],
                                             "masked input": arr["masked"], "reconstruction x̂": arr["reconstruction"],
                                             "x̂ in the masked patches": arr["pasted"]}, p,
                                            row_labels=[Path(r).name[:16] for r in refs],
                                            title=f"{s.preset} — {ds}: input blurred at σ = {arr['sigma']:g}, "
                                                  f"{arr['mask_ratio']:.0%} of patches masked")),
                    f"Masked reconstruction by the {s.preset} model on {ds}: original x, its blurred version "
                    f"x_b (σ = {arr['sigma']:g}{'; MAE does not blur' if arr['sigma'] == 0 else ''}), the masked "
                    "input (gray = masked patches), the model's output x̂ (its target is the original x) and, as in "
                    "MAE's figures, the visible input with x̂ in the masked patches.")
    if sigma_all and len(plan.datasets) > 0:
        add("sigma", draw("fig3b_sigma_per_dataset", lambda p: rp.sigma_histogram(
            sigma_all, p, groups=sigma_groups, title="σ* per dataset (D²MAE OBS, s = 2)")),
            "Figure 3b style: the distribution of the optimal blurriness σ* chosen by OBS on each dataset's images.")
        figs["sigma"] = figs["sigma"][-1:] + figs["sigma"][:-1]  # the per-dataset panel first
    return figs


def _stage_times(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for s in plan.stages:
        info = s.done_info() or {}
        rows.append({"stage": s.label, "kind": s.kind, "dataset": s.dataset, "method": s.method, "seed": s.seed,
                     "seconds": info.get("seconds"), "estimate_s": info.get("estimate_s"),
                     "finished": info.get("finished"), "folder": str(s.folder)})
    return rows


def write_report(plan: Plan, wall_seconds: float | None = None) -> Path:
    """Write OUT/report.md + report.html (figures embedded), metrics.csv/json, machine.json, timings.json/csv."""
    from d2mae.metrics import nan_to_none
    from d2mae.report import Report, Table

    cfg, out = plan.config, plan.out
    results = collect_results(plan)
    if not results:
        raise D2maeError(f"{out}: no finished fine-tuning run to report on; run the experiment first")
    machine = machine_info()
    timings = _stage_times(plan)
    atomic_write_json(out / "machine.json", machine)
    atomic_write_json(out / "timings.json", {"stages": timings, "wall_seconds_this_invocation": wall_seconds})
    _write_csv(out / "timings.csv", timings)
    rows = []
    for r in results:
        for fold, m in (r.metrics.get("folds") or {}).items():
            rows.append({"dataset": r.stage.dataset, "method": r.stage.method, "label": r.method.label,
                         "seed": r.stage.seed, "fold": fold, "n": m.get("n"),
                         **{k: m.get(k) for k in ("accuracy", "macro_f1", "auroc", "balanced_accuracy")},
                         "run": str(r.stage.folder)})
    _write_csv(out / "metrics.csv", rows)
    tables = comparison_tables(plan, results)
    ablations = ablation_tables(plan, results)
    statements = significance_statements({k: t for k, t in tables.items() if k in plan.datasets})
    abl_statements = []
    for ds, t in ablations.items():
        for group, entry in t.data.items():
            order = entry.get("ranking", [])
            p = entry.get("pvalue")
            if len(order) >= 2:
                sig = ("significant" if p is not None and math.isfinite(p) and p < SIGNIFICANCE else
                       "**not significant**" if p is not None and math.isfinite(p) else "not testable")
                ptext = f"P = {p:.3f}" if p is not None and math.isfinite(p) else "no P-value"
                abl_statements.append(f"{ds}, {group}: best {order[0]}, second {order[1]} ({ptext}: {sig}).")
    fold_problems = check_same_folds(plan)
    atomic_write_json(out / "metrics.json", nan_to_none({
        "format": "d2mae-experiment-results", "format_version": 1, "experiment": cfg.name,
        "per_fold": rows, "tables": {k: t.data for k, t in tables.items()},
        "ablations": {k: t.data for k, t in ablations.items()}, "significance": statements + abl_statements,
        "same_folds_problems": fold_problems,
        "runs": [{"dataset": r.stage.dataset, "method": r.stage.method, "seed": r.stage.seed,
                  "run": str(r.stage.folder), "over_folds": r.metrics.get("over_folds"),
                  "pooled": {k: r.metrics.get("pooled", {}).get(k) for k in ("accuracy", "macro_f1", "auroc")}}
                 for r in results]}))

    draw = _Figures(out / "figures")
    figs = make_figures(plan, results, draw)

    rep = Report(cfg.report.title or f"d2mae experiment: {cfg.name}")
    b = cfg.budget
    methods_text = ", ".join(f"{METHODS[m.name].label} ({m.describe()})" for m in cfg.runs())
    rep.paragraph(f"{cfg.description + ' ' if cfg.description else ''}Datasets: {', '.join(plan.datasets)}. "
                  f"Seeds: {', '.join(map(str, cfg.seeds))}. Methods: {methods_text}.")
    rep.heading("Summary")
    bullets = list(statements) + abl_statements
    if any("not significant" in s or "cannot be assessed" in s for s in bullets):
        bullets.append("Where a difference is not significant, this experiment does not show that one method is "
                       "better than the other; more folds, seeds or data would be needed.")
    rep.bullets(bullets or ["No comparison was possible (fewer than two methods)."])
    if fold_problems:
        rep.paragraph("**Warning: the methods were not evaluated on identical folds** — " + "; ".join(fold_problems))
    rep.heading("Setup")
    setup = []
    for name, dp in plan.datasets.items():
        accum = int(cfg.pretrain.get("accum_iter", 1))
        epochs, _, steps = pretrain_budget(b, dp.n_pretrain, accum)
        eff = b.pretrain_batch_size * accum
        folds = "; ".join(f"fold {f[0]}: {f[1]}/{f[2]}/{f[3]}" for f in _actual_folds(plan, name) or dp.folds)
        setup.append(f"**{name}**: {dp.n_pretrain} pre-training images, {dp.n_labeled} labeled images, "
                     f"{dp.num_classes} classes; protocol `{dp.spec.protocol}` (train/val/test {folds}).")
        setup.append(f"Equal budget on {name}: every pre-trained method {steps:,} optimizer steps × batch "
                     f"{eff} = {steps * eff:,} images seen; every method "
                     f"fine-tuned ≤ {b.finetune_epochs} epochs × batch {b.finetune_batch_size} with the same recipe "
                     f"(model selection on validation macro-F1, early stopping) on the same folds "
                     f"({'verified on the predictions' if not fold_problems else 'NOT identical, see above'}).")
        if dp.overlap:
            setup.append(f"Note on {name}: {dp.overlap}.")
    mc = build_config(ModelConfig, (cfg.model, "model"))
    setup.append(f"Model: {mc.model} ({mc.blocks} blocks, width {mc.dim}, {mc.heads} heads, patch {mc.patch}), "
                 f"{mc.img_size} px, {mc.in_chans} channel(s); decoder {mc.decoder_depth} × {mc.decoder_embed_dim}; "
                 f"mask ratio {mc.mask_ratio:.0%}.")
    rep.bullets(setup)
    rep.heading("Results (Table 2 style)")
    rep.paragraph(f"Test-set metrics in %, mean ± half-width of the {cfg.report.confidence:.0%} t-interval over "
                  "folds × seeds. Best **bold**, second <u>underlined</u>; the P-value row is the two-sided paired "
                  "t-test of the best vs. the second method over the same folds and seeds (paper, Section 3.1).")
    for name, t in tables.items():
        rep.table(t)
    for path, caption in figs.get("fig2", []):
        rep.image(path, caption)
    if ablations:
        rep.heading("Ablations (Table 3 style)")
        rep.paragraph("Each block varies one factor of D²MAE with everything else fixed; variants that share a "
                      "pre-trained model (OBS setting, search step) reuse it.")
        for name, t in ablations.items():
            rep.table(t)
    obs_sections = [k for k in figs if k.startswith("obs:")]
    if obs_sections or "sigma" in figs:
        rep.heading("Optimal blurriness search (Figure 3 style)")
        for k in obs_sections:
            for path, caption in figs[k]:
                rep.image(path, caption)
        for path, caption in figs.get("sigma", []):
            rep.image(path, caption)
    roc = [k for k in figs if k.startswith("roc:")]
    if roc:
        rep.heading("ROC curves")
        for k in roc:
            for path, caption in figs[k]:
                rep.image(path, caption)
    curves = [k for k in figs if k.startswith("curves:")]
    if curves:
        rep.heading("Training curves")
        for k in curves:
            for path, caption in figs[k]:
                rep.image(path, caption)
    recon = [k for k in figs if k.startswith("recon:")]
    if recon:
        rep.heading("Reconstructions of masked inputs")
        for k in recon:
            for path, caption in figs[k]:
                rep.image(path, caption)
    if draw.notes:
        rep.heading("Figures that could not be drawn")
        rep.bullets(draw.notes)
    rep.heading("Per-run results")
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
    rep.table(Table(["Dataset", "Method", "Seed", "Folds", "ACC", "F1", "AUROC", "Run folder"], run_rows,
                    align=["l", "l", "r", "r", "r", "r", "r", "l"],
                    notes=["Per run: mean ± CI over its folds (one fold: pooled value). Each run folder holds "
                           "predictions.csv, metrics.json/.md/.html (per-fold and pooled metrics with bootstrap CIs), "
                           "ROC/confusion/σ* figures and the fine-tuned models."]))
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
        time_rows.append([t["stage"], _fmt_seconds(sec) if sec is not None else "not run",
                          _fmt_seconds(est) if est is not None else "-"])
    time_rows.append(["**all stages**", f"**{_fmt_seconds(total)}**", ""])
    notes = ["Wall time of each stage when it ran (a stage reused from an earlier invocation keeps its own time); "
             "the estimate is what --plan predicted from timing a few steps."]
    if wall_seconds is not None:
        notes.append(f"This invocation took {_fmt_seconds(wall_seconds)} up to writing the report.")
    rep.table(Table(["Stage", "Wall time", "Estimate"], time_rows, notes=notes, align=["l", "r", "r"]))
    rep.heading("Files")
    rep.bullets([f"`{EXPERIMENT_CONFIG}`: the resolved config; `{PLAN_FILE}`: the stages and their folders.",
                 "`metrics.csv` / `metrics.json`: per-fold metrics of every run, the tables' numbers and P-values.",
                 "`machine.json`, `timings.json` / `timings.csv`: the machine, software versions and stage times.",
                 "`figures/`: every figure as PNG; `runs/`, `pretrained/`, `data/`: the stages' outputs."])
    rep.heading("Resolved config")
    rep.code(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
    md, _ = rep.write(out, stem="report")
    return md


def _actual_folds(plan: Plan, dataset: str) -> list[tuple[str, int, int, int]]:
    """(fold, n_train, n_val, n_test) as the first finished fine-tuning of ``dataset`` recorded them."""
    for s in plan.of("finetune", dataset):
        path = s.folder / "run.json"
        if s.done_info() is not None and path.is_file():
            details = json.loads(path.read_text(encoding="utf-8")).get("fold_details") or []
            return [(str(d["fold"]), int(d["n_train"]), int(d["n_val"]), int(d["n_test"])) for d in details]
    return []


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run every method of an experiment config on every dataset under its protocol and budget, and write one "
        "report (report.md + report.html). Example: d2mae experiment configs/demo.yaml --out runs/demo. "
        "--plan lists the stages with time estimates for this machine; --resume continues a stopped experiment "
        "(finished stages are skipped).")
    parser.add_argument("config", metavar="CONFIG.yaml", help="experiment config (see configs/)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: runs/<experiment name>)")
    parser.add_argument("--plan", action="store_true", help="print the stages and their estimated time; run nothing")
    parser.add_argument("--resume", action="store_true",
                        help="continue the experiment in --out: finished stages are skipped")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config value, e.g. --set datasets.busbra.root=/data/bus-bra "
                             "--set budget.pretrain_epochs=2 (repeatable; values are YAML)")
    parser.add_argument("--no-estimate", action="store_true",
                        help="skip the timing of a few steps (plan and report show no estimates)")


def run_cli(args: argparse.Namespace) -> int:
    from d2mae.finetune import Interrupted
    from d2mae.pretrain import TrainingInterrupted

    cfg = load_experiment(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    if args.plan:
        plan = make_plan(cfg, out)
        if not args.no_estimate:
            print("timing a few steps of the configured model on this machine …", file=sys.stderr, flush=True)
            estimate_plan(plan)
        print(format_plan(plan))
        return 0
    try:
        path = run_experiment(cfg, out, resume=args.resume, estimate=not args.no_estimate)
    except (Interrupted, TrainingInterrupted) as exc:
        print(f"d2mae experiment: {exc}; run the same command with --resume to continue", file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))
    print(path.with_suffix(".html"))
    return 0

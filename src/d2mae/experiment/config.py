"""The experiment config: the schema of an experiment file (its methods come from :mod:`d2mae.experiment.methods`) and
its loading (``${VAR}`` expansion, ``--set`` overrides). Part of :mod:`d2mae.experiment`."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from d2mae.data.folds import parse_protocol
from d2mae.data.phantom import PhantomConfig
from d2mae.experiment.forbidden import FINETUNE_FORBIDDEN, PRETRAIN_FORBIDDEN, SEGMENT_FORBIDDEN
from d2mae.experiment.methods import ABLATIONS, TABLE2_METHODS, Method, method_for
from d2mae.experiment.overrides import apply_overrides, expand_env
from d2mae.method.model_config import ModelConfig
from d2mae.method.presets import PRESETS
from d2mae.runtime.errors import D2maeError, shown
from d2mae.runtime.options import build_config, canonical_key, check_fields, coerce, field_types, load_yaml, to_dict
from d2mae.train.config import FinetuneConfig, SegmentConfig
from d2mae.train.pretrain_config import MODEL_FIELDS, PretrainConfig

# --------------------------------------------------------------------------------------------------------------------
# config schema
# --------------------------------------------------------------------------------------------------------------------

#: ModelConfig fields each method's pre-training preset decides (they may not be set in ``model:``).
PRESET_FIELDS = ("blur", "sigma_start", "sigma_stop", "sigma_step", "blur_embed", "loss_on", "objective")
_PATH_OPTIONS = ("labels", "image_root", "folds_csv", "images", "masks")
TASKS = ("classify", "segment")


@dataclass
class DatasetSpec:
    """One dataset of an experiment (a key under ``datasets:``).

    Either real images — ``labels`` (a labels CSV or a class-per-folder tree) and optionally ``pretrain_data`` —
    or synthetic ones — ``phantoms`` (options of :func:`d2mae.data.phantom.generate_phantoms`, written into the output
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
    allow_outside_root: bool = False
    folds_csv: str | None = None
    classes: list[str] | None = None
    protocol: str = field(default="kfold:5", metadata={"help": "split:3:1:1, kfold:5, csv or holdout:FILE"})
    folds: list[str] | None = field(default=None, metadata={"help": "run only these folds (e.g. a smoke run)"})
    scanner_column: str | None = field(default=None, metadata={
        "help": "labels column naming the scanner/device (σ* histogram per scanner)"})
    task: str = field(default="classify", metadata={
        "help": "classify (fine-tuning, Table 2) or segment (d2mae segment: masks, Dice / IoU / HD95)",
        "choices": list(TASKS)})
    images: str | None = field(default=None, metadata={"help": "segment: folder of images (or labels: a CSV)"})
    masks: str | None = field(default=None, metadata={"help": "segment: folder of masks named like the images"})
    mask_column: str | None = field(default=None, metadata={"help": "segment: labels CSV column of mask paths"})
    mask_suffix: str = ""
    num_classes: int = field(default=2, metadata={"help": "segment: classes in the masks, background included",
                                                  "min": 2, "max": 255})
    stratify: str = field(default="lesion", metadata={
        "help": "segment: stratify the folds by this labels column, or by 'lesion' (the mask holds one)"})
    name: str = ""
    phantoms: dict[str, Any] | None = None
    pretrain_phantoms: dict[str, Any] | None = None

    def segment_options(self, labels: str | None = None) -> dict[str, Any]:
        """The data options of a ``d2mae segment`` run on this dataset (``labels``: the phantoms' labels CSV, whose
        ``mask`` column names each image's mask)."""
        column = None if self.stratify == "lesion" else self.stratify
        folds = ",".join(self.folds) if self.folds else None
        if self.phantoms is not None:
            return {"labels": labels, "mask_column": "mask", "label_column": column, "num_classes": self.num_classes,
                    "protocol": self.protocol, "folds": folds}
        keys = ("images", "labels", "masks", "mask_column", "mask_suffix", "path_column", "image_root", "image_ext",
                "allow_outside_root", "group_column", "split_column", "fold_column", "num_classes", "protocol")
        return {**{k: getattr(self, k) for k in keys}, "label_column": column, "folds": folds}


@dataclass
class BudgetSpec:
    """The compute budget every method gets (the equal-budget rule): set once, here, never per method."""

    pretrain_epochs: int | None = field(default=None, metadata={"help": "pre-training epochs (or pretrain_images)",
                                                                "min": 1})
    pretrain_images: int | None = field(default=None, metadata={
        "help": "pre-training budget as images seen (instead of epochs)", "min": 1})
    pretrain_batch_size: int = field(default=64, metadata={"min": 1})
    finetune_epochs: int = field(default=50, metadata={"min": 1})
    finetune_batch_size: int = field(default=32, metadata={"min": 1})
    checkpoints: list[float] | None = field(default=None, metadata={
        "help": "pre-training curves: shares of the pre-training budget (e.g. [0.25, 0.5, 1.0]) whose models the "
                "probes read (1.0: the final model)", "above": 0.0, "max": 1.0})
    label_fractions: list[float] | None = field(default=None, metadata={
        "help": "label efficiency: shares of each training fold to fine-tune on (e.g. [0.1, 0.25, 1.0])",
        "above": 0.0, "max": 1.0})

    def __post_init__(self) -> None:
        for key in ("checkpoints", "label_fractions"):
            values = getattr(self, key)
            if values is not None:
                if not values or any(not 0.0 < v <= 1.0 for v in values) or len(set(values)) != len(values):
                    raise D2maeError(f"give distinct shares in (0, 1], e.g. [0.25, 0.5, 1.0]; got {values}",
                                     option=key)
                setattr(self, key, sorted(float(v) for v in values))
        if self.label_fractions is not None and 1.0 not in self.label_fractions:
            self.label_fractions.append(1.0)  # the whole labels: Table 2's runs, the curve's right end
        if self.pretrain_epochs is not None and self.pretrain_images is not None:
            raise D2maeError("budget: give pretrain_epochs or pretrain_images, not both")
        if self.pretrain_epochs is None and self.pretrain_images is None:
            self.pretrain_epochs = 400
        check_fields(self)


@dataclass
class ReportSpec:
    """What the report shows."""

    title: str | None = None
    sample_images: int = field(default=4, metadata={"help": "images in the reconstruction figures", "min": 0})
    obs_images: int = field(default=2, metadata={"help": "images in the OBS strip figure (Figure 3a)", "min": 0})
    n_bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for pooled CIs (evaluate)",
                                                     "min": 1})
    confidence: float = field(default=0.95, metadata={"above": 0.0, "below": 1.0})

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class _TopLevel:
    """The scalar top-level keys of an experiment file (sections are checked separately)."""

    name: str = "experiment"
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: list(TABLE2_METHODS))
    ablations: list[str] = field(default_factory=list)
    weights: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    threads: int | None = field(default=None, metadata={"min": 1})
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class ExperimentConfig:
    """A parsed, checked experiment config (:func:`load_experiment`)."""

    name: str
    description: str
    seeds: list[int]
    methods: list[str]
    ablations: list[str]
    weights: dict[str, str]
    device: str
    threads: int | None
    cache_dir: str | None
    model: dict[str, Any]
    budget: BudgetSpec
    pretrain: dict[str, Any]
    finetune: dict[str, Any]
    datasets: dict[str, DatasetSpec]
    report: ReportSpec
    source: str = "config"
    segment: dict[str, Any] = field(default_factory=dict)

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
        return [method_for(n) for n in names]

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (saved as ``experiment.yaml`` beside the report)."""
        datasets = {}
        for name, ds in self.datasets.items():
            d = {k: v for k, v in dataclasses.asdict(ds).items() if k != "name" and v not in (None, "", [])}
            datasets[name] = d
        return {"name": self.name, "description": self.description, "seeds": list(self.seeds),
                "methods": list(self.methods), "ablations": list(self.ablations), "weights": dict(self.weights),
                "device": self.device, "threads": self.threads,
                "cache_dir": self.cache_dir, "model": dict(self.model), "budget": dataclasses.asdict(self.budget),
                "pretrain": dict(self.pretrain), "finetune": dict(self.finetune), "segment": dict(self.segment),
                "datasets": datasets, "report": dataclasses.asdict(self.report)}


_TOP_SECTIONS = ("model", "budget", "pretrain", "finetune", "segment", "datasets", "report")

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
    """:func:`d2mae.runtime.options.build_config`, with the file and section named in value errors of ``__post_init__``."""
    try:
        return build_config(cls, *layers)
    except D2maeError as exc:
        if source in str(exc):
            raise
        if exc.option:  # a value outside its field's domain: the key as the file spells it
            raise D2maeError(f"option '{where}.{exc.option}' in {source}: {exc.message}") from None
        raise D2maeError(f"{source}, section {where}: {exc}") from None


def _parse_top(data: Mapping[str, Any], source: str) -> "_TopLevel":
    """The top-level options: name, seeds, methods (with their weights files) and ablation groups."""
    top = {k: v for k, v in data.items() if k not in _TOP_SECTIONS}
    unknown = [k for k in top if k not in field_types(_TopLevel)]
    if unknown:
        known = ", ".join(list(field_types(_TopLevel)) + list(_TOP_SECTIONS))
        raise D2maeError(f"unknown option '{unknown[0]}' in {source}; known top-level options: {known}")
    flat = build_config(_TopLevel, (top, source))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", flat.name):
        raise D2maeError(f"option 'name' in {source} must be letters, digits, '-', '_' or '.', got {shown(flat.name)}")
    if not flat.seeds or len(set(flat.seeds)) != len(flat.seeds) or min(flat.seeds) < 0:
        raise D2maeError(f"option 'seeds' in {source} must list distinct seeds ≥ 0, got {flat.seeds}")
    for m in flat.methods:
        try:
            method = method_for(m)
        except D2maeError as exc:
            raise D2maeError(f"option 'methods' in {source}: {exc}") from None
        if method.needs_weights and not flat.weights.get(m):
            raise D2maeError(f"option 'methods' in {source}: {m} ({method.table2}) starts from released weights; "
                             f"name the local file under weights: (e.g. weights: {{{m}: /models/FILE}}) or leave "
                             "the method out")
    for m, path in flat.weights.items():
        if m not in flat.methods:
            raise D2maeError(f"option 'weights.{m}' in {source}: {m} is not in methods:; list it or drop the file")
        if not method_for(m).needs_weights and method_for(m).source != "backbone":
            raise D2maeError(f"option 'weights.{m}' in {source}: {m} is pre-trained by the experiment itself; "
                             "weights are for the imported rows (mae-imagenet, moco-v3-imagenet, usfm, timm:NAME)")
    flat.weights = {m: _abspath(os.path.expandvars(str(p))) for m, p in flat.weights.items()}
    for g in flat.ablations:
        if g not in ABLATIONS:
            raise D2maeError(f"option 'ablations' in {source}: unknown group '{g}'; choose from "
                             f"{', '.join(ABLATIONS)}")
    if not flat.methods and not flat.ablations:
        raise D2maeError(f"{source}: no methods and no ablations to run; list some under methods:")

    return flat


def _parse_dataset(ds_name: str, ds_data: Any, source: str) -> DatasetSpec:
    """One ``datasets:`` entry: real images (labels:) or phantoms, its protocol checked, its paths resolved."""
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
    if spec.task not in TASKS:
        raise D2maeError(f"option '{where}.task' in {source} must be one of {', '.join(TASKS)}, got "
                         f"{shown(spec.task)}")
    if spec.task == "segment":
        _check_segment_dataset(spec, where, source)
    elif (spec.labels is None) == (spec.phantoms is None):
        raise D2maeError(f"'{where}' in {source} needs exactly one of labels: (real images) or phantoms: "
                         "(synthetic images generated into the output folder)")
    else:
        seg_only = [k for k in ("images", "masks", "mask_column") if getattr(spec, k)]
        if seg_only:
            raise D2maeError(f"option '{where}.{seg_only[0]}' in {source} is for segmentation; add task: segment")
    if spec.pretrain_phantoms is not None and spec.pretrain_data is not None:
        raise D2maeError(f"'{where}' in {source}: give pretrain_data or pretrain_phantoms, not both")
    if spec.phantoms is not None and spec.task == "classify":
        spec.scanner_column = spec.scanner_column or "scanner"
    try:
        kind, params = parse_protocol(spec.protocol)
    except D2maeError as exc:
        raise D2maeError(f"option '{where}.protocol' in {source}: {exc}") from None
    _check_protocol(kind, params, f"option '{where}.protocol' in {source}")
    _resolve_paths(spec, where, source)
    return spec


def parse_experiment(data: Mapping[str, Any], source: str = "config") -> ExperimentConfig:
    """Check and parse an experiment mapping (the YAML file's content); errors name the key and ``source``."""
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    flat = _parse_top(data, source)
    model = {canonical_key(ModelConfig, k, f"{source}, section model"): v
             for k, v in _section(data, "model", source).items()}
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
    _refuse(pretrain, PRETRAIN_FORBIDDEN, "pretrain", source)
    for key in pretrain:
        if key in MODEL_FIELDS:
            raise D2maeError(f"option 'pretrain.{key}' in {source} is not allowed: architecture options go under "
                             "model: (shared by pre-training and fine-tuning)")
    _check_section_types(PretrainConfig, pretrain, "pretrain", source)

    finetune = _section(data, "finetune", source)
    _refuse(finetune, FINETUNE_FORBIDDEN, "finetune", source)
    _check_section_types(FinetuneConfig, finetune, "finetune", source)

    segment = _section(data, "segment", source)
    _refuse(segment, SEGMENT_FORBIDDEN, "segment", source)
    _check_section_types(SegmentConfig, segment, "segment", source)
    if segment.get("decoder") == "unet":
        raise D2maeError(f"option 'segment.decoder' in {source} is the ViT rows' decoder (fpn, upernet or unetr); the "
                         "smp U-Net is a row of its own: add unet to methods:")

    report_data = _section(data, "report", source)
    _check_section_types(ReportSpec, report_data, "report", source)
    report = _build(ReportSpec, "report", source, (report_data, f"{source}, section report"))

    raw_datasets = data.get("datasets")
    if not isinstance(raw_datasets, Mapping) or not raw_datasets:
        raise D2maeError(f"{source}: section 'datasets' is missing or empty; name at least one dataset "
                         "(labels: FILE or phantoms: {n: ...})")
    datasets: dict[str, DatasetSpec] = {}
    for ds_name, ds_data in raw_datasets.items():
        datasets[str(ds_name)] = _parse_dataset(str(ds_name), ds_data, source)
    return ExperimentConfig(flat.name, flat.description, list(flat.seeds), list(flat.methods), list(flat.ablations),
                            dict(flat.weights), flat.device, flat.threads,
                            _abspath(flat.cache_dir) if flat.cache_dir else None, model, budget, pretrain, finetune,
                            datasets, report, source, segment)


def _check_segment_dataset(spec: DatasetSpec, where: str, source: str) -> None:
    """A segmentation dataset: phantoms (their lesion masks are written too), or images and masks."""
    if spec.phantoms is not None:
        extra = [k for k in ("images", "labels", "masks", "mask_column") if getattr(spec, k)]
        if extra:
            raise D2maeError(f"option '{where}.{extra[0]}' in {source}: phantoms bring their own images and masks")
        spec.phantoms["masks"] = True
        return
    if (spec.images is None) == (spec.labels is None):
        raise D2maeError(f"'{where}' in {source} (task: segment) needs exactly one of images: (a folder) or labels: "
                         "(a CSV), or phantoms:")
    if (spec.masks is None) == (spec.mask_column is None):
        raise D2maeError(f"'{where}' in {source} (task: segment) needs exactly one of masks: (a folder of masks "
                         "named like the images) or mask_column: (a labels CSV column)")
    if spec.mask_column and not spec.labels:
        raise D2maeError(f"option '{where}.mask_column' in {source} needs labels: (a CSV)")


def _check_protocol(kind: str, params: list[str], where: str) -> None:
    """The protocol's parameters, checked before anything runs (the folds themselves are made by d2mae.data.labels)."""
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
    """Phantom options (:class:`d2mae.data.phantom.PhantomConfig` without ``out``), checked and with defaults filled."""

    value = {str(k).replace("-", "_"): v for k, v in value.items()}
    if "out" in value:
        raise D2maeError(f"option '{where}.out' in {source} is not allowed: phantoms are written into the "
                         "experiment's output folder")
    _check_section_types(PhantomConfig, value, where, source)
    cfg = _build(PhantomConfig, where, source, (value, f"{source}, section {where}"))
    out = to_dict(cfg)
    out.pop("out")
    out.pop("force")  # how it is written, not what: the stage's cache key stays the same
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


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML file, apply ``--set`` overrides and ``${ENV}`` variables, check everything."""
    data = load_yaml(path)
    source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        given = " ".join(overrides)
        source = f"{path} (with --set {given})" if len(given) <= 100 else f"{path} (with {len(overrides)} --set values)"
    return parse_experiment(expand_env(data, source), source)

"""The plan of an experiment: every stage with its folder and cache key, and the equal-budget check (the time
estimates are :mod:`d2mae.experiment.estimate`). Part of :mod:`d2mae.experiment`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from d2mae.data.folds import make_folds
from d2mae.data.labels import load_labeled
from d2mae.data.sources import find_images
from d2mae.experiment.config import LABEL_OPTIONS, PRESET_FIELDS, BudgetSpec, DatasetSpec, ExperimentConfig, _build
from d2mae.method.model_config import ModelConfig
from d2mae.method.presets import PRESETS
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.machine import machine_info
from d2mae.runtime.options import build_config, result_fields, to_dict
from d2mae.train.finetune_config import FinetuneConfig
from d2mae.train.pretrain_config import PretrainConfig

DONE = "stage_done.json"  # a finished stage (fine-tuning's fold_<k>/done.json is a fold's)
LEGACY_DONE = "DONE.json"  # the same marker as d2mae 0.2.0 named it
#: pre-training options that are the budget: every method's must agree, whatever its preset says
BUDGET_FIELDS = ("epochs", "max_steps", "batch_size", "accum_iter", "data", "img_size")
EXPERIMENT_CONFIG = "experiment.yaml"
PLAN_FILE = "plan.json"


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
            path = self.folder / LEGACY_DONE
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

    def missing_weights(self) -> dict[str, str]:
        """Methods whose ``weights:`` file does not exist (the plan shows them; running refuses them)."""
        return {m: w for m, w in self.config.weights.items() if not os.path.exists(w)}

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
        labeled = load_labeled(spec.labels, **{k: getattr(spec, k) for k in LABEL_OPTIONS})
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


def _result_options(cfg: Any) -> dict[str, Any]:
    """The options of a stage's config that change what it computes (a stage's cache key; the ``volatile`` ones —
    devices, workers, logging, output folders — are left out, as a resumed run may change them too)."""
    values = to_dict(cfg)
    return {k: values[k] for k in result_fields(type(cfg))}


def pretrain_budget(budget: BudgetSpec, n_images: int, accum_iter: int = 1) -> tuple[int, int | None, int]:
    """(epochs, max_steps, optimizer steps) of a pre-training on ``n_images`` images under ``budget``.

    An optimizer step takes ``batch × accum_iter`` images (the effective batch); each epoch uses the whole
    effective batches that fit (drop-last, as :class:`d2mae.data.sampler.EpochBatchSampler`).
    """
    batch = budget.pretrain_batch_size * max(1, accum_iter)
    steps_per_epoch = n_images // batch
    if budget.pretrain_images is None:
        epochs = int(budget.pretrain_epochs or 1)
        return epochs, None, epochs * steps_per_epoch
    steps = max(1, math.ceil(budget.pretrain_images / batch))
    return max(1, math.ceil(steps / max(1, steps_per_epoch))), steps, steps


def _start_options(method: Any, base: Stage | None, weights: str | None) -> dict[str, Any]:
    """The fine-tuning options that say where a method's classifier starts: a pre-trained folder of this
    experiment, a released checkpoint to import, or a timm backbone (from weights or from scratch)."""
    if method.source == "backbone":
        return {"backbone": method.backbone, "backbone_weights": weights, "pretrained": None,
                "mode": "full" if weights else "scratch"}
    if method.source == "checkpoint":
        return {"pretrained": weights, "mode": "full"}
    assert base is not None
    return {"pretrained": str(base.folder), "mode": method.mode}


def _data_stages(name: str, spec: DatasetSpec, dp: DatasetPlan, out: Path) -> list[Stage]:
    """A dataset's data stages: phantoms to generate, or the labeled images listed for pre-training."""
    stages: list[Stage] = []
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
    return stages


def _pretrain_stages(cfg: ExperimentConfig, name: str, dp: DatasetPlan, presets: Sequence[str], cache: Path,
                     epochs: int, max_steps: int | None) -> list[Stage]:
    """One pre-training stage per (seed, preset): every method's one pre-training run on the dataset."""
    stages: list[Stage] = []
    for seed in cfg.seeds:
        for preset in presets:
            pcfg = _build(
                PretrainConfig, "pretrain", cfg.source,
                ({**PRESETS[preset], "preset": preset}, f"preset '{preset}'"),
                (cfg.model, f"{cfg.source}, section model"), (cfg.pretrain, f"{cfg.source}, section pretrain"),
                ({"data": dp.pretrain_data, "out": "-", "seed": seed, "epochs": epochs, "max_steps": max_steps,
                  "batch_size": cfg.budget.pretrain_batch_size, "device": cfg.device, "resume": "auto",
                  "threads": cfg.threads},
                 "the experiment"))
            key = config_hash({"dataset": name, "data": dp.data_key,
                               "pretrain": _result_options(pcfg)})
            folder = cache / name / f"{preset}-seed{seed}-{key[:12]}"
            pcfg = dataclasses.replace(pcfg, out=str(folder))
            stage = Stage("pretrain", name, f"pre-train {preset} on {name} (seed {seed})", folder, key, pcfg,
                          seed=seed, preset=preset)
            stages.append(stage)
    return stages


def _finetune_stages(cfg: ExperimentConfig, name: str, spec: DatasetSpec, dp: DatasetPlan, out: Path,
                     pre_by: Mapping[tuple[str, int], Stage], arch_stage: Stage | None) -> list[Stage]:
    """One fine-tuning stage per (seed, method), each on its pre-trained (or scratch) starting point."""
    stages: list[Stage] = []
    runs = cfg.runs()
    for seed in cfg.seeds:
        for m in runs:
            base = pre_by[(m.preset, seed)] if m.preset is not None else (
                arch_stage if m.source == "scratch" else None)
            weights = cfg.weights.get(m.name)
            start = _start_options(m, base, weights)
            options = {k: getattr(spec, k) for k in LABEL_OPTIONS}
            options.update(labels=dp.labels, protocol=spec.protocol,
                           folds=",".join(spec.folds) if spec.folds else None,
                           keep_columns=[spec.scanner_column] if spec.scanner_column else None)
            fcfg = _build(
                FinetuneConfig, "finetune", cfg.source, (cfg.finetune, f"{cfg.source}, section finetune"),
                (options, f"{cfg.source}, section datasets.{name}"),
                ({**start, "out": "-", "obs": m.obs, "search_step": m.search_step,
                  "method": m.name, "seed": seed, "epochs": cfg.budget.finetune_epochs,
                  "batch_size": cfg.budget.finetune_batch_size, "device": cfg.device, "resume": True,
                  "threads": cfg.threads,
                  "arch": cfg.model.get("model", "vit_base_patch16"),
                  "img_size": int(cfg.model.get("img_size", 224)), "in_chans": int(cfg.model.get("in_chans", 1))},
                 f"method {m.name}"))
            origin = base.key if base is not None else _refs_digest([weights] if weights else [])
            key = config_hash({"dataset": name, "data": dp.data_key, "base": origin,
                               "finetune": _result_options(fcfg)})
            folder = out / "runs" / name / f"{m.name.replace(':', '-')}-seed{seed}-{key[:8]}"
            fcfg = dataclasses.replace(fcfg, out=str(folder))
            stages.append(Stage("finetune", name, f"fine-tune {m.name} on {name} (seed {seed})", folder, key,
                                fcfg, seed=seed, method=m.name, preset=m.preset,
                                needs=[base.id] if base is not None else []))
    return stages


def make_plan(cfg: ExperimentConfig, out: str | Path) -> Plan:
    """Every stage of the experiment, in run order, with resolved configs and cache keys (nothing is run).

    Raises:
        D2maeError: a missing dataset path, a bad column/protocol, or a violated equal-budget rule.
    """
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
        stages += _data_stages(name, spec, dp, out)
        accum = int(cfg.pretrain.get("accum_iter", 1))
        epochs, max_steps, _ = pretrain_budget(cfg.budget, dp.n_pretrain, accum)
        if dp.n_pretrain < cfg.budget.pretrain_batch_size * accum and presets:
            raise D2maeError(f"dataset '{name}' in {cfg.source}: {dp.n_pretrain} pre-training images are fewer "
                             f"than one optimizer step needs (budget.pretrain_batch_size "
                             f"{cfg.budget.pretrain_batch_size} × accum_iter {accum}); lower the batch size or add "
                             "images")
        arch_stage: Stage | None = None
        if any(m.preset is None and m.source == "scratch" for m in runs):
            arch_cfg = build_config(ModelConfig, (PRESETS["mae"], "preset mae"),
                                    (cfg.model, f"{cfg.source}, section model"))
            # every field, as before config.json dropped the other objectives' settings: the same keys
            arch_key = config_hash({"data": dp.data_key, "model": to_dict(arch_cfg), "stats_seed": 0})
            arch_stage = Stage("arch", name, f"untrained ViT for the supervised floor ({name})",
                               cache / name / f"scratch-vit-{arch_key[:12]}", arch_key,
                               {"model": arch_cfg, "data": dp.pretrain_data})
            stages.append(arch_stage)
        pre = _pretrain_stages(cfg, name, dp, presets, cache, epochs, max_steps)
        pre_by = {(s.preset, s.seed): s for s in pre}
        stages += pre
        stages += _finetune_stages(cfg, name, spec, dp, out, pre_by, arch_stage)
    plan = Plan(cfg, out, datasets, stages)
    check_equal_budget(plan)
    return plan


def check_equal_budget(plan: Plan) -> None:
    """The equal-budget rule: per dataset, every method's pre-training and fine-tuning differ only where the method
    itself differs (preset; OBS setting; scratch vs pre-trained; the seed).

    Pre-trainings must agree on every option but what the preset itself sets (its model fields, :data:`PRESET_FIELDS`,
    and its own recipe, e.g. MoCo v3's weight decay — never :data:`BUDGET_FIELDS`), ``preset`` and ``seed`` — the
    same data, epochs/steps, batch size (MoCo v3's two views of each image count once), learning-rate schedule and
    architecture. Fine-tunings must agree on every option but ``obs``, ``search_step``, ``mode``, ``method``,
    ``pretrained``, ``backbone``, ``backbone_weights`` and ``seed`` — the same
    labels, protocol and folds, epochs, batch size and recipe. Fine-tunings of the same seed share the fold seed, so
    they see the same folds.

    Raises:
        D2maeError: naming the dataset, the two stages and the first option that differs.
    """

    # what a preset sets is the method's own recipe (MoCo v3's weight decay), never the budget
    own = {k for preset in PRESETS.values() for k in preset} - set(BUDGET_FIELDS)
    pre_skip = set(PRESET_FIELDS) | own | {"preset", "seed", "out", "resume"}
    ft_skip = {"obs", "search_step", "mode", "method", "pretrained", "backbone", "backbone_weights", "seed", "out",
               "resume"}
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


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


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
    for m, w in plan.missing_weights().items():
        lines.append(f"  MISSING WEIGHTS: {m} needs {w} (not found); the run refuses to start until it is there")
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
        lines.append(f"{i:>3}  {s.label:<{width}}  {status:<8}  {format_seconds(est) if plan.estimated else '-'}")
    lines.append(f"{'':>3}  {'report (tables, figures)':<{width}}  {'to run':<8}  "
                 f"{format_seconds(15.0) if plan.estimated else '-'}")
    if plan.estimated:
        total += 15.0
        m = machine_info()
        lines.append("")
        lines.append(f"Estimated time: {format_seconds(total)} on this machine ({m['cpu']}, {m['cores']} cores, GPU: "
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

"""The plan of an experiment: every stage with its folder and cache key, and the equal-budget check (the time
estimates are :mod:`d2mae.experiment.estimate`). Part of :mod:`d2mae.experiment`."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from d2mae.experiment.config import PRESET_FIELDS, BudgetSpec, DatasetSpec, ExperimentConfig, _build
from d2mae.experiment.datasets import dataset_plan
from d2mae.experiment.forbidden import LABEL_OPTIONS
from d2mae.experiment.stage import DatasetPlan, Stage, config_hash, refs_digest
from d2mae.method.model_config import ARCHITECTURES, ModelConfig
from d2mae.method.presets import PRESETS
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.machine import machine_info
from d2mae.runtime.options import build_config, field_types, result_fields, to_dict
from d2mae.train.config import FinetuneConfig, ProbeConfig, SegmentConfig, own_fields
from d2mae.train.engine import DEFAULT_IMG_SIZE
from d2mae.train.pretrain import CHECKPOINTS
from d2mae.train.pretrain_config import PretrainConfig

#: pre-training options that are the budget: every method's must agree, whatever its preset says
BUDGET_FIELDS = ("epochs", "max_steps", "batch_size", "accum_iter", "data", "img_size")
EXPERIMENT_CONFIG = "experiment.yaml"
PLAN_FILE = "plan.json"
VIEWS = "views"  # the experiment's view pages (d2mae view), linked from the report
VIEW_IMAGES = 200  # the blur searches a page of an experiment shows (every test image gets a thumbnail)


# --------------------------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Every stage of an experiment in run order, with the datasets' sizes."""

    config: ExperimentConfig
    out: Path
    datasets: dict[str, DatasetPlan]
    stages: list[Stage]
    estimated: bool = False
    speed: dict[str, Any] = field(default_factory=dict)
    after_s: float = 0.0  # the view pages and the report, after the stages (estimated)

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


#: options added after d2mae 0.2.0: at these defaults they stay out of a stage's key, so earlier experiments resume
LATER_DEFAULTS: dict[str, Any] = {"label_fraction": 1.0, "trainable_blocks": None, "keep_steps": None}
#: the options segmentation took from fine-tuning when the two came to share one config
SEGMENT_LATER_DEFAULTS: dict[str, Any] = {**LATER_DEFAULTS, "classes": None, "folds_csv": None, "keep_columns": None,
                                          "strict": False}


def _result_options(cfg: Any) -> dict[str, Any]:
    """The options of a stage's config that change what it computes (a stage's cache key; the ``volatile`` ones —
    devices, workers, logging, output folders — are left out, as a resumed run may change them too).

    They are recorded as d2mae 0.2.0 recorded them, so that a finished experiment resumes with every stage skipped:
    renamed options under their old name, and settings now resolved when a config is made (a named ViT's width, a
    default column) at the value that stood for them then."""
    values = to_dict(cfg)
    model = isinstance(cfg, ModelConfig)  # pre-training: the architecture was 'model', its shape None
    renames = {"arch": "model"} if model else {"label_column": "stratify"} if isinstance(cfg, SegmentConfig) else {}
    later = SEGMENT_LATER_DEFAULTS if isinstance(cfg, SegmentConfig) else LATER_DEFAULTS
    out = {renames.get(k, k): values[k] for k in result_fields(type(cfg)) if not (k in later and values[k] == later[k])}
    if model:
        out.update(_shape_as_recorded(cfg))
    elif isinstance(cfg, SegmentConfig):
        out.update(stratify=out["stratify"] or "lesion", blr=5e-4 if cfg.blr is None else cfg.blr)
    else:
        out.update(label_column=out["label_column"] or "label", labels=out["labels"] or "",
                   img_size=out["img_size"] or DEFAULT_IMG_SIZE)
    return out


def _shape_as_recorded(mc: ModelConfig) -> dict[str, Any]:
    """A named ViT's own patch size, width, depth and heads as d2mae 0.2.0 recorded them: None."""
    return {k: None for k, v in ARCHITECTURES[mc.arch]._asdict().items() if getattr(mc, k) == v}


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


def _scratch_arch(cfg: ExperimentConfig) -> dict[str, Any]:
    """The architecture of the rows trained from scratch: the experiment's ``model:`` section."""
    return {"arch": cfg.model.get("arch", "vit_base_patch16"), "img_size": int(cfg.model.get("img_size", 224)),
            "in_chans": int(cfg.model.get("in_chans", 1))}


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


def kept_step(share: float, total_steps: int) -> int:
    """The optimizer step whose model stands for ``share`` of the pre-training budget (≥ 1)."""
    return max(1, round(share * total_steps))


def _pretrain_stages(cfg: ExperimentConfig, name: str, dp: DatasetPlan, presets: Sequence[str], cache: Path,
                     epochs: int, max_steps: int | None, total_steps: int) -> list[Stage]:
    """One pre-training stage per (seed, preset): every method's one pre-training run on the dataset (keeping the
    models of ``budget.checkpoints``' steps)."""
    stages: list[Stage] = []
    keep = sorted({kept_step(f, total_steps) for f in cfg.budget.checkpoints or () if f < 1.0}) or None
    for seed in cfg.seeds:
        for preset in presets:
            pcfg = _build(
                PretrainConfig, "pretrain", cfg.source,
                ({**PRESETS[preset], "preset": preset}, f"preset '{preset}'"),
                (cfg.model, f"{cfg.source}, section model"), (cfg.pretrain, f"{cfg.source}, section pretrain"),
                ({"data": dp.pretrain_data, "out": "-", "seed": seed, "epochs": epochs, "max_steps": max_steps,
                  "batch_size": cfg.budget.pretrain_batch_size, "device": cfg.device, "resume": "auto",
                  "threads": cfg.threads, "keep_steps": keep},
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
    cases = [(share, seed, m) for share in sorted(cfg.budget.label_fractions or [1.0], reverse=True)
             for seed in cfg.seeds for m in runs]  # the whole labels first (Table 2), then the fractions
    for share, seed, m in cases:
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
              "threads": cfg.threads, "label_fraction": share,
              **_scratch_arch(cfg)}, f"method {m.name}"))
        origin = base.key if base is not None else refs_digest([weights] if weights else [])
        key = config_hash({"dataset": name, "data": dp.data_key, "base": origin,
                           "finetune": _result_options(fcfg)})
        whole = share >= 1.0
        folder = out / "runs" / name / (f"{m.name.replace(':', '-')}-seed{seed}"
                                        f"{'' if whole else f'-labels{share:g}'}-{key[:8]}")
        fcfg = dataclasses.replace(fcfg, out=str(folder))
        label = f"fine-tune {m.name} on {name} (seed {seed}{'' if whole else f', {share:.0%} of the labels'})"
        stages.append(Stage("finetune" if whole else "label_fraction", name, label, folder, key, fcfg,
                            seed=seed, method=m.name, preset=m.preset, needs=[base.id] if base is not None else [],
                            share=share))
    return stages


def _probe_stages(cfg: ExperimentConfig, name: str, spec: DatasetSpec, dp: DatasetPlan, out: Path,
                  pre_by: Mapping[tuple[str, int], Stage], total_steps: int) -> list[Stage]:
    """Pre-training curves: ``d2mae probe`` (linear probe and kNN) on each kept checkpoint of every pre-trained
    method (``budget.checkpoints``; 1.0 is the final model), with the method's OBS setting, on the same folds."""
    stages: list[Stage] = []
    for share in cfg.budget.checkpoints or []:
        for seed in cfg.seeds:
            for m in cfg.runs():
                if m.preset is None:
                    continue
                base = pre_by[(m.preset, seed)]
                step = kept_step(share, total_steps)
                model = base.folder if share >= 1.0 else base.folder / CHECKPOINTS / f"step{step}"
                options = {k: getattr(spec, k) for k in LABEL_OPTIONS}
                options.update(labels=dp.labels, protocol=spec.protocol,
                               folds=",".join(spec.folds) if spec.folds else None)
                layers = ((cfg.finetune, f"{cfg.source}, section finetune"),
                          (options, f"{cfg.source}, section datasets.{name}"),
                          ({"pretrained": str(model), "out": "-", "obs": m.obs, "search_step": m.search_step,
                            "method": m.name, "seed": seed, "device": cfg.device, "threads": cfg.threads,
                            "epochs": cfg.budget.finetune_epochs, "batch_size": cfg.budget.finetune_batch_size},
                           f"method {m.name}"))
                probe_keys = set(field_types(ProbeConfig))
                own = [({k: v for k, v in layer.items() if k in probe_keys}, where) for layer, where in layers]
                pcfg = _build(ProbeConfig, "finetune", cfg.source, *own)
                # the key of d2mae 0.2.0, whose probe took every fine-tuning option (and fine-tunes with them)
                recorded = _result_options(_build(FinetuneConfig, "finetune", cfg.source, *layers))
                kept = set(result_fields(ProbeConfig))
                recorded.update({k: getattr(pcfg, k) for k in own_fields(ProbeConfig) if k in kept})
                key = config_hash({"dataset": name, "data": dp.data_key, "base": base.key, "step": step,
                                   "probe": recorded})
                folder = out / "runs" / name / "probes" / f"{m.name}-seed{seed}-step{step}-{key[:8]}"
                stages.append(Stage("probe", name, f"probe {m.name} at {share:.0%} of pre-training on {name} "
                                                   f"(seed {seed})", folder, key,
                                    dataclasses.replace(pcfg, out=str(folder)), seed=seed, method=m.name,
                                    preset=m.preset, needs=[base.id], share=share))
    return stages


def _segment_stages(cfg: ExperimentConfig, name: str, spec: DatasetSpec, dp: DatasetPlan, out: Path,
                    pre_by: Mapping[tuple[str, int], Stage], arch_stage: Stage | None) -> list[Stage]:
    """One ``d2mae segment`` stage per (seed, method): the ``segment:`` section's decoder (FPN by default) on each
    pre-trained encoder or on the same ViT from scratch (``supervised``: the untrained ViT of the ``arch`` stage,
    the pre-trained rows' architecture), or the smp U-Net (``unet``), every one on the same folds and budget."""
    stages: list[Stage] = []
    for seed in cfg.seeds:
        for m in cfg.runs():
            if m.source in ("checkpoint", "backbone"):
                raise D2maeError(f"method {m.name} in {cfg.source} cannot segment dataset '{name}': d2mae segment "
                                 "starts from this experiment's pre-trained encoders, a scratch ViT or the U-Net; "
                                 "leave the method out")
            base = pre_by[(m.preset, seed)] if m.preset is not None else (
                arch_stage if m.source == "scratch" else None)  # the ViT from scratch: the pre-trained rows' shape
            start: dict[str, Any] = {"pretrained": str(base.folder) if base else None,
                                     "mode": m.mode}
            if m.source == "unet":
                start["decoder"] = "unet"
            scfg = _build(
                SegmentConfig, "segment", cfg.source, (cfg.segment, f"{cfg.source}, section segment"),
                (spec.segment_options(dp.labels if spec.phantoms is not None else None),
                 f"{cfg.source}, section datasets.{name}"),
                ({**start, "out": "-", "obs": m.obs, "search_step": m.search_step, "method": m.name, "seed": seed,
                  "epochs": cfg.budget.finetune_epochs, "batch_size": cfg.budget.finetune_batch_size,
                  "device": cfg.device, "resume": True, "threads": cfg.threads,
                  **_scratch_arch(cfg)}, f"method {m.name}"))
            key = config_hash({"dataset": name, "data": dp.data_key, "base": base.key if base else m.source,
                               "segment": _result_options(scfg)})
            folder = out / "runs" / name / f"{m.name}-seed{seed}-{key[:8]}"
            stages.append(Stage("segment", name, f"segment with {m.name} on {name} (seed {seed})", folder, key,
                                dataclasses.replace(scfg, out=str(folder)), seed=seed, method=m.name,
                                preset=m.preset, needs=[base.id] if base is not None else []))
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
        dp = dataset_plan(spec, out, cfg.source, cfg.seeds[0])
        datasets[name] = dp
        stages += _data_stages(name, spec, dp, out)
        accum = int(cfg.pretrain.get("accum_iter", 1))
        epochs, max_steps, _ = pretrain_budget(cfg.budget, dp.n_pretrain, accum)
        if dp.n_pretrain < cfg.budget.pretrain_batch_size * accum and presets:
            raise D2maeError(f"dataset '{name}' in {cfg.source}: {dp.n_pretrain} pre-training images are fewer "
                             f"than one optimizer step needs (budget.pretrain_batch_size "
                             f"{cfg.budget.pretrain_batch_size} × accum_iter {accum}); lower the batch size or add "
                             "images")
        if spec.task == "classify" and any(m.source == "unet" for m in runs):
            raise D2maeError(f"method unet in {cfg.source} segments; dataset '{name}' classifies (add task: segment "
                             "and masks to it, or leave unet out)")
        arch_stage: Stage | None = None
        if any(m.preset is None and m.source == "scratch" for m in runs):
            arch_cfg = build_config(ModelConfig, (PRESETS["mae"], "preset mae"),
                                    (cfg.model, f"{cfg.source}, section model"))
            # every field, as before config.json dropped the other objectives' settings: the same keys
            recorded = {("model" if k == "arch" else k): v for k, v in to_dict(arch_cfg).items()}
            arch_key = config_hash({"data": dp.data_key, "model": {**recorded, **_shape_as_recorded(arch_cfg)},
                                    "stats_seed": 0})
            arch_stage = Stage("arch", name, f"untrained ViT for the supervised floor ({name})",
                               cache / name / f"scratch-vit-{arch_key[:12]}", arch_key,
                               {"model": arch_cfg, "data": dp.pretrain_data})
            stages.append(arch_stage)
        _, _, total_steps = pretrain_budget(cfg.budget, dp.n_pretrain, accum)
        pre = _pretrain_stages(cfg, name, dp, presets, cache, epochs, max_steps, total_steps)
        pre_by = {(s.preset, s.seed): s for s in pre}
        stages += pre
        if spec.task == "segment":
            stages += _segment_stages(cfg, name, spec, dp, out, pre_by, arch_stage)
        else:
            stages += _finetune_stages(cfg, name, spec, dp, out, pre_by, arch_stage)
            stages += _probe_stages(cfg, name, spec, dp, out, pre_by, total_steps)
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
    seg_skip = {"obs", "search_step", "method", "pretrained", "decoder", "feature_size", "mode", "seed", "out",
                "resume"}
    probe_skip = ft_skip | {"model"}
    arch_fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in PRESET_FIELDS + ("mean", "std")]
    for name in plan.datasets:
        groups = [(plan.of("pretrain", name), pre_skip, "pre-training"),
                  (plan.of("finetune", name), ft_skip, "fine-tuning"),
                  (plan.of("segment", name), seg_skip, "segmentation"),
                  (plan.of("probe", name), probe_skip, "probe")]
        for share in {s.share for s in plan.of("label_fraction", name)}:
            groups.append(([s for s in plan.of("label_fraction", name) if s.share == share], ft_skip,
                           f"fine-tuning on {share:.0%} of the labels"))
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
                     f"{'segmentation' if dp.spec.task == 'segment' else 'fine-tuning'} {b.finetune_epochs} "
                     f"epochs × batch {b.finetune_batch_size}, the same folds")
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
    lines.append(f"{'':>3}  {'views and report (tables, figures)':<{width}}  {'to run':<8}  "
                 f"{format_seconds(plan.after_s) if plan.estimated else '-'}")
    if plan.estimated:
        total += plan.after_s
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

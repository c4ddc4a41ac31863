"""Time estimates for ``d2mae experiment --plan``: a few steps of each method's model timed at the configured batch on
this machine, scaled to every stage of the plan."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from d2mae.data.dataset import ImageDataset
from d2mae.data.decode import load_image
from d2mae.data.labels import load_labeled
from d2mae.data.phantom import generate_phantoms
from d2mae.eval.figures import save_figure
from d2mae.eval.metrics import SCALAR_METRICS
from d2mae.eval.statistics import bootstrap
from d2mae.experiment.forbidden import LABEL_OPTIONS
from d2mae.experiment.methods import method_for
from d2mae.experiment.plan import VIEW_IMAGES, Plan
from d2mae.experiment.stage import DatasetPlan, Stage
from d2mae.io.imports import encoder_architecture
from d2mae.method.backbones import BackboneConfig, TimmClassifier
from d2mae.method.model_config import ModelConfig, default_stats
from d2mae.method.models import DeblurClassifier, DeblurMAE
from d2mae.method.objectives import build_objective
from d2mae.method.presets import PRESETS
from d2mae.runtime.device import amp_dtype, autocast, resolve_device
from d2mae.runtime.options import build_config
from d2mae.segment.data import SegmentDataset
from d2mae.segment.model import UNetConfig, build_segmenter
from d2mae.train.engine import DEFAULT_IMG_SIZE
from d2mae.train.optim import adamw
from d2mae.view.images import thumbnail


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


def _sync(device: Any) -> None:
    if device.type == "cuda":

        torch.cuda.synchronize(device)


def _amp(device: Any, precision: str, model_cfg: Any) -> Any:
    """The autocast dtype a run of ``precision`` takes for this model (its width decides ``auto`` on a CPU)."""
    return amp_dtype(device, precision, getattr(model_cfg, "embed_dim", None))


def _time_objective(model: Any, x: Any, precision: str = "auto") -> dict[str, float]:
    """Seconds per image of a pre-training step (forward, backward, AdamW) of any objective on batch x [B, C, S, S]
    (repeated into its views) in the precision the run takes, and for the masked autoencoder of one OBS level (in
    fp32, as OBS searches)."""

    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)  # as training's
    b = x.shape[0]
    views = x if model.views == 1 else x.unsqueeze(1).expand(b, model.views, *x.shape[1:])
    drawn = {k: v.to(x.device) for k, v in model.draw(torch.Generator().manual_seed(0), b).items()}
    progress = model.progress_inputs(0.5)
    amp = _amp(x.device, precision, getattr(model, "config", None))

    def pre_step() -> None:
        with autocast(x.device, amp):
            loss, _, _ = model(views, **drawn, **progress)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(x.device)

    out = {"pretrain_step": _time_steps(pre_step) / b}
    if hasattr(model, "deblur_loss"):
        t = torch.ones(b, device=x.device)  # [B]

        def obs_step() -> None:
            with torch.no_grad():
                model.deblur_loss(x, t)
            _sync(x.device)

        out["obs_level"] = _time_steps(obs_step) / b
    return out


def _time_downstream(model: Any, x: Any, y: Any, precision: str = "auto") -> tuple[float, float]:
    """Seconds per image of a training step (cross-entropy against ``y``, AdamW) and of inference of a classifier
    (``y`` [B]) or a segmenter (``y`` [B, S, S]; cross-entropy stands in for Dice + CE), on batch x [B, C, S, S], in
    the precision the run takes."""

    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    t = torch.ones(len(x), device=x.device)  # [B]
    amp = _amp(x.device, precision, getattr(model, "config", None))

    def train_step() -> None:
        with autocast(x.device, amp):
            loss = torch.nn.functional.cross_entropy(model(x, t), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(x.device)

    def eval_step() -> None:
        with torch.no_grad(), autocast(x.device, amp):
            model.eval()
            model(x, t)
            model.train()
        _sync(x.device)

    return _time_steps(train_step) / len(x), _time_steps(eval_step) / len(x)


def _time_classifier(clf: Any, x: Any, precision: str = "auto") -> dict[str, float]:
    """Seconds per image of a fine-tuning step and of inference of the classifier, on batch x."""
    step, infer = _time_downstream(clf, x, torch.zeros(len(x), dtype=torch.long, device=x.device), precision)
    return {"finetune_step": step, "eval": infer}


def _time_segmenter(seg: Any, x: Any, precision: str = "auto") -> dict[str, float]:
    """Seconds per image of a segmentation training step and of inference, on batch x [B, C, S, S]."""
    y = torch.zeros(len(x), x.shape[-2], x.shape[-1], dtype=torch.long, device=x.device)  # [B, S, S]
    step, infer = _time_downstream(seg, x, y, precision)
    return {"segment_step": step, "segment_eval": infer}


def measure_speed(model_cfg: ModelConfig, device: str, pretrain_batch: int, finetune_batch: int,
                  num_classes: int, sample_refs: Sequence[str], augment: str = "finetune",
                  pretrain_precision: str = "auto", finetune_precision: str = "auto") -> dict[str, float]:
    """Seconds per image of each kind of work, timed here on the configured model (not a guess).

    Times one pre-training step (forward, backward, AdamW) of the D²MAE model, one fine-tuning step of the
    classifier, inference (each in the precision its stage takes), one OBS forward pass per level, and
    decoding/augmenting a few of the dataset's images.
    Steps run at the configured batch sizes when that is cheap (per-image cost falls with the batch on a CPU), and
    at fewer images for big models, so that a ViT-B at 224 px takes seconds, not minutes, to time.
    """

    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    # per-image work of one encoder pass ~ width² × tokens × blocks; ~1.1e9 ≈ a batch of 64 ViT-Tiny images at 96 px
    work = model_cfg.embed_dim ** 2 * (model_cfg.num_patches + 2) * model_cfg.depth
    cap = max(4, int(1.1e9 // max(1, work)))
    bp = max(1, min(pretrain_batch, cap))
    bf = max(1, min(finetune_batch, cap))
    c, s = model_cfg.in_chans, model_cfg.img_size
    torch.manual_seed(0)
    x = torch.rand(bp, c, s, s, generator=gen).to(dev)  # [bp, C, S, S]
    out.update(_time_objective(DeblurMAE(model_cfg).to(dev), x, pretrain_precision))
    xf = torch.rand(bf, c, s, s, generator=gen).to(dev)  # [bf, C, S, S]
    out.update(_time_classifier(DeblurClassifier(model_cfg, num_classes).to(dev), xf, finetune_precision))
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


def _time_outputs(refs: Sequence[str], n_test: int, num_classes: int, n_bootstrap: int) -> dict[str, float]:
    """Seconds of the work around the training, timed here: an evaluation's percentile bootstraps of every metric
    over ``n_test`` predictions and one of its figures (``figure``); per image of a view page, a thumbnail
    (decoded and written, ``thumbnail``)."""
    rng = np.random.default_rng(0)
    n, k = max(n_test, 2), max(num_classes, 2)
    y = np.arange(n) % k  # [n], every class present
    probs = rng.dirichlet(np.ones(k), size=n)  # [n, K]
    t0 = time.perf_counter()
    for m in SCALAR_METRICS:
        bootstrap(y, probs, m, n_resamples=n_bootstrap, seed=0, y_pred=probs.argmax(1))
    out = {"bootstrap": time.perf_counter() - t0}
    with tempfile.TemporaryDirectory(prefix="d2mae-plan-") as tmp:
        t0 = time.perf_counter()
        fig = Figure(figsize=(5, 4))
        fig.add_subplot().hist(rng.random(n), bins=20)
        save_figure(fig, Path(tmp) / "figure.png")
        out["figure"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for ref in refs[:4]:
            (Path(tmp) / "thumb.png").write_bytes(thumbnail(load_image(ref)))
        out["thumbnail"] = (time.perf_counter() - t0) / max(1, len(refs[:4]))
    return out


def _method_speeds(plan: Plan, name: str, speed: dict[str, Any], device: str, num_classes: int) -> None:
    """Time the pre-training objectives other than the masked autoencoder, and the classifiers that are not the
    experiment's ViT (timm backbones, imported checkpoints' architectures), once each, into ``speed``."""

    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(0)
    for s in plan.of("pretrain", name):
        mc = s.payload.model_config()
        key = f"pretrain_step:{mc.objective}"
        if mc.objective != "mae" and key not in speed:
            x = torch.rand(min(s.payload.batch_size, 16), mc.in_chans, mc.img_size, mc.img_size, generator=gen)
            timed = _time_objective(build_objective(mc).to(dev), x.to(dev), s.payload.precision)
            speed[key] = timed["pretrain_step"]
    for s in plan.of("finetune", name):
        fc = s.payload
        imported = method_for(str(s.method)).source == "checkpoint"
        if not (fc.backbone or imported) or f"finetune_step:{s.method}" in speed:
            continue
        c, size = fc.in_chans, fc.img_size or DEFAULT_IMG_SIZE
        if fc.backbone:
            clf: Any = TimmClassifier(BackboneConfig(fc.backbone, size, c, *default_stats(c)), num_classes)
        else:  # the checkpoint's ViT; the released ones are ViT-B/16 when the file is not here yet
            found = os.path.exists(fc.pretrained)
            arch = encoder_architecture(fc.pretrained) if found else {"arch": "vit_base_patch16"}
            clf = DeblurClassifier(ModelConfig(**arch, img_size=size, in_chans=c, blur=False, blur_embed="none"),
                                   num_classes)
        x = torch.rand(min(fc.batch_size, 8), c, size, size, generator=gen).to(dev)
        timed = _time_classifier(clf.to(dev), x, fc.precision)
        speed[f"finetune_step:{s.method}"], speed[f"eval:{s.method}"] = timed["finetune_step"], timed["eval"]


def _segment_speeds(plan: Plan, name: str, speed: dict[str, Any], device: str, model_cfg: ModelConfig,
                    refs: Sequence[str]) -> None:
    """Time each decoder of the dataset's segmentation stages once (on the experiment's ViT; smp's U-Net), at the
    configured batch, and reading and augmenting an image with its mask (``segment_augment``; empty masks of the
    images' sizes stand in for the real ones)."""
    dev = resolve_device(device)
    segments = plan.of("segment", name)
    for s in segments:
        sc = s.payload
        key = f"segment:{sc.decoder}"
        if key in speed:
            continue
        config: Any = model_cfg
        if sc.decoder == "unet":
            mean, std = default_stats(model_cfg.in_chans)
            config = UNetConfig(encoder=sc.unet_encoder, img_size=model_cfg.img_size, in_chans=model_cfg.in_chans,
                                mean=mean, std=std)
        seg = build_segmenter(sc.decoder, config, plan.datasets[name].num_classes, sc.feature_size, sc.drop_path)
        x = torch.rand(min(sc.batch_size, 16), model_cfg.in_chans, model_cfg.img_size, model_cfg.img_size,
                       generator=torch.Generator().manual_seed(0)).to(dev)
        speed[key] = _time_segmenter(seg.to(dev), x, sc.precision)
    if segments and refs:
        sc = segments[0].payload
        with tempfile.TemporaryDirectory(prefix="d2mae-plan-") as tmp:
            masks = []
            for i, ref in enumerate(refs[:4]):
                masks.append(str(Path(tmp) / f"{i}.png"))
                Image.fromarray(np.zeros(load_image(ref).shape[:2], np.uint8)).save(masks[-1])
            ds = SegmentDataset(refs[:4], masks, model_cfg.img_size, model_cfg.in_chans, 2,
                                augment="strong" if sc.augment == "auto" else sc.augment, crop_scale=sc.crop_scale,
                                hflip=sc.hflip)
            ds[0]  # MONAI's first call
            t0 = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            speed["segment_augment"] = (time.perf_counter() - t0) / len(ds)


def expected_epochs(epochs: int, patience: int) -> float:
    """Epochs a fold is expected to train. Without early stopping, all of them; with it, a fold stops ``patience``
    epochs after its best one, and with nothing known of where that epoch falls it is taken as uniform over
    1 … E: the expectation of min(E, b + patience) over b (16 epochs with patience 6: 13.2; the demo's 12 folds ran
    13.2 on average)."""
    if patience <= 0 or patience >= epochs:
        return float(epochs)
    return sum(min(epochs, b + patience) for b in range(1, epochs + 1)) / epochs


def _downstream_estimate(cfg: Any, dp: DatasetPlan, step: float, infer: float, augment: float, decode: float,
                         setup: float, truths: int) -> float:
    """Seconds of one fine-tuning or segmentation run: ``setup`` (OBS) once, then per fold the expected epochs
    (each training image decoded and augmented, and a step; the validation images at inference, their views decoded
    once per fold and kept), then the best epoch's predictions of the validation and test images (each decoded, with
    ``truths`` more files per image: a segmentation mask)."""
    total = setup
    epochs = expected_epochs(cfg.epochs, cfg.patience)
    for _, n_train, n_val, n_test in dp.folds:
        total += epochs * (n_train * (step + augment) + n_val * infer) + n_val * decode * (1 + truths)
        total += (n_val + n_test) * (infer + decode * (1 + truths))
    return total


def _segment_estimate(scfg: Any, dp: DatasetPlan, speed: Mapping[str, Any], levels: int) -> float:
    """Seconds of one segmentation run (:func:`_downstream_estimate`); with ``tta`` every inference runs twice."""
    timed = speed[f"segment:{scfg.decoder}"]
    obs = dp.n_labeled * (levels * speed["obs_level"] + speed["decode"]) if levels else 0.0
    infer = timed["segment_eval"] * (2 if scfg.tta else 1)
    augment = speed.get("segment_augment", speed["augment"] + speed["decode"])
    return _downstream_estimate(scfg, dp, timed["segment_step"], infer, augment, speed["decode"], obs,
                                truths=1) + speed["evaluate"]


def _finetune_estimate(fcfg: Any, dp: DatasetPlan, speed: Mapping[str, float], levels: int) -> float:
    """Seconds of one fine-tuning run (:func:`_downstream_estimate`); OBS searches the images of the folds."""
    obs = 0.0
    if fcfg.mode != "scratch" and fcfg.obs == "search":
        used = sum(tr + va + te for _, tr, va, te in dp.folds[:1]) if dp.folds else dp.n_labeled
        obs = used * (levels * speed["obs_level"] + speed["decode"])
    return _downstream_estimate(fcfg, dp, speed["finetune_step"], speed["eval"], speed["augment"], speed["decode"],
                                obs, truths=0) + speed["evaluate"]


def _searched_levels(stage: Stage, stages: Mapping[str, Any]) -> int:
    """Levels OBS searches for a downstream stage: its pre-training's schedule under its OBS setting (0: none)."""
    base = stages.get(stage.needs[0]) if stage.needs else None
    if base is None or base.kind != "pretrain" or stage.payload.spec.mode != "search":
        return 0
    return len(stage.payload.spec.levels(base.payload.schedule))


def estimate_plan(plan: Plan, sample_refs: Mapping[str, Sequence[str]] | None = None) -> Plan:
    """Fill ``estimate_s`` of every stage from :func:`measure_speed` on this machine (timed per dataset)."""

    cfg = plan.config
    stages = {s.id: s for s in plan.stages}
    for name, dp in plan.datasets.items():
        refs = list((sample_refs or {}).get(name, []))
        tmp = None
        phantom_s = 0.0
        try:
            if dp.spec.phantoms is not None:

                tmp = tempfile.mkdtemp(prefix="d2mae-plan-")
                size = int(dp.spec.phantoms["size"])
                t0 = time.perf_counter()
                labels = generate_phantoms(tmp, n=4, size=size, seed=0)
                phantom_s = (time.perf_counter() - t0) / 4
                refs = [str(Path(tmp) / r["path"]) for r in csv.DictReader(open(labels, encoding="utf-8"))]
            elif not refs and dp.sample:
                refs = list(dp.sample)
            elif not refs:

                refs = load_labeled(dp.labels, **{k: getattr(dp.spec, k) for k in LABEL_OPTIONS}).refs[:6]
            model_cfg = build_config(ModelConfig, (PRESETS["d2mae"], "preset d2mae"),
                                     (cfg.model, f"{cfg.source}, section model"))
            fine = [s.payload for s in plan.of("finetune", name)]
            augment = fine[0].resolved_augment() if fine else "finetune"
            pre = plan.of("pretrain", name)
            down = fine or [s.payload for s in plan.of("segment", name)]
            speed = measure_speed(model_cfg, cfg.device, cfg.budget.pretrain_batch_size,
                                  cfg.budget.finetune_batch_size, dp.num_classes, refs, augment,
                                  pre[0].payload.precision if pre else "auto",
                                  down[0].precision if down else "auto")
            n_test = sum(te for *_, te in dp.folds) or dp.n_labeled
            speed.update(_time_outputs(refs, n_test, dp.num_classes, cfg.report.n_bootstrap))
            _segment_speeds(plan, name, speed, cfg.device, model_cfg, refs)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        speed["phantom"] = phantom_s
        _method_speeds(plan, name, speed, cfg.device, dp.num_classes)
        classify = dp.spec.task != "segment"  # its evaluation: bootstraps of 4 metrics, ROC/confusion/σ* figures
        speed["evaluate"] = speed["bootstrap"] + 3 * speed["figure"] if classify else speed["figure"]
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
                per_image = speed.get(f"pretrain_step:{p.objective}", speed["pretrain_step"])
                s.estimate_s = steps * eff * per_image + dp.n_pretrain * speed["decode"] + 2.0
            elif s.kind in ("finetune", "label_fraction"):  # label_fraction: the training parts cut to its share
                levels = _searched_levels(s, stages)
                own = {k: speed[f"{k}:{s.method}"] for k in ("finetune_step", "eval") if f"{k}:{s.method}" in speed}
                data = dp if s.share >= 1.0 else dataclasses.replace(
                    dp, folds=[(f, max(1, round(tr * s.share)), va, te) for f, tr, va, te in dp.folds])
                s.estimate_s = _finetune_estimate(s.payload, data, {**speed, **own}, levels)
            elif s.kind == "probe":  # OBS and the features of every labeled image once; scikit-learn takes seconds
                levels = _searched_levels(s, stages)
                s.estimate_s = dp.n_labeled * (levels * speed["obs_level"] + speed["eval"] + 2 * speed["decode"]) + 5
            elif s.kind == "segment":
                s.estimate_s = _segment_estimate(s.payload, dp, speed, _searched_levels(s, stages))
    plan.after_s = _views_estimate(plan, stages) + _report_estimate(plan)
    plan.estimated = True
    return plan


def _views_estimate(plan: Plan, stages: Mapping[str, Any]) -> float:
    """Seconds of the experiment's view pages (:func:`d2mae.experiment.runner.write_views`): per fine-tuning or
    segmentation run a thumbnail of each test image (and its mask overlay), and for a run with an
    OBS search the restorations of the first ``VIEW_IMAGES`` at every level; the D²MAE-vs-MAE page again."""
    total, runs = 0.0, {}
    for s in plan.stages:
        if s.kind not in ("finetune", "segment"):
            continue
        speed, dp = plan.speed[s.dataset], plan.datasets[s.dataset]
        rows = sum(te for *_, te in dp.folds)  # a page shows the test images
        levels = _searched_levels(s, stages)
        page = rows * speed["thumbnail"] * (2 if s.kind == "segment" else 1)
        if levels:
            page += min(rows, VIEW_IMAGES) * (levels * speed["obs_level"] + speed["thumbnail"])
        runs[(s.dataset, s.seed, s.method)] = page
        total += page
    for (dataset, seed, method), page in runs.items():
        if method == "d2mae" and (dataset, seed, "mae") in runs:
            total += page + runs[(dataset, seed, "mae")]
    return total


def _report_estimate(plan: Plan) -> float:
    """Seconds of the report: per run its metrics and a paired test against the best method (bootstraps), and
    about one figure per run and per dataset's OBS, ROC, curves and examples."""
    total = 0.0
    for name, speed in plan.speed.items():
        n_runs = sum(1 for s in plan.stages if s.dataset == name and s.kind in ("finetune", "segment", "probe"))
        total += n_runs * (speed["bootstrap"] + speed["figure"]) + 4 * speed["figure"]
    return total

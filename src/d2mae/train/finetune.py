"""Blurriness-aware fine-tuning (Section 2.3, Algorithm 1) under the paper's evaluation protocols (Section 3.1).

For every image OBS (:func:`d2mae.eval.obs.run_obs`) gives the level t* once, before training. Then, fold by fold,
:class:`d2mae.train.fold.FoldTrainer` trains the classifier on images blurred on the device at their own σ_{t*},
t* given to the blur token (Algorithm 1 lines 11-14), and the epoch with the best validation macro-F1 predicts the
validation and test parts.

``f_θ`` is :class:`d2mae.method.models.DeblurClassifier`: the pre-trained encoder (blur token included), average
pooling and a linear head. The recipe is MAE's fine-tuning recipe, through timm (:mod:`d2mae.train.optim`): AdamW
with layer-wise lr decay, lr = blr × global batch / 256 with per-step warm-up + cosine, drop path 0.1, label
smoothing 0.1, RandAugment + random erasing, optional Mixup/CutMix, bf16 autocast where the device supports it. The
paper's settings (ViT-B, "following MAE"): blr 5e-4, layer decay 0.65, weight decay 0.05, batch 32.

Modes: ``full`` (the above), ``linear`` (linear probe: encoder frozen, a BatchNorm without affine parameters before
the head, SGD with momentum, no weight decay; drop path 0; RandomResizedCrop + flip) and ``scratch`` (the same ViT,
randomly initialised: the supervised baseline; no OBS, t = 0; no layer-wise decay).

Outputs in ``--out``::

    finetune.yaml             resolved config
    obs/                      the OBS table used (obs.csv, obs.json, obs_summary.md, σ* histogram)
    predictions.csv           path,fold,split,label,label_name,pred,prob_<class>…,t_star,sigma_star[,kept columns]
    run.json                  classes, protocol, folds, method, seed, settings, timings
    fold_<k>/metrics.jsonl    one line per epoch: train loss, val loss, val macro-F1, val accuracy, lr, seconds
    tensorboard/fold_<k>/     the same as TensorBoard scalars, when tensorboard is installed
    fold_<k>/model/           classifier.safetensors + config.json + pretrained/ (for OBS on new images)
    fold_<k>/resume.pt        while training: resume state, at most every checkpoint_every_seconds (weights_only)

More than one process (``torchrun --nproc_per_node N -m d2mae finetune …``): each epoch's global order (seeded by
(seed, fold, epoch); class-balanced with ``--balance sampler``) is cut into global batches of B·N images and each
rank takes its slice, so N processes see the same images per step as one process with batch B·N, at lr = blr × B·N
/ 256. OBS, validation and test are sharded and gathered in order, so every rank makes the same model-selection
decisions; stop signals are agreed each step; only rank 0 writes. Drop path, Mixup and ``--balance loss`` are per
rank.

Resume: ``--resume`` skips finished folds and continues the current one from its last finished epoch, with the same
weights as an uninterrupted run (same number of processes). SIGTERM/SIGINT stop at the next step; the command exits
with 128 + the signal number (143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader

from d2mae.data.dataset import ImageDataset, SeededDataset
from d2mae.data.decode import compute_stats
from d2mae.data.folds import Fold, fold_summary
from d2mae.data.labels import labels_inputs
from d2mae.data.sampler import EpochBatchSampler
from d2mae.io.artifacts import load_weights, save_classifier, save_weights
from d2mae.io.obs_table import sigmas_of
from d2mae.io.predictions import DONE, PREDICTIONS, RUN_JSON, finished_fold, prediction_fields
from d2mae.method.backbones import BackboneConfig, backbone_classifier
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import build_classifier, freeze_all_but_last_blocks
from d2mae.runtime.distributed import DistContext, barrier, distributed_run, on_main
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import (
    atomic_write_json,
    atomic_write_text,
    csv_text,
    load_checkpoint,
    read_csv_rows,
    save_checkpoint,
)
from d2mae.runtime.locks import output_lock
from d2mae.runtime.logs import MetricsLog
from d2mae.runtime.options import save_config
from d2mae.runtime.outputs import claim_folder
from d2mae.runtime.seeds import derive_seed
from d2mae.runtime.signals import StopSignals
from d2mae.runtime.threads import configure_threads
from d2mae.train.finetune_config import FinetuneConfig, method_name
from d2mae.train.finetune_setup import RUN_CONFIG, FinetuneSetup
from d2mae.train.fold import FoldTrainer
from d2mae.train.interrupts import Interrupted
from d2mae.train.optim import make_optimizer, warmup_cosine_scheduler

RESUME = "resume.pt"


# ------------------------------------------------------------------------------------------------------- the run


@dataclass
class FoldState:
    """Where a fold's training stands: epochs done, optimiser steps, the best validation macro-F1 so far."""

    epoch: int = 0
    step: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "best_f1": self.best_f1, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}


def _cpu_copy(obj: Any) -> Any:
    """A copy of a state dict (nested dicts and lists of tensors) on the CPU, detached from the live tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class FoldCheckpoint:
    """A fold's resume state: written at an epoch end at most every ``checkpoint_every_seconds``; in between, the
    last finished epoch's state is kept in memory, so that a stop signal in the middle of an epoch still writes it
    (the resumed fold then redoes only the interrupted epoch). Only rank 0 writes."""

    def __init__(self, fold_dir: Path, fold: str, ctx: DistContext, saved_epoch: int) -> None:
        self.path, self.best_path = fold_dir / RESUME, fold_dir / "best.safetensors"
        self.fold, self.ctx = fold, ctx
        self.saved_epoch = saved_epoch  # the epoch whose state resume.pt holds
        self.saved_at = time.perf_counter()
        self.best_saved = True  # the best weights on disk are the best so far
        self.pending: dict[str, Any] | None = None  # a finished epoch's state not yet on disk

    def age(self) -> float:
        return time.perf_counter() - self.saved_at

    def epoch_done(self, state: FoldState, trainer: FoldTrainer, best: dict[str, torch.Tensor] | None,
                   due: bool) -> None:
        """After an epoch's validation: write its state now when ``due``, else keep a copy to write on a stop."""
        snapshot = {"format": "d2mae-finetune-resume", "fold": self.fold, **state.to_dict(),
                    "world_size": self.ctx.world_size, "model": trainer.model.state_dict(),
                    "optimizer": trainer.optimizer.state_dict()}
        if due:
            self._write(snapshot, best)
        elif self.ctx.is_main:
            self.pending = _cpu_copy(snapshot)

    def write_pending(self, best: dict[str, torch.Tensor] | None) -> None:
        if self.pending is not None:
            self._write(self.pending, best)

    def _write(self, snapshot: dict[str, Any], best: dict[str, torch.Tensor] | None) -> None:
        if self.ctx.is_main:
            if not self.best_saved and best is not None:
                save_weights(best, self.best_path)
            save_checkpoint(snapshot, self.path)
        self.saved_at, self.best_saved, self.saved_epoch = time.perf_counter(), True, int(snapshot["epoch"])
        self.pending = None


class FinetuneRun(FinetuneSetup):
    """One fine-tuning run on this process (of one or more): the set-up of :class:`FinetuneSetup`, then one
    training per fold."""

    # -- everything ---------------------------------------------------------------------------------------------
    def run(self) -> Path:
        self.setup()
        self.t_star, obs_seconds = self.blur_levels()
        schedule = self.model_config.schedule if self.model_config else None
        self.sigma_star = sigmas_of(schedule, self.t_star) if schedule else np.zeros(len(self.t_star))
        if self.ctx.is_main:
            save_config(self.cfg, self.out / RUN_CONFIG)  # from here on the folder holds a run (resumable)
        method = method_name(self.cfg, self.pretrained_meta)
        details = []
        started = time.perf_counter()
        for fold in self.folds:
            self.say(fold_summary(self.labeled, fold))
            details.append(self.run_fold(fold))
            if self.ctx.is_main:
                self._write_outputs(method, details, obs_seconds, time.perf_counter() - started)
        self.say(f"fine-tuning done: {self.out / PREDICTIONS}, {self.out / RUN_JSON}")
        barrier(self.ctx)  # every rank returns once rank 0 has written the outputs
        return self.out

    def run_fold(self, fold: Fold) -> dict[str, Any]:
        """Train one fold (or skip it if it finished before), predict its validation and test parts."""
        cfg, ctx = self.cfg, self.ctx
        fold_dir = self.out / f"fold_{fold.name}"
        done = on_main(ctx, lambda: finished_fold(fold_dir))
        if done is not None:
            self.say(f"fold {fold.name}: already finished, skipped")
            return done
        trainer, loader, sampler = self.fold_trainer(fold)
        state, best = self._resume_fold(fold, trainer)
        t_train = torch.as_tensor(self.t_star[fold.train], dtype=torch.float32)  # [n_train], by dataset index
        val = [self.labeled.refs[i] for i in fold.val]
        started = time.perf_counter()
        ckpt = FoldCheckpoint(fold_dir, fold.name, ctx, state.epoch)
        with StopSignals() as stop, self._log(fold, state.epoch) as log:
            for epoch in range(state.epoch, cfg.epochs):
                if state.bad_epochs >= cfg.patience > 0:
                    break
                t0 = time.perf_counter()
                loss, seen, early = trainer.train_epoch(loader, sampler, t_train, epoch, (cfg.seed, fold.number),
                                                        stop, f"fold {fold.name} epoch {epoch + 1}/{cfg.epochs}"
                                                        if cfg.progress else None)
                self._stop_early(fold, epoch, ckpt, best, early, stop.signum)
                train_seconds = time.perf_counter() - t0
                v = trainer.validate(val, self.t_star[fold.val], self.labeled.labels[fold.val],
                                     batch_size=cfg.eval_batch_size, workers=cfg.workers)
                state.epoch, state.step = epoch + 1, trainer.step
                if v.macro_f1 > state.best_f1:
                    state.best_f1, state.best_epoch, state.bad_epochs = v.macro_f1, epoch + 1, 0
                    best = {k: p.detach().to("cpu", copy=True) for k, p in trainer.model.state_dict().items()}
                    ckpt.best_saved = False
                else:
                    state.bad_epochs += 1
                record = {"epoch": epoch + 1, "train_loss": round(loss, 6), "val_loss": round(v.loss, 6),
                          "val_macro_f1": round(v.macro_f1, 6), "val_accuracy": round(v.accuracy, 6),
                          "lr": max(g["lr"] for g in trainer.optimizer.param_groups), "best_epoch": state.best_epoch,
                          "seconds": round(time.perf_counter() - t0, 3),
                          "images_per_s": round(seen / max(train_seconds, 1e-9), 2)}
                if ctx.is_main:
                    log.write(record)
                stopping = trainer.any_rank(stop.signum is not None)
                ckpt.epoch_done(state, trainer, best, due=stopping or ckpt.age() >= cfg.checkpoint_every_seconds)
                self.say(f"fold {fold.name} epoch {epoch + 1}/{cfg.epochs}: train loss {loss:.4f}, val macro-F1 "
                         f"{v.macro_f1:.4f} (best {state.best_f1:.4f} @ {state.best_epoch}), lr {record['lr']:.2e}, "
                         f"{record['seconds']:.1f} s")
                if stopping:
                    raise Interrupted(int(stop.signum or signal.SIGTERM),
                                      f"after fold {fold.name}, epoch {epoch + 1} (saved in {fold_dir / RESUME})")
        trainer.model.load_state_dict(best)
        return self._finish_fold(fold, trainer, state, time.perf_counter() - started)

    # -- one fold's parts ---------------------------------------------------------------------------------------
    def fold_trainer(self, fold: Fold) -> tuple[FoldTrainer, DataLoader, EpochBatchSampler]:
        """The fold's classifier, optimiser, lr schedule, loss and Mixup, and its seeded, sharded loader."""
        cfg, ctx, dev = self.cfg, self.ctx, self.device
        if ctx.is_main:
            (self.out / f"fold_{fold.name}").mkdir(parents=True, exist_ok=True)
        model = self._model_for_fold(fold).to(dev)
        labels = self.labeled.labels[fold.train]
        counts = np.bincount(labels, minlength=len(self.labeled.classes))
        sampler = self._sampler(fold, counts)
        total_steps = cfg.epochs * sampler.micro_steps
        warmup_steps = round(cfg.warmup_epochs * sampler.micro_steps)
        if cfg.warmup_epochs >= cfg.epochs and warmup_steps:
            warmup_steps = max(1, round(0.1 * total_steps))
            if fold is self.folds[0]:
                self.say(f"note: --warmup-epochs ({cfg.warmup_epochs:g}) is not shorter than --epochs ({cfg.epochs}); "
                         f"warming up over the first 10% of the steps instead")
        optimizer = make_optimizer(model, cfg, ctx.world_size)
        mixup = None
        if cfg.mixing:

            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                          label_smoothing=cfg.smoothing, num_classes=len(self.labeled.classes))
        trainer = FoldTrainer(model, optimizer, warmup_cosine_scheduler(optimizer, total_steps, warmup_steps,
                                                                        cfg.min_lr),
                              self._criterion(counts), dev, precision=cfg.precision, ctx=ctx, mixup=mixup,
                              clip_grad=cfg.clip_grad, linear_probe=cfg.mode == "linear")
        data = ImageDataset([self.labeled.refs[i] for i in fold.train], model.config.img_size, model.config.in_chans,
                            augment=cfg.resolved_augment(), labels=labels.tolist())
        loader = DataLoader(SeededDataset(data), batch_sampler=sampler, num_workers=cfg.workers,
                            pin_memory=dev.type == "cuda", persistent_workers=cfg.workers > 0)
        return trainer, loader, sampler

    def _model_for_fold(self, fold: Fold) -> nn.Module:
        cfg = self.cfg
        if cfg.backbone:  # a timm classifier, normalised with the fold's training images' statistics

            mean, std = compute_stats([self.labeled.refs[i] for i in fold.train], cfg.in_chans, seed=cfg.seed)
            torch.manual_seed(derive_seed(cfg.seed, fold.number, 0))
            config = BackboneConfig(cfg.backbone, cfg.img_size, cfg.in_chans, mean, std)
            state = dict(self.backbone_state) if self.backbone_state is not None else None  # timm may edit it
            return backbone_classifier(config, len(self.labeled.classes), cfg.drop_path, state,
                                       cfg.backbone_weights or "")
        config = self.model_config
        if config is None:  # scratch without a pre-trained folder: a ViT of --arch, normalised with train stats
            mean, std = compute_stats([self.labeled.refs[i] for i in fold.train], cfg.in_chans, seed=cfg.seed)
            config = ModelConfig(model=cfg.arch, img_size=cfg.img_size, in_chans=cfg.in_chans, mean=mean, std=std,
                                 blur=False, blur_embed="none")
        torch.manual_seed(derive_seed(cfg.seed, fold.number, 0))
        model = build_classifier(config, len(self.labeled.classes), cfg.mode, cfg.drop_path)
        if cfg.mode != "scratch":
            model.load_encoder(self.mae.state_dict())
        if cfg.trainable_blocks is not None:
            freeze_all_but_last_blocks(model, cfg.trainable_blocks)
        return model

    def _sampler(self, fold: Fold, counts: np.ndarray) -> EpochBatchSampler:
        """The fold's training batches: each epoch's global order (a permutation, or with ``--balance sampler`` a
        class-balanced draw with replacement), seeded by (seed, fold, epoch), cut into global batches of
        batch × processes, of which this rank takes its slice. The last, partial global batch is kept unless it has
        a single image (or fewer than one per process) or Mixup/CutMix is on (it needs full batches)."""
        cfg, ctx = self.cfg, self.ctx
        n, world = len(fold.train), ctx.world_size
        if cfg.mixing and n < cfg.batch_size * world:
            raise D2maeError(f"fold {fold.name}: {n} training images are fewer than one batch of {cfg.batch_size} × "
                             f"{world} process(es); Mixup/CutMix needs full batches — lower it", option="batch_size")
        if n < max(2, world):
            raise D2maeError(f"fold {fold.name}: {n} training image(s) are too few to train on with {world} "
                             "process(es)")
        weights = None
        if cfg.balance == "sampler":
            weights = 1.0 / counts[self.labeled.labels[fold.train]]  # [n_train]: each class drawn equally often
        return EpochBatchSampler(n, cfg.batch_size, derive_seed(cfg.seed, fold.number), ctx.rank, world,
                                 weights=weights, min_last=None if cfg.mixing else 2)

    def _criterion(self, counts: np.ndarray) -> nn.Module:
        cfg = self.cfg
        if cfg.mixing:

            return SoftTargetCrossEntropy()  # Mixup applies the label smoothing to the soft targets
        weight = None
        if cfg.balance == "loss":

            y = np.repeat(np.arange(len(counts)), counts)
            weight = torch.as_tensor(compute_class_weight("balanced", classes=np.arange(len(counts)), y=y),
                                     dtype=torch.float32)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.smoothing)

    def _resume_fold(self, fold: Fold, trainer: FoldTrainer) -> tuple[FoldState, dict[str, torch.Tensor] | None]:
        """The fold's state and best weights so far: from its ``resume.pt`` with ``--resume``, else a fresh start."""
        cfg, ctx = self.cfg, self.ctx
        fold_dir = self.out / f"fold_{fold.name}"
        path, best_path = fold_dir / RESUME, fold_dir / "best.safetensors"
        if not on_main(ctx, lambda: bool(cfg.resume and path.is_file())):  # every rank reads it (shared --out)
            if ctx.is_main:
                best_path.unlink(missing_ok=True)
            return FoldState(), None
        saved = load_checkpoint(path)
        if int(saved.get("world_size", 1)) != ctx.world_size:
            raise D2maeError(f"cannot resume {path}: it was written by {saved.get('world_size', 1)} process(es), this "
                             f"run has {ctx.world_size}; resume with the same number", option="resume")
        trainer.model.load_state_dict(saved["model"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        state = FoldState(**{k: saved[k] for k in FoldState().to_dict()})
        trainer.step = state.step
        self.say(f"fold {fold.name}: resuming after epoch {state.epoch}")
        return state, (load_weights(best_path) if state.best_epoch else None)

    def _stop_early(self, fold: Fold, epoch: int, ckpt: FoldCheckpoint, best: dict[str, torch.Tensor] | None,
                    early: Any, signum: int | None) -> None:
        """Raise for an epoch that ended early: a non-finite loss (no update applied) or a stop signal, which first
        writes the last finished epoch's state (kept in memory when it was not yet written)."""
        if early is None:
            return
        if not early.finite:
            raise D2maeError(f"fold {fold.name} epoch {epoch + 1}: the loss became {early.loss}; lower the learning "
                             "rate", option="blr")
        ckpt.write_pending(best)
        note = (f"state after epoch {ckpt.saved_epoch} is in {ckpt.path}" if ckpt.saved_epoch
                else "no epoch had finished; a resumed fold starts over")
        raise Interrupted(int(signum or signal.SIGTERM), f"in fold {fold.name}, epoch {epoch + 1} ({note})")

    def _log(self, fold: Fold, resume_at: int) -> Any:
        if not self.ctx.is_main:

            return contextlib.nullcontext()
        return MetricsLog(self.out / f"fold_{fold.name}" / "metrics.jsonl", "epoch", self.cfg.tensorboard,
                          self.out / "tensorboard" / f"fold_{fold.name}", resume_at=resume_at,
                          tag=f"fold_{fold.name}")

    def _finish_fold(self, fold: Fold, trainer: FoldTrainer, state: FoldState, seconds: float) -> dict[str, Any]:
        """The best epoch's predictions of the validation and test parts; the fold's model folder and files."""
        cfg, ctx = self.cfg, self.ctx
        fold_dir = self.out / f"fold_{fold.name}"
        rows = []
        for split, idx in (("val", fold.val), ("test", fold.test)):
            probs = trainer.predict([self.labeled.refs[i] for i in idx], self.t_star[idx],
                                    batch_size=cfg.eval_batch_size, workers=cfg.workers)
            rows.extend(self._rows(fold.name, split, idx, probs))
        test_rows = [r for r in rows if r["split"] == "test"]
        test_acc = float(np.mean([int(r["label"]) == int(r["pred"]) for r in test_rows])) if test_rows else math.nan
        done = {"fold": fold.name, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
                "best_epoch": state.best_epoch, "best_val_macro_f1": round(state.best_f1, 6),
                "epochs_run": state.epoch, "train_seconds": round(seconds, 3), "test_accuracy": round(test_acc, 6)}
        if ctx.is_main:
            save_classifier(trainer.model, fold_dir / "model", self.labeled.classes, self.spec, self._settings(),
                            self.pretrained if cfg.mode != "scratch" else None, self.pretrained_hash)
            fields = prediction_fields(self.labeled.classes, cfg.keep_columns or [])
            atomic_write_text(fold_dir / PREDICTIONS, csv_text(fields, rows))
            atomic_write_json(fold_dir / DONE, done)
            for name in (RESUME, "best.safetensors"):
                (fold_dir / name).unlink(missing_ok=True)
        self.say(f"fold {fold.name}: best epoch {state.best_epoch} (val macro-F1 {state.best_f1:.4f}), "
                 f"test accuracy {test_acc:.4f}")
        return done

    def _rows(self, fold: str, split: str, idx: np.ndarray, probs: np.ndarray) -> list[dict[str, Any]]:
        lab = self.labeled
        rows = []
        for j, i in enumerate(idx):
            row: dict[str, Any] = {"path": lab.refs[i], "fold": fold, "split": split, "label": int(lab.labels[i]),
                                   "label_name": lab.classes[lab.labels[i]], "pred": int(np.argmax(probs[j]))}
            for c, name in enumerate(lab.classes):
                row[f"prob_{name}"] = f"{probs[j, c]:.6f}"
            row["t_star"] = f"{self.t_star[i]:g}"
            row["sigma_star"] = f"{self.sigma_star[i]:g}"
            for col in self.cfg.keep_columns or []:
                row[col] = lab.columns[col][i]
            rows.append(row)
        return rows

    def _write_outputs(self, method: str, details: list[dict[str, Any]], obs_seconds: float, seconds: float) -> None:
        cfg = self.cfg
        rows: list[dict[str, str]] = []
        for f in self.folds:
            path = self.out / f"fold_{f.name}" / PREDICTIONS
            if path.is_file():
                rows.extend(read_csv_rows(path))
        atomic_write_text(self.out / PREDICTIONS,
                          csv_text(prediction_fields(self.labeled.classes, cfg.keep_columns or []), rows))
        atomic_write_json(self.out / RUN_JSON, {
            "classes": self.labeled.classes, "protocol": cfg.protocol, "folds": [d["fold"] for d in details],
            "method": method, "seed": cfg.seed, "mode": cfg.mode, "obs": self.spec.to_dict(),
            "pretrained": str(self.pretrained.absolute()) if self.pretrained else None,
            "pretrained_sha256": self.pretrained_hash, "backbone": cfg.backbone,
            "backbone_weights": cfg.backbone_weights, "labels": str(cfg.labels), "n_images": len(self.labeled),
            "keep_columns": cfg.keep_columns or [], "leak_check": self.leaks, "fold_details": details,
            "obs_seconds": round(obs_seconds, 3), "seconds": round(seconds, 3),
            "finetune": self._settings()})

    def _settings(self) -> dict[str, Any]:
        cfg = self.cfg
        world = self.ctx.world_size
        return {"mode": cfg.mode, "epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs,
                "batch_size": cfg.batch_size, "world_size": world, "lr": cfg.resolved_lr(world), "min_lr": cfg.min_lr,
                "layer_decay": 1.0 if cfg.mode == "scratch" else cfg.layer_decay,
                "weight_decay": 0.0 if cfg.mode == "linear" else cfg.weight_decay,
                "drop_path": 0.0 if cfg.mode == "linear" else cfg.drop_path, "smoothing": cfg.smoothing,
                "mixup": cfg.mixup, "cutmix": cfg.cutmix, "balance": cfg.balance, "augment": cfg.resolved_augment(),
                "patience": cfg.patience, "seed": cfg.seed, "optimizer": "sgd" if cfg.mode == "linear" else "adamw",
                "label_fraction": cfg.label_fraction, "trainable_blocks": cfg.trainable_blocks}


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune (Algorithm 1) on every selected fold; returns the output folder (see the module docstring).

    Under torchrun (``RANK``/``WORLD_SIZE`` set) each process trains on its slice of every batch with
    DistributedDataParallel and only rank 0 writes; every rank returns the same folder.

    Raises:
        D2maeError: bad input, before any training starts.
        Interrupted: SIGTERM/SIGINT (``exit_code`` 128 + signal); continue with ``resume=True``.
    """
    if not cfg.out:
        raise D2maeError("is required: the folder for the fine-tuning run", option="out")
    inputs = [cfg.pretrained, *labels_inputs(cfg.labels, cfg.path_column, cfg.image_root, cfg.image_ext),
              cfg.folds_csv, cfg.obs_table, cfg.backbone_weights]
    with distributed_run(cfg.device) as (ctx, device):
        on_main(ctx, lambda: claim_folder(cfg.out, "finetune", inputs, resumable=True, forceable=False))
        with output_lock(cfg.out, "finetune", ctx):
            configure_threads(cfg.threads)
            return FinetuneRun(cfg, ctx, device).run()

"""Blurriness-aware lesion segmentation (beyond the paper): ``d2mae segment``.

As fine-tuning does for classes (Section 2.3, Algorithm 1), OBS gives every image its t* once, before training;
then, fold by fold, the segmenter (:mod:`d2mae.segment.model`) is trained on images blurred on the device at their
own σ_{t*}, with t* fed to the blur token, against their masks (never blurred; resized by nearest neighbour with
the image's crop, :mod:`d2mae.segment.data`). Loss: MONAI's ``DiceCELoss`` (soft Dice + cross-entropy). Optimiser:
``finetune``'s — AdamW over timm's layer-wise lr decay groups (the decoder at lr scale 1), per-step warm-up and
cosine. The epoch with the best validation Dice predicts the test part. Every metric is computed at each image's
own size: the logits are upsampled, the truth never resized (:mod:`d2mae.segment.metrics`).

Outputs: :mod:`d2mae.segment.files`. One process (torchrun is refused); ``--resume`` skips finished folds and
continues the current one from its last saved epoch.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from d2mae.data.dataset import SeededDataset
from d2mae.data.folds import Fold, fold_summary
from d2mae.data.labels import labels_inputs
from d2mae.data.sampler import EpochBatchSampler
from d2mae.io.artifacts import load_weights
from d2mae.io.predictions import DONE, RUN_JSON, finished_fold
from d2mae.runtime.device import amp_dtype, autocast, resolve_device
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_json, atomic_write_text, csv_text, load_checkpoint, read_csv_rows
from d2mae.runtime.locks import output_lock
from d2mae.runtime.logs import MetricsLog
from d2mae.runtime.options import save_config
from d2mae.runtime.outputs import claim_folder
from d2mae.runtime.seeds import derive_seed, seed_everything
from d2mae.runtime.signals import StopSignals
from d2mae.runtime.threads import configure_threads
from d2mae.segment.config import RUN_CONFIG, SegmentConfig
from d2mae.segment.data import SegmentDataset
from d2mae.segment.files import (
    PER_IMAGE,
    PER_IMAGE_FIELDS,
    PREDICTIONS_DIR,
    RUN_KIND,
    mask_name,
    save_segmenter,
    write_mask,
)
from d2mae.segment.masks import read_mask
from d2mae.segment.metrics import image_scores
from d2mae.segment.model import build_segmenter
from d2mae.segment.predict import native_probs
from d2mae.segment.setup import SegmentSetup
from d2mae.train.finetune import RESUME, FoldCheckpoint, FoldState
from d2mae.train.interrupts import Interrupted
from d2mae.train.optim import make_optimizer, warmup_cosine_scheduler


class FoldModel:
    """A fold's segmenter with its optimiser and step count (what :class:`FoldCheckpoint` saves)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.step = 0


class SegmentRun(SegmentSetup):
    """One segmentation run: :class:`SegmentSetup`, then one training per fold, then the outputs."""

    def run(self) -> Path:
        self.setup()
        self.t_star, self.sigma_star, obs_seconds = self.blur_levels()
        save_config(self.cfg, self.out / RUN_CONFIG)  # from here on the folder holds a run (resumable)
        method = self.cfg.method_name(self.preset)
        details, started = [], time.perf_counter()
        for fold in self.folds:
            self.say(fold_summary(self.data.labeled, fold))
            details.append(self.run_fold(fold))
            self._write_outputs(method, details, obs_seconds, time.perf_counter() - started)
        self.say(f"segmentation done: {self.out / PER_IMAGE}, {self.out / PREDICTIONS_DIR}/")
        return self.out

    # -- one fold ---------------------------------------------------------------------------------------------
    def run_fold(self, fold: Fold) -> dict[str, Any]:
        cfg = self.cfg
        fold_dir = self.out / f"fold_{fold.name}"
        done = finished_fold(fold_dir)
        if done is not None:
            self.say(f"fold {fold.name}: already finished, skipped")
            return done
        fold_dir.mkdir(parents=True, exist_ok=True)
        trainer, loader, sampler, criterion = self._fold_trainer(fold)
        state, best = self._resume_fold(fold_dir, trainer)
        t_train = torch.as_tensor(self.t_star[fold.train], dtype=torch.float32)  # [n_train], by dataset index
        val_views, val_truths = self._views(fold.val), self._truths(fold.val)  # read once, scored every epoch
        ckpt = FoldCheckpoint(fold_dir, fold.name, self.ctx, state.epoch)
        started = time.perf_counter()
        with StopSignals() as stop, MetricsLog(fold_dir / "metrics.jsonl", "epoch", "off", None,
                                               resume_at=state.epoch) as log:
            for epoch in range(state.epoch, cfg.epochs):
                if state.bad_epochs >= cfg.patience > 0:
                    break
                t0 = time.perf_counter()
                loss, seen = self._train_epoch(trainer, loader, sampler, criterion, t_train, epoch, fold, stop)
                if stop.signum is not None:
                    ckpt.write_pending(best)
                    raise Interrupted(int(stop.signum), f"in fold {fold.name}, epoch {epoch + 1} (state after epoch "
                                                        f"{ckpt.saved_epoch} is in {ckpt.path})")
                val_dice = float(np.mean([s["dice"] for s in self._score(trainer.model, fold.val, val_views,
                                                                             truths=val_truths)]))
                state.epoch, state.step = epoch + 1, trainer.step
                if val_dice > state.best_f1:  # FoldState's best_f1 holds the best validation Dice here
                    state.best_f1, state.best_epoch, state.bad_epochs = val_dice, epoch + 1, 0
                    best = {k: p.detach().to("cpu", copy=True) for k, p in trainer.model.state_dict().items()}
                    ckpt.best_saved = False
                else:
                    state.bad_epochs += 1
                seconds = time.perf_counter() - t0
                log.write({"epoch": epoch + 1, "train_loss": round(loss, 6), "val_dice": round(val_dice, 6),
                           "lr": max(g["lr"] for g in trainer.optimizer.param_groups),
                           "best_epoch": state.best_epoch, "seconds": round(seconds, 3),
                           "images_per_s": round(seen / max(seconds, 1e-9), 2)})
                ckpt.epoch_done(state, trainer, best, due=ckpt.age() >= cfg.checkpoint_every_seconds)
                self.say(f"fold {fold.name} epoch {epoch + 1}/{cfg.epochs}: train loss {loss:.4f}, val Dice "
                         f"{val_dice:.4f} (best {state.best_f1:.4f} @ {state.best_epoch}), {seconds:.1f} s")
        trainer.model.load_state_dict(best)
        return self._finish_fold(fold, trainer, state, time.perf_counter() - started)

    def _fold_trainer(self, fold: Fold) -> tuple[FoldModel, DataLoader, EpochBatchSampler, nn.Module]:
        cfg = self.cfg
        if len(fold.train) < 2:
            raise D2maeError(f"fold {fold.name}: {len(fold.train)} training image(s) are too few to train on")
        torch.manual_seed(derive_seed(cfg.seed, fold.number, 0))
        model = build_segmenter(cfg.decoder, self.model_config_for(fold.train), self.data.num_classes,
                                cfg.feature_size, cfg.drop_path)
        if self.mae is not None:
            model.load_encoder(self.mae.state_dict())
        model = model.to(self.device)
        sampler = EpochBatchSampler(len(fold.train), cfg.batch_size, derive_seed(cfg.seed, fold.number), 0, 1,
                                    min_last=2)
        total = cfg.epochs * sampler.micro_steps
        warmup = min(round(cfg.warmup_epochs * sampler.micro_steps), max(0, total - 1))
        optimizer = make_optimizer(model, cfg)
        trainer = FoldModel(model, optimizer, warmup_cosine_scheduler(optimizer, total, warmup, cfg.min_lr))
        lab = self.data.labeled
        data = SegmentDataset([lab.refs[i] for i in fold.train], [self.data.masks[i] for i in fold.train],
                              self.img_size, self.in_chans, self.data.num_classes, augment=True,
                              crop_scale=cfg.crop_scale, hflip=cfg.hflip)
        loader = DataLoader(SeededDataset(data), batch_sampler=sampler, num_workers=cfg.workers,
                            persistent_workers=cfg.workers > 0)
        from monai.losses import DiceCELoss  # lazy (segment/model.py)

        return trainer, loader, sampler, DiceCELoss(to_onehot_y=True, softmax=True)

    def _train_epoch(self, trainer: FoldModel, loader: DataLoader, sampler: EpochBatchSampler, criterion: nn.Module,
                     t_train: torch.Tensor, epoch: int, fold: Fold, stop: StopSignals) -> tuple[float, int]:
        """One epoch: each batch blurred at its images' σ_{t*} inside the model, t* to BLU(t)."""
        cfg, dev, model = self.cfg, self.device, trainer.model
        sampler.set_epoch(epoch)
        model.train()
        amp = amp_dtype(dev, cfg.precision)
        loss_sum, seen = 0.0, 0
        for m, (x, y, idx) in enumerate(loader):  # x [B, C, S, S], y [B, S, S], idx [B]
            if stop.signum is not None:
                break
            trainer.scheduler.step_update(num_updates=trainer.step)
            seed_everything(derive_seed(cfg.seed, fold.number, epoch + 1, m + 1))
            x, y = x.to(dev), y.to(dev)
            with autocast(dev, amp):
                logits = model(x, t_train[idx].to(dev))  # [B, K, S, S]
            loss = criterion(logits.float(), y[:, None])
            if not torch.isfinite(loss):
                raise D2maeError(f"fold {fold.name} epoch {epoch + 1}: the loss became {float(loss)}; lower the "
                                 "learning rate", option="blr")
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            trainer.optimizer.step()
            trainer.step += 1
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
        return loss_sum / max(seen, 1), seen

    def _views(self, idx: np.ndarray) -> torch.Tensor:
        """The whole-image views [n, C, S, S] of images ``idx``, decoded once (validated every epoch)."""
        lab = self.data.labeled
        data = SegmentDataset([lab.refs[i] for i in idx], [""] * len(idx), self.img_size, self.in_chans,
                              self.data.num_classes)
        if not len(idx):
            return torch.zeros(0, self.in_chans, self.img_size, self.img_size)
        return torch.stack([data.image(j) for j in range(len(idx))])

    def _score(self, model: nn.Module, idx: np.ndarray, views: torch.Tensor | None = None,
               keep: list[np.ndarray] | None = None, truths: list[np.ndarray] | None = None
               ) -> list[dict[str, float]]:
        """Dice / IoU / HD95 of images ``idx`` at their own size against ``truths`` (their masks, read here when not
        given); ``keep`` collects the predicted masks."""
        truths = truths if truths is not None else self._truths(idx)
        probs = native_probs([model], [self.data.labeled.refs[i] for i in idx], self.t_star[idx], self.device,
                             self.cfg.eval_batch_size, self.cfg.precision, views, [m.shape for m in truths])
        scores = []
        for p, truth in zip(probs, truths):
            pred = p.argmax(axis=0).astype(np.uint8)  # [H, W]
            if keep is not None:
                keep.append(pred)
            scores.append(image_scores(pred, truth, self.data.num_classes))
        return scores

    def _truths(self, idx: np.ndarray) -> list[np.ndarray]:
        """The masks of images ``idx``, class indices uint8 [H, W] each."""
        return [read_mask(self.data.masks[i], self.data.num_classes) for i in idx]

    def _resume_fold(self, fold_dir: Path, trainer: FoldModel) -> tuple[FoldState, dict[str, torch.Tensor] | None]:
        path, best_path = fold_dir / RESUME, fold_dir / "best.safetensors"
        if not (self.cfg.resume and path.is_file()):
            best_path.unlink(missing_ok=True)
            return FoldState(), None
        saved = load_checkpoint(path)
        trainer.model.load_state_dict(saved["model"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        state = FoldState(**{k: saved[k] for k in FoldState().to_dict()})
        trainer.step = state.step
        self.say(f"{fold_dir.name}: resuming after epoch {state.epoch}")
        return state, (load_weights(best_path) if state.best_epoch else None)

    def _finish_fold(self, fold: Fold, trainer: FoldModel, state: FoldState, seconds: float) -> dict[str, Any]:
        """The best epoch's masks of the validation and test parts, their scores, the fold's model folder."""
        fold_dir = self.out / f"fold_{fold.name}"
        lab, rows = self.data.labeled, []
        for split, idx in (("val", fold.val), ("test", fold.test)):
            preds: list[np.ndarray] = []
            truths = self._truths(idx)
            scores = self._score(trainer.model, idx, keep=preds, truths=truths)
            for i, s, pred, truth in zip(idx, scores, preds, truths):
                if split == "test":
                    write_mask(self.out / PREDICTIONS_DIR / mask_name(lab.ids[i]), pred, self.data.num_classes)
                rows.append({"id": lab.ids[i], "path": lab.refs[i], "mask": self.data.masks[i], "fold": fold.name,
                             "split": split, "dice": f"{s['dice']:.8f}", "iou": f"{s['iou']:.8f}",
                             "hd95": "nan" if math.isnan(s["hd95"]) else f"{s['hd95']:.6f}",
                             "lesion_pixels": int((pred > 0).sum()),
                             "truth_pixels": int((truth > 0).sum()), "t_star": f"{self.t_star[i]:g}",
                             "sigma_star": f"{self.sigma_star[i]:g}"})
        test = [float(r["dice"]) for r in rows if r["split"] == "test"]
        done = {"fold": fold.name, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
                "best_epoch": state.best_epoch, "best_val_dice": round(state.best_f1, 6), "epochs_run": state.epoch,
                "train_seconds": round(seconds, 3), "test_dice": round(float(np.mean(test)), 6) if test else None}
        save_segmenter(trainer.model, fold_dir / "model", self.cfg.decoder, self.spec, self._settings(),
                       self.pretrained, self.pretrained_hash)
        atomic_write_text(fold_dir / PER_IMAGE, csv_text(PER_IMAGE_FIELDS, rows))
        atomic_write_json(fold_dir / DONE, done)
        for name in (RESUME, "best.safetensors"):
            (fold_dir / name).unlink(missing_ok=True)
        self.say(f"fold {fold.name}: best epoch {state.best_epoch} (val Dice {state.best_f1:.4f}), test Dice "
                 f"{done['test_dice']}")
        return done

    def _write_outputs(self, method: str, details: list[dict[str, Any]], obs_seconds: float, seconds: float) -> None:
        rows: list[dict[str, str]] = []
        for f in self.folds:
            path = self.out / f"fold_{f.name}" / PER_IMAGE
            if path.is_file():
                rows.extend(read_csv_rows(path))
        atomic_write_text(self.out / PER_IMAGE, csv_text(PER_IMAGE_FIELDS, rows))
        cfg = self.cfg
        atomic_write_json(self.out / RUN_JSON, {
            "kind": RUN_KIND, "method": method, "protocol": cfg.protocol, "folds": [d["fold"] for d in details],
            "seed": cfg.seed, "num_classes": self.data.num_classes, "decoder": cfg.decoder,
            "obs": self.spec.to_dict(), "pretrained": str(self.pretrained.absolute()) if self.pretrained else None,
            "pretrained_sha256": self.pretrained_hash, "n_images": len(self.data),
            "strata": self.data.labeled.classes, "leak_check": self.leaks, "fold_details": details,
            "obs_seconds": round(obs_seconds, 3), "seconds": round(seconds, 3), "segment": self._settings()})

    def _settings(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"decoder": cfg.decoder, "feature_size": cfg.feature_size, "epochs": cfg.epochs,
                "warmup_epochs": cfg.warmup_epochs, "batch_size": cfg.batch_size, "lr": cfg.resolved_lr(),
                "min_lr": cfg.min_lr, "layer_decay": cfg.layer_decay if cfg.mode == "full" else 1.0,
                "weight_decay": cfg.weight_decay, "drop_path": cfg.drop_path, "crop_scale": cfg.crop_scale,
                "hflip": cfg.hflip, "patience": cfg.patience, "seed": cfg.seed, "loss": "DiceCELoss"}


def segment(cfg: SegmentConfig) -> Path:
    """Train and test a segmenter on every selected fold; returns the run folder (:mod:`d2mae.segment.files`).

    Raises:
        D2maeError: bad input, before any training starts.
        Interrupted: SIGTERM/SIGINT (``exit_code`` 128 + signal); continue with ``resume=True``.
    """
    if not cfg.out:
        raise D2maeError("is required: the folder for the segmentation run", option="out")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise D2maeError("d2mae segment runs in one process; start it without torchrun")
    inputs = [cfg.pretrained, cfg.images, cfg.masks, cfg.obs_table,
              *labels_inputs(cfg.labels, cfg.path_column, cfg.image_root, cfg.image_ext)]
    claim_folder(cfg.out, "segment", inputs, resumable=True, forceable=False)
    with output_lock(cfg.out, "segment"):
        configure_threads(cfg.threads)
        return SegmentRun(cfg, resolve_device(cfg.device)).run()

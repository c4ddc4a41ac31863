"""Algorithm 1 for every downstream task: OBS once, then fine-tune fold by fold at each image's own σ_{t*}.

One engine runs classification (``d2mae finetune``, Section 2.3), segmentation (``d2mae segment``, beyond the
paper) and the probes' set-up (``d2mae probe``). A small task object (:mod:`d2mae.train.tasks`) supplies what
differs — the head on the encoder, the loss, the validation score, what is written per image — and everything else
is this file, top to bottom as Algorithm 1::

    setup()                  labels (and masks), folds, images checked, the pre-trained model, data-leak guard
    blur_levels()            lines 4-10: t* = argmin_t L_deblur(t) per image, once (d2mae.eval.obs.obs_levels)
    for each fold:
      fold_trainer()         the task's model (pre-trained encoder, BLU included) with timm's layer-wise lr decay
      for each epoch:
        train_one_epoch()    lines 11-14 per batch: x_b = G_σ(t*)(x) on the device, ŷ = f_θ(x_b, t*), L, update
        task.validate()      the best epoch by the task's score (macro-F1, Dice); early stopping; resume state
      finish_fold()          the best epoch's model predicts the validation and test parts

Reproducibility: the fold's initialisation is seeded by (seed, fold); each step's global RNG (drop path, Mixup) by
(seed, fold, epoch, step, rank); the loader seeds each image's augmentation by (seed, fold, epoch, image)
(:class:`d2mae.data.dataset.SeededDataset`). More than one process (classification): each rank trains on its slice
of every global batch and DDP averages the gradients; OBS, validation and test are sharded and gathered in order;
only rank 0 writes. ``--resume`` skips finished folds and continues the current one from its last saved epoch, with
the same weights as an uninterrupted run; SIGTERM/SIGINT stop at the next step (exit 128 + the signal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from d2mae.data.decode import check_images, compute_stats, content_hashes
from d2mae.data.folds import Fold, crossing_pairs, fold_summary, label_subset, make_folds
from d2mae.data.sampler import EpochBatchSampler
from d2mae.eval.obs import obs_levels
from d2mae.io.artifacts import PRETRAINED_FORMAT, load_pretrained, load_weights, model_sha256, read_config, save_weights
from d2mae.io.imports import import_pretrained
from d2mae.io.obs_table import sigmas_of
from d2mae.io.predictions import DONE, RUN_JSON, finished_fold, saved_run
from d2mae.method.blur import BlurSchedule
from d2mae.method.model_config import ModelConfig
from d2mae.runtime.device import autocast, device_plan, resolve_device
from d2mae.runtime.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    eval_indices,
    gather_ordered_objects,
    on_main,
    wrap_ddp,
)
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import (
    atomic_write_json,
    atomic_write_text,
    csv_text,
    file_sha256,
    load_checkpoint,
    read_csv_rows,
    save_checkpoint,
)
from d2mae.runtime.logs import MetricsLog, say
from d2mae.runtime.options import load_yaml, save_config
from d2mae.runtime.seeds import derive_seed, seed_everything
from d2mae.runtime.signals import StopSignals
from d2mae.train.config import DownstreamConfig
from d2mae.train.interrupts import Interrupted
from d2mae.train.leaks import leak_check
from d2mae.train.optim import make_optimizer, warmup_cosine_scheduler
from d2mae.train.resume import check_resumable, check_same_images, settings_diff

RESUME = "resume.pt"
DEFAULT_IMG_SIZE = 224  # the input size of a model trained from scratch when none is given
BEST = "best.safetensors"
IMAGE_HASHES = "image_hashes.txt"  # sha256 and path of every image, written at the start, checked on resume


# ------------------------------------------------------------------------------------------------ one training step


@dataclass
class StepResult:
    """One optimiser step: the global batch's mean loss, whether it was finite (else no update was applied), and
    whether a stop signal reached any rank."""

    loss: float
    finite: bool
    stop: bool


class FoldTrainer:
    """One fold's model, optimiser, per-step lr schedule and loss on this process (of one or more).

    Args:
        model: the task's model (``forward(x, t)``), on ``device``.
        criterion: ``loss(logits, y)`` (the task's: cross-entropy, soft-target cross-entropy, Dice + CE).
        mixup: timm's ``Mixup`` or ``None``; each mixed image keeps the t* of its own position.
        frozen: modules kept in eval mode while training (the linear probe's encoder and pooling norm).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, criterion: Any,
                 device: torch.device, *, precision: str = "auto", ctx: DistContext | None = None, mixup: Any = None,
                 clip_grad: float | None = None, frozen: Iterable[nn.Module] = ()) -> None:
        self.model, self.optimizer, self.scheduler, self.criterion = model, optimizer, scheduler, criterion
        self.device, self.ctx, self.precision = device, ctx or DistContext(), precision
        self.plan = device_plan(device, precision, getattr(model.config, "embed_dim", None))  # bf16 where it pays
        self.amp = self.plan.amp
        self.mixup, self.clip_grad, self.frozen = mixup, clip_grad, list(frozen)
        self.train_model = wrap_ddp(model, device, self.ctx)  # DDP: gradients averaged over the ranks
        self.step = 0  # optimiser steps done in this fold

    def train_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, step_images: int,
                   stopping: bool = False) -> StepResult:
        """Algorithm 1 lines 11-14 on this rank's slice of one global batch.

        Args:
            x: images [B, C, S, S] in [0, 1], not yet blurred (the model blurs them at σ_t).
            y: targets [B] (classes) or [B, S, S] (masks).
            t: each image's t* [B].
            step_images: images in the global batch (B·W, fewer in an epoch's kept last batch).
            stopping: a stop signal reached this rank (agreed with the others in the same all-reduce).
        """
        dev, ctx = self.device, self.ctx
        x = x.to(dev, non_blocking=True)  # [B, C, S, S]
        y = y.to(dev, non_blocking=True)
        t = t.to(dev)  # [B], each image's own t*
        if self.mixup is not None:
            x, y = self.mixup(x, y)  # y: soft targets [B, K]; t stays each position's own t*
        with autocast(dev, self.amp):
            logits = self.train_model(x, t)  # blurs x at σ_t inside, BLU(t) conditioning (lines 11-12)
        loss = self.criterion(logits.float(), y)  # line 13, the mean over this rank's slice
        loss = loss * (ctx.world_size * x.shape[0] / step_images)  # × 1 unless the slices are uneven
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages over the ranks: the gradient of the global batch's mean loss
        flags = torch.stack([loss.detach(), (~torch.isfinite(loss.detach())).float(),
                             torch.tensor(float(stopping), device=dev)])
        flags = all_reduce_sum(flags, ctx).cpu()  # [Σ loss, non-finite, stop] over the ranks: one sync
        result = StepResult(float(flags[0]) / ctx.world_size, bool(flags[1] == 0), bool(flags[2] > 0))
        if not result.finite:
            self.optimizer.zero_grad(set_to_none=True)
            return result
        if self.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()  # line 14
        self.step += 1
        return result

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (one all-reduce), so that every rank takes the same branch."""
        return bool(all_reduce_sum(torch.tensor([float(flag)], device=self.device), self.ctx).item() > 0)


def train_one_epoch(trainer: FoldTrainer, loader: Iterable, sampler: EpochBatchSampler, t_star: torch.Tensor,
                    epoch: int, seeds: tuple[int, int], stop: StopSignals, progress: str | None = None
                    ) -> tuple[float, int, StepResult | None]:
    """One epoch of :meth:`FoldTrainer.train_step` over ``loader`` (batches of ``(x, y, dataset index)``).

    Args:
        t_star: t* of every training image, by dataset index [n_train].
        seeds: (run seed, fold number): drop path and Mixup are seeded by (seed, fold, epoch, step, rank).
        progress: a bar title on a terminal (rank 0), or ``None``.

    Returns:
        (mean training loss, images seen, the step that stopped the epoch early — non-finite or a stop signal —
        or ``None``).
    """
    sampler.set_epoch(epoch)
    trainer.train_model.train()
    for module in trainer.frozen:
        module.eval()  # frozen features (linear probe): only what follows them trains
    bar = None
    if progress and trainer.ctx.is_main and sys.stderr.isatty():
        bar = tqdm(total=sampler.micro_steps, desc=progress, unit="step", leave=False)
    loss_sum, seen = 0.0, 0
    try:
        for m, (x, y, idx) in enumerate(loader):
            trainer.scheduler.step_update(num_updates=trainer.step)
            seed_everything(derive_seed(seeds[0], seeds[1], epoch + 1, m + 1, trainer.ctx.rank))
            step_images = sampler.step_size(m)
            result = trainer.train_step(x, y, t_star[idx], step_images, stop.signum is not None)
            if not result.finite or result.stop:
                return loss_sum / max(seen, 1), seen, result
            loss_sum += result.loss * step_images
            seen += step_images
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    finally:
        if bar is not None:
            bar.close()
    return loss_sum / max(seen, 1), seen, None


# ----------------------------------------------------------------------------------------- a fold's state on disk


@dataclass
class FoldState:
    """Where a fold's training stands: epochs done, optimiser steps, the best validation score so far."""

    epoch: int = 0
    step: int = 0
    best_score: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> "FoldState":
        score = saved.get("best_score", saved.get("best_f1", -1.0))  # best_f1: the name before 0.3
        return cls(int(saved["epoch"]), int(saved["step"]), float(score), int(saved["best_epoch"]),
                   int(saved["bad_epochs"]))


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
        self.path, self.best_path = fold_dir / RESUME, fold_dir / BEST
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


# ---------------------------------------------------------------------------------------------------- the run


class Run:
    """One downstream run on this process (of one or more): :meth:`setup`, OBS once, then every fold.

    Attributes set by :meth:`setup`: ``labeled`` (the images; its labels are the classes, or the strata of a
    segmentation run), ``folds``, ``hashes``, ``leaks``, and the pre-trained model (``mae``, ``model_config``,
    ``pretrained``, ``pretrained_hash``, ``preset``). :meth:`run` adds ``t_star`` and ``sigma_star``.
    """

    def __init__(self, cfg: DownstreamConfig, task: Any, ctx: DistContext | None = None,
                 device: torch.device | None = None) -> None:
        self.cfg, self.task = cfg, task
        self.ctx = ctx or DistContext()
        self.device = device if device is not None else resolve_device(cfg.device)
        self.out = Path(cfg.out)
        self.spec = cfg.spec
        self.pretrained: Path | None = Path(cfg.pretrained) if cfg.pretrained else None
        self.pretrained_hash: str | None = None
        self.preset: str | None = None
        self.mae: Any = None  # the pre-trained DeblurMAE whose encoder the task fine-tunes
        self.model_config: ModelConfig | None = None
        self.precision: Any = None  # the training's DevicePlan (bf16 or fp32, and why), set with the first fold

    def say(self, message: str) -> None:
        say(self.ctx, message)

    # -- set-up: every check before any training ----------------------------------------------------------------
    def setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.obs_table and self.spec.mode != "search":
            raise D2maeError(f"is only used with the search (this run: {self.spec.describe()}"
                             f"{', mode scratch' if cfg.mode == 'scratch' else ''})", option="obs_table")
        self.task.check(self)
        on_main(ctx, self._check_out)
        if self.pretrained is not None and self.pretrained.is_file():
            self.pretrained = self._import_checkpoint(self.pretrained)
        if self.pretrained is not None:
            self._load_pretrained()
        labeled = self.task.load(self)
        for col in cfg.keep_columns or []:
            if col not in labeled.columns:
                raise D2maeError(f"{cfg.labels} has no column '{col}'; its columns are: "
                                 f"{', '.join(labeled.columns) or '(class folders only)'}", option="keep_columns")

        def check() -> list[str]:  # rank 0: it writes bad_images.txt and warns
            self.out.mkdir(parents=True, exist_ok=True)
            return check_images(labeled.refs, self.in_chans, skip_bad=cfg.skip_bad, out_dir=self.out)

        good = set(on_main(ctx, check))
        if len(good) != len(labeled):
            keep = [i for i, r in enumerate(labeled.refs) if r in good]
            labeled = self.task.subset(labeled, keep)
        self.labeled = labeled
        self.folds = self._make_folds()
        self.used = np.array(sorted({int(i) for f in self.folds for part in f.parts().values() for i in part}),
                             dtype=np.int64)
        n = len(labeled)
        mine = eval_indices(n, ctx)  # each rank hashes its block of the images
        self.hashes = gather_ordered_objects(content_hashes([labeled.refs[i] for i in mine]), n, ctx)
        on_main(ctx, self._record_hashes)
        self.leaks = on_main(ctx, lambda: leak_check(labeled, self.folds, self.hashes, self.pretrained, self.out,
                                                     cfg.strict))

    @property
    def in_chans(self) -> int:
        return self.model_config.in_chans if self.model_config else self.cfg.in_chans

    @property
    def img_size(self) -> int:
        """The model's input size: ``img_size``, else the pre-trained model's, else 224."""
        return self.model_config.img_size if self.model_config else self.cfg.img_size or DEFAULT_IMG_SIZE

    def _check_out(self) -> None:
        """A folder that holds a run is continued only with ``--resume``, and only with the same settings."""
        previous = self.out / self.task.run_config
        has_run = previous.is_file() or any(self.out.glob("fold_*")) if self.out.is_dir() else False
        if not has_run:
            return
        if not self.cfg.resume:
            if getattr(self.cfg, "force", False):  # the probe's: its earlier output is replaced (runtime/outputs.py)
                return
            raise D2maeError(f"{self.out} already holds a {self.task.noun} run; continue it with resume or choose "
                             "another output folder", option="out")
        if previous.is_file():
            check_resumable(self.out, settings_diff(load_yaml(previous), self.cfg))

    def _load_pretrained(self) -> None:
        """The pre-trained model: its files, architecture and weights checked; its OBS fitness; its identity."""
        cfg, path = self.cfg, self.pretrained
        extra = read_config(path, PRETRAINED_FORMAT).get("extra") or {}
        self.preset = str((extra.get("pretrain") or {}).get("preset") or extra.get("preset") or extra.get("method")
                          or "d2mae")
        mae = load_pretrained(path, "cpu")
        self.model_config = mae.config
        if cfg.img_size and cfg.img_size != mae.config.img_size:  # OBS at the pre-trained size; the task at this one
            self.model_config = dataclasses.replace(mae.config, img_size=cfg.img_size)
            self.say(f"note: {path} was pre-trained at {mae.config.img_size} px; this run's model takes "
                     f"{cfg.img_size} px (its position embedding is interpolated)")
        if self.spec.mode == "search" and mae.config.objective != "mae":
            raise D2maeError(f"search needs a masked-autoencoder pre-trained model (its decoder restores the blurred "
                             f"images); {path} was pre-trained with {mae.config.objective}; use none", option="obs")
        self.pretrained_hash = model_sha256(path)
        self.spec.fixed_level(mae.schedule)  # a fixed σ must lie inside the model's schedule
        saved = on_main(self.ctx, lambda: saved_run(self.out) if cfg.resume else {})
        if saved.get("pretrained_sha256") not in (None, self.pretrained_hash):
            check_resumable(self.out, [f"pre-trained model sha256: {saved['pretrained_sha256'][:12]}… → "
                                       f"{self.pretrained_hash[:12]}…"])
        if cfg.mode != "scratch":
            self.mae = mae

    def _import_checkpoint(self, path: Path) -> Path:
        """A released checkpoint file as a pre-trained folder ``OUT/imported`` (made once; reused while the file's
        sha256 is the one it was made from). Its input mean/std are the labeled images' pixel statistics."""
        cfg, folder = self.cfg, self.out / "imported"

        def make() -> None:
            sha = file_sha256(path)
            try:
                extra = read_config(folder, PRETRAINED_FORMAT).get("extra", {})
            except D2maeError:
                extra = {}
            if (extra.get("imported") or {}).get("source_sha256") == sha:
                return
            mean, std = compute_stats(self.task.load(self).refs, cfg.in_chans, seed=cfg.seed)
            import_pretrained(path, folder, img_size=self.img_size, in_chans=cfg.in_chans, mean=mean, std=std,
                              seed=cfg.seed)
            self.say(f"imported {path} into {folder}")

        on_main(self.ctx, make)
        return folder

    def _make_folds(self) -> list[Fold]:
        """The protocol's folds (each training part cut to ``label_fraction``), with a warning for every patient
        group that crosses parts."""
        cfg, labeled = self.cfg, self.labeled
        folds = [label_subset(labeled, f, cfg.label_fraction, cfg.seed)
                 for f in make_folds(labeled, cfg.protocol, cfg.seed, cfg.folds)]
        if cfg.label_fraction < 1.0:
            self.say("label fraction {:g}: training on {} of the folds' training images".format(
                cfg.label_fraction, ", ".join(f"{len(f.train)} (fold {f.name})" for f in folds)))
        for f in folds:
            shared = {k: v for k, v in crossing_pairs(labeled, f).items() if v}
            if shared and self.ctx.is_main:
                text = ", ".join(f"{v} between {k}" for k, v in shared.items())
                test_note = ("; patients in the test part are also trained on, so test metrics are optimistic"
                             if any(k.endswith("test") for k in shared) else "")
                warnings.warn(f"fold {f.name}: patient groups shared across parts ({text}){test_note}",
                              stacklevel=3)
        return folds

    def _record_hashes(self) -> None:
        path = self.out / IMAGE_HASHES
        if self.cfg.resume and path.is_file():
            check_same_images(path, self.labeled.refs, self.hashes)
        else:
            atomic_write_text(path, "".join(f"{h}  {r}\n" for h, r in zip(self.hashes, self.labeled.refs)))

    # -- OBS, once (Algorithm 1 lines 4-10) -----------------------------------------------------------------------
    def blur_levels(self) -> tuple[np.ndarray, float]:
        """t* of every image (0 outside the selected folds), and the seconds OBS took here."""
        t = np.zeros(len(self.labeled))
        if self.spec.mode != "search":  # one level for every image
            schedule = self.model_config.schedule if self.model_config else BlurSchedule(enabled=False)
            t[self.used] = self.spec.fixed_level(schedule)
            return t, 0.0
        lab, cfg = self.labeled, self.cfg
        keep = (cfg.keep_columns or [None])[0]
        groups = [lab.columns[keep][i] if keep else lab.classes[lab.labels[i]] for i in self.used]
        t[self.used], seconds = obs_levels(self.mae, [lab.refs[i] for i in self.used],
                                           [self.hashes[i] for i in self.used], spec=self.spec,
                                           model_dir=self.pretrained, model_hash=self.pretrained_hash,
                                           out=self.out / "obs", cfg=cfg, device=self.device, groups=groups,
                                           group_name=keep or self.task.group_name, ctx=self.ctx)
        return t, seconds

    # -- everything ---------------------------------------------------------------------------------------------
    def run(self) -> Path:
        self.setup()
        self.t_star, obs_seconds = self.blur_levels()
        schedule = self.model_config.schedule if self.model_config else None
        self.sigma_star = sigmas_of(schedule, self.t_star) if schedule else np.zeros(len(self.t_star))
        if self.ctx.is_main:
            save_config(self.cfg, self.out / self.task.run_config)  # from here on the folder holds a run
        method = self.cfg.method_name(self.preset)
        details, started = [], time.perf_counter()
        for fold in self.folds:
            self.say(fold_summary(self.labeled, fold))
            details.append(self.run_fold(fold))
            if self.ctx.is_main:
                self.write_outputs(method, details, obs_seconds, time.perf_counter() - started)
        self.say(f"{self.task.noun} done: {self.out / self.task.table}, {self.out / RUN_JSON}")
        barrier(self.ctx)  # every rank returns once rank 0 has written the outputs
        return self.out

    def run_fold(self, fold: Fold) -> dict[str, Any]:
        """Train one fold (or skip it if it finished before); the best epoch predicts its validation and test
        parts."""
        cfg, ctx = self.cfg, self.ctx
        fold_dir = self.out / f"fold_{fold.name}"
        done = on_main(ctx, lambda: finished_fold(fold_dir, self.task.table))
        if done is not None:
            self.say(f"fold {fold.name}: already finished, skipped")
            return done
        trainer, loader, sampler = self.fold_trainer(fold)
        state, best = self._resume_fold(fold, trainer)
        t_train = torch.as_tensor(self.t_star[fold.train], dtype=torch.float32)  # [n_train], by dataset index
        ckpt = FoldCheckpoint(fold_dir, fold.name, ctx, state.epoch)
        started = time.perf_counter()
        with StopSignals() as stop, self._log(fold, state.epoch) as log:
            for epoch in range(state.epoch, cfg.epochs):
                if state.bad_epochs >= cfg.patience > 0:
                    break
                t0 = time.perf_counter()
                loss, seen, early = train_one_epoch(trainer, loader, sampler, t_train, epoch,
                                                    (cfg.seed, fold.number), stop,
                                                    f"fold {fold.name} epoch {epoch + 1}/{cfg.epochs}"
                                                    if cfg.progress else None)
                self._stop_early(fold, epoch, ckpt, best, early, stop.signum)
                train_seconds = time.perf_counter() - t0
                scores = self.task.validate(self, trainer.model, fold)  # {val_<metric>: value}, the score first
                score = scores[self.task.score]
                state.epoch, state.step = epoch + 1, trainer.step
                if score > state.best_score:
                    state.best_score, state.best_epoch, state.bad_epochs = score, epoch + 1, 0
                    best = {k: p.detach().to("cpu", copy=True) for k, p in trainer.model.state_dict().items()}
                    ckpt.best_saved = False
                else:
                    state.bad_epochs += 1
                record = {"epoch": epoch + 1, "train_loss": round(loss, 6), **{k: round(v, 6) for k, v in
                                                                              scores.items()},
                          "lr": max(g["lr"] for g in trainer.optimizer.param_groups), "best_epoch": state.best_epoch,
                          "seconds": round(time.perf_counter() - t0, 3),
                          "images_per_s": round(seen / max(train_seconds, 1e-9), 2)}
                if ctx.is_main:
                    log.write(record)
                stopping = trainer.any_rank(stop.signum is not None)
                ckpt.epoch_done(state, trainer, best, due=stopping or ckpt.age() >= cfg.checkpoint_every_seconds)
                self.say(f"fold {fold.name} epoch {epoch + 1}/{cfg.epochs}: train loss {loss:.4f}, "
                         f"{self.task.score_label} {score:.4f} (best {state.best_score:.4f} @ {state.best_epoch}), "
                         f"lr {record['lr']:.2e}, {record['seconds']:.1f} s")
                if stopping:
                    raise Interrupted(int(stop.signum or signal.SIGTERM),
                                      f"after fold {fold.name}, epoch {epoch + 1} (saved in {fold_dir / RESUME})")
        trainer.model.load_state_dict(best)
        return self.finish_fold(fold, trainer, state, time.perf_counter() - started)

    # -- one fold's parts ---------------------------------------------------------------------------------------
    def fold_trainer(self, fold: Fold) -> tuple[FoldTrainer, Any, EpochBatchSampler]:
        """The fold's model (seeded by (seed, fold)), optimiser with layer-wise lr decay, per-step lr schedule, the
        task's loss, and its seeded, sharded loader."""
        cfg, ctx, dev = self.cfg, self.ctx, self.device
        if ctx.is_main:
            (self.out / f"fold_{fold.name}").mkdir(parents=True, exist_ok=True)
        model = self.task.build_model(self, fold).to(dev)
        sampler = self._sampler(fold)
        total_steps = cfg.epochs * sampler.micro_steps
        warmup_steps = round(cfg.warmup_epochs * sampler.micro_steps)
        if cfg.warmup_epochs >= cfg.epochs and warmup_steps:
            warmup_steps = max(1, round(0.1 * total_steps))
            if fold is self.folds[0]:
                self.say(f"note: --warmup-epochs ({cfg.warmup_epochs:g}) is not shorter than --epochs ({cfg.epochs}); "
                         f"warming up over the first 10% of the steps instead")
        optimizer = make_optimizer(model, cfg, ctx.world_size)
        trainer = FoldTrainer(model, optimizer, warmup_cosine_scheduler(optimizer, total_steps, warmup_steps,
                                                                        cfg.min_lr),
                              self.task.criterion(self, fold).to(dev), dev, precision=cfg.precision, ctx=ctx,
                              mixup=self.task.mixup(self), clip_grad=cfg.clip_grad, frozen=self.task.frozen(model))
        if self.precision is None:
            self.precision = trainer.plan
            self.say(f"precision {trainer.plan.precision} ({trainer.plan.why})")
        loader = torch.utils.data.DataLoader(self.task.dataset(self, fold, model), batch_sampler=sampler,
                                             num_workers=cfg.workers, pin_memory=dev.type == "cuda",
                                             persistent_workers=cfg.workers > 0)
        return trainer, loader, sampler

    def fold_stats(self, fold: Fold) -> tuple[list[float], list[float]]:
        """Mean and std of the fold's training images: the normalisation of a model trained from scratch."""
        return compute_stats([self.labeled.refs[i] for i in fold.train], self.cfg.in_chans, seed=self.cfg.seed)

    def _sampler(self, fold: Fold) -> EpochBatchSampler:
        """The fold's training batches: each epoch's global order (a permutation, or a class-balanced draw with
        replacement when the task weighs images), seeded by (seed, fold, epoch), cut into global batches of
        batch × processes, of which this rank takes its slice. The last, partial global batch is kept unless it has
        a single image (or fewer than one per process) or the task needs full batches (Mixup/CutMix)."""
        cfg, ctx = self.cfg, self.ctx
        n, world = len(fold.train), ctx.world_size
        full = self.task.mixup(self) is not None
        if full and n < cfg.batch_size * world:
            raise D2maeError(f"fold {fold.name}: {n} training images are fewer than one batch of {cfg.batch_size} × "
                             f"{world} process(es); Mixup/CutMix needs full batches — lower it", option="batch_size")
        if n < max(2, world):
            raise D2maeError(f"fold {fold.name}: {n} training image(s) are too few to train on with {world} "
                             "process(es)")
        return EpochBatchSampler(n, cfg.batch_size, derive_seed(cfg.seed, fold.number), ctx.rank, world,
                                 weights=self.task.sample_weights(self, fold), min_last=None if full else 2)

    def _resume_fold(self, fold: Fold, trainer: FoldTrainer) -> tuple[FoldState, dict[str, torch.Tensor] | None]:
        """The fold's state and best weights so far: from its ``resume.pt`` with ``--resume``, else a fresh start."""
        cfg, ctx = self.cfg, self.ctx
        fold_dir = self.out / f"fold_{fold.name}"
        path, best_path = fold_dir / RESUME, fold_dir / BEST
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
        state = FoldState.from_saved(saved)
        trainer.step = state.step
        self.say(f"fold {fold.name}: resuming after epoch {state.epoch}")
        return state, (load_weights(best_path) if state.best_epoch else None)

    def _stop_early(self, fold: Fold, epoch: int, ckpt: FoldCheckpoint, best: dict[str, torch.Tensor] | None,
                    early: StepResult | None, signum: int | None) -> None:
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

    def finish_fold(self, fold: Fold, trainer: FoldTrainer, state: FoldState, seconds: float) -> dict[str, Any]:
        """The best epoch's predictions of the validation and test parts (the task's per-image rows), the fold's
        model folder and its ``done.json``; the resume state is removed."""
        fold_dir = self.out / f"fold_{fold.name}"
        rows, summary = self.task.predict_fold(self, trainer.model, fold)  # every rank (sharded inference)
        done = {"fold": fold.name, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
                "best_epoch": state.best_epoch, f"best_{self.task.score}": round(state.best_score, 6),
                "epochs_run": state.epoch, "train_seconds": round(seconds, 3), **summary}
        if self.ctx.is_main:
            self.task.save_model(self, trainer.model, fold_dir / "model")
            atomic_write_text(fold_dir / self.task.table, csv_text(self.task.fields(self), rows))
            atomic_write_json(fold_dir / DONE, done)
            for name in (RESUME, BEST):
                (fold_dir / name).unlink(missing_ok=True)
        self.say(f"fold {fold.name}: best epoch {state.best_epoch} ({self.task.score_label} "
                 f"{state.best_score:.4f}), " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary.items()))
        return done

    def write_outputs(self, method: str, details: list[dict[str, Any]], obs_seconds: float, seconds: float) -> None:
        """The run's per-image table (the folds' tables joined) and ``run.json``."""
        cfg, rows = self.cfg, []
        for f in self.folds:
            path = self.out / f"fold_{f.name}" / self.task.table
            if path.is_file():
                rows.extend(read_csv_rows(path))
        atomic_write_text(self.out / self.task.table, csv_text(self.task.fields(self), rows))
        atomic_write_json(self.out / RUN_JSON, {
            **self.task.run_info(self), "protocol": cfg.protocol, "folds": [d["fold"] for d in details],
            "method": method, "seed": cfg.seed, "obs": self.spec.to_dict(),
            "pretrained": str(self.pretrained.absolute()) if self.pretrained else None,
            "pretrained_sha256": self.pretrained_hash, "labels": str(cfg.labels or getattr(cfg, "images", "")),
            "n_images": len(self.labeled), "keep_columns": cfg.keep_columns or [], "leak_check": self.leaks,
            "fold_details": details, "obs_seconds": round(obs_seconds, 3), "seconds": round(seconds, 3),
            "precision": {"used": self.precision.precision, "why": self.precision.why} if self.precision else None,
            self.task.settings_key: self.task.settings(self)})

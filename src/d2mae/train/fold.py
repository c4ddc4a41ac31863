"""One fold of blurriness-aware fine-tuning (Algorithm 1 lines 11-14), one step at a time.

:class:`FoldTrainer` holds a fold's classifier, optimiser, lr schedule, loss and Mixup on this process; its
:meth:`~FoldTrainer.train_step` is Algorithm 1's lines 11-14 on one batch::

    x_b = G_{σ_t*}(x)          (line 11: inside the classifier, on the device, each image at its own t*)
    ŷ   = f_θ(x_b, t*)          (line 12: t* also feeds the blur token)
    L   = −Σ_c y_c log ŷ_c      (line 13)
    update f_θ                  (line 14)

:meth:`~FoldTrainer.train_epoch` runs an epoch of such steps over a seeded, sharded loader, and
:meth:`~FoldTrainer.validate` classifies the validation images (their deterministic view, at their t*) for model
selection by macro-F1 (:func:`d2mae.eval.metrics.macro_f1`, the rule evaluation uses). The run over folds, with
OBS, checkpoints and outputs, is :mod:`d2mae.train.finetune`.

Reproducibility: drop path and Mixup draw from the global generators, seeded before each step by
``(seed, fold, epoch, step, rank)``; the loader seeds each image's augmentation by ``(seed, fold, epoch, image)``
(:class:`d2mae.data.dataset.SeededDataset`). With several processes each rank trains on its slice of every global
batch and DDP averages the gradients; the loss of an uneven last slice is weighted by its size.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from d2mae.data.sampler import EpochBatchSampler
from d2mae.eval.infer import class_probabilities, decode_views
from d2mae.eval.metrics import macro_f1
from d2mae.method.models import DeblurClassifier
from d2mae.runtime.device import amp_dtype, autocast
from d2mae.runtime.distributed import DistContext, all_reduce_sum, wrap_ddp
from d2mae.runtime.seeds import derive_seed, seed_everything
from d2mae.runtime.signals import StopSignals


@dataclass
class StepResult:
    """One optimiser step: the global batch's mean loss, whether it was finite (else no update was applied), and
    whether a stop signal reached any rank."""

    loss: float
    finite: bool
    stop: bool


@dataclass
class Validation:
    """The validation part, classified: macro-F1 and accuracy (model selection) and cross-entropy."""

    macro_f1: float
    accuracy: float
    loss: float


class FoldTrainer:
    """One fold's fine-tuning on this process (of one or more).

    Args:
        model: the classifier (weights initialised or loaded), on ``device``.
        optimizer, scheduler: its optimiser and per-step lr schedule (:mod:`d2mae.train.optim`).
        criterion: the training loss (cross-entropy, class-weighted or soft-target).
        device, precision: where and how (bf16 autocast on capable GPUs with ``auto``).
        ctx: this process's place under torchrun.
        mixup: timm's ``Mixup`` or ``None``; each mixed image keeps the t* of its own position.
        clip_grad: clip the gradient norm (``None``: off).
        linear_probe: keep the encoder and ``fc_norm`` in eval mode while training (frozen features).
    """

    def __init__(self, model: DeblurClassifier, optimizer: torch.optim.Optimizer, scheduler: Any,
                 criterion: nn.Module, device: torch.device, *, precision: str = "auto",
                 ctx: DistContext | None = None, mixup: Any = None, clip_grad: float | None = None,
                 linear_probe: bool = False) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.criterion = criterion.to(device)
        self.device = device
        self.ctx = ctx or DistContext()
        self.amp = amp_dtype(device, precision)
        self.precision = precision
        self.mixup = mixup
        self.clip_grad = clip_grad
        self.linear_probe = linear_probe
        self.train_model = wrap_ddp(model, device, self.ctx)  # DDP: gradients averaged over the ranks
        self.step = 0  # optimiser steps done in this fold
        self._views: tuple[tuple[str, ...], torch.Tensor | None] | None = None  # the validation part, decoded once

    def train_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, step_images: int,
                   stopping: bool = False) -> StepResult:
        """Algorithm 1 lines 11-14 on this rank's slice of one global batch.

        Args:
            x: images [B, C, S, S] in [0, 1], not yet blurred (the classifier blurs them at σ_t).
            y: labels [B].
            t: each image's t* [B].
            step_images: images in the global batch (B·W, fewer in an epoch's kept last batch).
            stopping: a stop signal reached this rank (agreed with the others in the same all-reduce).
        """
        dev, ctx = self.device, self.ctx
        x = x.to(dev, non_blocking=True)  # [B, C, S, S]
        y = y.to(dev, non_blocking=True)  # [B]
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

    def train_epoch(self, loader: Iterable, sampler: EpochBatchSampler, t_star: torch.Tensor, epoch: int,
                    seeds: tuple[int, int], stop: StopSignals, progress: str | None = None
                    ) -> tuple[float, int, StepResult | None]:
        """One epoch of :meth:`train_step` over ``loader`` (batches of ``(x, y, dataset index)``).

        Args:
            t_star: t* of every training image, by dataset index [n_train].
            seeds: (run seed, fold number): drop path and Mixup are seeded by (seed, fold, epoch, step, rank).
            progress: a bar title on a terminal (rank 0), or ``None``.

        Returns:
            (mean training loss, images seen, the step that stopped the epoch early — non-finite or a stop signal —
            or ``None``).
        """
        sampler.set_epoch(epoch)
        self.train_model.train()
        if self.linear_probe:
            self.model.encoder.eval()  # frozen features; only the BatchNorm + head train
            self.model.fc_norm.eval()
        bar = None
        if progress and self.ctx.is_main and sys.stderr.isatty():
            bar = tqdm(total=sampler.micro_steps, desc=progress, unit="step", leave=False)
        loss_sum, seen = 0.0, 0
        try:
            for m, (x, y, idx) in enumerate(loader):
                self.scheduler.step_update(num_updates=self.step)
                seed_everything(derive_seed(seeds[0], seeds[1], epoch + 1, m + 1, self.ctx.rank))
                step_images = sampler.step_size(m)
                result = self.train_step(x, y, t_star[idx], step_images, stop.signum is not None)
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

    def validate(self, refs: Sequence[str], t: np.ndarray, y: np.ndarray, *, batch_size: int = 64,
                 workers: int = 0) -> Validation:
        """Classify the validation images (deterministic view, at their t*): macro-F1, accuracy, cross-entropy."""
        probs = self.predict(refs, t, batch_size=batch_size, workers=workers, cache=True)  # [n_val, K], every rank
        pred = probs.argmax(axis=1)
        ce = float(nn.functional.cross_entropy(torch.log(torch.as_tensor(probs).clamp_min(1e-12)), torch.as_tensor(y)))
        return Validation(macro_f1(y, pred), float(np.mean(pred == y)), ce)

    def predict(self, refs: Sequence[str], t: np.ndarray, *, batch_size: int = 64, workers: int = 0,
                cache: bool = False) -> np.ndarray:
        """Class probabilities [n, K] of images ``refs`` at their levels ``t``, gathered over the ranks. With
        ``cache`` the images' views are decoded once and kept for the next call with the same ``refs`` (the
        validation part, classified after every epoch)."""
        views = None
        if cache:
            key = tuple(refs)
            if self._views is None or self._views[0] != key:
                cfg = self.model.config
                self._views = (key, decode_views(refs, cfg.img_size, cfg.in_chans, workers))
            views = self._views[1]
        return class_probabilities(self.model, refs, t, self.device, batch_size=batch_size, workers=workers,
                                   precision=self.precision, ctx=self.ctx, views=views)

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (one all-reduce), so that every rank takes the same branch."""
        return bool(all_reduce_sum(torch.tensor([float(flag)], device=self.device), self.ctx).item() > 0)


"""The face every pre-training objective shows the trainer: one base class for D²MAE/MAE/DeblurrMAE
(:class:`~d2mae.method.models.DeblurMAE`), MoCo v3 (:class:`~d2mae.method.moco.MoCoV3`) and DiffMAE
(:class:`~d2mae.method.diffmae.DiffMAE`), the rows of Table 2 that pre-train on ultrasound.

:class:`d2mae.train.pretrain.Pretrainer` knows only this interface:

* ``encoder`` — a :class:`~d2mae.method.models.DeblurEncoder`; its ``encoder.*`` weights are what fine-tuning loads;
* ``views`` and ``crop_scale`` — how many crops of each image the data path gives, and RandomResizedCrop's area range
  (``None``: MAE's pre-training crops, the data path's default);
* ``draw(generator, n)`` — one step's randomness for ``n`` samples, drawn on the CPU from a seeded generator, so that
  a resumed run and any number of processes see the same numbers;
* ``progress_inputs(progress)`` — inputs that follow the run's progress from 0 to 1 (MoCo v3's momentum);
* ``forward(x, **drawn, **progress_inputs)`` → ``(loss, prediction, mask)``.
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from d2mae.method.blur import BlurSchedule
from d2mae.method.model_config import ModelConfig


class Objective(nn.Module, metaclass=abc.ABCMeta):
    """A pre-training objective on a ViT encoder (see the module docstring for the contract)."""

    config: ModelConfig
    encoder: nn.Module
    #: image views per sample the data path gives this objective
    views: int = 1
    #: RandomResizedCrop's area range for this objective; ``None`` is MAE's (the data path's default)
    crop_scale: tuple[float, float] | None = None

    @property
    def schedule(self) -> BlurSchedule:
        """The blur schedule the encoder was pre-trained with (disabled for the objectives that do not blur)."""
        return self.config.schedule

    @abc.abstractmethod
    def draw(self, generator: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        """One step's randomness for ``n`` samples (a global batch), as CPU tensors of leading size ``n``."""

    def progress_inputs(self, progress: float) -> dict[str, float]:
        """Inputs that follow the run's progress (0 → 1); none unless an objective says otherwise."""
        return {}

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, **inputs: torch.Tensor | float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss of a batch ``x`` [B, C, S, S] (or [B, V, C, S, S]) in [0, 1], the prediction and the mask."""

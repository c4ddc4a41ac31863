"""The pre-training objectives by name: one model class per row family of Table 2, all on the same ViT encoder.

* ``mae`` — :class:`~d2mae.method.models.DeblurMAE`: MAE (no blur), DeblurrMAE (one fixed blur) and D²MAE (Eqs. 1-3).
* ``moco-v3`` — :class:`~d2mae.method.moco.MoCoV3` (contrastive, two views, momentum encoder).
* ``diffmae`` — :class:`~d2mae.method.diffmae.DiffMAE` (masked patches denoised from a diffusion step).

Every objective has the same face for pre-training: ``encoder`` (a :class:`~d2mae.method.models.DeblurEncoder`,
whose ``encoder.*`` weights the classifier loads), ``views`` and ``crop_scale`` (what the data path crops for it),
``draw(generator, n)`` (a step's randomness for n samples, drawn on the CPU so that resumes and any number of
processes see the same numbers), ``progress_inputs(progress)`` and ``forward(x, **drawn, **progress_inputs)`` →
(loss, prediction, mask).
"""

from __future__ import annotations

from torch import nn

from d2mae.method.diffmae import DiffMAE
from d2mae.method.moco import MoCoV3
from d2mae.method.models import DeblurMAE, ModelConfig

OBJECTIVE_CLASSES: dict[str, type[nn.Module]] = {"mae": DeblurMAE, "moco-v3": MoCoV3, "diffmae": DiffMAE}


def build_objective(config: ModelConfig) -> nn.Module:
    """The pre-training model of ``config.objective`` (randomly initialised)."""
    return OBJECTIVE_CLASSES[config.objective](config)

"""The pre-training objectives by name: one model class per row family of Table 2, all on the same ViT encoder.

* ``mae`` — :class:`~d2mae.method.models.DeblurMAE`: MAE (no blur), DeblurrMAE (one fixed blur) and D²MAE (Eqs. 1-3).
* ``moco-v3`` — :class:`~d2mae.method.moco.MoCoV3` (contrastive, two views, momentum encoder).
* ``diffmae`` — :class:`~d2mae.method.diffmae.DiffMAE` (masked patches denoised from a diffusion step).

Every objective is an :class:`~d2mae.method.objective.Objective`: the same face for pre-training (``encoder``,
``views``, ``crop_scale``, ``draw``, ``progress_inputs``, ``forward``).
"""

from __future__ import annotations

from d2mae.method.diffmae import DiffMAE
from d2mae.method.moco import MoCoV3
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurMAE
from d2mae.method.objective import Objective

OBJECTIVE_CLASSES: dict[str, type[Objective]] = {"mae": DeblurMAE, "moco-v3": MoCoV3, "diffmae": DiffMAE}


def build_objective(config: ModelConfig) -> Objective:
    """The pre-training model of ``config.objective`` (randomly initialised)."""
    return OBJECTIVE_CLASSES[config.objective](config)

"""Any timm classifier as a fine-tuning model: the supervised rows of Table 2 (ViT-B/16, Swin-L, ConvNeXt-L, …) and
the USFM row (timm's BEiT, which holds USFM's layout).

:class:`TimmClassifier` gives a timm model the face of :class:`~d2mae.method.models.DeblurClassifier`:
``forward(x, t)`` on images in [0, 1] (t is ignored: no blur, no OBS for these rows), the data set's own mean/std
applied inside, ``config`` / ``num_classes`` / ``schedule`` for the shared fine-tuning, evaluation and prediction
code. One-channel ultrasound goes in as one channel: timm builds the model with ``in_chans=1`` and, when weights
are loaded, adapts the first convolution as ``adapt_input_conv`` does (the RGB filters summed). Layer-wise lr decay
uses the timm model's own ``group_matcher`` where timm defines one (:mod:`d2mae.train.optim`).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from d2mae.method.blur import BlurSchedule
from d2mae.method.model_config import DEFAULT_MEAN, DEFAULT_STD, DROP_PATH
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.options import check_fields

PREFIX = "timm:"


def timm_name(backbone: str) -> str:

    """``timm:NAME`` → ``NAME``, checked against timm's registry (close names suggested)."""
    if not backbone.startswith(PREFIX) or len(backbone) == len(PREFIX):
        raise D2maeError(f"{backbone!r} is not a timm backbone; write timm:NAME (e.g. timm:vit_base_patch16_224)",
                         option="backbone")
    name = backbone[len(PREFIX):]
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise D2maeError(f"timm has no model {name!r}{hint}", option="backbone")
    return name


@dataclass
class BackboneConfig:

    """What fixes a :class:`TimmClassifier`: the timm model, its input, and the data set's normalisation."""
    backbone: str = field(default="", metadata={"help": "timm:NAME"})
    img_size: int = field(default=224, metadata={"help": "input size in pixels", "min": 1})
    in_chans: int = field(default=1, metadata={"help": "input channels", "choices": [1, 3]})
    mean: list[float] = field(default_factory=lambda: [DEFAULT_MEAN], metadata={"min": 0.0, "max": 1.0})
    std: list[float] = field(default_factory=lambda: [DEFAULT_STD], metadata={"above": 0.0, "max": 1.0})

    def __post_init__(self) -> None:
        check_fields(self)
        timm_name(self.backbone)
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.in_chans:
                raise D2maeError(f"needs {self.in_chans} value(s), one per channel", option=name)

    @property
    def name(self) -> str:
        return self.backbone[len(PREFIX):]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _create(config: BackboneConfig, num_classes: int, drop_path: float, state_dict: dict | None) -> nn.Module:
    """``timm.create_model`` at the configured size and channels; ``state_dict`` goes through timm's own loading

    (``pretrained_cfg_overlay``: its checkpoint filter, input-conv adaptation, classifier reset)."""
    options: dict[str, Any] = {"num_classes": num_classes, "in_chans": config.in_chans}
    if drop_path:
        options["drop_path_rate"] = drop_path
    if state_dict is not None:
        options.update(pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict})
    try:
        return timm.create_model(config.name, img_size=config.img_size, **options)
    except TypeError as exc:  # models without an img_size argument (ConvNeXt, ResNets): any size works
        if "img_size" not in str(exc):
            raise
        return timm.create_model(config.name, **options)


class TimmClassifier(nn.Module):
    """A timm classifier with the data set's normalisation inside; ``forward(x, t)`` ignores t (no blur)."""
    def __init__(self, config: BackboneConfig, num_classes: int, drop_path: float = DROP_PATH,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.model = _create(config, num_classes, drop_path, state_dict)
        self.register_buffer("pixel_mean", torch.tensor(config.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(config.std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def schedule(self) -> BlurSchedule:
        """No blur schedule: every image's level is 0."""
        return BlurSchedule(enabled=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits [B, K] of images ``x`` [B, C, S, S] in [0, 1]."""
        return self.model((x.float() - self.pixel_mean) / self.pixel_std)

    def layer_decay_root(self) -> nn.Module:
        """The module whose ``group_matcher`` defines the layer-wise lr decay groups (the timm model)."""
        return self.model

    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.model, "no_weight_decay", None)
        return set(nwd()) if callable(nwd) else set()


def backbone_classifier(config: Any, num_classes: int, drop_path: float,
                        state: dict[str, torch.Tensor] | None, source: str = "") -> Any:
    """A :class:`~d2mae.method.backbones.TimmClassifier`, from ``state`` (:func:`backbone_state` of the file
    ``source``, then timm's loader) or randomly initialised; weights whose shapes timm cannot adapt are a clear
    error."""

    try:
        return TimmClassifier(config, num_classes, drop_path, state)
    except RuntimeError as exc:
        if state is None:
            raise
        lines = str(exc).strip().splitlines()
        detail = next((line.strip() for line in lines if "size mismatch" in line), lines[0] if lines else "")
        raise D2maeError(f"weights file {source} does not fit {config.backbone} ({detail[:240]})",
                         option="backbone_weights") from None

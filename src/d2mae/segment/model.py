"""Segmentation models with the :func:`forward(x, t)` of the classifier: a pre-trained ViT encoder with a pyramid
decoder (smp's UPerNet or FPN on a simple feature pyramid, the default) or a UNETR decoder (MONAI's blocks), and the
U-Net a user would otherwise pick (segmentation_models_pytorch).

:class:`PyramidSegmenter` follows MAE's and BEiT's segmentation (UPerNet) and TinyUSFM's (FPN): the patch tokens of
four blocks at ¼, ½, ¾ and all of the encoder's depth (the CLS and blur tokens dropped) are laid back on their grid
and rescaled by ViTDet's simple feature pyramid — deconvolution ×4 and ×2, identity, max-pool ×½ — into the four
levels a convolutional encoder would give (1/4 … 1/32 of a 16-pixel patch's input), which smp's decoder fuses; a
3 × 3 convolution gives K logits, bilinearly upsampled to the input. As in the classifier of Algorithm 1, the image is
blurred at σ_t and t goes to the blur token.

:class:`ViTSegmenter` is UNETR (Hatamizadeh et al. 2022) in 2-D on d2mae's blur-conditioned encoder: the image is
blurred at σ_t and t goes to the blur token, exactly as the classifier of Algorithm 1 (lines 11-12) sees it. The
tokens of evenly spaced encoder blocks (blocks 3, 6, 9 and 12 of a 12-block ViT/16, as UNETR) are laid back on
their patch grid and brought up to 1/2, 1/4, 1/8 of the input by MONAI's ``UnetrPrUpBlock``; a convolution block on
the (blurred, normalised) input gives the full-resolution skip; ``UnetrUpBlock`` decodes from the last block's grid
to the input size and ``UnetOutBlock`` gives K logits per pixel. A patch of 2^L pixels gives L decoder stages.

:class:`UNetSegmenter` is ``segmentation_models_pytorch.Unet`` (ResNet-18 encoder by default, random
initialisation: no ImageNet weights can be fetched offline), normalised with the data set's statistics; it takes t
and ignores it (no blur, no OBS).

MONAI and segmentation_models_pytorch load when a model is built (about 2 s of imports), so that the classification
commands, which import this module through the experiment layer, start without them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from d2mae.method.model_config import DROP_PATH, ModelConfig, default_stats
from d2mae.method.models import DeblurEncoder, load_encoder_weights
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.options import check_fields

DECODERS = ("fpn", "upernet", "unetr", "unet")
PYRAMID = ("fpn", "upernet")  # smp's decoders on the simple feature pyramid
#: each decoder's width when none is given: UNETR's channels at full resolution; UPerNet's / FPN's channels
DEFAULT_WIDTH = {"unetr": 16, "upernet": 256, "fpn": 128}
NORM = "instance"  # UNETR's default normalisation of its convolution blocks


def skip_blocks(depth: int, stages: int) -> list[int]:
    """The encoder blocks (0-based) whose tokens feed the decoder: ``stages`` evenly spaced blocks ending with the
    last, e.g. 12 blocks, 4 stages → [2, 5, 8, 11] (UNETR's z3, z6, z9, z12)."""
    return [max(0, round(depth * k / stages) - 1) for k in range(1, stages + 1)]


def _grid(z: torch.Tensor, prefix: int) -> torch.Tensor:
    """Patch tokens [B, prefix + N, D] → feature map [B, D, g, g] (CLS and BLU dropped)."""
    tokens = z[:, prefix:]  # [B, N, D]
    b, n, d = tokens.shape
    g = int(round(math.sqrt(n)))
    return tokens.transpose(1, 2).reshape(b, d, g, g)


def tapped_grids(encoder: DeblurEncoder, x: torch.Tensor, t: torch.Tensor, taps: list[int]) -> list[torch.Tensor]:
    """The encoder's patch tokens after blocks ``taps`` (0-based), each as a grid [B, D, g, g], for images ``x`` in
    [0, 1] blurred at σ_t with t fed to BLU(t)."""
    z, _, _ = encoder.embed(x, t)  # blurred at σ_t, [CLS, BLU(t), patches] + P: [B, prefix + N, D]
    grids = {}
    for i, block in enumerate(encoder.blocks[:max(taps) + 1]):
        z = block(z)
        if i in taps:
            grids[i] = _grid(z, encoder.num_prefix_tokens)
    return [grids[i] for i in taps]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al. 2022) over four blocks' grids [B, D, g, g]: ×4 (two 2 × 2
    deconvolutions, D/4 channels), ×2 (one, D/2), ×1, ×½ (max-pool): the finest level first."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), nn.BatchNorm2d(dim // 2), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim // 2, 2, 2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)
        self.channels = (dim // 4, dim // 2, dim, dim)

    def forward(self, grids: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.up4(grids[0]), self.up2(grids[1]), grids[2], self.down2(grids[3])]


class PyramidSegmenter(nn.Module):
    """smp's UPerNet or FPN decoder on a simple feature pyramid of a blur-conditioned ViT (module docstring):
    logits [B, K, S, S] of images in [0, 1] blurred at σ_t, t fed to BLU(t).

    Args:
        config: the encoder's architecture, blur schedule and normalisation.
        num_classes: K, background included.
        decoder: ``upernet`` or ``fpn``.
        width: the decoder's channels.
        drop_path_rate: stochastic depth in the encoder.
    """

    def __init__(self, config: ModelConfig, num_classes: int, decoder: str = "fpn", width: int = 128,
                 drop_path_rate: float = DROP_PATH) -> None:
        from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder  # lazy (module docstring)
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        super().__init__()
        grid = config.img_size // config.patch_size
        if grid < 4:  # the pyramid's coarsest level (grid / 2) would be one pixel: nothing to normalise over
            raise D2maeError(f"the {decoder} decoder needs a patch grid of at least 4 × 4, got {grid} × {grid} "
                             f"({config.img_size} px / {config.patch_size} px patches); use a larger image (img_size), "
                             "smaller patches, or decoder unetr")
        self.config, self.num_classes = config, num_classes
        self.encoder = DeblurEncoder(config, drop_path_rate=drop_path_rate, learn_pos_embed=True, final_norm=False)
        self.taps = skip_blocks(config.depth, 4)  # blocks at ¼, ½, ¾ and all of the depth
        self.pyramid = SimpleFeaturePyramid(config.embed_dim)
        channels = (config.in_chans, config.in_chans, *self.pyramid.channels)  # smp's 6 levels; the first two unused
        if decoder == "upernet":
            self.decoder, out = UPerNetDecoder(channels, encoder_depth=5, decoder_channels=width), width
        else:
            self.decoder = FPNDecoder(channels, encoder_depth=5, pyramid_channels=width,
                                      segmentation_channels=width // 2)
            out = self.decoder.out_channels
        self.head = nn.Conv2d(out, num_classes, 3, padding=1)

    def load_encoder(self, mae_state: dict[str, torch.Tensor]) -> None:
        load_encoder_weights(self.encoder, mae_state, "the segmenter's encoder")

    @property
    def schedule(self) -> Any:
        """The blur schedule the encoder conditions on (OBS ``none`` / ``fixed`` of new images asks it)."""
        return self.encoder.schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits [B, K, S, S] of images ``x`` [B, C, S, S] in [0, 1] at levels ``t`` [B]."""
        levels = self.pyramid(tapped_grids(self.encoder, x, t, self.taps))  # 4 × [B, C_k, g·4/2^k, …]
        y = self.decoder([x, x, *levels])  # [B, width, g·4, g·4]: the finest level's grid
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)  # [B, K, S, S]

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping (layer-wise lr decay): the encoder as the classifier's; the pyramid, decoder and
        head fall in the last group (lr scale 1), as a classifier's head."""
        return dict(stem=r"^encoder\.(?:cls_token|blur_token|pos_embed|patch_embed)",
                    blocks=[(r"^encoder\.blocks\.(\d+)", None)])

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.blur_token", "encoder.pos_embed"}


class ViTSegmenter(nn.Module):
    """UNETR decoder on :class:`~d2mae.method.models.DeblurEncoder`: pixel logits [B, K, S, S] of images in [0, 1]
    blurred at σ_t, t fed to BLU(t).

    Args:
        config: the encoder's architecture, blur schedule and normalisation (the pre-trained model's).
        num_classes: K, background included (2 for lesion / background).
        feature_size: UNETR's ``feature_size``: channels of the full-resolution stage (doubling per stage down).
        drop_path_rate: stochastic depth in the encoder.
    """

    def __init__(self, config: ModelConfig, num_classes: int, feature_size: int = 16,
                 drop_path_rate: float = DROP_PATH) -> None:
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock  # lazy: MONAI

        super().__init__()
        self.config, self.num_classes = config, num_classes
        levels = int(round(math.log2(config.patch_size)))
        if 2 ** levels != config.patch_size or levels < 2:
            raise D2maeError(f"the UNETR decoder needs a patch size that is a power of 2 (≥ 4), got "
                             f"{config.patch_size}")
        self.levels = levels
        self.encoder = DeblurEncoder(config, drop_path_rate=drop_path_rate, learn_pos_embed=True, final_norm=False)
        self.taps = skip_blocks(config.depth, levels)
        dim, fs = config.embed_dim, feature_size
        self.stem = UnetrBasicBlock(2, config.in_chans, fs, kernel_size=3, stride=1, norm_name=NORM, res_block=True)
        # skip k (k = 1 … L-1) at 1/2^k of the input, fs·2^k channels, from tap k-1 at 1/2^L
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(2, dim, fs * 2 ** k, num_layer=levels - k - 1, kernel_size=3, stride=1,
                           upsample_kernel_size=2, norm_name=NORM, conv_block=True, res_block=True)
            for k in range(1, levels))
        # up k: from 1/2^(k+1) to 1/2^k, joined with skip k (k = L-1 … 0; skip 0 is the stem)
        ups = []
        for k in range(levels - 1, -1, -1):
            in_ch = dim if k == levels - 1 else fs * 2 ** (k + 1)
            ups.append(UnetrUpBlock(2, in_ch, fs * 2 ** k, kernel_size=3, upsample_kernel_size=2, norm_name=NORM,
                                    res_block=True))
        self.ups = nn.ModuleList(ups)
        self.out = UnetOutBlock(2, fs, num_classes)

    def load_encoder(self, mae_state: dict[str, torch.Tensor]) -> None:
        load_encoder_weights(self.encoder, mae_state, "the segmenter's encoder")

    @property
    def schedule(self) -> Any:
        """The blur schedule the encoder conditions on (OBS ``none`` / ``fixed`` of new images asks it)."""
        return self.encoder.schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits [B, K, S, S] of images ``x`` [B, C, S, S] in [0, 1] at levels ``t`` [B]."""
        taps = tapped_grids(self.encoder, x, t, self.taps)  # [B, D, g, g] each
        skips = [self.stem(self.encoder.blur(x, t))] + [s(h) for s, h in zip(self.skips, taps[:-1])]  # [B, fs·2^k, …]
        y = taps[-1]
        for up, k in zip(self.ups, range(self.levels - 1, -1, -1)):
            y = up(y, skips[k])
        return self.out(y)  # [B, K, S, S]

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm layer grouping for layer-wise lr decay: the encoder as the classifier's (stem, blocks); the decoder
        falls in the last group (lr scale 1), as a classifier's head."""
        return dict(stem=r"^encoder\.(?:cls_token|blur_token|pos_embed|patch_embed)",
                    blocks=[(r"^encoder\.blocks\.(\d+)", None)])

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.blur_token", "encoder.pos_embed"}


@dataclass
class UNetConfig:
    """A U-Net of segmentation_models_pytorch: its encoder, input and the data set's normalisation."""

    encoder: str = field(default="resnet18", metadata={"help": "smp encoder name"})
    img_size: int = field(default=224, metadata={"min": 32})
    in_chans: int = field(default=1, metadata={"choices": [1, 3]})
    mean: list[float] | None = None
    std: list[float] | None = None

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def depth(self) -> int:
        """smp's encoder depth: 5 stages, fewer when the image side is not a multiple of 2^5 (112 px: 4)."""
        depth = 5
        while depth > 1 and self.img_size % 2 ** depth:
            depth -= 1
        return depth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class UNetSegmenter(nn.Module):
    """``smp.Unet`` from scratch with ``forward(x, t)`` (t ignored: no blur, no OBS); logits [B, K, S, S]."""

    def __init__(self, config: UNetConfig, num_classes: int) -> None:
        import segmentation_models_pytorch as smp  # lazy, as MONAI (the module docstring)

        super().__init__()
        self.config, self.num_classes = config, num_classes
        mean, std = default_stats(config.in_chans)
        self.register_buffer("pixel_mean", torch.tensor(config.mean or mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(config.std or std, dtype=torch.float32).view(1, -1, 1, 1))
        channels = (256, 128, 64, 32, 16)[-config.depth:] if config.depth < 5 else (256, 128, 64, 32, 16)
        try:
            self.net = smp.Unet(encoder_name=config.encoder, encoder_depth=config.depth, encoder_weights=None,
                                decoder_channels=channels, in_channels=config.in_chans, classes=num_classes)
        except (KeyError, ValueError) as exc:
            raise D2maeError(f"segmentation_models_pytorch has no encoder '{config.encoder}' ({exc})") from None

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() - self.pixel_mean) / self.pixel_std)  # [B, K, S, S]

    def no_weight_decay(self) -> set[str]:
        return set()


def build_segmenter(kind: str, config: ModelConfig | UNetConfig, num_classes: int, width: int | None = None,
                    drop_path: float = DROP_PATH) -> nn.Module:
    """The segmenter of a decoder kind (weights not loaded): ``fpn``, ``upernet`` or ``unetr`` on a ViT config
    (``width``: the decoder's, :data:`DEFAULT_WIDTH` when ``None``), ``unet`` on a U-Net one."""
    if kind in PYRAMID + ("unetr",):
        if not isinstance(config, ModelConfig):
            raise D2maeError(f"the {kind} decoder needs a ViT encoder config")
        width = width or DEFAULT_WIDTH[kind]
        if kind == "unetr":
            return ViTSegmenter(config, num_classes, width, drop_path)
        return PyramidSegmenter(config, num_classes, kind, width, drop_path)
    if kind == "unet":
        if not isinstance(config, UNetConfig):
            raise D2maeError("the unet model needs a U-Net config")
        return UNetSegmenter(config, num_classes)
    raise D2maeError(f"unknown segmentation decoder '{kind}'; use one of {', '.join(DECODERS)}")

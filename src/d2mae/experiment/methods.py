"""The rows of the results tables (:data:`METHODS`, Table 2 and Table 3) and the Table 3 panels (:data:`ABLATIONS`):
what each row's encoder starts from and how it is fine-tuned, described from the pre-training presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from d2mae.method.obs import DEFAULT_SEARCH_STEP
from d2mae.method.presets import DEBLURRMAE_SIGMA, describe_preset
from d2mae.runtime.errors import D2maeError


@dataclass(frozen=True)
class Method:
    """One row of a results table: what its encoder starts from and how it is fine-tuned.

    Attributes:
        name: the config name (``methods:`` list).
        label: the name shown in tables and figures.
        preset: :data:`d2mae.method.presets.PRESETS` key: the experiment pre-trains it. ``None``: no pre-training.
        obs: fine-tuning blur: ``none``, ``fixed:SIGMA`` or ``search`` (:meth:`d2mae.method.obs.ObsSpec.parse`).
        search_step: OBS step s (Table 3d).
        source: where a row without pre-training starts: ``scratch`` (the ViT of the supervised floor),
            ``checkpoint`` (a released ViT checkpoint, imported: ``weights:`` must name the file), ``backbone`` (a timm
            classifier ``backbone``, from ``weights:`` when given, else from scratch), ``unet`` (segmentation only:
            the smp U-Net from scratch).
        backbone: ``timm:NAME`` for ``source = backbone``.
        needs_weights: ``weights:`` must name a local file for this method.
        table2: Table 2's row it reproduces (for the report and the docs).
    """

    name: str
    label: str
    preset: str | None
    obs: str = "none"
    search_step: int = DEFAULT_SEARCH_STEP
    source: str = "scratch"
    backbone: str | None = None
    needs_weights: bool = False
    table2: str = ""

    @property
    def mode(self) -> str:
        return "full" if self.preset is not None or self.source == "checkpoint" else "scratch"

    def describe(self) -> str:
        if self.preset is not None:
            pre = f"pre-training {describe_preset(self.preset)}"
        elif self.source == "checkpoint":
            pre = "a released checkpoint (weights:), imported"
        elif self.source == "backbone":
            pre = f"timm {self.backbone}, from weights: when given, else from scratch"
        elif self.source == "unet":
            return "segmentation_models_pytorch U-Net (ResNet-18 encoder), random initialisation; no blur"
        else:
            pre = "no pre-training (ViT from scratch)"
        if self.preset is None and self.source == "scratch":
            ft = "fine-tuning --mode scratch, no blur"
        elif self.obs == "search":
            ft = f"fine-tuning with OBS (s = {self.search_step})"
        elif self.obs == "none":
            ft = "fine-tuning without blur"
        else:
            ft = f"fine-tuning at fixed σ = {self.obs.split(':', 1)[1]}"
        return f"{pre}; {ft}"


USFM_BACKBONE = "timm:beit_base_patch16_224"  # USFM's ViT-B: BEiT layout (relative position bias, layer scale)


METHODS: dict[str, Method] = {m.name: m for m in (
    # Table 2
    Method("supervised", "ViT (no pre-training)", None, "none", table2="(floor: no pre-training)"),
    Method("mae-imagenet", "MAE (ImageNet)", None, "none", source="checkpoint", needs_weights=True,
           table2="MAE, ViT-B, ImageNet"),
    Method("moco-v3-imagenet", "MoCo v3 (ImageNet)", None, "none", source="checkpoint", needs_weights=True,
           table2="MoCo v3, ViT-B, ImageNet"),
    Method("usfm", "USFM (US3M)", None, "none", source="backbone", backbone=USFM_BACKBONE, needs_weights=True,
           table2="USFM, ViT-B, US3M"),
    Method("moco-v3", "MoCo v3 (US)", "moco-v3", "none", table2="MoCo v3, ViT-B, US"),
    Method("diffmae", "DiffMAE (US)", "diffmae", "none", table2="DiffMAE, ViT-B, US"),
    Method("mae", "MAE", "mae", "none", table2="MAE, ViT-B, US"),
    Method("deblurrmae", "DeblurrMAE", "deblurrmae", f"fixed:{DEBLURRMAE_SIGMA}", table2="DeblurrMAE, ViT-B, US"),
    Method("d2mae", "D²MAE", "d2mae", "search", table2="D²MAE (ours)"),
    # segmentation datasets only: the row a user would otherwise pick (segmentation_models_pytorch, random init)
    Method("unet", "U-Net (smp, ResNet-18)", None, "none", source="unet",
           table2="(segmentation: smp U-Net, random init)"),
    # Table 3a: blur range
    Method("d2mae-range-0.6", "D²MAE σ 0.1→0.6", "range-0.6", "search"),
    Method("d2mae-range-1.6", "D²MAE σ 0.1→1.6", "range-1.6", "search"),
    # Table 3b: blur embedding
    Method("d2mae-embed-none", "D²MAE w/o blur embedding", "embed-none", "search"),
    Method("d2mae-embed-add", "D²MAE blur embedding added", "embed-add", "search"),
    # Table 3c: OBS setting (the d2mae pre-trained model). "No blur" is t = 0 (σ 0 and a token pre-training never
    # saw); σ_1 = 0.1 has a one-tap kernel, so fixed:0.1 is the same pixels with the in-distribution token t = 1.
    Method("d2mae-obs-none", "D²MAE, no blur in fine-tuning", "d2mae", "none"),
    Method("d2mae-obs-none-t1", "D²MAE, no blur, token t = 1", "d2mae", "fixed:0.1"),
    Method("d2mae-obs-fixed-0.5", "D²MAE, fixed σ = 0.5", "d2mae", "fixed:0.5"),
    # Table 3d: search step (the d2mae pre-trained model)
    Method("d2mae-s1", "D²MAE, OBS s = 1", "d2mae", "search", 1),
    Method("d2mae-s3", "D²MAE, OBS s = 3", "d2mae", "search", 3),
)}


TABLE2_METHODS: tuple[str, ...] = ("supervised", "mae", "deblurrmae", "d2mae")


#: Table 2's supervised rows as timm models (ImageNet weights given under weights:, else trained from scratch).
TABLE2_TIMM = ("timm:vit_base_patch16_224", "timm:swin_large_patch4_window7_224", "timm:convnext_large")


def method_for(name: str) -> Method:
    """The method of a ``methods:`` name: one of :data:`METHODS`, or ``timm:NAME`` (any timm classifier)."""
    if name in METHODS:
        return METHODS[name]
    if name.startswith("timm:") and len(name) > len("timm:"):
        return Method(name, f"{name[len('timm:'):]} (timm)", None, "none", source="backbone", backbone=name,
                      table2="supervised (SP) rows")
    raise D2maeError(f"unknown method '{name}'; choose from {', '.join(METHODS)} or timm:NAME (any timm model)")


def table2_order(names: Sequence[str]) -> list[str]:
    """``names`` in Table 2's order: supervised rows, ImageNet-pretrained, ultrasound-pretrained, D²MAE; others after."""
    paper = ["supervised", "unet", *[n for n in names if n.startswith("timm:")], "mae-imagenet", "moco-v3-imagenet",
             "usfm", "moco-v3", "diffmae", "mae", "deblurrmae", "d2mae"]
    return [n for n in paper if n in names] + [n for n in names if n not in paper]


@dataclass(frozen=True)
class AblationGroup:
    """A Table 3 panel: its title and (method, row label) pairs, in the paper's order."""

    name: str
    title: str
    variants: tuple[tuple[str, str], ...]


ABLATIONS: dict[str, AblationGroup] = {g.name: g for g in (
    AblationGroup("blur_range", "(a) Blurriness range", (
        ("d2mae-range-0.6", "0.1 → 0.6"), ("d2mae", "0.1 → 1.1"), ("d2mae-range-1.6", "0.1 → 1.6"))),
    AblationGroup("embedding", "(b) Blurriness embedding", (
        ("d2mae-embed-none", "w/o embedding"), ("d2mae-embed-add", "Addition"), ("d2mae", "Extra token"))),
    AblationGroup("obs_setting", "(c) OBS settings", (
        ("d2mae-obs-none", "No blur"), ("d2mae-obs-none-t1", "No blur (token t = 1)"),
        ("d2mae-obs-fixed-0.5", "Fixed (σ = 0.5)"), ("d2mae", "With OBS"))),
    AblationGroup("search_step", "(d) Search step", (
        ("d2mae-s1", "s = 1"), ("d2mae", "s = 2"), ("d2mae-s3", "s = 3"))),
)}

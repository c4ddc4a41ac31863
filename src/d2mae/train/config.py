"""What the downstream commands take: one :class:`DownstreamConfig` for everything classification and segmentation
share (data, folds, the pre-trained model, OBS, the training recipe, the run), and each task's own fields on top of
it: :class:`FinetuneConfig` (``d2mae finetune``), :class:`SegmentConfig` (``d2mae segment``), :class:`ProbeConfig`
(``d2mae probe``).

Every field is a YAML key and a flag (``batch_size`` ↔ ``--batch-size``); its domain is in its metadata
(:mod:`d2mae.runtime.options`), with its ``group`` (the section of ``--help`` and of a nested YAML file) and, for
the options a person does not set in a normal run, ``advanced`` (listed by ``--help-all`` only). ``volatile`` fields
may change when a stopped run is resumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from d2mae.method.backbones import timm_name
from d2mae.method.model_config import DROP_PATH
from d2mae.method.obs import DEFAULT_SEARCH_STEP, ObsSpec
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.logs import TENSORBOARD_CHOICES, TENSORBOARD_HELP
from d2mae.runtime.options import RuntimeOptions, check_fields
from d2mae.segment.model import DECODERS, DEFAULT_WIDTH

MODES = ("full", "linear", "scratch")
AUGMENTATIONS = ("auto", "finetune", "mae", "strong", "crop", "none")
BALANCE = ("none", "loss", "sampler")

DATA, MODEL, OBS, TRAIN, RUN = "data", "model", "obs", "optim", "runtime"


def _f(default: Any, help: str, group: str, **meta: Any) -> Any:
    """A config field: its default, help text, ``--help`` group and domain (``min``, ``choices``, …)."""
    meta = {"help": help, "group": group, **meta}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DownstreamConfig(RuntimeOptions):
    """What every downstream run takes: the labeled images and their folds, the pre-trained encoder, OBS once
    (Algorithm 1 lines 4-10), and the training recipe of lines 11-14 (MAE's fine-tuning recipe through timm)."""

    # -- the images and the folds
    labels: str | None = _f(None, "labels CSV (path,label[,group][,split|fold]) or a class-per-folder tree", DATA,
                            metavar="CSV|DIR")
    path_column: str = _f("path", "labels CSV column with the image path or ID", DATA)
    label_column: str | None = _f(None, "labels CSV column with each image's class (default: 'label'; segment: the "
                                  "folds are then stratified by it instead of by lesion presence, and Dice is "
                                  "reported per class)", DATA, old_names=["stratify"])
    group_column: str | None = _f(None, "patient/group column (default: 'group' if present); no patient crosses "
                                  "folds", DATA)
    image_root: str | None = _f(None, "folder the CSV paths are relative to", DATA)
    image_ext: str = _f("", "extension added to path values that lack it (.png)", DATA)
    split_column: str | None = _f(None, "train/val/test column (default: 'split')", DATA, advanced=True)
    fold_column: str | None = _f(None, "each image's test fold (default: 'fold' or 'kFold')", DATA, advanced=True)
    folds_csv: str | None = _f(None, "CSV joined on --path-column with fold columns (BUS-BRA 5-fold-cv.csv: kFold, "
                               "valid_k)", DATA, advanced=True)
    classes: list[str] | None = _f(None, "class order (default: sorted names)", DATA, advanced=True)
    keep_columns: list[str] | None = _f(None, "labels CSV columns copied into the per-image table (e.g. Device)",
                                        DATA, advanced=True)
    allow_outside_root: bool = _f(False, "follow labels CSV paths that lead outside --image-root (absolute, ../, "
                                  "links); refused by default", DATA, advanced=True, volatile=True)
    protocol: str = _f("split:3:1:1", "split:3:1:1, kfold:5, csv (the split/fold column) or holdout:FILE", DATA)
    folds: str | None = _f(None, "run only these folds, e.g. 1,3", DATA, advanced=True)
    label_fraction: float = _f(1.0, "train on this share of each fold's training images (a stratified, "
                               "patient-group-aware subset); validation and test parts unchanged", DATA,
                               above=0.0, max=1.0, advanced=True)
    out: str = _f("", "output folder", DATA, metavar="DIR", volatile=True)
    # -- the model
    pretrained: str | None = _f(None, "pre-trained folder (model.safetensors + config.json), or a released "
                                "checkpoint file to import (docs/import.md); without it the model trains from "
                                "scratch", MODEL, metavar="DIR|FILE", volatile=True, old_names=["model"])
    arch: str = _f("vit_tiny_patch16", "architecture without --pretrained", MODEL, advanced=True)
    img_size: int | None = _f(None, "input size (default: the pre-trained model's, 224 without one); at another size "
                              "than the pre-trained model's, its position embedding is interpolated", MODEL, min=1,
                              advanced=True)
    in_chans: int = _f(1, "channels without --pretrained", MODEL, choices=[1, 3], advanced=True)
    mode: str = _f("full", "full (fine-tune the pre-trained encoder), linear (classification: a linear probe) or "
                   "scratch (the same architecture, randomly initialised: no pre-training)", MODEL, choices=list(MODES))
    trainable_blocks: int | None = _f(None, "partial fine-tuning: train only the last N encoder blocks and what "
                                      "follows them; the rest of the pre-trained encoder stays frozen", MODEL, min=0,
                                      advanced=True)
    # -- OBS, once
    obs: str = _f("search", "search, none or fixed:SIGMA (Table 3c)", OBS)
    obs_table: str | None = _f(None, "reuse this OBS table (obs.csv from d2mae obs)", OBS, volatile=True)
    search_step: int = _f(DEFAULT_SEARCH_STEP, "OBS search step s (Table 3d)", OBS, min=1, advanced=True)
    obs_batch_size: int = _f(32, "images per OBS batch", OBS, min=1, volatile=True, advanced=True)
    # -- the training recipe
    epochs: int = _f(50, "most epochs per fold", TRAIN, min=1)
    batch_size: int = _f(32, "batch size per process (paper: 32)", TRAIN, min=1)
    blr: float | None = _f(None, "base lr, lr = blr × batch × processes / 256 (default 5e-4; linear: 0.1)", TRAIN,
                           above=0.0)
    lr: float | None = _f(None, "absolute lr (overrides --blr)", TRAIN, above=0.0, advanced=True)
    warmup_epochs: float = _f(5.0, "linear lr warm-up (epochs)", TRAIN, min=0.0, advanced=True)
    min_lr: float = _f(1e-6, "lr at the end of the cosine", TRAIN, min=0.0, advanced=True)
    layer_decay: float = _f(0.65, "layer-wise lr decay (MAE ViT-B: 0.65)", TRAIN, above=0.0, max=1.0, advanced=True)
    weight_decay: float = _f(0.05, "AdamW weight decay", TRAIN, min=0.0, advanced=True)
    drop_path: float = _f(DROP_PATH, "stochastic depth rate", TRAIN, min=0.0, below=1.0, advanced=True)
    patience: int = _f(10, "early stopping: epochs without a better validation score (macro-F1; segment: Dice) "
                       "(0: off)", TRAIN, min=0, advanced=True)
    clip_grad: float | None = _f(None, "clip the gradient norm (default: off)", TRAIN, above=0.0, advanced=True)
    augment: str = _f("auto", "training augmentation: auto (finetune: RandAugment and random erasing, linear: mae; "
                      "segment: strong), finetune, mae, strong (segment: MONAI rotation, zoom, gamma, noise), crop "
                      "(segment: crop and flip) or none", TRAIN, choices=list(AUGMENTATIONS), advanced=True)
    eval_batch_size: int = _f(64, "batch size for validation and test", TRAIN, min=1, volatile=True, advanced=True)
    seed: int = _f(0, "seed of the folds, the initialisation and every epoch", TRAIN, min=0)
    strict: bool = _f(False, "refuse test images that were in the pre-training data or duplicated across splits",
                      TRAIN, advanced=True)
    # -- the run
    resume: bool = _f(False, "continue a stopped run in --out", RUN, volatile=True)
    checkpoint_every_seconds: float = _f(30.0, "write a fold's resume state after an epoch only when this many "
                                         "seconds passed since the last write (0: after every epoch); a stop signal "
                                         "always writes", RUN, min=0.0, volatile=True, advanced=True)
    method: str | None = _f(None, "method name in run.json (default: derived)", RUN, volatile=True, advanced=True)
    tensorboard: str = _f("auto", TENSORBOARD_HELP, RUN, choices=list(TENSORBOARD_CHOICES), volatile=True,
                          advanced=True)

    def __post_init__(self) -> None:
        check_fields(self)
        self.spec  # the OBS setting parses

    @property
    def spec(self) -> ObsSpec:
        """The OBS setting (no blur, t = 0, for ``scratch``: no pre-trained model to search with)."""
        return ObsSpec.parse("none" if self.mode == "scratch" else self.obs, self.search_step)

    def resolved_lr(self, world_size: int = 1) -> float:
        """``lr``, or ``blr × global batch / 256`` with global batch = batch_size × number of processes."""
        if self.lr is not None:
            return self.lr
        blr = self.blr if self.blr is not None else (0.1 if self.mode == "linear" else 5e-4)
        return blr * self.batch_size * world_size / 256

    def method_name(self, preset: str | None) -> str:
        """``method``, or the pre-training preset plus the fine-tuning setting (``d2mae-obs-none``, ``mae-s3``)."""
        if self.method:
            return self.method
        if self.mode == "scratch":
            return "scratch"
        spec, base = self.spec, (preset or "d2mae") + ("-linear" if self.mode == "linear" else "")
        if spec.mode == "none":
            return base + "-obs-none"
        if spec.mode == "fixed":
            return base + f"-obs-fixed{spec.sigma:g}"
        return base + (f"-s{spec.search_step}" if spec.search_step != DEFAULT_SEARCH_STEP else "")


@dataclass
class FinetuneConfig(DownstreamConfig):
    """What ``d2mae finetune`` adds: the classifier's mode, a timm backbone instead of a D²MAE encoder, and the
    classification recipe (label smoothing, Mixup/CutMix, class balance, augmentation)."""

    backbone: str | None = _f(None, "fine-tune a timm classifier instead of a pre-trained D²MAE encoder: timm:NAME "
                              "(e.g. timm:swin_large_patch4_window7_224); no blur, no OBS (docs/methods.md)", MODEL,
                              metavar="timm:NAME", advanced=True)
    backbone_weights: str | None = _f(None, "local weights file for --backbone (timm .safetensors/.pth, or USFM's "
                                      "for timm:beit_base_patch16_224); without it the backbone starts from scratch",
                                      MODEL, metavar="FILE", advanced=True)
    smoothing: float = _f(0.1, "label smoothing", TRAIN, min=0.0, below=1.0, advanced=True)
    mixup: float = _f(0.0, "Mixup alpha (0: off; MAE ViT-B: 0.8)", TRAIN, min=0.0, advanced=True)
    cutmix: float = _f(0.0, "CutMix alpha (0: off; MAE ViT-B: 1.0)", TRAIN, min=0.0, advanced=True)
    mixup_prob: float = _f(1.0, "probability of mixing a batch", TRAIN, min=0.0, max=1.0, advanced=True)
    balance: str = _f("none", "imbalanced classes: none, loss (class-weighted) or sampler (balanced batches)", TRAIN,
                      choices=list(BALANCE), advanced=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixing and self.batch_size % 2:
            raise D2maeError(f"must be even with Mixup/CutMix, got {self.batch_size}", option="batch_size")
        if self.mixing and self.balance == "loss":
            raise D2maeError("loss cannot be combined with Mixup/CutMix (soft targets); use sampler",
                             option="balance")
        if self.augment in ("strong", "crop"):
            raise D2maeError(f"{self.augment} is segmentation's; use auto, finetune, mae or none", option="augment")
        if self.backbone:
            timm_name(self.backbone)  # an unknown name is refused first, with close names
            if self.pretrained:
                raise D2maeError("give either pretrained (a D²MAE encoder) or backbone (a timm classifier), not both",
                                 option="backbone")
            if self.mode == "linear":
                raise D2maeError("the linear probe needs a pre-trained D²MAE encoder; use full or scratch",
                                 option="mode")
            if self.mode == "full" and not self.backbone_weights:
                raise D2maeError(f"mode full fine-tunes {self.backbone} from weights: give backbone_weights FILE, or "
                                 "use mode scratch to train it from a random initialisation", option="mode")
            if self.mode == "scratch" and self.backbone_weights:
                raise D2maeError("mode scratch trains from a random initialisation; drop backbone_weights or use "
                                 "mode full", option="mode")
        elif self.backbone_weights:
            raise D2maeError("is only used with backbone timm:NAME", option="backbone_weights")
        if self.trainable_blocks is not None and (self.mode != "full" or self.backbone):
            raise D2maeError("partial fine-tuning freezes part of a pre-trained D²MAE encoder: use it with mode full "
                             "and pretrained", option="trainable_blocks")

    @property
    def spec(self) -> ObsSpec:
        """The OBS setting (no blur, t = 0, for ``scratch`` and timm backbones: no D²MAE model to search with)."""
        return ObsSpec.parse("none" if self.mode == "scratch" or self.backbone else self.obs, self.search_step)

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def resolved_augment(self) -> str:
        if self.augment != "auto":
            return self.augment
        return "mae" if self.mode == "linear" else "finetune"

    def method_name(self, preset: str | None) -> str:
        if self.backbone and not self.method:
            return self.backbone + ("" if self.backbone_weights else "-scratch")
        return super().method_name(preset)


@dataclass
class SegmentConfig(DownstreamConfig):
    """What ``d2mae segment`` adds: the masks and the segmentation model (decoder, classes, joint augmentation)."""

    images: str | None = _f(None, "folder of images (searched recursively); or give --labels", DATA, metavar="DIR")
    masks: str | None = _f(None, "folder of masks that mirrors the images' folder (docs/segment.md)", DATA,
                           metavar="DIR")
    mask_column: str | None = _f(None, "labels CSV column with each image's mask path (relative to the CSV's "
                                 "folder), instead of --masks", DATA, advanced=True)
    mask_suffix: str = _f("", "text after the image stem in mask file names (e.g. _mask for x_mask.png)", DATA)
    num_classes: int = _f(2, "classes in the masks, background included: 2 for binary masks (0/255 or 0/1); K for "
                          "label maps with values 0..K-1", DATA, min=2, max=255, advanced=True)
    decoder: str = _f("fpn", "fpn or upernet (smp's decoders on a simple feature pyramid of the ViT), unetr (MONAI's "
                      "UNETR blocks) or unet (segmentation_models_pytorch U-Net from scratch: no pre-training, no "
                      "blur); docs/segment.md", MODEL, choices=list(DECODERS))
    feature_size: int | None = _f(None, "the decoder's width: FPN / UPerNet channels (default 128 / 256), UNETR's "
                                  "channels at full resolution (default 16)", MODEL, min=1, advanced=True)
    unet_encoder: str = _f("resnet18", "encoder of --decoder unet (smp name)", MODEL, advanced=True)
    crop_scale: list[float] = _f([0.5, 1.0], "area range of the random crop (image and mask together)", TRAIN,
                                 min=0.01, max=1.0, advanced=True)
    hflip: float = _f(0.5, "horizontal flip probability", TRAIN, min=0.0, max=1.0, advanced=True)
    tta: bool = _f(False, "average the probabilities of each image and its mirror image at validation, test and "
                   "prediction (test-time flip averaging)", TRAIN, advanced=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.crop_scale) != 2 or self.crop_scale[0] > self.crop_scale[1]:
            raise D2maeError(f"give two numbers, smallest first, got {self.crop_scale}", option="crop_scale")
        if self.decoder == "unet" and self.pretrained:
            raise D2maeError("the U-Net trains from scratch; drop pretrained or use a ViT decoder", option="decoder")
        if self.mode == "linear":
            raise D2maeError("linear is classification's probe; segment with full, scratch or --trainable-blocks 0",
                             option="mode")
        if not self.pretrained:
            self.mode = "scratch"  # without a pre-trained model a segmenter trains from scratch, as it always did
        if self.batch_size < 2:
            raise D2maeError(f"must be at least 2 (batch normalisation in the decoders), got {self.batch_size}",
                             option="batch_size")
        if self.img_size is not None and self.img_size < 32:
            raise D2maeError(f"must be at least 32 for segmentation, got {self.img_size}", option="img_size")
        if self.augment in ("finetune", "mae"):
            raise D2maeError(f"{self.augment} is classification's; use auto (strong), strong, crop or none",
                             option="augment")
        if self.label_column == "lesion":  # the old spelling of the default (stratify: lesion)
            self.label_column = None
        if self.feature_size is None and self.decoder in DEFAULT_WIDTH:
            self.feature_size = DEFAULT_WIDTH[self.decoder]
        if self.decoder == "fpn" and self.feature_size % 64:  # its segmentation blocks' GroupNorm has 32 groups
            raise D2maeError(f"must be a multiple of 64 for the fpn decoder, got {self.feature_size}",
                             option="feature_size")

    def method_name(self, preset: str | None) -> str:
        if self.decoder == "unet" and not self.method:
            return f"unet-{self.unet_encoder}"
        return super().method_name(preset)


@dataclass
class ProbeConfig(DownstreamConfig):
    """What ``d2mae probe`` adds: the readouts of the frozen encoder's features. ``trainable_blocks`` adds partial
    fine-tuning, run as ``d2mae finetune`` with this config's shared options."""

    probe_c: float = _f(1.0, "inverse L2 strength of the logistic regression", TRAIN, above=0.0)
    force: bool = _f(False, "replace an earlier probe's output in --out (only what d2mae wrote there)", RUN,
                     volatile=True)
    probe_max_iter: int = _f(5000, "iterations of the logistic regression's solver", TRAIN, min=10, advanced=True)
    knn_k: int = _f(20, "neighbours of the kNN readout", TRAIN, min=1)

    def finetune_config(self, **changes: Any) -> FinetuneConfig:
        """The partial fine-tuning of ``trainable_blocks``: this config's shared options, fine-tuning's own at
        their defaults."""
        shared = {f.name: getattr(self, f.name) for f in fields(DownstreamConfig)}
        return FinetuneConfig(**{**shared, "mode": "full", **changes})


def own_fields(cls: type) -> list[str]:
    """The fields ``cls`` declares itself (not those of the classes it builds on)."""
    base = {f.name for b in cls.__mro__[1:] if hasattr(b, "__dataclass_fields__") for f in fields(b)}
    return [f.name for f in fields(cls) if f.name not in base]

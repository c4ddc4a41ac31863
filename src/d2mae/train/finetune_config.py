"""What ``d2mae finetune`` takes (:class:`FinetuneConfig`), and the method name a run carries in ``run.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from d2mae.method.backbones import timm_name
from d2mae.method.model_config import DROP_PATH
from d2mae.method.obs import DEFAULT_SEARCH_STEP, ObsSpec
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.logs import TENSORBOARD_CHOICES, TENSORBOARD_HELP
from d2mae.runtime.options import RuntimeOptions, check_fields

MODES = ("full", "linear", "scratch")


BALANCE = ("none", "loss", "sampler")


@dataclass
class FinetuneConfig(RuntimeOptions):
    """What ``d2mae finetune`` takes: every field is a YAML key and a flag (``batch_size`` ↔ ``--batch-size``).

    Each field's domain is in its metadata (:mod:`d2mae.runtime.options`); ``volatile`` fields may change when a
    stopped run is resumed.

    """
    pretrained: str | None = field(default=None, metadata={
        "help": "pre-trained folder (model.safetensors + config.json), or a released checkpoint file to import "
                "(official MAE .pth, timm MAE .safetensors, MoCo v3 .pth.tar; docs/import.md); optional for "
                "--mode scratch", "metavar": "DIR|FILE", "volatile": True})
    backbone: str | None = field(default=None, metadata={
        "help": "fine-tune a timm classifier instead of a pre-trained D²MAE encoder: timm:NAME (e.g. "
                "timm:swin_large_patch4_window7_224); no blur, no OBS (docs/methods.md)", "metavar": "timm:NAME"})
    backbone_weights: str | None = field(default=None, metadata={
        "help": "local weights file for --backbone (timm .safetensors/.pth, or USFM's for timm:beit_base_patch16_224); "
                "without it the backbone starts from scratch (--mode scratch)", "metavar": "FILE"})
    labels: str = field(default="", metadata={"help": "labels CSV (path,label[,group][,split|fold]) or a "
                                                      "class-per-folder tree", "metavar": "CSV|DIR"})
    path_column: str = field(default="path", metadata={"help": "labels CSV column with the image path or ID"})
    label_column: str = field(default="label", metadata={"help": "labels CSV column with the class"})
    group_column: str | None = field(default=None, metadata={
        "help": "patient/group column (default: 'group' if present); no patient crosses folds"})
    split_column: str | None = field(default=None, metadata={"help": "train/val/test column (default: 'split')"})
    fold_column: str | None = field(default=None, metadata={
        "help": "each image's test fold (default: 'fold' or 'kFold')"})
    image_root: str | None = field(default=None, metadata={"help": "folder the CSV paths are relative to"})
    image_ext: str = field(default="", metadata={"help": "extension added to path values that lack it (.png)"})
    allow_outside_root: bool = field(default=False, metadata={
        "help": "follow labels CSV paths that lead outside --image-root (absolute, ../, links); refused by default",
        "volatile": True})
    folds_csv: str | None = field(default=None, metadata={
        "help": "CSV joined on --path-column with fold columns (BUS-BRA 5-fold-cv.csv: kFold, valid_k)"})
    classes: list[str] | None = field(default=None, metadata={"help": "class order (default: sorted names)"})
    keep_columns: list[str] | None = field(default=None, metadata={
        "help": "labels CSV columns copied into predictions.csv (e.g. Device)"})
    protocol: str = field(default="split:3:1:1", metadata={
        "help": "split:3:1:1, kfold:5, csv (the split/fold column) or holdout:FILE"})
    folds: str | None = field(default=None, metadata={"help": "run only these folds, e.g. 1,3"})
    out: str = field(default="", metadata={"help": "output folder", "metavar": "DIR", "volatile": True})
    obs: str = field(default="search", metadata={"help": "search, none or fixed:SIGMA (Table 3c)"})
    obs_table: str | None = field(default=None, metadata={"help": "reuse this OBS table (obs.csv from d2mae obs)",
                                                           "volatile": True})
    search_step: int = field(default=DEFAULT_SEARCH_STEP, metadata={"help": "OBS search step s (Table 3d)",
                                                                    "min": 1})
    mode: str = field(default="full", metadata={"help": "full, linear (probe) or scratch (no pre-training)",
                                                "choices": list(MODES)})
    label_fraction: float = field(default=1.0, metadata={
        "help": "train on this share of each fold's training images (a stratified, patient-group-aware subset, the "
                "same for every method); validation and test parts unchanged", "above": 0.0, "max": 1.0})
    trainable_blocks: int | None = field(default=None, metadata={
        "help": "partial fine-tuning (mode full): train only the last N encoder blocks, the pooling norm and the "
                "head; the rest of the pre-trained encoder stays frozen", "min": 0})
    arch: str = field(default="vit_tiny_patch16", metadata={"help": "architecture for --mode scratch without "
                                                                    "--pretrained"})
    img_size: int = field(default=224, metadata={"help": "image size for --mode scratch without --pretrained",
                                                 "min": 1})
    in_chans: int = field(default=1, metadata={"help": "channels for --mode scratch without --pretrained",
                                               "choices": [1, 3]})
    epochs: int = field(default=50, metadata={"help": "most epochs per fold", "min": 1})
    warmup_epochs: float = field(default=5.0, metadata={"help": "linear lr warm-up (epochs)", "min": 0.0})
    batch_size: int = field(default=32, metadata={"help": "batch size per process (paper: 32)", "min": 1})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size for validation and test", "min": 1,
                                                       "volatile": True})
    blr: float | None = field(default=None, metadata={
        "help": "base lr, lr = blr × batch × processes / 256 (default 5e-4; linear: 0.1)", "above": 0.0})
    lr: float | None = field(default=None, metadata={"help": "absolute lr (overrides --blr)", "above": 0.0})
    min_lr: float = field(default=1e-6, metadata={"help": "lr at the end of the cosine", "min": 0.0})
    layer_decay: float = field(default=0.65, metadata={"help": "layer-wise lr decay (MAE ViT-B: 0.65)",
                                                       "above": 0.0, "max": 1.0})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay", "min": 0.0})
    drop_path: float = field(default=DROP_PATH, metadata={"help": "stochastic depth rate", "min": 0.0, "below": 1.0})
    smoothing: float = field(default=0.1, metadata={"help": "label smoothing", "min": 0.0, "below": 1.0})
    mixup: float = field(default=0.0, metadata={"help": "Mixup alpha (0: off; MAE ViT-B: 0.8)", "min": 0.0})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha (0: off; MAE ViT-B: 1.0)", "min": 0.0})
    mixup_prob: float = field(default=1.0, metadata={"help": "probability of mixing a batch", "min": 0.0,
                                                     "max": 1.0})
    balance: str = field(default="none", metadata={
        "help": "imbalanced classes: none, loss (class-weighted) or sampler (balanced batches)",
        "choices": list(BALANCE)})
    augment: str = field(default="auto", metadata={
        "help": "training augmentation: auto (finetune; linear: mae), finetune, mae or none",
        "choices": ["auto", "finetune", "mae", "none"]})
    patience: int = field(default=10, metadata={"help": "early stopping: epochs without a better val macro-F1 "
                                                        "(0: off)", "min": 0})
    clip_grad: float | None = field(default=None, metadata={"help": "clip the gradient norm (default: off)",
                                                            "above": 0.0})
    seed: int = field(default=0, metadata={"help": "seed of the folds, the initialisation and every epoch",
                                           "min": 0})
    checkpoint_every_seconds: float = field(default=30.0, metadata={
        "help": "write a fold's resume state (resume.pt, best.safetensors) after an epoch only when this many seconds "
                "passed since the last write (0: after every epoch); a stop signal always writes", "min": 0.0,
        "volatile": True})
    obs_batch_size: int = field(default=32, metadata={"help": "images per OBS batch", "min": 1, "volatile": True})
    strict: bool = field(default=False, metadata={
        "help": "refuse test images that were in the pre-training data or duplicated across splits"})
    resume: bool = field(default=False, metadata={"help": "continue a stopped run in --out", "volatile": True})
    method: str | None = field(default=None, metadata={"help": "method name in run.json (default: derived)",
                                                       "volatile": True})
    tensorboard: str = field(default="auto", metadata={"help": TENSORBOARD_HELP, "choices": list(TENSORBOARD_CHOICES),
                                                       "volatile": True})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.mixing and self.batch_size % 2:
            raise D2maeError(f"must be even with Mixup/CutMix, got {self.batch_size}", option="batch_size")
        if self.mixing and self.balance == "loss":
            raise D2maeError("loss cannot be combined with Mixup/CutMix (soft targets); use sampler",
                             option="balance")
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
        self.spec  # the OBS setting parses

    @property
    def spec(self) -> ObsSpec:
        """The OBS setting (no blur, t = 0, for ``scratch`` and timm backbones: no D²MAE model to search with)."""
        return ObsSpec.parse("none" if self.mode == "scratch" or self.backbone else self.obs, self.search_step)

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def resolved_lr(self, world_size: int = 1) -> float:
        """``lr``, or ``blr × global batch / 256`` with global batch = batch_size × number of processes."""
        if self.lr is not None:
            return self.lr
        blr = self.blr if self.blr is not None else (0.1 if self.mode == "linear" else 5e-4)
        return blr * self.batch_size * world_size / 256

    def resolved_augment(self) -> str:
        if self.augment != "auto":
            return self.augment
        return "mae" if self.mode == "linear" else "finetune"


def method_name(cfg: FinetuneConfig, pretrained_meta: dict[str, Any] | None) -> str:
    """The name a run carries in run.json: ``--method``, or the pre-training preset plus the fine-tuning setting."""
    if cfg.method:
        return cfg.method
    if cfg.backbone:
        return cfg.backbone + ("" if cfg.backbone_weights else "-scratch")
    if cfg.mode == "scratch":
        return "scratch"
    extra = (pretrained_meta or {}).get("extra") or {}
    base = str((extra.get("pretrain") or {}).get("preset") or extra.get("preset") or extra.get("method") or "d2mae")
    spec = cfg.spec
    if cfg.mode == "linear":
        base += "-linear"
    if spec.mode == "none":
        base += "-obs-none"
    elif spec.mode == "fixed":
        base += f"-obs-fixed{spec.sigma:g}"
    elif spec.search_step != DEFAULT_SEARCH_STEP:
        base += f"-s{spec.search_step}"
    return base

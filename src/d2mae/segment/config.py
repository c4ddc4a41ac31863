"""What ``d2mae segment`` takes (:class:`SegmentConfig`): the images and masks, the model, and ``finetune``'s protocol,
OBS, budget and runtime options."""

from __future__ import annotations

from dataclasses import dataclass, field

from d2mae.method.model_config import DROP_PATH
from d2mae.method.obs import DEFAULT_SEARCH_STEP, ObsSpec
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.options import RuntimeOptions, check_fields
from d2mae.segment.model import DECODERS

RUN_CONFIG = "segment.yaml"  # the resolved config: from here on the folder holds a segmentation run
LESION = "lesion"  # --stratify lesion: stratify the folds by whether an image's mask holds a lesion


@dataclass
class SegmentConfig(RuntimeOptions):
    """What ``d2mae segment`` takes: every field is a YAML key and a flag (``batch_size`` ↔ ``--batch-size``)."""

    pretrained: str | None = field(default=None, metadata={
        "help": "pre-trained folder (model.safetensors + config.json) of any method with a ViT encoder; without it "
                "the model trains from scratch", "metavar": "DIR", "volatile": True})
    images: str | None = field(default=None, metadata={
        "help": "folder of images (searched recursively); or give --labels", "metavar": "DIR"})
    labels: str | None = field(default=None, metadata={
        "help": "CSV with an image path column (and optional mask, group, split, fold, stratify columns)",
        "metavar": "CSV"})
    masks: str | None = field(default=None, metadata={
        "help": "folder of masks named like the images (same file stem, any image extension)", "metavar": "DIR"})
    mask_column: str | None = field(default=None, metadata={
        "help": "labels CSV column with each image's mask path (relative to the CSV's folder), instead of --masks"})
    mask_suffix: str = field(default="", metadata={
        "help": "text after the image stem in mask file names (e.g. _mask for x_mask.png)"})
    path_column: str = field(default="path", metadata={"help": "labels CSV column with the image path or ID"})
    image_root: str | None = field(default=None, metadata={"help": "folder the CSV paths are relative to"})
    image_ext: str = field(default="", metadata={"help": "extension added to path values that lack it (.png)"})
    allow_outside_root: bool = field(default=False, metadata={
        "help": "follow labels CSV paths that lead outside --image-root", "volatile": True})
    group_column: str | None = field(default=None, metadata={
        "help": "patient/group column (default: 'group' if present); no patient crosses folds"})
    split_column: str | None = field(default=None, metadata={"help": "train/val/test column (default: 'split')"})
    fold_column: str | None = field(default=None, metadata={"help": "each image's test fold (default: 'fold')"})
    stratify: str = field(default=LESION, metadata={
        "help": "stratify the folds by this labels CSV column, or by 'lesion' (whether the mask holds one)"})
    num_classes: int = field(default=2, metadata={
        "help": "classes in the masks, background included: 2 for binary masks (0/255 or 0/1); K for label maps "
                "with values 0..K-1", "min": 2, "max": 255})
    protocol: str = field(default="split:3:1:1", metadata={
        "help": "split:3:1:1, kfold:5, csv (the split/fold column) or holdout:FILE"})
    folds: str | None = field(default=None, metadata={"help": "run only these folds, e.g. 1,3"})
    out: str = field(default="", metadata={"help": "output folder", "metavar": "DIR", "volatile": True})
    decoder: str = field(default="unetr", metadata={
        "help": "unetr (ViT encoder + MONAI UNETR decoder) or unet (segmentation_models_pytorch U-Net from scratch: "
                "no pre-training, no blur)", "choices": list(DECODERS)})
    feature_size: int = field(default=16, metadata={"help": "UNETR feature size (channels at full resolution)",
                                                    "min": 1})
    unet_encoder: str = field(default="resnet18", metadata={"help": "encoder of --decoder unet (smp name)"})
    obs: str = field(default="search", metadata={"help": "search, none or fixed:SIGMA (the ablation)"})
    obs_table: str | None = field(default=None, metadata={"help": "reuse this OBS table (obs.csv from d2mae obs)",
                                                           "volatile": True})
    search_step: int = field(default=DEFAULT_SEARCH_STEP, metadata={"help": "OBS search step s", "min": 1})
    arch: str = field(default="vit_tiny_patch16", metadata={"help": "ViT architecture without --pretrained"})
    img_size: int = field(default=224, metadata={
        "help": "model input size without --pretrained (a pre-trained model's own size otherwise)", "min": 32})
    in_chans: int = field(default=1, metadata={"help": "channels without --pretrained", "choices": [1, 3]})
    epochs: int = field(default=50, metadata={"help": "most epochs per fold", "min": 1})
    warmup_epochs: float = field(default=5.0, metadata={"help": "linear lr warm-up (epochs)", "min": 0.0})
    batch_size: int = field(default=16, metadata={"help": "batch size", "min": 2})
    eval_batch_size: int = field(default=32, metadata={"help": "batch size for validation and test", "min": 1,
                                                       "volatile": True})
    blr: float = field(default=5e-4, metadata={"help": "base lr, lr = blr × batch / 256", "above": 0.0})
    lr: float | None = field(default=None, metadata={"help": "absolute lr (overrides --blr)", "above": 0.0})
    min_lr: float = field(default=1e-6, metadata={"help": "lr at the end of the cosine", "min": 0.0})
    layer_decay: float = field(default=0.65, metadata={"help": "layer-wise lr decay of the ViT encoder",
                                                       "above": 0.0, "max": 1.0})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay", "min": 0.0})
    drop_path: float = field(default=DROP_PATH, metadata={"help": "stochastic depth rate", "min": 0.0, "below": 1.0})
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0], metadata={
        "help": "area range of the random crop (image and mask together)", "min": 0.01, "max": 1.0})
    hflip: float = field(default=0.5, metadata={"help": "horizontal flip probability", "min": 0.0, "max": 1.0})
    patience: int = field(default=10, metadata={"help": "early stopping: epochs without a better val Dice (0: off)",
                                                "min": 0})
    clip_grad: float | None = field(default=None, metadata={"help": "clip the gradient norm", "above": 0.0})
    seed: int = field(default=0, metadata={"help": "seed of the folds, the initialisation and every epoch",
                                           "min": 0})
    checkpoint_every_seconds: float = field(default=30.0, metadata={
        "help": "write a fold's resume state at most this often (0: every epoch); a stop signal always writes",
        "min": 0.0, "volatile": True})
    obs_batch_size: int = field(default=32, metadata={"help": "images per OBS batch", "min": 1, "volatile": True})
    resume: bool = field(default=False, metadata={"help": "continue a stopped run in --out", "volatile": True})
    method: str | None = field(default=None, metadata={"help": "method name in run.json (default: derived)",
                                                       "volatile": True})

    def __post_init__(self) -> None:
        check_fields(self)
        if len(self.crop_scale) != 2 or self.crop_scale[0] > self.crop_scale[1]:
            raise D2maeError(f"give two numbers, smallest first, got {self.crop_scale}", option="crop_scale")
        if self.decoder == "unet" and self.pretrained:
            raise D2maeError("the U-Net trains from scratch; drop pretrained or use decoder unetr", option="decoder")
        self.spec  # the OBS setting parses

    @property
    def mode(self) -> str:
        """``full`` (a pre-trained encoder, layer-wise lr decay) or ``scratch`` (:mod:`d2mae.train.optim`)."""
        return "full" if self.pretrained else "scratch"

    @property
    def spec(self) -> ObsSpec:
        """The OBS setting (no blur, t = 0, without a pre-trained model: none to search with)."""
        return ObsSpec.parse(self.obs if self.pretrained else "none", self.search_step)

    def resolved_lr(self, world_size: int = 1) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size * world_size / 256

    def method_name(self, preset: str | None) -> str:
        """``--method``, or the pre-training preset (``scratch``, ``unet``) plus the OBS setting."""
        if self.method:
            return self.method
        if self.decoder == "unet":
            return f"unet-{self.unet_encoder}"
        if not self.pretrained:
            return "scratch"
        spec, base = self.spec, preset or "d2mae"
        if spec.mode == "none":
            return base + "-obs-none"
        if spec.mode == "fixed":
            return base + f"-obs-fixed{spec.sigma:g}"
        return base + (f"-s{spec.search_step}" if spec.search_step != DEFAULT_SEARCH_STEP else "")

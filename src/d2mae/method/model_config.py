"""What fixes a pre-training model: the ViT architecture (:data:`ARCHITECTURES`, named specs), the blur schedule and its
conditioning (Table 3a/3b), the masking and loss (Eq. 3), the input normalisation, and the objective of Table 2's
other rows with its own settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from d2mae.method.blur import BlurSchedule
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.options import check_fields

# name: (patch, embed_dim, depth, num_heads). Decoder defaults follow MAE: 512 wide, 8 blocks, 16 heads.
ARCHITECTURES: dict[str, tuple[int, int, int, int]] = {
    "vit_tiny_patch16": (16, 192, 12, 3),
    "vit_small_patch16": (16, 384, 12, 6),
    "vit_base_patch16": (16, 768, 12, 12),
    "vit_large_patch16": (16, 1024, 24, 16),
}


BLUR_EMBEDDINGS = ("token", "add", "none")


# Pre-training objectives (d2mae.method.objectives): the (deblurring) masked autoencoder of MAE, DeblurrMAE and
# D²MAE, and the other self-supervised rows of Table 2.
OBJECTIVES = ("mae", "moco-v3", "diffmae")


DIFFUSION_SCHEDULES = ("cosine", "linear")


@dataclass
class ModelConfig:
    """Everything that fixes a DeblurMAE's architecture, its blur schedule and its input normalisation.

    Each field's domain is in its metadata (:mod:`d2mae.runtime.options`); ``__post_init__`` checks them and the
    rules between fields, so a config from flags, YAML, Python or a saved ``config.json`` is checked alike.
    """

    model: str = field(default="vit_base_patch16", metadata={
        "help": "architecture", "choices": list(ARCHITECTURES)})
    img_size: int = field(default=224, metadata={
        "help": "input size in pixels (square), divisible by the patch", "min": 1})
    in_chans: int = field(default=1, metadata={"help": "input channels: 1 (grayscale ultrasound) or 3",
                                                "choices": [1, 3]})
    patch_size: int | None = field(default=None, metadata={"help": "override the architecture's patch size",
                                                           "min": 1})
    embed_dim: int | None = field(default=None, metadata={"help": "override the encoder width", "min": 4})
    depth: int | None = field(default=None, metadata={"help": "override the encoder depth", "min": 1})
    num_heads: int | None = field(default=None, metadata={"help": "override the encoder heads", "min": 1})
    decoder_embed_dim: int = field(default=512, metadata={"help": "decoder width (MAE: 512)", "min": 4})
    decoder_depth: int = field(default=8, metadata={"help": "decoder blocks (MAE: 8)", "min": 1})
    decoder_num_heads: int = field(default=16, metadata={"help": "decoder heads (MAE: 16)", "min": 1})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP width / embedding width", "above": 0.0})
    blur: bool = field(default=True, metadata={"help": "blur the input (off: plain MAE)"})
    sigma_start: float = field(default=BlurSchedule.start, metadata={"help": "σ_1 of the blur schedule",
                                                                     "above": 0.0})
    sigma_stop: float = field(default=BlurSchedule.stop, metadata={"help": "σ_T of the blur schedule",
                                                                   "above": 0.0})
    sigma_step: float = field(default=BlurSchedule.step, metadata={"help": "fixed σ interval of the schedule",
                                                                   "above": 0.0})
    blur_embed: str = field(default="token", metadata={
        "help": "blur conditioning (Table 3b)", "choices": list(BLUR_EMBEDDINGS)})
    mask_ratio: float = field(default=0.75, metadata={"help": "share of patches masked in pre-training",
                                                      "min": 0.0, "below": 1.0})
    loss_on: str = field(default="all", metadata={
        "help": "patches in the loss: all (D²MAE, DeblurrMAE) or masked (MAE)", "choices": ["all", "masked"]})
    norm_pix_loss: bool = field(default=False, metadata={"help": "normalise each target patch (MAE option)"})
    mean: list[float] | None = field(default=None, metadata={
        "help": "per-channel input mean in [0,1] (default: from the data)", "min": 0.0, "max": 1.0})
    std: list[float] | None = field(default=None, metadata={
        "help": "per-channel input std in [0,1] (default: from the data)", "above": 0.0, "max": 1.0})
    objective: str = field(default="mae", metadata={
        "help": "pre-training objective: mae (masked autoencoder: MAE, DeblurrMAE, D²MAE), moco-v3 or diffmae "
                "(set by --preset)", "choices": list(OBJECTIVES)})
    moco_dim: int = field(default=256, metadata={"help": "MoCo v3: projector and predictor output width", "min": 1})
    moco_mlp_dim: int = field(default=4096, metadata={"help": "MoCo v3: hidden width of its MLPs (ViT: 4096)",
                                                      "min": 1})
    moco_temperature: float = field(default=0.2, metadata={"help": "MoCo v3: InfoNCE temperature (ViT: 0.2)",
                                                           "above": 0.0})
    moco_momentum: float = field(default=0.99, metadata={
        "help": "MoCo v3: momentum of the key encoder at the start; a half-cosine takes it to 1 (ViT: 0.99)",
        "min": 0.0, "max": 1.0})
    diffusion_steps: int = field(default=1000, metadata={"help": "DiffMAE: diffusion steps T", "min": 1})
    diffusion_schedule: str = field(default="cosine", metadata={
        "help": "DiffMAE: noise schedule, cosine (improved DDPM) or linear (DDPM)",
        "choices": list(DIFFUSION_SCHEDULES)})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.img_size < self.patch or self.img_size % self.patch:
            raise D2maeError(f"must be a positive multiple of the patch size ({self.patch}); try "
                             f"{max(self.patch, round(self.img_size / self.patch) * self.patch)}", option="img_size")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.in_chans:
                raise D2maeError(f"needs {self.in_chans} value(s), one per channel, got {value}", option=name)
        if self.dim % self.heads:
            raise D2maeError(f"the encoder width ({self.dim}) must be divisible by its heads ({self.heads})",
                             option="num_heads" if self.num_heads else "embed_dim")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise D2maeError(f"the decoder width ({self.decoder_embed_dim}) must be divisible by its heads "
                             f"({self.decoder_num_heads})", option="decoder_num_heads")
        for name, width in (("embed_dim", self.dim), ("decoder_embed_dim", self.decoder_embed_dim)):
            if width % 4:
                raise D2maeError(f"must be divisible by 4 (2-D sin-cos position embeddings), got {width}", option=name)
        if self.objective != "mae" and (self.blur or self.blur_embed != "none"):
            raise D2maeError(f"{self.objective} pre-trains without the blur schedule; use blur false and "
                             "blur_embed none (its preset does)", option="objective")
        if self.objective == "diffmae" and self.loss_on != "masked":
            raise D2maeError("diffmae denoises the masked patches: its loss is on them (loss_on masked)",
                             option="loss_on")
        self.schedule  # the σ range, checked by BlurSchedule

    @property
    def patch(self) -> int:
        return self.patch_size or ARCHITECTURES[self.model][0]

    @property
    def dim(self) -> int:
        return self.embed_dim or ARCHITECTURES[self.model][1]

    @property
    def blocks(self) -> int:
        return self.depth or ARCHITECTURES[self.model][2]

    @property
    def heads(self) -> int:
        return self.num_heads or ARCHITECTURES[self.model][3]

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        """CLS, plus BLU(t) in ``token`` mode."""
        return 2 if self.blur_embed == "token" else 1

    @property
    def schedule(self) -> BlurSchedule:
        """The blur schedule {σ_1 … σ_T} of these fields: the one object every consumer asks (σ of a level, the
        levels OBS searches, the stored form of an OBS table)."""
        return BlurSchedule(self.sigma_start, self.sigma_stop, self.sigma_step, enabled=self.blur)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise D2maeError(f"{source}: unknown model option(s) {', '.join(unknown)}; was it written by a newer d2mae?")
        try:
            return cls(**data)
        except D2maeError as exc:
            raise D2maeError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise D2maeError(f"{source}: {exc}") from None

"""What fixes a pre-training model: the ViT architecture (:data:`ARCHITECTURES`, named specs), the blur schedule and its
conditioning (Table 3a/3b), the masking and loss (Eq. 3), the input normalisation, and the objective of Table 2's
other rows with its own settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

from d2mae.method.blur import BlurSchedule
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.options import check_fields, check_saved_types


class ArchSpec(NamedTuple):
    """A ViT encoder's shape (timm's names: ``vit_<size>_patch16``)."""
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int


# Decoder defaults follow MAE: 512 wide, 8 blocks, 16 heads (ModelConfig's decoder_* fields).
ARCHITECTURES: dict[str, ArchSpec] = {
    "vit_tiny_patch16": ArchSpec(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": ArchSpec(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": ArchSpec(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": ArchSpec(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
}
#: The input normalisation of a model whose data set statistics are unknown (mean and std per channel, in [0, 1]).
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25
#: Stochastic depth of fine-tuning (MAE's ViT-B recipe), the default of every classifier.
DROP_PATH = 0.1


def default_stats(in_chans: int) -> tuple[list[float], list[float]]:
    """:data:`DEFAULT_MEAN` and :data:`DEFAULT_STD` for each of ``in_chans`` channels."""
    return [DEFAULT_MEAN] * in_chans, [DEFAULT_STD] * in_chans



BLUR_EMBEDDINGS = ("token", "add", "none")


# Pre-training objectives (d2mae.method.objectives): the (deblurring) masked autoencoder of MAE, DeblurrMAE and
# D²MAE, and the other self-supervised rows of Table 2.
OBJECTIVES = ("mae", "moco-v3", "diffmae")


DIFFUSION_SCHEDULES = ("cosine", "linear")


@dataclass
class MoCoOptions:
    """MoCo v3's own settings (its ViT recipe: Chen et al. 2021), used only by ``objective: moco-v3``."""

    moco_dim: int = field(default=256, metadata={
        "group": "model", "advanced": True, "help": "MoCo v3: projector and predictor output width", "min": 1})
    moco_mlp_dim: int = field(default=4096, metadata={
        "group": "model", "advanced": True, "help": "MoCo v3: hidden width of its MLPs (ViT: 4096)", "min": 1})
    moco_temperature: float = field(default=0.2, metadata={
        "group": "model", "advanced": True, "help": "MoCo v3: InfoNCE temperature (ViT: 0.2)", "above": 0.0})
    moco_momentum: float = field(default=0.99, metadata={"group": "model", "advanced": True, 
        "help": "MoCo v3: momentum of the key encoder at the start; a half-cosine takes it to 1 (ViT: 0.99)",
        "min": 0.0, "max": 1.0})


@dataclass
class DiffMAEOptions:
    """DiffMAE's own settings (Wei et al. 2023), used only by ``objective: diffmae``."""

    diffusion_steps: int = field(default=1000, metadata={
        "group": "model", "advanced": True, "help": "DiffMAE: diffusion steps T", "min": 1})
    diffusion_schedule: str = field(default="cosine", metadata={"group": "model", "advanced": True, 
        "help": "DiffMAE: noise schedule, cosine (improved DDPM) or linear (DDPM)",
        "choices": list(DIFFUSION_SCHEDULES)})


#: The settings each of Table 2's other objectives adds; a saved config holds only its own objective's.
OBJECTIVE_OPTIONS: dict[str, type] = {"moco-v3": MoCoOptions, "diffmae": DiffMAEOptions}
OBJECTIVE_FIELDS: tuple[str, ...] = tuple(f.name for options in OBJECTIVE_OPTIONS.values() for f in fields(options))
_OBJECTIVE_FIELDS = set(OBJECTIVE_FIELDS)


@dataclass
class ModelConfig(MoCoOptions, DiffMAEOptions):
    """Everything that fixes a DeblurMAE's architecture, its blur schedule and its input normalisation.

    Each field's domain is in its metadata (:mod:`d2mae.runtime.options`); ``__post_init__`` checks them and the
    rules between fields, so a config from flags, YAML, Python or a saved ``config.json`` is checked alike. The
    settings of Table 2's other objectives come from :class:`MoCoOptions` and :class:`DiffMAEOptions`.
    """

    arch: str = field(default="vit_base_patch16", metadata={"group": "model", 
        "help": "architecture: a named ViT (its patch size, width, depth and heads, each of which the fields below "
                "may change)", "choices": list(ARCHITECTURES), "old_names": ["model"]})
    img_size: int = field(default=224, metadata={"group": "model", 
        "help": "input size in pixels (square), divisible by the patch", "min": 1, "max": 8192})
    in_chans: int = field(default=1, metadata={
        "group": "model", "help": "input channels: 1 (grayscale ultrasound) or 3", "choices": [1, 3]})
    patch_size: int | None = field(default=None, metadata={
        "group": "model", "advanced": True, "help": "patch size (default: the architecture's)", "min": 1})
    embed_dim: int | None = field(default=None, metadata={
        "group": "model", "advanced": True, "help": "encoder width (default: the architecture's)", "min": 4})
    depth: int | None = field(default=None, metadata={
        "group": "model", "advanced": True, "help": "encoder blocks (default: the architecture's)", "min": 1})
    num_heads: int | None = field(default=None, metadata={
        "group": "model", "advanced": True, "help": "encoder heads (default: the architecture's)", "min": 1})
    decoder_embed_dim: int = field(default=512, metadata={
        "group": "model", "advanced": True, "help": "decoder width (MAE: 512)", "min": 4})
    decoder_depth: int = field(default=8, metadata={
        "group": "model", "advanced": True, "help": "decoder blocks (MAE: 8)", "min": 1})
    decoder_num_heads: int = field(default=16, metadata={
        "group": "model", "advanced": True, "help": "decoder heads (MAE: 16)", "min": 1})
    mlp_ratio: float = field(default=4.0, metadata={
        "group": "model", "advanced": True, "help": "MLP width / embedding width", "above": 0.0})
    blur: bool = field(default=True, metadata={
        "group": "model", "advanced": True, "help": "blur the input (off: plain MAE)"})
    sigma_start: float = field(default=BlurSchedule.start, metadata={
        "group": "model", "advanced": True, "help": "σ_1 of the blur schedule", "above": 0.0})
    sigma_stop: float = field(default=BlurSchedule.stop, metadata={
        "group": "model", "advanced": True, "help": "σ_T of the blur schedule", "above": 0.0})
    sigma_step: float = field(default=BlurSchedule.step, metadata={
        "group": "model", "advanced": True, "help": "fixed σ interval of the schedule", "above": 0.0})
    blur_embed: str = field(default="token", metadata={"group": "model", "advanced": True, 
        "help": "blur conditioning (Table 3b)", "choices": list(BLUR_EMBEDDINGS)})
    mask_ratio: float = field(default=0.75, metadata={
        "group": "model", "advanced": True, "help": "share of patches masked in pre-training", "min": 0.0,
        "below": 1.0})
    loss_on: str = field(default="all", metadata={"group": "model", "advanced": True, 
        "help": "patches in the loss: all (D²MAE, DeblurrMAE) or masked (MAE)", "choices": ["all", "masked"]})
    norm_pix_loss: bool = field(default=False, metadata={
        "group": "model", "advanced": True, "help": "normalise each target patch (MAE option)"})
    mean: list[float] | None = field(default=None, metadata={"group": "model", "advanced": True, 
        "help": "per-channel input mean in [0,1] (default: from the data)", "min": 0.0, "max": 1.0})
    std: list[float] | None = field(default=None, metadata={"group": "model", "advanced": True, 
        "help": "per-channel input std in [0,1] (default: from the data)", "above": 0.0, "max": 1.0})
    objective: str = field(default="mae", metadata={"group": "model", "advanced": True, 
        "help": "pre-training objective: mae (masked autoencoder: MAE, DeblurrMAE, D²MAE), moco-v3 or diffmae "
                "(set by --preset)", "choices": list(OBJECTIVES)})
    def __post_init__(self) -> None:
        check_fields(self)
        spec = ARCHITECTURES[self.arch]  # the named ViT fills in the settings not given
        self.patch_size = self.patch_size or spec.patch_size
        self.embed_dim = self.embed_dim or spec.embed_dim
        self.depth = self.depth or spec.depth
        self.num_heads = self.num_heads or spec.num_heads
        p = self.patch_size
        if self.img_size < p or self.img_size % p:
            raise D2maeError(f"must be a positive multiple of the patch size ({p}); try "
                             f"{max(p, round(self.img_size / p) * p)}", option="img_size")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.in_chans:
                raise D2maeError(f"needs {self.in_chans} value(s), one per channel, got {value}", option=name)
        if self.embed_dim % self.num_heads:
            raise D2maeError(f"the encoder width ({self.embed_dim}) must be divisible by its heads ({self.num_heads})",
                             option="num_heads")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise D2maeError(f"the decoder width ({self.decoder_embed_dim}) must be divisible by its heads "
                             f"({self.decoder_num_heads})", option="decoder_num_heads")
        for name, width in (("embed_dim", self.embed_dim), ("decoder_embed_dim", self.decoder_embed_dim)):
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
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

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
        """The stored form (``config.json``): the masked autoencoder's fields, then only this objective's own
        settings (a D²MAE config carries no MoCo v3 or DiffMAE field; :meth:`from_dict` reads either form)."""
        data = asdict(self)
        options = OBJECTIVE_OPTIONS.get(self.objective)
        own = {f.name for f in fields(options)} if options else set()
        core = {k: v for k, v in data.items() if k not in _OBJECTIVE_FIELDS}
        return {**core, **{k: data[k] for k in data if k in own}}

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "ModelConfig":
        if "model" in data and "arch" not in data:  # config.json before 0.3 named the architecture 'model'
            data = {("arch" if k == "model" else k): v for k, v in data.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise D2maeError(f"{source}: unknown model option(s) {', '.join(unknown)}; was it written by a newer d2mae?")
        check_saved_types(cls, data, source)
        try:
            return cls(**data)
        except D2maeError as exc:
            raise D2maeError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise D2maeError(f"{source}: {exc}") from None

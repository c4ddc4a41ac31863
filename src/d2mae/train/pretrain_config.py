"""What ``d2mae pretrain`` takes: :class:`PretrainConfig` (the model's fields and the run's), and
:func:`make_config`, the command line's precedence in Python."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from d2mae.method.model_config import OBJECTIVE_FIELDS, ModelConfig
from d2mae.method.presets import PRESETS, preset_overrides
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.logs import TENSORBOARD_CHOICES, TENSORBOARD_HELP
from d2mae.runtime.options import RuntimeOptions, build_config

# the masked autoencoder's fields first, then the other objectives' own settings (as config.json stores them)
MODEL_FIELDS: tuple[str, ...] = tuple(sorted((f.name for f in fields(ModelConfig)),
                                             key=lambda name: name in OBJECTIVE_FIELDS))


@dataclass
class PretrainConfig(ModelConfig, RuntimeOptions):
    """Every option of ``d2mae pretrain``: the model (all of :class:`ModelConfig`'s fields) and the run.

    Each field is a YAML key and a flag (``batch_size`` ↔ ``--batch-size``), with its domain in its metadata
    (:mod:`d2mae.runtime.options`); ``volatile`` fields may change when a stopped run is resumed. Precedence, lowest
    first: defaults < ``preset`` (:data:`PRESETS`) < the YAML file (``config``) < flags. Learning rate as MAE:
    ``lr = blr × effective batch / 256`` with effective batch = batch_size × accum_iter × number of processes.
    """

    data: list[str] = field(default_factory=list, metadata={"group": "data", 
        "help": "image folders, image files or .csv/.txt lists of images (required)", "metavar": "PATH",
        "volatile": True})
    out: str = field(default="", metadata={"group": "data", 
        "help": "output folder; it becomes the pre-trained model folder (required)", "metavar": "DIR",
        "volatile": True})
    preset: str = field(default="d2mae", metadata={"group": "data", 
        "help": "method: d2mae (the paper), mae, deblurrmae, moco-v3, diffmae, or the ablations range-0.6, "
                "range-1.6, embed-none, embed-add", "choices": list(PRESETS)})
    config: str | None = field(default=None, metadata={
        "help": "YAML file of options (keys as the flags, with _ or -); flags given here override it",
        "metavar": "FILE.yaml", "volatile": True})
    init_from: str | None = field(default=None, metadata={"advanced": True, 
        "help": "start from these weights instead of a random initialisation: an official MAE .pth "
                "(mae_pretrain_vit_base.pth), timm's vit_*_patch16_224.mae model.safetensors, or a d2mae model "
                "folder; converted to this model (blur token added, 3→1 channel, other image size; see "
                "docs/import.md) and reported in OUT/init_report.json", "metavar": "FILE|DIR"})
    epochs: int = field(default=400, metadata={
        "group": "optim", "help": "epochs over the data (paper: 6000-16000)", "min": 1})
    batch_size: int = field(default=64, metadata={"group": "optim", "help": "images per process per step", "min": 1})
    accum_iter: int = field(default=1, metadata={
        "advanced": True, "help": "gradient accumulation steps per optimizer step", "min": 1})
    blr: float = field(default=1.5e-4, metadata={
        "group": "optim", "help": "base learning rate: lr = blr × effective batch / 256", "above": 0.0})
    lr: float | None = field(default=None, metadata={
        "advanced": True, "help": "absolute learning rate (overrides --blr)", "above": 0.0})
    min_lr: float = field(default=0.0, metadata={
        "advanced": True, "help": "learning rate at the end of the cosine decay", "min": 0.0})
    warmup_epochs: float = field(default=40.0, metadata={
        "advanced": True, "help": "linear warm-up length in epochs", "min": 0.0})
    weight_decay: float = field(default=0.05, metadata={"advanced": True, 
        "help": "AdamW weight decay (not on norms, biases, tokens)", "min": 0.0})
    seed: int = field(default=0, metadata={
        "group": "optim", "help": "seed of every random choice; same seed, same result on CPU", "min": 0})
    resume: str | None = field(default=None, metadata={
        "help": "continue a run: auto (OUT/resume.pt if present) or a resume.pt file / run folder",
        "volatile": True})
    save_every_epochs: int = field(default=1, metadata={"advanced": True, 
        "help": "write the model and resume.pt every N epochs (and at the end)", "min": 1, "volatile": True})
    checkpoint_every_seconds: float = field(default=30.0, metadata={"advanced": True, 
        "help": "at those epoch ends, write only when this many seconds passed since the last write (0: always); "
                "the end of the run and a stop signal always write", "min": 0.0, "volatile": True})
    checkpoint_every_steps: int = field(default=500, metadata={"advanced": True, 
        "help": "also write resume.pt every N optimizer steps inside an epoch (0: only at epoch ends)", "min": 0,
        "volatile": True})
    keep_steps: list[int] | None = field(default=None, metadata={"advanced": True, 
        "help": "also keep the model after these optimizer steps, as pre-trained folders OUT/checkpoints/step<N> "
                "(pre-training curves)", "min": 1})
    log_every_steps: int = field(default=20, metadata={
        "advanced": True, "help": "write a metrics.jsonl record every N steps", "min": 1, "volatile": True})
    tensorboard: str = field(default="auto", metadata={"advanced": True, "help": TENSORBOARD_HELP,
                                                        "choices": list(TENSORBOARD_CHOICES), "volatile": True})
    max_steps: int | None = field(default=None, metadata={"advanced": True, 
        "help": "stop after this many optimizer steps (the lr schedule is fitted to the shorter run)", "min": 1})
    workers: int | None = field(default=None, metadata={
        "help": "DataLoader worker processes (default: CPU cores - 1, at most 8)", "min": 0, "volatile": True,
        "aliases": ["num_workers"]})
    data_path: str = field(default="auto", metadata={"advanced": True, 
        "help": "memory: decode every image once into a cache on the device and crop batches there; loader: "
                "decode each epoch in DataLoader workers; auto: memory when the cache fits, else loader (both give "
                "the same sharp crops; docs/views.md)", "choices": ["auto", "memory", "loader"], "volatile": True})
    compile: bool = field(default=False, metadata={
        "advanced": True, "help": "torch.compile the model (faster on recent GPUs)", "volatile": True})

    def __post_init__(self) -> None:
        super().__post_init__()  # every field's domain, and the model's rules
        if not self.data:
            raise D2maeError("is required: give one or more image folders, files or .csv/.txt lists", option="data")
        if not str(self.out).strip():
            raise D2maeError("is required: the folder to write the pre-trained model to", option="out")
        if self.objective != "moco-v3" and int(self.num_patches * (1 - self.mask_ratio)) < 1:
            raise D2maeError(f"{self.mask_ratio} masks every one of the {self.num_patches} patches of a "
                             f"{self.img_size}-pixel image; lower it or use a larger image", option="mask_ratio")

    def model_config(self) -> ModelConfig:
        """The :class:`ModelConfig` part (what ``config.json`` of the pre-trained folder stores)."""
        return ModelConfig(**{k: getattr(self, k) for k in MODEL_FIELDS})

    def effective_batch(self, world_size: int = 1) -> int:
        """Images per optimizer step over all processes."""
        return self.batch_size * self.accum_iter * world_size

    def resolved_lr(self, world_size: int = 1) -> float:
        """``lr``, or MAE's linear scaling rule ``blr × effective batch / 256``."""
        return self.lr if self.lr is not None else self.blr * self.effective_batch(world_size) / 256


def make_config(preset: str | None = None, **options: Any) -> PretrainConfig:
    """Build a :class:`PretrainConfig` in Python with the command line's precedence: defaults < preset < options."""
    name = preset or "d2mae"
    return build_config(PretrainConfig, ({**preset_overrides(name), "preset": name}, f"preset '{name}'"),
                        (options, "the arguments"))

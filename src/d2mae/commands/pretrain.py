"""``d2mae pretrain``: flags of :class:`d2mae.train.pretrain_config.PretrainConfig`, grouped, and the call."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from d2mae.commands.flags import add_arguments, config_from_cli
from d2mae.method.presets import preset_overrides
from d2mae.runtime.options import load_yaml
from d2mae.train.interrupts import TrainingInterrupted
from d2mae.train.pretrain import pretrain
from d2mae.train.pretrain_config import MODEL_FIELDS, PretrainConfig

_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("what to pre-train on, and where the model goes",
     ("data", "out", "preset", "config", "init_from", "resume", "skip_bad")),
    ("training (MAE's recipe: AdamW β=(0.9, 0.95), warm-up + cosine lr per step)",
     ("epochs", "batch_size", "accum_iter", "blr", "lr", "min_lr", "warmup_epochs", "weight_decay", "seed",
      "max_steps")),
    ("model, blur schedule and normalisation (saved in config.json; a preset sets the blur options)", MODEL_FIELDS),
    ("hardware, data loading and bookkeeping",
     ("device", "precision", "threads", "workers", "progress", "data_path", "compile", "save_every_epochs",
      "checkpoint_every_seconds", "checkpoint_every_steps", "keep_steps", "log_every_steps", "tensorboard")),
)
_GROUPED = {name for _, names in _GROUPS for name in names}
assert _GROUPED >= {f.name for f in fields(PretrainConfig)}, "every option of PretrainConfig belongs to a group"


def add(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Pre-train D²MAE (or MAE / DeblurrMAE / a Table 3 ablation, --preset) on unlabeled images. The --out folder "
        "becomes a pre-trained model folder (model.safetensors + config.json) with pretrain.yaml, metrics.jsonl and "
        "resume.pt. Example: d2mae pretrain --data images/ --out runs/pt --model vit_tiny_patch16 --epochs 100. "
        "Multi-GPU: torchrun --nproc_per_node N -m d2mae pretrain ... . Every option can also be set in a YAML file "
        "(--config); flags win over the file, the file over the preset.")
    all_fields = {f.name for f in fields(PretrainConfig)}
    for title, names in _GROUPS:
        group = parser.add_argument_group(title)
        add_arguments(group, PretrainConfig, exclude=tuple(all_fields - set(names) | {"resume"}))
        if "resume" in names:
            group.add_argument("--resume", nargs="?", const="auto", default=argparse.SUPPRESS, dest="resume",
                               metavar="PATH|auto",
                               help="continue a stopped run: --resume alone uses OUT/resume.pt (starts fresh when "
                                    "there is none); or give a resume.pt file or a run folder")


def config(args: argparse.Namespace) -> PretrainConfig:
    """defaults < preset < YAML (--config) < flags; the preset may itself come from the YAML file."""
    name = getattr(args, "preset", None)
    if name is None and getattr(args, "config", None):
        file_layer = load_yaml(args.config)
        name = file_layer.get("preset", file_layer.get("Preset"))
    name = str(name) if name is not None else "d2mae"
    return config_from_cli(PretrainConfig, args, preset={**preset_overrides(name), "preset": name},
                           preset_name=f"preset '{name}'")


def run(args: argparse.Namespace) -> int:
    try:
        pretrain(config(args))
    except TrainingInterrupted as exc:
        print(f"d2mae pretrain: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0

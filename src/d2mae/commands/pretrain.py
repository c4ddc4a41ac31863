"""``d2mae pretrain``: flags of :class:`d2mae.train.pretrain_config.PretrainConfig`, and the call."""

from __future__ import annotations

import argparse
import sys

from d2mae.commands.flags import add_arguments, add_common, config_from_cli
from d2mae.method.presets import preset_overrides
from d2mae.runtime.options import load_yaml
from d2mae.train.interrupts import TrainingInterrupted
from d2mae.train.pretrain import pretrain
from d2mae.train.pretrain_config import PretrainConfig


def add(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Pre-train D²MAE (or MAE / DeblurrMAE / a Table 3 ablation, --preset) on unlabeled images. The --out folder "
        "becomes a pre-trained model folder (model.safetensors + config.json) with pretrain.yaml and metrics.jsonl. "
        "Example: d2mae pretrain --data images/ --out runs/pt --arch vit_tiny_patch16 --epochs 100. "
        "Multi-GPU: torchrun --nproc_per_node N -m d2mae pretrain ... . Every option can also be set in a YAML file "
        "(--config) or with --set KEY=VALUE; flags win over those, the file over the preset.")
    add_common(parser)
    parser.add_argument("--resume", nargs="?", const="auto", default=argparse.SUPPRESS, dest="resume",
                        metavar="PATH|auto", help="continue a stopped run: --resume alone uses OUT/resume.pt (starts "
                                                  "fresh when there is none); or give a resume.pt file or a run folder")
    add_arguments(parser, PretrainConfig, exclude=("config", "resume"))


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

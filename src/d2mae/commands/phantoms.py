"""``d2mae phantoms``: synthetic ultrasound phantoms (PNG + labels.csv)."""

from __future__ import annotations

import argparse

from d2mae.commands.flags import add_arguments, add_common, config_from_cli
from d2mae.data.phantom import PhantomConfig, write_phantoms


def add(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    add_arguments(parser, PhantomConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_cli(PhantomConfig, args)
    labels = write_phantoms(cfg)
    print(f"wrote {cfg.n} phantoms ({cfg.size} px, scanners {', '.join(cfg.scanners)}) and {labels}")
    return 0

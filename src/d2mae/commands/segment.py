"""``d2mae segment``: flags of :class:`d2mae.train.config.SegmentConfig`, and the call."""

from __future__ import annotations

import argparse
import sys

from d2mae.commands.flags import add_arguments, add_common, config_from_cli
from d2mae.segment.evaluate import evaluate_segment_run, print_summary
from d2mae.train.config import SegmentConfig
from d2mae.train.interrupts import Interrupted
from d2mae.train.tasks import segment


def add(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    add_arguments(parser, SegmentConfig, advanced=("path_column", "image_root", "image_ext", "mode"))  # CSV options


def run(args: argparse.Namespace) -> int:
    cfg = config_from_cli(SegmentConfig, args)
    try:
        out = segment(cfg)
    except Interrupted as exc:
        print(f"d2mae segment: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    print_summary(evaluate_segment_run(out))
    return 0

"""``d2mae segment``: flags of :class:`d2mae.segment.config.SegmentConfig`, and the call."""

from __future__ import annotations

import argparse
import sys

from d2mae.commands.flags import add_arguments, config_from_cli
from d2mae.segment.config import SegmentConfig
from d2mae.segment.evaluate import evaluate_segment_run, print_summary
from d2mae.segment.train import segment
from d2mae.train.interrupts import Interrupted


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of the options below")
    add_arguments(parser, SegmentConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_cli(SegmentConfig, args)
    try:
        out = segment(cfg)
    except Interrupted as exc:
        print(f"d2mae segment: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    print_summary(evaluate_segment_run(out))
    return 0

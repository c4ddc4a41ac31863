"""``d2mae finetune``: flags of :class:`d2mae.train.config.FinetuneConfig`, and the call."""

from __future__ import annotations

import argparse
import sys

from d2mae.commands.flags import add_arguments, add_common, config_from_cli
from d2mae.runtime.distributed import context_from_env
from d2mae.train.config import FinetuneConfig
from d2mae.train.interrupts import Interrupted
from d2mae.train.tasks import finetune


def add(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    add_arguments(parser, FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_cli(FinetuneConfig, args)
    try:
        finetune(cfg)
    except Interrupted as exc:
        if context_from_env().is_main:
            print(f"d2mae finetune: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0

"""``d2mae probe``: flags of :class:`d2mae.train.config.ProbeConfig`, the call, and the table of its readouts."""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from d2mae.commands.flags import add_arguments, add_common, config_from_cli
from d2mae.runtime.files import read_csv_rows
from d2mae.train.config import ProbeConfig
from d2mae.train.probe import PROBE_CSV, probe


def add(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    # epochs, batch size and lr are partial fine-tuning's (--trainable-blocks): listed by --help-all
    add_arguments(parser, ProbeConfig, advanced=("epochs", "batch_size", "blr", "resume", "mode"))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_cli(ProbeConfig, args)
    out = probe(cfg)
    by: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in read_csv_rows(out / PROBE_CSV):
        by[r["readout"]].append(r)
    print(f"{'readout':<12} {'folds':>5} {'accuracy':>9} {'macro-F1':>9} {'AUROC':>9}   (mean over folds, %)")
    for name, rows in by.items():
        cells = [np.mean([float(r[k]) for r in rows]) * 100 for k in ("accuracy", "macro_f1", "auroc")]
        print(f"{name:<12} {len(rows):>5} " + " ".join(f"{c:>9.2f}" for c in cells))
    print(f"per fold: {out / PROBE_CSV}")
    return 0

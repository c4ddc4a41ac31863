"""``d2mae demo``: the whole pipeline on synthetic phantoms; prints the report's path."""

from __future__ import annotations

import argparse
import sys

from d2mae.experiment.demo import DEFAULT_OUT, run_demo
from d2mae.train.interrupts import Interrupted, TrainingInterrupted


def add(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the whole pipeline (phantoms → pre-training of MAE, DeblurrMAE and D²MAE → OBS → fine-tuning of "
        "every method on the same folds → report with Table 2/3-style tables and Figure 2/3-style figures) on "
        "synthetic ultrasound phantoms, in a few minutes on a CPU. Prints the report's path at the end. Running it "
        "again into the same folder reuses the finished stages.")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help="output folder (default: ./d2mae-demo in the current folder)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller and faster: fewer phantoms and epochs, a smoke test")
    parser.add_argument("--no-estimate", action="store_true",
                        help="skip timing a few steps before the run (the report then shows no estimates)")


def run(args: argparse.Namespace) -> int:
    try:
        path = run_demo(args.out, quick=args.quick, estimate=not args.no_estimate)
    except (Interrupted, TrainingInterrupted) as exc:
        print(f"d2mae demo: {exc}; run the same command again to continue", file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))
    print(f"demo finished: the report is {path.with_suffix('.html')} (self-contained) and {path}", file=sys.stderr)
    print(path.with_suffix(".html"))
    return 0

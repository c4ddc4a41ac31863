"""``d2mae experiment``: every method of a config on every data set, and one report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d2mae.experiment import estimate_plan, format_plan, load_experiment, make_plan, run_experiment
from d2mae.runtime.threads import configure_threads
from d2mae.train.interrupts import Interrupted, TrainingInterrupted


def add(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run every method of an experiment config on every dataset under its protocol and budget, and write one "
        "report (report.md + report.html). Example: d2mae experiment configs/demo.yaml --out runs/demo. "
        "--plan lists the stages with time estimates for this machine; --resume continues a stopped experiment "
        "(finished stages are skipped).")
    parser.add_argument("config", metavar="CONFIG.yaml", help="experiment config (see configs/)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: runs/<experiment name>)")
    parser.add_argument("--plan", action="store_true", help="print the stages and their estimated time; run nothing")
    parser.add_argument("--resume", action="store_true",
                        help="continue the experiment in --out: finished stages are skipped")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config value, e.g. --set datasets.busbra.root=/data/bus-bra "
                             "--set budget.pretrain_epochs=2 (repeatable; values are YAML)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads of PyTorch for every stage (default: the config's threads:, else one per "
                             "core; docs/threads.md)")
    parser.add_argument("--no-estimate", action="store_true",
                        help="skip the timing of a few steps (plan and report show no estimates)")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"threads={args.threads}"] if args.threads is not None else [])
    cfg = load_experiment(args.config, overrides)
    configure_threads(cfg.threads)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    if args.plan:
        plan = make_plan(cfg, out)
        if not args.no_estimate:
            print("timing a few steps of the configured model on this machine …", file=sys.stderr, flush=True)
            estimate_plan(plan)
        print(format_plan(plan))
        return 0
    try:
        path = run_experiment(cfg, out, resume=args.resume, estimate=not args.no_estimate)
    except (Interrupted, TrainingInterrupted) as exc:
        print(f"d2mae experiment: {exc}; run the same command with --resume to continue", file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))
    print(path.with_suffix(".html"))
    return 0

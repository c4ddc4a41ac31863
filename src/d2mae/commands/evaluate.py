"""``d2mae evaluate``: metrics with 95% CIs, tables and figures for a fine-tuning run."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from d2mae.commands.flags import add_arguments, config_from_cli
from d2mae.eval.evaluate import EvaluateConfig, evaluate_run
from d2mae.eval.metrics import METRIC_LABELS, SCALAR_METRICS
from d2mae.eval.tables import format_ci, format_value
from d2mae.segment.evaluate import evaluate_segment_run, print_summary
from d2mae.segment.files import is_segmenter


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="fine-tuning run folder (predictions.csv + run.json)")
    parser.add_argument("--out", default=None, help="write the outputs here instead of RUN_DIR")
    parser.add_argument("--config", default=None, help="YAML file with evaluate options")
    add_arguments(parser, EvaluateConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_cli(EvaluateConfig, args)
    if is_segmenter(args.run_dir):  # a d2mae segment run: Dice / IoU / HD95
        print_summary(evaluate_segment_run(args.run_dir, out_dir=args.out, split=cfg.split, seed=cfg.seed))
        return 0
    res = evaluate_run(args.run_dir, out_dir=args.out, **dataclasses.asdict(cfg))
    print(f"{res['method']}: {res['n_images']} '{res['split']}' images, {res['n_folds']} fold(s)")
    for m in SCALAR_METRICS:
        p = res["pooled"][m]
        line = f"  {METRIC_LABELS[m]:<13} {format_ci(p['value'], *p['ci'])}"
        o = res.get("over_folds", {}).get(m)
        if o and o["mean"] is not None:
            line += f"   over folds {format_value(o['mean'])}" + (
                f" ± {format_value(o['half_width'])}" if o["half_width"] is not None else "")
        print(line)
    for note in res.get("notes", []):
        print(f"  note: {note}")
    print(f"wrote {', '.join(Path(f).name for f in res['files'])} to {Path(res['files'][0]).parent}")
    return 0

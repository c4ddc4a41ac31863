"""``d2mae compare``: two runs on the same test images, with paired significance tests."""

from __future__ import annotations

import argparse
import dataclasses

from d2mae.commands.flags import add_arguments, config_from_cli
from d2mae.eval.evaluate import CompareConfig, compare_runs, format_comparison
from d2mae.segment.evaluate import compare_segment_runs, format_segment_comparison
from d2mae.segment.files import is_segmenter


def add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A", help="first run folder (differences are A − B)")
    parser.add_argument("run_b", metavar="RUN_B", help="second run folder, on the same test images")
    parser.add_argument("--out", default=None, help="folder for compare.json, compare.md and compare.yaml")
    parser.add_argument("--config", default=None, help="YAML file with compare options")
    add_arguments(parser, CompareConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_cli(CompareConfig, args)
    if is_segmenter(args.run_a) and is_segmenter(args.run_b):  # two d2mae segment runs: per-image paired tests
        print(format_segment_comparison(compare_segment_runs(args.run_a, args.run_b, cfg.split, seed=cfg.seed)))
        return 0
    res = compare_runs(args.run_a, args.run_b, out_dir=args.out, **dataclasses.asdict(cfg))
    print(format_comparison(res))
    if args.out:
        print(f"\nwrote compare.json, compare.md, compare.yaml to {args.out}")
    return 0

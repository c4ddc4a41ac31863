"""``d2mae view``: a page that opens from disk, for a run (or two over the same images, or an experiment)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d2mae.runtime.device import resolve_device
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.outputs import claim_folder
from d2mae.runtime.threads import configure_threads
from d2mae.view.page import MAX_IMAGES, build, build_experiment


def add(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a page to look through a run's images: a grid of thumbnails with their numbers, sortable and "
        "filterable, and for each image its blur search (the blurred input and the model's restoration at every "
        "searched level, the loss against t with t* marked), class probabilities or mask outlines. RUN is an OBS "
        "table folder, a fine-tuning or segmentation run, a predict output, or an experiment (a page per method); "
        "two runs over the same images are shown side by side. Example: d2mae view runs/ft --out runs/ft-view; "
        "then open runs/ft-view/index.html.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="one run folder, two to compare, or an experiment")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder for the page (index.html, img/, …)")
    parser.add_argument("--max-images", type=int, default=MAX_IMAGES, metavar="N",
                        help=f"show the blur search of at most N images (default: {MAX_IMAGES}; every image gets "
                             "a thumbnail)")
    parser.add_argument("--device", default="auto", help="where the restorations are computed (default: auto)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads of PyTorch (default: one per core; docs/threads.md)")
    parser.add_argument("--force", action="store_true", help="replace an earlier page in --out")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if len(args.runs) > 2:
        raise D2maeError("give one run, two runs over the same images, or one experiment folder", option="runs")
    if args.max_images < 0:
        raise D2maeError(f"must be ≥ 0, got {args.max_images}", option="max_images")
    claim_folder(args.out, "view", args.runs, force=args.force)
    if args.threads is not None and args.threads < 1:
        raise D2maeError(f"must be ≥ 1, got {args.threads}", option="threads")
    configure_threads(args.threads)
    options = {"max_images": args.max_images, "device": resolve_device(args.device), "progress": args.progress}
    experiment = len(args.runs) == 1 and (Path(args.runs[0]) / "plan.json").is_file()
    page = build_experiment(args.runs[0], args.out, **options) if experiment else build(args.runs, args.out,
                                                                                          **options)
    print(f"open {page.resolve().as_uri()}", file=sys.stderr)
    print(page)
    return 0

"""``d2mae predict``: classify new images, or segment them with a segmentation model (OBS on each first); a table
on the terminal, all rows to ``--out`` (a CSV; for a segmentation model a folder of mask PNGs and ``masks.csv``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from d2mae.commands.flags import add_with_positional, config_from_cli
from d2mae.data.sources import find_images
from d2mae.eval.predict import PredictConfig, predict
from d2mae.runtime.device import resolve_device
from d2mae.runtime.distributed import distributed_run
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_text
from d2mae.runtime.outputs import check_output_path, claim_folder
from d2mae.runtime.threads import configure_threads
from d2mae.segment.files import is_segmenter
from d2mae.segment.predict import MASKS_CSV, mask_names, predict_masks


def add(parser: argparse.ArgumentParser) -> None:
    add_with_positional(parser, PredictConfig, "inputs", "images, folders or .csv/.txt lists of images")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_cli(PredictConfig, args, positional="inputs")
    if not cfg.inputs:
        raise D2maeError("no images given: pass image files, folders or .csv/.txt lists after the options")
    if is_segmenter(cfg.model):
        return _segment(cfg)
    if cfg.out:
        check_output_path(cfg.out, [cfg.model, *cfg.inputs], force=cfg.force,  # before any image is classified
                          header="path,pred,")
    with distributed_run(cfg.device) as (ctx, device):
        configure_threads(cfg.threads)
        result = predict(cfg.model, cfg.inputs, fold=cfg.fold, batch_size=cfg.batch_size, device=device,
                         precision=cfg.precision, workers=cfg.workers, skip_bad=cfg.skip_bad, progress=cfg.progress,
                         ctx=ctx)
    if not ctx.is_main:
        return 0
    print(result.table(cfg.show))
    models = result.models[0] if len(result.models) == 1 else f"mean of {len(result.models)} fold models"
    print(f"{len(result.paths)} image(s) classified ({models})", file=sys.stderr)
    if cfg.out:
        atomic_write_text(cfg.out, result.to_csv())
        print(f"predictions written to {cfg.out}", file=sys.stderr)
    return 0


def _segment(cfg: PredictConfig) -> int:
    """Masks of new images from a segmentation model folder or run (:mod:`d2mae.segment.predict`)."""
    if not cfg.out:
        raise D2maeError("is required with a segmentation model: the folder for the mask PNGs and masks.csv",
                         option="out")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise D2maeError("d2mae predict with a segmentation model runs in one process; start it without torchrun")
    names = mask_names(find_images(cfg.inputs)) + [MASKS_CSV]
    claim_folder(cfg.out, "predict", [cfg.model, *cfg.inputs], force=cfg.force,  # before any image is segmented
                 outputs=[Path(cfg.out) / n for n in names])
    configure_threads(cfg.threads)
    result = predict_masks(cfg.model, cfg.inputs, cfg.out, fold=cfg.fold, batch_size=cfg.batch_size,
                           device=resolve_device(cfg.device), precision=cfg.precision, workers=cfg.workers,
                           skip_bad=cfg.skip_bad, progress=cfg.progress)
    print(result.table(cfg.show))
    models = result.models[0] if len(result.models) == 1 else f"mean of {len(result.models)} fold models"
    print(f"{len(result.paths)} image(s) segmented ({models}); masks and {MASKS_CSV} written to {cfg.out}",
          file=sys.stderr)
    return 0

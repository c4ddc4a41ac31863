"""``d2mae obs``: flags of :class:`d2mae.eval.obs.ObsConfig`, the call, and what it prints."""

from __future__ import annotations

import argparse
import json

from d2mae.commands.flags import add_arguments, add_common, config_from_cli
from d2mae.eval.obs import ObsConfig, search_dataset
from d2mae.io.obs_table import META_NAME
from d2mae.runtime.distributed import context_from_env


def add(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    add_arguments(parser, ObsConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_cli(ObsConfig, args)
    path = search_dataset(cfg)
    if context_from_env().is_main:
        meta = json.loads((path.parent / META_NAME).read_text(encoding="utf-8"))
        print((path.parent / "obs_summary.md").read_text(encoding="utf-8"))
        seconds = float(meta.get("seconds") or 0.0)
        rate = f" ({meta['n_images'] / seconds:.1f} images/s)" if seconds else ""
        print(f"OBS {cfg.spec.describe()} on {meta['n_images']} images in {seconds:.1f} s{rate}; table: {path}")
    return 0

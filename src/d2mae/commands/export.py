"""``d2mae export``: a pre-trained encoder as a timm or Hugging Face folder."""

from __future__ import annotations

import argparse
import json

from d2mae.commands.flags import add_arguments, add_common, config_from_cli
from d2mae.io.export import EXPORT_INFO, ExportConfig, export_encoder
from d2mae.runtime.options import save_config


def add(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    add_arguments(parser, ExportConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_cli(ExportConfig, args)
    out = export_encoder(cfg.pretrained, cfg.out, cfg.format, cfg.blur_level, sigma=cfg.sigma, obs_table=cfg.obs_table,
                         force=cfg.force)
    save_config(cfg, out / "export.yaml")
    info = json.loads((out / EXPORT_INFO).read_text(encoding="utf-8"))
    load = (f"timm.create_model('local-dir:{out}', pretrained=True)" if cfg.format == "timm"
            else f"transformers.AutoModel.from_pretrained('{out}')")
    blur = ("no blur needed" if info["blur_is_identity"]
            else f"blur at σ={info['sigma']} first (d2mae.method.blur.gaussian_blur)")
    print(f"exported {cfg.format} model to {out} (blur level t={info['blur_level']:g}, σ={info['sigma']:g}); "
          f"load with {load}; inputs in [0,1]: {blur}, then normalise with mean {info['mean']} std {info['std']}")
    return 0

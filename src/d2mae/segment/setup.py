"""A segmentation run's set-up: every check before any training (output folder, pre-trained model, images and
masks, folds, data leaks), then OBS once per image, as in fine-tuning (Algorithm 1 lines 4-10)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2mae.data.decode import check_images, compute_stats, content_hashes
from d2mae.data.folds import make_folds
from d2mae.eval.obs import obs_levels
from d2mae.io.artifacts import PRETRAINED_FORMAT, load_pretrained, model_sha256, read_config
from d2mae.io.obs_table import sigmas_of
from d2mae.method.model_config import ModelConfig
from d2mae.method.obs import ObsSpec
from d2mae.runtime.distributed import DistContext
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_text
from d2mae.runtime.logs import say
from d2mae.runtime.options import load_yaml
from d2mae.segment.config import RUN_CONFIG, SegmentConfig
from d2mae.segment.masks import SegmentSet, load_segment_set
from d2mae.segment.model import UNetConfig
from d2mae.train.leaks import leak_check
from d2mae.train.resume import check_resumable, check_same_images, settings_diff

IMAGE_HASHES = "image_hashes.txt"


class SegmentSetup:
    """What :class:`~d2mae.segment.train.SegmentRun` trains on: the data, the folds, the pre-trained model and
    every image's t*."""

    def __init__(self, cfg: SegmentConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.ctx = DistContext()
        self.out = Path(cfg.out)
        self.spec: ObsSpec = cfg.spec
        self.pretrained: Path | None = Path(cfg.pretrained) if cfg.pretrained else None
        self.pretrained_hash: str | None = None
        self.preset: str | None = None
        self.mae: Any = None
        self.model_config: ModelConfig | None = None

    def say(self, message: str) -> None:
        say(self.ctx, message)

    def setup(self) -> None:
        cfg = self.cfg
        self._check_out()
        if self.pretrained is not None:
            if not self.pretrained.is_dir():
                raise D2maeError(f"{self.pretrained} is not a pre-trained folder (model.safetensors + config.json); "
                                 "import a released checkpoint first with d2mae finetune or d2mae export",
                                 option="pretrained")
            meta = read_config(self.pretrained, PRETRAINED_FORMAT)
            extra = meta.get("extra") or {}
            self.preset = str((extra.get("pretrain") or {}).get("preset") or extra.get("preset") or "d2mae")
            self.mae = load_pretrained(self.pretrained, "cpu")
            self.model_config = self.mae.config
            if self.spec.mode == "search" and self.mae.config.objective != "mae":
                raise D2maeError(f"search needs a masked-autoencoder pre-trained model (its decoder restores the "
                                 f"blurred images); {self.pretrained} was pre-trained with "
                                 f"{self.mae.config.objective}; use none", option="obs")
            self.spec.fixed_level(self.mae.schedule)  # a fixed σ must lie inside the model's schedule
            self.pretrained_hash = model_sha256(self.pretrained)
        data = load_segment_set(cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        good = set(check_images(data.labeled.refs, self.in_chans, skip_bad=cfg.skip_bad, out_dir=self.out))
        if len(good) != len(data):
            keep = [i for i, r in enumerate(data.labeled.refs) if r in good]
            data = SegmentSet(data.labeled.subset(keep), [data.masks[i] for i in keep], data.num_classes)
        self.data = data
        self.folds = make_folds(data.labeled, cfg.protocol, cfg.seed, cfg.folds)
        self.hashes = content_hashes(data.labeled.refs)
        path = self.out / IMAGE_HASHES
        if cfg.resume and path.is_file():
            check_same_images(path, data.labeled.refs, self.hashes)
        else:
            atomic_write_text(path, "".join(f"{h}  {r}\n" for h, r in zip(self.hashes, data.labeled.refs)))
        self.leaks = leak_check(data.labeled, self.folds, self.hashes, self.pretrained, self.out, strict=False)

    @property
    def in_chans(self) -> int:
        return self.model_config.in_chans if self.model_config else self.cfg.in_chans

    @property
    def img_size(self) -> int:
        return self.model_config.img_size if self.model_config else self.cfg.img_size

    def _check_out(self) -> None:
        """A folder that holds a run is continued only with ``--resume``, and only with the same settings."""
        previous = self.out / RUN_CONFIG
        if not (previous.is_file() or (self.out.is_dir() and any(self.out.glob("fold_*")))):
            return
        if not self.cfg.resume:
            raise D2maeError(f"{self.out} already holds a segmentation run; continue it with resume or choose "
                             "another output folder", option="out")
        if previous.is_file():
            check_resumable(self.out, settings_diff(load_yaml(previous), self.cfg))

    def blur_levels(self) -> tuple[np.ndarray, np.ndarray, float]:
        """t* and σ_{t*} of every image [n] (Algorithm 1 lines 4-10), and the seconds OBS took."""
        n = len(self.data)
        if self.mae is None or self.spec.mode != "search":
            level = self.spec.fixed_level(self.mae.schedule) if self.mae is not None else 0.0
            t = np.full(n, float(level))
            seconds = 0.0
        else:
            lab = self.data.labeled
            t, seconds = obs_levels(self.mae, lab.refs, self.hashes, spec=self.spec, model_dir=self.pretrained,
                                    model_hash=self.pretrained_hash, out=self.out / "obs", cfg=self.cfg,
                                    device=self.device, groups=[lab.classes[i] for i in lab.labels],
                                    group_name="stratum", ctx=self.ctx)
        sigma = sigmas_of(self.model_config.schedule, t) if self.model_config else np.zeros(n)
        return t, sigma, seconds

    def model_config_for(self, train: np.ndarray) -> ModelConfig | UNetConfig:
        """The fold's model config: the pre-trained one, or a scratch ViT / U-Net normalised with the fold's
        training images' statistics."""
        cfg = self.cfg
        if self.model_config is not None:
            return self.model_config
        mean, std = compute_stats([self.data.labeled.refs[i] for i in train], cfg.in_chans, seed=cfg.seed)
        if cfg.decoder == "unet":
            return UNetConfig(encoder=cfg.unet_encoder, img_size=cfg.img_size, in_chans=cfg.in_chans, mean=mean,
                              std=std)
        return ModelConfig(model=cfg.arch, img_size=cfg.img_size, in_chans=cfg.in_chans, mean=mean, std=std,
                           blur=False, blur_embed="none")

"""Fine-tuning set-up (Section 2.3): the checks that run before any training, and OBS once per image (Algorithm 1
lines 4-10), giving every labeled image its t*."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d2mae.data.decode import check_images, compute_stats, content_hashes
from d2mae.data.folds import crossing_pairs, label_subset, make_folds
from d2mae.data.labels import load_labeled
from d2mae.eval.obs import obs_levels
from d2mae.io.artifacts import PRETRAINED_FORMAT, load_pretrained, model_sha256, read_config
from d2mae.io.imports import backbone_state, import_pretrained
from d2mae.io.predictions import saved_run
from d2mae.method.backbones import BackboneConfig
from d2mae.method.blur import BlurSchedule
from d2mae.method.model_config import ModelConfig, default_stats
from d2mae.runtime.device import resolve_device
from d2mae.runtime.distributed import DistContext, eval_indices, gather_ordered_objects, on_main
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_text, file_sha256
from d2mae.runtime.logs import say
from d2mae.runtime.options import load_yaml
from d2mae.train.finetune_config import FinetuneConfig
from d2mae.train.leaks import leak_check
from d2mae.train.resume import check_resumable, check_same_images, settings_diff

IMAGE_HASHES = "image_hashes.txt"  # sha256 and path of every labeled image
RUN_CONFIG = "finetune.yaml"  # the resolved config: from here on the folder holds a run


class FinetuneSetup:
    """A fine-tuning run's set-up on this process: every check before any training (labels, folds, images, the
    pre-trained model, data leaks), then OBS once (Algorithm 1 lines 4-10). :class:`~d2mae.train.finetune.FinetuneRun`
    trains the folds on what it prepared."""

    def __init__(self, cfg: FinetuneConfig, ctx: DistContext | None = None, device: torch.device | None = None
                 ) -> None:
        self.cfg = cfg
        self.ctx = ctx or DistContext()
        self.out = Path(cfg.out)
        self.device = device if device is not None else resolve_device(cfg.device)
        self.spec = cfg.spec
        self.pretrained: Path | None = Path(cfg.pretrained) if cfg.pretrained else None
        self.pretrained_meta: dict[str, Any] | None = None
        self.pretrained_hash: str | None = None
        self.mae: Any = None  # the pre-trained DeblurMAE (full and linear modes)
        self.backbone_state: dict[str, torch.Tensor] | None = None  # a timm backbone's weights (--backbone-weights)
        self.model_config: ModelConfig | None = None

    def say(self, message: str) -> None:
        say(self.ctx, message)

    # -- set-up: every check before any training --------------------------------------------------------------
    def setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if not cfg.out:
            raise D2maeError("is required: the folder for the fine-tuning run", option="out")
        if not cfg.labels:
            raise D2maeError("is required: a labels CSV or a class-per-folder tree", option="labels")
        if cfg.backbone and cfg.backbone_weights:  # read and check the weights once, before any work

            if not Path(cfg.backbone_weights).exists():
                raise D2maeError(f"{cfg.backbone_weights} does not exist", option="backbone_weights")
            c = cfg.in_chans
            self.backbone_state, notes = backbone_state(
                cfg.backbone_weights, BackboneConfig(cfg.backbone, cfg.img_size, c, *default_stats(c)))
            self.say(f"{cfg.backbone} from {cfg.backbone_weights}" + (f" ({'; '.join(notes)})" if notes else ""))
        elif not cfg.backbone and cfg.mode != "scratch" and self.pretrained is None:
            raise D2maeError(f"is required for mode {cfg.mode} (only scratch trains without a pre-trained model)",
                             option="pretrained")
        if cfg.obs_table and self.spec.mode != "search":
            raise D2maeError(f"is only used with the search (this run: {self.spec.describe()}"
                             f"{', mode scratch' if cfg.mode == 'scratch' else ''})", option="obs_table")
        if cfg.mode == "scratch" and not cfg.backbone and cfg.obs != "none":
            self.say(f"note: --mode scratch trains without pre-training, so there is no OBS (t = 0 for every image; "
                     f"--obs {cfg.obs} is not used)")
        on_main(ctx, self._check_out)
        if self.pretrained is not None and self.pretrained.is_file():
            self.pretrained = self._import_checkpoint(self.pretrained)
        if self.pretrained is not None:
            self.pretrained_meta = read_config(self.pretrained, PRETRAINED_FORMAT)
            mae = load_pretrained(self.pretrained, "cpu")  # checks files, architecture, weights
            self.model_config = mae.config
            if self.spec.mode == "search" and mae.config.objective != "mae":
                raise D2maeError(f"search needs a masked-autoencoder pre-trained model (its decoder restores the "
                                 f"blurred images); {self.pretrained} was pre-trained with {mae.config.objective}; "
                                 "use none", option="obs")
            self.pretrained_hash = model_sha256(self.pretrained)
            self.spec.fixed_level(mae.schedule)  # a fixed σ must lie inside the model's schedule
            saved = on_main(ctx, lambda: saved_run(self.out) if cfg.resume else {})
            if saved.get("pretrained_sha256") not in (None, self.pretrained_hash):
                check_resumable(self.out, [f"pre-trained model sha256: {saved['pretrained_sha256'][:12]}… → "
                                           f"{self.pretrained_hash[:12]}…"])
            if cfg.mode != "scratch":
                self.mae = mae
        in_chans = self.model_config.in_chans if self.model_config else cfg.in_chans
        labeled = load_labeled(cfg.labels, path_column=cfg.path_column, label_column=cfg.label_column,
                               group_column=cfg.group_column, split_column=cfg.split_column,
                               fold_column=cfg.fold_column, image_root=cfg.image_root, image_ext=cfg.image_ext,
                               allow_outside_root=cfg.allow_outside_root,
                               folds_csv=cfg.folds_csv, classes=cfg.classes)
        for col in cfg.keep_columns or []:
            if col not in labeled.columns:
                raise D2maeError(f"{cfg.labels} has no column '{col}'; its columns are: "
                                 f"{', '.join(labeled.columns) or '(class folders only)'}", option="keep_columns")

        def check() -> list[str]:  # rank 0: it writes bad_images.txt and warns
            self.out.mkdir(parents=True, exist_ok=True)
            return check_images(labeled.refs, in_chans, skip_bad=cfg.skip_bad, out_dir=self.out)

        good = on_main(ctx, check)
        if len(good) != len(labeled):
            keep = set(good)
            labeled = labeled.subset([i for i, r in enumerate(labeled.refs) if r in keep])
        self.labeled = labeled
        self.folds = self._make_folds()
        self.used = np.array(sorted({int(i) for f in self.folds for part in f.parts().values() for i in part}),
                             dtype=np.int64)
        n = len(labeled)
        mine = eval_indices(n, ctx)  # each rank hashes its block of the images
        self.hashes = gather_ordered_objects(content_hashes([labeled.refs[i] for i in mine]), n, ctx)
        on_main(ctx, self._record_hashes)
        self.leaks = on_main(ctx, lambda: leak_check(labeled, self.folds, self.hashes, self.pretrained, self.out,
                                                     cfg.strict))

    def _make_folds(self) -> list:
        """The protocol's folds (each training part cut to ``label_fraction``), with a warning for every patient
        group that crosses parts."""
        cfg, labeled = self.cfg, self.labeled
        folds = [label_subset(labeled, f, cfg.label_fraction, cfg.seed)
                 for f in make_folds(labeled, cfg.protocol, cfg.seed, cfg.folds)]
        if cfg.label_fraction < 1.0:
            self.say("label fraction {:g}: training on {} of the folds' training images".format(
                cfg.label_fraction, ", ".join(f"{len(f.train)} (fold {f.name})" for f in folds)))
        for f in folds:
            shared = {k: v for k, v in crossing_pairs(labeled, f).items() if v}
            if shared and self.ctx.is_main:
                text = ", ".join(f"{v} between {k}" for k, v in shared.items())
                test_note = ("; patients in the test part are also trained on, so test metrics are optimistic"
                             if any(k.endswith("test") for k in shared) else "")
                warnings.warn(f"fold {f.name}: patient groups shared across parts ({text}){test_note}",
                              stacklevel=3)
        return folds

    def _record_hashes(self) -> None:
        """``image_hashes.txt``: every labeled image's sha256, written when the run starts and checked on resume."""
        path = self.out / IMAGE_HASHES
        if self.cfg.resume and path.is_file():
            check_same_images(path, self.labeled.refs, self.hashes)
        else:
            atomic_write_text(path, "".join(f"{h}  {r}\n" for h, r in zip(self.hashes, self.labeled.refs)))

    def _import_checkpoint(self, path: Path) -> Path:
        """A released checkpoint file as a pre-trained folder ``OUT/imported`` (made once; reused while the file's
        sha256 is the one it was made from). Its input mean/std are the labeled images' pixel statistics."""

        cfg, folder = self.cfg, self.out / "imported"

        def make() -> None:
            sha = file_sha256(path)
            try:
                extra = read_config(folder, PRETRAINED_FORMAT).get("extra", {})
            except D2maeError:
                extra = {}
            if (extra.get("imported") or {}).get("source_sha256") == sha:
                return
            labeled = load_labeled(cfg.labels, path_column=cfg.path_column, label_column=cfg.label_column,
                                   image_root=cfg.image_root, image_ext=cfg.image_ext, folds_csv=cfg.folds_csv,
                                   allow_outside_root=cfg.allow_outside_root,
                                   classes=cfg.classes)
            mean, std = compute_stats(labeled.refs, cfg.in_chans, seed=cfg.seed)
            import_pretrained(path, folder, img_size=cfg.img_size, in_chans=cfg.in_chans, mean=mean, std=std,
                              seed=cfg.seed)
            self.say(f"imported {path} into {folder}")

        on_main(self.ctx, make)
        return folder

    def _check_out(self) -> None:
        """A folder that holds a run is continued only with ``--resume``, and only with the same settings."""
        previous = self.out / RUN_CONFIG
        has_run = previous.is_file() or any(self.out.glob("fold_*")) if self.out.is_dir() else False
        if not has_run:
            return
        if not self.cfg.resume:
            raise D2maeError(f"{self.out} already holds a fine-tuning run; continue it with resume or choose another "
                             "output folder", option="out")
        if previous.is_file():
            check_resumable(self.out, settings_diff(load_yaml(previous), self.cfg))

    # -- OBS, once (Algorithm 1 lines 4-10) -----------------------------------------------------------------------
    def blur_levels(self) -> tuple[np.ndarray, float]:
        """t* of every labeled image (0 outside the selected folds), and the seconds OBS took here."""
        cfg, ctx = self.cfg, self.ctx
        t = np.zeros(len(self.labeled))
        refs = [self.labeled.refs[i] for i in self.used]
        hashes = [self.hashes[i] for i in self.used]
        if self.spec.mode != "search":  # one level for every image
            schedule = self.model_config.schedule if self.model_config else BlurSchedule(enabled=False)
            t[self.used] = self.spec.fixed_level(schedule)
            return t, 0.0
        keep = (cfg.keep_columns or [None])[0]
        groups = ([self.labeled.columns[keep][i] for i in self.used] if keep else
                  [self.labeled.classes[self.labeled.labels[i]] for i in self.used])
        t[self.used], seconds = obs_levels(self.mae, refs, hashes, spec=self.spec, model_dir=self.pretrained,
                                           model_hash=self.pretrained_hash, out=self.out / "obs", cfg=cfg,
                                           device=self.device, groups=groups, group_name=keep or "class", ctx=ctx)
        return t, seconds


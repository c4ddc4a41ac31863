"""Blurriness-aware fine-tuning (Section 2.3, Algorithm 1) under the paper's evaluation protocols (Section 3.1).

For every image OBS (:func:`d2mae.eval.obs.run_obs`) gives the level t* once, before training. Then, fold by fold,
:class:`d2mae.train.fold.FoldTrainer` trains the classifier on images blurred on the device at their own σ_{t*},
t* given to the blur token (Algorithm 1 lines 11-14), and the epoch with the best validation macro-F1 predicts the
validation and test parts.

``f_θ`` is :class:`d2mae.method.models.DeblurClassifier`: the pre-trained encoder (blur token included), average
pooling and a linear head. The recipe is MAE's fine-tuning recipe, through timm (:mod:`d2mae.train.optim`): AdamW
with layer-wise lr decay, lr = blr × global batch / 256 with per-step warm-up + cosine, drop path 0.1, label
smoothing 0.1, RandAugment + random erasing, optional Mixup/CutMix, bf16 autocast where the device supports it. The
paper's settings (ViT-B, "following MAE"): blr 5e-4, layer decay 0.65, weight decay 0.05, batch 32.

Modes: ``full`` (the above), ``linear`` (linear probe: encoder frozen, a BatchNorm without affine parameters before
the head, SGD with momentum, no weight decay; drop path 0; RandomResizedCrop + flip) and ``scratch`` (the same ViT,
randomly initialised: the supervised baseline; no OBS, t = 0; no layer-wise decay).

Outputs in ``--out``::

    finetune.yaml             resolved config
    obs/                      the OBS table used (obs.csv, obs.json, obs_summary.md, σ* histogram)
    predictions.csv           path,fold,split,label,label_name,pred,prob_<class>…,t_star,sigma_star[,kept columns]
    run.json                  classes, protocol, folds, method, seed, settings, timings
    fold_<k>/metrics.jsonl    one line per epoch: train loss, val loss, val macro-F1, val accuracy, lr, seconds
    tensorboard/fold_<k>/     the same as TensorBoard scalars, when tensorboard is installed
    fold_<k>/model/           classifier.safetensors + config.json + pretrained/ (for OBS on new images)
    fold_<k>/resume.pt        while training: resume state, at most every checkpoint_every_seconds (weights_only)

More than one process (``torchrun --nproc_per_node N -m d2mae finetune …``): each epoch's global order (seeded by
(seed, fold, epoch); class-balanced with ``--balance sampler``) is cut into global batches of B·N images and each
rank takes its slice, so N processes see the same images per step as one process with batch B·N, at lr = blr × B·N
/ 256. OBS, validation and test are sharded and gathered in order, so every rank makes the same model-selection
decisions; stop signals are agreed each step; only rank 0 writes. Drop path, Mixup and ``--balance loss`` are per
rank.

Resume: ``--resume`` skips finished folds and continues the current one from its last finished epoch, with the same
weights as an uninterrupted run (same number of processes). SIGTERM/SIGINT stop at the next step; the command exits
with 128 + the signal number (143 for SIGTERM).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from d2mae.data.dataset import ImageDataset, SeededDataset
from d2mae.data.decode import check_images, compute_stats, content_hashes
from d2mae.data.labels import Fold, LabeledSet, crossing_pairs, fold_summary, load_labeled, make_folds
from d2mae.data.sampler import EpochBatchSampler
from d2mae.eval.obs import run_obs, write_summary
from d2mae.io.artifacts import (
    PRETRAINED_FORMAT, load_pretrained, load_weights, model_sha256, pretraining_hashes, read_config, save_classifier,
    save_weights
)
from d2mae.io.obs_table import TABLE_NAME, ObsTable, sigmas_of
from d2mae.method.backbones import BackboneConfig, timm_name
from d2mae.method.blur import BlurSchedule
from d2mae.method.models import ModelConfig, build_classifier
from d2mae.method.obs import DEFAULT_SEARCH_STEP, ObsSpec
from d2mae.runtime.device import resolve_device
from d2mae.runtime.distributed import (
    DistContext, barrier, distributed_run, eval_indices, gather_ordered_objects, on_main
)
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import (
    atomic_write_json, atomic_write_text, csv_text, load_checkpoint, read_csv_rows, save_checkpoint
)
from d2mae.runtime.locks import output_lock
from d2mae.runtime.logs import TENSORBOARD_CHOICES, TENSORBOARD_HELP, MetricsLog, say
from d2mae.runtime.options import check_fields, load_yaml, save_config
from d2mae.runtime.seeds import derive_seed
from d2mae.runtime.signals import StopSignals
from d2mae.runtime.threads import configure_threads
from d2mae.train.fold import FoldTrainer
from d2mae.train.optim import make_optimizer, warmup_cosine_scheduler
from d2mae.train.resume import check_resumable, settings_diff

MODES = ("full", "linear", "scratch")
BALANCE = ("none", "loss", "sampler")
RESUME = "resume.pt"
DONE = "done.json"
PREDICTIONS = "predictions.csv"
RUN_JSON = "run.json"
RUN_CONFIG = "finetune.yaml"


# ------------------------------------------------------------------------------------------------------- config


@dataclass
class FinetuneConfig:
    """What ``d2mae finetune`` takes: every field is a YAML key and a flag (``batch_size`` ↔ ``--batch-size``).

    Each field's domain is in its metadata (:mod:`d2mae.runtime.options`); ``volatile`` fields may change when a
    stopped run is resumed.
    """

    pretrained: str | None = field(default=None, metadata={
        "help": "pre-trained folder (model.safetensors + config.json), or a released checkpoint file to import "
                "(official MAE .pth, timm MAE .safetensors, MoCo v3 .pth.tar; docs/import.md); optional for "
                "--mode scratch", "metavar": "DIR|FILE", "volatile": True})
    backbone: str | None = field(default=None, metadata={
        "help": "fine-tune a timm classifier instead of a pre-trained D²MAE encoder: timm:NAME (e.g. "
                "timm:swin_large_patch4_window7_224); no blur, no OBS (docs/methods.md)", "metavar": "timm:NAME"})
    backbone_weights: str | None = field(default=None, metadata={
        "help": "local weights file for --backbone (timm .safetensors/.pth, or USFM's for timm:beit_base_patch16_224); "
                "without it the backbone starts from scratch (--mode scratch)", "metavar": "FILE"})
    labels: str = field(default="", metadata={"help": "labels CSV (path,label[,group][,split|fold]) or a "
                                                      "class-per-folder tree", "metavar": "CSV|DIR"})
    path_column: str = field(default="path", metadata={"help": "labels CSV column with the image path or ID"})
    label_column: str = field(default="label", metadata={"help": "labels CSV column with the class"})
    group_column: str | None = field(default=None, metadata={
        "help": "patient/group column (default: 'group' if present); no patient crosses folds"})
    split_column: str | None = field(default=None, metadata={"help": "train/val/test column (default: 'split')"})
    fold_column: str | None = field(default=None, metadata={
        "help": "each image's test fold (default: 'fold' or 'kFold')"})
    image_root: str | None = field(default=None, metadata={"help": "folder the CSV paths are relative to"})
    image_ext: str = field(default="", metadata={"help": "extension added to path values that lack it (.png)"})
    folds_csv: str | None = field(default=None, metadata={
        "help": "CSV joined on --path-column with fold columns (BUS-BRA 5-fold-cv.csv: kFold, valid_k)"})
    classes: list[str] | None = field(default=None, metadata={"help": "class order (default: sorted names)"})
    keep_columns: list[str] | None = field(default=None, metadata={
        "help": "labels CSV columns copied into predictions.csv (e.g. Device)"})
    protocol: str = field(default="split:3:1:1", metadata={
        "help": "split:3:1:1, kfold:5, csv (the split/fold column) or holdout:FILE"})
    folds: str | None = field(default=None, metadata={"help": "run only these folds, e.g. 1,3"})
    out: str = field(default="", metadata={"help": "output folder", "metavar": "DIR", "volatile": True})
    obs: str = field(default="search", metadata={"help": "search, none or fixed:SIGMA (Table 3c)"})
    obs_table: str | None = field(default=None, metadata={"help": "reuse this OBS table (obs.csv from d2mae obs)",
                                                           "volatile": True})
    search_step: int = field(default=DEFAULT_SEARCH_STEP, metadata={"help": "OBS search step s (Table 3d)",
                                                                    "min": 1})
    mode: str = field(default="full", metadata={"help": "full, linear (probe) or scratch (no pre-training)",
                                                "choices": list(MODES)})
    arch: str = field(default="vit_tiny_patch16", metadata={"help": "architecture for --mode scratch without "
                                                                    "--pretrained"})
    img_size: int = field(default=224, metadata={"help": "image size for --mode scratch without --pretrained",
                                                 "min": 1})
    in_chans: int = field(default=1, metadata={"help": "channels for --mode scratch without --pretrained",
                                               "choices": [1, 3]})
    epochs: int = field(default=50, metadata={"help": "most epochs per fold", "min": 1})
    warmup_epochs: float = field(default=5.0, metadata={"help": "linear lr warm-up (epochs)", "min": 0.0})
    batch_size: int = field(default=32, metadata={"help": "batch size per process (paper: 32)", "min": 1})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size for validation and test", "min": 1,
                                                       "volatile": True})
    blr: float | None = field(default=None, metadata={
        "help": "base lr, lr = blr × batch × processes / 256 (default 5e-4; linear: 0.1)", "above": 0.0})
    lr: float | None = field(default=None, metadata={"help": "absolute lr (overrides --blr)", "above": 0.0})
    min_lr: float = field(default=1e-6, metadata={"help": "lr at the end of the cosine", "min": 0.0})
    layer_decay: float = field(default=0.65, metadata={"help": "layer-wise lr decay (MAE ViT-B: 0.65)",
                                                       "above": 0.0, "max": 1.0})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay", "min": 0.0})
    drop_path: float = field(default=0.1, metadata={"help": "stochastic depth rate", "min": 0.0, "below": 1.0})
    smoothing: float = field(default=0.1, metadata={"help": "label smoothing", "min": 0.0, "below": 1.0})
    mixup: float = field(default=0.0, metadata={"help": "Mixup alpha (0: off; MAE ViT-B: 0.8)", "min": 0.0})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha (0: off; MAE ViT-B: 1.0)", "min": 0.0})
    mixup_prob: float = field(default=1.0, metadata={"help": "probability of mixing a batch", "min": 0.0,
                                                     "max": 1.0})
    balance: str = field(default="none", metadata={
        "help": "imbalanced classes: none, loss (class-weighted) or sampler (balanced batches)",
        "choices": list(BALANCE)})
    augment: str = field(default="auto", metadata={
        "help": "training augmentation: auto (finetune; linear: mae), finetune, mae or none",
        "choices": ["auto", "finetune", "mae", "none"]})
    patience: int = field(default=10, metadata={"help": "early stopping: epochs without a better val macro-F1 "
                                                        "(0: off)", "min": 0})
    clip_grad: float | None = field(default=None, metadata={"help": "clip the gradient norm (default: off)",
                                                            "above": 0.0})
    seed: int = field(default=0, metadata={"help": "seed of the folds, the initialisation and every epoch",
                                           "min": 0})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N", "volatile": True})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on capable GPUs), bf16 or fp32",
                                                     "choices": ["auto", "bf16", "fp32"], "volatile": True})
    workers: int = field(default=2, metadata={"help": "DataLoader workers", "min": 0, "volatile": True})
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads of PyTorch (default: $OMP_NUM_THREADS, else one per core this process may use, shared "
                "among torchrun's processes on the node; docs/threads.md)", "min": 1, "volatile": True})
    checkpoint_every_seconds: float = field(default=30.0, metadata={
        "help": "write a fold's resume state (resume.pt, best.safetensors) after an epoch only when this many seconds "
                "passed since the last write (0: after every epoch); a stop signal always writes", "min": 0.0,
        "volatile": True})
    obs_batch_size: int = field(default=32, metadata={"help": "images per OBS batch", "min": 1, "volatile": True})
    strict: bool = field(default=False, metadata={
        "help": "refuse test images that were in the pre-training data or duplicated across splits"})
    skip_bad: bool = field(default=False, metadata={"help": "leave out unreadable images (bad_images.txt)",
                                                    "volatile": True})
    resume: bool = field(default=False, metadata={"help": "continue a stopped run in --out", "volatile": True})
    method: str | None = field(default=None, metadata={"help": "method name in run.json (default: derived)",
                                                       "volatile": True})
    progress: bool = field(default=True, metadata={"help": "show progress bars", "volatile": True})
    tensorboard: str = field(default="auto", metadata={"help": TENSORBOARD_HELP, "choices": list(TENSORBOARD_CHOICES),
                                                       "volatile": True})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.mixing and self.batch_size % 2:
            raise D2maeError(f"must be even with Mixup/CutMix, got {self.batch_size}", option="batch_size")
        if self.mixing and self.balance == "loss":
            raise D2maeError("loss cannot be combined with Mixup/CutMix (soft targets); use sampler",
                             option="balance")
        if self.backbone:
            timm_name(self.backbone)  # an unknown name is refused first, with close names
            if self.pretrained:
                raise D2maeError("give either pretrained (a D²MAE encoder) or backbone (a timm classifier), not both",
                                 option="backbone")
            if self.mode == "linear":
                raise D2maeError("the linear probe needs a pre-trained D²MAE encoder; use full or scratch",
                                 option="mode")
            if self.mode == "full" and not self.backbone_weights:
                raise D2maeError(f"mode full fine-tunes {self.backbone} from weights: give backbone_weights FILE, or "
                                 "use mode scratch to train it from a random initialisation", option="mode")
            if self.mode == "scratch" and self.backbone_weights:
                raise D2maeError("mode scratch trains from a random initialisation; drop backbone_weights or use "
                                 "mode full", option="mode")
        elif self.backbone_weights:
            raise D2maeError("is only used with backbone timm:NAME", option="backbone_weights")
        self.spec  # the OBS setting parses

    @property
    def spec(self) -> ObsSpec:
        """The OBS setting (no blur, t = 0, for ``scratch`` and timm backbones: no D²MAE model to search with)."""
        return ObsSpec.parse("none" if self.mode == "scratch" or self.backbone else self.obs, self.search_step)

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def resolved_lr(self, world_size: int = 1) -> float:
        """``lr``, or ``blr × global batch / 256`` with global batch = batch_size × number of processes."""
        if self.lr is not None:
            return self.lr
        blr = self.blr if self.blr is not None else (0.1 if self.mode == "linear" else 5e-4)
        return blr * self.batch_size * world_size / 256

    def resolved_augment(self) -> str:
        if self.augment != "auto":
            return self.augment
        return "mae" if self.mode == "linear" else "finetune"


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived during fine-tuning; the last finished epoch's state is on disk."""

    def __init__(self, signum: int, where: str) -> None:
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; continue with --resume")


# ------------------------------------------------------------------------------------------------------- checks


def leak_check(labeled: LabeledSet, folds: Sequence[Fold], hashes: Sequence[str], pretrained: str | Path | None,
               out: Path, strict: bool) -> dict[str, Any]:
    """Data-leak guard: test images that were pre-training images, and duplicate images across splits.

    Writes ``leak_pretraining.txt`` / ``duplicates_across_splits.txt`` into ``out`` when something is found; warns,
    or refuses with ``strict``.
    """
    report: dict[str, Any] = {"pretraining_hashes": None, "test_in_pretraining": 0, "duplicates_across_splits": 0}
    test_idx = sorted({int(i) for f in folds for i in f.test})
    problems = []
    if pretrained is not None:
        known, source = pretraining_hashes(pretrained)
        report["pretraining_hashes"] = source or None
        if known is None:
            print(f"note: {pretrained} records no pre-training image hashes, so the test images cannot be checked "
                  "against the pre-training data", file=sys.stderr)
        else:
            leaked = [labeled.refs[i] for i in test_idx if hashes[i] in known]
            report["test_in_pretraining"] = len(leaked)
            if leaked:
                atomic_write_text(out / "leak_pretraining.txt", "".join(f"{r}\n" for r in leaked))
                problems.append(f"{len(leaked)} of the {len(test_idx)} test images were pre-training images "
                                f"(list: {out / 'leak_pretraining.txt'})")
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        by_hash.setdefault(h, []).append(i)
    dup_lines = []
    for f in folds:
        part = {int(i): name for name, idx in f.parts().items() for i in idx}
        for members in by_hash.values():
            if len(members) > 1 and len({part.get(i) for i in members} - {None}) > 1:
                dup_lines.append(f"fold {f.name}\t" + "\t".join(f"{part.get(i)}:{labeled.refs[i]}" for i in members))
    report["duplicates_across_splits"] = len(dup_lines)
    if dup_lines:
        atomic_write_text(out / "duplicates_across_splits.txt", "\n".join(dup_lines) + "\n")
        problems.append(f"{len(dup_lines)} group(s) of identical images (same content, other names) sit in different "
                        f"splits of a fold (list: {out / 'duplicates_across_splits.txt'})")
    for p in problems:
        if strict:
            raise D2maeError(f"data leak: {p}", option="strict")
        warnings.warn(f"possible data leak: {p}", stacklevel=2)
    return report


def method_name(cfg: FinetuneConfig, pretrained_meta: dict[str, Any] | None) -> str:
    """The name a run carries in run.json: ``--method``, or the pre-training preset plus the fine-tuning setting."""
    if cfg.method:
        return cfg.method
    if cfg.backbone:
        return cfg.backbone + ("" if cfg.backbone_weights else "-scratch")
    if cfg.mode == "scratch":
        return "scratch"
    extra = (pretrained_meta or {}).get("extra") or {}
    base = str((extra.get("pretrain") or {}).get("preset") or extra.get("preset") or extra.get("method") or "d2mae")
    spec = cfg.spec
    if cfg.mode == "linear":
        base += "-linear"
    if spec.mode == "none":
        base += "-obs-none"
    elif spec.mode == "fixed":
        base += f"-obs-fixed{spec.sigma:g}"
    elif spec.search_step != DEFAULT_SEARCH_STEP:
        base += f"-s{spec.search_step}"
    return base


def prediction_fields(classes: Sequence[str], keep: Sequence[str]) -> list[str]:
    """The columns of predictions.csv."""
    return (["path", "fold", "split", "label", "label_name", "pred"] + [f"prob_{c}" for c in classes]
            + ["t_star", "sigma_star"] + list(keep))


# ------------------------------------------------------------------------------------------------------- the run


@dataclass
class FoldState:
    """Where a fold's training stands: epochs done, optimiser steps, the best validation macro-F1 so far."""

    epoch: int = 0
    step: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "best_f1": self.best_f1, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}


class FinetuneRun:
    """One fine-tuning run on this process (of one or more): checks, OBS once, then one training per fold."""

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
            from d2mae.io.imports import backbone_state

            if not Path(cfg.backbone_weights).exists():
                raise D2maeError(f"{cfg.backbone_weights} does not exist", option="backbone_weights")
            c = cfg.in_chans
            self.backbone_state, notes = backbone_state(
                cfg.backbone_weights, BackboneConfig(cfg.backbone, cfg.img_size, c, [0.5] * c, [0.25] * c))
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
            saved = on_main(ctx, lambda: _saved_run(self.out) if cfg.resume else {})
            if saved.get("pretrained_sha256") not in (None, self.pretrained_hash):
                check_resumable(self.out, [f"pre-trained model sha256: {saved['pretrained_sha256'][:12]}… → "
                                           f"{self.pretrained_hash[:12]}…"])
            if cfg.mode != "scratch":
                self.mae = mae
        in_chans = self.model_config.in_chans if self.model_config else cfg.in_chans
        labeled = load_labeled(cfg.labels, path_column=cfg.path_column, label_column=cfg.label_column,
                               group_column=cfg.group_column, split_column=cfg.split_column,
                               fold_column=cfg.fold_column, image_root=cfg.image_root, image_ext=cfg.image_ext,
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
        self.folds = make_folds(labeled, cfg.protocol, cfg.seed, cfg.folds)
        for f in self.folds:
            shared = {k: v for k, v in crossing_pairs(labeled, f).items() if v}
            if shared and ctx.is_main:
                text = ", ".join(f"{v} between {k}" for k, v in shared.items())
                test_note = ("; patients in the test part are also trained on, so test metrics are optimistic"
                             if any(k.endswith("test") for k in shared) else "")
                warnings.warn(f"fold {f.name}: patient groups shared across parts ({text}){test_note}",
                              stacklevel=2)
        self.used = np.array(sorted({int(i) for f in self.folds for part in f.parts().values() for i in part}),
                             dtype=np.int64)
        n = len(labeled)
        mine = eval_indices(n, ctx)  # each rank hashes its block of the images
        self.hashes = gather_ordered_objects(content_hashes([labeled.refs[i] for i in mine]), n, ctx)
        self.leaks = on_main(ctx, lambda: leak_check(labeled, self.folds, self.hashes, self.pretrained, self.out,
                                                     cfg.strict))

    def _import_checkpoint(self, path: Path) -> Path:
        """A released checkpoint file as a pre-trained folder ``OUT/imported`` (made once; reused while the file's
        sha256 is the one it was made from). Its input mean/std are the labeled images' pixel statistics."""
        from d2mae.io.imports import import_pretrained
        from d2mae.runtime.files import file_sha256

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
        obs_dir = self.out / "obs"

        def existing() -> ObsTable | None:  # rank 0 reads; every rank gets the table
            if cfg.obs_table:
                return ObsTable.load(cfg.obs_table)
            if (obs_dir / TABLE_NAME).is_file():  # resumed run: reuse its own table if still valid
                try:
                    table = ObsTable.load(obs_dir)
                    table.lookup(refs, hashes, self.pretrained_hash, self.spec, self.model_config.img_size)
                    return table
                except D2maeError:
                    return None
            return None

        table = on_main(ctx, existing)
        seconds = 0.0
        if table is None:
            self.say(f"OBS {self.spec.describe()} on {len(refs)} images …")
            table = run_obs(self.mae, refs, spec=self.spec, batch_size=cfg.obs_batch_size, device=self.device,
                            precision=cfg.precision, workers=cfg.workers, model_hash=self.pretrained_hash,
                            hashes=hashes, progress=cfg.progress, ctx=ctx)
            table.meta["model_dir"] = str(self.pretrained.absolute())
            seconds = float(table.meta.get("seconds", 0.0))
            if ctx.is_main:
                table.save(obs_dir)
                keep = (cfg.keep_columns or [None])[0]
                groups = ([self.labeled.columns[keep][i] for i in self.used] if keep else
                          [self.labeled.classes[self.labeled.labels[i]] for i in self.used])
                write_summary(table, groups, keep or "class", obs_dir)
        t[self.used] = table.lookup(refs, hashes, self.pretrained_hash, self.spec, self.model_config.img_size)
        if ctx.is_main and cfg.obs_table and Path(cfg.obs_table).absolute() != (obs_dir / TABLE_NAME).absolute():
            table.save(obs_dir)  # keep the table used beside the run (provenance; the source may move)
        return t, seconds

    # -- everything ---------------------------------------------------------------------------------------------
    def run(self) -> Path:
        self.setup()
        self.t_star, obs_seconds = self.blur_levels()
        schedule = self.model_config.schedule if self.model_config else None
        self.sigma_star = sigmas_of(schedule, self.t_star) if schedule else np.zeros(len(self.t_star))
        if self.ctx.is_main:
            save_config(self.cfg, self.out / RUN_CONFIG)  # from here on the folder holds a run (resumable)
        method = method_name(self.cfg, self.pretrained_meta)
        details = []
        started = time.perf_counter()
        for fold in self.folds:
            self.say(fold_summary(self.labeled, fold))
            details.append(self.run_fold(fold))
            if self.ctx.is_main:
                self._write_outputs(method, details, obs_seconds, time.perf_counter() - started)
        self.say(f"fine-tuning done: {self.out / PREDICTIONS}, {self.out / RUN_JSON}")
        barrier(self.ctx)  # every rank returns once rank 0 has written the outputs
        return self.out

    def run_fold(self, fold: Fold) -> dict[str, Any]:
        """Train one fold (or skip it if it finished before), predict its validation and test parts."""
        cfg, ctx = self.cfg, self.ctx
        fold_dir = self.out / f"fold_{fold.name}"
        done = on_main(ctx, lambda: _finished(fold_dir))
        if done is not None:
            self.say(f"fold {fold.name}: already finished, skipped")
            return done
        trainer, loader, sampler = self.fold_trainer(fold)
        state, best = self._resume_fold(fold, trainer)
        t_train = torch.as_tensor(self.t_star[fold.train], dtype=torch.float32)  # [n_train], by dataset index
        val = [self.labeled.refs[i] for i in fold.val]
        started = saved_at = time.perf_counter()
        best_saved = True  # the best weights on disk are the best so far
        saved_epoch = state.epoch  # the epoch whose state resume.pt holds

        def save_state() -> None:
            nonlocal saved_at, best_saved, saved_epoch
            if ctx.is_main:
                if not best_saved and best is not None:
                    save_weights(best, fold_dir / "best.safetensors")
                save_checkpoint({"format": "d2mae-finetune-resume", "fold": fold.name, **state.to_dict(),
                                 "world_size": ctx.world_size, "model": trainer.model.state_dict(),
                                 "optimizer": trainer.optimizer.state_dict()}, fold_dir / RESUME)
            saved_at, best_saved, saved_epoch = time.perf_counter(), True, state.epoch

        with StopSignals() as stop, self._log(fold, state.epoch) as log:
            for epoch in range(state.epoch, cfg.epochs):
                if state.bad_epochs >= cfg.patience > 0:
                    break
                t0 = time.perf_counter()
                loss, seen, early = trainer.train_epoch(loader, sampler, t_train, epoch, (cfg.seed, fold.number),
                                                        stop, f"fold {fold.name} epoch {epoch + 1}/{cfg.epochs}"
                                                        if cfg.progress else None)
                self._stop_early(fold, epoch, saved_epoch, early, stop.signum)
                train_seconds = time.perf_counter() - t0
                v = trainer.validate(val, self.t_star[fold.val], self.labeled.labels[fold.val],
                                     batch_size=cfg.eval_batch_size, workers=cfg.workers)
                state.epoch, state.step = epoch + 1, trainer.step
                if v.macro_f1 > state.best_f1:
                    state.best_f1, state.best_epoch, state.bad_epochs = v.macro_f1, epoch + 1, 0
                    best = {k: p.detach().to("cpu", copy=True) for k, p in trainer.model.state_dict().items()}
                    best_saved = False
                else:
                    state.bad_epochs += 1
                record = {"epoch": epoch + 1, "train_loss": round(loss, 6), "val_loss": round(v.loss, 6),
                          "val_macro_f1": round(v.macro_f1, 6), "val_accuracy": round(v.accuracy, 6),
                          "lr": max(g["lr"] for g in trainer.optimizer.param_groups), "best_epoch": state.best_epoch,
                          "seconds": round(time.perf_counter() - t0, 3),
                          "images_per_s": round(seen / max(train_seconds, 1e-9), 2)}
                if ctx.is_main:
                    log.write(record)
                stopping = trainer.any_rank(stop.signum is not None)
                if stopping or time.perf_counter() - saved_at >= cfg.checkpoint_every_seconds:
                    save_state()  # rank 0 writes
                self.say(f"fold {fold.name} epoch {epoch + 1}/{cfg.epochs}: train loss {loss:.4f}, val macro-F1 "
                         f"{v.macro_f1:.4f} (best {state.best_f1:.4f} @ {state.best_epoch}), lr {record['lr']:.2e}, "
                         f"{record['seconds']:.1f} s")
                if stopping:
                    raise Interrupted(int(stop.signum or signal.SIGTERM),
                                      f"after fold {fold.name}, epoch {epoch + 1} (saved in {fold_dir / RESUME})")
        trainer.model.load_state_dict(best)
        return self._finish_fold(fold, trainer, state, time.perf_counter() - started)

    # -- one fold's parts ---------------------------------------------------------------------------------------
    def fold_trainer(self, fold: Fold) -> tuple[FoldTrainer, DataLoader, EpochBatchSampler]:
        """The fold's classifier, optimiser, lr schedule, loss and Mixup, and its seeded, sharded loader."""
        cfg, ctx, dev = self.cfg, self.ctx, self.device
        if ctx.is_main:
            (self.out / f"fold_{fold.name}").mkdir(parents=True, exist_ok=True)
        model = self._model_for_fold(fold).to(dev)
        labels = self.labeled.labels[fold.train]
        counts = np.bincount(labels, minlength=len(self.labeled.classes))
        sampler = self._sampler(fold, counts)
        total_steps = cfg.epochs * sampler.micro_steps
        warmup_steps = round(cfg.warmup_epochs * sampler.micro_steps)
        if cfg.warmup_epochs >= cfg.epochs and warmup_steps:
            warmup_steps = max(1, round(0.1 * total_steps))
            if fold is self.folds[0]:
                self.say(f"note: --warmup-epochs ({cfg.warmup_epochs:g}) is not shorter than --epochs ({cfg.epochs}); "
                         f"warming up over the first 10% of the steps instead")
        optimizer = make_optimizer(model, cfg, ctx.world_size)
        mixup = None
        if cfg.mixing:
            from timm.data import Mixup

            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                          label_smoothing=cfg.smoothing, num_classes=len(self.labeled.classes))
        trainer = FoldTrainer(model, optimizer, warmup_cosine_scheduler(optimizer, total_steps, warmup_steps,
                                                                        cfg.min_lr),
                              self._criterion(counts), dev, precision=cfg.precision, ctx=ctx, mixup=mixup,
                              clip_grad=cfg.clip_grad, linear_probe=cfg.mode == "linear")
        data = ImageDataset([self.labeled.refs[i] for i in fold.train], model.config.img_size, model.config.in_chans,
                            augment=cfg.resolved_augment(), labels=labels.tolist())
        loader = DataLoader(SeededDataset(data), batch_sampler=sampler, num_workers=cfg.workers,
                            pin_memory=dev.type == "cuda", persistent_workers=cfg.workers > 0)
        return trainer, loader, sampler

    def _model_for_fold(self, fold: Fold) -> nn.Module:
        cfg = self.cfg
        if cfg.backbone:  # a timm classifier, normalised with the fold's training images' statistics
            from d2mae.io.imports import backbone_classifier

            mean, std = compute_stats([self.labeled.refs[i] for i in fold.train], cfg.in_chans, seed=cfg.seed)
            torch.manual_seed(derive_seed(cfg.seed, fold.number, 0))
            config = BackboneConfig(cfg.backbone, cfg.img_size, cfg.in_chans, mean, std)
            state = dict(self.backbone_state) if self.backbone_state is not None else None  # timm may edit it
            return backbone_classifier(config, len(self.labeled.classes), cfg.drop_path, state,
                                       cfg.backbone_weights or "")
        config = self.model_config
        if config is None:  # scratch without a pre-trained folder: a ViT of --arch, normalised with train stats
            mean, std = compute_stats([self.labeled.refs[i] for i in fold.train], cfg.in_chans, seed=cfg.seed)
            config = ModelConfig(model=cfg.arch, img_size=cfg.img_size, in_chans=cfg.in_chans, mean=mean, std=std,
                                 blur=False, blur_embed="none")
        torch.manual_seed(derive_seed(cfg.seed, fold.number, 0))
        model = build_classifier(config, len(self.labeled.classes), cfg.mode, cfg.drop_path)
        if cfg.mode != "scratch":
            model.load_encoder(self.mae.state_dict())
        return model

    def _sampler(self, fold: Fold, counts: np.ndarray) -> EpochBatchSampler:
        """The fold's training batches: each epoch's global order (a permutation, or with ``--balance sampler`` a
        class-balanced draw with replacement), seeded by (seed, fold, epoch), cut into global batches of
        batch × processes, of which this rank takes its slice. The last, partial global batch is kept unless it has
        a single image (or fewer than one per process) or Mixup/CutMix is on (it needs full batches)."""
        cfg, ctx = self.cfg, self.ctx
        n, world = len(fold.train), ctx.world_size
        if cfg.mixing and n < cfg.batch_size * world:
            raise D2maeError(f"fold {fold.name}: {n} training images are fewer than one batch of {cfg.batch_size} × "
                             f"{world} process(es); Mixup/CutMix needs full batches — lower it", option="batch_size")
        if n < max(2, world):
            raise D2maeError(f"fold {fold.name}: {n} training image(s) are too few to train on with {world} "
                             "process(es)")
        weights = None
        if cfg.balance == "sampler":
            weights = 1.0 / counts[self.labeled.labels[fold.train]]  # [n_train]: each class drawn equally often
        return EpochBatchSampler(n, cfg.batch_size, derive_seed(cfg.seed, fold.number), ctx.rank, world,
                                 weights=weights, min_last=None if cfg.mixing else 2)

    def _criterion(self, counts: np.ndarray) -> nn.Module:
        cfg = self.cfg
        if cfg.mixing:
            from timm.loss import SoftTargetCrossEntropy

            return SoftTargetCrossEntropy()  # Mixup applies the label smoothing to the soft targets
        weight = None
        if cfg.balance == "loss":
            from sklearn.utils.class_weight import compute_class_weight

            y = np.repeat(np.arange(len(counts)), counts)
            weight = torch.as_tensor(compute_class_weight("balanced", classes=np.arange(len(counts)), y=y),
                                     dtype=torch.float32)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.smoothing)

    def _resume_fold(self, fold: Fold, trainer: FoldTrainer) -> tuple[FoldState, dict[str, torch.Tensor] | None]:
        """The fold's state and best weights so far: from its ``resume.pt`` with ``--resume``, else a fresh start."""
        cfg, ctx = self.cfg, self.ctx
        fold_dir = self.out / f"fold_{fold.name}"
        path, best_path = fold_dir / RESUME, fold_dir / "best.safetensors"
        if not on_main(ctx, lambda: bool(cfg.resume and path.is_file())):  # every rank reads it (shared --out)
            if ctx.is_main:
                best_path.unlink(missing_ok=True)
            return FoldState(), None
        saved = load_checkpoint(path)
        if int(saved.get("world_size", 1)) != ctx.world_size:
            raise D2maeError(f"cannot resume {path}: it was written by {saved.get('world_size', 1)} process(es), this "
                             f"run has {ctx.world_size}; resume with the same number", option="resume")
        trainer.model.load_state_dict(saved["model"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        state = FoldState(**{k: saved[k] for k in FoldState().to_dict()})
        trainer.step = state.step
        self.say(f"fold {fold.name}: resuming after epoch {state.epoch}")
        return state, (load_weights(best_path) if state.best_epoch else None)

    def _stop_early(self, fold: Fold, epoch: int, saved_epoch: int, early: Any, signum: int | None) -> None:
        """Raise for an epoch that ended early: a non-finite loss (no update applied) or a stop signal."""
        if early is None:
            return
        fold_dir = self.out / f"fold_{fold.name}"
        if not early.finite:
            raise D2maeError(f"fold {fold.name} epoch {epoch + 1}: the loss became {early.loss}; lower the learning "
                             "rate", option="blr")
        note = (f"state after epoch {saved_epoch} is in {fold_dir / RESUME}" if saved_epoch
                else "no epoch had been saved; a resumed fold starts over")
        raise Interrupted(int(signum or signal.SIGTERM), f"in fold {fold.name}, epoch {epoch + 1} ({note})")

    def _log(self, fold: Fold, resume_at: int) -> Any:
        if not self.ctx.is_main:
            import contextlib

            return contextlib.nullcontext()
        return MetricsLog(self.out / f"fold_{fold.name}" / "metrics.jsonl", "epoch", self.cfg.tensorboard,
                          self.out / "tensorboard" / f"fold_{fold.name}", resume_at=resume_at,
                          tag=f"fold_{fold.name}")

    def _finish_fold(self, fold: Fold, trainer: FoldTrainer, state: FoldState, seconds: float) -> dict[str, Any]:
        """The best epoch's predictions of the validation and test parts; the fold's model folder and files."""
        cfg, ctx = self.cfg, self.ctx
        fold_dir = self.out / f"fold_{fold.name}"
        rows = []
        for split, idx in (("val", fold.val), ("test", fold.test)):
            probs = trainer.predict([self.labeled.refs[i] for i in idx], self.t_star[idx],
                                    batch_size=cfg.eval_batch_size, workers=cfg.workers)
            rows.extend(self._rows(fold.name, split, idx, probs))
        test_rows = [r for r in rows if r["split"] == "test"]
        test_acc = float(np.mean([int(r["label"]) == int(r["pred"]) for r in test_rows])) if test_rows else math.nan
        done = {"fold": fold.name, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
                "best_epoch": state.best_epoch, "best_val_macro_f1": round(state.best_f1, 6),
                "epochs_run": state.epoch, "train_seconds": round(seconds, 3), "test_accuracy": round(test_acc, 6)}
        if ctx.is_main:
            save_classifier(trainer.model, fold_dir / "model", self.labeled.classes, self.spec, self._settings(),
                            self.pretrained if cfg.mode != "scratch" else None, self.pretrained_hash)
            fields = prediction_fields(self.labeled.classes, cfg.keep_columns or [])
            atomic_write_text(fold_dir / PREDICTIONS, csv_text(fields, rows))
            atomic_write_json(fold_dir / DONE, done)
            for name in (RESUME, "best.safetensors"):
                (fold_dir / name).unlink(missing_ok=True)
        self.say(f"fold {fold.name}: best epoch {state.best_epoch} (val macro-F1 {state.best_f1:.4f}), "
                 f"test accuracy {test_acc:.4f}")
        return done

    def _rows(self, fold: str, split: str, idx: np.ndarray, probs: np.ndarray) -> list[dict[str, Any]]:
        lab = self.labeled
        rows = []
        for j, i in enumerate(idx):
            row: dict[str, Any] = {"path": lab.refs[i], "fold": fold, "split": split, "label": int(lab.labels[i]),
                                   "label_name": lab.classes[lab.labels[i]], "pred": int(np.argmax(probs[j]))}
            for c, name in enumerate(lab.classes):
                row[f"prob_{name}"] = f"{probs[j, c]:.6f}"
            row["t_star"] = f"{self.t_star[i]:g}"
            row["sigma_star"] = f"{self.sigma_star[i]:g}"
            for col in self.cfg.keep_columns or []:
                row[col] = lab.columns[col][i]
            rows.append(row)
        return rows

    def _write_outputs(self, method: str, details: list[dict[str, Any]], obs_seconds: float, seconds: float) -> None:
        cfg = self.cfg
        rows: list[dict[str, str]] = []
        for f in self.folds:
            path = self.out / f"fold_{f.name}" / PREDICTIONS
            if path.is_file():
                rows.extend(read_csv_rows(path))
        atomic_write_text(self.out / PREDICTIONS,
                          csv_text(prediction_fields(self.labeled.classes, cfg.keep_columns or []), rows))
        atomic_write_json(self.out / RUN_JSON, {
            "classes": self.labeled.classes, "protocol": cfg.protocol, "folds": [d["fold"] for d in details],
            "method": method, "seed": cfg.seed, "mode": cfg.mode, "obs": self.spec.to_dict(),
            "pretrained": str(self.pretrained.absolute()) if self.pretrained else None,
            "pretrained_sha256": self.pretrained_hash, "backbone": cfg.backbone,
            "backbone_weights": cfg.backbone_weights, "labels": str(cfg.labels), "n_images": len(self.labeled),
            "keep_columns": cfg.keep_columns or [], "leak_check": self.leaks, "fold_details": details,
            "obs_seconds": round(obs_seconds, 3), "seconds": round(seconds, 3),
            "finetune": self._settings()})

    def _settings(self) -> dict[str, Any]:
        cfg = self.cfg
        world = self.ctx.world_size
        return {"mode": cfg.mode, "epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs,
                "batch_size": cfg.batch_size, "world_size": world, "lr": cfg.resolved_lr(world), "min_lr": cfg.min_lr,
                "layer_decay": 1.0 if cfg.mode == "scratch" else cfg.layer_decay,
                "weight_decay": 0.0 if cfg.mode == "linear" else cfg.weight_decay,
                "drop_path": 0.0 if cfg.mode == "linear" else cfg.drop_path, "smoothing": cfg.smoothing,
                "mixup": cfg.mixup, "cutmix": cfg.cutmix, "balance": cfg.balance, "augment": cfg.resolved_augment(),
                "patience": cfg.patience, "seed": cfg.seed, "optimizer": "sgd" if cfg.mode == "linear" else "adamw"}


def _saved_run(out: Path) -> dict[str, Any]:
    """``run.json`` of a run in ``out`` (``{}`` when there is none yet)."""
    path = out / RUN_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _finished(fold_dir: Path) -> dict[str, Any] | None:
    """A fold's ``done.json`` when it finished (its predictions written), else ``None``."""
    if (fold_dir / DONE).is_file() and (fold_dir / PREDICTIONS).is_file():
        return json.loads((fold_dir / DONE).read_text(encoding="utf-8"))
    return None


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune (Algorithm 1) on every selected fold; returns the output folder (see the module docstring).

    Under torchrun (``RANK``/``WORLD_SIZE`` set) each process trains on its slice of every batch with
    DistributedDataParallel and only rank 0 writes; every rank returns the same folder.

    Raises:
        D2maeError: bad input, before any training starts.
        Interrupted: SIGTERM/SIGINT (``exit_code`` 128 + signal); continue with ``resume=True``.
    """
    if not cfg.out:
        raise D2maeError("is required: the folder for the fine-tuning run", option="out")
    with distributed_run(cfg.device) as (ctx, device), output_lock(cfg.out, "finetune", ctx):
        configure_threads(cfg.threads)
        return FinetuneRun(cfg, ctx, device).run()

"""Blurriness-aware fine-tuning (Section 2.3, Algorithm 1 lines 11-14) and its evaluation protocol (Section 3.1).

For every image OBS (:mod:`d2mae.obs`) gives the level t* once, before training. Each training image is then
augmented, blurred *on the device* at its own σ_{t*} and classified with t* given to the model's blur token::

    x_b = G_{σ_t*}(x)              (line 11)
    ŷ   = f_θ(x_b, t*)              (line 12)
    L   = −Σ_c y_c log ŷ_c          (line 13)

``f_θ`` is :class:`d2mae.models.DeblurClassifier`: the pre-trained encoder (blur token included), average pooling
and a linear head. The training recipe is MAE's fine-tuning recipe, through timm: AdamW, layer-wise lr decay
(``param_groups_layer_decay`` with the classifier's ``group_matcher``: the CLS and blur tokens, the position and
patch embeddings form the stem group; tokens and position embedding get no weight decay), lr = blr × batch / 256
(the global batch) with per-step warm-up + cosine, drop path 0.1, label smoothing 0.1, RandAugment + random erasing
(the data set's ``finetune`` augmentation), optional Mixup/CutMix, bf16 autocast where the device supports it. The
paper's settings (ViT-B, "following MAE"): blr 5e-4, layer decay 0.65, weight decay 0.05, batch 32.

Mixup/CutMix and t*: timm's Mixup blends each image with the batch's mirror image (i ↔ B−1−i). Each mixed image
keeps the t* of its *first* image (the one at its own position), so the blur level stays the one chosen for the
dominant-or-equal content; its label becomes the λ-mix of the two labels as usual.

Model selection: after every epoch the validation part is classified and the epoch with the best macro-F1
(scikit-learn) is kept; training stops early when it has not improved for ``patience`` epochs. The best epoch's
model then predicts the validation and test parts.

Modes: ``full`` (the above), ``linear`` (linear probe: encoder frozen, a BatchNorm without affine parameters before
the linear head as MAE's linear probing, SGD with momentum and no weight decay — MAE's LARS is a large-batch variant
of it; drop path 0; augmentation RandomResizedCrop + flip) and ``scratch`` (the same ViT, randomly initialised: the
supervised baseline; no OBS, t = 0; no layer-wise decay since nothing was pre-trained).

Outputs in ``--out``::

    finetune.yaml             resolved config
    obs/                      the OBS table used (obs.csv, obs.json, obs_summary.md, σ* histogram)
    predictions.csv           path,fold,split,label,label_name,pred,prob_<class>…,t_star,sigma_star[,kept columns]
    run.json                  classes, protocol, folds, method, seed, settings, timings
    fold_<k>/metrics.jsonl    one line per epoch: train loss, val loss, val macro-F1, val accuracy, lr, seconds
    tensorboard/fold_<k>/     the same as TensorBoard scalars, when tensorboard is installed (--tensorboard)
    fold_<k>/model/           classifier.safetensors + config.json + pretrained/ (for OBS on new images)
    fold_<k>/resume.pt        while training: resume state (torch.load(weights_only=True))

More than one process (``torchrun --nproc_per_node N -m d2mae finetune …``, DistributedDataParallel): each
epoch's global order (seeded by (seed, fold, epoch); a class-balanced draw with ``--balance sampler``) is cut into
global batches of B·N images (B = ``--batch-size``) and each rank takes its slice, so N processes see the same images
per step as one process with batch B·N, with lr = blr × B·N / 256. The epoch's last, smaller batch is split evenly
and each slice's loss weighted by its size; the linear probe's BatchNorm uses the global batch's statistics. OBS,
validation and test predictions are sharded and gathered back in order, so every rank makes the same
model-selection decisions; stop signals are agreed each step; only rank 0 writes. Drop path, Mixup (which pairs
images within a rank's slice) and ``--balance loss`` (each slice's own weight sum) are per rank.

Resume: ``--resume`` skips finished folds and continues the current one from its last finished epoch. Every random
number of an epoch is seeded: the data order from (seed, fold, epoch), each image's augmentation from (seed, fold,
epoch, image), drop path and Mixup from (seed, fold, epoch, step, rank); so a resumed run ends with the same weights
as an uninterrupted one (resume with the same number of processes). SIGTERM/SIGINT stop at the next step; the state
of the last finished epoch is on disk; the command exits with 128 + the signal number (143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from d2mae.artifacts import check_state_matches, load_pretrained, load_weights, read_config, save_weights
from d2mae.config import add_arguments, config_from_cli, load_yaml, save_config
from d2mae.data import ImageDataset, SeededDataset, check_images, compute_stats, content_hashes
from d2mae.distributed import (DistContext, EpochBatchSampler, all_reduce_sum, barrier, context_from_env,
                               distributed_run, eval_indices, gather_ordered, gather_ordered_objects, on_main, wrap_ddp)
from d2mae.errors import D2maeError
from d2mae.labels import Fold, LabeledSet, crossing_pairs, fold_summary, load_labeled, make_folds
from d2mae.metrics_log import TENSORBOARD_CHOICES, TENSORBOARD_HELP, MetricsLog
from d2mae.models import DeblurClassifier, ModelConfig
from d2mae.obs import ObsSpec, ObsTable, model_sha256, parse_obs, run_obs, write_summary
from d2mae.runtime import (StopSignals, amp_dtype, atomic_write_json, atomic_write_text, autocast, derive_seed,
                           eval_mode, load_checkpoint, resolve_device, save_checkpoint, seed_everything,
                           warmup_cosine_scheduler)

CLASSIFIER_FORMAT = "d2mae-classifier"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
FORMAT_VERSION = 1
MODES = ("full", "linear", "scratch")
BALANCE = ("none", "loss", "sampler")
RESUME = "resume.pt"
DONE = "done.json"
PREDICTIONS = "predictions.csv"
RUN_JSON = "run.json"
RUN_CONFIG = "finetune.yaml"
PRETRAIN_HASHES = "pretrain_hashes.txt"  # written by d2mae.pretrain
_IGNORED_ON_RESUME = {"resume", "device", "workers", "precision", "eval_batch_size", "progress", "tensorboard"}


# ------------------------------------------------------------------------------------------------------- config


@dataclass
class FinetuneConfig:
    """``d2mae finetune``: every field is a flag (``--batch-size``) and a YAML key (``batch_size``)."""

    pretrained: str | None = field(default=None, metadata={
        "help": "pre-trained D²MAE folder (model.safetensors + config.json); optional for --mode scratch",
        "metavar": "DIR"})
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
    out: str = field(default="", metadata={"help": "output folder", "metavar": "DIR"})
    obs: str = field(default="search", metadata={"help": "search, none or fixed:SIGMA (Table 3c)"})
    obs_table: str | None = field(default=None, metadata={"help": "reuse this OBS table (obs.csv from d2mae obs)"})
    search_step: int = field(default=2, metadata={"help": "OBS search step s (Table 3d)"})
    mode: str = field(default="full", metadata={"help": "full, linear (probe) or scratch (no pre-training)",
                                                "choices": list(MODES)})
    arch: str = field(default="vit_tiny_patch16", metadata={"help": "architecture for --mode scratch without "
                                                                    "--pretrained"})
    img_size: int = field(default=224, metadata={"help": "image size for --mode scratch without --pretrained"})
    in_chans: int = field(default=1, metadata={"help": "channels for --mode scratch without --pretrained"})
    epochs: int = field(default=50, metadata={"help": "most epochs per fold"})
    warmup_epochs: float = field(default=5.0, metadata={"help": "linear lr warm-up (epochs)"})
    batch_size: int = field(default=32, metadata={"help": "batch size per process (paper: 32)"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size for validation and test"})
    blr: float | None = field(default=None, metadata={
        "help": "base lr, lr = blr × batch × processes / 256 (default 5e-4; linear: 0.1)"})
    lr: float | None = field(default=None, metadata={"help": "absolute lr (overrides --blr)"})
    min_lr: float = field(default=1e-6, metadata={"help": "lr at the end of the cosine"})
    layer_decay: float = field(default=0.65, metadata={"help": "layer-wise lr decay (MAE ViT-B: 0.65)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    drop_path: float = field(default=0.1, metadata={"help": "stochastic depth rate"})
    smoothing: float = field(default=0.1, metadata={"help": "label smoothing"})
    mixup: float = field(default=0.0, metadata={"help": "Mixup alpha (0: off; MAE ViT-B: 0.8)"})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha (0: off; MAE ViT-B: 1.0)"})
    mixup_prob: float = field(default=1.0, metadata={"help": "probability of mixing a batch"})
    balance: str = field(default="none", metadata={
        "help": "imbalanced classes: none, loss (class-weighted) or sampler (balanced batches)",
        "choices": list(BALANCE)})
    augment: str = field(default="auto", metadata={
        "help": "training augmentation: auto (finetune; linear: mae), finetune, mae or none",
        "choices": ["auto", "finetune", "mae", "none"]})
    patience: int = field(default=10, metadata={"help": "early stopping: epochs without a better val macro-F1 "
                                                        "(0: off)"})
    clip_grad: float | None = field(default=None, metadata={"help": "clip the gradient norm (default: off)"})
    seed: int = field(default=0, metadata={"help": "seed of the folds, the initialisation and every epoch"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on capable GPUs), bf16 or fp32"})
    workers: int = field(default=2, metadata={"help": "DataLoader workers"})
    obs_batch_size: int = field(default=32, metadata={"help": "images per OBS batch"})
    strict: bool = field(default=False, metadata={
        "help": "refuse test images that were in the pre-training data or duplicated across splits"})
    skip_bad: bool = field(default=False, metadata={"help": "leave out unreadable images (bad_images.txt)"})
    resume: bool = field(default=False, metadata={"help": "continue a stopped run in --out"})
    method: str | None = field(default=None, metadata={"help": "method name in run.json (default: derived)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    tensorboard: str = field(default="auto", metadata={"help": TENSORBOARD_HELP, "choices": list(TENSORBOARD_CHOICES)})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise D2maeError(f"option --mode: unknown value '{self.mode}'; use full, linear or scratch")
        if self.balance not in BALANCE:
            raise D2maeError(f"option --balance: unknown value '{self.balance}'; use none, loss or sampler")
        if self.tensorboard not in TENSORBOARD_CHOICES:
            raise D2maeError(f"option --tensorboard: unknown value '{self.tensorboard}'; use auto, on or off")
        for name, low in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("obs_batch_size", 1)):
            if getattr(self, name) < low:
                raise D2maeError(f"option --{name.replace('_', '-')} must be ≥ {low}, got {getattr(self, name)}")
        for name in ("warmup_epochs", "min_lr", "weight_decay", "drop_path", "smoothing", "mixup", "cutmix",
                     "patience", "workers"):
            if getattr(self, name) < 0:
                raise D2maeError(f"option --{name.replace('_', '-')} must be ≥ 0, got {getattr(self, name)}")
        if not 0 < self.layer_decay <= 1:
            raise D2maeError(f"option --layer-decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.smoothing < 1:
            raise D2maeError(f"option --smoothing must be in [0, 1), got {self.smoothing}")
        if not 0 <= self.drop_path < 1:
            raise D2maeError(f"option --drop-path must be in [0, 1), got {self.drop_path}")
        if self.blr is not None and self.blr <= 0 or self.lr is not None and self.lr <= 0:
            raise D2maeError("options --blr/--lr must be > 0")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise D2maeError(f"option --batch-size ({self.batch_size}) must be even with Mixup/CutMix")
        if (self.mixup > 0 or self.cutmix > 0) and self.balance == "loss":
            raise D2maeError("option --balance loss cannot be combined with Mixup/CutMix (soft targets); use "
                             "--balance sampler")
        parse_obs(self.obs, self.search_step)

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


# ------------------------------------------------------------------------------------------------------- models


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that normalises a training batch with the statistics of the global batch of all DDP ranks.

    The linear probe's BatchNorm before the head: its input (the frozen encoder's features) needs no gradient, so
    the batch mean and variance are constants for autograd, and two all-reduces of [D] sums give exactly what one
    process with the whole batch computes; the running statistics stay the same on every rank. In one process, and
    in eval mode, it is plain BatchNorm1d (same state-dict keys).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.requires_grad:
            raise RuntimeError("GlobalBatchNorm1d treats the batch statistics as constants; its input must not "
                               "require a gradient (a frozen encoder)")
        xf = x.float()  # [B, D], this rank's part of the global batch
        sums = torch.cat([xf.sum(dim=0), xf.new_tensor([xf.shape[0]])])  # [D + 1]: Σx and the count
        dist.all_reduce(sums)
        n = sums[-1]
        mean = sums[:-1] / n  # [D] over the global batch
        var = ((xf - mean) ** 2).sum(dim=0)  # [D]
        dist.all_reduce(var)
        var /= n  # biased, for normalising (as BatchNorm)
        with torch.no_grad():
            self.num_batches_tracked += 1
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean, factor)
            self.running_var.lerp_(var * n / (n - 1), factor)  # unbiased, as BatchNorm's running estimate
        return F.batch_norm(xf, mean, var, self.weight, self.bias, False, 0.0, self.eps).to(x.dtype)


def build_classifier(config: ModelConfig, num_classes: int, mode: str = "full", drop_path: float = 0.1
                     ) -> DeblurClassifier:
    """The classifier of a fine-tuning mode (weights not loaded). ``linear`` puts a BatchNorm without affine
    parameters before the head and freezes everything but the head (MAE linear probing)."""
    model = DeblurClassifier(config, num_classes, drop_path_rate=0.0 if mode == "linear" else drop_path)
    if mode == "linear":
        head = model.head
        nn.init.trunc_normal_(head.weight, std=0.01)  # MAE linear probing
        model.head = nn.Sequential(GlobalBatchNorm1d(head.in_features, affine=False, eps=1e-6), head)
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    return model


def param_groups(model: DeblurClassifier, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """timm's layer-wise decay groups: stem (CLS, BLU, pos/patch embeddings) at layer_decay^(depth+1), blocks
    in between, head at 1; no weight decay on 1-D parameters and on ``model.no_weight_decay()``."""
    from timm.optim import param_groups_layer_decay

    decay = 1.0 if cfg.mode == "scratch" else cfg.layer_decay
    return param_groups_layer_decay(model, weight_decay=cfg.weight_decay,
                                    no_weight_decay_list=model.no_weight_decay(), layer_decay=decay)


def make_optimizer(model: DeblurClassifier, cfg: FinetuneConfig, world_size: int = 1) -> torch.optim.Optimizer:
    lr = cfg.resolved_lr(world_size)
    if cfg.mode == "linear":
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                               weight_decay=0.0)
    return torch.optim.AdamW(param_groups(model, cfg), lr=lr, betas=(0.9, 0.999))


def read_classifier_config(folder: str | Path) -> dict[str, Any]:
    return read_config(folder, CLASSIFIER_FORMAT)


def load_classifier(folder: str | Path, device: torch.device | str = "cpu") -> tuple[DeblurClassifier, dict]:
    """Load a fine-tuned model folder (``classifier.safetensors`` + ``config.json``) in eval mode."""
    folder = Path(folder)
    meta = read_classifier_config(folder)
    config = ModelConfig.from_dict(meta.get("model", {}), source=str(folder / "config.json"))
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise D2maeError(f"{folder / 'config.json'}: 'classes' must list the class names")
    mode = (meta.get("finetune") or {}).get("mode", "full")
    model = build_classifier(config, len(classes), mode, drop_path=0.0)
    state = load_weights(folder / CLASSIFIER_WEIGHTS)
    check_state_matches(model, state, str(folder))
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def save_classifier(model: DeblurClassifier, folder: str | Path, classes: Sequence[str], obs: dict[str, Any],
                    finetune: dict[str, Any], pretrained: str | Path | None, pretrained_hash: str | None) -> Path:
    """Write a fine-tuned model folder: weights, config.json, and a copy of the pre-trained folder (for OBS)."""
    folder = Path(folder)
    save_weights(model.state_dict(), folder / CLASSIFIER_WEIGHTS, metadata={"format": CLASSIFIER_FORMAT})
    if pretrained is not None:
        target = folder / "pretrained"
        for name in ("model.safetensors", "config.json"):
            _link_or_copy(Path(pretrained) / name, target / name)
    atomic_write_json(folder / "config.json", {
        "format": CLASSIFIER_FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(),
        "num_classes": len(classes), "classes": list(classes), "obs": obs, "finetune": finetune,
        "pretrained_sha256": pretrained_hash})
    return folder


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no extra disk for k folds) or copy; atomic either way."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ------------------------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def predict_probs(model: DeblurClassifier, refs: Sequence[str], t: np.ndarray, device: torch.device,
                  batch_size: int = 64, workers: int = 0, precision: str = "auto", progress: bool = False,
                  desc: str = "predict", ctx: DistContext | None = None) -> np.ndarray:
    """Class probabilities [n, K] of images ``refs`` (deterministic view) classified at levels ``t`` [n].

    Under DDP (``ctx``) each rank classifies its block of the images and every rank gets all n rows, in order.
    """
    ctx = ctx or DistContext()
    cfg = model.config
    n = len(refs)
    if n == 0:
        return np.zeros((0, model.num_classes))
    mine = eval_indices(n, ctx)  # this rank's block of images (all of them in one process)
    loader = DataLoader(ImageDataset([refs[i] for i in mine], cfg.img_size, cfg.in_chans, augment="none"),
                        batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    t_mine = torch.as_tensor(np.asarray(t, dtype=np.float32)[mine])  # [n_mine]
    local = torch.zeros(len(mine), model.num_classes, device=device)  # [n_mine, K], row k = image mine[k]
    dtype = amp_dtype(device, precision)
    bar = None
    if progress and ctx.is_main and len(mine) > 4 * batch_size:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), desc=desc, unit="img")
    with eval_mode(model), autocast(device, dtype):
        for x, _, k in loader:  # k: positions in this rank's block
            logits = model(x.to(device, non_blocking=True), t_mine[k].to(device))  # [B, K]
            local[k.to(device)] = torch.softmax(logits.float(), dim=-1)
            if bar is not None:
                bar.update(len(k))
    if bar is not None:
        bar.close()
    return gather_ordered(local, n, ctx).cpu().double().numpy()  # [n, K] on every rank, row i = image i


def pretraining_hashes(folder: str | Path) -> tuple[set[str] | None, str]:
    """Content hashes of the pre-training images, from ``pretrain_hashes.txt`` in a pre-trained folder.

    ``d2mae pretrain`` writes that file (one sha256 per line, then the path); ``(None, "")`` when it is absent.
    """
    path = Path(folder) / PRETRAIN_HASHES
    if path.is_file():
        return _read_hash_file(path), str(path)
    return None, ""


def _read_hash_file(path: Path) -> set[str]:
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split()
        if parts and not parts[0].startswith("#"):
            out.add(parts[0].lower())
    return out


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
        part = {}
        for name, idx in f.parts().items():
            for i in idx:
                part[int(i)] = name
        for members in by_hash.values():
            if len(members) < 2:
                continue
            parts = {part.get(i) for i in members} - {None}
            if len(parts) > 1:
                dup_lines.append(f"fold {f.name}\t" + "\t".join(f"{part.get(i)}:{labeled.refs[i]}" for i in members))
    report["duplicates_across_splits"] = len(dup_lines)
    if dup_lines:
        atomic_write_text(out / "duplicates_across_splits.txt", "\n".join(dup_lines) + "\n")
        problems.append(f"{len(dup_lines)} group(s) of identical images (same content, other names) sit in different "
                        f"splits of a fold (list: {out / 'duplicates_across_splits.txt'})")
    for p in problems:
        if strict:
            raise D2maeError(f"data leak (--strict): {p}")
        warnings.warn(f"possible data leak: {p}", stacklevel=2)
    return report


def _method_name(cfg: FinetuneConfig, pretrained_meta: dict[str, Any] | None, spec: ObsSpec) -> str:
    if cfg.method:
        return cfg.method
    if cfg.mode == "scratch":
        return "scratch"
    extra = (pretrained_meta or {}).get("extra") or {}
    base = str((extra.get("pretrain") or {}).get("preset") or extra.get("preset") or extra.get("method") or "d2mae")
    if cfg.mode == "linear":
        base += "-linear"
    if spec.mode == "none":
        base += "-obs-none"
    elif spec.mode == "fixed":
        base += f"-obs-fixed{spec.sigma:g}"
    elif spec.search_step != 2:
        base += f"-s{spec.search_step}"
    return base


def _prediction_fields(classes: Sequence[str], keep: Sequence[str]) -> list[str]:
    return (["path", "fold", "split", "label", "label_name", "pred"] + [f"prob_{c}" for c in classes]
            + ["t_star", "sigma_star"] + list(keep))


def _csv_text(fields: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------------- the run


class _Run:
    """One fine-tuning run: labels, folds, OBS, then one training per fold (on this rank, of one or more)."""

    def __init__(self, cfg: FinetuneConfig, ctx: DistContext | None = None, device: torch.device | None = None
                 ) -> None:
        self.cfg = cfg
        self.ctx = ctx or DistContext()
        self.out = Path(cfg.out)
        self.device = device if device is not None else resolve_device(cfg.device)
        self.spec = parse_obs("none" if cfg.mode == "scratch" else cfg.obs, cfg.search_step)
        self.pretrained: Path | None = Path(cfg.pretrained) if cfg.pretrained else None
        self.pretrained_meta: dict[str, Any] | None = None
        self.pretrained_hash: str | None = None
        self.mae_state: dict[str, torch.Tensor] | None = None
        self.model_config: ModelConfig | None = None

    def _say(self, message: str) -> None:
        """Progress and notes on stderr, from rank 0 only."""
        if self.ctx.is_main:
            print(message, file=sys.stderr, flush=True)

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (one all-reduce), so that every rank takes the same branch."""
        return bool(all_reduce_sum(torch.tensor([float(flag)], device=self.device), self.ctx).item() > 0)

    # -- set-up: every check before any training --------------------------------------------------------------
    def setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx

        if not cfg.out:
            raise D2maeError("option --out is required: the folder for the fine-tuning run")
        if not cfg.labels:
            raise D2maeError("option --labels is required: a labels CSV or a class-per-folder tree")
        if cfg.mode != "scratch" and self.pretrained is None:
            raise D2maeError(f"option --pretrained is required for --mode {cfg.mode} (only --mode scratch trains "
                             "without a pre-trained model)")
        if cfg.obs_table and self.spec.mode != "search":
            raise D2maeError(f"option --obs-table is only used with --obs search (this run: --obs {cfg.obs}"
                             f"{', --mode scratch' if cfg.mode == 'scratch' else ''})")
        if cfg.mode == "scratch" and cfg.obs != "none":
            self._say(f"note: --mode scratch trains without pre-training, so there is no OBS (t = 0 for every image; "
                      f"--obs {cfg.obs} is not used)")
        on_main(ctx, self._check_out)
        if self.pretrained is not None:
            self.pretrained_meta = read_config(self.pretrained, "d2mae-pretrained")
            mae = load_pretrained(self.pretrained, "cpu")  # checks files, architecture, weights
            self.model_config = mae.config
            self.pretrained_hash = model_sha256(self.pretrained)
            if cfg.mode != "scratch":
                self.mae_state = mae.state_dict()
                self.mae = mae
            if self.spec.mode == "fixed":
                try:
                    mae.schedule.level_of(float(self.spec.sigma))
                except D2maeError as exc:
                    raise D2maeError(f"option --obs {cfg.obs}: {exc}") from None
        in_chans = self.model_config.in_chans if self.model_config else cfg.in_chans
        labeled = load_labeled(cfg.labels, path_column=cfg.path_column, label_column=cfg.label_column,
                               group_column=cfg.group_column, split_column=cfg.split_column,
                               fold_column=cfg.fold_column, image_root=cfg.image_root, image_ext=cfg.image_ext,
                               folds_csv=cfg.folds_csv, classes=cfg.classes)
        for col in cfg.keep_columns or []:
            if col not in labeled.columns:
                raise D2maeError(f"option --keep-columns: {cfg.labels} has no column '{col}'; its columns are: "
                                 f"{', '.join(labeled.columns) or '(class folders only)'}")

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
        used = sorted({int(i) for f in self.folds for part in f.parts().values() for i in part})
        self.used = np.array(used, dtype=np.int64)
        n = len(labeled)
        mine = eval_indices(n, ctx)  # each rank hashes its block of the images
        self.hashes = gather_ordered_objects(content_hashes([labeled.refs[i] for i in mine]), n, ctx)
        self.leaks = on_main(ctx, lambda: leak_check(labeled, self.folds, self.hashes, self.pretrained, self.out,
                                                     cfg.strict))

    def _check_out(self) -> None:
        cfg = self.cfg

        previous = self.out / RUN_CONFIG
        has_run = previous.is_file() or any(self.out.glob("fold_*")) if self.out.is_dir() else False
        if not has_run:
            return
        if not cfg.resume:
            raise D2maeError(f"option --out: {self.out} already holds a fine-tuning run; continue it with --resume "
                             "or choose another --out")
        if previous.is_file():
            old = load_yaml(previous)
            new = {k: v for k, v in vars(cfg).items()}
            diffs = [f"{k}: {old.get(k)!r} → {new[k]!r}" for k in new
                     if k not in _IGNORED_ON_RESUME and k in old and old.get(k) != new[k]]
            if diffs:
                raise D2maeError(f"cannot resume {self.out}: settings differ from the stopped run "
                                 f"({'; '.join(diffs[:3])}); resume with the original settings or choose another --out")

    # -- OBS ----------------------------------------------------------------------------------------------------
    def blur_levels(self) -> tuple[np.ndarray, np.ndarray, float]:
        """t* and σ* for every labeled image (0 for images outside the selected folds), and OBS seconds."""
        cfg, ctx, n = self.cfg, self.ctx, len(self.labeled)
        t = np.zeros(n)
        sigma = np.zeros(n)
        refs = [self.labeled.refs[i] for i in self.used]
        hashes = [self.hashes[i] for i in self.used]
        if self.spec.mode != "search":
            if self.spec.mode == "fixed":
                t[:] = self.mae.schedule.level_of(float(self.spec.sigma))
                sigma[:] = float(self.spec.sigma)
            return t, sigma, 0.0
        obs_dir = self.out / "obs"

        def existing() -> ObsTable | None:  # rank 0 reads; every rank gets the table
            if cfg.obs_table:
                return ObsTable.load(cfg.obs_table)
            if (obs_dir / "obs.csv").is_file():  # resumed run: reuse its own table if still valid
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
            self._say(f"OBS {self.spec.describe()} on {len(refs)} images …")
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
        t_used, s_used = table.lookup(refs, hashes, self.pretrained_hash, self.spec, self.model_config.img_size)
        if ctx.is_main and cfg.obs_table and Path(cfg.obs_table).absolute() != (obs_dir / "obs.csv").absolute():
            table.save(obs_dir)  # keep the table used beside the run (provenance; the source may move)
        t[self.used] = t_used
        sigma[self.used] = s_used
        return t, sigma, seconds

    # -- everything ---------------------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg, ctx = self.cfg, self.ctx
        self.setup()
        t_star, sigma_star, obs_seconds = self.blur_levels()
        if ctx.is_main:
            save_config(cfg, self.out / RUN_CONFIG)  # from here on the folder holds a run (resumable)
        self.t_star, self.sigma_star = t_star, sigma_star
        method = _method_name(cfg, self.pretrained_meta, self.spec)
        details = []
        started = time.perf_counter()
        for k, fold in enumerate(self.folds):
            self._say(fold_summary(self.labeled, fold))
            details.append(self.run_fold(k, fold))
            if ctx.is_main:
                self._write_outputs(method, details, obs_seconds, time.perf_counter() - started)
        self._say(f"fine-tuning done: {self.out / PREDICTIONS}, {self.out / RUN_JSON}")
        barrier(ctx)  # every rank returns once rank 0 has written the outputs
        return self.out

    def _write_outputs(self, method: str, details: list[dict[str, Any]], obs_seconds: float, seconds: float) -> None:
        cfg = self.cfg
        rows: list[dict[str, str]] = []
        for f in self.folds:
            path = self.out / f"fold_{f.name}" / PREDICTIONS
            if path.is_file():
                rows.extend(_read_csv_rows(path))
        fields = _prediction_fields(self.labeled.classes, cfg.keep_columns or [])
        atomic_write_text(self.out / PREDICTIONS, _csv_text(fields, rows))
        atomic_write_json(self.out / RUN_JSON, {
            "classes": self.labeled.classes, "protocol": cfg.protocol, "folds": [d["fold"] for d in details],
            "method": method, "seed": cfg.seed, "mode": cfg.mode, "obs": self.spec.to_dict(),
            "pretrained": str(self.pretrained.absolute()) if self.pretrained else None,
            "pretrained_sha256": self.pretrained_hash, "labels": str(cfg.labels), "n_images": len(self.labeled),
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

    # -- one fold -----------------------------------------------------------------------------------------------
    def _model_for_fold(self, fold: Fold, fold_num: int) -> DeblurClassifier:
        cfg = self.cfg
        config = self.model_config
        if config is None:  # scratch without a pre-trained folder: a ViT of --arch, normalised with train stats

            mean, std = compute_stats([self.labeled.refs[i] for i in fold.train], cfg.in_chans, seed=cfg.seed)
            config = ModelConfig(model=cfg.arch, img_size=cfg.img_size, in_chans=cfg.in_chans, mean=mean, std=std,
                                 blur=False, blur_embed="none")
        torch.manual_seed(derive_seed(cfg.seed, fold_num, 0))
        model = build_classifier(config, len(self.labeled.classes), cfg.mode, cfg.drop_path)
        if cfg.mode != "scratch":
            model.load_encoder(self.mae_state)
        return model

    def _sampler(self, fold: Fold, fold_num: int, counts: np.ndarray) -> EpochBatchSampler:
        """The fold's training batches: each epoch's global order (a permutation, or with ``--balance sampler`` a
        class-balanced draw with replacement), seeded by (seed, fold, epoch), cut into global batches of
        batch × processes, of which this rank takes its slice. The last, partial global batch is kept unless it has
        a single image (or fewer than one per process) or Mixup/CutMix is on (it needs full batches)."""
        cfg, ctx = self.cfg, self.ctx
        n, world = len(fold.train), ctx.world_size
        if cfg.mixing and n < cfg.batch_size * world:
            raise D2maeError(f"fold {fold.name}: {n} training images are fewer than one batch of {cfg.batch_size} × "
                             f"{world} process(es); Mixup/CutMix needs full batches — lower --batch-size")
        if n < max(2, world):
            raise D2maeError(f"fold {fold.name}: {n} training image(s) are too few to train on with {world} "
                             "process(es)")
        weights = None
        if cfg.balance == "sampler":
            weights = 1.0 / counts[self.labeled.labels[fold.train]]  # [n_train]: each class drawn equally often
        return EpochBatchSampler(n, cfg.batch_size, derive_seed(cfg.seed, fold_num), ctx.rank, world,
                                 weights=weights, min_last=None if cfg.mixing else 2)

    def run_fold(self, k: int, fold: Fold) -> dict[str, Any]:
        cfg, ctx, dev = self.cfg, self.ctx, self.device

        fold_dir = self.out / f"fold_{fold.name}"
        done_path = fold_dir / DONE

        def finished() -> dict[str, Any] | None:
            if done_path.is_file() and (fold_dir / PREDICTIONS).is_file():
                return json.loads(done_path.read_text(encoding="utf-8"))
            return None

        done = on_main(ctx, finished)
        if done is not None:
            self._say(f"fold {fold.name}: already finished, skipped")
            return done
        fold_num = k + 1
        if ctx.is_main:
            fold_dir.mkdir(parents=True, exist_ok=True)
        model = self._model_for_fold(fold, fold_num).to(dev)
        optimizer = make_optimizer(model, cfg, ctx.world_size)
        labels = self.labeled.labels
        train_refs = [self.labeled.refs[i] for i in fold.train]
        train_ds = ImageDataset(train_refs, model.config.img_size, model.config.in_chans,
                                augment=cfg.resolved_augment(), labels=labels[fold.train].tolist())
        t_train = torch.as_tensor(self.t_star[fold.train], dtype=torch.float32)  # [n_train], by dataset index
        counts = np.bincount(labels[fold.train], minlength=len(self.labeled.classes))
        sampler = self._sampler(fold, fold_num, counts)
        steps_per_epoch = sampler.micro_steps
        total_steps = cfg.epochs * steps_per_epoch
        warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        if cfg.warmup_epochs >= cfg.epochs and warmup_steps:
            warmup_steps = max(1, round(0.1 * total_steps))
            if k == 0:
                self._say(f"note: --warmup-epochs ({cfg.warmup_epochs:g}) is not shorter than --epochs ({cfg.epochs}); "
                          f"warming up over the first 10% of the steps instead")
        scheduler = warmup_cosine_scheduler(optimizer, total_steps, warmup_steps, cfg.min_lr)
        criterion = self._criterion(counts).to(dev)
        mixup = None
        if cfg.mixing:
            from timm.data import Mixup

            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                          label_smoothing=cfg.smoothing, num_classes=len(self.labeled.classes))
        eval_ce = nn.CrossEntropyLoss()
        dtype = amp_dtype(dev, cfg.precision)

        state = {"epoch": 0, "step": 0, "best_f1": -1.0, "best_epoch": 0, "bad_epochs": 0}
        best_state: dict[str, torch.Tensor] | None = None  # the best epoch's weights (CPU), on every rank
        resume_path = fold_dir / RESUME
        metrics_path = fold_dir / "metrics.jsonl"
        best_path = fold_dir / "best.safetensors"
        if on_main(ctx, lambda: bool(cfg.resume and resume_path.is_file())):  # every rank reads it (shared --out)
            saved = load_checkpoint(resume_path)
            if int(saved.get("world_size", 1)) != ctx.world_size:
                raise D2maeError(f"cannot resume {resume_path}: it was written by {saved.get('world_size', 1)} "
                                 f"process(es), this run has {ctx.world_size}; resume with the same number")
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            state = {key: saved[key] for key in state}
            if state["best_epoch"]:
                best_state = load_weights(best_path)
            self._say(f"fold {fold.name}: resuming after epoch {state['epoch']}")
        elif ctx.is_main:
            best_path.unlink(missing_ok=True)
        train_model = wrap_ddp(model, dev, ctx)  # DDP: gradients averaged over the ranks
        loader = DataLoader(SeededDataset(train_ds), batch_sampler=sampler, num_workers=cfg.workers,
                            pin_memory=dev.type == "cuda", persistent_workers=cfg.workers > 0)
        started = time.perf_counter()
        log_file = (MetricsLog(metrics_path, "epoch", cfg.tensorboard, self.out / "tensorboard" / f"fold_{fold.name}",
                               resume_at=state["epoch"], tag=f"fold_{fold.name}") if ctx.is_main
                    else contextlib.nullcontext())
        with StopSignals() as stop, log_file as log:
            for epoch in range(state["epoch"], cfg.epochs):
                if state["bad_epochs"] >= cfg.patience > 0:
                    break
                t0 = time.perf_counter()
                sampler.set_epoch(epoch)
                train_model.train()
                if cfg.mode == "linear":
                    model.encoder.eval()  # frozen features; only the BatchNorm + head train
                    model.fc_norm.eval()
                loss_sum, seen = 0.0, 0
                bar = None
                if cfg.progress and ctx.is_main and sys.stderr.isatty():
                    from tqdm import tqdm
                    bar = tqdm(total=steps_per_epoch, desc=f"fold {fold.name} epoch {epoch + 1}/{cfg.epochs}",
                               unit="step", leave=False)
                for m, (x, y, idx) in enumerate(loader):
                    scheduler.step_update(num_updates=state["step"])
                    # drop path and Mixup draw from the global generators: seeded by (seed, fold, epoch, step, rank)
                    seed_everything(derive_seed(cfg.seed, fold_num, epoch + 1, m + 1, ctx.rank))
                    x = x.to(dev, non_blocking=True)  # [B, C, S, S] in [0, 1], this rank's slice of the global batch
                    y = y.to(dev, non_blocking=True)  # [B]
                    t = t_train[idx].to(dev)  # [B] each image's own t*
                    if mixup is not None:
                        x, y = mixup(x, y)  # y: soft targets [B, K]; t stays each position's own t*
                    with autocast(dev, dtype):
                        logits = train_model(x, t)  # blurs x at σ_t inside, BLU(t) conditioning (Alg. 1 l. 11-12)
                    loss = criterion(logits.float(), y)  # Alg. 1 l. 13, the mean over this rank's slice
                    step_images = sampler.step_size(m)  # the global batch: B·W, fewer in an epoch's last step
                    loss = loss * (ctx.world_size * len(idx) / step_images)  # × 1 unless the slices are uneven
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # DDP averages over the ranks: the gradient of the global batch's mean loss
                    flags = torch.stack([loss.detach(), (~torch.isfinite(loss.detach())).float(),
                                         torch.tensor(float(stop.signum is not None), device=dev)])
                    flags = all_reduce_sum(flags, ctx).cpu()  # [Σ loss, non-finite, stop] over ranks: one sync
                    step_loss = float(flags[0]) / ctx.world_size  # the global batch's mean loss
                    if flags[1] > 0:
                        raise D2maeError(f"fold {fold.name} epoch {epoch + 1}: the loss became {step_loss}; "
                                         "lower --blr/--lr")
                    if cfg.clip_grad:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    optimizer.step()
                    state["step"] += 1
                    loss_sum += step_loss * step_images
                    seen += step_images
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
                    if flags[2] > 0:  # a stop signal reached some rank: every rank stops here
                        if bar is not None:
                            bar.close()
                        saved_note = (f"state after epoch {state['epoch']} is in {resume_path}" if state["epoch"]
                                      else "no epoch had finished; a resumed fold starts over")
                        raise Interrupted(int(stop.signum or signal.SIGTERM),
                                          f"in fold {fold.name}, epoch {epoch + 1} ({saved_note})")
                if bar is not None:
                    bar.close()
                train_seconds = time.perf_counter() - t0
                val_refs = [self.labeled.refs[i] for i in fold.val]
                probs = predict_probs(model, val_refs, self.t_star[fold.val], dev, cfg.eval_batch_size,
                                      cfg.workers, cfg.precision, ctx=ctx)  # [n_val, K], the same on every rank
                y_val = labels[fold.val]
                f1, acc = _selection_scores(y_val, probs)
                val_loss = float(eval_ce(torch.log(torch.as_tensor(probs).clamp_min(1e-12)),
                                         torch.as_tensor(y_val)))
                state["epoch"] = epoch + 1
                improved = f1 > state["best_f1"]
                if improved:
                    state.update(best_f1=f1, best_epoch=epoch + 1, bad_epochs=0)
                    best_state = {key: v.detach().to("cpu", copy=True) for key, v in model.state_dict().items()}
                    if ctx.is_main:
                        save_weights(best_state, best_path)
                else:
                    state["bad_epochs"] += 1
                record = {"epoch": epoch + 1, "train_loss": round(loss_sum / max(seen, 1), 6),
                          "val_loss": round(val_loss, 6), "val_macro_f1": round(f1, 6), "val_accuracy": round(acc, 6),
                          "lr": max(g["lr"] for g in optimizer.param_groups), "best_epoch": state["best_epoch"],
                          "seconds": round(time.perf_counter() - t0, 3),
                          "images_per_s": round(seen / max(train_seconds, 1e-9), 2)}
                if ctx.is_main:
                    log.write(record)
                    save_checkpoint({"format": "d2mae-finetune-resume", "fold": fold.name, **state,
                                     "world_size": ctx.world_size, "model": model.state_dict(),
                                     "optimizer": optimizer.state_dict()}, resume_path)
                self._say(f"fold {fold.name} epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f}, "
                          f"val macro-F1 {f1:.4f} (best {state['best_f1']:.4f} @ {state['best_epoch']}), "
                          f"lr {record['lr']:.2e}, {record['seconds']:.1f} s")
                if self._any_rank(stop.signum is not None):
                    raise Interrupted(int(stop.signum or signal.SIGTERM),
                                      f"after fold {fold.name}, epoch {epoch + 1} (saved in {resume_path})")
        seconds = time.perf_counter() - started
        model.load_state_dict(best_state)
        rows = []
        for split, idx in (("val", fold.val), ("test", fold.test)):
            probs = predict_probs(model, [self.labeled.refs[i] for i in idx], self.t_star[idx], dev,
                                  cfg.eval_batch_size, cfg.workers, cfg.precision, ctx=ctx)
            rows.extend(self._rows(fold.name, split, idx, probs))
        test_rows = [r for r in rows if r["split"] == "test"]
        test_acc = float(np.mean([int(r["label"]) == int(r["pred"]) for r in test_rows])) if test_rows else math.nan
        done = {"fold": fold.name, "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
                "best_epoch": state["best_epoch"], "best_val_macro_f1": round(state["best_f1"], 6),
                "epochs_run": state["epoch"], "train_seconds": round(seconds, 3), "test_accuracy": round(test_acc, 6)}
        if ctx.is_main:
            fields = _prediction_fields(self.labeled.classes, cfg.keep_columns or [])
            obs_meta = {**self.spec.to_dict(), "model_sha256": self.pretrained_hash}
            save_classifier(model, fold_dir / "model", self.labeled.classes, obs_meta, self._settings(),
                            self.pretrained if cfg.mode != "scratch" else None, self.pretrained_hash)
            atomic_write_text(fold_dir / PREDICTIONS, _csv_text(fields, rows))
            atomic_write_json(done_path, done)
            for tmp in (resume_path, best_path):
                if tmp.exists():
                    tmp.unlink()
        self._say(f"fold {fold.name}: best epoch {state['best_epoch']} (val macro-F1 {state['best_f1']:.4f}), "
                  f"test accuracy {test_acc:.4f}")
        return done

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


def _selection_scores(y: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Validation macro-F1 (:func:`d2mae.metrics.macro_f1`, the rule evaluation uses) and accuracy."""
    from d2mae.metrics import macro_f1

    pred = probs.argmax(axis=1)
    return macro_f1(y, pred), float(np.mean(pred == y))


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune (Algorithm 1) on every selected fold; returns the output folder (see the module docstring).

    Under torchrun (``RANK``/``WORLD_SIZE`` set) each process trains on its slice of every batch with
    DistributedDataParallel and only rank 0 writes; every rank returns the same folder.

    Raises:
        D2maeError: bad input, before any training starts.
        Interrupted: SIGTERM/SIGINT (``exit_code`` 128 + signal); continue with ``resume=True``.
    """
    with distributed_run(cfg.device) as (ctx, device):
        return _Run(cfg, ctx, device).run()


# ------------------------------------------------------------------------------------------------------ command


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of the options below")
    add_arguments(parser, FinetuneConfig)


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_cli(FinetuneConfig, args)
    try:
        finetune(cfg)
    except Interrupted as exc:
        if context_from_env().is_main:
            print(f"d2mae finetune: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


__all__ = ["FinetuneConfig", "Interrupted", "build_classifier", "finetune", "leak_check", "load_classifier",
           "make_optimizer", "param_groups", "predict_probs", "pretraining_hashes", "save_classifier"]

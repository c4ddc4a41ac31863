"""What differs between the downstream tasks on the one engine (:mod:`d2mae.train.engine`): the data, the head on
the encoder, the loss, the validation score and what is written per image.

* :class:`Classify` (``d2mae finetune``, the paper's Section 2.3): :class:`~d2mae.method.models.DeblurClassifier`
  (or a timm backbone), cross-entropy with label smoothing (soft targets under Mixup/CutMix, class weights with
  ``--balance loss``), model selection by validation macro-F1, ``predictions.csv``.
* :class:`Segment` (``d2mae segment``, beyond the paper): a segmenter on the same blur-conditioned encoder
  (:mod:`d2mae.segment.model`), MONAI's Dice + cross-entropy against masks that are never blurred, selection by
  validation Dice at each image's own size, ``per_image.csv`` and the test images' predicted masks.

:func:`finetune` and :func:`segment` run a config through the engine in its claimed, locked output folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from d2mae.data.dataset import ImageDataset, SeededDataset
from d2mae.data.folds import Fold
from d2mae.data.labels import LabeledSet, labels_inputs, load_labeled
from d2mae.eval.infer import class_probabilities, decode_views
from d2mae.eval.metrics import macro_f1
from d2mae.io.artifacts import save_classifier
from d2mae.io.imports import backbone_state
from d2mae.io.predictions import PREDICTIONS, prediction_fields
from d2mae.method.backbones import BackboneConfig, backbone_classifier
from d2mae.method.model_config import ModelConfig, default_stats
from d2mae.method.models import build_classifier, freeze_all_but_last_blocks
from d2mae.runtime.distributed import distributed_run, on_main
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.locks import output_lock
from d2mae.runtime.outputs import claim_folder
from d2mae.runtime.seeds import derive_seed
from d2mae.runtime.threads import configure_threads
from d2mae.segment.data import SegmentDataset
from d2mae.segment.files import PER_IMAGE, PER_IMAGE_FIELDS, PREDICTIONS_DIR, mask_name, save_segmenter, write_mask
from d2mae.segment.masks import load_segment_set, read_mask
from d2mae.segment.metrics import image_scores, per_image_values
from d2mae.segment.model import UNetConfig, build_segmenter
from d2mae.segment.predict import native_probs
from d2mae.train.config import FinetuneConfig, SegmentConfig
from d2mae.train.engine import Run


def _scratch_vit(run: Run, fold: Fold) -> ModelConfig:
    """A ViT of ``--arch`` without pre-training (no blur), normalised with the fold's training images."""
    cfg = run.cfg
    mean, std = run.fold_stats(fold)
    return ModelConfig(arch=cfg.arch, img_size=run.img_size, in_chans=cfg.in_chans, mean=mean, std=std, blur=False,
                       blur_embed="none")


class Classify:
    """Classification (Algorithm 1's lines 11-13 with cross-entropy); see the module docstring."""

    command, noun, run_config, table = "finetune", "fine-tuning", "finetune.yaml", PREDICTIONS
    score, score_label, group_name, settings_key = "val_macro_f1", "val macro-F1", "class", "finetune"

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.backbone_state: dict[str, torch.Tensor] | None = None  # a timm backbone's weights
        self._views: tuple[tuple[str, ...], torch.Tensor | None] | None = None  # the validation part, decoded once

    def check(self, run: Run) -> None:
        cfg = self.cfg
        if not cfg.labels:
            raise D2maeError("is required: a labels CSV or a class-per-folder tree", option="labels")
        if cfg.backbone and cfg.backbone_weights:  # read and check the weights once, before any work
            if not Path(cfg.backbone_weights).exists():
                raise D2maeError(f"{cfg.backbone_weights} does not exist", option="backbone_weights")
            c = cfg.in_chans
            self.backbone_state, notes = backbone_state(
                cfg.backbone_weights, BackboneConfig(cfg.backbone, run.img_size, c, *default_stats(c)))
            run.say(f"{cfg.backbone} from {cfg.backbone_weights}" + (f" ({'; '.join(notes)})" if notes else ""))
        elif not cfg.backbone and cfg.mode != "scratch" and not cfg.pretrained:
            raise D2maeError(f"is required for mode {cfg.mode} (only scratch trains without a pre-trained model)",
                             option="pretrained")
        if cfg.mode == "scratch" and not cfg.backbone and cfg.obs != "none":
            run.say(f"note: --mode scratch trains without pre-training, so there is no OBS (t = 0 for every image; "
                    f"--obs {cfg.obs} is not used)")

    def load(self, run: Run) -> LabeledSet:
        cfg = self.cfg
        return load_labeled(cfg.labels, path_column=cfg.path_column, label_column=cfg.label_column or "label",
                            group_column=cfg.group_column, split_column=cfg.split_column,
                            fold_column=cfg.fold_column, image_root=cfg.image_root, image_ext=cfg.image_ext,
                            allow_outside_root=cfg.allow_outside_root, folds_csv=cfg.folds_csv, classes=cfg.classes)

    def subset(self, labeled: LabeledSet, keep: list[int]) -> LabeledSet:
        return labeled.subset(keep)

    # -- training
    def build_model(self, run: Run, fold: Fold) -> nn.Module:
        cfg, classes = self.cfg, run.labeled.classes
        if cfg.backbone:  # a timm classifier, normalised with the fold's training images' statistics
            mean, std = run.fold_stats(fold)
            torch.manual_seed(derive_seed(cfg.seed, fold.number, 0))
            config = BackboneConfig(cfg.backbone, run.img_size, cfg.in_chans, mean, std)
            state = dict(self.backbone_state) if self.backbone_state is not None else None  # timm may edit it
            return backbone_classifier(config, len(classes), cfg.drop_path, state, cfg.backbone_weights or "")
        config = run.model_config or _scratch_vit(run, fold)
        torch.manual_seed(derive_seed(cfg.seed, fold.number, 0))
        model = build_classifier(config, len(classes), cfg.mode, cfg.drop_path)
        if cfg.mode != "scratch":
            model.load_encoder(run.mae.state_dict())
        if cfg.trainable_blocks is not None:
            freeze_all_but_last_blocks(model, cfg.trainable_blocks)
        return model

    def _counts(self, run: Run, fold: Fold) -> np.ndarray:
        return np.bincount(run.labeled.labels[fold.train], minlength=len(run.labeled.classes))

    def criterion(self, run: Run, fold: Fold) -> nn.Module:
        cfg = self.cfg
        if cfg.mixing:
            return SoftTargetCrossEntropy()  # Mixup applies the label smoothing to the soft targets
        weight = None
        if cfg.balance == "loss":
            counts = self._counts(run, fold)
            y = np.repeat(np.arange(len(counts)), counts)
            weight = torch.as_tensor(compute_class_weight("balanced", classes=np.arange(len(counts)), y=y),
                                     dtype=torch.float32)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.smoothing)

    def mixup(self, run: Run) -> Any:
        cfg = self.cfg
        if not cfg.mixing:
            return None
        return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                     label_smoothing=cfg.smoothing, num_classes=len(run.labeled.classes))

    def frozen(self, model: nn.Module) -> list[nn.Module]:
        return [model.encoder, model.fc_norm] if self.cfg.mode == "linear" else []

    def dataset(self, run: Run, fold: Fold, model: nn.Module) -> SeededDataset:
        size, chans = model.config.img_size, model.config.in_chans
        return SeededDataset(ImageDataset([run.labeled.refs[i] for i in fold.train], size, chans,
                                          augment=self.cfg.resolved_augment(),
                                          labels=run.labeled.labels[fold.train].tolist()))

    def sample_weights(self, run: Run, fold: Fold) -> np.ndarray | None:
        if self.cfg.balance != "sampler":
            return None
        return 1.0 / self._counts(run, fold)[run.labeled.labels[fold.train]]  # [n_train]: each class equally often

    # -- validation and outputs
    def _probs(self, run: Run, model: nn.Module, idx: np.ndarray, cache: bool = False) -> np.ndarray:
        """Class probabilities [n, K] of images ``idx`` at their t* (deterministic view), gathered over the ranks;
        with ``cache`` their views are decoded once and kept for the next call on the same images."""
        refs, cfg, views = [run.labeled.refs[i] for i in idx], self.cfg, None
        if cache:
            if self._views is None or self._views[0] != tuple(refs):
                mc = model.config
                self._views = (tuple(refs), decode_views(refs, mc.img_size, mc.in_chans, cfg.workers))
            views = self._views[1]
        return class_probabilities(model, refs, run.t_star[idx], run.device, batch_size=cfg.eval_batch_size,
                                   workers=cfg.workers, precision=cfg.precision, ctx=run.ctx, views=views)

    def validate(self, run: Run, model: nn.Module, fold: Fold) -> dict[str, float]:
        """Validation cross-entropy, macro-F1 (the score, :func:`d2mae.eval.metrics.macro_f1`) and accuracy."""
        probs = self._probs(run, model, fold.val, cache=True)  # [n_val, K], every rank
        y = run.labeled.labels[fold.val]
        pred = probs.argmax(axis=1)
        ce = float(nn.functional.cross_entropy(torch.log(torch.as_tensor(probs).clamp_min(1e-12)), torch.as_tensor(y)))
        return {"val_loss": ce, "val_macro_f1": macro_f1(y, pred), "val_accuracy": float(np.mean(pred == y))}

    def predict_fold(self, run: Run, model: nn.Module, fold: Fold) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        lab, rows = run.labeled, []
        for split, idx in (("val", fold.val), ("test", fold.test)):
            probs = self._probs(run, model, idx)
            for j, i in enumerate(idx):
                row: dict[str, Any] = {"path": lab.refs[i], "fold": fold.name, "split": split,
                                       "label": int(lab.labels[i]), "label_name": lab.classes[lab.labels[i]],
                                       "pred": int(np.argmax(probs[j]))}
                row.update({f"prob_{name}": f"{probs[j, c]:.6f}" for c, name in enumerate(lab.classes)})
                row.update(t_star=f"{run.t_star[i]:g}", sigma_star=f"{run.sigma_star[i]:g}")
                row.update({col: lab.columns[col][i] for col in self.cfg.keep_columns or []})
                rows.append(row)
        test = [int(r["label"]) == int(r["pred"]) for r in rows if r["split"] == "test"]
        return rows, {"test_accuracy": round(float(np.mean(test)), 6) if test else math.nan}

    def save_model(self, run: Run, model: nn.Module, folder: Path) -> None:
        save_classifier(model, folder, run.labeled.classes, run.spec, self.settings(run),
                        run.pretrained if self.cfg.mode != "scratch" else None, run.pretrained_hash)

    def fields(self, run: Run) -> list[str]:
        return prediction_fields(run.labeled.classes, self.cfg.keep_columns or [])

    def run_info(self, run: Run) -> dict[str, Any]:
        cfg = self.cfg
        return {"classes": run.labeled.classes, "mode": cfg.mode, "backbone": cfg.backbone,
                "backbone_weights": cfg.backbone_weights}

    def settings(self, run: Run) -> dict[str, Any]:
        cfg, world = self.cfg, run.ctx.world_size
        return {"mode": cfg.mode, "epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs,
                "batch_size": cfg.batch_size, "world_size": world, "lr": cfg.resolved_lr(world), "min_lr": cfg.min_lr,
                "layer_decay": 1.0 if cfg.mode == "scratch" else cfg.layer_decay,
                "weight_decay": 0.0 if cfg.mode == "linear" else cfg.weight_decay,
                "drop_path": 0.0 if cfg.mode == "linear" else cfg.drop_path, "smoothing": cfg.smoothing,
                "mixup": cfg.mixup, "cutmix": cfg.cutmix, "balance": cfg.balance, "augment": cfg.resolved_augment(),
                "patience": cfg.patience, "seed": cfg.seed, "optimizer": "sgd" if cfg.mode == "linear" else "adamw",
                "label_fraction": cfg.label_fraction, "trainable_blocks": cfg.trainable_blocks}


class DiceCE(nn.Module):
    """MONAI's ``DiceCELoss`` (soft Dice + cross-entropy) of logits [B, K, S, S] against class masks [B, S, S]."""

    def __init__(self) -> None:
        from monai.losses import DiceCELoss  # lazy (segment/model.py)

        super().__init__()
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, y[:, None])


class Segment:
    """Lesion segmentation on the same encoder; see the module docstring."""

    command, noun, run_config, table = "segment", "segmentation", "segment.yaml", PER_IMAGE
    score, score_label, group_name, settings_key = "val_dice", "val Dice", "stratum", "segment"

    def __init__(self, cfg: SegmentConfig) -> None:
        self.cfg = cfg
        self.masks: list[str] = []
        self._val: tuple[str, torch.Tensor, list[np.ndarray]] | None = None  # a fold's val views and truths

    def check(self, run: Run) -> None:
        if self.cfg.trainable_blocks is not None and self.cfg.decoder == "unet":
            raise D2maeError("partial fine-tuning freezes part of a pre-trained ViT encoder; the U-Net has none",
                             option="trainable_blocks")

    def load(self, run: Run) -> LabeledSet:
        data = load_segment_set(self.cfg)
        self.masks = data.masks
        names = [mask_name(i) for i in data.labeled.ids]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            same = [data.labeled.ids[i] for i, n in enumerate(names) if n == dup[0]]
            raise D2maeError(f"images {' and '.join(same[:2])} would both write {PREDICTIONS_DIR}/{dup[0]}; rename "
                             "one of them")
        return data.labeled

    def subset(self, labeled: LabeledSet, keep: list[int]) -> LabeledSet:
        self.masks = [self.masks[i] for i in keep]
        return labeled.subset(keep)

    # -- training
    def build_model(self, run: Run, fold: Fold) -> nn.Module:
        cfg = self.cfg
        torch.manual_seed(derive_seed(cfg.seed, fold.number, 0))
        config: Any = run.model_config
        if config is None and cfg.decoder == "unet":
            mean, std = run.fold_stats(fold)
            config = UNetConfig(encoder=cfg.unet_encoder, img_size=run.img_size, in_chans=cfg.in_chans, mean=mean,
                                std=std)
        model = build_segmenter(cfg.decoder, config or _scratch_vit(run, fold), cfg.num_classes, cfg.feature_size,
                                cfg.drop_path)
        if run.mae is not None:
            model.load_encoder(run.mae.state_dict())
        if cfg.trainable_blocks is not None:
            freeze_all_but_last_blocks(model, cfg.trainable_blocks)
        return model

    def criterion(self, run: Run, fold: Fold) -> nn.Module:
        return DiceCE()

    def mixup(self, run: Run) -> None:
        return None

    def frozen(self, model: nn.Module) -> list[nn.Module]:
        return []

    def dataset(self, run: Run, fold: Fold, model: nn.Module) -> SeededDataset:
        cfg, refs = self.cfg, run.labeled.refs
        return SeededDataset(SegmentDataset([refs[i] for i in fold.train], [self.masks[i] for i in fold.train],
                                            model.config.img_size, model.config.in_chans, cfg.num_classes,
                                            augment="strong" if cfg.augment == "auto" else cfg.augment,
                                            crop_scale=cfg.crop_scale, hflip=cfg.hflip))

    def sample_weights(self, run: Run, fold: Fold) -> None:
        return None

    # -- validation and outputs
    def _scores(self, run: Run, model: nn.Module, idx: np.ndarray, truths: list[np.ndarray],
                views: torch.Tensor | None = None, keep: list[np.ndarray] | None = None) -> list[dict[str, float]]:
        """Dice / IoU / HD95 of images ``idx`` at their own size against ``truths``; ``keep`` collects the
        predicted masks."""
        probs = native_probs([model], [run.labeled.refs[i] for i in idx], run.t_star[idx], run.device,
                             self.cfg.eval_batch_size, self.cfg.precision, views, [m.shape for m in truths],
                             tta=self.cfg.tta)
        scores = []
        for p, truth in zip(probs, truths):
            pred = p.argmax(axis=0).astype(np.uint8)  # [H, W]
            if keep is not None:
                keep.append(pred)
            scores.append(image_scores(pred, truth, self.cfg.num_classes))
        return scores

    def _truths(self, idx: np.ndarray) -> list[np.ndarray]:
        return [read_mask(self.masks[i], self.cfg.num_classes) for i in idx]

    def validate(self, run: Run, model: nn.Module, fold: Fold) -> dict[str, float]:
        """Mean validation Dice at each image's own size (views and masks read once per fold)."""
        if self._val is None or self._val[0] != fold.name:
            data = SegmentDataset([run.labeled.refs[i] for i in fold.val], [""] * len(fold.val), run.img_size,
                                  run.in_chans, self.cfg.num_classes)
            views = (torch.stack([data.image(j) for j in range(len(fold.val))]) if len(fold.val)
                     else torch.zeros(0, run.in_chans, run.img_size, run.img_size))
            self._val = (fold.name, views, self._truths(fold.val))
        scores = self._scores(run, model, fold.val, self._val[2], views=self._val[1])
        return {"val_dice": float(np.mean([s["dice"] for s in scores]))}

    def predict_fold(self, run: Run, model: nn.Module, fold: Fold) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-image rows of the validation and test parts; the test images' masks go to ``predictions/``."""
        lab, rows = run.labeled, []
        for split, idx in (("val", fold.val), ("test", fold.test)):
            preds: list[np.ndarray] = []
            truths = self._truths(idx)
            for i, s, pred, truth in zip(idx, self._scores(run, model, idx, truths, keep=preds), preds, truths):
                if split == "test" and run.ctx.is_main:
                    write_mask(run.out / PREDICTIONS_DIR / mask_name(lab.ids[i]), pred, self.cfg.num_classes)
                rows.append({"id": lab.ids[i], "path": lab.refs[i], "mask": self.masks[i], "fold": fold.name,
                             "split": split, "class": lab.classes[lab.labels[i]] if self.cfg.label_column else "",
                             "dice": f"{s['dice']:.8f}", "iou": f"{s['iou']:.8f}",
                             "hd95": "nan" if math.isnan(s["hd95"]) else f"{s['hd95']:.6f}",
                             "lesion_pixels": int((pred > 0).sum()), "truth_pixels": int((truth > 0).sum()),
                             "height": truth.shape[0], "width": truth.shape[1],
                             "t_star": f"{run.t_star[i]:g}", "sigma_star": f"{run.sigma_star[i]:g}",
                             **{col: lab.columns[col][i] for col in self.cfg.keep_columns or []}})
        test = [r for r in rows if r["split"] == "test"]
        lesion = per_image_values(test, "dice_lesion")
        return rows, {"test_dice": round(float(np.mean([float(r["dice"]) for r in test])), 6) if test else None,
                      "test_dice_lesion": round(float(np.nanmean(lesion)), 6) if np.isfinite(lesion).any() else None}

    def save_model(self, run: Run, model: nn.Module, folder: Path) -> None:
        save_segmenter(model, folder, self.cfg.decoder, run.spec, self.settings(run), run.pretrained,
                       run.pretrained_hash)

    def fields(self, run: Run) -> list[str]:
        return PER_IMAGE_FIELDS + list(self.cfg.keep_columns or [])

    def run_info(self, run: Run) -> dict[str, Any]:
        return {"kind": "segment", "num_classes": self.cfg.num_classes, "decoder": self.cfg.decoder,
                "strata": run.labeled.classes}

    def settings(self, run: Run) -> dict[str, Any]:
        cfg = self.cfg
        return {"decoder": cfg.decoder, "feature_size": cfg.feature_size, "epochs": cfg.epochs,
                "warmup_epochs": cfg.warmup_epochs, "batch_size": cfg.batch_size, "lr": cfg.resolved_lr(),
                "min_lr": cfg.min_lr, "layer_decay": cfg.layer_decay if cfg.mode == "full" else 1.0,
                "weight_decay": cfg.weight_decay, "drop_path": cfg.drop_path, "crop_scale": cfg.crop_scale,
                "hflip": cfg.hflip, "augment": "strong" if cfg.augment == "auto" else cfg.augment, "tta": cfg.tta,
                "patience": cfg.patience, "seed": cfg.seed, "loss": "DiceCELoss", "mode": cfg.mode}


def _run(cfg: Any, task: Any, inputs: list[Any]) -> Path:
    """Run ``cfg`` through the engine with ``task`` in its claimed, locked output folder."""
    if not cfg.out:
        raise D2maeError(f"is required: the folder for the {task.noun} run", option="out")
    with distributed_run(cfg.device) as (ctx, device):
        on_main(ctx, lambda: claim_folder(cfg.out, task.command, inputs, resumable=True, forceable=False))
        with output_lock(cfg.out, task.command, ctx):
            configure_threads(cfg.threads)
            return Run(cfg, task, ctx, device).run()


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune (Algorithm 1) on every selected fold; returns the output folder (docs/finetune.md).

    Under torchrun (``RANK``/``WORLD_SIZE`` set) each process trains on its slice of every batch with
    DistributedDataParallel and only rank 0 writes; every rank returns the same folder.

    Raises:
        D2maeError: bad input, before any training starts.
        Interrupted: SIGTERM/SIGINT (``exit_code`` 128 + signal); continue with ``resume=True``.
    """
    inputs = [cfg.pretrained, *labels_inputs(cfg.labels, cfg.path_column, cfg.image_root, cfg.image_ext),
              cfg.folds_csv, cfg.obs_table, cfg.backbone_weights]
    return _run(cfg, Classify(cfg), inputs)


def segment(cfg: SegmentConfig) -> Path:
    """Train and test a segmenter on every selected fold; returns the run folder (docs/segment.md). One process:
    torchrun is refused."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise D2maeError("d2mae segment runs in one process; start it without torchrun")
    inputs = [cfg.pretrained, cfg.images, cfg.masks, cfg.obs_table,
              *labels_inputs(cfg.labels, cfg.path_column, cfg.image_root, cfg.image_ext)]
    return _run(cfg, Segment(cfg), inputs)

"""d2mae — D²MAE (Diffusional Deblurring Masked Autoencoder, MICCAI 2025) for ultrasound images.

Pre-training with a per-sample blur schedule and a blur token, optimal blurriness search (OBS), blurriness-aware
fine-tuning, evaluation and prediction. The package tells the paper's story from the bottom up:

* :mod:`d2mae.method` — the method itself: the blur schedule and blur (Eq. 1), the models (Eqs. 2-3), the OBS rule
  (Eqs. 4-5);
* :mod:`d2mae.data` — images: sources, decoding, views and augmentations, the pre-training cache, labels and folds;
* :mod:`d2mae.train` — pre-training and fine-tuning (Algorithm 1), their optimisers, schedules and resumption;
* :mod:`d2mae.eval` — inference, OBS over a data set, prediction, metrics, evaluation, tables, figures, reports;
* :mod:`d2mae.io` — model folders, OBS tables, importing and exporting weights;
* :mod:`d2mae.experiment` — every method on every data set under one budget, and the report;
* :mod:`d2mae.runtime` — errors, files, devices, seeds, processes, logs, config dataclasses;
* :mod:`d2mae.commands` — the command line, the only part that knows about flags.

The functions the README's Python API shows, and the most used classes, are importable from ``d2mae`` itself; they
are imported lazily (PEP 562), so ``import d2mae`` stays fast::

    from d2mae import make_config, pretrain, FinetuneConfig, finetune, evaluate_run
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS: dict[str, str] = {
    "D2maeError": "d2mae.runtime.errors",
    "BlurSchedule": "d2mae.method.blur",
    "gaussian_blur": "d2mae.method.blur",
    "ModelConfig": "d2mae.method.model_config",
    "DeblurEncoder": "d2mae.method.models",
    "DeblurMAE": "d2mae.method.models",
    "DeblurClassifier": "d2mae.method.models",
    "ObsSpec": "d2mae.method.obs",
    "save_pretrained": "d2mae.io.artifacts",
    "load_pretrained": "d2mae.io.artifacts",
    "load_classifier": "d2mae.io.artifacts",
    "ObsTable": "d2mae.io.obs_table",
    "export_encoder": "d2mae.io.export",
    "init_from_checkpoint": "d2mae.io.imports",
    "find_images": "d2mae.data.sources",
    "load_image": "d2mae.data.decode",
    "ImageDataset": "d2mae.data.dataset",
    "load_labeled": "d2mae.data.labels",
    "make_folds": "d2mae.data.folds",
    "generate_phantoms": "d2mae.data.phantom",
    "equivalent_sigma": "d2mae.data.sharpness",
    "PretrainConfig": "d2mae.train.pretrain_config",
    "PRESETS": "d2mae.method.presets",
    "make_config": "d2mae.train.pretrain_config",
    "pretrain": "d2mae.train.pretrain",
    "FinetuneConfig": "d2mae.train.config",
    "finetune": "d2mae.train.tasks",
    "run_obs": "d2mae.eval.obs",
    "predict": "d2mae.eval.predict",
    "evaluate_run": "d2mae.eval.evaluate",
    "compare_runs": "d2mae.eval.evaluate",
    "run_experiment": "d2mae.experiment",
    "load_experiment": "d2mae.experiment",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'd2mae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

"""d2mae — D²MAE (Diffusional Deblurring Masked Autoencoder, MICCAI 2025) for ultrasound images.

Pre-training with a per-sample blur schedule and a blur token, optimal blurriness search (OBS), blurriness-aware
fine-tuning, evaluation and prediction. Everything the command line does is a function of a module::

    from d2mae.pretrain import PretrainConfig, pretrain      # d2mae pretrain
    from d2mae.obs import run_obs                              # d2mae obs
    from d2mae.finetune import FinetuneConfig, finetune       # d2mae finetune
    from d2mae.predict import predict                          # d2mae predict
    from d2mae.evaluate import evaluate_run, compare_runs     # d2mae evaluate / compare

The most used classes and functions are also importable from ``d2mae`` itself; they are imported lazily (PEP 562),
so ``import d2mae`` and ``d2mae --help`` stay fast. (The modules ``d2mae.pretrain``, ``d2mae.finetune`` and
``d2mae.predict`` share their names with their main functions, so those are imported from the module.)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "D2maeError": "d2mae.errors",
    "BlurSchedule": "d2mae.blur",
    "gaussian_blur": "d2mae.blur",
    "ModelConfig": "d2mae.models",
    "DeblurEncoder": "d2mae.models",
    "DeblurMAE": "d2mae.models",
    "DeblurClassifier": "d2mae.models",
    "save_pretrained": "d2mae.artifacts",
    "load_pretrained": "d2mae.artifacts",
    "generate_phantoms": "d2mae.phantom",
    "find_images": "d2mae.data",
    "load_image": "d2mae.data",
    "ImageDataset": "d2mae.data",
    "load_labeled": "d2mae.labels",
    "make_folds": "d2mae.labels",
    "PretrainConfig": "d2mae.pretrain",
    "PRESETS": "d2mae.pretrain",
    "ObsSpec": "d2mae.obs",
    "ObsTable": "d2mae.obs",
    "run_obs": "d2mae.obs",
    "FinetuneConfig": "d2mae.finetune",
    "load_classifier": "d2mae.finetune",
    "evaluate_run": "d2mae.evaluate",
    "compare_runs": "d2mae.evaluate",
    "export_encoder": "d2mae.export",
    "init_from_checkpoint": "d2mae.imports",
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

"""A stage of an experiment's plan and the facts a dataset contributes to it: folders, cache keys and the
``stage_done.json`` marker. Part of :mod:`d2mae.experiment`."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from d2mae.experiment.config import DatasetSpec

DONE = "stage_done.json"  # a finished stage (fine-tuning's fold_<k>/done.json is a fold's)
LEGACY_DONE = "DONE.json"  # the same marker as d2mae 0.2.0 named it


def config_hash(obj: Any) -> str:
    """sha256 of a config as canonical JSON: the identity of a stage's work."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def refs_digest(refs: Sequence[str]) -> str:
    """Identity of a list of image files: paths and sizes (cheap to compute for thousands of files)."""
    h = hashlib.sha256()
    for r in refs:
        path = r.split("#", 1)[0]
        try:
            size = os.path.getsize(path)
        except OSError:
            size = -1
        h.update(f"{r}\t{size}\n".encode("utf-8"))
    return h.hexdigest()


@dataclass
class Stage:
    """One unit of work with its own folder and DONE marker.

    ``kind``: ``data`` (generate phantoms / list images), ``arch`` (the untrained ViT of the supervised floor),
    ``pretrain``, ``finetune`` (fine-tuning on every fold + evaluation), ``label_fraction`` (the same on a share of
    each training fold, ``budget.label_fractions``), ``probe`` (``d2mae probe`` on a kept pre-training checkpoint,
    ``budget.checkpoints``), ``segment`` (``d2mae segment`` on every fold + evaluation, for a ``task: segment``
    dataset).
    """

    kind: str
    dataset: str
    label: str
    folder: Path
    key: str
    payload: Any
    seed: int | None = None
    method: str | None = None
    preset: str | None = None
    needs: list[str] = field(default_factory=list)
    estimate_s: float = math.nan
    share: float = 1.0  # probe: the share of the pre-training budget read; label_fraction: the labels' share

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.dataset}:{self.folder.name}"

    def done_info(self) -> dict[str, Any] | None:
        """The DONE marker's content when this stage finished with the same config, else ``None``."""
        path = self.folder / DONE
        if not path.is_file():
            path = self.folder / LEGACY_DONE
        if not path.is_file():
            return None
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return info if isinstance(info, dict) and info.get("key") == self.key else None


@dataclass
class DatasetPlan:
    """What a dataset contributes to the plan: sizes (known or, for phantoms, planned) and derived paths."""

    name: str
    spec: DatasetSpec
    labels: str
    pretrain_data: list[str]
    n_pretrain: int
    n_labeled: int
    num_classes: int
    folds: list[tuple[str, int, int, int]]  # (name, n_train, n_val, n_test) per fold
    data_key: str
    overlap: str = ""
    sample: list[str] = field(default_factory=list)  # a few labeled images (time estimates)

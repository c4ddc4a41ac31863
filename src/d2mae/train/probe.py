"""Cheap readouts of a pre-trained encoder (beyond the paper): ``d2mae probe``.

As in fine-tuning (Algorithm 1 lines 4-12), every labeled image first gets its t* from OBS (or the fixed level of
``--obs``); the frozen encoder then sees it blurred at σ_{t*} with t* fed to BLU(t), and its pooled features (the
classifier's: the mean of the last block's patch tokens, LayerNorm-ed; :meth:`DeblurClassifier.features`) are
computed once, in eval mode, on the deterministic whole-image view. On each fold's training part:

* ``linear``: scikit-learn's ``LogisticRegression`` (L2, ``C = --probe-c``) on standardised features;
* ``knn``: scikit-learn's ``KNeighborsClassifier`` (``k = --knn-k``, cosine distance, votes weighted by 1/distance);
* ``partial-N`` (with ``--trainable-blocks N``): ``d2mae finetune`` with only the last N blocks, the pooling norm and
  the head trained (MAE's partial fine-tuning), with every other fine-tuning option as given, in ``OUT/partial``.

Each readout is scored on the fold's test part: accuracy, macro-F1 and AUROC (:mod:`d2mae.eval.metrics`), one row
per fold and readout in ``OUT/probe.csv``. ``OUT/features.npz`` keeps the features, labels, t* and the fold parts,
so any other scikit-learn model can be fitted on exactly what the probes saw.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from d2mae.data.labels import labels_inputs
from d2mae.eval.infer import infer
from d2mae.eval.metrics import classification_metrics
from d2mae.io.obs_table import TABLE_NAME
from d2mae.io.predictions import PREDICTIONS
from d2mae.method.models import DeblurClassifier
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_bytes, atomic_write_text, csv_text, read_csv_rows
from d2mae.runtime.locks import output_lock
from d2mae.runtime.options import save_config
from d2mae.runtime.outputs import claim_folder
from d2mae.runtime.threads import configure_threads
from d2mae.train.config import ProbeConfig
from d2mae.train.engine import Run
from d2mae.train.tasks import Classify, finetune

RUN_CONFIG = "probe.yaml"
PROBE_CSV = "probe.csv"
FEATURES = "features.npz"
PROBE_FIELDS = ["fold", "readout", "n_train", "n_test", "accuracy", "macro_f1", "auroc", "seconds"]


class Probe(Classify):
    """The classification task's set-up (labels, folds, leaks, OBS once) for readouts of a frozen encoder."""

    command, noun, run_config = "probe", "probe", RUN_CONFIG

    def check(self, run: Run) -> None:
        if not self.cfg.labels:
            raise D2maeError("is required: a labels CSV or a class-per-folder tree", option="labels")
        if not self.cfg.pretrained:
            raise D2maeError("is required: the pre-trained folder whose encoder the probes read",
                             option="pretrained")


def _readouts(cfg: ProbeConfig) -> dict[str, Any]:
    """The scikit-learn readouts, fresh for each fold."""
    return {"linear": make_pipeline(StandardScaler(), LogisticRegression(C=cfg.probe_c, max_iter=cfg.probe_max_iter)),
            "knn": KNeighborsClassifier(n_neighbors=cfg.knn_k, metric="cosine", weights="distance")}


def _scores(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, float]:
    m = classification_metrics(y, probs, classes)
    return {k: float(m[k]) for k in ("accuracy", "macro_f1", "auroc")}


def _row(fold: str, readout: str, n_train: int, n_test: int, scores: dict[str, float], seconds: float
         ) -> dict[str, Any]:
    return {"fold": fold, "readout": readout, "n_train": n_train, "n_test": n_test,
            **{k: f"{v:.6f}" for k, v in scores.items()}, "seconds": f"{seconds:.3f}"}


def features(run: Run, t: np.ndarray) -> np.ndarray:
    """Pooled features [n, D] of every labeled image at its t* (zeros for images outside the chosen folds)."""
    clf = DeblurClassifier(run.model_config, len(run.labeled.classes))
    clf.load_encoder(run.mae.state_dict())
    refs = [run.labeled.refs[i] for i in run.used]
    cfg, rc = clf.config, run.cfg
    out = np.zeros((len(run.labeled), cfg.embed_dim))
    out[run.used] = infer(clf, lambda x, levels: clf.features(x, levels).float(), refs, t[run.used],
                          img_size=cfg.img_size, in_chans=cfg.in_chans, out_shape=(cfg.embed_dim,), device=run.device,
                          batch_size=rc.eval_batch_size, workers=rc.workers, precision=rc.precision,
                          progress=rc.progress, desc="features")
    return out


def readout_rows(run: Run, feats: np.ndarray) -> list[dict[str, Any]]:
    """The linear probe and kNN fitted on each fold's training part, scored on its test part."""
    lab, classes, cfg, rows = run.labeled, run.labeled.classes, run.cfg, []
    for fold in run.folds:
        for name, model in _readouts(cfg).items():
            started = time.perf_counter()
            if name == "knn" and cfg.knn_k > len(fold.train):
                run.say(f"note: fold {fold.name} has {len(fold.train)} training images, fewer than --knn-k "
                        f"{cfg.knn_k}: its kNN uses k = {len(fold.train)}")
                model.set_params(n_neighbors=len(fold.train))
            model.fit(feats[fold.train], lab.labels[fold.train])
            probs = np.zeros((len(fold.test), len(classes)))
            probs[:, model.classes_] = model.predict_proba(feats[fold.test])  # [n_test, K]
            rows.append(_row(fold.name, name, len(fold.train), len(fold.test),
                             _scores(lab.labels[fold.test], probs, classes), time.perf_counter() - started))
            run.say(f"fold {fold.name} {name}: " + ", ".join(f"{k} {rows[-1][k]}" for k in
                                                             ("accuracy", "macro_f1", "auroc")))
    return rows


def partial_rows(run: Run) -> list[dict[str, Any]]:
    """Partial fine-tuning in ``OUT/partial`` (``d2mae finetune`` with this run's OBS table), scored per fold."""
    cfg = run.cfg
    table = run.out / "obs" / TABLE_NAME
    started = time.perf_counter()
    out = finetune(cfg.finetune_config(out=str(run.out / "partial"), obs_table=str(table) if table.is_file() else None))
    seconds = time.perf_counter() - started
    preds = read_csv_rows(out / PREDICTIONS)
    classes, rows = run.labeled.classes, []
    for fold in run.folds:
        test = [r for r in preds if r["fold"] == fold.name and r["split"] == "test"]
        y = np.array([int(r["label"]) for r in test])
        probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in test])
        rows.append(_row(fold.name, f"partial-{cfg.trainable_blocks}", len(fold.train), len(test),
                         _scores(y, probs, classes), seconds / len(run.folds)))
    return rows


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def probe(cfg: ProbeConfig) -> Path:
    """Linear probe, kNN and (with ``trainable_blocks``) partial fine-tuning of one pre-trained folder, per fold;
    returns the output folder (``probe.csv``, ``features.npz``, ``probe.yaml``, ``obs/``)."""
    if not cfg.out:
        raise D2maeError("is required: the folder for the probe's outputs", option="out")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise D2maeError("d2mae probe runs in one process; start it without torchrun")
    claim_folder(cfg.out, "probe", [cfg.pretrained, *labels_inputs(cfg.labels, cfg.path_column, cfg.image_root,
                                                                   cfg.image_ext)], force=cfg.force)
    with output_lock(cfg.out, "probe"):
        configure_threads(cfg.threads)
        run = Run(cfg, Probe(cfg))
        run.setup()
        save_config(cfg, run.out / RUN_CONFIG)
        t, _ = run.blur_levels()
        feats = features(run, t)  # [n, D]
        lab = run.labeled
        parts = {f"{f.name}/{k}": v for f in run.folds for k, v in f.parts().items()}
        atomic_write_bytes(run.out / FEATURES, _npz(features=feats, labels=lab.labels, t_star=t,
                                                    refs=np.array(lab.refs), **parts))
        rows = readout_rows(run, feats) + (partial_rows(run) if cfg.trainable_blocks is not None else [])
        atomic_write_text(run.out / PROBE_CSV, csv_text(PROBE_FIELDS, rows))
        return run.out

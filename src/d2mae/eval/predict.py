"""Classify new images with a fine-tuned D²MAE model: OBS on each image first, then the classifier at its t*.

As in fine-tuning (Algorithm 1), a new image is first searched for its optimal blur level with the pre-trained model
bundled in the fine-tuned folder (``pretrained/``; OBS settings from the folder's ``config.json``), batched over
images and levels, then blurred at σ_{t*} and classified with t*::

    d2mae predict --model runs/ft/fold_1/model scan.png more_scans/ --out preds.csv
    d2mae predict --model runs/ft images/          # a run folder: the mean of its folds' probabilities

``--model`` is a fine-tuned model folder (``fold_k/model``) or a whole run folder from ``d2mae finetune``. With a run
folder, every fold's model classifies each image and the class probabilities are averaged (a k-fold ensemble; the
folds share the pre-trained model, so OBS runs once). ``--fold K`` picks one fold's model instead.

Output: a table on the terminal and, with ``--out``, a CSV with path, pred (class name), prob_<class>…, t_star,
sigma_star.

Under torchrun each rank runs OBS and the classifiers on its block of the images, the results are gathered in
order, and rank 0 alone prints and writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from d2mae.data.decode import check_images
from d2mae.data.sources import find_images
from d2mae.eval.infer import class_probabilities
from d2mae.eval.obs import run_obs
from d2mae.io.artifacts import load_classifier, load_pretrained, model_sha256
from d2mae.io.obs_table import sigmas_of
from d2mae.io.predictions import DONE, RUN_JSON
from d2mae.method.obs import ObsSpec
from d2mae.runtime.device import resolve_device
from d2mae.runtime.distributed import DistContext, on_main
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import csv_text
from d2mae.runtime.options import RuntimeOptions, check_fields


@dataclass
class PredictConfig(RuntimeOptions):
    """What ``d2mae predict`` takes: every field is a flag and a YAML key; images are positional arguments."""

    model: str = field(default="", metadata={"help": "fine-tuned or segmentation model folder (fold_k/model) or a run "
                                                     "folder (then the folds' probabilities are averaged)",
                                             "metavar": "DIR"})
    inputs: list[str] | None = field(default=None, metadata={"help": "images, folders or .csv/.txt lists"})
    out: str | None = field(default=None, metadata={"help": "write the predictions to this CSV (with a segmentation "
                                                            "model: a folder for the mask PNGs and masks.csv)",
                                                    "metavar": "PATH"})
    fold: str | None = field(default=None, metadata={"help": "with a run folder: use only this fold's model"})
    batch_size: int = field(default=32, metadata={"advanced": True, "help": "images per batch", "min": 1})
    show: int = field(default=20, metadata={
        "advanced": True, "help": "rows printed on the terminal (all go to --out)", "min": 0})
    force: bool = field(default=False, metadata={"help": "replace the --out file if it exists"})

    def __post_init__(self) -> None:
        check_fields(self)


def model_folders(path: str | Path, fold: str | None = None) -> list[Path]:
    """The fine-tuned model folder(s) behind ``--model``: the folder itself, or every fold of a run folder."""
    path = Path(path)
    if not path.is_dir():
        raise D2maeError(f"{path} does not exist", option="model")
    config = path / "config.json"
    if config.is_file():
        if fold is not None:
            raise D2maeError("needs --model to be a run folder (with fold_k/model inside)", option="fold")
        return [path]
    run = path / RUN_JSON
    if run.is_file():
        try:
            folds = [str(f) for f in json.loads(run.read_text(encoding="utf-8")).get("folds", [])]
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise D2maeError(f"{run} is not valid JSON ({exc})") from None
        if fold is not None:
            if str(fold) not in folds:
                raise D2maeError(f"{path} has no fold {fold}; its folds are {', '.join(folds)}", option="fold")
            folds = [str(fold)]
        found = [path / f"fold_{f}" / "model" for f in folds
                 if (path / f"fold_{f}" / "model" / "config.json").is_file()]
        incomplete = [path / f"fold_{f}" / "model" for f in folds
                      if (path / f"fold_{f}" / DONE).is_file() and path / f"fold_{f}" / "model" not in found]
        if incomplete:  # a finished fold whose model folder lost a file
            raise D2maeError(f"{incomplete[0] / 'config.json'} is missing: the fold finished, but its model folder is "
                             "incomplete; put the file back, or fine-tune that fold again", option="model")
        if not found:
            raise D2maeError(f"run folder {path} holds no finished fold model (fold_k/model); "
                             "finish the run (d2mae finetune --resume) first", option="model")
        return found
    raise D2maeError(f"{path} is neither a fine-tuned model folder (classifier.safetensors + "
                     "config.json) nor a run folder from `d2mae finetune` (run.json)", option="model")


@dataclass
class Predictions:
    """Per image: class probabilities (averaged over the models used), t*, σ*."""

    paths: list[str]
    classes: list[str]
    probs: np.ndarray
    t_star: np.ndarray
    sigma_star: np.ndarray
    models: list[str]

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for i, p in enumerate(self.paths):
            row: dict[str, Any] = {"path": p, "pred": self.classes[int(self.pred[i])]}
            for c, name in enumerate(self.classes):
                row[f"prob_{name}"] = f"{self.probs[i, c]:.6f}"
            row["t_star"] = f"{self.t_star[i]:g}"
            row["sigma_star"] = f"{self.sigma_star[i]:g}"
            out.append(row)
        return out

    def to_csv(self) -> str:
        fields = ["path", "pred"] + [f"prob_{c}" for c in self.classes] + ["t_star", "sigma_star"]
        return csv_text(fields, self.rows())

    def table(self, limit: int = 20) -> str:
        """A fixed-width text table of the first ``limit`` rows."""
        names = [Path(p.split("#")[0]).name + (("#" + p.split("#", 1)[1]) if "#" in p else "") for p in self.paths]
        width = min(48, max([4] + [len(n) for n in names]))
        head = f"{'image':<{width}}  {'pred':<12}" + "".join(f"  {('p_' + c)[:10]:>10}" for c in self.classes) \
            + f"  {'σ*':>5}"
        lines = [head, "-" * len(head)]
        for i, n in enumerate(names[:limit]):
            short = n if len(n) <= width else "…" + n[-(width - 1):]
            lines.append(f"{short:<{width}}  {self.classes[int(self.pred[i])][:12]:<12}"
                         + "".join(f"  {self.probs[i, c]:>10.3f}" for c in range(len(self.classes)))
                         + f"  {self.sigma_star[i]:>5.2g}")
        if len(names) > limit:
            lines.append(f"… {len(names) - limit} more row(s)")
        return "\n".join(lines)


def predict(model: str | Path, inputs: Sequence[str | Path], *, fold: str | None = None, batch_size: int = 32,
            device: str | torch.device = "auto", precision: str = "auto", workers: int = 0, skip_bad: bool = False,
            progress: bool = True, ctx: DistContext | None = None) -> Predictions:
    """Run OBS with the bundled pre-trained model, then classify every image at its t* (see the module docstring).

    ``ctx``: under torchrun, this process's place; each rank works on its block of the images and every rank
    returns all the predictions (default: one process).

    Raises:
        D2maeError: a model folder that is missing, incomplete or inconsistent; unreadable images.
    """
    if not model:
        raise D2maeError("is required: a fine-tuned model folder or a finetune run folder", option="model")
    ctx = ctx or DistContext()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    folders = model_folders(model, fold)
    loaded = [load_classifier(f, dev) for f in folders]
    first = loaded[0][1]
    for f, (_, meta) in zip(folders[1:], loaded[1:]):
        for key in ("classes", "model", "obs", "pretrained_sha256"):
            if meta.get(key) != first.get(key):
                raise D2maeError(f"fold models disagree on '{key}' ({folders[0]} vs {f}); they do not come from "
                                 "one run", option="model")
    classes = list(first["classes"])
    clf = loaded[0][0]
    found = find_images([str(p) for p in inputs])
    refs = on_main(ctx, lambda: check_images(found, clf.config.in_chans, skip_bad=skip_bad))
    t_star = new_image_levels(folders[0], first, clf, refs, batch_size=batch_size, device=dev, workers=workers,
                              progress=progress, ctx=ctx)
    probs = np.zeros((len(refs), len(classes)))
    for k, (m, _) in enumerate(loaded):
        probs += class_probabilities(m, refs, t_star, dev, batch_size=batch_size, workers=workers,
                                     precision=precision, progress=progress, ctx=ctx,
                                     desc=f"classify ({k + 1}/{len(loaded)})" if len(loaded) > 1 else "classify")
    probs /= len(loaded)
    return Predictions(refs, classes, probs, np.asarray(t_star, float), sigmas_of(clf.schedule, t_star),
                       [str(f) for f in folders])


def new_image_levels(folder: Path, meta: dict[str, Any], model: Any, refs: Sequence[str], *, batch_size: int,
                     device: torch.device, workers: int, progress: bool, ctx: DistContext) -> np.ndarray:
    """t* [n] of new images under a trained model folder's OBS setting (Algorithm 1 lines 4-10, at test time).

    The search runs with the pre-trained model bundled in ``folder/pretrained`` (refused when its sha256 is not the
    one recorded in ``meta`` at training); ``none`` and ``fixed`` need only the schedule of ``model`` (the trained
    model itself).
    """
    spec = ObsSpec.from_dict(meta.get("obs"), str(folder / "config.json"))
    obs_model: Any = model
    expected = meta.get("pretrained_sha256")
    if spec.mode == "search":
        pre_dir = folder / "pretrained"
        lost = [pre_dir / name for name in ("config.json", "model.safetensors") if not (pre_dir / name).is_file()]
        if lost:
            what = f"has no {pre_dir.name}/ folder" if not pre_dir.is_dir() else f"is missing {lost[0]}"
            raise D2maeError(f"{folder} {what}; OBS on new images needs the pre-trained model it was "
                             "trained from — copy it there or train again")
        if expected and model_sha256(pre_dir) != expected:
            raise D2maeError(f"{pre_dir / 'model.safetensors'} is not the pre-trained model this model was "
                             f"trained from (sha256 differs from {expected[:12]}…)")
        obs_model = load_pretrained(pre_dir, device)
    hashes = None if spec.mode == "search" else [""] * len(refs)  # a fixed level needs no content hashes
    return run_obs(obs_model, refs, spec=spec, batch_size=batch_size, device=device, workers=workers,
                   model_hash=expected or "", hashes=hashes, progress=progress, ctx=ctx).t_star

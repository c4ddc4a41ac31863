"""The fine-tuning run format: written by :mod:`d2mae.train.engine`, read by :mod:`d2mae.eval.evaluate`,
:mod:`d2mae.eval.predict` and the experiment report. One home for the file names, the columns of
``predictions.csv`` and the checks of a run folder::

    RUN/predictions.csv     path,fold,split,label,label_name,pred,prob_<class>…,t_star,sigma_star[,kept columns]
    RUN/run.json            classes, protocol, folds, method, seed, settings, timings
    RUN/fold_<k>/done.json  a finished fold: its sizes, best epoch and test accuracy
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from d2mae.runtime.errors import D2maeError, shown

PREDICTIONS = "predictions.csv"
RUN_JSON = "run.json"
DONE = "done.json"  # in each fold_<k>/


def prediction_fields(classes: Sequence[str], keep: Sequence[str]) -> list[str]:
    """The columns of predictions.csv."""
    return (["path", "fold", "split", "label", "label_name", "pred"] + [f"prob_{c}" for c in classes]
            + ["t_star", "sigma_star"] + list(keep))


def saved_run(out: Path) -> dict[str, Any]:
    """``run.json`` of a run in ``out`` (``{}`` when there is none yet)."""
    path = out / RUN_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def finished_fold(fold_dir: Path, table: str = PREDICTIONS) -> dict[str, Any] | None:
    """A fold's ``done.json`` when it finished (its per-image ``table`` written), else ``None``."""
    if (fold_dir / DONE).is_file() and (fold_dir / table).is_file():
        return json.loads((fold_dir / DONE).read_text(encoding="utf-8"))
    return None


REQUIRED_COLUMNS = ("path", "fold", "split", "label", "pred")


# Probabilities may be rounded when written; rows must still sum to 1 within this tolerance.
_PROB_SUM_TOL = 1e-2


# ------------------------------------------------------------------------------------------- run loading
@dataclasses.dataclass
class RunPredictions:
    """The rows of one split of a run's predictions.csv, as arrays (row order of the file)."""

    run_dir: Path
    classes: list[str]
    info: dict[str, Any]  # run.json (empty when absent)
    split: str
    paths: list[str]  # [N]
    folds: list[str]  # [N]
    fold_order: list[str]  # distinct folds, run.json order first
    labels: np.ndarray  # [N] int
    preds: np.ndarray  # [N] int
    probs: np.ndarray  # [N, K] float
    t_star: np.ndarray | None  # [N] float (NaN where empty) or None when the column is absent
    sigma_star: np.ndarray | None  # [N]
    extra: dict[str, list[str]]  # other columns, as text
    notes: list[str]

    @property
    def method(self) -> str:
        return str(self.info.get("method") or self.run_dir.name)

    def fold_indices(self, fold: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.folds, dtype=object) == fold)


def _class_index(value: str, classes: list[str], file: Path, line: int, column: str) -> int:
    text = value.strip()
    idx: int | None
    try:
        idx = int(text)
    except ValueError:
        try:
            number = float(text)
            idx = int(number) if number.is_integer() else None
        except ValueError:
            idx = None
    if idx is None:
        if text in classes:  # a class name instead of its index
            return classes.index(text)
        raise D2maeError(f"{file}, line {line}: column '{column}' must be a class index 0..{len(classes) - 1} "
                         f"or a class name, got {value!r}")
    if not 0 <= idx < len(classes):
        raise D2maeError(f"{file}, line {line}: column '{column}' = {idx} is outside 0..{len(classes) - 1} "
                         f"(classes: {classes})")
    return idx


def _float_cell(value: str, file: Path, line: int, column: str, allow_empty: bool) -> float:
    text = (value or "").strip()
    if not text and allow_empty:
        return math.nan
    try:
        out = float(text)
    except ValueError:
        raise D2maeError(f"{file}, line {line}: column '{column}' must be a number, got {value!r}") from None
    if not math.isfinite(out) and not allow_empty:
        raise D2maeError(f"{file}, line {line}: column '{column}' must be finite, got {value!r}")
    return out


def _fold_names(info: dict[str, Any]) -> list[str]:
    folds = info.get("folds")
    if not isinstance(folds, list):
        return []
    names = []
    for f in folds:
        if isinstance(f, dict) and "name" in f:
            names.append(str(f["name"]))
        elif isinstance(f, (str, int)):
            names.append(str(f))
    return names


def _read_run_json(run: Path) -> dict[str, Any]:
    """``RUN/run.json`` as a dict (``{}`` when absent)."""
    info: dict[str, Any] = {}
    run_file = run / RUN_JSON
    if run_file.is_file():
        try:
            info = json.loads(run_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise D2maeError(f"{run_file} is not valid JSON: {exc}") from None
        if not isinstance(info, dict):
            raise D2maeError(f"{run_file} must hold a JSON object with 'classes', 'protocol', 'folds', ...")
        for key, kind, what in (("classes", list, "a list of class names"), ("folds", list, "a list of folds"),
                                ("protocol", str, "a string"), ("method", str, "a string"), ("seed", int, "an integer"),
                                ("fold_details", list, "a list")):
            value = info.get(key)
            if key in info and value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise D2maeError(f"{run_file}: '{key}' must be {what}, got {shown(value)}")
    return info


def _check_columns(header: list[str], info: dict[str, Any], pred_file: Path, run_file: Path,
                   require_columns: Sequence[str], notes: list[str]) -> tuple[list[str], list[str]]:
    """The classes (from run.json, else the prob_ columns) and the prob_ columns, every column checked."""
    prob_cols = [h for h in header if h.startswith("prob_")]
    if "classes" in info:
        classes = info["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, (str, int)) for c in classes):
            raise D2maeError(f"{run_file}: 'classes' must be a list of class names")
        classes = [str(c) for c in classes]
        expected = [f"prob_{c}" for c in classes]
        missing_p = [c for c in expected if c not in header]
        if missing_p:
            raise D2maeError(f"{pred_file} is missing column(s) {missing_p} for the classes {classes} of {run_file}")
        extra_p = [c for c in prob_cols if c not in expected]
        if extra_p:
            raise D2maeError(f"{pred_file} has probability column(s) {extra_p} that are not classes of {run_file} "
                             f"({classes})")
    else:
        classes = [c[len("prob_"):] for c in prob_cols]
        notes.append(f"{run_file.name} not found or without 'classes': classes taken from the prob_ columns "
                     f"({classes})")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing or not prob_cols:
        need = list(missing) + ([] if prob_cols else ["prob_<class> (one per class)"])
        raise D2maeError(f"{pred_file} is missing column(s) {need}; expected path,fold,split,label,label_name,pred,"
                         "prob_<class>...,t_star,sigma_star")
    for col in require_columns:
        if col not in header:
            raise D2maeError(f"{pred_file} has no column '{col}' (asked for by --group-by); its columns are "
                             f"{header}")
    if len(classes) < 2:
        raise D2maeError(f"{run_file if 'classes' in info else pred_file}: only one class {classes}; "
                         "classification metrics need at least 2 classes")
    return classes, prob_cols


def _parse_rows(selected: list[tuple[int, dict[str, str]]], header: list[str], classes: list[str],
                prob_cols: list[str], pred_file: Path, split: str) -> dict[str, Any]:
    """The selected rows as arrays, every cell checked (one image once per fold, probabilities that sum to 1)."""
    k = len(classes)
    prob_names = [f"prob_{c}" for c in classes]
    n = len(selected)
    labels = np.empty(n, dtype=np.int64)
    preds = np.empty(n, dtype=np.int64)
    probs = np.empty((n, k), dtype=np.float64)
    has_t, has_s = "t_star" in header, "sigma_star" in header
    t_star = np.full(n, np.nan) if has_t else None
    sigma_star = np.full(n, np.nan) if has_s else None
    known = set(REQUIRED_COLUMNS) | set(prob_cols) | {"label_name", "t_star", "sigma_star"}
    extra_cols = [h for h in header if h not in known]
    extra: dict[str, list[str]] = {c: [] for c in extra_cols}
    paths, folds = [], []
    seen: dict[tuple[str, str], int] = {}
    for j, (line, r) in enumerate(selected):
        path, fold = (r.get("path") or "").strip(), (r.get("fold") or "").strip()
        if not path:
            raise D2maeError(f"{pred_file}, line {line}: empty 'path'")
        if (fold, path) in seen:
            raise D2maeError(f"{pred_file}, line {line}: image {path} appears twice in fold '{fold}' of split "
                             f"'{split}' (first on line {seen[(fold, path)]})")
        seen[(fold, path)] = line
        paths.append(path)
        folds.append(fold)
        labels[j] = _class_index(r.get("label") or "", classes, pred_file, line, "label")
        preds[j] = _class_index(r.get("pred") or "", classes, pred_file, line, "pred")
        name = (r.get("label_name") or "").strip()
        if name and name != classes[labels[j]]:
            raise D2maeError(f"{pred_file}, line {line}: label {labels[j]} is class '{classes[labels[j]]}' but "
                             f"label_name says '{name}'")
        for c, col in enumerate(prob_names):
            probs[j, c] = _float_cell(r.get(col) or "", pred_file, line, col, allow_empty=False)
        if probs[j].min() < -1e-6 or probs[j].max() > 1 + 1e-6 or abs(probs[j].sum() - 1.0) > _PROB_SUM_TOL:
            raise D2maeError(f"{pred_file}, line {line}: the prob_ columns must be probabilities in [0, 1] that sum "
                             f"to 1, got {probs[j].round(4).tolist()} (logits instead of softmax?)")
        if t_star is not None:
            t_star[j] = _float_cell(r.get("t_star") or "", pred_file, line, "t_star", allow_empty=True)
        if sigma_star is not None:
            sigma_star[j] = _float_cell(r.get("sigma_star") or "", pred_file, line, "sigma_star", allow_empty=True)
        for c in extra_cols:
            extra[c].append((r.get(c) or "").strip())
    return {"paths": paths, "folds": folds, "labels": labels, "preds": preds, "probs": probs, "t_star": t_star,
            "sigma_star": sigma_star, "extra": extra}


def load_predictions(run_dir: str | Path, split: str = "test",
                     require_columns: Sequence[str] = ()) -> RunPredictions:
    """Read and check ``RUN/predictions.csv`` (+ ``RUN/run.json``) and keep the rows of ``split``.

    Every problem (missing folder/file/column, bad cell, label outside the classes, probabilities that do not sum to
    1, duplicate test images, a single class) raises :class:`D2maeError` naming the file, line or column.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise D2maeError(f"run folder {run} does not exist; pass the --out folder of `d2mae finetune`")
    pred_file = run / PREDICTIONS
    if not pred_file.is_file():
        raise D2maeError(f"{pred_file} not found; a run folder needs the predictions.csv written by `d2mae finetune`")
    notes: list[str] = []
    info = _read_run_json(run)
    with pred_file.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = list(reader)
    if not header:
        raise D2maeError(f"{pred_file} is empty; expected a header row path,fold,split,label,pred,prob_<class>,...")
    classes, prob_cols = _check_columns(header, info, pred_file, run / RUN_JSON, require_columns, notes)
    selected = [(i, r) for i, r in enumerate(rows, start=2) if (r.get("split") or "").strip() == split]
    if not selected:
        found = sorted({(r.get("split") or "").strip() for r in rows})
        raise D2maeError(f"{pred_file} has no rows with split == '{split}' (splits found: {found}); "
                         "choose one with --split")
    parsed = _parse_rows(selected, header, classes, prob_cols, pred_file, split)
    labels, preds, probs, folds = parsed["labels"], parsed["preds"], parsed["probs"], parsed["folds"]
    if np.unique(labels).size < 2:
        raise D2maeError(f"{pred_file}: every '{split}' image has the label '{classes[labels[0]]}'; metrics such "
                         "as AUROC and balanced accuracy need at least two classes in the evaluated split")
    differ = int((np.argmax(probs, axis=1) != preds).sum())
    if differ:
        notes.append(f"'pred' differs from the argmax of the prob_ columns on {differ} row(s); ACC/F1 use 'pred', "
                     "AUROC uses the probabilities")
    order = [f for f in _fold_names(info) if f in set(folds)]
    order += [f for f in dict.fromkeys(folds) if f not in order]
    return RunPredictions(run, classes, info, split, parsed["paths"], folds, order, labels, preds, probs,
                          parsed["t_star"], parsed["sigma_star"], parsed["extra"], notes)

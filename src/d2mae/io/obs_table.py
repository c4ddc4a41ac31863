"""The OBS table: each image's t* (and the losses behind it), written once per data set and model, checked on reuse.

``obs.csv`` holds one row per image — path, content hash, t*, σ* (shown for people; derived from t* and the schedule),
the deblurring loss at every searched level — and ``obs.json`` the settings: the OBS spec, the model's blur schedule
and sha256, the image size, timing. Fine-tuning and prediction reuse the table; a table made with another model,
other settings, another image size, or for images whose content changed is refused (:meth:`ObsTable.lookup`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from d2mae.method.blur import BlurSchedule
from d2mae.method.obs import ObsSpec
from d2mae.runtime.errors import D2maeError, shown
from d2mae.runtime.files import atomic_write_json, atomic_write_text, csv_text

OBS_FORMAT = "d2mae-obs"
OBS_FORMAT_VERSION = 1
TABLE_NAME = "obs.csv"
META_NAME = "obs.json"


#: The fields of ``obs.json`` and their JSON types (``None``: may be null).
_META_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,), "mode": (str,), "search_step": (int,), "sigma": (int, float, type(None)),
    "model_sha256": (str,), "img_size": (int, type(None)), "in_chans": (int, type(None)), "schedule": (dict,),
}


def _check_meta(meta: dict, path: Path) -> None:
    """Each known field of ``obs.json`` has its type (a bool is not a number): else one error naming the key."""
    for key, kinds in _META_TYPES.items():
        value = meta.get(key)
        if key not in meta and type(None) in kinds:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds):
            expected = " or ".join(sorted({"null" if k is type(None) else {int: "an integer", float: "a number",
                                           str: "a string", dict: "an object"}[k] for k in kinds}))
            raise D2maeError(f"{path}: '{key}' must be {expected}, got {shown(value)}; rerun `d2mae obs`")


def _number(row: dict, column: str, path: Path, line: int) -> float:
    try:
        return float(row[column])
    except (TypeError, ValueError, KeyError):
        raise D2maeError(f"OBS table {path}, line {line}: column '{column}' must be a number, got "
                         f"{shown(row.get(column))}; rerun `d2mae obs`") from None


@dataclass
class ObsTable:
    """One row per image: path, content hash, t*, and the deblurring loss at each searched level.

    Attributes:
        paths: image references.
        hashes: content hashes (:func:`d2mae.data.decode.content_hash`).
        t_star: chosen level per image [n] (float: a ``fixed`` σ may fall between grid levels; 0 = no blur).
        levels: the searched levels t (empty unless ``mode == "search"``).
        losses: L_deblur^(t) per image and searched level [n, L].
        meta: the OBS spec (:meth:`ObsSpec.to_dict`), ``schedule`` (:meth:`BlurSchedule.to_dict`), the model's
            sha256, image size, timing.
    """

    paths: list[str]
    hashes: list[str]
    t_star: np.ndarray
    levels: list[int] = field(default_factory=list)
    losses: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def spec(self) -> ObsSpec:
        return ObsSpec.from_dict(self.meta, META_NAME)

    @property
    def schedule(self) -> BlurSchedule:
        return BlurSchedule.from_dict(self.meta["schedule"])

    @property
    def sigma_star(self) -> np.ndarray:
        """σ_{t*} per image [n], from the model's schedule (for tables and figures; the model takes t)."""
        return sigmas_of(self.schedule, self.t_star)

    @property
    def searched_sigmas(self) -> list[float]:
        """σ of each searched level."""
        return sigmas_of(self.schedule, np.asarray(self.levels, dtype=np.float64)).tolist()

    def rows(self) -> list[dict[str, Any]]:
        sigma = self.sigma_star
        out = []
        for i, p in enumerate(self.paths):
            row: dict[str, Any] = {"path": p, "content_hash": self.hashes[i], "t_star": _num(self.t_star[i]),
                                   "sigma_star": _num(sigma[i])}
            for j, t in enumerate(self.levels):
                row[f"loss_t{t}"] = f"{float(self.losses[i, j]):.6g}"
            out.append(row)
        return out

    def save(self, out_dir: str | Path) -> Path:
        """Write ``obs.csv`` and ``obs.json`` atomically into ``out_dir``; returns the CSV path."""
        out_dir = Path(out_dir)
        fields = ["path", "content_hash", "t_star", "sigma_star"] + [f"loss_t{t}" for t in self.levels]
        atomic_write_text(out_dir / TABLE_NAME, csv_text(fields, self.rows()))
        atomic_write_json(out_dir / META_NAME, {"format": OBS_FORMAT, "format_version": OBS_FORMAT_VERSION,
                                                **self.meta, "levels": list(self.levels), "n_images": len(self)})
        return out_dir / TABLE_NAME

    @classmethod
    def load(cls, path: str | Path) -> "ObsTable":
        """Read a table from ``obs.csv`` (with ``obs.json`` beside it) or from the folder holding both."""
        path = Path(path)
        if path.is_dir():
            path = path / TABLE_NAME
        meta_path = path.parent / META_NAME
        if not path.is_file():
            raise D2maeError(f"OBS table {path} does not exist; run `d2mae obs` first or drop the table option")
        if not meta_path.is_file():
            raise D2maeError(f"OBS table {path} has no {META_NAME} beside it; it cannot be checked against the model "
                             "— rerun `d2mae obs`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise D2maeError(f"{meta_path} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != OBS_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise D2maeError(f"{meta_path} is not a d2mae OBS table description (format {found!r})")
        _check_meta(meta, meta_path)
        if meta["format_version"] > OBS_FORMAT_VERSION:
            raise D2maeError(f"{meta_path}: OBS table version {meta.get('format_version')} is newer than this d2mae "
                             "reads; upgrade d2mae or rerun `d2mae obs`")
        if not isinstance(meta.get("schedule"), dict):
            raise D2maeError(f"{meta_path} records no blur schedule; rerun `d2mae obs`")
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = reader.fieldnames or []
        need = {"path", "content_hash", "t_star"}
        if not need.issubset(header):
            raise D2maeError(f"OBS table {path} lacks column(s) {', '.join(sorted(need - set(header)))}")
        levels = [int(h[len("loss_t"):]) for h in header if h.startswith("loss_t")]
        losses = np.array([[_number(r, f"loss_t{t}", path, i) for t in levels] for i, r in enumerate(rows, 2)],
                          dtype=np.float64)
        t_star = np.array([_number(r, "t_star", path, i) for i, r in enumerate(rows, 2)], dtype=np.float64)
        meta.pop("levels", None)
        meta.pop("n_images", None)
        meta["table"] = str(path)
        return cls([r["path"] for r in rows], [r["content_hash"] for r in rows], t_star, levels,
                   losses.reshape(len(rows), len(levels)), meta)

    def lookup(self, refs: Sequence[str], hashes: Sequence[str], model_hash: str | None = None,
               spec: ObsSpec | None = None, img_size: int | None = None) -> np.ndarray:
        """t* [n] for ``refs`` (matched by content hash), refusing a stale table.

        Raises:
            D2maeError: another model (sha256), other settings or image size, images whose content changed since the
                table was written, or images the table lacks.
        """
        where = f"OBS table {self.meta.get('table', '')}".rstrip()
        if model_hash is not None and self.meta.get("model_sha256") != model_hash:
            raise D2maeError(f"{where} was computed with another pre-trained model (sha256 "
                             f"{str(self.meta.get('model_sha256'))[:12]}…, this one {model_hash[:12]}…); rerun "
                             "`d2mae obs` with this model or drop the table")
        if spec is not None and self.spec.to_dict() != spec.to_dict():  # the step matters only to a search
            raise D2maeError(f"{where} was made with OBS {self.spec.describe()}, but {spec.describe()} was asked "
                             "for; rerun `d2mae obs` with these settings or change the OBS setting")
        if img_size is not None and self.meta.get("img_size") not in (None, img_size):
            raise D2maeError(f"{where} was made at image size {self.meta.get('img_size')}, this model takes "
                             f"{img_size}; rerun `d2mae obs`")
        by_hash = {h: i for i, h in enumerate(self.hashes)}
        by_path = {p: h for p, h in zip(self.paths, self.hashes)}
        idx, changed, missing = [], [], []
        for ref, h in zip(refs, hashes):
            i = by_hash.get(h)
            if i is None:
                (changed if ref in by_path else missing).append(ref)
            idx.append(i)
        if changed:
            raise D2maeError(f"{where}: {len(changed)} image(s) changed since the table was written (content hash "
                             f"differs; first: {changed[0]}); rerun `d2mae obs`")
        if missing:
            raise D2maeError(f"{where} lacks {len(missing)} of the {len(refs)} images (first: {missing[0]}); rerun "
                             "`d2mae obs` on all of them")
        return self.t_star[np.array(idx, dtype=np.int64)]


def sigmas_of(schedule: BlurSchedule, t: np.ndarray) -> np.ndarray:
    """σ_t of levels ``t`` [n] (float64, rounded to 6 decimals for display and CSV)."""
    return schedule.sigma(torch.as_tensor(np.asarray(t, dtype=np.float64))).double().numpy().round(6)


def _num(x: float) -> str:
    return f"{float(x):.6g}"

"""``d2mae view``: a static page per run that a person looks through — every image as a thumbnail with its numbers,
and for one image its blur search (the blurred input and the model's restoration at each searched level, the
difference, the loss against t with t* marked), its class probabilities or its masks.

A page is a folder that opens from disk (``file://``) with no server and no network: ``index.html``, ``assets/``
(the page's script and style, shipped inside the package), ``data.js`` (every image's numbers, one JSON object: a
script rather than a ``.json`` file, because browsers refuse to fetch local files) and ``img/`` (PNG thumbnails,
search strips and mask outlines). It can be zipped and shared.

A run is any output folder that holds images: an OBS table (``d2mae obs``), a fine-tuning or segmentation run, a
``predict`` output (a predictions CSV, or a masks folder), or an experiment (a page per dataset and method, a page
comparing D²MAE with MAE, and an index). Given two runs over the same images, one page shows both side by side and
marks where they disagree.

Bounded work: thumbnails are made for every test image; the restorations, for at most ``max_images`` of them (the
first in the run's order), batched on the device (:func:`d2mae.view.images.restorations`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from d2mae.data.dataset import ImageDataset
from d2mae.data.decode import load_image
from d2mae.io.artifacts import load_pretrained
from d2mae.io.obs_table import META_NAME, TABLE_NAME
from d2mae.io.predictions import PREDICTIONS, RUN_JSON
from d2mae.method.models import DeblurMAE
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_bytes, atomic_write_text, read_csv_rows
from d2mae.runtime.options import saved_value
from d2mae.segment.files import PER_IMAGE, PREDICTIONS_DIR, mask_name, read_per_image
from d2mae.segment.masks import read_mask
from d2mae.segment.predict import MASKS_CSV
from d2mae.view.images import overlay, restorations, strip, thumbnail

MAX_IMAGES = 500  # restorations per page by default (a thumbnail is made for every image)
DATA = "data.js"
GROUP_COLUMNS = ("Device", "device", "scanner", "Scanner", "class", "Class")  # shown as the group filter
ASSETS = ("index.html", "viewer.js", "viewer.css")


@dataclass
class RunView:
    """One run's images and numbers, read from its folder: ``kind`` is ``classify``, ``segment``, ``obs`` or
    ``predict``; ``rows`` one dict per image (its ``path`` first); ``obs`` the OBS table's folder, if any;
    ``pretrained`` the pre-trained folder whose restorations the page shows, if any."""

    name: str
    kind: str
    folder: Path
    rows: list[dict[str, Any]]
    classes: list[str] = field(default_factory=list)
    obs: Path | None = None
    pretrained: Path | None = None
    num_classes: int = 2


def _first_existing(*paths: Any) -> Path | None:
    return next((Path(p) for p in paths if p and Path(p).is_dir()), None)


def _group(row: dict[str, Any]) -> str:
    return next((str(row[c]) for c in GROUP_COLUMNS if row.get(c) not in (None, "")), "")


def read_run(path: str | Path) -> RunView:
    """A run folder (or predictions CSV) as the images and numbers a page shows; one clear error for anything else.

    Raises:
        D2maeError: a path that is not an output of d2mae holding images, naming it.
    """
    path = Path(path)
    run_json = path / RUN_JSON
    if path.is_file() and path.suffix == ".csv":
        rows = read_csv_rows(path)
        if not rows or not {"path", "pred"} <= set(rows[0]):
            raise D2maeError(f"{path} is not a prediction table of d2mae predict (path,pred,prob_…); give a run folder")
        classes = [k[len("prob_"):] for k in rows[0] if k.startswith("prob_")]
        return RunView(path.stem, "predict", path.parent, rows, classes)
    if (path / MASKS_CSV).is_file():
        rows = read_csv_rows(path / MASKS_CSV)
        for r in rows:
            r["overlay_mask"] = str(path / r["mask"])
        return RunView(path.name, "predict", path, rows)
    if (path / PER_IMAGE).is_file() and run_json.is_file():
        info = json.loads(run_json.read_text(encoding="utf-8"))
        rows = [r for r in read_per_image(path) if r["split"] == "test"]
        pretrained = _first_existing(info.get("pretrained"), path / "fold_1" / "model" / "pretrained")
        return RunView(str(saved_value(info, "method", str, str(run_json), path.name)), "segment", path, rows,
                       obs=path / "obs" if (path / "obs" / TABLE_NAME).is_file() else None, pretrained=pretrained,
                       num_classes=saved_value(info, "num_classes", int, str(run_json), 2, low=2))
    if (path / PREDICTIONS).is_file():
        info = json.loads(run_json.read_text(encoding="utf-8")) if run_json.is_file() else {}
        rows = [r for r in read_csv_rows(path / PREDICTIONS) if r.get("split") == "test"]
        classes = [str(c) for c in info.get("classes") or [k[len("prob_"):] for k in rows[0] if
                                                            k.startswith("prob_")]] if rows else []
        pretrained = _first_existing(info.get("pretrained"), path / "fold_1" / "model" / "pretrained")
        return RunView(str(info.get("method") or path.name), "classify", path, rows, classes,
                       obs=path / "obs" if (path / "obs" / TABLE_NAME).is_file() else None, pretrained=pretrained)
    if (path / TABLE_NAME).is_file() and (path / META_NAME).is_file():
        meta = json.loads((path / META_NAME).read_text(encoding="utf-8"))
        return RunView(path.name, "obs", path, read_csv_rows(path / TABLE_NAME), obs=path,
                       pretrained=_first_existing(meta.get("model_dir")))
    raise D2maeError(f"{path} holds no images d2mae can show: give an OBS table folder, a fine-tuning or segmentation "
                     "run, a predict output or an experiment folder")


def _obs_rows(folder: Path | None) -> tuple[list[int], dict[str, dict[str, str]]]:
    """An OBS table's searched levels and its rows by image path."""
    if folder is None:
        return [], {}
    meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
    levels = [int(t) for t in meta.get("levels") or []]
    return levels, {r["path"]: r for r in read_csv_rows(folder / TABLE_NAME)}


def _entry(run: RunView, row: dict[str, Any]) -> dict[str, Any]:
    """The numbers one run shows for one image."""
    out: dict[str, Any] = {"t": _num(row.get("t_star")), "sigma": _num(row.get("sigma_star"))}
    if run.kind in ("classify", "predict") and run.classes:
        probs = [_num(row.get(f"prob_{c}")) for c in run.classes]
        pred = row.get("pred", "")
        pred_name = run.classes[int(pred)] if str(pred).isdigit() and int(pred) < len(run.classes) else str(pred)
        out.update(probs=probs, pred=pred_name, conf=max(probs) if probs else None)
        if "label_name" in row:
            out.update(truth=row["label_name"], correct=row["label_name"] == pred_name)
    if run.kind == "segment":
        out.update({k: _num(row.get(k)) for k in ("dice", "iou", "hd95")})
        out.update(truth_pixels=int(row["truth_pixels"]), lesion_pixels=int(row["lesion_pixels"]),
                   truth=row.get("class") or ("lesion" if int(row["truth_pixels"]) else "no lesion"))
    if run.kind == "predict" and "lesion_pixels" in row:
        out.update(lesion_pixels=int(row["lesion_pixels"]))
    return out


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _truth_and_prediction(run: RunView, row: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A segmentation's masks of one image (class indices at its own size), or ``(None, None)``."""
    if run.kind == "segment":
        pred_path = run.folder / PREDICTIONS_DIR / mask_name(row["id"])
        return read_mask(row["mask"], run.num_classes), read_mask(str(pred_path), run.num_classes)
    if "overlay_mask" in row:
        return None, read_mask(row["overlay_mask"], 256)
    return None, None


def build(runs: Sequence[str | Path], out: str | Path, *, max_images: int = MAX_IMAGES,
          device: torch.device = torch.device("cpu"), progress: bool = True, title: str | None = None) -> Path:
    """Write one page for ``runs`` (one run, or two over the same images) into ``out``; returns ``index.html``.

    Raises:
        D2maeError: a run that is not one, or two runs that share no image.
    """
    views = [read_run(r) for r in runs]
    out = Path(out)
    paths = [r["path"] for r in views[0].rows]
    if len(views) > 1:
        common = set(paths).intersection(*({r["path"] for r in v.rows} for v in views[1:]))
        if not common:
            raise D2maeError(f"{runs[0]} and {runs[1]} share no image; compare runs over the same images")
        paths = [p for p in paths if p in common]
    by_run = [{r["path"]: r for r in v.rows} for v in views]
    levels, obs_rows = _obs_rows(next((v.obs for v in views if v.obs is not None), None))
    items = []
    for k, path in enumerate(tqdm(paths, desc="view: images", unit="image", disable=not progress)):
        rows = [b[path] for b in by_run]
        image = load_image(path)
        atomic_write_bytes(out / "img" / f"{k}.png", thumbnail(image))
        item: dict[str, Any] = {"k": k, "path": path, "name": Path(path.split("#")[0]).name,
                                "fold": str(rows[0].get("fold", "")), "group": _group(rows[0]),
                                "runs": [_entry(v, r) for v, r in zip(views, rows)]}
        for j, (v, r) in enumerate(zip(views, rows)):
            truth, pred = _truth_and_prediction(v, r)
            if pred is not None:
                atomic_write_bytes(out / "img" / f"{k}-mask{j}.png", overlay(image, truth, pred))
                item["runs"][j]["overlay"] = f"img/{k}-mask{j}.png"
        if path in obs_rows and levels:
            item["losses"] = [_num(obs_rows[path].get(f"loss_t{t}")) for t in levels]
        items.append(item)
    meta = _search_strips(views, items, levels, out, max_images, device, progress)
    data = {"title": title or " vs ".join(v.name for v in views), "runs": [
        {"name": v.name, "kind": v.kind, "classes": v.classes, "folder": str(v.folder)} for v in views],
        "levels": levels, **meta, "items": items}
    atomic_write_text(out / DATA, "window.D2MAE_VIEW = " + json.dumps(data, separators=(",", ":")) + ";\n")
    for name in ASSETS:
        target = out / name if name == "index.html" else out / "assets" / name
        atomic_write_bytes(target, (resources.files("d2mae.view") / "assets" / name).read_bytes())
    return out / "index.html"


def _search_strips(views: Sequence[RunView], items: list[dict[str, Any]], levels: list[int], out: Path,
                   max_images: int, device: torch.device, progress: bool) -> dict[str, Any]:
    """The blur search of the first ``max_images`` images: a strip PNG each, and the σ of every searched level."""
    folder = next((v.pretrained for v in views if v.pretrained is not None), None)
    if not levels or folder is None:
        return {"sigmas": [], "restored": 0}
    model = load_pretrained(folder, device)
    if not isinstance(model, DeblurMAE):
        return {"sigmas": [], "restored": 0}
    cfg, chosen = model.config, items[:max_images]
    data = ImageDataset([it["path"] for it in chosen], cfg.img_size, cfg.in_chans, augment="none")
    chunk = 32
    starts = range(0, len(chosen), chunk)
    for start in tqdm(starts, desc="view: restorations", unit="batch", disable=not (progress and len(starts) > 1)):
        batch = chosen[start:start + chunk]
        x = torch.stack([data[start + i][0] for i in range(len(batch))])  # [B, C, S, S], OBS's view
        blurred, restored, _ = restorations(model, x, levels, device)
        for i, it in enumerate(batch):
            atomic_write_bytes(out / "img" / f"{it['k']}-search.png", strip(x[i], blurred[i], restored[i]))
            it["search"] = f"img/{it['k']}-search.png"
    return {"sigmas": [round(float(s), 4) for s in model.schedule.sigma(torch.tensor(levels, dtype=torch.float32))],
            "restored": len(chosen), "image_size": cfg.img_size}


def write_index(pages: Sequence[tuple[str, Path]], out: Path, title: str) -> Path:
    """A page of links to view pages (an experiment's): ``pages`` is (label, index.html) in order."""
    links = "\n".join(f'<li><a href="{p.relative_to(out).as_posix()}">{_html(label)}</a></li>' for label, p in pages)
    atomic_write_text(out / "index.html", f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_html(title)}</title>
<link rel="stylesheet" href="{pages[0][1].parent.relative_to(out).as_posix()}/assets/viewer.css"></head>
<body><main class="index"><h1>{_html(title)}</h1><ul>
{links}
</ul></main></body></html>
""")
    return out / "index.html"


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def build_experiment(folder: str | Path, out: str | Path, **options: Any) -> Path:
    """A page for every finished fine-tuning or segmentation run of an experiment (``plan.json``), a page comparing
    D²MAE with MAE per dataset and seed, and an index of them in ``out``; returns the index."""
    folder, out = Path(folder), Path(out)
    stages = json.loads((folder / "plan.json").read_text(encoding="utf-8"))["stages"]
    pages: list[tuple[str, Path]] = []
    runs: dict[tuple[str, int, str], Path] = {}
    for s in stages:
        if s["kind"] not in ("finetune", "segment"):
            continue
        run = Path(s["folder"])
        try:
            read_run(run)
        except (D2maeError, OSError, ValueError):
            continue  # not finished
        name = f"{s['dataset']}-{s['method']}-seed{s['seed']}".replace(":", "-")
        title = f"{s['method']} on {s['dataset']} (seed {s['seed']})"
        pages.append((title, build([run], out / name, title=title, **options)))
        runs[(s["dataset"], s["seed"], s["method"])] = run
    for (dataset, seed, method), run in list(runs.items()):
        if method == "d2mae" and (dataset, seed, "mae") in runs:
            title = f"D²MAE vs MAE on {dataset} (seed {seed})"
            pages.append((title, build([run, runs[(dataset, seed, "mae")]], out / f"{dataset}-d2mae-vs-mae-seed{seed}",
                                       title=title, **options)))
    if not pages:
        raise D2maeError(f"{folder} holds no finished fine-tuning or segmentation run to show yet")
    return write_index(pages, out, f"d2mae views: {folder.name}")

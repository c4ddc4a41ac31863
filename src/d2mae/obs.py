"""Optimal blurriness search (OBS): the best blur level t* of every image (Section 2.3, Eqs. 4-5, Algorithm 1 l. 4-10).

For an image x (its deterministic view: shorter side resized, centre crop) and each searched level
t ∈ {1, 1+s, 1+2s, …, T}, the pre-trained D²MAE deblurs x_b^(t) = G_{σ_t}(x) with mask ratio 0 and condition t::

    x̂^(t) = P_θ(x_b^(t), t, mask ratio = 0)                        (Eq. 4)
    t*     = argmin_t ‖x̂^(t) − x‖²,   σ_optimal = σ_{t*}           (Eq. 5; ties go to the smaller t)

OBS runs once, before fine-tuning, and its result is a table (``obs.csv``: path, content hash, t*, σ*, the loss
at every searched level) plus ``obs.json`` (the pre-trained model's sha256 and the settings). Fine-tuning and
prediction reuse the table; a table made with another model, other settings, or for images whose content changed is
refused (:meth:`ObsTable.lookup`).

Batching: every searched level of a batch of images goes through the model in one forward pass — the batch is
repeated over the L levels to ``[B·L, C, H, W]`` with t repeated to match (chunked to bound memory), and the per-image
losses come back as ``[B, L]``. There is no Python loop over images or levels.

More than one process: under torchrun (``torchrun --nproc_per_node N -m d2mae obs …``, and the OBS that
``d2mae finetune`` runs) each rank searches its own contiguous block of the images
(:func:`d2mae.distributed.eval_indices`) and the blocks are gathered back in order
(:func:`d2mae.distributed.gather_ordered`), so every rank holds the whole table, each image searched once; only rank
0 writes files. The table is the one a single process makes.

Table 3c's settings: ``search`` (the full OBS), ``none`` (no blur, t = 0 for every image) and ``fixed:SIGMA`` (one σ
for every image, t = schedule.level_of(σ), possibly between grid levels). Table 3d: the search step s.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from d2mae.artifacts import load_pretrained
from d2mae.blur import gaussian_blur
from d2mae.config import add_arguments, config_from_cli, save_config
from d2mae.data import ImageDataset, check_images, content_hashes, find_images
from d2mae.distributed import (DistContext, barrier, distributed_run, eval_indices, gather_ordered,
                               gather_ordered_objects, on_main)
from d2mae.errors import D2maeError
from d2mae.labels import load_labeled
from d2mae.models import DeblurMAE
from d2mae.runtime import amp_dtype, atomic_write_json, atomic_write_text, autocast, eval_mode, file_sha256

OBS_FORMAT = "d2mae-obs"
OBS_FORMAT_VERSION = 1
TABLE_NAME = "obs.csv"
META_NAME = "obs.json"
OBS_MODES = ("search", "none", "fixed")


# ------------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class ObsSpec:
    """What OBS does: ``search`` (Eq. 5, step ``search_step``), ``none`` (t = 0) or ``fixed`` (one σ for all)."""

    mode: str = "search"
    search_step: int = 2
    sigma: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "search_step": self.search_step if self.mode == "search" else None,
                "sigma": self.sigma}

    def describe(self) -> str:
        if self.mode == "search":
            return f"search (s = {self.search_step})"
        return "none (no blur)" if self.mode == "none" else f"fixed σ = {self.sigma:g}"


def parse_obs(spec: str, search_step: int = 2) -> ObsSpec:
    """``"search"`` / ``"none"`` / ``"fixed:0.5"`` -> :class:`ObsSpec` (option ``--obs``)."""
    text = str(spec).strip().lower()
    if search_step < 1:
        raise D2maeError(f"option --search-step must be an integer ≥ 1, got {search_step}")
    if text == "search":
        return ObsSpec("search", search_step)
    if text == "none":
        return ObsSpec("none", search_step)
    if text.startswith("fixed:"):
        try:
            sigma = float(text.split(":", 1)[1])
        except ValueError:
            sigma = float("nan")
        if not math.isfinite(sigma) or sigma < 0:
            raise D2maeError(f"option --obs {spec}: σ must be a number ≥ 0, e.g. fixed:0.5")
        return ObsSpec("fixed", search_step, sigma)
    raise D2maeError(f"option --obs: unknown value '{spec}'; use search, none or fixed:SIGMA (e.g. fixed:0.5)")


def model_sha256(folder: str | Path) -> str:
    """Identity of a pre-trained folder: sha256 of its ``model.safetensors``."""
    path = Path(folder) / "model.safetensors"
    try:
        return file_sha256(path)
    except OSError as exc:
        raise D2maeError(f"cannot read {path}: {exc}") from None


# --------------------------------------------------------------------------------------------------------- table


@dataclass
class ObsTable:
    """One row per image: path, content hash, t*, σ*, and the deblurring loss at each searched level.

    Attributes:
        paths: image references.
        hashes: content hashes (:func:`d2mae.data.content_hash`).
        t_star: chosen level per image [n] (float: ``fixed`` σ may fall between grid levels; 0 = no blur).
        sigma_star: σ_{t*} per image [n].
        levels: the searched levels t (empty unless ``mode == "search"``).
        losses: L_deblur^(t) per image and searched level [n, L].
        meta: model sha256, settings, schedule, image size, timing.
    """

    paths: list[str]
    hashes: list[str]
    t_star: np.ndarray
    sigma_star: np.ndarray
    levels: list[int] = field(default_factory=list)
    losses: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def spec(self) -> ObsSpec:
        m = self.meta
        return ObsSpec(m.get("mode", "search"), int(m.get("search_step") or 2), m.get("sigma"))

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for i, p in enumerate(self.paths):
            row: dict[str, Any] = {"path": p, "content_hash": self.hashes[i], "t_star": _num(self.t_star[i]),
                                   "sigma_star": _num(self.sigma_star[i])}
            for j, t in enumerate(self.levels):
                row[f"loss_t{t}"] = f"{float(self.losses[i, j]):.6g}"
            out.append(row)
        return out

    def save(self, out_dir: str | Path) -> Path:
        """Write ``obs.csv`` and ``obs.json`` atomically into ``out_dir``; returns the CSV path."""
        out_dir = Path(out_dir)
        buf = io.StringIO()
        fields = ["path", "content_hash", "t_star", "sigma_star"] + [f"loss_t{t}" for t in self.levels]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        atomic_write_text(out_dir / TABLE_NAME, buf.getvalue())
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
            raise D2maeError(f"OBS table {path} does not exist; run `d2mae obs` first or drop --obs-table")
        if not meta_path.is_file():
            raise D2maeError(f"OBS table {path} has no {META_NAME} beside it; it cannot be checked against the model "
                             "— rerun `d2mae obs`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise D2maeError(f"{meta_path} is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != OBS_FORMAT:
            raise D2maeError(f"{meta_path} is not a d2mae OBS table description (format {meta.get('format')!r})")
        if int(meta.get("format_version", 0)) > OBS_FORMAT_VERSION:
            raise D2maeError(f"{meta_path}: OBS table version {meta.get('format_version')} is newer than this d2mae "
                             "reads; upgrade d2mae or rerun `d2mae obs`")
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = reader.fieldnames or []
        need = {"path", "content_hash", "t_star", "sigma_star"}
        if not need.issubset(header):
            raise D2maeError(f"OBS table {path} lacks column(s) {', '.join(sorted(need - set(header)))}")
        levels = [int(h[len("loss_t"):]) for h in header if h.startswith("loss_t")]
        try:
            losses = np.array([[float(r[f"loss_t{t}"]) for t in levels] for r in rows], dtype=np.float64)
            t_star = np.array([float(r["t_star"]) for r in rows], dtype=np.float64)
            sigma_star = np.array([float(r["sigma_star"]) for r in rows], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise D2maeError(f"OBS table {path} has a non-numeric value ({exc}); rerun `d2mae obs`") from None
        meta.pop("levels", None)
        meta.pop("n_images", None)
        meta["table"] = str(path)
        return cls([r["path"] for r in rows], [r["content_hash"] for r in rows], t_star, sigma_star, levels,
                   losses.reshape(len(rows), len(levels)), meta)

    def lookup(self, refs: Sequence[str], hashes: Sequence[str], model_hash: str | None = None,
               spec: ObsSpec | None = None, img_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """t* and σ* [n] for ``refs`` (matched by content hash), refusing a stale table.

        Raises:
            D2maeError: another model (sha256), other settings or image size, images whose content changed since the
                table was written, or images the table lacks.
        """
        where = f"OBS table {self.meta.get('table', '')}".rstrip()
        if model_hash is not None and self.meta.get("model_sha256") != model_hash:
            raise D2maeError(f"{where} was computed with another pre-trained model (sha256 "
                             f"{str(self.meta.get('model_sha256'))[:12]}…, this one {model_hash[:12]}…); rerun "
                             "`d2mae obs` with this model or drop --obs-table")
        if spec is not None and self.spec.to_dict() != spec.to_dict():
            raise D2maeError(f"{where} was made with OBS {self.spec.describe()}, but {spec.describe()} was asked "
                             "for; rerun `d2mae obs` with these settings or change --obs/--search-step")
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
        sel = np.array(idx, dtype=np.int64)
        return self.t_star[sel], self.sigma_star[sel]


def _num(x: float) -> str:
    return f"{float(x):.6g}"


# ---------------------------------------------------------------------------------------------------------- search


def search_losses(model: DeblurMAE, x: torch.Tensor, levels: Sequence[int], max_rows: int | None = None
                  ) -> torch.Tensor:
    """L_deblur^(t) for every image and every level, all levels of the batch in one pass (Eq. 4).

    Args:
        model: the pre-trained D²MAE (eval mode).
        x: original images [B, C, H, W] in [0, 1], on the model's device.
        levels: searched levels t (L of them).
        max_rows: at most this many (image, level) pairs per forward pass (``None``: all B·L at once).

    Returns:
        Per-image MSE [B, L] (fp32).
    """
    b, n_levels = x.shape[0], len(levels)
    xr = x.unsqueeze(1).expand(b, n_levels, *x.shape[1:]).reshape(b * n_levels, *x.shape[1:])  # [B·L, C, H, W]
    tr = torch.tensor(list(levels), dtype=torch.float32, device=x.device).repeat(b)  # [B·L], image-major
    rows = b * n_levels if not max_rows else max(1, int(max_rows))
    while True:
        try:
            out = [model.deblur_loss(xr[i:i + rows], tr[i:i + rows]).float() for i in range(0, b * n_levels, rows)]
            return torch.cat(out).view(b, n_levels)  # [B, L]
        except torch.cuda.OutOfMemoryError:
            if rows == 1:
                raise
            rows = max(1, rows // 2)  # chunk smaller when the device runs out of memory
            torch.cuda.empty_cache()


def select_level(losses: torch.Tensor | np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """Eq. 5: t* = argmin over the searched levels, per row of ``losses`` [n, L]; ties go to the smaller t."""
    arr = np.asarray(losses.detach().cpu() if isinstance(losses, torch.Tensor) else losses, dtype=np.float64)
    order = np.argsort(np.asarray(levels))  # np.argmin returns the first minimum: levels in ascending order
    return np.asarray(levels)[order][np.argmin(arr[:, order], axis=1)]


def run_obs(model: DeblurMAE, refs: Sequence[str], *, spec: ObsSpec | None = None, batch_size: int = 32,
            device: torch.device | str | None = None, precision: str = "auto", workers: int = 0,
            max_rows: int | None = 256, model_hash: str = "", hashes: Sequence[str] | None = None,
            progress: bool = True, ctx: DistContext | None = None) -> ObsTable:
    """Run OBS on images ``refs`` with the pre-trained ``model``; returns the table (not yet saved).

    Args:
        model: pre-trained DeblurMAE (:func:`d2mae.artifacts.load_pretrained`).
        refs: image references (:func:`d2mae.data.find_images`).
        spec: search / none / fixed σ (default: search, s = 2).
        batch_size: images per batch (each becomes L rows of the forward pass).
        device: where to run (default: the model's device).
        precision: ``auto`` (bf16 on CUDA that supports it), ``bf16`` or ``fp32``.
        workers: DataLoader worker processes for decoding.
        max_rows: most (image, level) pairs per forward pass; halved automatically on CUDA out-of-memory.
        model_hash: sha256 of the pre-trained weights file (recorded; used to refuse stale tables).
        hashes: content hashes of ``refs`` if already computed.
        progress: show a progress bar (only for more than a few batches; rank 0 only).
        ctx: under torchrun, this process's place: it searches its block of the images, and the table returned is
            the whole one, gathered from all ranks (default: one process).
    """
    spec = spec or ObsSpec()
    ctx = ctx or DistContext()
    refs = [str(r) for r in refs]
    if not refs:
        raise D2maeError("OBS: no images given")
    schedule = model.schedule
    if spec.mode == "fixed":
        if spec.sigma and not schedule.enabled:
            raise D2maeError(f"option --obs fixed:{spec.sigma:g}: this model was pre-trained without blur (MAE); "
                             "use --obs none")
        try:
            fixed_t = schedule.level_of(float(spec.sigma))
        except D2maeError as exc:
            raise D2maeError(f"option --obs fixed:{spec.sigma:g}: {exc}") from None
    n = len(refs)
    mine = eval_indices(n, ctx)  # this rank's block of images (all of them in one process)
    if hashes is None:
        hashes = gather_ordered_objects(content_hashes([refs[i] for i in mine]), n, ctx)
    hashes = list(hashes)
    cfg = model.config
    meta: dict[str, Any] = {
        **spec.to_dict(), "model_sha256": model_hash, "img_size": cfg.img_size, "in_chans": cfg.in_chans,
        "schedule": {"start": cfg.sigma_start, "stop": cfg.sigma_stop, "step": cfg.sigma_step, "enabled": cfg.blur},
        "view": "resize shorter side + centre crop (ImageDataset augment='none')"}
    started = time.perf_counter()
    if spec.mode != "search":
        t = 0.0 if spec.mode == "none" else float(fixed_t)
        sigma = 0.0 if spec.mode == "none" else float(spec.sigma)
        meta["seconds"] = 0.0
        return ObsTable(refs, hashes, np.full(n, t), np.full(n, sigma), [], np.zeros((n, 0)), meta)

    levels = schedule.search_levels(spec.search_step)  # [1, 1+s, …] (or [0] for a model without blur)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev)
    dtype = amp_dtype(dev, precision)
    loader = DataLoader(ImageDataset([refs[i] for i in mine], cfg.img_size, cfg.in_chans, augment="none"),
                        batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=dev.type == "cuda",
                        persistent_workers=False)
    local = torch.zeros(len(mine), len(levels), device=dev)  # [n_mine, L], row k = image mine[k]
    bar = None
    if progress and ctx.is_main and len(mine) > 4 * batch_size:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), desc="OBS", unit="img")
    with eval_mode(model), torch.inference_mode(), autocast(dev, dtype):
        for x, _, k in loader:  # k: positions in this rank's block
            x = x.to(dev, non_blocking=True)  # [B, C, S, S]
            local[k.to(dev)] = search_losses(model, x, levels, max_rows)  # [B, L]
            if bar is not None:
                bar.update(len(k))
    if bar is not None:
        bar.close()
    losses = gather_ordered(local, n, ctx).cpu().double().numpy()  # [n, L] on every rank, row i = image i
    t_star = select_level(losses, levels).astype(np.float64)
    sigma_star = schedule.sigma(torch.from_numpy(t_star)).double().numpy().round(6)
    meta["seconds"] = round(time.perf_counter() - started, 3)
    return ObsTable(refs, hashes, t_star, sigma_star, list(levels), losses, meta)


# ------------------------------------------------------------------------------------------------ figure arrays


@dataclass
class ObsStrip:
    """Arrays for one image of the OBS strip figure (paper Fig. 3a), all [H, W, C] in [0, 1].

    Attributes:
        original: the deterministic view x.
        blurred: x_b^(t) per searched level [L, H, W, C].
        deblurred: x̂^(t) per level, de-normalised to [0, 1] [L, H, W, C].
        difference: |x̂^(t) − x| per level [L, H, W, C].
        losses: L_deblur^(t) per level [L].
    """

    path: str
    levels: list[int]
    sigmas: list[float]
    original: np.ndarray
    blurred: np.ndarray
    deblurred: np.ndarray
    difference: np.ndarray
    losses: np.ndarray
    t_star: int
    sigma_star: float


@torch.no_grad()
def obs_strips(model: DeblurMAE, refs: Sequence[str], search_step: int = 2, device: torch.device | str | None = None
               ) -> list[ObsStrip]:
    """The OBS strip arrays (original, blurred at each searched level, deblurred output, |difference|, losses)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    cfg = model.config
    levels = model.schedule.search_levels(search_step)
    ds = ImageDataset(list(refs), cfg.img_size, cfg.in_chans, augment="none")
    out = []
    enc = model.encoder
    with eval_mode(model):
        for i in range(len(ds)):
            x = ds[i][0][None].to(dev).expand(len(levels), -1, -1, -1)  # [L, C, S, S]
            t = torch.tensor(levels, dtype=torch.float32, device=dev)  # [L]
            blurred = gaussian_blur(x, model.schedule.sigma(t))  # [L, C, S, S]
            latent, _, ids_restore = enc(x, t, 0.0)
            pred = model.forward_decoder(latent, ids_restore).float()  # [L, N, p*p*C], normalised units
            losses = model.loss_per_sample(x, pred)  # [L]
            if cfg.norm_pix_loss:  # undo the per-patch normalisation with the original's patch statistics
                target = model.patchify(enc.normalize(x.float()))
                pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
            img = model.unpatchify(pred) * enc.pixel_std + enc.pixel_mean  # [L, C, S, S] in [0, 1] units
            img = img.clamp(0, 1)
            diff = (img - x).abs()
            hwc = lambda a: a.permute(0, 2, 3, 1).cpu().numpy()  # noqa: E731  [L, S, S, C]
            best = int(select_level(losses[None], levels)[0])
            out.append(ObsStrip(str(refs[i]), list(levels), [float(s) for s in model.schedule.sigma(t).tolist()],
                                hwc(x[:1])[0], hwc(blurred), hwc(img), hwc(diff), losses.cpu().numpy(),
                                best, float(model.schedule.sigma(torch.tensor([float(best)]))[0])))
    return out


# ------------------------------------------------------------------------------------------------------ summary


def searched_sigmas(table: ObsTable) -> list[float]:
    """σ of each searched level of ``table`` (from the schedule recorded in its meta)."""
    sch = table.meta.get("schedule") or {}
    if not table.levels or not sch:
        return []
    return [round(sch["start"] + (t - 1) * sch["step"], 6) if t > 0 else 0.0 for t in table.levels]


def summarize(table: ObsTable, groups: Sequence[str] | None = None, group_name: str = "group") -> dict[str, Any]:
    """σ* per group (scanner or class): count per σ value and mean (paper Fig. 3b)."""
    groups = list(groups) if groups is not None else ["all"] * len(table)
    sig = np.round(table.sigma_star, 6)
    values = sorted(set(sig.tolist()) | set(searched_sigmas(table)))
    out: dict[str, Any] = {"group_by": group_name, "sigmas": values, "groups": {}}
    for g in sorted(set(groups), key=str) + (["all"] if len(set(groups)) > 1 else []):
        sel = np.ones(len(sig), bool) if g == "all" and len(set(groups)) > 1 else np.array(groups) == g
        s = sig[sel]
        out["groups"][str(g)] = {"n": int(sel.sum()), "mean": float(s.mean()) if len(s) else float("nan"),
                                 "std": float(s.std()) if len(s) else float("nan"),
                                 "counts": {f"{v:g}": int((s == v).sum()) for v in values}}
    return out


def summary_markdown(summary: dict[str, Any], title: str = "σ* (OBS) per group") -> str:
    """The summary as a Markdown table: one row per group, n, mean ± std σ*, and the count at each σ."""
    cols = [f"{v:g}" for v in summary["sigmas"]]
    lines = [f"## {title}", "", f"| {summary['group_by']} | n | mean σ* | std | " + " | ".join(f"σ={c}" for c in cols)
             + " |", "|" + "---|" * (4 + len(cols))]
    for g, s in summary["groups"].items():
        lines.append(f"| {g} | {s['n']} | {s['mean']:.3f} | {s['std']:.3f} | "
                     + " | ".join(str(s["counts"][c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_strips(strips: Sequence[ObsStrip], out_dir: str | Path, stem: str = "obs_strip") -> list[Path]:
    """Fig. 3a for each strip (:func:`d2mae.report.obs_strip`): ``<stem>_<k>.png`` in ``out_dir``."""
    from d2mae.report import obs_strip

    paths = []
    for k, s in enumerate(strips, start=1):
        best = s.levels.index(s.t_star) if s.t_star in s.levels else None
        paths.append(obs_strip(s.original, s.blurred, s.deblurred, s.sigmas, s.losses.tolist(),
                               Path(out_dir) / f"{stem}_{k}.png", chosen=best,
                               title=f"Optimal blurriness search: {Path(s.path.split('#')[0]).name}"))
    return paths


# ---------------------------------------------------------------------------------------------- command (d2mae obs)


@dataclass
class ObsConfig:
    """``d2mae obs``: every field is a flag (``--search-step``) and a YAML key (``search_step``)."""

    model: str = field(default="", metadata={"help": "pre-trained D²MAE folder (model.safetensors + config.json)",
                                             "metavar": "DIR"})
    data: list[str] | None = field(default=None, metadata={
        "help": "images: folders, files or .csv/.txt lists (or use --labels)", "metavar": "SRC"})
    out: str = field(default="", metadata={"help": "output folder for obs.csv, obs.json, obs_summary.md, PNGs",
                                           "metavar": "DIR"})
    obs: str = field(default="search", metadata={"help": "search, none or fixed:SIGMA (Table 3c)"})
    search_step: int = field(default=2, metadata={"help": "OBS search step s (Table 3d)"})
    batch_size: int = field(default=32, metadata={"help": "images per batch (× searched levels per forward pass)"})
    max_rows: int = field(default=256, metadata={"help": "most (image, level) pairs per forward pass"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on capable GPUs), bf16 or fp32"})
    workers: int = field(default=2, metadata={"help": "DataLoader workers for decoding"})
    labels: str | None = field(default=None, metadata={
        "help": "labels CSV or class-per-folder tree instead of --data (then --group-by can name any column)"})
    path_column: str = field(default="path", metadata={"help": "labels CSV column with the image path or ID"})
    label_column: str = field(default="label", metadata={"help": "labels CSV column with the class"})
    image_root: str | None = field(default=None, metadata={"help": "folder the labels CSV paths are relative to"})
    image_ext: str = field(default="", metadata={"help": "extension added to path values that lack it (e.g. .png)"})
    group_by: str | None = field(default=None, metadata={
        "help": "labels CSV column to summarise σ* by (e.g. Device); default: the class"})
    strips: int = field(default=3, metadata={"help": "images in the OBS strip figure (0: none)"})
    skip_bad: bool = field(default=False, metadata={"help": "leave out unreadable images (listed in bad_images.txt)"})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise D2maeError(f"option --batch-size must be ≥ 1, got {self.batch_size}")
        if self.max_rows < 1:
            raise D2maeError(f"option --max-rows must be ≥ 1, got {self.max_rows}")
        if self.workers < 0:
            raise D2maeError(f"option --workers must be ≥ 0, got {self.workers}")
        parse_obs(self.obs, self.search_step)


def obs_command(cfg: ObsConfig) -> Path:
    """The work of ``d2mae obs``: load, check, search, write table + summary + figures. Returns the table path."""
    if not cfg.model:
        raise D2maeError("option --model is required: the pre-trained D²MAE folder")
    if not cfg.out:
        raise D2maeError("option --out is required: the folder for the OBS table")
    if bool(cfg.data) == bool(cfg.labels):
        raise D2maeError("give the images with either --data (folders, files, lists) or --labels (a labels CSV)")
    spec = parse_obs(cfg.obs, cfg.search_step)
    with distributed_run(cfg.device) as (ctx, device):
        return _obs_command(cfg, spec, ctx, device)


def _obs_command(cfg: ObsConfig, spec: ObsSpec, ctx: DistContext, device: torch.device) -> Path:
    """:func:`obs_command` in one process (of one or more): every rank searches its block, rank 0 writes."""
    model = load_pretrained(cfg.model, device)
    groups, group_name = None, "group"
    if cfg.labels:
        labeled = load_labeled(cfg.labels, path_column=cfg.path_column, label_column=cfg.label_column,
                               image_root=cfg.image_root, image_ext=cfg.image_ext)
        refs = labeled.refs
        if cfg.group_by:
            if cfg.group_by not in labeled.columns:
                raise D2maeError(f"option --group-by: {cfg.labels} has no column '{cfg.group_by}'; its columns are: "
                                 f"{', '.join(labeled.columns) or '(class folders only)'}")
            groups, group_name = labeled.columns[cfg.group_by], cfg.group_by
        else:
            groups, group_name = [labeled.classes[i] for i in labeled.labels], "class"
    else:
        if cfg.group_by:
            raise D2maeError("option --group-by needs --labels (a CSV with that column)")
        refs = find_images(cfg.data)
    out = Path(cfg.out)
    good = on_main(ctx, lambda: check_images(refs, model.config.in_chans, skip_bad=cfg.skip_bad, out_dir=out))
    if groups is not None and len(good) != len(refs):
        keep = set(good)
        groups = [g for r, g in zip(refs, groups) if r in keep]
    refs = good
    if ctx.is_main:
        save_config(cfg, out / "obs.yaml")
    table = run_obs(model, refs, spec=spec, batch_size=cfg.batch_size, device=device, precision=cfg.precision,
                    workers=cfg.workers, max_rows=cfg.max_rows, model_hash=model_sha256(cfg.model), ctx=ctx)
    table.meta["model_dir"] = str(Path(cfg.model).absolute())
    path = out / TABLE_NAME
    if ctx.is_main:
        table.save(out)
        write_summary(table, groups, group_name, out)
        if cfg.strips > 0 and spec.mode == "search":
            plot_strips(obs_strips(model, refs[:cfg.strips], spec.search_step, device), out)
        rate = len(table) / table.meta["seconds"] if table.meta.get("seconds") else float("nan")
        print(f"OBS {spec.describe()} on {len(table)} images in {table.meta.get('seconds', 0):.1f} s "
              f"({rate:.1f} images/s); table: {path}")
    barrier(ctx)  # every rank returns once the files are written
    return path


def write_summary(table: ObsTable, groups: Sequence[str] | None, group_name: str, out: str | Path) -> dict[str, Any]:
    """Print and write ``obs_summary.md`` (+ ``obs_summary.json``) and the σ* histogram ``obs_sigma_hist.png``
    (paper Fig. 3b, :func:`d2mae.report.sigma_histogram`) into ``out``."""
    out = Path(out)
    summary = summarize(table, groups, group_name)
    text = summary_markdown(summary, f"σ* (OBS {table.spec.describe()}) per {group_name}")
    atomic_write_text(out / "obs_summary.md", text)
    atomic_write_json(out / "obs_summary.json", summary)
    from d2mae.report import sigma_histogram

    sigma_histogram(table.sigma_star, out / "obs_sigma_hist.png", groups=groups,
                    title=f"σ* (OBS {table.spec.describe()}) per {group_name}")
    print(text)
    return summary


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of the options below")
    add_arguments(parser, ObsConfig)


def run_cli(args: argparse.Namespace) -> int:
    obs_command(config_from_cli(ObsConfig, args))
    return 0


__all__ = ["ObsConfig", "ObsSpec", "ObsStrip", "ObsTable", "model_sha256",
           "obs_command", "obs_strips", "parse_obs", "plot_strips", "run_obs", "search_losses",
           "searched_sigmas", "select_level", "summarize", "summary_markdown", "write_summary"]

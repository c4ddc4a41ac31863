"""Optimal blurriness search over a data set: every image's t*, its table, its summary and figures (``d2mae obs``).

The rule is :mod:`d2mae.method.obs` (Eqs. 4-5); here it runs over images. :func:`run_obs` turns any OBS setting
into each image's level t — the search itself (every searched level of a batch in one forward pass, Eq. 4; the
argmin, Eq. 5), or the one level ``none``/``fixed`` give every image — and returns an
:class:`~d2mae.io.obs_table.ObsTable`. Fine-tuning (:mod:`d2mae.train.engine`) and prediction
(:mod:`d2mae.eval.predict`) take their t from it; OBS runs once, before fine-tuning.

More than one process: under torchrun each rank searches its block of the images (:func:`d2mae.eval.infer.infer`)
and every rank holds the whole table; only rank 0 writes files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from d2mae.data.dataset import ImageDataset
from d2mae.data.decode import check_images, content_hashes
from d2mae.data.labels import labels_inputs, load_labeled
from d2mae.data.sources import find_images
from d2mae.eval.figures import sigma_histogram
from d2mae.eval.image_figures import obs_strip
from d2mae.eval.infer import infer
from d2mae.io.artifacts import load_pretrained, model_sha256
from d2mae.io.obs_table import TABLE_NAME, ObsTable, sigmas_of
from d2mae.method.blur import gaussian_blur
from d2mae.method.models import DeblurMAE
from d2mae.method.obs import DEFAULT_SEARCH_STEP, ObsSpec, search_losses, select_level
from d2mae.runtime.device import eval_mode
from d2mae.runtime.distributed import (
    DistContext,
    barrier,
    distributed_run,
    eval_indices,
    gather_ordered_objects,
    on_main,
)
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_json, atomic_write_text
from d2mae.runtime.locks import output_lock
from d2mae.runtime.logs import say
from d2mae.runtime.options import RuntimeOptions, check_fields, save_config
from d2mae.runtime.outputs import claim_folder
from d2mae.runtime.threads import configure_threads


def run_obs(model: Any, refs: Sequence[str], *, spec: ObsSpec | None = None, batch_size: int = 32,
            device: torch.device | str | None = None, workers: int = 0,
            max_rows: int | None = 256, model_hash: str = "", hashes: Sequence[str] | None = None,
            progress: bool = True, ctx: DistContext | None = None) -> ObsTable:
    """Each image's level t under ``spec`` (default: the search, s = 2), as a table (not yet saved).

    Args:
        model: the pre-trained DeblurMAE (:func:`d2mae.io.artifacts.load_pretrained`) for a search; for ``none``
            and ``fixed`` any model with the same ``config`` and ``schedule`` (a classifier too).
        refs: image references (:func:`d2mae.data.sources.find_images`).
        batch_size: images per batch (each becomes L rows of the forward pass).
        device: where to run (default: the model's device). The search runs in fp32 whatever a run's precision:
            its levels' losses differ by under 1%, so bf16's rounding could move t*.
        workers: DataLoader worker processes for decoding.
        max_rows: most (image, level) pairs per forward pass; halved automatically on CUDA out-of-memory.
        model_hash: sha256 of the pre-trained weights file (recorded; used to refuse stale tables).
        hashes: content hashes of ``refs`` if already computed.
        progress: a progress bar (more than a few batches; rank 0 only).
        ctx: under torchrun, this process's place (default: one process).
    """
    spec = spec or ObsSpec()
    ctx = ctx or DistContext()
    refs = [str(r) for r in refs]
    if not refs:
        raise D2maeError("OBS: no images given")
    schedule, cfg = model.schedule, model.config
    if spec.mode == "fixed" and spec.sigma and not schedule.enabled:
        raise D2maeError(f"fixed:{spec.sigma:g} asks for blur, but this model was pre-trained without blur (MAE); "
                         "use none", option="obs")
    n = len(refs)
    if hashes is None:
        mine = eval_indices(n, ctx)  # each rank hashes its block
        hashes = gather_ordered_objects(content_hashes([refs[i] for i in mine]), n, ctx)
    meta: dict[str, Any] = {
        **spec.to_dict(), "model_sha256": model_hash, "img_size": cfg.img_size, "in_chans": cfg.in_chans,
        "schedule": schedule.to_dict(), "view": "resize shorter side + centre crop (ImageDataset augment='none')"}
    started = time.perf_counter()
    fixed = spec.fixed_level(schedule)
    if fixed is not None:  # none or fixed: the same level for every image
        meta["seconds"] = 0.0
        return ObsTable(refs, list(hashes), np.full(n, fixed), [], np.zeros((n, 0)), meta)
    if not isinstance(model, DeblurMAE):
        raise D2maeError(f"the search needs a masked-autoencoder pre-trained model (its decoder restores the blurred "
                         f"images); this model's objective is {cfg.objective}; use none", option="obs")
    levels = spec.levels(schedule)  # [1, 1+s, …] (or [0] for a model without blur)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev)
    losses = infer(model, lambda x, _t: search_losses(model, x, levels, max_rows), refs, None,
                   img_size=cfg.img_size, in_chans=cfg.in_chans, out_shape=(len(levels),), device=dev,
                   batch_size=batch_size, workers=workers, precision="fp32", progress=progress, desc="OBS",
                   ctx=ctx)  # [n, L], Eq. 4, in fp32 whatever the precision: the levels' losses differ by < 1%
    bad = ~np.isfinite(losses).all(axis=1)  # [n]
    if bad.any():
        first = int(np.argmax(bad))
        raise D2maeError(f"OBS: the model's restoration loss is NaN or infinite for {int(bad.sum())} of {n} images "
                         f"(first: {refs[first]}); its outputs are not finite — check the pre-trained weights")
    t_star = select_level(losses, levels).astype(np.float64)  # Eq. 5
    meta["seconds"] = round(time.perf_counter() - started, 3)
    return ObsTable(refs, list(hashes), t_star, list(levels), losses, meta)


# ------------------------------------------------------------------------------------------------ figure arrays


def obs_levels(model: Any, refs: Sequence[str], hashes: Sequence[str], *, spec: ObsSpec, model_dir: Path,
               model_hash: str, out: Path, cfg: Any, device: torch.device, groups: Sequence[str], group_name: str,
               ctx: DistContext) -> tuple[np.ndarray, float]:
    """A run's OBS, once (Algorithm 1 lines 4-10): t* [n] of every image of ``refs``, and the seconds it took here.

    The table comes from ``cfg.obs_table`` when given, else from ``out`` when a resumed run's own table still
    matches the images and the model, else from :func:`run_obs`; it is saved in ``out`` (with its summary by
    ``groups``) for provenance. ``cfg`` gives ``obs_table``, ``obs_batch_size``, ``workers`` and
    ``progress``.
    """

    def existing() -> ObsTable | None:  # rank 0 reads; every rank gets the table
        if cfg.obs_table:
            return ObsTable.load(cfg.obs_table)
        if (out / TABLE_NAME).is_file():  # resumed run: reuse its own table if still valid
            try:
                table = ObsTable.load(out)
                table.lookup(refs, hashes, model_hash, spec, model.config.img_size)
                return table
            except D2maeError:
                return None
        return None

    table = on_main(ctx, existing)
    seconds = 0.0
    if table is None:
        say(ctx, f"OBS {spec.describe()} on {len(refs)} images …")
        table = run_obs(model, refs, spec=spec, batch_size=cfg.obs_batch_size, device=device, workers=cfg.workers,
                        model_hash=model_hash, hashes=hashes, progress=cfg.progress, ctx=ctx)
        table.meta["model_dir"] = str(model_dir.absolute())
        seconds = float(table.meta.get("seconds", 0.0))
        if ctx.is_main:
            table.save(out)
            write_summary(table, groups, group_name, out)
    t = table.lookup(refs, hashes, model_hash, spec, model.config.img_size)
    if ctx.is_main and cfg.obs_table and Path(cfg.obs_table).absolute() != (out / TABLE_NAME).absolute():
        table.save(out)  # keep the table used beside the run (provenance; the source may move)
    return t, seconds


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
def obs_strips(model: DeblurMAE, refs: Sequence[str], spec: ObsSpec | None = None,
               device: torch.device | str | None = None) -> list[ObsStrip]:
    """The OBS strip arrays (original, blurred at each searched level, deblurred output, |difference|, losses)."""
    spec = spec or ObsSpec()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    cfg = model.config
    levels = spec.levels(model.schedule)
    ds = ImageDataset(list(refs), cfg.img_size, cfg.in_chans, augment="none")
    out = []
    with eval_mode(model):
        for i in range(len(ds)):
            x = ds[i][0][None].to(dev).expand(len(levels), -1, -1, -1)  # [L, C, S, S]
            t = torch.tensor(levels, dtype=torch.float32, device=dev)  # [L]
            blurred = gaussian_blur(x, model.schedule.sigma(t))  # [L, C, S, S]
            latent, _, ids_restore = model.encoder(x, t, 0.0)
            pred = model.forward_decoder(latent, ids_restore)  # [L, N, p*p*C], normalised units
            losses = model.loss_per_sample(x, pred)  # [L]
            img = model.to_image(pred, x)  # [L, C, S, S] in [0, 1]

            def hwc(a: torch.Tensor) -> np.ndarray:
                return a.permute(0, 2, 3, 1).cpu().numpy()  # [L, S, S, C]

            best = int(select_level(losses[None], levels)[0])
            sigmas = sigmas_of(model.schedule, np.asarray(levels + [best], dtype=np.float64))
            out.append(ObsStrip(str(refs[i]), list(levels), sigmas[:-1].tolist(), hwc(x[:1])[0], hwc(blurred),
                                hwc(img), hwc((img - x).abs()), losses.cpu().numpy(), best, float(sigmas[-1])))
    return out


def plot_strips(strips: Sequence[ObsStrip], out_dir: str | Path, stem: str = "obs_strip") -> list[Path]:
    """Fig. 3a for each strip (:func:`d2mae.eval.image_figures.obs_strip`): ``<stem>_<k>.png`` in ``out_dir``."""
    paths = []
    for k, s in enumerate(strips, start=1):
        best = s.levels.index(s.t_star) if s.t_star in s.levels else None
        paths.append(obs_strip(s.original, s.blurred, s.deblurred, s.sigmas, s.losses.tolist(),
                               Path(out_dir) / f"{stem}_{k}.png", chosen=best,
                               title=f"Optimal blurriness search: {Path(s.path.split('#')[0]).name}"))
    return paths


# ------------------------------------------------------------------------------------------------------ summary


def summarize(table: ObsTable, groups: Sequence[str] | None = None, group_name: str = "group") -> dict[str, Any]:
    """σ* per group (scanner or class): count per σ value and mean (paper Fig. 3b)."""
    groups = list(groups) if groups is not None else ["all"] * len(table)
    sig = table.sigma_star
    values = sorted(set(sig.tolist()) | set(table.searched_sigmas))
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


def write_summary(table: ObsTable, groups: Sequence[str] | None, group_name: str, out: str | Path) -> dict[str, Any]:
    """Write ``obs_summary.md`` (+ ``obs_summary.json``) and the σ* histogram ``obs_sigma_hist.png`` (paper Fig. 3b)
    into ``out``; returns the summary."""
    out = Path(out)
    summary = summarize(table, groups, group_name)
    title = f"σ* (OBS {table.spec.describe()}) per {group_name}"
    atomic_write_text(out / "obs_summary.md", summary_markdown(summary, title))
    atomic_write_json(out / "obs_summary.json", summary)
    sigma_histogram(table.sigma_star, out / "obs_sigma_hist.png", groups=groups, title=title)
    return summary


# ----------------------------------------------------------------------------------------------- d2mae obs


@dataclass
class ObsConfig(RuntimeOptions):
    """What ``d2mae obs`` takes: every field is a YAML key and a flag (``search_step`` ↔ ``--search-step``)."""

    pretrained: str = field(default="", metadata={
        "help": "pre-trained D²MAE folder (model.safetensors + config.json)", "metavar": "DIR", "group": "model",
        "old_names": ["model"]})
    data: list[str] | None = field(default=None, metadata={
        "help": "images: folders, files or .csv/.txt lists (or use --labels)", "metavar": "SRC"})
    out: str = field(default="", metadata={"help": "output folder for obs.csv, obs.json, obs_summary.md, PNGs",
                                           "metavar": "DIR"})
    obs: str = field(default="search", metadata={"help": "search, none or fixed:SIGMA (Table 3c)"})
    search_step: int = field(default=DEFAULT_SEARCH_STEP, metadata={
        "advanced": True, "help": "OBS search step s (Table 3d)", "min": 1})
    batch_size: int = field(default=32, metadata={
        "advanced": True, "help": "images per batch (× searched levels per forward pass)", "min": 1, "volatile": True})
    max_rows: int = field(default=256, metadata={
        "advanced": True, "help": "most (image, level) pairs per forward pass", "min": 1, "volatile": True})
    labels: str | None = field(default=None, metadata={
        "help": "labels CSV or class-per-folder tree instead of --data (then --group-by can name any column)"})
    path_column: str = field(default="path", metadata={
        "advanced": True, "help": "labels CSV column with the image path or ID"})
    label_column: str = field(default="label", metadata={"advanced": True, "help": "labels CSV column with the class"})
    image_root: str | None = field(default=None, metadata={"help": "folder the labels CSV paths are relative to"})
    image_ext: str = field(default="", metadata={
        "advanced": True, "help": "extension added to path values that lack it (e.g. .png)"})
    allow_outside_root: bool = field(default=False, metadata={"advanced": True, 
        "help": "follow labels CSV paths that lead outside --image-root (absolute, ../, links); refused by default",
        "volatile": True})
    group_by: str | None = field(default=None, metadata={
        "help": "labels CSV column to summarise σ* by (e.g. Device); default: the class"})
    force: bool = field(default=False, metadata={
        "help": "replace an earlier output of this command in --out (or write beside other files there)"})
    precision: str = field(default="fp32", metadata={
        "advanced": True, "choices": ["auto", "bf16", "fp32"], "volatile": True,
        "help": "the search runs in fp32 whatever this says: its levels' losses differ by < 1%, so bf16 rounding "
                "could move t*"})
    strips: int = field(default=3, metadata={
        "advanced": True, "help": "images in the OBS strip figure (0: none)", "min": 0})

    def __post_init__(self) -> None:
        check_fields(self)
        self.spec  # the setting parses

    @property
    def spec(self) -> ObsSpec:
        return ObsSpec.parse(self.obs, self.search_step)


def search_dataset(cfg: ObsConfig) -> Path:
    """``d2mae obs``: load the model and images, check them, search, write the table, summary and figures.

    Under torchrun every rank searches its block and rank 0 writes. Returns the table's path (``obs.csv``).
    """
    if not cfg.pretrained:
        raise D2maeError("is required: the pre-trained D²MAE folder", option="pretrained")
    if not cfg.out:
        raise D2maeError("is required: the folder for the OBS table", option="out")
    if bool(cfg.data) == bool(cfg.labels):
        raise D2maeError("give the images either as data (folders, files, lists) or as labels (a labels CSV)",
                         option="data")
    with distributed_run(cfg.device) as (ctx, device):
        inputs = [cfg.pretrained, *(cfg.data or []), *labels_inputs(cfg.labels, cfg.path_column, cfg.image_root,
                                                                     cfg.image_ext)]
        on_main(ctx, lambda: claim_folder(cfg.out, "obs", inputs, force=cfg.force))
        return _obs_command(cfg, ctx, device)


def _obs_command(cfg: ObsConfig, ctx: DistContext, device: torch.device) -> Path:
    """``d2mae obs`` in its claimed output folder (see :func:`search_dataset`)."""
    with output_lock(cfg.out, "obs", ctx):
        configure_threads(cfg.threads)
        model = load_pretrained(cfg.pretrained, device)
        refs, groups, group_name = _images(cfg)
        out = Path(cfg.out)
        good = on_main(ctx, lambda: check_images(refs, model.config.in_chans, skip_bad=cfg.skip_bad, out_dir=out))
        if groups is not None and len(good) != len(refs):
            keep = set(good)
            groups = [g for r, g in zip(refs, groups) if r in keep]
        if ctx.is_main:
            save_config(cfg, out / "obs.yaml")
        table = run_obs(model, good, spec=cfg.spec, batch_size=cfg.batch_size, device=device, workers=cfg.workers,
                        max_rows=cfg.max_rows, model_hash=model_sha256(cfg.pretrained), progress=cfg.progress, ctx=ctx)
        table.meta["model_dir"] = str(Path(cfg.pretrained).absolute())
        if ctx.is_main:
            table.save(out)
            write_summary(table, groups, group_name, out)
            if cfg.strips > 0 and cfg.spec.mode == "search":
                plot_strips(obs_strips(model, good[:cfg.strips], cfg.spec, device), out)
        barrier(ctx)  # every rank returns once the files are written
    return out / TABLE_NAME


def _images(cfg: ObsConfig) -> tuple[list[str], list[str] | None, str]:
    """The images to search, and the groups their σ* is summarised by (a labels column, the class, or none)."""
    if not cfg.labels:
        if cfg.group_by:
            raise D2maeError("needs labels (a CSV with that column)", option="group_by")
        return find_images(cfg.data), None, "group"
    labeled = load_labeled(cfg.labels, path_column=cfg.path_column, label_column=cfg.label_column,
                           image_root=cfg.image_root, image_ext=cfg.image_ext,
                           allow_outside_root=cfg.allow_outside_root)
    if not cfg.group_by:
        return labeled.refs, [labeled.classes[i] for i in labeled.labels], "class"
    if cfg.group_by not in labeled.columns:
        raise D2maeError(f"{cfg.labels} has no column '{cfg.group_by}'; its columns are: "
                         f"{', '.join(labeled.columns) or '(class folders only)'}", option="group_by")
    return labeled.refs, labeled.columns[cfg.group_by], cfg.group_by

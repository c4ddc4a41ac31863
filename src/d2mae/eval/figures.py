"""Figures in the style of the paper (Figures 2-3), written as PNG (matplotlib's Agg canvas, no pyplot state).

:func:`roc_figure`, :func:`roc_methods_figure`, :func:`confusion_figure`, :func:`metric_bars` (Figure 2),
:func:`sigma_histogram` (Figure 3b), :func:`obs_strip` (Figure 3a), :func:`training_curves`, :func:`curves_figure`,
:func:`reconstruction_figure` / :func:`image_grid`. Every file is written atomically (:mod:`d2mae.runtime.files`).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import auc, roc_curve

from d2mae.eval.metrics import as_arrays
from d2mae.eval.statistics import MeanCI, mean_ci
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_bytes, read_csv_rows
from d2mae.runtime.logs import read_jsonl

# ------------------------------------------------------------------------------------------- formatting


# ---------------------------------------------------------------------------------------------- tables


# --------------------------------------------------------------------------------------------- reports


# --------------------------------------------------------------------------------------------- figures
def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to PNG in memory and write it atomically."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def display_image(img: Any) -> np.ndarray:
    """An image for ``imshow``: ``[H, W]`` gray or ``[H, W, 3]`` RGB; accepts ``[C, H, W]`` (C = 1 or 3) and
    torch tensors. Values in [0, 1] are shown as is; other ranges are min-max scaled per image."""
    if hasattr(img, "detach"):
        img = img.detach().float().cpu().numpy()
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # [C, H, W] -> [H, W, C]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise D2maeError(f"cannot show an image of shape {np.shape(img)}; expected [H, W], [H, W, 1|3] or [1|3, H, W]")
    finite = a[np.isfinite(a)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        lo, hi = finite.min(), finite.max()
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return a


def imshow(ax: Any, img: np.ndarray, cmap: str = "gray", vmin: float = 0.0, vmax: float = 1.0) -> None:

    cm = matplotlib.colormaps[cmap].with_extremes(bad="#7f7f7f")  # NaN (e.g. masked patches) shows mid-gray
    if img.ndim == 3:
        ax.imshow(np.nan_to_num(np.clip(img, 0, 1), nan=0.5))
    else:
        ax.imshow(np.ma.masked_invalid(img), cmap=cm, vmin=vmin, vmax=vmax)
    ax.set_xticks([])
    ax.set_yticks([])


def roc_figure(curves: Mapping[str, tuple[Any, Any]], path: str | Path, classes: Sequence[str] | None = None,
               title: str = "ROC") -> Path:
    """ROC curves: per fold and their mean (binary), or one-vs-rest per class (multi-class, all folds pooled).

    Args:
        curves: ``{fold_name: (y_true [N], probs [N, K])}``.

    Binary: each fold's curve, and with several folds the mean curve (TPR interpolated on a common FPR grid) with a
    ±1 s.d. band; the legend gives each AUROC. Multi-class: each class vs. rest on the pooled predictions plus the
    macro-average curve. Folds or classes on which AUROC is undefined are named in the legend, not drawn.
    """

    if not curves:
        raise D2maeError("roc_figure: no predictions given")
    data = {name: as_arrays(y, p) for name, (y, p) in curves.items()}
    k = next(iter(data.values()))[1].shape[1]
    names = list(classes) if classes is not None else [str(i) for i in range(k)]
    grid = np.linspace(0.0, 1.0, 201)
    fig = new_figure(5.6, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="chance")
    if k == 2:
        tprs, aucs = [], []
        many = len(data) > 1
        for name, (y, p, _) in data.items():
            if np.unique(y).size < 2:
                ax.plot([], [], " ", label=f"{name}: AUROC undefined (one class)")
                continue
            fpr, tpr, _ = roc_curve(y, p[:, 1])
            a = auc(fpr, tpr)
            aucs.append(a)
            ax.plot(fpr, tpr, lw=1 if many else 2, alpha=0.45 if many else 1.0,
                    label=f"{name} (AUROC {a * 100:.1f})")
            interp = np.interp(grid, fpr, tpr)
            interp[0] = 0.0
            tprs.append(interp)
        if many and tprs:
            mean_tpr = np.mean(tprs, axis=0)
            mean_tpr[-1] = 1.0
            std = np.std(tprs, axis=0)
            ax.plot(grid, mean_tpr, color="black", lw=2.2,
                    label=f"mean (AUROC {np.mean(aucs) * 100:.1f} ± {np.std(aucs) * 100:.1f} s.d.)")
            ax.fill_between(grid, np.clip(mean_tpr - std, 0, 1), np.clip(mean_tpr + std, 0, 1), color="gray",
                            alpha=0.2, label="± 1 s.d.")
    else:
        y = np.concatenate([d[0] for d in data.values()])
        p = np.concatenate([d[1] for d in data.values()])
        tprs = []
        for c in range(k):
            pos = y == c
            if pos.all() or not pos.any():
                ax.plot([], [], " ", label=f"{names[c]}: AUROC undefined (class absent)")
                continue
            fpr, tpr, _ = roc_curve(pos, p[:, c])
            ax.plot(fpr, tpr, lw=1.2, label=f"{names[c]} vs rest (AUROC {auc(fpr, tpr) * 100:.1f})")
            tprs.append(np.interp(grid, fpr, tpr))
        if tprs:
            macro = np.mean(tprs, axis=0)
            ax.plot(grid, macro, color="black", lw=2.2, label=f"macro average (AUROC {auc(grid, macro) * 100:.1f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=7)
    return save_figure(fig, path)


def confusion_figure(cm: Any, classes: Sequence[str], path: str | Path, title: str = "Confusion matrix") -> Path:
    """Confusion matrix (rows = true, columns = predicted): colour = share of the true class, text = count (%)."""
    m = np.asarray(cm, dtype=np.float64)
    k = len(classes)
    if m.shape != (k, k):
        raise D2maeError(f"confusion matrix of shape {m.shape} does not match {k} classes")
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(m.sum(axis=1, keepdims=True) > 0, m / m.sum(axis=1, keepdims=True), 0.0)
    size = 2.2 + 0.75 * k
    fig = new_figure(size + 1.0, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    font = 10 if k <= 4 else 8 if k <= 8 else 6
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(m[i, j])}\n({share[i, j] * 100:.0f}%)", ha="center", va="center", fontsize=font,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), labels=list(classes), rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    return save_figure(fig, path)


def _bar_stat(value: Any, confidence: float) -> tuple[float, float, float]:
    """(mean, low, high) from a MeanCI, a {"mean","low","high"} mapping, a list of fold values or one value."""
    if isinstance(value, MeanCI):
        return value.mean, value.low, value.high
    if isinstance(value, Mapping):
        if "mean" in value:
            get = lambda key: math.nan if value.get(key) is None else float(value[key])  # noqa: E731
            return get("mean"), get("low"), get("high")
        value = list(value.values())
    if isinstance(value, (int, float, np.floating, np.integer)):
        return float(value), math.nan, math.nan
    s = mean_ci([float(v) for v in value], confidence)
    return s.mean, s.low, s.high


def metric_bars(data: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | Path, scale: float = 100.0,
                ylabel: str = "%", title: str = "", confidence: float = 0.95) -> Path:
    """Figure 2 of the paper: grouped bars with 95% CI error bars, one panel per metric.

    Args:
        data: ``{panel (e.g. "ACC"): {group (dataset): {method: value}}}`` where a value is a
            :class:`~d2mae.eval.statistics.MeanCI`, a mapping with ``mean``/``low``/``high`` (as in metrics.json), a list
            of per-fold values (mean ± t-interval) or one number (no error bar).
    """

    if not data:
        raise D2maeError("metric_bars: no data given")
    panels = list(data)
    methods: list[str] = []
    for panel in panels:
        for grp in data[panel].values():
            methods += [m for m in grp if m not in methods]
    colors = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    n_groups = max(len(data[p]) for p in panels)
    fig = new_figure(max(4.5, 1.0 + n_groups * (0.35 * len(methods) + 0.6)) * len(panels) ** 0.5 + 1.5, 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    width = 0.8 / max(1, len(methods))
    lows_all = []
    for ax, panel in zip(axes, panels):
        groups = list(data[panel])
        for j, method in enumerate(methods):
            xs, ys, err = [], [], [[], []]
            for i, g in enumerate(groups):
                if method not in data[panel][g]:
                    continue
                mean, low, high = _bar_stat(data[panel][g][method], confidence)
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(mean * scale)
                err[0].append((mean - low) * scale if math.isfinite(low) else 0.0)
                err[1].append((high - mean) * scale if math.isfinite(high) else 0.0)
                lows_all.append((low if math.isfinite(low) else mean) * scale)
            ax.bar(xs, ys, width * 0.92, yerr=err, capsize=3, color=colors(j % colors.N),
                   label=method if ax is axes[0] else None, error_kw={"lw": 1})
        ax.set_xticks(range(len(groups)), labels=groups)
        ax.set_title(panel)
        ax.set_ylabel(f"{panel} ({ylabel})" if ylabel else panel)
        ax.grid(axis="y", alpha=0.3)
    if lows_all:  # start the axis below the lowest bar's CI, like the paper's zoomed-in bars
        bottom = max(0.0, math.floor((min(lows_all) - 5.0) / 5.0) * 5.0)
        for ax in axes:
            ax.set_ylim(bottom=bottom)
    fig.legend(loc="outside lower center", ncols=min(len(methods), 5), fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def sigma_histogram(values: Any, path: str | Path, groups: Sequence[Any] | None = None, title: str = "",
                    xlabel: str = "σ* (optimal blurriness)", max_groups: int = 24,
                    group_order: Sequence[str] | None = None) -> Path:
    """Figure 3b of the paper: the distribution of σ* (or t*) chosen by OBS, one panel per group.

    Args:
        values: ``[N]`` σ* per image (discrete levels; NaN = no OBS value, counted in the title).
        groups: ``[N]`` group of each image (class, scanner, dataset); ``None`` = one panel.
        max_groups: the largest groups are drawn, and the title says how many were left out.
        group_order: panel order (e.g. the class order); default: sorted names.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    g = np.asarray(["all"] * v.size if groups is None else [str(x) for x in groups], dtype=object)
    if g.size != v.size:
        raise D2maeError(f"sigma_histogram: {v.size} values but {g.size} group labels")
    keep = np.isfinite(v)
    if not keep.any():
        raise D2maeError("sigma_histogram: no finite σ* values to plot")
    n_missing = int((~keep).sum())
    v, g = v[keep], g[keep]
    levels = np.unique(np.round(v, 6))  # the discrete σ levels actually chosen
    names, counts = np.unique(g, return_counts=True)
    order = [names[i] for i in np.argsort(-counts, kind="stable")]
    shown = order[:max_groups]
    if len(order) > 1 and groups is not None:
        rank = {str(n): i for i, n in enumerate(group_order or [])}
        shown = sorted(shown, key=lambda n: (rank.get(str(n), len(rank)), str(n)))
    ncols = min(4, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = new_figure(3.2 * ncols + 0.5, 2.6 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    step = float(np.min(np.diff(levels))) if levels.size > 1 else 0.1
    for ax, name in zip(axes.ravel(), shown):
        sel = np.round(v[g == name], 6)
        frac = np.array([(sel == lv).mean() for lv in levels])
        ax.bar(levels, frac * 100.0, width=step * 0.8, color="#4c72b0")
        ax.axvline(float(np.mean(sel)), color="#c44e52", lw=1.2, ls="--")
        ax.set_title(f"{name} (n={sel.size}, mean {np.mean(sel):.2f})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if levels.size <= 12:
            ax.set_xticks(levels, labels=[f"{lv:g}" for lv in levels], fontsize=8)
    for ax in axes.ravel()[len(shown):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel("% of images")
    extra = []
    if len(order) > len(shown):
        extra.append(f"{len(shown)} largest of {len(order)} groups shown")
    if n_missing:
        extra.append(f"{n_missing} image(s) without a value left out")
    full = title or "Distribution of the optimal blurriness"
    fig.suptitle(full + (f" ({'; '.join(extra)})" if extra else ""), fontsize=10)
    return save_figure(fig, path)


def read_records(source: str | Path) -> list[dict[str, float]]:
    """Numeric records from a ``metrics.jsonl`` (one JSON object per line) or a CSV with a header row.

    Non-numeric fields are dropped; a malformed line is a :class:`D2maeError` naming the file and line.
    """
    path = Path(source)
    if not path.is_file():
        raise D2maeError(f"metrics file {path} does not exist")

    def numeric(row: Mapping[str, Any]) -> dict[str, float]:
        out = {}
        for k, v in row.items():
            if isinstance(v, bool) or v is None or v == "":
                continue
            try:
                out[str(k)] = float(v)
            except (TypeError, ValueError):
                continue
        return out

    if path.suffix.lower() == ".csv":
        return [numeric(row) for row in read_csv_rows(path)]
    return [numeric(obj) for obj in read_jsonl(path, strict=True)]


_AXIS_KEYS = ("step", "global_step", "iteration", "iter", "epoch", "time", "elapsed", "wall_time")


def training_curves(source: str | Path | Sequence[Mapping[str, Any]], path: str | Path,
                    keys: Sequence[str] | None = None, title: str = "Training") -> Path:
    """Loss against step (or epoch) and validation metrics against epoch, from metrics.jsonl / CSV records.

    Panels, by column name: every column containing "loss" (x = ``step`` when the record has it, else ``epoch``);
    columns starting with "val" (validation loss and validation metrics in separate panels, x = ``epoch`` when
    present); learning rate columns ("lr"). Pass ``keys`` to plot exactly those columns in one panel.
    """
    src_name = str(source) if isinstance(source, (str, Path)) else "records"
    records = read_records(source) if isinstance(source, (str, Path)) else [
        {k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for r in source]
    if not records:
        raise D2maeError(f"metrics file {src_name} holds no records")
    all_keys: list[str] = []
    for r in records:
        all_keys += [k for k in r if k not in all_keys and k not in _AXIS_KEYS]
    if keys is not None:
        missing = [k for k in keys if k not in all_keys]
        if missing:
            raise D2maeError(f"metrics file {src_name} has no column(s) {missing}; it has {all_keys}")
        panels = [("", list(keys), "step")]
    else:
        low = {k: k.lower() for k in all_keys}
        loss = [k for k in all_keys if "loss" in low[k] and not low[k].startswith("val")]
        val_loss = [k for k in all_keys if "loss" in low[k] and low[k].startswith("val")]
        val = [k for k in all_keys if low[k].startswith("val") and "loss" not in low[k]]
        lr = [k for k in all_keys if low[k] == "lr" or low[k].endswith("_lr") or low[k].startswith("lr")]
        panels = [(n, ks, x) for n, ks, x in (("Training loss", loss, "step"), ("Validation loss", val_loss, "epoch"),
                                               ("Validation metrics", val, "epoch"), ("Learning rate", lr, "step"))
                  if ks]
        if not panels:
            raise D2maeError(f"metrics file {src_name}: no column with 'loss', 'val' or 'lr' in its name "
                             f"(columns: {all_keys}); pass keys=[...]")
    fig = new_figure(4.6 * len(panels) + 0.4, 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, ks, prefer) in zip(axes, panels):
        xlabels = set()
        for k in ks:
            rows = [r for r in records if k in r and math.isfinite(r[k])]
            xkey = prefer if rows and all(prefer in r for r in rows) else next(
                (a for a in ("step", "epoch", "global_step", "iteration") if rows and all(a in r for r in rows)), None)
            xs = [r[xkey] for r in rows] if xkey else list(range(len(rows)))
            xlabels.add(xkey or "record")
            ax.plot(xs, [r[k] for r in rows], marker="o" if len(rows) < 30 else None, ms=3, lw=1.3, label=k)
        ax.set_xlabel(" / ".join(sorted(xlabels)))
        ax.set_title(name)
        if name == "Learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def roc_methods_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """ROC curves of several methods on one dataset (test predictions pooled over folds): binary, or the
    macro-average of one-vs-rest curves for more classes; the legend gives each pooled AUROC."""

    fig = new_figure(5.6, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="chance")
    grid = np.linspace(0, 1, 201)
    for label, (y, p) in curves.items():
        k = p.shape[1]
        if k == 2:
            if np.unique(y).size < 2:
                continue
            fpr, tpr, _ = roc_curve(y, p[:, 1])
            ax.plot(fpr, tpr, lw=1.8, label=f"{label} (pooled AUROC {auc(fpr, tpr) * 100:.1f})")
        else:
            tprs = []
            for c in range(k):
                pos = y == c
                if pos.all() or not pos.any():
                    continue
                fpr, tpr, _ = roc_curve(pos, p[:, c])
                tprs.append(np.interp(grid, fpr, tpr))
            if tprs:
                macro = np.mean(tprs, axis=0)
                ax.plot(grid, macro, lw=1.8, label=f"{label} (pooled macro AUROC {auc(grid, macro) * 100:.1f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def curves_figure(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], path: Path,
                  xlabel: str, title: str) -> Path:
    """Line plots, one panel per entry of ``panels`` (``{panel: {series: (x, y)}}``), one colour per series."""

    fig = new_figure(4.8 * len(panels) + 0.4, 3.7)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, series) in zip(axes, panels.items()):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, lw=1.5, marker="o" if len(xs) <= 30 else None, ms=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)

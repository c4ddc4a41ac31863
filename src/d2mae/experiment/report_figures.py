"""The report's figures (Figure 2: metrics per method; Figure 3: OBS strips and σ* distributions; reconstructions, ROC,
training curves), each drawn into OUT/figures with a failure turned into a note in the report."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from d2mae.data.dataset import ImageDataset
from d2mae.data.labels import load_labeled
from d2mae.eval import figures as rp
from d2mae.eval import image_figures
from d2mae.eval.obs import obs_strips
from d2mae.eval.statistics import mean_ci
from d2mae.experiment.forbidden import LABEL_OPTIONS
from d2mae.experiment.methods import METHODS, method_for
from d2mae.experiment.plan import Plan
from d2mae.experiment.results import RunResult, fold_metric_values, table2_methods
from d2mae.experiment.stage import Stage
from d2mae.io.artifacts import load_pretrained
from d2mae.io.obs_table import ObsTable
from d2mae.io.predictions import load_predictions
from d2mae.method.obs import ObsSpec
from d2mae.method.reconstruct import masked_reconstruction
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.logs import read_jsonl


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _sample_refs(labels_csv_refs: Sequence[str], labels: Sequence[int], n: int) -> list[str]:
    """Up to ``n`` images, alternating over the classes (the first of each class first)."""
    by_class: dict[int, list[str]] = {}
    for r, y in zip(labels_csv_refs, labels):
        by_class.setdefault(int(y), []).append(r)
    out: list[str] = []
    i = 0
    while len(out) < n and any(i < len(v) for v in by_class.values()):
        for c in sorted(by_class):
            if i < len(by_class[c]) and len(out) < n:
                out.append(by_class[c][i])
        i += 1
    return out


def reconstruction_arrays(folder: Path, refs: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Original, blurred (σ at the schedule's middle level), masked input (masked patches NaN) and reconstruction
    of a pre-trained model on ``refs`` (Eq. 1-3; the model's own mask ratio, a seeded mask)."""

    model = load_pretrained(folder, "cpu")
    cfg = model.config
    ds = ImageDataset(list(refs), cfg.img_size, cfg.in_chans, augment="none")
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # [B, C, S, S] in [0, 1]
    b = x.shape[0]
    levels = model.schedule.num_levels
    level = (levels + 1) // 2 if levels > 1 else levels  # D²MAE: t = 6 (σ 0.6); DeblurrMAE: σ 1.1; MAE: none
    t = torch.full((b,), float(level))
    noise = torch.rand(b, cfg.num_patches, generator=torch.Generator().manual_seed(seed))  # [B, N]
    views = masked_reconstruction(model, x, t, noise)
    sigma = float(model.schedule.sigma(t[:1])[0])
    return {"original": x, **views, "sigma": sigma, "mask_ratio": cfg.mask_ratio}


class FigureWriter:
    """Draws figures into OUT/figures, turning a failure into a visible note in the report (never a silent skip)."""
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.notes: list[str] = []

    def __call__(self, name: str, draw: Callable[[Path], Any]) -> Path | None:
        path = self.folder / f"{_safe(name)}.png"
        try:
            draw(path)
        except (D2maeError, ValueError, RuntimeError, OSError) as exc:
            self.notes.append(f"figure {path.name} could not be drawn: {exc}")
            return None

        return path if path.is_file() else None


def _first_seed_stage(plan: Plan, kind: str, dataset: str, **match: Any) -> Stage | None:
    for seed in plan.config.seeds:
        for s in plan.of(kind, dataset):
            if s.seed == seed and all(getattr(s, k) == v for k, v in match.items()) and s.done_info() is not None:
                return s
    return None


def _labeled_for(plan: Plan, dataset: str) -> Any:
    spec = plan.config.datasets[dataset]
    return load_labeled(plan.datasets[dataset].labels, **{k: getattr(spec, k) for k in LABEL_OPTIONS})


class _ReportFigures:
    """The report's figures of one experiment, one method per kind; ``figs`` collects ``{section: [(png, caption)]}``."""
    def __init__(self, plan: Plan, results: Sequence[RunResult], draw: FigureWriter) -> None:
        self.plan, self.results, self.draw = plan, results, draw
        self.cfg = plan.config
        self.figs: dict[str, list[tuple[Path, str]]] = {}
        self.sigma_all: list[float] = []

        self.sigma_groups: list[str] = []
        self.search_step = METHODS["d2mae"].search_step  # the OBS step of the d2mae rows (titles say it)
        self._labeled: dict[str, Any] = {}

    def add(self, section: str, path: Path | None, caption: str) -> None:
        if path is not None:

            self.figs.setdefault(section, []).append((path, caption))

    def labeled(self, ds: str) -> Any:
        if ds not in self._labeled:
            self._labeled[ds] = _labeled_for(self.plan, ds)
        return self._labeled[ds]

    def metric_bars(self) -> None:
        """Figure 2: ACC and AUROC bars with CI error bars."""
        plan, cfg, results, draw, add = self.plan, self.cfg, self.results, self.draw, self.add
        conf = cfg.report.confidence
        data: dict[str, dict[str, dict[str, Any]]] = {"ACC": {}, "AUROC": {}}
        for ds in plan.datasets:
            for m in table2_methods(cfg, results, ds):
                for key, panel in (("accuracy", "ACC"), ("auroc", "AUROC")):
                    stat = mean_ci(list(fold_metric_values(results, ds, m, key).values()), conf)
                    clip = lambda v: v if not math.isfinite(v) else min(1.0, max(0.0, v))  # noqa: E731
                    data[panel].setdefault(ds, {})[method_for(m).label] = {
                        "mean": stat.mean, "low": clip(stat.low), "high": clip(stat.high)}
        if data["ACC"]:
            add("fig2", draw("fig2_acc_auroc", lambda p: rp.metric_bars(
                data, p, title=f"ACC and AUROC, mean with {conf:.0%} CI over folds × seeds", confidence=conf)),
                f"Figure 2 style: ACC and AUROC per method (bars: mean over folds × seeds; error bars: {conf:.0%} "
                "t-interval, cut at 0 and 100%).")

    def obs_strips(self, ds: str, dp: Any) -> None:
        """Figure 3a: the OBS strip of a few images, searched with the D²MAE model."""
        plan, cfg, draw, add = self.plan, self.cfg, self.draw, self.add
        d2 = _first_seed_stage(plan, "finetune", ds, method="d2mae")
        pre = _first_seed_stage(plan, "pretrain", ds, preset="d2mae")
        if d2 is not None:
            self.search_step = d2.payload.search_step
        if d2 is not None and pre is not None and cfg.report.obs_images:
            labeled = self.labeled(ds)
            refs = _sample_refs(labeled.refs, labeled.labels, cfg.report.obs_images)
            model = load_pretrained(pre.folder, "cpu")
            with torch.no_grad():
                strips = obs_strips(model, refs, ObsSpec("search", self.search_step))
            for i, st in enumerate(strips):
                chosen = st.levels.index(st.t_star) if st.t_star in st.levels else None
                add(f"obs:{ds}", draw(f"fig3a_obs_{ds}_{i + 1}", lambda p, st=st, chosen=chosen: image_figures.obs_strip(
                    st.original, list(st.blurred), list(st.deblurred), st.sigmas, list(st.losses), p, chosen=chosen,
                    title=f"OBS on {Path(st.path).name} ({ds}): σ* = {st.sigma_star:g}")),
                    f"Figure 3a style — {ds}, {Path(st.path).name} (class "
                    f"{labeled.classes[int(labeled.labels[labeled.refs.index(st.path)])]}): blurred inputs, the "
                    "D²MAE model's deblurred outputs and their difference to the original at each searched σ; the "
                    "chosen σ* (lowest deblurring loss, Eq. 5) is framed.")

    def sigma_histograms(self, ds: str, dp: Any) -> None:
        """Figure 3b: σ* per scanner, from the OBS table of the d2mae fine-tuning (every image of the folds)."""
        plan, draw, add = self.plan, self.draw, self.add
        d2 = _first_seed_stage(plan, "finetune", ds, method="d2mae")
        if d2 is not None:
            self.search_step = d2.payload.search_step
            obs_dir = d2.folder / "obs"
            if (obs_dir / "obs.csv").is_file():
                table = ObsTable.load(obs_dir)
                sig = np.asarray(table.sigma_star, dtype=float)
                self.sigma_all += sig.tolist()
                self.sigma_groups += [ds] * len(sig)
                col = dp.spec.scanner_column
                if col:
                    labeled = self.labeled(ds)
                    index = {r: i for i, r in enumerate(labeled.refs)}
                    groups = [labeled.columns[col][index[p]] if p in index else "?" for p in table.paths]
                    add("sigma", draw(f"fig3b_sigma_{ds}_per_{col}", lambda p, sig=sig, groups=groups, col=col, ds=ds:
                                      rp.sigma_histogram(sig, p, groups=groups,
                                                         title=f"σ* per {col} — {ds} (D²MAE OBS, s = {self.search_step})")),
                        f"Figure 3b style — {ds}: distribution of σ* per {col}; the dashed line is the group's "
                        "mean. Different scanners choosing different σ* is the domain shift OBS adapts to.")

    def roc_curves(self, ds: str, dp: Any) -> None:
        """ROC curves of the Table 2 methods (first seed, test predictions pooled over folds)."""
        plan, cfg, results, draw, add = self.plan, self.cfg, self.results, self.draw, self.add
        curves = {}
        for m in table2_methods(cfg, results, ds):
            st = _first_seed_stage(plan, "finetune", ds, method=m)
            if st is not None:
                run = load_predictions(st.folder, split="test")
                curves[method_for(m).label] = (run.labels, run.probs)
        if curves:
            add(f"roc:{ds}", draw(f"roc_{ds}", lambda p, curves=curves, ds=ds: rp.roc_methods_figure(
                curves, p, f"ROC — {ds} (test images of all folds, seed {cfg.seeds[0]})")),
                f"ROC curves on {ds}: each method's test predictions pooled over the folds (seed {cfg.seeds[0]}).")

    def pretraining_curves(self, ds: str, dp: Any) -> None:
        """The pre-training loss of each preset against optimizer steps."""
        plan, cfg, draw, add = self.plan, self.cfg, self.draw, self.add
        records = []
        keys = []
        for s in plan.of("pretrain", ds):
            if s.seed != cfg.seeds[0]:
                continue
            key = f"{s.preset} loss"
            rows = [{"step": r["step"], key: r["loss"]} for r in read_jsonl(s.folder / "metrics.jsonl")
                    if "step" in r and "loss" in r]
            if rows:
                keys.append(key)
                records += rows
        if records:
            add(f"curves:{ds}", draw(f"pretrain_curves_{ds}", lambda p, records=records, keys=keys, ds=ds:
                                     rp.training_curves(records, p, keys=keys,
                                                        title=f"Pre-training loss — {ds} (seed {cfg.seeds[0]})")),
                f"Pre-training loss against optimizer step on {ds}. The losses of different presets are not "
                "comparable in level (MAE's loss is on masked patches only, D²MAE/DeblurrMAE's on all patches of "
                "a blurred input); each curve should fall.")

    def finetuning_curves(self, ds: str, dp: Any) -> None:
        """Training loss and validation macro-F1 per epoch, mean over folds."""
        plan, cfg, draw, add = self.plan, self.cfg, self.draw, self.add
        panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {"training loss": {},
                                                                          "validation macro-F1": {}}
        for m in [m.name for m in cfg.runs()]:
            st = _first_seed_stage(plan, "finetune", ds, method=m)
            if st is None:
                continue
            per_epoch: dict[int, dict[str, list[float]]] = {}
            for fold_dir in sorted(st.folder.glob("fold_*")):
                for r in read_jsonl(fold_dir / "metrics.jsonl"):
                    e = per_epoch.setdefault(int(r.get("epoch", 0)), {"train_loss": [], "val_macro_f1": []})
                    for k in e:
                        if isinstance(r.get(k), (int, float)):
                            e[k].append(float(r[k]))
            if per_epoch:
                epochs = sorted(per_epoch)
                for panel, k in (("training loss", "train_loss"), ("validation macro-F1", "val_macro_f1")):
                    xs = [e for e in epochs if per_epoch[e][k]]
                    panels[panel][method_for(m).label] = (xs, [float(np.mean(per_epoch[e][k])) for e in xs])
        if panels["training loss"]:
            add(f"curves:{ds}", draw(f"finetune_curves_{ds}", lambda p, panels=panels, ds=ds: rp.curves_figure(
                panels, p, "epoch", f"Fine-tuning — {ds} (seed {cfg.seeds[0]}, mean over folds)")),
                f"Fine-tuning on {ds}: training loss and validation macro-F1 per epoch, averaged over the folds "
                "(folds that stopped early drop out of later epochs).")

    def reconstructions(self, ds: str, dp: Any) -> None:
        """Reconstructions of masked inputs by each masked-autoencoder pre-training."""
        plan, cfg, draw, add = self.plan, self.cfg, self.draw, self.add
        if cfg.report.sample_images:
            labeled = self.labeled(ds)
            refs = _sample_refs(labeled.refs, labeled.labels, cfg.report.sample_images)
            for s in plan.of("pretrain", ds):
                if s.seed != cfg.seeds[0] or s.done_info() is None or s.payload.objective != "mae":
                    continue  # only the masked autoencoders reconstruct an image in one pass
                arr = reconstruction_arrays(s.folder, refs)
                add(f"recon:{ds}", draw(f"reconstruction_{ds}_{s.preset}", lambda p, arr=arr, s=s, ds=ds:
                                        image_figures.image_grid(
                                            {"original x": arr["original"], "blurred x_b": arr["blurred"],
                                             "masked input": arr["masked"], "reconstruction x̂": arr["reconstruction"],
                                             "x̂ in the masked patches": arr["pasted"]}, p,
                                            row_labels=[Path(r).name[:16] for r in refs],
                                            title=f"{s.preset} — {ds}: input blurred at σ = {arr['sigma']:g}, "
                                                  f"{arr['mask_ratio']:.0%} of patches masked")),
                    f"Masked reconstruction by the {s.preset} model on {ds}: original x, its blurred version "
                    f"x_b (σ = {arr['sigma']:g}{'; MAE does not blur' if arr['sigma'] == 0 else ''}), the masked "
                    "input (gray = masked patches), the model's output x̂ (its target is the original x) and, as in "
                    "MAE's figures, the visible input with x̂ in the masked patches.")

    def sigma_per_dataset(self) -> None:
        """Figure 3b across datasets: σ* per dataset, placed first among the σ* figures."""
        plan, draw, add, figs = self.plan, self.draw, self.add, self.figs
        sigma_all, sigma_groups = self.sigma_all, self.sigma_groups
        if sigma_all and len(plan.datasets) > 0:
            add("sigma", draw("fig3b_sigma_per_dataset", lambda p: rp.sigma_histogram(
                sigma_all, p, groups=sigma_groups, title=f"σ* per dataset (D²MAE OBS, s = {self.search_step})")),
                "Figure 3b style: the distribution of the optimal blurriness σ* chosen by OBS on each dataset's images.")
            figs["sigma"] = figs["sigma"][-1:] + figs["sigma"][:-1]  # the per-dataset panel first


def make_figures(plan: Plan, results: Sequence[RunResult], draw: FigureWriter) -> dict[str, list[tuple[Path, str]]]:
    """Every figure of the report, grouped by section: ``{section: [(png, caption), …]}``."""
    f = _ReportFigures(plan, results, draw)
    f.metric_bars()
    for ds, dp in plan.datasets.items():
        if dp.spec.task != "classify":  # segmentation runs draw their own figures (their evaluation/ folder)
            continue
        for kind in (f.obs_strips, f.sigma_histograms, f.roc_curves, f.pretraining_curves, f.finetuning_curves,
                     f.reconstructions):
            kind(ds, dp)
    f.sigma_per_dataset()
    return f.figs

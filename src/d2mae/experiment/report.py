"""Results, Table-2/3-style tables, figures and the report of an experiment. Part of :mod:`d2mae.experiment`."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from d2mae.experiment.config import (
    _LABEL_OPTIONS, ABLATIONS, METHODS, ExperimentConfig, Method, method_for, table2_order
)
from d2mae.experiment.plan import EXPERIMENT_CONFIG, PLAN_FILE, Plan, Stage, _fmt_seconds, machine_info, pretrain_budget
from d2mae.method.models import ModelConfig
from d2mae.runtime.errors import D2maeError
from d2mae.runtime.files import atomic_write_json, atomic_write_text
from d2mae.runtime.logs import read_jsonl
from d2mae.runtime.options import build_config

# --------------------------------------------------------------------------------------------------------------------
# results and the report
# --------------------------------------------------------------------------------------------------------------------

SIGNIFICANCE = 0.05
METRIC_COLUMNS: tuple[tuple[str, str], ...] = (("accuracy", "ACC"), ("macro_f1", "F1"), ("auroc", "AUROC"))


@dataclass
class RunResult:
    """One finished fine-tuning run: its stage and D's ``metrics.json`` (per-fold metrics)."""

    stage: Stage
    metrics: dict[str, Any]

    @property
    def method(self) -> Method:
        return method_for(str(self.stage.method))

    def fold_values(self, metric: str) -> dict[str, float]:
        """``{"seed<k>/fold<f>": value}``: the pairing key of the paired t-test (same seed, same fold)."""
        out = {}
        for fold, m in (self.metrics.get("folds") or {}).items():
            value = m.get(metric)
            out[f"seed{self.stage.seed}/fold{fold}"] = math.nan if value is None else float(value)
        return out


def collect_results(plan: Plan) -> list[RunResult]:
    """The metrics of every finished fine-tuning stage of the plan (``metrics.json`` written by evaluate)."""
    out = []
    for s in plan.of("finetune"):
        path = s.folder / "metrics.json"
        if s.done_info() is None or not path.is_file():
            continue
        out.append(RunResult(s, json.loads(path.read_text(encoding="utf-8"))))
    return out


def _values(results: Sequence[RunResult], dataset: str, method: str, metric: str) -> dict[str, float]:
    vals: dict[str, float] = {}
    for r in results:
        if r.stage.dataset == dataset and r.stage.method == method:
            vals.update(r.fold_values(metric))
    return vals


def _table2_methods(cfg: ExperimentConfig, results: Sequence[RunResult], dataset: str) -> list[str]:
    """The comparison's rows: the ``methods:`` list (in Table 2 order first) that produced results."""
    have = {r.stage.method for r in results if r.stage.dataset == dataset}
    return [m for m in table2_order(cfg.methods) if m in have]


def _method_info(m: Method, weights: Mapping[str, str]) -> dict[str, str]:
    if m.preset is not None:
        pre = {"mae": "MAE (no blur)", "deblurrmae": "DeblurrMAE (σ = 1.1)", "d2mae": "D²MAE (σ 0.1→1.1)",
               "moco-v3": "MoCo v3", "diffmae": "DiffMAE"}.get(m.preset, m.preset)
    elif m.source == "checkpoint" or m.name in weights:
        pre = f"released weights ({Path(weights[m.name]).name})"
    else:
        pre = "none"
    if m.preset is None or m.obs == "none":
        ft = "no blur"
    elif m.obs == "search":
        ft = f"OBS σ* (s = {m.search_step})"
    else:
        ft = f"fixed σ = {m.obs.split(':', 1)[1]}"
    return {"Pre-training": pre, "Fine-tuning input": ft}


def comparison_tables(plan: Plan, results: Sequence[RunResult]) -> dict[str, Any]:
    """Table 2 per dataset (ACC, F1, AUROC) and, with several datasets, the paper's F1 × datasets layout."""
    from d2mae.eval.tables import comparison_table

    cfg = plan.config
    conf = cfg.report.confidence
    tables: dict[str, Any] = {}
    for ds in plan.datasets:
        methods = _table2_methods(cfg, results, ds)
        if not methods:
            continue
        res = {method_for(m).label: {lab: _values(results, ds, m, key) for key, lab in METRIC_COLUMNS} for m in methods}
        info = {method_for(m).label: _method_info(method_for(m), cfg.weights) for m in methods}
        tables[ds] = comparison_table(res, columns=[lab for _, lab in METRIC_COLUMNS], confidence=conf, info=info,
                                      info_columns=("Pre-training", "Fine-tuning input"),
                                      caption=f"Table 2 style — {ds}: mean ± {conf:.0%} CI over folds × seeds (%)")
    if len(tables) > 1:
        methods = [m for m in cfg.methods if any(r.stage.method == m for r in results)]
        res = {method_for(m).label: {ds: _values(results, ds, m, "macro_f1") for ds in tables
                                  if _values(results, ds, m, "macro_f1")} for m in methods}
        tables["F1 × datasets"] = comparison_table(res, columns=list(tables), confidence=conf,
                                                   caption="Table 2 layout — macro-F1 (%) per dataset")
    return tables


def ablation_tables(plan: Plan, results: Sequence[RunResult]) -> dict[str, Any]:
    """Table 3 per dataset: one block per ablation group that ran, macro-F1 (the paper's metric)."""
    from d2mae.eval.tables import ablation_table

    cfg = plan.config
    out = {}
    for ds in plan.datasets:
        groups = {}
        for g in cfg.ablations:
            group = ABLATIONS[g]
            variants = {label: _values(results, ds, m, "macro_f1") for m, label in group.variants}
            variants = {k: v for k, v in variants.items() if v}
            if variants:
                groups[group.title] = variants
        if groups:
            out[ds] = ablation_table(groups, metric_label="F1 (%)", confidence=cfg.report.confidence,
                                     caption=f"Table 3 style — {ds}: ablations, macro-F1 (mean ± "
                                             f"{cfg.report.confidence:.0%} CI over folds × seeds)")
    return out


def significance_statements(tables: Mapping[str, Any], alpha: float = SIGNIFICANCE) -> list[str]:
    """One plain sentence per table column: who is best, by how much, and whether that is significant."""
    from d2mae.eval.tables import format_p_statement

    lines = []
    for name, table in tables.items():
        cells = table.data.get("cells", {})
        for col, entry in table.data.get("columns", {}).items():
            best, second = entry.get("best"), entry.get("second")
            if best is None:
                continue
            where = f"{name}, {col}" if name != col else name
            if second is None:
                lines.append(f"{where}: only {best} has results; nothing to compare.")
                continue
            diff = (cells[best][col]["mean"] - cells[second][col]["mean"]) * 100
            p = entry.get("pvalue")
            n = entry.get("n_pairs", 0)
            if abs(diff) < 5e-3:
                tied = [m for m in entry.get("ranking", []) if abs(cells[m][col]["mean"] - cells[best][col]["mean"])
                        < 5e-5]
                lines.append(f"{where}: {', '.join(tied)} tie ({cells[best][col]['mean'] * 100:.2f}); no method is "
                             "better here.")
                continue
            head = f"{where}: best {best}, {diff:.2f} points above {second}"
            if p is None or not math.isfinite(p):
                why = entry.get("note") or "too few paired folds/seeds"
                lines.append(f"{head}; significance cannot be assessed ({why}) — treat the ranking as unconfirmed.")
            elif p < alpha:
                caveat = f" (caution: {entry['note']})" if entry.get("note") else ""
                lines.append(f"{head}; {format_p_statement(p)} (two-sided paired t-test over {n} folds × seeds): "
                             f"significant at {alpha:g}{caveat}.")
            else:
                lines.append(f"{head}; {format_p_statement(p)} (two-sided paired t-test over {n} folds × seeds): "
                             f"**not significant** at {alpha:g} — the difference may well be chance.")
    return lines


def check_same_folds(plan: Plan) -> list[str]:
    """Problems found when checking that, per dataset and seed, every method predicted the same images of each fold
    and split (the folds of the equal-budget rule); empty when all agree."""
    problems = []
    for ds in plan.datasets:
        for seed in plan.config.seeds:
            ref: tuple[str, set] | None = None
            for s in plan.of("finetune", ds):
                path = s.folder / "predictions.csv"
                if s.seed != seed or not path.is_file():
                    continue
                with path.open(newline="", encoding="utf-8") as fh:
                    rows = {(r["fold"], r["split"], r["path"]) for r in csv.DictReader(fh)}
                if ref is None:
                    ref = (str(s.method), rows)
                elif rows != ref[1]:
                    problems.append(f"{ds}, seed {seed}: {s.method} was evaluated on other fold images than "
                                    f"{ref[0]} ({len(rows ^ ref[1])} differences)")
    return problems


# ---- figures -------------------------------------------------------------------------------------------------------


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
    import torch

    from d2mae.data.dataset import ImageDataset
    from d2mae.io.artifacts import load_pretrained
    from d2mae.method.blur import gaussian_blur

    model = load_pretrained(folder, "cpu")
    cfg = model.config
    ds = ImageDataset(list(refs), cfg.img_size, cfg.in_chans, augment="none")
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # [B, C, S, S] in [0, 1]
    b = x.shape[0]
    levels = model.schedule.num_levels
    level = (levels + 1) // 2 if levels > 1 else levels  # D²MAE: t = 6 (σ 0.6); DeblurrMAE: σ 1.1; MAE: none
    t = torch.full((b,), float(level))
    noise = torch.rand(b, cfg.num_patches, generator=torch.Generator().manual_seed(seed))  # [B, N]
    enc = model.encoder
    with torch.no_grad():
        latent, mask, ids_restore = enc(x, t, cfg.mask_ratio, noise=noise)
        recon = model.to_image(model.forward_decoder(latent, ids_restore), x)  # [B, C, S, S] in [0, 1]
        blurred = gaussian_blur(x, model.schedule.sigma(t)).clamp(0, 1)  # [B, C, S, S]
    grid, p = cfg.img_size // cfg.patch, cfg.patch
    pix = mask.reshape(b, 1, grid, grid).repeat_interleave(p, 2).repeat_interleave(p, 3)  # [B, 1, S, S]
    hidden = pix.expand_as(blurred) > 0  # [B, C, S, S] True where a patch was masked
    masked = blurred.clone()
    masked[hidden] = float("nan")
    pasted = torch.where(hidden, recon, blurred)  # MAE's view: the visible input, masked patches filled in
    sigma = float(model.schedule.sigma(t[:1])[0])
    return {"original": x, "blurred": blurred, "masked": masked, "reconstruction": recon, "pasted": pasted,
            "sigma": sigma, "mask_ratio": cfg.mask_ratio}


class _Figures:
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
    from d2mae.data.labels import load_labeled

    spec = plan.config.datasets[dataset]
    return load_labeled(plan.datasets[dataset].labels, **{k: getattr(spec, k) for k in _LABEL_OPTIONS})


def make_figures(plan: Plan, results: Sequence[RunResult], draw: _Figures) -> dict[str, list[tuple[Path, str]]]:
    """Every figure of the report, grouped by section: ``{section: [(png, caption), …]}``."""
    import torch

    from d2mae.eval import figures as rp
    from d2mae.eval.evaluate import load_predictions
    from d2mae.eval.metrics import mean_ci

    cfg = plan.config
    conf = cfg.report.confidence
    figs: dict[str, list[tuple[Path, str]]] = {}

    def add(section: str, path: Path | None, caption: str) -> None:
        if path is not None:
            figs.setdefault(section, []).append((path, caption))

    # Figure 2: ACC and AUROC bars with CI error bars
    data: dict[str, dict[str, dict[str, Any]]] = {"ACC": {}, "AUROC": {}}
    for ds in plan.datasets:
        for m in _table2_methods(cfg, results, ds):
            for key, panel in (("accuracy", "ACC"), ("auroc", "AUROC")):
                stat = mean_ci(list(_values(results, ds, m, key).values()), conf)
                clip = lambda v: v if not math.isfinite(v) else min(1.0, max(0.0, v))  # noqa: E731
                data[panel].setdefault(ds, {})[method_for(m).label] = {
                    "mean": stat.mean, "low": clip(stat.low), "high": clip(stat.high)}
    if data["ACC"]:
        add("fig2", draw("fig2_acc_auroc", lambda p: rp.metric_bars(
            data, p, title=f"ACC and AUROC, mean with {conf:.0%} CI over folds × seeds", confidence=conf)),
            f"Figure 2 style: ACC and AUROC per method (bars: mean over folds × seeds; error bars: {conf:.0%} "
            "t-interval, cut at 0 and 100%).")

    sigma_all: list[float] = []
    sigma_groups: list[str] = []
    for ds, dp in plan.datasets.items():
        d2 = _first_seed_stage(plan, "finetune", ds, method="d2mae")
        pre = _first_seed_stage(plan, "pretrain", ds, preset="d2mae")
        labeled = None
        # Figure 3a: the OBS strip
        if d2 is not None and pre is not None and cfg.report.obs_images:
            from d2mae.eval.obs import obs_strips
            from d2mae.io.artifacts import load_pretrained
            from d2mae.method.obs import ObsSpec

            labeled = labeled or _labeled_for(plan, ds)
            refs = _sample_refs(labeled.refs, labeled.labels, cfg.report.obs_images)
            model = load_pretrained(pre.folder, "cpu")
            with torch.no_grad():
                strips = obs_strips(model, refs, ObsSpec("search", METHODS["d2mae"].search_step))
            for i, st in enumerate(strips):
                chosen = st.levels.index(st.t_star) if st.t_star in st.levels else None
                add(f"obs:{ds}", draw(f"fig3a_obs_{ds}_{i + 1}", lambda p, st=st, chosen=chosen: rp.obs_strip(
                    st.original, list(st.blurred), list(st.deblurred), st.sigmas, list(st.losses), p, chosen=chosen,
                    title=f"OBS on {Path(st.path).name} ({ds}): σ* = {st.sigma_star:g}")),
                    f"Figure 3a style — {ds}, {Path(st.path).name} (class "
                    f"{labeled.classes[int(labeled.labels[labeled.refs.index(st.path)])]}): blurred inputs, the "
                    "D²MAE model's deblurred outputs and their difference to the original at each searched σ; the "
                    "chosen σ* (lowest deblurring loss, Eq. 5) is framed.")
        # Figure 3b: σ* histograms, from the OBS table of the d2mae fine-tuning (every image of the folds)
        if d2 is not None:
            from d2mae.io.obs_table import ObsTable

            obs_dir = d2.folder / "obs"
            if (obs_dir / "obs.csv").is_file():
                table = ObsTable.load(obs_dir)
                sig = np.asarray(table.sigma_star, dtype=float)
                sigma_all += sig.tolist()
                sigma_groups += [ds] * len(sig)
                col = dp.spec.scanner_column
                if col:
                    labeled = labeled or _labeled_for(plan, ds)
                    index = {r: i for i, r in enumerate(labeled.refs)}
                    groups = [labeled.columns[col][index[p]] if p in index else "?" for p in table.paths]
                    add("sigma", draw(f"fig3b_sigma_{ds}_per_{col}", lambda p, sig=sig, groups=groups, col=col, ds=ds:
                                      rp.sigma_histogram(sig, p, groups=groups,
                                                         title=f"σ* per {col} — {ds} (D²MAE OBS, s = 2)")),
                        f"Figure 3b style — {ds}: distribution of σ* per {col}; the dashed line is the group's "
                        "mean. Different scanners choosing different σ* is the domain shift OBS adapts to.")
        # ROC curves of the Table 2 methods (first seed, test predictions pooled over folds)
        curves = {}
        for m in _table2_methods(cfg, results, ds):
            st = _first_seed_stage(plan, "finetune", ds, method=m)
            if st is not None:
                run = load_predictions(st.folder, split="test")
                curves[method_for(m).label] = (run.labels, run.probs)
        if curves:
            add(f"roc:{ds}", draw(f"roc_{ds}", lambda p, curves=curves, ds=ds: rp.roc_methods_figure(
                curves, p, f"ROC — {ds} (test images of all folds, seed {cfg.seeds[0]})")),
                f"ROC curves on {ds}: each method's test predictions pooled over the folds (seed {cfg.seeds[0]}).")
        # pre-training curves
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
        # fine-tuning curves: mean over folds per epoch
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
        # reconstructions of masked inputs
        if cfg.report.sample_images:
            labeled = labeled or _labeled_for(plan, ds)
            refs = _sample_refs(labeled.refs, labeled.labels, cfg.report.sample_images)
            for s in plan.of("pretrain", ds):
                if s.seed != cfg.seeds[0] or s.done_info() is None or s.payload.objective != "mae":
                    continue  # only the masked autoencoders reconstruct an image in one pass
                arr = reconstruction_arrays(s.folder, refs)
                add(f"recon:{ds}", draw(f"reconstruction_{ds}_{s.preset}", lambda p, arr=arr, s=s, ds=ds:
                                        rp.image_grid(
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
    if sigma_all and len(plan.datasets) > 0:
        add("sigma", draw("fig3b_sigma_per_dataset", lambda p: rp.sigma_histogram(
            sigma_all, p, groups=sigma_groups, title="σ* per dataset (D²MAE OBS, s = 2)")),
            "Figure 3b style: the distribution of the optimal blurriness σ* chosen by OBS on each dataset's images.")
        figs["sigma"] = figs["sigma"][-1:] + figs["sigma"][:-1]  # the per-dataset panel first
    return figs


def _stage_times(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for s in plan.stages:
        info = s.done_info() or {}
        rows.append({"stage": s.label, "kind": s.kind, "dataset": s.dataset, "method": s.method, "seed": s.seed,
                     "seconds": info.get("seconds"), "estimate_s": info.get("estimate_s"),
                     "finished": info.get("finished"), "folder": str(s.folder)})
    return rows


def write_report(plan: Plan, wall_seconds: float | None = None) -> Path:
    """Write OUT/report.md + report.html (figures embedded), metrics.csv/json, machine.json, timings.json/csv."""
    from d2mae.eval.document import Report
    from d2mae.eval.metrics import nan_to_none
    from d2mae.eval.tables import Table

    cfg, out = plan.config, plan.out
    results = collect_results(plan)
    if not results:
        raise D2maeError(f"{out}: no finished fine-tuning run to report on; run the experiment first")
    machine = machine_info()
    timings = _stage_times(plan)
    atomic_write_json(out / "machine.json", machine)
    atomic_write_json(out / "timings.json", {"stages": timings, "wall_seconds_this_invocation": wall_seconds})
    _write_csv(out / "timings.csv", timings)
    rows = []
    for r in results:
        for fold, m in (r.metrics.get("folds") or {}).items():
            rows.append({"dataset": r.stage.dataset, "method": r.stage.method, "label": r.method.label,
                         "seed": r.stage.seed, "fold": fold, "n": m.get("n"),
                         **{k: m.get(k) for k in ("accuracy", "macro_f1", "auroc", "balanced_accuracy")},
                         "run": str(r.stage.folder)})
    _write_csv(out / "metrics.csv", rows)
    tables = comparison_tables(plan, results)
    ablations = ablation_tables(plan, results)
    statements = significance_statements({k: t for k, t in tables.items() if k in plan.datasets})
    abl_statements = []
    for ds, t in ablations.items():
        for group, entry in t.data.items():
            order = entry.get("ranking", [])
            p = entry.get("pvalue")
            if len(order) >= 2:
                sig = ("significant" if p is not None and math.isfinite(p) and p < SIGNIFICANCE else
                       "**not significant**" if p is not None and math.isfinite(p) else "not testable")
                ptext = f"P = {p:.3f}" if p is not None and math.isfinite(p) else "no P-value"
                abl_statements.append(f"{ds}, {group}: best {order[0]}, second {order[1]} ({ptext}: {sig}).")
    fold_problems = check_same_folds(plan)
    atomic_write_json(out / "metrics.json", nan_to_none({
        "format": "d2mae-experiment-results", "format_version": 1, "experiment": cfg.name,
        "per_fold": rows, "tables": {k: t.data for k, t in tables.items()},
        "ablations": {k: t.data for k, t in ablations.items()}, "significance": statements + abl_statements,
        "same_folds_problems": fold_problems,
        "runs": [{"dataset": r.stage.dataset, "method": r.stage.method, "seed": r.stage.seed,
                  "run": str(r.stage.folder), "over_folds": r.metrics.get("over_folds"),
                  "pooled": {k: r.metrics.get("pooled", {}).get(k) for k in ("accuracy", "macro_f1", "auroc")}}
                 for r in results]}))

    draw = _Figures(out / "figures")
    figs = make_figures(plan, results, draw)

    rep = Report(cfg.report.title or f"d2mae experiment: {cfg.name}")
    b = cfg.budget
    methods_text = ", ".join(f"{method_for(m.name).label} ({m.describe()})" for m in cfg.runs())
    rep.paragraph(f"{cfg.description + ' ' if cfg.description else ''}Datasets: {', '.join(plan.datasets)}. "
                  f"Seeds: {', '.join(map(str, cfg.seeds))}. Methods: {methods_text}.")
    rep.heading("Summary")
    bullets = list(statements) + abl_statements
    if any("not significant" in s or "cannot be assessed" in s for s in bullets):
        bullets.append("Where a difference is not significant, this experiment does not show that one method is "
                       "better than the other; more folds, seeds or data would be needed.")
    rep.bullets(bullets or ["No comparison was possible (fewer than two methods)."])
    if fold_problems:
        rep.paragraph("**Warning: the methods were not evaluated on identical folds** — " + "; ".join(fold_problems))
    rep.heading("Setup")
    setup = []
    for name, dp in plan.datasets.items():
        accum = int(cfg.pretrain.get("accum_iter", 1))
        epochs, _, steps = pretrain_budget(b, dp.n_pretrain, accum)
        eff = b.pretrain_batch_size * accum
        folds = "; ".join(f"fold {f[0]}: {f[1]}/{f[2]}/{f[3]}" for f in _actual_folds(plan, name) or dp.folds)
        setup.append(f"**{name}**: {dp.n_pretrain} pre-training images, {dp.n_labeled} labeled images, "
                     f"{dp.num_classes} classes; protocol `{dp.spec.protocol}` (train/val/test {folds}).")
        fine = [s.payload for s in plan.of("finetune", name)]
        patience = fine[0].patience if fine else 0
        stopping = f"early stopping after {patience} epochs without a better one" if patience else "no early stopping"
        setup.append(f"Equal budget on {name}: every pre-trained method {steps:,} optimizer steps × batch "
                     f"{eff} = {steps * eff:,} images seen; every method "
                     f"fine-tuned ≤ {b.finetune_epochs} epochs × batch {b.finetune_batch_size} with the same recipe "
                     f"(the epoch with the best validation macro-F1 kept, {stopping}) on the same folds "
                     f"({'verified on the predictions' if not fold_problems else 'NOT identical, see above'}).")
        if dp.overlap:
            setup.append(f"Note on {name}: {dp.overlap}.")
    mc = build_config(ModelConfig, (cfg.model, "model"))
    setup.append(f"Model: {mc.model} ({mc.blocks} blocks, width {mc.dim}, {mc.heads} heads, patch {mc.patch}), "
                 f"{mc.img_size} px, {mc.in_chans} channel(s); decoder {mc.decoder_depth} × {mc.decoder_embed_dim}; "
                 f"mask ratio {mc.mask_ratio:.0%}.")
    rep.bullets(setup)
    rep.heading("Results (Table 2 style)")
    rep.paragraph(f"Test-set metrics in %, mean ± half-width of the {cfg.report.confidence:.0%} t-interval over "
                  "folds × seeds. Best **bold**, second <u>underlined</u>; the P-value row is the two-sided paired "
                  "t-test of the best vs. the second method over the same folds and seeds (paper, Section 3.1).")
    for name, t in tables.items():
        rep.table(t)
    for path, caption in figs.get("fig2", []):
        rep.image(path, caption)
    if ablations:
        rep.heading("Ablations (Table 3 style)")
        rep.paragraph("Each block varies one factor of D²MAE with everything else fixed; variants that share a "
                      "pre-trained model (OBS setting, search step) reuse it.")
        for name, t in ablations.items():
            rep.table(t)
    obs_sections = [k for k in figs if k.startswith("obs:")]
    if obs_sections or "sigma" in figs:
        rep.heading("Optimal blurriness search (Figure 3 style)")
        for k in obs_sections:
            for path, caption in figs[k]:
                rep.image(path, caption)
        for path, caption in figs.get("sigma", []):
            rep.image(path, caption)
    for prefix, heading in (("roc:", "ROC curves"), ("curves:", "Training curves"),
                            ("recon:", "Reconstructions of masked inputs")):
        keys = [k for k in figs if k.startswith(prefix)]
        if keys:
            rep.heading(heading)
            for k in keys:
                for path, caption in figs[k]:
                    rep.image(path, caption)
    if draw.notes:
        rep.heading("Figures that could not be drawn")
        rep.bullets(draw.notes)
    rep.heading("Per-run results")
    run_rows = []
    for r in results:
        of = r.metrics.get("over_folds") or {}
        cells = []
        for key, _ in METRIC_COLUMNS:
            if key in of and of[key].get("mean") is not None:
                hw = of[key].get("half_width")
                cells.append(f"{of[key]['mean'] * 100:.2f}" + (f" ± {hw * 100:.2f}" if hw is not None else ""))
            else:
                v = (r.metrics.get("pooled", {}).get(key) or {}).get("value")
                cells.append("n/a" if v is None else f"{v * 100:.2f}")
        run_rows.append([r.stage.dataset, r.method.label, str(r.stage.seed), str(r.metrics.get("n_folds")), *cells,
                         f"`{r.stage.folder.relative_to(out)}`"])
    rep.table(Table(["Dataset", "Method", "Seed", "Folds", "ACC", "F1", "AUROC", "Run folder"], run_rows,
                    align=["l", "l", "r", "r", "r", "r", "r", "l"],
                    notes=["Per run: mean ± CI over its folds (one fold: pooled value). Each run folder holds "
                           "predictions.csv, metrics.json/.md/.html (per-fold and pooled metrics with bootstrap CIs), "
                           "ROC/confusion/σ* figures and the fine-tuned models."]))
    rep.heading("Machine, software and time")
    rep.table(Table(["", ""], [
        ["Platform", machine["platform"]], ["CPU", f"{machine['cpu']} ({machine['cores']} cores available, "
                                                  f"{machine['torch_threads']} torch threads, OpenMP wait policy "
                                                  f"{machine['omp_wait_policy']}; load average "
                                                  f"{machine['load_average']} when the report was written)"],
        ["Memory", f"{machine['memory_gib']} GiB"], ["GPU", ", ".join(machine["gpus"])],
        ["Software", f"python {machine['python']}, torch {machine['torch']}, timm {machine['timm']}, numpy "
                     f"{machine['numpy']}, scikit-learn {machine['scikit-learn']}, d2mae {machine['d2mae']}"]],
        align=["l", "l"]))
    time_rows = []
    total = 0.0
    for t in timings:
        sec = t["seconds"]
        total += sec or 0.0
        est = t["estimate_s"]
        time_rows.append([t["stage"], _fmt_seconds(sec) if sec is not None else "not run",
                          _fmt_seconds(est) if est is not None else "-"])
    time_rows.append(["**all stages**", f"**{_fmt_seconds(total)}**", ""])
    notes = ["Wall time of each stage when it ran (a stage reused from an earlier invocation keeps its own time); "
             "the estimate is what --plan predicted from timing a few steps."]
    if wall_seconds is not None:
        notes.append(f"This invocation took {_fmt_seconds(wall_seconds)} up to writing the report.")
    rep.table(Table(["Stage", "Wall time", "Estimate"], time_rows, notes=notes, align=["l", "r", "r"]))
    rep.heading("Files")
    rep.bullets([f"`{EXPERIMENT_CONFIG}`: the resolved config; `{PLAN_FILE}`: the stages and their folders.",
                 "`metrics.csv` / `metrics.json`: per-fold metrics of every run, the tables' numbers and P-values.",
                 "`machine.json`, `timings.json` / `timings.csv`: the machine, software versions and stage times.",
                 "`figures/`: every figure as PNG; `runs/`, `pretrained/`, `data/`: the stages' outputs."])
    rep.heading("Resolved config")
    rep.code(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
    md, _ = rep.write(out, stem="report")
    return md


def _actual_folds(plan: Plan, dataset: str) -> list[tuple[str, int, int, int]]:
    """(fold, n_train, n_val, n_test) as the first finished fine-tuning of ``dataset`` recorded them."""
    for s in plan.of("finetune", dataset):
        path = s.folder / "run.json"
        if s.done_info() is not None and path.is_file():
            details = json.loads(path.read_text(encoding="utf-8")).get("fold_details") or []
            return [(str(d["fold"]), int(d["n_train"]), int(d["n_val"]), int(d["n_test"])) for d in details]
    return []


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())
